import NormKit
import NormTestSupport
import Testing

/// Switchable and Sparse Switchable Normalization against the official forward (in PyTorch,
/// float64, autograd for every gradient including the logits), finite differences, and their
/// defining properties.
@Suite("Switchable Normalization")
struct SwitchableNormTests {
    static let doubleTolerance = 1e-9
    /// At an offset of 1000 the official mean_c(σ² + μ²) − μ² loses about eight digits even in
    /// float64 (1e6·1e-16 against σ² = 2.5e-3); NormKit's cancellation-free form does not, so
    /// the two differ by the reference's own error.
    static let doubleOffsetTolerance = 1e-6
    static let floatTolerance = 2e-4
    static let floatOffsetTolerance = 1e-3

    static let cases = RawFixture.names("switchnorm") + RawFixture.names("sparseswitchnorm")

    static func make<T: NormScalar>(_ f: RawFixture, as _: T.Type) throws -> SwitchableNorm<T> {
        let sparse = f.name.hasPrefix("sparse")
        let x: Tensor<T> = f.tensor("x")
        let layout: Layout = f.string("layout") == "nhwc" ? .channelsLast : .channelsFirst
        let layer = try SwitchableNorm<T>(
            channelCount: x.shape[layout.channelAxis(rank: x.rank)], momentum: .keep(f.number("keep") ?? 0.9),
            usesBatchNorm: f.bool("using_bn") ?? true,
            runningEstimate: (f.bool("mavg") ?? true) ? .movingAverage : .batchAverage,
            weighting: sparse ? .sparsestMax : .softmax, layout: layout)
        try layer.load([
            "weight": f.tensor("weight"), "bias": f.tensor("bias"), "mean_weight": f.tensor("mean_weight"),
            "var_weight": f.tensor("var_weight"), "running_mean": f.tensor("running_mean.in"),
            "running_var": f.tensor("running_var.in"),
        ])
        layer.radius = f.number("radius") ?? 0
        return layer
    }

    static func check<T: NormScalar>(_ f: RawFixture, as _: T.Type, tolerance: Double) throws {
        let layer = try make(f, as: T.self)
        for k in 0..<Int(f.number("steps") ?? 0) {
            _ = try layer.forward(f.tensor("x.\(k)", as: T.self), mode: .training)
        }
        let mode: Mode = f.string("mode") == "eval" ? .inference : .training
        let (y, cache) = try layer.forward(f.tensor("x"), mode: mode)
        let g = try layer.backward(f.tensor("dy"), cache: cache)
        let pairs: [(String, Tensor<T>, String)] = [
            ("y", y, "y"), ("dx", g.input, "dx"), ("dweight", g.scale, "dweight"), ("dbias", g.offset, "dbias"),
            ("dmean_weight", g.meanLogits, "dmean_weight"), ("dvar_weight", g.varianceLogits, "dvar_weight"),
            ("running_mean", layer.runningMean, "running_mean.out"),
            ("running_var", layer.runningVariance, "running_var.out"),
        ]
        for (label, actual, key) in pairs {
            let expected: Tensor<Double> = f.tensor(key)
            let c = Comparison(actual.scalars, expected.scalars)
            #expect(c.relative <= tolerance, "\(f) \(label): \(c)")
        }
    }

    @Test(arguments: cases)
    func doubleMatchesTheOfficialForward(_ name: String) throws {
        let f = try RawFixture.load(name)
        try Self.check(
            f, as: Double.self, tolerance: (f.number("offset") ?? 0) > 0 ? Self.doubleOffsetTolerance : Self.doubleTolerance)
    }

    @Test(arguments: cases)
    func floatMatchesTheOfficialForward(_ name: String) throws {
        let f = try RawFixture.load(name)
        try Self.check(f, as: Float.self, tolerance: (f.number("offset") ?? 0) > 0 ? Self.floatOffsetTolerance : Self.floatTolerance)
    }

    @Test func thereAreEnoughCases() {
        #expect(RawFixture.names("switchnorm").count >= 12)
        #expect(RawFixture.names("sparseswitchnorm").count >= 12)
    }
}
