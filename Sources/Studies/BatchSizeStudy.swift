import Foundation
import NormKit
import Training

/// Batch-size robustness (Wu & He 2018, arXiv:1803.08494, table 3 and figure 1): test error of
/// the same network under each normalizer at batch sizes 2…32, the learning rate scaled
/// linearly with the batch (0.1·B/32).
public enum BatchSizeStudy {
    /// ResNet-50 ImageNet validation error (%) at batch 32, 16, 8, 4, 2 images per GPU, from
    /// Wu & He 2018, table 3.
    public static let paper: [(normalizer: String, batch: [Int], error: [Double])] = [
        ("bn", [32, 16, 8, 4, 2], [23.6, 23.7, 24.8, 27.3, 34.7]),
        ("gn", [32, 16, 8, 4, 2], [24.1, 24.2, 24.0, 24.2, 24.1]),
    ]

    /// The compared normalizers, by harness preset name.
    ///
    /// `ws+gn` is GroupNorm after convolutions with weight standardization (Qiao et al. 2019).
    public static let normalizers = ["bn", "gn", "ln", "in", "sn", "ssn", "brn", "ws+gn"]

    /// Runs the study.
    public static func run(_ o: StudyOptions, log: (String) -> Void) throws -> StudyResult {
        let batches = o.isQuick ? [2, 8, 32] : [2, 4, 8, 16, 32]
        var errors: [String: [Int: [Double]]] = [:]
        var runs: [[String]] = [
            ["normalizer", "batch_size", "seed", "learning_rate", "test_error", "diverged"]
        ]
        var setup = ""
        for n in normalizers {
            for b in batches {
                for seed in 1...o.seeds {
                    var c = o.config(
                        normalizer: n == "ws+gn" ? "gn" : n, batchSize: b,
                        learningRate: 0.1 * Double(b) / 32, seed: seed)
                    if n == "ws+gn" { c.weightNorm = "ws" }
                    let (t, diverged) = try Studies.train(c)
                    let e = diverged ? Double.nan : (t.history.last?.testError ?? .nan)
                    errors[n, default: [:]][b, default: []].append(e)
                    runs.append([n, "\(b)", "\(seed)", "\(c.learningRate)", "\(e)", "\(diverged)"])
                    setup = o.describe(c, train: t.train.count, test: t.test.count)
                    log("batch-size: \(n) B=\(b) seed \(seed): test error \(Studies.percent(e))")
                }
            }
        }
        func s(_ n: String, _ b: Int) -> Summary { Summary(errors[n]?[b] ?? []) }
        let (small, large) = (batches.min()!, batches.max()!)
        let bnSmall = s("bn", small)
        let bnLarge = s("bn", large)
        let gnSmall = s("gn", small)
        let gnLarge = s("gn", large)
        let bnRise = bnSmall.mean - bnLarge.mean
        let gnRise = gnSmall.mean - gnLarge.mean
        let bnDegrades = bnSmall.differs(from: bnLarge) && bnRise > 0
        let gnSteadier = bnRise - gnRise > 2 * max(bnSmall.std, gnSmall.std, 0.002)
        let matches = bnDegrades && gnSteadier
        var headline =
            "From batch \(large) to \(small), BN's test error \(Wording.change(from: bnLarge, to: bnSmall)) "
            + "and GN's \(Wording.change(from: gnLarge, to: gnSmall))"
        headline +=
            matches
            ? "; as in Wu & He (BN 23.6% → 34.7%, GN 24.1% → 24.1%), BN degrades at small batches and GN does not."
            : "; this does not reproduce Wu & He's finding (BN 23.6% → 34.7%, GN 24.1% → 24.1%) that BN degrades at small batches while GN holds."

        var chart = Chart(
            id: "batch-size-error",
            title: "Test error against batch size (mean ± std over \(o.seeds) seeds)",
            xLabel: "batch size", yLabel: "test error (%)", xScale: .log2,
            series: normalizers.map { n in
                Chart.Series(
                    name: n,
                    points: batches.map { Chart.Point(x: Double($0), s(n, $0), scale: 100) })
            }, yIncludes: 0)
        chart.chooseYScale()
        let relative = Chart(
            id: "batch-size-vs-paper",
            title:
                "Rise of test error over its value at the largest batch: this run (solid) and Wu & He's ResNet-50 on ImageNet (dashed)",
            xLabel: "batch size", yLabel: "error − error at largest batch (points)", xScale: .log2,
            series: ["bn", "gn"].map { n in
                let base = s(n, large).mean
                return Chart.Series(
                    name: "\(n) (this run)",
                    points: batches.map { b in
                        let v = s(n, b)
                        return Chart.Point(
                            x: Double(b), y: 100 * (v.mean - base),
                            low: 100 * (v.mean - v.std - base),
                            high: 100 * (v.mean + v.std - base))
                    })
            }
                + paper.map { p in
                    Chart.Series(
                        name: "\(p.normalizer) (paper)",
                        points: zip(p.batch, p.error).reversed().map {
                            Chart.Point(
                                x: Double($0), y: $1 - p.error[0], low: $1 - p.error[0],
                                high: $1 - p.error[0])
                        }, dashed: true)
                })
        var rows = normalizers.map { n in [n] + batches.map { s(n, $0).text(scale: 100, unit: "%") }
        }
        for p in paper {
            rows.append(
                ["\(p.normalizer) (Wu & He, ImageNet)"]
                    + batches.map { b in
                        p.batch.firstIndex(of: b).map { String(format: "%.1f%%", p.error[$0]) }
                            ?? "—"
                    })
        }
        var notes: [String] = []
        for n in normalizers where n != "bn" && n != "gn" {
            notes.append(
                "\(n): test error \(Wording.change(from: s(n, large), to: s(n, small))) from batch \(large) to \(small)."
            )
        }
        let diverged = runs.dropFirst().filter { $0[5] == "true" }.count
        if diverged > 0 { notes.append("\(diverged) runs diverged and are left out of the means.") }
        notes.append(
            "The paper trains ResNet-50 on ImageNet for 100 epochs; this is a small convnet on a short schedule, so compare the shapes of the curves, not the levels."
        )
        return StudyResult(
            name: .batchSize, title: "1. Batch-size robustness (Wu & He 2018)",
            claim:
                "With ResNet-50 on ImageNet, BN's error rises from 23.6% at 32 images per GPU to 34.7% at 2, while GN stays at 24.1% (Wu & He 2018, arXiv:1803.08494, table 3).",
            headline: headline, matchesPaper: matches,
            setup: setup + "; learning rate 0.1·B/32", command: "", seconds: 0,
            tables: [
                Table(
                    title: "Test error (mean ± std over \(o.seeds) seeds)",
                    columns: ["normalizer"] + batches.map { "B = \($0)" }, rows: rows)
            ],
            charts: [chart, relative], notes: notes, runs: runs)
    }
}
