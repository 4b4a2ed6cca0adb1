import NormKit
import NormTestSupport
import Testing

/// Identities between layers and invariances that hold for any input.
@Suite("Normalizer properties")
struct PropertyTests {
    /// Two routes to the same function in Double differ only by summation order.
    static let tolerance = 1e-12

    static func random(_ shape: [Int], seed: UInt64, mean: Double = 0, std: Double = 1) throws
        -> Tensor<Double>
    {
        var g = SeededGenerator(seed: seed)
        return try Tensor.randomNormal(shape: shape, mean: mean, standardDeviation: std, using: &g)
    }

    static func expectSame(_ a: Tensor<Double>?, _ b: Tensor<Double>?, _ label: String) {
        guard let a, let b else {
            Issue.record("\(label): missing tensor")
            return
        }
        #expect(a.shape == b.shape, "\(label) shape")
        let c = Comparison(a.scalars, b.scalars)
        #expect(c.relative < tolerance, "\(label): \(c)")
    }

    @Test(arguments: [Layout.channelsFirst, .channelsLast])
    func oneGroupEqualsLayerNormOverChannelsAndSpace(_ layout: Layout) throws {
        let shape = layout == .channelsFirst ? [3, 4, 2, 5] : [3, 2, 5, 4]
        let x = try Self.random(shape, seed: 1, mean: 2, std: 3)
        let dy = try Self.random(shape, seed: 2)
        let gn = try GroupNorm<Double>(
            groupCount: 1, channelCount: 4, affine: false, layout: layout)
        let ln = try LayerNorm<Double>(
            normalizedShape: Array(shape.dropFirst()), elementwiseAffine: false)
        let (yg, cg) = try gn.forward(x, mode: .training)
        let (yl, cl) = try ln.forward(x, mode: .training)
        Self.expectSame(yg, yl, "y")
        Self.expectSame(
            try gn.backward(dy, cache: cg).input, try ln.backward(dy, cache: cl).input, "dx")
    }

    @Test(arguments: [Layout.channelsFirst, .channelsLast])
    func channelCountGroupsEqualInstanceNorm(_ layout: Layout) throws {
        let shape = layout == .channelsFirst ? [2, 3, 4, 5] : [2, 4, 5, 3]
        let x = try Self.random(shape, seed: 3)
        let dy = try Self.random(shape, seed: 4)
        let gn = try GroupNorm<Double>(groupCount: 3, channelCount: 3, layout: layout)
        let inorm = try InstanceNorm<Double>(featureCount: 3, affine: true, layout: layout)
        let gamma = Tensor<Double>([0.5, 2, -1])
        let beta = Tensor<Double>([1, 0, 3])
        for layer in [gn as NormLayer<Double>, inorm] {
            layer.scale = gamma
            layer.offset = beta
        }
        let (yg, cg) = try gn.forward(x, mode: .training)
        let (yi, ci) = try inorm.forward(x, mode: .training)
        Self.expectSame(yg, yi, "y")
        let gg = try gn.backward(dy, cache: cg)
        let gi = try inorm.backward(dy, cache: ci)
        Self.expectSame(gg.input, gi.input, "dx")
        Self.expectSame(gg.scale, gi.scale, "dweight")
        Self.expectSame(gg.offset, gi.offset, "dbias")
    }

    @Test func inferenceBatchNormIsAffine() throws {
        let bn = try BatchNorm<Double>(featureCount: 3)
        _ = try bn.forward(
            try Self.random([4, 3, 2, 2], seed: 5, mean: 1, std: 2), mode: .training)
        let a = try Self.random([2, 3, 2, 2], seed: 6)
        let b = try Self.random([2, 3, 2, 2], seed: 7)
        let t = 0.3
        let mix = try Tensor(
            shape: a.shape, scalars: zip(a.scalars, b.scalars).map { t * $0 + (1 - t) * $1 })
        let fa = try bn.forward(a, mode: .inference).output
        let fb = try bn.forward(b, mode: .inference).output
        let fmix = try bn.forward(mix, mode: .inference).output
        let combined = try Tensor(
            shape: a.shape, scalars: zip(fa.scalars, fb.scalars).map { t * $0 + (1 - t) * $1 })
        Self.expectSame(fmix, combined, "f(t a + (1 − t) b)")
        // And it differs from training mode.
        let train = try bn.forward(a, mode: .training).output
        #expect(Comparison(train.scalars, fa.scalars).maxAbsolute > 1e-3)
    }

    @Test func layerNormIsInvariantToPerSampleAffineMaps() throws {
        let ln = try LayerNorm<Double>(normalizedShape: [6], epsilon: 0)
        let x = try Self.random([3, 6], seed: 8)
        var mapped = x
        for n in 0..<3 {
            let (a, b) = (0.5 + Double(n), -4.0 + 3 * Double(n))
            for d in 0..<6 { mapped[n, d] = a * x[n, d] + b }
        }
        Self.expectSame(
            try ln.forward(x, mode: .training).output,
            try ln.forward(mapped, mode: .training).output, "LN(a·x + b)")
    }

    @Test(arguments: [StandardLayer.batchnorm, .layernorm, .layernorm2d, .instancenorm, .groupnorm])
    func outputHasZeroMeanAndUnitVarianceOverEachSet(_ name: StandardLayer) throws {
        var options = LayerOptions()
        options.groups = 2
        options.epsilon = 0
        options.affine = false
        let x = try Self.random([3, 4, 3, 5], seed: 9, mean: 7, std: 4)
        let layer: NormLayer<Double> = try name.make(inputShape: x.shape, options: options)
        let (y, cache) = try layer.forward(x, mode: .training)
        let index = cache.plan.setIndices()
        var sums = [Double](repeating: 0, count: cache.plan.setCount)
        var squares = sums
        for (i, v) in y.scalars.enumerated() {
            sums[index[i]] += v
            squares[index[i]] += v * v
        }
        let m = Double(cache.plan.setSize)
        for s in sums.indices {
            #expect(abs(sums[s] / m) < 1e-12)
            #expect(abs(squares[s] / m - 1) < 1e-12)
        }
    }

    @Test func runningMeanMovesByMomentumAfterOneStep() throws {
        let bn = try BatchNorm<Double>(featureCount: 2, momentum: .exponential(weightOfNew: 0.1))
        let x = try Tensor<Double>(shape: [2, 2], scalars: [1, 10, 3, 20])
        _ = try bn.forward(x, mode: .training)
        let running = try #require(bn.runningStatistics)
        Self.expectSame(running.mean, Tensor([0.1 * 2, 0.1 * 15]), "running mean")
        // Unbiased batch variances 2 and 50; 0.9 · 1 + 0.1 · s.
        Self.expectSame(running.variance, Tensor([0.9 + 0.2, 0.9 + 5]), "running variance")
        #expect(running.batchesTracked == 1)
    }

    @Test func cumulativeMomentumAveragesEveryBatch() throws {
        for layer in [
            try BatchNorm<Double>(featureCount: 1, momentum: .cumulative) as NormLayer<Double>,
            try InstanceNorm<Double>(
                featureCount: 1, momentum: .cumulative, trackRunningStatistics: true),
        ] {
            let batches: [[Double]] = [[1, 2, 3], [4, 6, 8], [0, 0, 3]]
            for b in batches {
                _ = try layer.forward(try Tensor(shape: [1, 1, 3], scalars: b), mode: .training)
            }
            let means = batches.map { $0.reduce(0, +) / 3 }
            let variances = zip(batches, means).map { b, m in
                b.map { ($0 - m) * ($0 - m) }.reduce(0, +) / 2
            }
            Self.expectSame(
                layer.runningStatistics?.mean, Tensor([means.reduce(0, +) / 3]),
                "\(layer.name) mean")
            Self.expectSame(
                layer.runningStatistics?.variance, Tensor([variances.reduce(0, +) / 3]),
                "\(layer.name) variance")
            #expect(layer.runningStatistics?.batchesTracked == 3)
        }
    }

    @Test func instanceNormCounterStaysStillUnderExponentialMomentum() throws {
        let layer = try InstanceNorm<Double>(featureCount: 2, trackRunningStatistics: true)
        _ = try layer.forward(try Self.random([2, 2, 3], seed: 10), mode: .training)
        #expect(layer.runningStatistics?.batchesTracked == 0)  // as PyTorch
    }

    @Test func keepMomentumIsTheComplementaryWeight() {
        #expect(Momentum.keep(0.9) == .exponential(weightOfNew: 1 - 0.9))
        #expect(Momentum.cumulative.weightOfNew(batchesTracked: 4) == 0.25)
    }

    @Test func frozenStatisticsUseRunningStatisticsAndTrainTheAffine() throws {
        let bn = try BatchNorm<Double>(featureCount: 2)
        _ = try bn.forward(try Self.random([4, 2], seed: 12, mean: 3), mode: .training)
        let before = bn.runningStatistics
        let x = try Self.random([4, 2], seed: 13)
        let (frozen, cache) = try bn.forward(x, mode: .frozenStatistics)
        Self.expectSame(frozen, try bn.forward(x, mode: .inference).output, "frozen = inference")
        #expect(bn.runningStatistics == before)
        let grads = try bn.backward(x, cache: cache)
        #expect(grads.scale != nil && grads.offset != nil)
    }

    @Test func customPartitionMatchesAHandComputation() throws {
        // Standardize over (N, H) for every (C, W) of an [N, C, H, W] tensor.
        let shape = [2, 2, 3, 2]
        let x = try Self.random(shape, seed: 14, mean: 5, std: 2)
        let layer = try NormLayer<Double>(
            normalizer: Normalizer(partition: .axes([0, 2]), epsilon: 1e-5))
        let y = try layer.forward(x, mode: .training).output
        var expected = x
        for c in 0..<2 {
            for w in 0..<2 {
                var values: [Double] = []
                for n in 0..<2 { for h in 0..<3 { values.append(x[n, c, h, w]) } }
                let mean = values.reduce(0, +) / 6
                let variance = values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / 6
                for n in 0..<2 {
                    for h in 0..<3 {
                        expected[n, c, h, w] =
                            (x[n, c, h, w] - mean) / (variance + 1e-5).squareRoot()
                    }
                }
            }
        }
        Self.expectSame(y, expected, "custom partition")
    }

    @Test func floatOffsetDataNormalizesAccurately() throws {
        // 1000 + 0.05·noise: a naive E[x²] − E[x]² in Float would lose every digit.
        let xd = try Self.random([8, 4, 16], seed: 15, mean: 1000, std: 0.05).converted(
            to: Float.self
        )
        .converted(to: Double.self)
        let bnD = try BatchNorm<Double>(featureCount: 4)
        let bnF = try BatchNorm<Float>(featureCount: 4)
        let yd = try bnD.forward(xd, mode: .training).output
        let yf = try bnF.forward(xd.converted(to: Float.self), mode: .training).output
        let c = Comparison(yf.scalars, yd.scalars)
        #expect(c.relative < 1e-6, "\(c)")
    }
}
