import Foundation
import NormKit
import NormTestSupport
import Testing

@testable import Studies
@testable import Training

/// Linear and Conv2d with a weight parametrization: PyTorch's numbers through the layers,
/// finite differences into x and every raw parameter, checkpoints in the parametrized form.
@Suite("Harness layers: weight parametrizations")
struct WeightNormLayerTests {
    /// float64 against float64 PyTorch (GEMM summation order only; worst measured 4.7e-13).
    static let doubleTolerance = 1e-10
    /// Float against float64 PyTorch (float GEMMs over fan-ins of at most 27; worst measured
    /// 2.2e-7).
    static let floatTolerance = 1e-5

    /// The fixture's layer, built and loaded from its `in/` state.
    static func makeLayer<T: NormScalar>(_ f: WeightFixture, as _: T.Type) throws -> (
        any Module, WeightSource<T>, Parameter<T>
    ) {
        var g = SeededGenerator(seed: 1)
        let initial: [String: Tensor<T>] = f.state("in/")
        let w: Tensor<T> = f.originalWeight()
        let module: any Module
        let source: WeightSource<T>
        let bias: Parameter<T>
        if f.layer == "linear" {
            let l = try Linear<T>(
                w.shape[1], w.shape[0], name: "m", weightNorm: f.libraryMethod,
                weightNormOptions: f.options, generator: &g)
            (module, source, bias) = (l, l.weight, l.bias)
        } else {
            let c = try Conv2d<T>(
                w.shape[1], w.shape[0], kernel: w.shape[2], stride: f.stride, padding: f.padding,
                name: "m", weightNorm: f.libraryMethod, weightNormOptions: f.options, generator: &g)
            (module, source, bias) = (c, c.weight, c.bias!)
        }
        var weightState = initial
        bias.value = try #require(initial["bias"])
        weightState["bias"] = nil
        try source.load(NormState(tensors: weightState))
        return (module, source, bias)
    }

    func replay<T: NormScalar>(_ name: String, as _: T.Type, tolerance: Double) throws {
        let f = try WeightFixture(name)
        let (module, source, bias) = try Self.makeLayer(f, as: T.self)
        func forward(_ x: Tensor<T>, _ mode: Mode) throws -> Tensor<T> {
            if let l = module as? Linear<T> { return try l.forward(x, mode: mode) }
            return try (module as! Conv2d<T>).forward(x, mode: mode)
        }
        func backward(_ dy: Tensor<T>) throws -> Tensor<T> {
            if let l = module as? Linear<T> { return try l.backward(dy) }
            return try (module as! Conv2d<T>).backward(dy)
        }
        for k in 0..<f.steps { _ = try forward(f.raw.tensor("x.\(k)"), .training) }
        let y = try forward(f.raw.tensor("x"), f.isEval ? .inference : .training)
        let dx = try backward(f.raw.tensor("dy"))
        var checks: [(String, Tensor<T>, Tensor<Double>)] = [
            ("y", y, f.raw.tensor("y")), ("dx", dx, f.raw.tensor("dx")),
            ("dbias", bias.gradient, f.raw.tensor("grad/bias")),
        ]
        let raw = Dictionary(uniqueKeysWithValues: source.raw.map { ($0.key, $0.parameter) })
        let legacy = source.parametrization?.legacyKeys ?? [:]
        let expectedGrads: [String: Tensor<Double>] = f.state("grad/")
        for (key, expected) in expectedGrads where key != "bias" {
            let p = try #require(raw[legacy[key] ?? key] ?? source.plain, "\(key)")
            checks.append(("d" + key, p.gradient, expected))
        }
        let after = source.state().tensors
        let expectedAfter: [String: Tensor<Double>] = f.state("out/")
        for (key, expected) in expectedAfter where key != "bias" {
            checks.append(("out " + key, try #require(after[legacy[key] ?? key]), expected))
        }
        for (label, got, expected) in checks {
            #expect(got.shape == expected.shape, "\(name) \(label) shape")
            let c = Comparison(got.scalars, expected.scalars)
            #expect(c.relative < tolerance, "\(name) \(label): \(c)")
        }
    }

    @Test(arguments: WeightFixture.names)
    func layerMatchesPyTorchInDouble(_ name: String) throws {
        try replay(name, as: Double.self, tolerance: Self.doubleTolerance)
    }

    @Test(arguments: WeightFixture.names)
    func layerMatchesPyTorchInFloat(_ name: String) throws {
        try replay(name, as: Float.self, tolerance: Self.floatTolerance)
    }

    /// dx and the raw parameters' gradients by central differences (SN in inference mode, where
    /// u and v stay fixed between the probes; its training gradient treats them as constants).
    @Test(arguments: WeightNormMethod.allCases)
    func gradientsMatchFiniteDifferences(_ method: WeightNormMethod) throws {
        var g = SeededGenerator(seed: 21)
        let mode: Mode = method == .sn ? .inference : .training
        var options = WeightNormMethod.Options()
        options.learnableScale = true
        let linear = try Linear<Double>(
            5, 3, name: "fc", weightNorm: method, weightNormOptions: options, generator: &g)
        try LayerGradientTests.check(
            linear, try LayerGradientTests.input([4, 5]), label: "Linear \(method)", mode: mode)
        let conv = try Conv2d<Double>(
            2, 3, kernel: 3, stride: 2, padding: 1, name: "conv", weightNorm: method,
            weightNormOptions: options, generator: &g)
        try LayerGradientTests.check(
            conv, try LayerGradientTests.input([2, 2, 5, 6]), label: "Conv2d \(method)",
            mode: mode)
    }

    @Test func parametrizedNamesAndUnchangedInitialWeight() throws {
        var a = SeededGenerator(seed: 3)
        var b = SeededGenerator(seed: 3)
        let plain = try Conv2d<Double>(2, 4, kernel: 3, name: "conv1", generator: &a)
        let wn = try Conv2d<Double>(2, 4, kernel: 3, name: "conv1", weightNorm: .wn, generator: &b)
        #expect(
            wn.parameters.map(\.name) == [
                "conv1.parametrizations.weight.original0",
                "conv1.parametrizations.weight.original1",
                "conv1.bias",
            ])
        // Registration does not change the layer: g = ‖w‖, v = w gives the same W.
        let x = try LayerGradientTests.input([1, 2, 4, 4])
        let c = Comparison(
            try wn.forward(x, mode: .training).scalars,
            try plain.forward(x, mode: .training).scalars)
        #expect(c.maxAbsolute < 1e-13)
        var s = SeededGenerator(seed: 4)
        let sn = try Linear<Double>(3, 2, name: "fc", weightNorm: .sn, generator: &s)
        #expect(
            Set(sn.buffers.keys) == [
                "fc.parametrizations.weight.0._u", "fc.parametrizations.weight.0._v",
            ])
    }

    @Test func trainingWithWeightStandardizationAndGroupNormLearns() throws {
        var config = TrainingConfig()
        config.normalizer = "gn"
        config.weightNorm = "ws"
        config.epochs = 1
        config.batchSize = 8
        config.learningRate = 0.05
        config.width = 8
        let trainer = try Trainer(config)
        #expect(
            trainer.model.parameters.contains {
                $0.name == "conv1.parametrizations.weight.original"
            })
        try trainer.run()
        let losses = trainer.stepLosses
        let first = losses.prefix(10).reduce(0, +) / 10
        let last = losses.suffix(10).reduce(0, +) / 10
        #expect(last < 0.7 * first, "loss \(first) → \(last)")
    }

    @Test func spectralNormCheckpointResumesExactly() throws {
        var config = TrainingConfig()
        config.normalizer = "bn"
        config.weightNorm = "sn"
        config.epochs = 1
        config.batchSize = 16
        config.width = 4
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-sn-\(UInt64.random(in: 0...UInt64.max)).safetensors"
        ).path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let a = try Trainer(config)
        var steps = 0
        try a.run(shouldStop: {
            steps += 1
            return steps > 5
        })
        try a.saveCheckpoint(to: path)
        let file = try Safetensors.read(contentsOf: path)
        #expect(file.tensors["buffer.conv1.parametrizations.weight.0._u"] != nil)
        #expect(file.tensors["model.fc.parametrizations.weight.original"] != nil)
        let b = try Trainer.resume(from: path)
        #expect(b.model.buffers == a.model.buffers)
        try a.run()
        try b.run()
        #expect(a.stepLosses == b.stepLosses)
    }

    @Test func unknownWeightNormIsRefused() throws {
        var config = TrainingConfig()
        config.weightNorm = "bogus"
        #expect(throws: TrainingError.self) { try Trainer(config) }
    }

    @Test func studyMeasuresTheLargestSingularValue() throws {
        // [[3, 0, 0], [0, −4, 0]] rotated by nothing: σ_max = 4; a rank-one matrix u vᵀ has
        // σ_max = ‖u‖‖v‖.
        let d = try Tensor<Float>(shape: [2, 3], scalars: [3, 0, 0, 0, -4, 0])
        #expect(abs(WeightNormStudy.largestSingularValue(d) - 4) < 1e-9)
        let r = try Tensor<Double>(shape: [2, 2, 1, 1], scalars: [1, 2, 2, 4])
        #expect(abs(WeightNormStudy.largestSingularValue(r) - 5) < 1e-9)
    }

    @Test func studyReportListsEverySetupAndLayer() {
        let plan = WeightNormStudy.Plan.quick
        let results = WeightNormStudy.Results(
            runs: plan.setups.flatMap { s in
                plan.batchSizes.map {
                    WeightNormStudy.Run(
                        label: s.label, batchSize: $0, testError: 0.25, diverged: false)
                }
            },
            spectra: [
                WeightNormStudy.Spectrum(
                    weightNorm: "sn", layers: ["conv1", "fc"], sigmas: [[1.5, 2], [1, 1]],
                    testError: 0.5)
            ], seconds: 1, plan: plan)
        let text = WeightNormStudy.markdown(results)
        for s in plan.setups { #expect(text.contains("| \(s.label) | 25.0% | 25.0% |")) }
        #expect(text.contains("| sn | final | 1.000 | 1.000 | 1.000 | 50.0% |"))
        #expect(text.contains("| sn | initial | 1.500 | 2.000 | 3.000 |  |"))
        #expect(WeightNormStudy.html(results).contains("<svg"))
    }
}
