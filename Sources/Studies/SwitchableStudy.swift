import Foundation
import NormKit
import Training

/// What Switchable and Sparse Switchable Normalization learn.
///
/// What Switchable Normalization learns (Luo et al. 2019, arXiv:1806.10779; Sparse SN, Shao et
/// al. 2019, arXiv:1903.03793): the per-layer importance of IN, LN and BN for the mean and the
/// variance at each batch size, and Sparse SN's one-hot choices and when they freeze.
public enum SwitchableStudy {
    /// Runs the study.
    public static func run(_ o: StudyOptions, log: (String) -> Void) throws -> StudyResult {
        let batches = o.isQuick ? [2, 8, 32] : [2, 4, 8, 16, 32]
        // weights[normalizer][batch][slot] = [(mean weights, variance weights)] over seeds
        var weights: [String: [Int: [String: [([Double], [Double])]]]] = [:]
        var freezeSteps: [Int: [String: [Int?]]] = [:]
        var choices: [Int: [String: [String]]] = [:]
        var totalSteps: [Int: Int] = [:]
        var components: [String] = []
        var slotNames: [String] = []
        var runs: [[String]] = [
            ["normalizer", "batch_size", "seed", "slot", "statistic"] + ["IN", "LN", "BN"]
                + ["frozen_at_step", "test_error"]
        ]
        var setup = ""
        for n in ["sn", "ssn"] {
            for b in batches {
                for seed in 1...o.seeds {
                    let c = o.config(
                        normalizer: n, batchSize: b, learningRate: 0.1 * Double(b) / 32, seed: seed)
                    let trainer = try Trainer(c)
                    setup = o.describe(c, train: trainer.train.count, test: trainer.test.count)
                    var frozenAt: [String: Int] = [:]
                    var step = 0
                    do {
                        try trainer.run(progress: { event in
                            guard case .step = event else { return }
                            step += 1
                            for slot in trainer.slots where frozenAt[slot.name] == nil {
                                if slot.parameters.contains(where: \.isFrozen) {
                                    frozenAt[slot.name] = step
                                }
                            }
                        })
                    } catch TrainingError.invalidSetting(let name, _, _)
                        where name == "learning rate"
                    {
                        log("switchable: \(n) B=\(b) seed \(seed) diverged")
                    }
                    totalSteps[b] = trainer.stepsPerEpoch * c.epochs
                    let error = trainer.history.last?.testError ?? .nan
                    for slot in trainer.slots {
                        guard let w = slot.importanceWeights else { continue }
                        components = w.components
                        if !slotNames.contains(slot.name) { slotNames.append(slot.name) }
                        weights[n, default: [:]][b, default: [:]][slot.name, default: []].append(
                            (w.mean, w.variance))
                        let frozen = frozenAt[slot.name]
                        if n == "ssn" {
                            freezeSteps[b, default: [:]][slot.name, default: []].append(frozen)
                            let pick = { (v: [Double]) in
                                w.components[v.indices.max { v[$0] < v[$1] } ?? 0]
                            }
                            choices[b, default: [:]][slot.name, default: []].append(
                                "μ \(pick(w.mean)) / σ² \(pick(w.variance))")
                        }
                        for (stat, v) in [("mean", w.mean), ("variance", w.variance)] {
                            runs.append(
                                [n, "\(b)", "\(seed)", slot.name, stat] + v.map { "\($0)" }
                                    + [frozen.map(String.init) ?? "", "\(error)"])
                        }
                    }
                    log(
                        "switchable: \(n) B=\(b) seed \(seed): test error \(Studies.percent(error))"
                    )
                }
            }
        }
        let bnIndex = components.firstIndex(of: "BN") ?? 2
        // BN's share averaged over a run's slots, one value per seed.
        func bnShare(_ n: String, _ b: Int, variance: Bool) -> Summary {
            let perSlot = weights[n]?[b] ?? [:]
            let seeds = perSlot.values.map(\.count).min() ?? 0
            return Summary(
                (0..<seeds).map { k in
                    let v = slotNames.compactMap { perSlot[$0]?[k] }.map {
                        (variance ? $0.1 : $0.0)[bnIndex]
                    }
                    return v.reduce(0, +) / Double(max(v.count, 1))
                })
        }
        func slotSummary(_ n: String, _ b: Int, _ slot: String, _ k: Int, variance: Bool) -> Summary
        {
            Summary((weights[n]?[b]?[slot] ?? []).map { (variance ? $0.1 : $0.0)[k] })
        }
        let (small, large) = (batches.min()!, batches.max()!)
        let meanSmall = bnShare("sn", small, variance: false)
        let meanLarge = bnShare("sn", large, variance: false)
        let varSmall = bnShare("sn", small, variance: true)
        let varLarge = bnShare("sn", large, variance: true)
        let matches =
            meanLarge.mean > meanSmall.mean && meanLarge.differs(from: meanSmall)
        let headline =
            "SN's BN weight for the mean, averaged over its \(slotNames.count) layers, is "
            + "\(meanLarge.text(scale: 1, digits: 2)) at batch \(large) and \(meanSmall.text(scale: 1, digits: 2)) at batch \(small) "
            + "(for the variance \(varLarge.text(scale: 1, digits: 2)) and \(varSmall.text(scale: 1, digits: 2)))"
            + (matches
                ? "; as Luo et al. report, SN moves away from BN when the batch is small."
                : "; this does not reproduce Luo et al.'s finding that SN moves away from BN at small batches.")
        var charts: [Chart] = []
        for (variance, label) in [(false, "mean"), (true, "variance")] {
            charts.append(
                Chart(
                    id: "switchable-\(label)",
                    title:
                        "SN's importance weights for the \(label), per layer, against batch size (mean ± std over \(o.seeds) seeds)",
                    xLabel: "batch size", yLabel: "weight (\(label))", xScale: .log2,
                    series: slotNames.flatMap { slot in
                        components.indices.map { k in
                            Chart.Series(
                                name: "\(slot) \(components[k])",
                                points: batches.map {
                                    Chart.Point(
                                        x: Double($0),
                                        slotSummary("sn", $0, slot, k, variance: variance))
                                }, dashed: components[k] != "BN")
                        }
                    }, yIncludes: 0))
        }
        var tables: [Table] = []
        for (variance, label) in [(false, "mean"), (true, "variance")] {
            tables.append(
                Table(
                    title:
                        "SN importance weights for the \(label) (IN / LN / BN, mean over \(o.seeds) seeds)",
                    columns: ["layer"] + batches.map { "B = \($0)" },
                    rows: slotNames.map { slot in
                        [slot]
                            + batches.map { b in
                                components.indices.map {
                                    String(
                                        format: "%.2f",
                                        slotSummary("sn", b, slot, $0, variance: variance).mean)
                                }.joined(separator: " / ")
                            }
                    }))
        }
        tables.append(
            Table(
                title:
                    "Sparse SN: the one-hot choice of each layer (per seed) and the step at which it froze",
                columns: ["layer"] + batches.map { "B = \($0) (of \(totalSteps[$0] ?? 0) steps)" },
                rows: slotNames.map { slot in
                    [slot]
                        + batches.map { b in
                            let picks = choices[b]?[slot] ?? []
                            let steps = freezeSteps[b]?[slot] ?? []
                            return zip(picks, steps).map {
                                "\($0) @ \($1.map(String.init) ?? "not frozen")"
                            }
                            .joined(separator: "; ")
                        }
                }))
        var notes: [String] = []
        let frozen = freezeSteps.values.flatMap { $0.values.flatMap { $0 } }
        notes.append(
            "Sparse SN froze \(frozen.compactMap { $0 }.count) of \(frozen.count) layer choices before training ended; "
                + "its radius schedule runs over the whole training, so a short run may end before every layer is one-hot."
        )
        for b in batches {
            notes.append(
                "Batch \(b): SN's BN weight for the mean \(bnShare("sn", b, variance: false).text(scale: 1, digits: 2)), "
                    + "for the variance \(bnShare("sn", b, variance: true).text(scale: 1, digits: 2)) (averaged over layers)."
            )
        }
        return StudyResult(
            name: .switchable, title: "2. What Switchable Normalization learns (Luo et al. 2019)",
            claim:
                "SN learns a different mix of IN, LN and BN per layer, and at small batch sizes it moves its weight away from BN towards IN and LN (Luo et al. 2019, arXiv:1806.10779); Sparse SN picks one normalizer per layer (Shao et al. 2019, arXiv:1903.03793).",
            headline: headline, matchesPaper: matches,
            setup: setup + "; learning rate 0.1·B/32", command: "", seconds: 0,
            tables: tables, charts: charts, notes: notes, runs: runs)
    }
}
