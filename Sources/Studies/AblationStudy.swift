import Foundation
import NormKit
import Training

/// Channel ablation in trained networks.
///
/// Channel ablation (Morcos et al. 2018, arXiv:1803.06959, §3.4 and figure 6): in trained
/// networks, zero a growing random fraction of the channels of every normalized layer and
/// measure test accuracy, over several random draws.
///
/// A channel is zeroed at the normalizer's output: γ_c = β_c = 0 for a normalized layer (so
/// y_c = 0 and ReLU passes 0), and the preceding convolution's filter and bias of channel c for
/// the network without normalization: the same units in both cases.
public enum AblationStudy {
    /// The parameters whose channel c must be zeroed to silence channel c of layer `layer`.
    static func targets(_ model: Sequential<Float>, normalized: Bool) -> [[Parameter<Float>]] {
        let byName = Dictionary(uniqueKeysWithValues: model.parameters.map { ($0.name, $0) })
        return (1...3).map { i in
            let names =
                normalized
                ? ["norm\(i).weight", "norm\(i).bias"] : ["conv\(i).weight", "conv\(i).bias"]
            return names.compactMap { byName[$0] }
        }
    }

    /// Zeroes channel `c` (the first axis of every tensor in `params`).
    static func zero(_ params: [Parameter<Float>], channel c: Int) {
        for p in params {
            let per = p.value.count / p.value.shape[0]
            for i in (c * per)..<((c + 1) * per) { p.value[flat: i] = 0 }
        }
    }

    /// Runs the study.
    public static func run(_ o: StudyOptions, log: (String) -> Void) throws -> StudyResult {
        let normalizers = ["bn", "gn", "ln", "none"]
        let fractions =
            o.isQuick
            ? [0, 0.1, 0.25, 0.5, 0.75] : [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
        let draws = o.isQuick ? 3 : 5
        // accuracy[normalizer][fraction] over seeds × draws
        var accuracy: [String: [Double: [Double]]] = [:]
        var runs: [[String]] = [["normalizer", "seed", "draw", "fraction", "test_accuracy"]]
        var setup = ""
        for n in normalizers {
            for seed in 1...o.seeds {
                let c = o.config(normalizer: n, batchSize: 32, learningRate: 0.05, seed: seed)
                let (t, diverged) = try Studies.train(c)
                setup = o.describe(c, train: t.train.count, test: t.test.count)
                guard !diverged else {
                    log("ablation: \(n) seed \(seed) diverged")
                    continue
                }
                let groups = targets(t.model, normalized: n != "none")
                for draw in 0..<draws {
                    var g = SeededGenerator(seed: UInt64(seed * 1000 + draw))
                    // One random order of each layer's channels per draw; a fraction f zeroes its
                    // first ⌈f·C⌉ channels, so larger fractions contain smaller ones.
                    let orders = groups.map { ps -> [Int] in
                        var o = Array(0..<(ps.first?.value.shape[0] ?? 0))
                        o.shuffle(using: &g)
                        return o
                    }
                    for f in fractions {
                        let saved = groups.map { $0.map(\.value) }
                        for (ps, order) in zip(groups, orders) {
                            let k = Int((f * Double(order.count)).rounded(.up))
                            for ch in order.prefix(k) { zero(ps, channel: ch) }
                        }
                        let acc = 1 - (try t.evaluate(t.test).error)
                        for (ps, values) in zip(groups, saved) {
                            for (p, v) in zip(ps, values) { p.value = v }
                        }
                        accuracy[n, default: [:]][f, default: []].append(acc)
                        runs.append([n, "\(seed)", "\(draw)", "\(f)", "\(acc)"])
                    }
                }
                let intact = Summary(accuracy[n]?[0] ?? []).mean
                log("ablation: \(n) seed \(seed): test accuracy \(Studies.percent(intact)) intact")
            }
        }
        func s(_ n: String, _ f: Double) -> Summary { Summary(accuracy[n]?[f] ?? []) }
        // The accuracy kept at half the channels, relative to the intact network, per seed×draw.
        let half = fractions.min { abs($0 - 0.5) < abs($1 - 0.5) }!
        func drop(_ n: String) -> Summary {
            let a = accuracy[n]?[0] ?? []
            let b = accuracy[n]?[half] ?? []
            return Summary(zip(a, b).map { $0 - $1 })
        }
        let bnDrop = drop("bn")
        let noneDrop = drop("none")
        let matches = bnDrop.mean < noneDrop.mean && bnDrop.differs(from: noneDrop)
        let headline =
            "Zeroing \(Int(half * 100))% of the channels of every layer costs the BN network "
            + "\(bnDrop.text(scale: 100, unit: " points")) of test accuracy and the unnormalized one "
            + "\(noneDrop.text(scale: 100, unit: " points"))"
            + (matches
                ? "; as Morcos et al. report, BN networks rely less on single directions and degrade more gracefully."
                : "; this does not reproduce Morcos et al.'s finding that BN networks are more robust to ablation.")
        let chart = Chart(
            id: "ablation-accuracy",
            title:
                "Test accuracy as a random fraction of every layer's channels is zeroed (mean ± std over \(o.seeds) seeds × \(draws) draws)",
            xLabel: "fraction of channels zeroed", yLabel: "test accuracy (%)",
            series: normalizers.map { n in
                Chart.Series(
                    name: n, points: fractions.map { Chart.Point(x: $0, s(n, $0), scale: 100) })
            }, yIncludes: 0)
        let table = Table(
            title: "Test accuracy (%) by fraction of channels zeroed",
            columns: ["normalizer"] + fractions.map { String(format: "%.0f%%", $0 * 100) },
            rows: normalizers.map { n in [n] + fractions.map { s(n, $0).text(scale: 100) } })
        var notes = normalizers.filter { $0 != "bn" && $0 != "none" }.map {
            "\($0): \(drop($0).text(scale: 100, unit: " points")) lost at \(Int(half * 100))% ablation."
        }
        notes.append(
            "Morcos et al. ablate single directions in MLPs and convnets on MNIST, CIFAR-10 and ImageNet; here the channels are those of the three normalized convolutions of the harness convnet."
        )
        return StudyResult(
            name: .ablation, title: "4. Channel ablation (Morcos et al. 2018)",
            claim:
                "Networks that generalize rely less on single directions, and batch normalization discourages that reliance: BN networks lose less accuracy as units are ablated (Morcos et al. 2018, arXiv:1803.06959, §3.4).",
            headline: headline, matchesPaper: matches,
            setup: setup + "; batch 32, learning rate 0.05",
            command: "", seconds: 0, tables: [table], charts: [chart], notes: notes, runs: runs)
    }
}
