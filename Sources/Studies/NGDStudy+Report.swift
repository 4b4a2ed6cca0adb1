import Foundation
import NormKit
import Training

extension NGDStudy {
    /// Runs the study.
    public static func run(_ o: StudyOptions, log: (String) -> Void) throws -> StudyResult {
        let plan = Plan(o)
        let data = try data(o, plan)
        var runs: [Method: [Run]] = [:]
        var pilots: [Method: [Double?]] = [:]
        var csv: [[String]] = [
            [
                "method", "seed", "learning_rate", "step", "train_seconds", "loss", "layer",
                "update_cosine", "gradient_cosine", "update_cosine_strong",
                "gradient_cosine_strong", "condition_effective", "condition_own",
                "condition_input_factor", "test_accuracy", "diverged_at",
            ]
        ]
        for method in Method.allCases {
            let pilot = try pilot(method, plan: plan, data: data)
            pilots[method] = pilot
            let rate = chooseRate(pilot, rates: plan.rates)
            log(
                "ngd: \(method.rawValue) pilot losses "
                    + zip(plan.rates, pilot).map {
                        "\($0): \($1.map { String(format: "%.3f", $0) } ?? "—")"
                    }
                    .joined(separator: ", ") + "; rate \(rate)")
            for seed in 1...o.seeds {
                let r = try NGDStudy.train(
                    method, learningRate: rate, seed: seed, plan: plan, data: data)
                runs[method, default: []].append(r)
                let divergedAt = r.divergedAt.map { "\($0)" } ?? ""
                for (k, probes) in r.probes.enumerated() {
                    for (l, p) in probes.enumerated() {
                        csv.append(
                            [
                                method.rawValue, "\(seed)", "\(rate)", "\(r.steps[k])",
                                "\(r.seconds[k])", "\(r.losses[k])", "\(l + 1)",
                                "\(p.updateCosine)", "\(p.gradientCosine)",
                                "\(p.updateCosineStrong)", "\(p.gradientCosineStrong)",
                                "\(p.effectiveCondition)", "\(p.ownCondition)",
                                "\(p.inputFactorCondition)", "\(r.testAccuracy)", divergedAt,
                            ])
                    }
                }
                let last = r.probes.last?.first
                log(
                    "ngd: \(method.rawValue) seed \(seed) lr \(rate): loss \(String(format: "%.3f", r.losses.last ?? .nan)), "
                        + "hidden-layer cos(update, F⁻¹g) \(String(format: "%.3f", last?.updateCosine ?? .nan))"
                        + (r.divergedAt.map { ", diverged at step \($0)" } ?? ""))
            }
        }
        // The diagnosis of the whitened networks' small rates: the same pilots with the whitening
        // re-estimated on every step's own batch (T = 1), so that it is never stale.
        var fresh = plan
        fresh.period = 1
        var freshPilots: [Method: [Double?]] = [:]
        for method in [Method.wnn, .gwnn, .eigennet] {
            freshPilots[method] = try pilot(method, plan: fresh, data: data)
            log(
                "ngd: \(method.rawValue) pilot with T = 1: rate \(chooseRate(freshPilots[method]!, rates: plan.rates))"
            )
        }
        var analysis = Analysis(runs: runs, seeds: o.seeds, pilots: pilots, rates: plan.rates)
        analysis.freshPilots = freshPilots
        analysis.period = plan.period
        let grid = plan.rates.map { "\($0)" }.joined(separator: ", ")
        let pilotSeeds = plan.pilotSeeds.map { "\($0)" }.joined(separator: " and ")
        let chosen = Method.allCases.map { m -> String in
            "\(m.label) \(runs[m]?.first?.learningRate ?? .nan)"
        }.joined(separator: ", ")
        var setup =
            "\(data.name), \(data.train.count) training / \(data.testLabels.count) test images"
        setup +=
            " average-pooled to \(data.inputs) inputs; MLP \(data.inputs) → \(plan.hidden) → ReLU"
        setup +=
            " → \(data.train.classCount) in Double; SGD without momentum, batch \(plan.batchSize),"
        setup +=
            " \(plan.steps) steps; each method's learning rate is the one of {\(grid)} with the"
        setup +=
            " lowest loss after pilot runs of the same length on seeds \(pilotSeeds) (not reported"
        setup +=
            " seeds; the worse of the two counts, and a rate whose pilot diverged or ended above"
        setup +=
            " its initial loss is excluded): \(chosen); whitening refreshed every \(plan.period)"
        setup +=
            " steps on the step's batch (GWNN's data pass every \(10 * plan.period)), no truncation,"
        setup +=
            " ε = \(plan.epsilon) × the mean eigenvalue; exact empirical Fisher of each layer on"
        setup +=
            " \(data.probeLabels.count) training images every \(plan.probeEvery) steps, damping"
        setup +=
            " λ = \(plan.damping) × its mean eigenvalue; \(o.seeds) seeds (\(o.scale.rawValue) scale)"
        return StudyResult(
            name: .ngd, title: "6. Whitened layers and natural gradient (GWNN, EigenNet)",
            claim:
                "Whitening a layer's input makes SGD on the reparametrized layer approximate natural gradient descent (Desjardins et al. 2015; GWNN, Luo, ICML 2017), and whitening the back-propagated gradients as well (EigenNet, Luo, IJCAI 2017) makes both Kronecker factors of the layer's Fisher block ≈ I, i.e. the Fisher well conditioned.",
            headline: analysis.headline, matchesPaper: analysis.matches, setup: setup,
            command: "", seconds: 0, tables: analysis.tables, charts: analysis.charts,
            notes: analysis.notes, runs: csv)
    }

    /// The summaries, charts and words computed from the runs.
    struct Analysis {
        let runs: [Method: [Run]]
        let seeds: Int
        /// The pilot losses per method, one per rate (nil: diverged).
        var pilots: [Method: [Double?]] = [:]
        var rates: [Double] = []
        /// The whitened methods' pilots with T = 1.
        var freshPilots: [Method: [Double?]] = [:]
        /// T of the reported runs.
        var period = 10

        /// The largest rate of the grid whose pilot was stable.
        func largestStable(_ losses: [Double?]) -> Double? {
            zip(rates, losses).filter { $0.1 != nil }.map(\.0).max()
        }

        /// Per seed: the mean over the probes after step 0 (step 0 is the common
        /// initialisation, before any whitening) of one number of layer `layer`.
        func perSeed(_ m: Method, _ layer: Int, _ key: KeyPath<LayerProbe, Double>) -> Summary {
            Summary(
                (runs[m] ?? []).map { r in
                    let v = zip(r.steps, r.probes).filter { $0.0 > 0 }.map {
                        $0.1[layer][keyPath: key]
                    }
                    return v.isEmpty ? .nan : v.reduce(0, +) / Double(v.count)
                })
        }

        func final(_ m: Method, _ key: KeyPath<Run, Double>) -> Summary {
            Summary((runs[m] ?? []).map { $0[keyPath: key] })
        }

        /// The points of one probe number over steps (seeds that reached the step).
        func series(
            _ m: Method, _ layer: Int, _ key: KeyPath<LayerProbe, Double>, name: String? = nil,
            dashed: Bool = false
        ) -> Chart.Series {
            let list = runs[m] ?? []
            let steps = list.max { $0.steps.count < $1.steps.count }?.steps ?? []
            return Chart.Series(
                name: name ?? m.label,
                points: steps.enumerated().map { k, step in
                    Chart.Point(
                        x: Double(step),
                        Summary(
                            list.compactMap {
                                k < $0.probes.count ? $0.probes[k][layer][keyPath: key] : nil
                            }))
                }, dashed: dashed)
        }

        func lossSeries(_ m: Method, time: Bool) -> Chart.Series {
            let list = runs[m] ?? []
            let steps = list.max { $0.steps.count < $1.steps.count }?.steps ?? []
            return Chart.Series(
                name: m.label,
                points: steps.indices.map { k in
                    let reached = list.filter { k < $0.losses.count }
                    let x =
                        time
                        ? reached.map { $0.seconds[k] }.reduce(0, +) / Double(max(reached.count, 1))
                        : Double(steps[k])
                    return Chart.Point(x: x, Summary(reached.map { $0.losses[k] }))
                })
        }

        var charts: [Chart] {
            let methods = Method.allCases
            var condition = Chart(
                id: "ngd-condition",
                title:
                    "Condition number κ of the hidden layer's damped Fisher block: in the layer's own (whitened) coordinates (solid) and in the coordinates of its input x (dashed)",
                xLabel: "training step", yLabel: "κ", yScale: .log,
                series: methods.map { series($0, 0, \.ownCondition) }
                    + methods.filter { $0 != .plain }.map {
                        series($0, 0, \.effectiveCondition, name: $0.label + " (x)", dashed: true)
                    })
            condition.yIncludes = nil
            return [
                Chart(
                    id: "ngd-cosine-hidden",
                    title:
                        "Hidden layer: cosine between SGD's step, as the change of the layer's map in x, and the exact damped natural gradient F⁻¹g",
                    xLabel: "training step", yLabel: "cos(step, F⁻¹g)",
                    series: methods.map { series($0, 0, \.updateCosine) }, yIncludes: 0),
                Chart(
                    id: "ngd-cosine-hidden-strong",
                    title:
                        "Hidden layer: the same cosine with the stronger damping λ = \(NGDStudy.strongDamping) × the mean eigenvalue",
                    xLabel: "training step", yLabel: "cos(step, F⁻¹g)",
                    series: methods.map { series($0, 0, \.updateCosineStrong) }, yIncludes: 0),
                Chart(
                    id: "ngd-cosine-output",
                    title: "Output layer: the same cosine (BN's classifier is a plain layer)",
                    xLabel: "training step", yLabel: "cos(step, F⁻¹g)",
                    series: methods.map { series($0, 1, \.updateCosine) }, yIncludes: 0),
                condition,
                Chart(
                    id: "ngd-input-factor",
                    title:
                        "Condition number of the hidden layer's input-side Kronecker factor E[[â, 1][â, 1]ᵀ] in its own coordinates (1 = white; whitening goes stale between refreshes)",
                    xLabel: "training step", yLabel: "κ", yScale: .log,
                    series: methods.map { series($0, 0, \.inputFactorCondition) }),
                Chart(
                    id: "ngd-loss-steps",
                    title: "Training loss (on the probe images, inference mode) against steps",
                    xLabel: "training step", yLabel: "cross-entropy",
                    series: methods.map { lossSeries($0, time: false) }),
                Chart(
                    id: "ngd-loss-time",
                    title:
                        "Training loss against wall time of the training steps (probes excluded; x is the mean over seeds)",
                    xLabel: "seconds", yLabel: "cross-entropy",
                    series: methods.map { lossSeries($0, time: true) }),
            ]
        }

        var tables: [Table] {
            let rows = Method.allCases.map { m -> [String] in
                [
                    m.label, "\(runs[m]?.first?.learningRate ?? .nan)",
                    perSeed(m, 0, \.updateCosine).text(digits: 3),
                    perSeed(m, 1, \.updateCosine).text(digits: 3),
                    perSeed(m, 0, \.gradientCosine).text(digits: 3),
                    perSeed(m, 0, \.updateCosineStrong).text(digits: 3),
                    perSeed(m, 0, \.gradientCosineStrong).text(digits: 3),
                    perSeed(m, 0, \.effectiveCondition).text(digits: 0),
                    perSeed(m, 0, \.ownCondition).text(digits: 0),
                    perSeed(m, 0, \.inputFactorCondition).text(digits: 1),
                    perSeed(m, 1, \.ownCondition).text(digits: 0),
                    final(m, \.finalLoss).text(digits: 3),
                    final(m, \.testAccuracy).text(scale: 100),
                    final(m, \.trainSeconds).text(digits: 2),
                    "\((runs[m] ?? []).filter(\.diverged).count)",
                ]
            }
            var tables = [
                Table(
                    title:
                        "Per method, mean over probes after step 0, then mean ± sd over \(seeds) seeds (a diverged run contributes its probes before it diverged; κ: condition number of the damped block)",
                    columns: [
                        "method", "η", "cos(step, F⁻¹g) hidden", "cos(step, F⁻¹g) output",
                        "cos(g, F⁻¹g) hidden, same weights",
                        "cos(step, F⁻¹g) hidden, λ = \(NGDStudy.strongDamping)×",
                        "cos(g, F⁻¹g) hidden, λ = \(NGDStudy.strongDamping)×", "κ hidden (x)",
                        "κ hidden (own)",
                        "κ hidden input factor (own)", "κ output (own)", "final loss",
                        "test accuracy (%)", "training s", "diverged",
                    ], rows: rows)
            ]
            if !pilots.isEmpty {
                tables.append(
                    Table(
                        title:
                            "Pilot runs (two seeds outside the reported ones, no probes): the worse final loss on the probe images, per learning rate (— : diverged or not below the initial loss)",
                        columns: ["method"] + rates.map { "η = \($0)" },
                        rows: Method.allCases.map { m in
                            [m.label]
                                + (pilots[m] ?? []).map {
                                    $0.map { String(format: "%.3f", $0) } ?? "—"
                                }
                        }
                            + Method.allCases.compactMap { m in
                                freshPilots[m].map { losses in
                                    ["\(m.label), T = 1 (diagnosis, not reported runs)"]
                                        + losses.map {
                                            $0.map { String(format: "%.3f", $0) } ?? "—"
                                        }
                                }
                            }))
            }
            return tables
        }

        /// Whether method `m`'s hidden-layer step is closer to F⁻¹g than `reference`'s (by more
        /// than the seeds' spread), at the weak damping or, with `strong`, the strong one.
        func closer(_ m: Method, than reference: Method = .plain, strong: Bool = false) -> Bool {
            let key: KeyPath<LayerProbe, Double> = strong ? \.updateCosineStrong : \.updateCosine
            let a = perSeed(m, 0, key)
            let p = perSeed(reference, 0, key)
            return a.mean > p.mean && a.differs(from: p)
        }

        /// Whether method `m`'s own-coordinate κ is below plain's.
        func betterConditioned(_ m: Method) -> Bool {
            let a = perSeed(m, 0, \.ownCondition)
            let p = perSeed(.plain, 0, \.ownCondition)
            return a.mean < p.mean && a.differs(from: p)
        }

        var matches: Bool {
            [false, true].allSatisfy { closer(.gwnn, strong: $0) && closer(.eigennet, strong: $0) }
                && betterConditioned(.eigennet)
        }

        /// The cosines at one damping and what they say, in words.
        func cosineSentence(strong: Bool) -> String {
            let key: KeyPath<LayerProbe, Double> = strong ? \.updateCosineStrong : \.updateCosine
            let whitened: [Method] = [.wnn, .gwnn, .eigennet]
            let yes = whitened.filter { closer($0, strong: strong) }.map(\.label)
            let no = whitened.filter { !closer($0, strong: strong) }.map(\.label)
            let overBN = whitened.filter { closer($0, than: .bn, strong: strong) }.map(\.label)
            var s =
                Method.allCases.map { "\($0.label) \(perSeed($0, 0, key).text(digits: 2))" }
                .joined(separator: ", ") + ": "
            if no.isEmpty {
                s += "every whitened layer's step is closer to it than plain SGD's"
            } else if yes.isEmpty {
                s += "no whitened layer's step is closer to it than plain SGD's"
            } else {
                s +=
                    "\(yes.joined(separator: " and ")) \(yes.count == 1 ? "is" : "are") closer than plain SGD, "
                    + "\(no.joined(separator: " and ")) \(no.count == 1 ? "is" : "are") not"
            }
            s +=
                overBN.isEmpty
                ? ", none closer than BN"
                : ", \(overBN.joined(separator: " and ")) closer than BN"
            let largest = Method.allCases.map { perSeed($0, 0, key).mean }.filter(\.isFinite).max()
            if let largest, largest < 0.5 {
                s += String(format: ", and no step is near it (largest mean cosine %.2f)", largest)
            }
            return s
        }

        var headline: String {
            let whitened: [Method] = [.wnn, .gwnn, .eigennet]
            var s =
                "Hidden layer, cosine between SGD's step (mapped back to the layer's map in x) and the exact natural gradient, λ = 10⁻³ × the mean eigenvalue: "
                + cosineSentence(strong: false)
                + String(format: "; λ = %g ×: ", NGDStudy.strongDamping)
                + cosineSentence(strong: true)
            let kPlain = perSeed(.plain, 0, \.ownCondition).text(digits: 0)
            s +=
                ". κ of the hidden layer's Fisher block in its own coordinates: plain \(kPlain), "
                + whitened.map { "\($0.label) \(perSeed($0, 0, \.ownCondition).text(digits: 0))" }
                .joined(separator: ", ")
            let wellConditioned = whitened.filter(betterConditioned).map(\.label)
            s +=
                wellConditioned.isEmpty
                ? " (whitening does not lower it here)."
                : " (lower than plain for \(wellConditioned.joined(separator: ", ")))."
            return s
        }

        /// The first recorded step (and mean seconds) at which the seed-mean loss of `m` is at
        /// most `target`, over the steps every seed reached.
        func reach(_ m: Method, _ target: Double) -> (step: Int, seconds: Double)? {
            let list = runs[m] ?? []
            guard let shortest = list.min(by: { $0.losses.count < $1.losses.count }) else {
                return nil
            }
            for k in shortest.losses.indices {
                let mean = list.map { $0.losses[k] }.reduce(0, +) / Double(list.count)
                if mean <= target {
                    let seconds = list.map { $0.seconds[k] }.reduce(0, +) / Double(list.count)
                    return (shortest.steps[k], seconds)
                }
            }
            return nil
        }

        var notes: [String] {
            var n: [String] = []
            let rate = { (m: Method) in runs[m]?.first?.learningRate ?? .nan }
            let whitened: [Method] = [.wnn, .gwnn, .eigennet]
            n.append(
                "Learning rates chosen by the pilots: "
                    + Method.allCases.map { "\($0.label) \(rate($0))" }.joined(separator: ", ")
                    + (whitened.allSatisfy { rate($0) < min(rate(.plain), rate(.bn)) }
                        ? "; every whitened network needed a smaller rate than plain SGD and BN (larger rates diverged or ended above the initial loss in the pilots, see the pilot table)."
                        : ".")
            )
            let whitenedMethods = [Method.wnn, .gwnn, .eigennet].filter { freshPilots[$0] != nil }
            if !whitenedMethods.isEmpty {
                let text = { (r: Double?) in r.map { "\($0)" } ?? "none" }
                var helped: [String] = []
                var parts: [String] = []
                for m in whitenedMethods {
                    let held = largestStable(pilots[m] ?? [])
                    let fresh = largestStable(freshPilots[m] ?? [])
                    parts.append(
                        "\(m.label) \(text(held)) with T = \(period), \(text(fresh)) with T = 1")
                    if (fresh ?? 0) > (held ?? 0) { helped.append(m.label) }
                }
                var note =
                    "Largest stable rate of the grid in the pilots: "
                    + parts.joined(separator: "; ") + ". "
                note +=
                    helped.isEmpty
                    ? "Re-whitening on every step's own batch (T = 1) does not allow a larger rate: the whitening held between refreshes is not what limits it here."
                    : "Re-whitening on every step's own batch (T = 1) allows a larger rate for \(helped.joined(separator: ", ")): with T = \(period) the whitening is estimated on one batch of 64 images and applied unchanged to the next \(period - 1) batches, and its poorly estimated low-variance directions get large steps (the input-factor κ below measures how far from white it is on the probe images)."
                n.append(note)
            }
            let plainLoss = final(.plain, \.finalLoss)
            let plainTime = final(.plain, \.trainSeconds).text(digits: 2, unit: " s")
            for m in Method.allCases where m != .plain {
                let loss = final(m, \.finalLoss)
                let verdict =
                    !loss.mean.isFinite || !plainLoss.mean.isFinite
                    ? "cannot be compared"
                    : !loss.differs(from: plainLoss)
                        ? "within the seed spread"
                        : loss.mean < plainLoss.mean ? "lower" : "higher"
                n.append(
                    "\(m.label): final loss \(loss.text(digits: 3)) against plain SGD's \(plainLoss.text(digits: 3)) (\(verdict)); "
                        + "training time \(final(m, \.trainSeconds).text(digits: 2, unit: " s")) against \(plainTime) (runs that diverged are left out of both)."
                )
            }
            if plainLoss.mean.isFinite, let plainEnd = reach(.plain, plainLoss.mean) {
                let parts = Method.allCases.filter { $0 != .plain }.map { m -> String in
                    guard let r = reach(m, plainLoss.mean) else { return "\(m.label) never" }
                    return "\(m.label) at step \(r.step) (\(String(format: "%.2f", r.seconds)) s)"
                }
                n.append(
                    "Plain SGD's final loss \(String(format: "%.3f", plainLoss.mean)) (step \(plainEnd.step), \(String(format: "%.2f", plainEnd.seconds)) s of training steps) is first reached by "
                        + parts.joined(separator: ", ")
                        + " (seed means at the probe steps; wall time on a shared machine, so only large differences count)."
                )
            }
            let factor = { (m: Method) in perSeed(m, 0, \.inputFactorCondition).text(digits: 1) }
            n.append(
                "The hidden layer's input-side factor E[[â, 1][â, 1]ᵀ] in its own coordinates has κ "
                    + Method.allCases.map { "\($0.label) \(factor($0))" }.joined(separator: ", ")
                    + " on the probe images (1 would be white). A probe at step s (a multiple of T) sees the whitening estimated at step s − T on that step's batch of 64 images and held for T SGD steps, the oldest it gets; right after a refresh on the same batch the factor is I (NGDStudyTests)."
            )
            n.append(
                "Mapping back: the step's change of the layer's affine map is measured directly, as W_eff and b_eff after a trial SGD step on the layer's own parameters minus before (WNN and EigenNet: S·V·P and b − S·V·P·μ; GWNN: A·Q·W; BN: diag(γ/σ_B)·W with the probe batch's statistics). With T = 1 on the probe batch, WNN's mapped step is exactly the natural gradient of the input-side Kronecker factor alone (NGDStudyTests); the exact Fisher also has the output-gradient side and is not a Kronecker product, which is what the cosine measures."
            )
            n.append(
                "cos(g, F⁻¹g) at the same weights shows how far plain gradient and natural gradient are apart in each network; the step's cosine is the one to compare. For BN the Fisher treats the batch's mean and variance as fixed, and its own-coordinate κ covers W and b of the linear map, not γ and β. A run counts as diverged when its loss stops being finite or exceeds \(Int(NGDStudy.blowUp))× its initial value."
            )
            return n
        }
    }
}

extension NGDStudy.Run {
    var finalLoss: Double { diverged ? .nan : losses.last ?? .nan }
    var trainSeconds: Double { diverged ? .nan : seconds.last ?? .nan }
}
