import Foundation
import NormKit
import Training

/// Loss-landscape smoothness with and without BatchNorm, and trainability.
///
/// Loss-landscape smoothness with and without BatchNorm (Santurkar et al. 2018,
/// arXiv:1805.11604, §3.1 and figure 4), and trainability over a sweep of learning rates.
///
/// At regular steps of training, with the batch's gradient g at the weights W:
/// ```
/// loss variation        = max_η L(W − ηg) − min_η L(W − ηg)
/// gradient predictiveness = max_η ‖∇L(W) − ∇L(W − ηg)‖ − min_η ‖…‖
/// effective β-smoothness = max_η ‖∇L(W) − ∇L(W − ηg)‖ / ‖ηg‖
/// ```
/// for η on a grid around the learning rate, on the same batch, in training mode (batch
/// statistics); weights and running statistics are restored after each probe.
public enum LandscapeStudy {
    /// One probe's three numbers.
    struct Probe {
        var lossRange: Double
        var gradientRange: Double
        var beta: Double
    }

    /// The loss and the flattened gradient at the current weights on one batch; parameter
    /// gradients and running statistics are left as they were.
    static func lossAndGradient(_ t: Trainer, _ x: Tensor<Float>, _ labels: [Int]) throws -> (
        Double, [Double]
    ) {
        let buffers = t.model.buffers
        let params = t.model.parameters
        let saved = params.map(\.gradient)
        for p in params { p.zeroGradient() }
        let logits = try t.model.forward(x, mode: .training)
        let (loss, gradient, _) = try SoftmaxCrossEntropy.evaluate(logits, labels: labels)
        _ = try t.model.backward(gradient)
        let g = params.flatMap { $0.gradient.scalars.map(Double.init) }
        for (p, s) in zip(params, saved) { p.gradient = s }
        try t.model.loadBuffers(buffers)
        return (loss, g)
    }

    static func norm(_ v: [Double]) -> Double { v.reduce(0) { $0 + $1 * $1 }.squareRoot() }

    /// Probes the landscape along −g at the current weights.
    static func probe(_ t: Trainer, _ x: Tensor<Float>, _ labels: [Int], etas: [Double]) throws
        -> Probe
    {
        let params = t.model.parameters
        let values = params.map(\.value)
        let (_, g) = try lossAndGradient(t, x, labels)
        let gNorm = norm(g)
        var losses: [Double] = []
        var distances: [Double] = []
        var beta = 0.0
        for eta in etas {
            var offset = 0
            for (p, v) in zip(params, values) {
                var w = v
                for i in 0..<w.count {
                    w[flat: i] = Float(Double(v[flat: i]) - eta * g[offset + i])
                }
                offset += w.count
                p.value = w
            }
            let (l, gEta) = try lossAndGradient(t, x, labels)
            let d = norm(zip(g, gEta).map { $0 - $1 })
            losses.append(l)
            distances.append(d)
            beta = max(beta, d / max(eta * gNorm, 1e-12))
        }
        for (p, v) in zip(params, values) { p.value = v }
        return Probe(
            lossRange: (losses.max() ?? 0) - (losses.min() ?? 0),
            gradientRange: (distances.max() ?? 0) - (distances.min() ?? 0),
            beta: beta)
    }

    /// Runs the study.
    public static func run(_ o: StudyOptions, log: (String) -> Void) throws -> StudyResult {
        let learningRate = 0.1
        let probes = o.isQuick ? 8 : 20
        let etaFactors = o.isQuick ? [0.25, 0.5, 1, 2, 4] : [0.125, 0.25, 0.5, 1, 2, 4, 8]
        let etas = etaFactors.map { $0 * learningRate }
        let sweep =
            o.isQuick ? [0.01, 0.05, 0.2, 0.8] : [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
        // probe results [normalizer][probe index] over seeds
        var measured: [String: [[Probe]]] = [:]
        var probeSteps: [Int] = []
        var runs: [[String]] = [
            [
                "part", "normalizer", "seed", "step_or_learning_rate", "loss_range",
                "gradient_range", "beta_smoothness", "final_train_loss", "test_error",
            ]
        ]
        var setup = ""
        for n in ["none", "bn"] {
            measured[n] = Array(repeating: [], count: probes)
            for seed in 1...o.seeds {
                var c = o.config(
                    normalizer: n, batchSize: 32, learningRate: learningRate, seed: seed)
                c.schedule = "constant"
                let t = try Trainer(c)
                setup = o.describe(c, train: t.train.count, test: t.test.count)
                let total = t.stepsPerEpoch * c.epochs
                let every = max(1, total / probes)
                var g = SeededGenerator(seed: UInt64(seed) &* 7919)
                var step = 0
                var k = 0
                var diverged = false
                training: for _ in 0..<c.epochs {
                    var order = Array(0..<t.train.count)
                    order.shuffle(using: &g)
                    for b in 0..<t.stepsPerEpoch {
                        let (x, labels) = try t.train.batch(
                            order[(b * c.batchSize)..<((b + 1) * c.batchSize)])
                        if step % every == 0 && k < probes {
                            let p = try probe(t, x, labels, etas: etas)
                            measured[n]![k].append(p)
                            if seed == 1 && n == "none" { probeSteps.append(step) }
                            runs.append(
                                [
                                    "landscape", n, "\(seed)", "\(step)", "\(p.lossRange)",
                                    "\(p.gradientRange)", "\(p.beta)", "", "",
                                ])
                            k += 1
                        }
                        let loss = try t.step(x, labels: labels).loss
                        step += 1
                        if !loss.isFinite {
                            diverged = true
                            break training
                        }
                    }
                }
                log("landscape: \(n) seed \(seed): \(k) probes\(diverged ? ", diverged" : "")")
            }
        }
        // Trainability over learning rates.
        var finals: [String: [Double: [Double]]] = [:]
        var divergedCount: [String: [Double: Int]] = [:]
        for n in ["none", "bn"] {
            for lr in sweep {
                for seed in 1...o.seeds {
                    var c = o.config(normalizer: n, batchSize: 32, learningRate: lr, seed: seed)
                    c.schedule = "constant"
                    let (t, diverged) = try Studies.train(c)
                    let last = diverged ? Double.nan : (t.history.last?.trainLoss ?? .nan)
                    finals[n, default: [:]][lr, default: []].append(last)
                    if diverged { divergedCount[n, default: [:]][lr, default: 0] += 1 }
                    runs.append(
                        [
                            "trainability", n, "\(seed)", "\(lr)", "", "", "", "\(last)",
                            "\(diverged ? Double.nan : t.history.last?.testError ?? .nan)",
                        ])
                    log(
                        "landscape: trainability \(n) lr \(lr) seed \(seed): final train loss \(String(format: "%.3f", last))"
                    )
                }
            }
        }
        func series(_ key: KeyPath<Probe, Double>) -> [Chart.Series] {
            ["none", "bn"].map { n in
                Chart.Series(
                    name: n == "none" ? "plain (no normalization)" : "BN",
                    points: zip(probeSteps, measured[n]!).map { step, ps in
                        Chart.Point(x: Double(step), Summary(ps.map { $0[keyPath: key] }))
                    })
            }
        }
        func overall(_ n: String, _ key: KeyPath<Probe, Double>) -> Summary {
            // Per seed: the mean over probes; then the spread over seeds.
            Summary(
                (0..<o.seeds).map { s in
                    let v = measured[n]!.compactMap { s < $0.count ? $0[s][keyPath: key] : nil }
                    return v.reduce(0, +) / Double(max(v.count, 1))
                })
        }
        var charts = [
            Chart(
                id: "landscape-loss",
                title: "Loss variation along the gradient direction (range over η)",
                xLabel: "training step", yLabel: "loss range", yScale: .log,
                series: series(\.lossRange)),
            Chart(
                id: "landscape-gradient",
                title: "Gradient predictiveness: range of ‖∇L(W) − ∇L(W − ηg)‖ over η",
                xLabel: "training step", yLabel: "gradient distance range", yScale: .log,
                series: series(\.gradientRange)),
            Chart(
                id: "landscape-beta",
                title: "Effective β-smoothness: max over η of ‖∇L(W) − ∇L(W − ηg)‖ / ‖ηg‖",
                xLabel: "training step", yLabel: "β", yScale: .log, series: series(\.beta)),
        ]
        charts.append(
            Chart(
                id: "landscape-trainability",
                title:
                    "Trainability: final training loss against learning rate (diverged runs left out)",
                xLabel: "learning rate", yLabel: "final training loss", xScale: .log, yScale: .log,
                series: ["none", "bn"].map { n in
                    Chart.Series(
                        name: n == "none" ? "plain" : "BN",
                        points: sweep.compactMap { lr in
                            let s = Summary(finals[n]?[lr] ?? [])
                            return s.count > 0 ? Chart.Point(x: lr, s) : nil
                        })
                }))
        let lossNone = overall("none", \.lossRange)
        let lossBN = overall("bn", \.lossRange)
        let betaNone = overall("none", \.beta)
        let betaBN = overall("bn", \.beta)
        let gradNone = overall("none", \.gradientRange)
        let gradBN = overall("bn", \.gradientRange)
        let smoother = lossBN.mean < lossNone.mean && betaBN.mean < betaNone.mean
        let clear = smoother && lossBN.differs(from: lossNone) && betaBN.differs(from: betaNone)
        let ratio = { (a: Summary, b: Summary) in
            String(format: "%.1f×", a.mean / max(b.mean, 1e-12))
        }
        let headline =
            "Averaged over training at learning rate \(learningRate), the loss range along the gradient is "
            + "\(lossNone.text(digits: 3)) without normalization and \(lossBN.text(digits: 3)) with BN (\(ratio(lossNone, lossBN))), "
            + "and the effective β-smoothness \(betaNone.text(digits: 2)) against \(betaBN.text(digits: 2)) (\(ratio(betaNone, betaBN)))"
            + (clear
                ? "; as Santurkar et al. report, BN makes the landscape smoother."
                : smoother
                    ? "; BN is smoother on average but not beyond the seed spread, so this only weakly supports Santurkar et al."
                    : "; this does not reproduce Santurkar et al.'s finding that BN smooths the landscape.")
        let table1 = Table(
            title:
                "Landscape measures, averaged over the probes (mean ± std over \(o.seeds) seeds)",
            columns: ["", "plain", "BN", "plain / BN"],
            rows: [
                [
                    "loss range", lossNone.text(digits: 4), lossBN.text(digits: 4),
                    ratio(lossNone, lossBN),
                ],
                [
                    "gradient predictiveness range", gradNone.text(digits: 4),
                    gradBN.text(digits: 4), ratio(gradNone, gradBN),
                ],
                [
                    "effective β-smoothness", betaNone.text(digits: 3), betaBN.text(digits: 3),
                    ratio(betaNone, betaBN),
                ],
            ])
        let table2 = Table(
            title:
                "Final training loss by learning rate (mean ± std; diverged runs counted separately)",
            columns: ["learning rate", "plain", "BN"],
            rows: sweep.map { lr in
                ["\(lr)"]
                    + ["none", "bn"].map { n in
                        let d = divergedCount[n]?[lr] ?? 0
                        let s = Summary(finals[n]?[lr] ?? [])
                        return (s.count > 0 ? s.text(digits: 3) : "—")
                            + (d > 0 ? " (\(d) diverged)" : "")
                    }
            })
        var notes = [
            "η grid: \(etas.map { "\($0)" }.joined(separator: ", ")) (the learning rate times \(etaFactors.map { "\($0)" }.joined(separator: ", "))); \(probes) probes per run, every \(max(1, probeSteps.count > 1 ? probeSteps[1] - probeSteps[0] : 1)) steps.",
            "Gradient predictiveness range: plain \(gradNone.text(digits: 4)), BN \(gradBN.text(digits: 4)).",
        ]
        let highest = sweep.max()!
        let plainDiverged = divergedCount["none"]?[highest] ?? 0
        let bnDiverged = divergedCount["bn"]?[highest] ?? 0
        notes.append(
            "At the highest learning rate \(highest): \(plainDiverged) of \(o.seeds) plain runs and \(bnDiverged) of \(o.seeds) BN runs diverged."
        )
        return StudyResult(
            name: .landscape, title: "3. Landscape smoothness (Santurkar et al. 2018)",
            claim:
                "BN makes the loss landscape smoother: along the gradient direction the loss varies less, the gradient changes less (better predictiveness) and the effective β-smoothness is lower; networks with BN train at learning rates where plain ones fail (Santurkar et al. 2018, arXiv:1805.11604, §3.1).",
            headline: headline, matchesPaper: clear,
            setup: setup.replacingOccurrences(of: "cosine schedule", with: "constant learning rate")
                + "; batch 32",
            command: "", seconds: 0, tables: [table1, table2], charts: charts, notes: notes,
            runs: runs)
    }
}
