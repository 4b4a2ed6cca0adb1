import Foundation
import NormKit
import Training

/// Two weight-space studies on the shipped digits.
///
/// 1. Weight Standardization + GroupNorm against BatchNorm (and GroupNorm alone) at batch sizes
///    2, 4, 8 and 32: the WS paper's claim that WS + GN matches or beats BN at micro-batches.
/// 2. Spectral Normalization's effect on the largest singular value σ_max of every layer's
///    weight (conv as [out, in·k·k]) during training, against the same network without it.
///
/// Learning rate 0.1·B/32 as in ``Experiments``. The numbers are whatever the run measures.
///
/// ## References
/// 1. Qiao et al. 2019, arXiv:1903.10520 (WS + GN at micro-batches).
/// 2. Miyato et al. 2018, arXiv:1802.05957.
public enum WeightNormStudy {
    /// Sizes and lengths.
    public struct Plan: Sendable {
        /// Batch sizes of study 1.
        public var batchSizes: [Int]
        /// (activation normalizer, weight method, label) of study 1.
        public var setups: [Setup]
        /// Epochs of each study-1 run.
        public var epochs: Int
        /// Epochs of each study-2 run.
        public var spectralEpochs: Int

        /// The full version (about a minute in release on 2 cores).
        public static let full = Plan(
            batchSizes: [2, 4, 8, 32],
            setups: [
                Setup(label: "ws+gn", normalizer: "gn", weightNorm: "ws"),
                Setup(label: "bn", normalizer: "bn", weightNorm: "none"),
                Setup(label: "gn", normalizer: "gn", weightNorm: "none"),
            ], epochs: 2, spectralEpochs: 3)
        /// The version `normkit demo --quick` runs (a few seconds).
        public static let quick = Plan(
            batchSizes: [4, 32],
            setups: [
                Setup(label: "ws+gn", normalizer: "gn", weightNorm: "ws"),
                Setup(label: "bn", normalizer: "bn", weightNorm: "none"),
            ], epochs: 1, spectralEpochs: 1)
    }

    /// One configuration of study 1.
    public struct Setup: Sendable, Hashable {
        /// The name in tables and charts.
        public var label: String
        /// The activation normalizer.
        public var normalizer: String
        /// The weight method of the convolutions.
        public var weightNorm: String
    }

    /// One run of study 1.
    public struct Run: Sendable {
        /// The setup's label.
        public var label: String
        /// Batch size.
        public var batchSize: Int
        /// Final test error (1 when training diverged).
        public var testError: Double
        /// Training diverged.
        public var diverged: Bool
    }

    /// σ_max of every layer after each epoch, with or without spectral norm.
    public struct Spectrum: Sendable {
        /// `sn` or `none`.
        public var weightNorm: String
        /// Layer names in order.
        public var layers: [String]
        /// σ_max per epoch (outer) and layer (inner); epoch 0 is the initial network.
        public var sigmas: [[Double]]
        /// Final test error.
        public var testError: Double
    }

    /// Everything the studies measured.
    public struct Results: Sendable {
        /// Study 1.
        public var runs: [Run]
        /// Study 2.
        public var spectra: [Spectrum]
        /// Wall-clock seconds.
        public var seconds: Double
        /// The plan.
        public var plan: Plan
    }

    /// The largest singular value of a weight seen as [out, rest], by power iteration on WᵀW
    /// in Double (independent of spectral norm's own u and v).
    public static func largestSingularValue<T: NormScalar>(_ w: Tensor<T>) -> Double {
        let rows = w.shape.first ?? 1
        let cols = w.count / max(rows, 1)
        let m = w.scalars.map { Double($0) }
        var v = [Double](repeating: 1 / Double(cols).squareRoot(), count: cols)
        var sigma = 0.0
        for _ in 0..<300 {
            var mv = [Double](repeating: 0, count: rows)
            for r in 0..<rows { for j in 0..<cols { mv[r] += m[r * cols + j] * v[j] } }
            var mtmv = [Double](repeating: 0, count: cols)
            for r in 0..<rows { for j in 0..<cols { mtmv[j] += m[r * cols + j] * mv[r] } }
            let norm = mtmv.reduce(0) { $0 + $1 * $1 }.squareRoot()
            guard norm > 0 else { return 0 }
            v = mtmv.map { $0 / norm }
            sigma = norm.squareRoot()
        }
        return sigma
    }

    /// The weights W the network multiplies by (after any parametrization), by layer name.
    static func layerWeights(_ model: Sequential<Float>) -> [(String, Tensor<Float>)] {
        model.layers.compactMap { layer in
            if let c = layer as? Conv2d<Float> {
                return (c.parameters.first.map { layerName($0.name) } ?? "conv", c.weight.current)
            }
            if let l = layer as? Linear<Float> {
                return (l.parameters.first.map { layerName($0.name) } ?? "fc", l.weight.current)
            }
            return nil
        }
    }

    static func layerName(_ parameter: String) -> String {
        String(parameter.split(separator: ".").first ?? "")
    }

    /// Runs both studies; `log` receives one line per finished run.
    public static func run(_ plan: Plan, seed: UInt64 = 1, log: (String) -> Void = { _ in }) throws
        -> Results
    {
        let start = Date()
        var runs: [Run] = []
        for setup in plan.setups {
            for batchSize in plan.batchSizes {
                var config = TrainingConfig()
                config.normalizer = setup.normalizer
                config.weightNorm = setup.weightNorm
                config.batchSize = batchSize
                config.epochs = plan.epochs
                config.learningRate = 0.1 * Double(batchSize) / 32
                config.seed = seed
                let trainer = try Trainer(config)
                var diverged = false
                do { try trainer.run() } catch TrainingError.invalidSetting { diverged = true }
                let error = diverged ? 1 : (trainer.history.last?.testError ?? 1)
                runs.append(
                    Run(
                        label: setup.label, batchSize: batchSize, testError: error,
                        diverged: diverged))
                log(
                    "weight-norm study: \(setup.label) at batch \(batchSize): test error "
                        + String(format: "%.3f", error))
            }
        }
        var spectra: [Spectrum] = []
        for weightNorm in ["none", "sn"] {
            var config = TrainingConfig()
            config.normalizer = "none"  // σ_max of the weights alone, without BN rescaling them
            config.weightNorm = weightNorm
            config.batchSize = 32
            config.epochs = plan.spectralEpochs
            config.learningRate = 0.05
            config.seed = seed
            let trainer = try Trainer(config)
            _ = try trainer.evaluate(trainer.test)  // computes W once (inference: u, v fixed)
            var sigmas = [layerWeights(trainer.model).map { largestSingularValue($0.1) }]
            var error = 1.0
            do {
                try trainer.run(progress: { event in
                    if case .epoch = event {
                        sigmas.append(
                            layerWeights(trainer.model).map { largestSingularValue($0.1) })
                    }
                })
                error = trainer.history.last?.testError ?? 1
            } catch TrainingError.invalidSetting {}
            spectra.append(
                Spectrum(
                    weightNorm: weightNorm, layers: layerWeights(trainer.model).map(\.0),
                    sigmas: sigmas, testError: error))
            log(
                "spectral study: \(weightNorm): σ_max per layer "
                    + (sigmas.last ?? []).map { String(format: "%.3f", $0) }.joined(separator: " ")
                    + ", test error " + String(format: "%.3f", error))
        }
        return Results(
            runs: runs, spectra: spectra, seconds: Date().timeIntervalSince(start), plan: plan)
    }

    // MARK: - Report

    /// The tables, as Markdown.
    public static func markdown(_ r: Results) -> String {
        var s = "## Weight Standardization + GroupNorm against BatchNorm (digits)\n\n"
        s += "Test error after \(r.plan.epochs) epoch(s), learning rate 0.1·B/32.\n\n"
        s += "| setup | " + r.plan.batchSizes.map { "B=\($0)" }.joined(separator: " | ") + " |\n"
        s += "|---|" + r.plan.batchSizes.map { _ in "---" }.joined(separator: "|") + "|\n"
        for setup in r.plan.setups {
            let cells = r.plan.batchSizes.map { b -> String in
                guard
                    let run = r.runs.first(where: { $0.label == setup.label && $0.batchSize == b })
                else { return "–" }
                return run.diverged ? "diverged" : String(format: "%.1f%%", 100 * run.testError)
            }
            s += "| \(setup.label) | " + cells.joined(separator: " | ") + " |\n"
        }
        s += "\n## Spectral normalization and the largest singular values\n\n"
        s += "σ_max of each layer's weight as the network uses it, before training and after the "
        s += "last epoch (convnet without an activation normalizer, batch 32, learning rate 0.05). "
        s += "∏σ bounds the Lipschitz constant of the linear parts (ReLU and max-pooling are "
        s += "1-Lipschitz; convolutions are measured as [out, in·k·k] matrices, as spectral norm "
        s += "estimates them).\n\n"
        if let layers = r.spectra.first?.layers {
            s += "| weights | when | " + layers.joined(separator: " | ") + " | ∏σ | test error |\n"
            s += "|---|---|" + layers.map { _ in "---" }.joined(separator: "|") + "|---|---|\n"
            for sp in r.spectra {
                for (when, row) in [("initial", sp.sigmas.first), ("final", sp.sigmas.last)] {
                    guard let row else { continue }
                    s +=
                        "| \(sp.weightNorm) | \(when) | "
                        + row.map { String(format: "%.3f", $0) }.joined(separator: " | ")
                        + " | " + String(format: "%.3f", row.reduce(1, *)) + " | "
                        + (when == "final" ? String(format: "%.1f%%", 100 * sp.testError) : "")
                        + " |\n"
                }
            }
        }
        s += "\n(\(String(format: "%.0f", r.seconds)) s.)\n"
        return s
    }

    /// The two charts: test error by batch size, and σ_max per layer over training.
    public static func charts(_ r: Results) -> [Chart] {
        let errors = r.plan.setups.map { setup in
            Chart.Series(
                name: setup.label,
                points: r.runs.filter { $0.label == setup.label }.map {
                    Chart.Point(
                        x: Double($0.batchSize), y: $0.testError, low: $0.testError,
                        high: $0.testError)
                })
        }
        var sigmas: [Chart.Series] = []
        for sp in r.spectra {
            for (i, layer) in sp.layers.enumerated() {
                sigmas.append(
                    Chart.Series(
                        name: "\(sp.weightNorm) \(layer)",
                        points: sp.sigmas.enumerated().map {
                            Chart.Point(
                                x: Double($0.offset), y: $0.element[i], low: $0.element[i],
                                high: $0.element[i])
                        }, dashed: sp.weightNorm == "sn"))
            }
        }
        return [
            Chart(
                id: "weightnorm-batch", title: "WS + GN against BN: test error by batch size",
                xLabel: "batch size", yLabel: "test error", xScale: .log, series: errors,
                yIncludes: 0),
            Chart(
                id: "weightnorm-sigma",
                title: "Largest singular value of each layer's weight, with (dashed) and without "
                    + "spectral norm",
                xLabel: "epoch", yLabel: "σ_max", series: sigmas, yIncludes: 0),
        ]
    }

    /// The charts and tables as an HTML fragment.
    public static func htmlSection(_ r: Results) -> String {
        var body = "<h2>Weight-space normalizers</h2>\n"
        for c in charts(r) {
            body +=
                "<figure>\n" + c.svg()
                + "<figcaption>\(Chart.escape(c.title))</figcaption></figure>\n"
        }
        return body + "<pre>" + Chart.escape(markdown(r)) + "</pre>\n"
    }

    /// Adds the section to a report page (the demo's, or an empty studies page when nil),
    /// keeping the page's announced chart count right.
    public static func insert(_ r: Results, into page: String?) -> String {
        var page = page ?? StudyReport.html([])
        let added = charts(r).count
        if let match = page.range(
            of: #"<meta name="normkit-charts" content="\d+">"#, options: .regularExpression)
        {
            let text = page[match]
            let digits = text.filter(\.isNumber)
            page.replaceSubrange(
                match,
                with: "<meta name=\"normkit-charts\" content=\"\((Int(digits) ?? 0) + added)\">")
        }
        guard let end = page.range(of: "</body></html>", options: .backwards) else {
            return page + htmlSection(r)
        }
        page.replaceSubrange(end, with: htmlSection(r) + "</body></html>")
        return page
    }

    /// A stand-alone HTML page.
    public static func html(_ r: Results) -> String { insert(r, into: nil) }
}
