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
            channelCount: x.shape[layout.channelAxis(rank: x.rank)],
            momentum: .keep(f.number("keep") ?? 0.9),
            usesBatchNorm: f.bool("using_bn") ?? true,
            runningEstimate: (f.bool("mavg") ?? true) ? .movingAverage : .batchAverage,
            weighting: sparse ? .sparsestMax : .softmax, layout: layout)
        try layer.load([
            "weight": f.tensor("weight"), "bias": f.tensor("bias"),
            "mean_weight": f.tensor("mean_weight"),
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
            ("y", y, "y"), ("dx", g.input, "dx"), ("dweight", g.scale, "dweight"),
            ("dbias", g.offset, "dbias"),
            ("dmean_weight", g.meanLogits, "dmean_weight"),
            ("dvar_weight", g.varianceLogits, "dvar_weight"),
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
            f, as: Double.self,
            tolerance: (f.number("offset") ?? 0) > 0
                ? Self.doubleOffsetTolerance : Self.doubleTolerance)
    }

    @Test(arguments: cases)
    func floatMatchesTheOfficialForward(_ name: String) throws {
        let f = try RawFixture.load(name)
        try Self.check(
            f, as: Float.self,
            tolerance: (f.number("offset") ?? 0) > 0
                ? Self.floatOffsetTolerance : Self.floatTolerance)
    }

    @Test func thereAreEnoughCases() {
        #expect(RawFixture.names("switchnorm").count >= 12)
        #expect(RawFixture.names("sparseswitchnorm").count >= 12)
    }
}

@Suite("Switchable Normalization properties")
struct SwitchableNormPropertyTests {
    static func random(_ shape: [Int], seed: UInt64, mean: Double = 0, std: Double = 1) throws
        -> Tensor<Double>
    {
        var g = SeededGenerator(seed: seed)
        return try Tensor.randomNormal(shape: shape, mean: mean, standardDeviation: std, using: &g)
    }

    /// Central differences of L = Σ y·dy for x, γ, β and both logit vectors.
    static func finiteDifferenceCheck(
        _ layer: SwitchableNorm<Double>, x: Tensor<Double>, mode: Mode
    ) throws {
        try Conformance.checkGradients(layer, input: x, mode: mode, tolerance: 1e-6)
    }

    static func configured(_ layer: SwitchableNorm<Double>, seed: UInt64) -> SwitchableNorm<Double>
    {
        var g = SeededGenerator(seed: seed)
        layer.scale = layer.scale.map { _ in 1 + 0.5 * g.nextNormal() }
        layer.offset = layer.offset.map { _ in 0.5 * g.nextNormal() }
        layer.meanLogits = layer.meanLogits.map { _ in g.nextNormal() }
        layer.varianceLogits = layer.varianceLogits.map { _ in g.nextNormal() }
        return layer
    }

    @Test(arguments: [
        ([2, 3, 2, 3], Layout.channelsFirst, true, SwitchableNorm<Double>.Weighting.softmax),
        ([3, 2, 4], .channelsFirst, false, .softmax),
        ([2, 2, 3, 3], .channelsLast, true, .softmax),
        ([2, 3, 2, 3], .channelsFirst, true, .sparsestMax),
        ([4, 3], .channelsFirst, true, .softmax),
    ])
    func gradientsMatchFiniteDifferences(
        _ shape: [Int], _ layout: Layout, _ usesBN: Bool,
        _ weighting: SwitchableNorm<Double>.Weighting
    ) throws {
        let c = shape[layout.channelAxis(rank: shape.count)]
        let layer = Self.configured(
            try SwitchableNorm<Double>(
                channelCount: c, usesBatchNorm: usesBN, weighting: weighting, layout: layout),
            seed: 3)
        if weighting == .sparsestMax {
            // Logits close together: dense weights, away from the one-hot freeze and the kinks.
            layer.meanLogits = Tensor([1.0, 1.1, 0.95])
            layer.varianceLogits = Tensor([1.05, 0.9, 1.0])
            layer.radius = 0.1
        }
        let x = try Self.random(shape, seed: 4, mean: 2, std: 1.5)
        try Self.finiteDifferenceCheck(layer, x: x, mode: .training)
        // Inference: BN statistics are constants.
        _ = try layer.forward(try Self.random(shape, seed: 5), mode: .training)
        try Self.finiteDifferenceCheck(layer, x: x, mode: .inference)
    }

    @Test func oneHotInstanceWeightsGiveUnbiasedInstanceNorm() throws {
        let sn = try SwitchableNorm<Double>(channelCount: 3)
        sn.meanLogits = Tensor([800, 0, 0])
        sn.varianceLogits = Tensor([800, 0, 0])
        let reference = try NormLayer<Double>(
            normalizer: Normalizer(partition: .instance, variance: .unbiased, epsilon: 1e-5))
        let x = try Self.random([2, 3, 4, 5], seed: 6, mean: 1, std: 2)
        let c = Comparison(
            try sn.forward(x, mode: .training).output.scalars,
            try reference.forward(x, mode: .training).output.scalars)
        #expect(c.relative < 1e-12, "\(c)")
    }

    @Test func oneHotComponentsFollowTheirDefinitions() throws {
        // LN and BN components: μ and σ² per the official derivation from IN statistics,
        // computed here by hand.
        let x = try Self.random([3, 2, 2, 2], seed: 7, mean: 3)
        let (n, c, l) = (3, 2, 4)
        var muIn = [[Double]](repeating: [Double](repeating: 0, count: c), count: n)
        var tIn = muIn
        for i in 0..<n {
            for j in 0..<c {
                let v = (0..<l).map { x.scalars[(i * c + j) * l + $0] }
                let m = v.reduce(0, +) / Double(l)
                let varU = v.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(l - 1)
                muIn[i][j] = m
                tIn[i][j] = varU + m * m
            }
        }
        for (component, logits) in [("LN", [0.0, 800, 0]), ("BN", [0.0, 0, 800])] {
            let sn = try SwitchableNorm<Double>(channelCount: c)
            sn.meanLogits = Tensor(logits)
            sn.varianceLogits = Tensor(logits)
            let y = try sn.forward(x, mode: .training).output
            for i in 0..<n {
                for j in 0..<c {
                    let (mu, t): (Double, Double)
                    if component == "LN" {
                        mu = muIn[i].reduce(0, +) / Double(c)
                        t = tIn[i].reduce(0, +) / Double(c)
                    } else {
                        mu = (0..<n).map { muIn[$0][j] }.reduce(0, +) / Double(n)
                        t = (0..<n).map { tIn[$0][j] }.reduce(0, +) / Double(n)
                    }
                    let rstd = 1 / (t - mu * mu + 1e-5).squareRoot()
                    for s in 0..<l {
                        let index = (i * c + j) * l + s
                        #expect(
                            abs(y.scalars[index] - (x.scalars[index] - mu) * rstd) < 1e-10,
                            "\(component)")
                    }
                }
            }
        }
    }

    @Test func onePositionGivesNoNaN() throws {
        let sn = try SwitchableNorm<Float>(channelCount: 4)
        let x = try Tensor<Float>.randomNormal(
            shape: [3, 4, 1, 1], using: &SeededGeneratorBox.shared.generator)
        let (y, cache) = try sn.forward(x, mode: .training)
        #expect(y.isFinite)
        #expect(try sn.backward(x, cache: cache).input.isFinite)
        #expect(sn.runningMean.isFinite && sn.runningVariance.isFinite)
    }

    @Test func batchAverageIsTheMeanOfTheBatchStatistics() throws {
        let sn = try SwitchableNorm<Double>(channelCount: 2, runningEstimate: .batchAverage)
        var means: [[Double]] = []
        var seconds: [[Double]] = []
        for seed in 0..<3 {
            let x = try Self.random([4, 2, 5], seed: UInt64(20 + seed), mean: Double(seed))
            _ = try sn.forward(x, mode: .training)
            // μ_BN and E[x²]-style second moment per channel, from the definition.
            var m = [0.0, 0.0]
            var sec = [0.0, 0.0]
            for j in 0..<2 {
                var muIns: [Double] = []
                var ts: [Double] = []
                for i in 0..<4 {
                    let v = (0..<5).map { x.scalars[(i * 2 + j) * 5 + $0] }
                    let mu = v.reduce(0, +) / 5
                    muIns.append(mu)
                    ts.append(v.map { ($0 - mu) * ($0 - mu) }.reduce(0, +) / 4 + mu * mu)
                }
                m[j] = muIns.reduce(0, +) / 4
                sec[j] = ts.reduce(0, +) / 4
            }
            means.append(m)
            seconds.append(sec)
        }
        #expect(sn.accumulatedBatches == 3)
        try sn.finalizeBatchAverage()
        for j in 0..<2 {
            let mean = means.map { $0[j] }.reduce(0, +) / 3
            let second = seconds.map { $0[j] }.reduce(0, +) / 3
            #expect(abs(sn.runningMean.scalars[j] - mean) < 1e-12)
            #expect(abs(sn.runningVariance.scalars[j] - (second - mean * mean)) < 1e-10)
        }
    }

    @Test func sparseWeightsFreezeOnceOneHot() throws {
        let ssn = try SwitchableNorm<Double>(
            channelCount: 2, weighting: .sparsestMax, radiusSteps: 4)
        ssn.meanLogits = Tensor([1.2, 1.0, 0.9])
        ssn.varianceLogits = Tensor([1.0, 1.1, 1.0])
        let x = try Self.random([3, 2, 4], seed: 30)
        var radii: [Double] = []
        for _ in 0..<6 {
            ssn.advanceRadius()
            radii.append(ssn.radius)
            let (_, cache) = try ssn.forward(x, mode: .training)
            let grads = try ssn.backward(x, cache: cache)
            let w = ssn.importanceWeights
            for weights in [w.mean, w.variance] {
                #expect(abs(weights.reduce(0, +) - 1) < 1e-12 && weights.allSatisfy { $0 >= 0 })
            }
            if ssn.isMeanFixed { #expect(grads.meanLogits.scalars.allSatisfy { $0 == 0 }) }
        }
        #expect(radii == [0.25, 0.5, 0.75, 1, 1, 1])
        // At radius 1 both mixtures are one-hot and frozen.
        #expect(ssn.isMeanFixed && ssn.isVarianceFixed)
        #expect(ssn.importanceWeights.mean.filter { $0 == 1 }.count == 1)
    }

    @Test func errorsLeaveTheLayerUnchanged() throws {
        let sn = try SwitchableNorm<Double>(channelCount: 3)
        let before = sn.state()
        #expect(
            throws: NormError.channelMismatch(
                layer: "SwitchableNorm", expected: 3, actual: 4, shape: [2, 4, 5])
        ) {
            _ = try sn.forward(try Self.random([2, 4, 5], seed: 1), mode: .training)
        }
        #expect(
            throws: NormError.invalidRank(
                layer: "SwitchableNorm", expected: "rank ≥ 2 (N, C, …)", shape: [3])
        ) {
            _ = try sn.forward(try Self.random([3], seed: 1), mode: .training)
        }
        var x = try Self.random([2, 3, 4], seed: 2)
        x[0, 1, 2] = .nan
        #expect(throws: NormError.nonFiniteStatistics(layer: "SwitchableNorm")) {
            _ = try sn.forward(x, mode: .training)
        }
        #expect(throws: NormError.self) { try sn.load(["mean_weight": Tensor([1, 2])]) }
        #expect(sn.state() == before)
    }

    @Test func importanceSummaryReadsAsText() throws {
        let sn = try SwitchableNorm<Double>(channelCount: 2)
        #expect(
            sn.importanceSummary
                == "mean: IN 0.333 LN 0.333 BN 0.333\nvariance: IN 0.333 LN 0.333 BN 0.333")
    }
}

@Suite("SparsestMax")
struct SparsestMaxTests {
    @Test func sparsemaxOfHandWorkedVectors() {
        // v = (0.5, 0.2, 0.1): τ = (0.8 − 1)/3 < … → all in support: p = v − τ with Σ = 1.
        let p = SparsestMax.sparsemax([0.5, 0.2, 0.1])
        #expect(
            zip(p, [0.5 + 0.2 / 3, 0.2 + 0.2 / 3, 0.1 + 0.2 / 3]).allSatisfy {
                abs($0 - $1) < 1e-12
            })
        // A dominant entry gives one-hot.
        #expect(SparsestMax.sparsemax([3, 1, 0]) == [1, 0, 0])
        // (1, 0.8, 0): τ = 0.4 → (0.6, 0.4, 0).
        let q = SparsestMax.sparsemax([1, 0.8, 0])
        #expect(zip(q, [0.6, 0.4, 0]).allSatisfy { abs($0 - $1) < 1e-12 })
    }

    @Test func outputsLieOnTheSimplexAndReachTheRadius() {
        var g = SeededGenerator(seed: 1)
        for _ in 0..<200 {
            let v = (0..<3).map { _ in g.nextNormal() }
            let r = g.nextUniform()
            let (p, _) = SparsestMax.evaluate(v, radius: r)
            #expect(abs(p.reduce(0, +) - 1) < 1e-12)
            #expect(p.allSatisfy { $0 >= 0 && $0 <= 1 })
        }
        // Radius 1 on three components always ends one-hot (the vertices are at distance ≥ 1
        // from every face centre they can be pushed from).
        let (p, _) = SparsestMax.evaluate([0.3, 0.2, 0.1], radius: 1)
        #expect(p.filter { $0 == 1 }.count == 1)
        // Radius 0 is plain sparsemax.
        #expect(
            SparsestMax.evaluate([0.5, 0.2, 0.1], radius: 0).p
                == SparsestMax.sparsemax([0.5, 0.2, 0.1]))
    }

    @Test func jacobianMatchesFiniteDifferences() {
        var g = SeededGenerator(seed: 2)
        for _ in 0..<50 {
            let v = (0..<3).map { _ in g.nextNormal() * 0.5 }
            let r = 0.2 + 0.5 * g.nextUniform()
            let (_, jacobian) = SparsestMax.evaluate(v, radius: r)
            let h = 1e-7
            for l in 0..<3 {
                var plus = v
                var minus = v
                plus[l] += h
                minus[l] -= h
                let pp = SparsestMax.evaluate(plus, radius: r).p
                let pm = SparsestMax.evaluate(minus, radius: r).p
                for i in 0..<3 {
                    let numeric = (pp[i] - pm[i]) / (2 * h)
                    // Away from the kinks (where the support changes) the two agree.
                    if abs(numeric - jacobian[i][l]) > 1e-5 {
                        let support =
                            SparsestMax.sparsemax(plus).map { $0 > 0 }
                            == SparsestMax.sparsemax(minus).map { $0 > 0 }
                        #expect(
                            !support,
                            "J[\(i)][\(l)] = \(jacobian[i][l]), numeric \(numeric), v = \(v), r = \(r)"
                        )
                    }
                }
            }
        }
    }

    @Test func theCentreIsReturnedWithoutDividingByZero() {
        let (p, j) = SparsestMax.evaluate([1, 1, 1], radius: 0.5)
        #expect(p.allSatisfy { abs($0 - 1.0 / 3) < 1e-12 })
        #expect(j.joined().allSatisfy { $0.isFinite })
    }
}

/// A shared generator for tests that need arbitrary data.
final class SeededGeneratorBox: @unchecked Sendable {
    static let shared = SeededGeneratorBox()
    var generator = SeededGenerator(seed: 12345)
}
