import Foundation
import NormKit
import Training

/// BN as population normalization plus γ decay (Luo et al., ICLR 2019, arXiv:1809.00846): the
/// same network trained with BN, with population normalization (PN, running statistics in
/// training) and with PN plus the explicit penalty ζ·Σγ², ζ = 1/(2M) for batch size M (the simple
/// form of the paper's figure), at two batch sizes; compared by train/test gap and |γ|.
public enum RegularizationStudy {
    /// The three variants.
    static let variants = ["bn", "pn", "pn+gamma-decay"]
    /// The variant with ζ(h) estimated per channel during training (`--estimated-zeta`).
    static let estimated = "pn+zeta(h)"

    struct Outcome {
        var trainError: Double
        var testError: Double
        var trainLoss: Double
        var testLoss: Double
        var gamma: Double
        /// The ζ applied at the end of training, averaged over channels (0 without a penalty).
        var zeta: Double
    }

    static func trainOne(
        _ variant: String, batchSize: Int, seed: Int, epochs: Int,
        data: (Dataset<Float>, Dataset<Float>),
        width: Int
    ) throws -> Outcome? {
        let (train, test) = data
        var layers: [PopulationNorm] = []
        let model = try StudyNetwork.convnet(
            inputShape: train.imageShape, classes: train.classCount, width: width,
            seed: UInt64(seed)
        ) { channels, name in
            variant == "bn"
                ? try NormSlot<Float>(.bn, channels: channels, name: name).erased
                : try {
                    let layer = try PopulationNorm(channels: channels, name: name)
                    if variant == estimated { layer.zetaBatchSize = batchSize }
                    layers.append(layer)
                    return layer.erased
                }()
        }
        let steps = train.count / batchSize
        let optimizer = SGD<Float>(
            learningRate: 0.1 * Double(batchSize) / 32, momentum: 0.9, weightDecay: 5e-4,
            groups: ["norm": SGD.Group(weightDecay: 0)],
            schedule: .cosine(totalSteps: steps * epochs))
        let zeta = variant == "pn+gamma-decay" ? 1 / (2 * Double(batchSize)) : 0
        let gammas = model.parameters.filter { $0.group == "norm" && $0.name.hasSuffix(".weight") }
        var g = SeededGenerator(seed: UInt64(seed) &* 104_729)
        for _ in 0..<epochs {
            var order = Array(0..<train.count)
            order.shuffle(using: &g)
            for b in 0..<steps {
                let (x, labels) = try train.batch(order[(b * batchSize)..<((b + 1) * batchSize)])
                let (loss, gradient, _) = try SoftmaxCrossEntropy.evaluate(
                    try model.forward(x, mode: .training), labels: labels)
                guard loss.isFinite else { return nil }
                _ = try model.backward(gradient)
                if zeta > 0 {
                    // d(ζ·Σγ²)/dγ = 2ζγ
                    for p in gammas {
                        p.gradient = try p.gradient + p.value.map { Float(2 * zeta) * $0 }
                    }
                }
                for layer in layers {
                    // The estimated ζ(h), one per channel, held constant within the step.
                    guard let z = layer.zeta else { continue }
                    let p = layer.weight
                    p.gradient =
                        try p.gradient
                        + Tensor(
                            zip(p.value.scalars, z).map { Float(2 * $1) * $0 })
                }
                try optimizer.update(model.parameters)
            }
        }
        let tr = try StudyNetwork.evaluate(model, train)
        let te = try StudyNetwork.evaluate(model, test)
        let all = gammas.flatMap { $0.value.scalars.map { abs(Double($0)) } }
        let zetas = variant == estimated ? layers.flatMap { $0.zeta ?? [] } : []
        return Outcome(
            trainError: tr.error, testError: te.error, trainLoss: tr.loss, testLoss: te.loss,
            gamma: all.reduce(0, +) / Double(max(all.count, 1)),
            zeta: zetas.isEmpty ? zeta : zetas.reduce(0, +) / Double(zetas.count))
    }

    /// Runs the study.
    public static func run(_ o: StudyOptions, log: (String) -> Void) throws -> StudyResult {
        let batches = o.isQuick ? [8, 32] : [8, 64]
        // A smaller training set trained for longer than the other studies: the train/test gap
        // is the measurement, so the networks must fit their training set.
        var quickOptions = o
        if o.dataset == "fashion-mnist" && o.trainCount == nil {
            quickOptions.trainCount = 2000
        }
        let epochs = o.epochs ?? (o.isQuick ? 4 : 8)
        let variants = Self.variants + (o.estimatedZeta ? [estimated] : [])
        var results: [String: [Int: [Outcome]]] = [:]
        var diverged = 0
        var runs: [[String]] = [
            [
                "variant", "batch_size", "seed", "zeta", "train_error", "test_error", "gap",
                "train_loss", "test_loss", "mean_abs_gamma",
            ]
        ]
        let c = quickOptions.config(normalizer: "bn", batchSize: 32, learningRate: 0.1, seed: 1)
        let data = try Datasets.split(for: c)
        var setup = quickOptions.describe(c, train: data.train.count, test: data.test.count)
        setup = setup.replacingOccurrences(
            of: "\(c.epochs) epoch\(c.epochs == 1 ? "" : "s")", with: "\(epochs) epochs")
        for b in batches {
            for v in variants {
                for seed in 1...o.seeds {
                    guard
                        let r = try trainOne(
                            v, batchSize: b, seed: seed, epochs: epochs, data: data, width: c.width)
                    else {
                        diverged += 1
                        log("regularization: \(v) B=\(b) seed \(seed) diverged")
                        continue
                    }
                    results[v, default: [:]][b, default: []].append(r)
                    runs.append(
                        [
                            v, "\(b)", "\(seed)", "\(r.zeta)", "\(r.trainError)", "\(r.testError)",
                            "\(r.testError - r.trainError)", "\(r.trainLoss)", "\(r.testLoss)",
                            "\(r.gamma)",
                        ])
                    log(
                        "regularization: \(v) B=\(b) seed \(seed): train error \(Studies.percent(r.trainError)), test error \(Studies.percent(r.testError)), mean |γ| \(String(format: "%.3f", r.gamma))"
                    )
                }
            }
        }
        func s(_ v: String, _ b: Int, _ f: (Outcome) -> Double) -> Summary {
            Summary((results[v]?[b] ?? []).map(f))
        }
        let gap = { (r: Outcome) in r.testError - r.trainError }
        var holds = true
        var parts: [String] = []
        for b in batches {
            let bn = s("bn", b, gap)
            let pn = s("pn", b, gap)
            let pg = s("pn+gamma-decay", b, gap)
            let closer = abs(pg.mean - bn.mean) < abs(pn.mean - bn.mean)
            holds = holds && closer && pn.count > 0 && pg.count > 0
            parts.append(
                "at batch \(b) the train/test error gap is \(bn.text(scale: 100, unit: " points")) with BN, "
                    + "\(pn.text(scale: 100, unit: " points")) with PN and \(pg.text(scale: 100, unit: " points")) with PN + γ decay"
            )
        }
        let headline =
            parts.joined(separator: "; ").prefix(1).uppercased()
            + parts.joined(separator: "; ").dropFirst()
            + (holds
                ? ": adding γ decay moves PN towards BN at both batch sizes, as Luo et al.'s BN ≈ PN + γ decay predicts."
                : ": γ decay does not bring PN closer to BN at every batch size, so BN ≈ PN + γ decay does not hold here.")
        let columns =
            ["variant"]
            + batches.flatMap {
                ["B=\($0) train error", "B=\($0) test error", "B=\($0) gap", "B=\($0) mean |γ|"]
            }
        let rows = variants.map { v in
            [v]
                + batches.flatMap { b in
                    [
                        s(v, b, \.trainError).text(scale: 100, unit: "%"),
                        s(v, b, \.testError).text(scale: 100, unit: "%"),
                        s(v, b, gap).text(scale: 100),
                        s(v, b, \.gamma).text(digits: 3),
                    ]
                }
        }
        let charts = [
            Chart(
                id: "regularization-gap",
                title: "Train/test error gap (test − train, points) against batch size",
                xLabel: "batch size", yLabel: "gap (points)", xScale: .log2,
                series: variants.map { v in
                    Chart.Series(
                        name: v,
                        points: batches.map {
                            Chart.Point(x: Double($0), s(v, $0, gap), scale: 100)
                        })
                }),
            Chart(
                id: "regularization-gamma",
                title: "Mean |γ| over all normalized channels at the end of training",
                xLabel: "batch size", yLabel: "mean |γ|", xScale: .log2,
                series: variants.map { v in
                    Chart.Series(
                        name: v,
                        points: batches.map { Chart.Point(x: Double($0), s(v, $0, \.gamma)) })
                }, yIncludes: 0),
        ]
        var notes = batches.map { b in
            "Batch \(b): ζ = 1/(2·\(b)) = \(String(format: "%.4f", 1 / (2 * Double(b)))); mean |γ| BN \(s("bn", b, \.gamma).text(digits: 3)), PN \(s("pn", b, \.gamma).text(digits: 3)), PN + γ decay \(s("pn+gamma-decay", b, \.gamma).text(digits: 3))."
        }
        notes.append(
            "γ and β have no weight decay in any variant, so the only penalty on γ is the explicit one; other weights have weight decay 5e-4."
        )
        if o.estimatedZeta {
            for b in batches {
                let z = s(estimated, b, \.zeta)
                let gapZ = s(estimated, b, gap)
                notes.append(
                    "Batch \(b), PN + ζ(h): ζ(h) estimated per channel during training (normalizers-spec section 9, loss'' by the squared per-sample gradient, a running average over steps) ends at \(z.text(digits: 4)) on average against 1/(2M) = \(String(format: "%.4f", 1 / (2 * Double(b)))); train/test gap \(gapZ.text(scale: 100, unit: " points")), mean |γ| \(s(estimated, b, \.gamma).text(digits: 3))."
                )
            }
        } else {
            notes.append(
                "Only the simple ζ = 1/(2M) was run; `--estimated-zeta` adds PN + ζ(h) with ζ estimated per channel (normalizers-spec section 9)."
            )
        }
        if diverged > 0 { notes.append("\(diverged) runs diverged and are left out.") }
        return StudyResult(
            name: .regularization,
            title: "5. BN as population normalization plus γ decay (Luo et al. 2019)",
            claim:
                "BN behaves like population normalization plus an explicit γ decay whose strength grows as the batch shrinks (ζ ∝ 1/M); PN alone generalizes worse, and PN + γ decay recovers BN's generalization (Luo et al., ICLR 2019, arXiv:1809.00846).",
            headline: String(headline), matchesPaper: holds,
            setup: setup + "; learning rate 0.1·B/32, no weight decay on γ and β", command: "",
            seconds: 0,
            tables: [
                Table(
                    title: "BN, PN and PN + γ decay (mean ± std over \(o.seeds) seeds)",
                    columns: columns, rows: rows)
            ],
            charts: charts, notes: notes, runs: runs)
    }
}
