import NormKit
import NormTestSupport
import Testing

/// Chan's merge and SyncBatchNorm on one process (the multi-process checks are in NormMPITests,
/// which launch `mpirun`).
@Suite("SyncBatchNorm on one process")
struct SyncBatchNormTests {
    /// Double tolerance for "the same computation in another order" (a merge of one part,
    /// M2/n against the kernel's biased variance).
    static let doubleTolerance = 1e-12
    /// Float: the outputs round the same Double values, so at most an ulp or two apart.
    static let floatTolerance = 1e-6

    /// Two-pass statistics of a flat array, the oracle for the merge.
    static func twoPass(_ v: [Double]) -> (mean: Double, m2: Double) {
        let mean = v.reduce(0, +) / Double(v.count)
        return (mean, v.reduce(0) { $0 + ($1 - mean) * ($1 - mean) })
    }

    @Test(arguments: [[3, 0, 5], [1, 7, 0, 2], [0, 0, 4], [6]])
    func chanMergeOfUnevenPartsEqualsTheConcatenation(_ sizes: [Int]) throws {
        var g = SeededGenerator(seed: UInt64(sizes.reduce(0, +)))
        // Offset data: a naive Σx² − nμ² would lose every digit here.
        let all = try Tensor<Double>.randomNormal(
            shape: [sizes.reduce(0, +), 2], mean: 1000, standardDeviation: 0.05, using: &g
        ).scalars
        var parts: [Moments] = []
        var start = 0
        for size in sizes {
            var part = Moments(setCount: 2)
            for c in 0..<2 where size > 0 {
                let values = (start..<(start + size)).map { all[2 * $0 + c] }
                let (mean, m2) = Self.twoPass(values)
                part.count[c] = size
                part.mean[c] = mean
                part.m2[c] = m2
            }
            parts.append(part)
            start += size
        }
        let merged = Moments.merging(parts, setCount: 2)
        for c in 0..<2 {
            let (mean, m2) = Self.twoPass(stride(from: c, to: all.count, by: 2).map { all[$0] })
            #expect(merged.count[c] == all.count / 2)
            #expect(abs(merged.mean[c] - mean) <= 1e-12 * 1000, "mean \(merged.mean[c]) vs \(mean)")
            #expect(abs(merged.m2[c] - m2) <= 1e-9 * m2, "M2 \(merged.m2[c]) vs \(m2)")
        }
        // Packing round-trips exactly.
        #expect(Moments(packed: merged.packed) == merged)
    }

    @Test func packedMomentsRejectMalformedBuffers() {
        #expect(Moments(packed: [1, 2]) == nil)
        #expect(Moments(packed: [-1, 0, 0]) == nil)
        #expect(Moments(packed: [1.5, 0, 0]) == nil)
    }

    static func compare<T: NormScalar>(
        layout: Layout, shape: [Int], as _: T.Type, tolerance: Double
    ) throws {
        var g = SeededGenerator(seed: 11)
        let channels = shape[layout.channelAxis(rank: shape.count)]
        let plain = try BatchNorm<T>(featureCount: channels, layout: layout)
        let synced = try SyncBatchNorm<T>(
            featureCount: channels, communicator: LocalCommunicator(), layout: layout)
        let weight = try Tensor<T>.randomNormal(shape: [channels], mean: 1, using: &g)
        let bias = try Tensor<T>.randomNormal(shape: [channels], using: &g)
        try plain.load(["weight": weight, "bias": bias])
        try synced.load(["weight": weight, "bias": bias])
        for step in 0..<3 {
            let x = try Tensor<T>.randomNormal(
                shape: shape, mean: step == 1 ? 1000 : 0.5, standardDeviation: 2, using: &g)
            let dy = try Tensor<T>.randomNormal(shape: shape, using: &g)
            let (y0, c0) = try plain.forward(x, mode: .training)
            let (y1, c1) = try synced.forward(x, mode: .training)
            #expect(c1.synchronizedCount == x.count / channels)
            let g0 = try plain.backward(dy, cache: c0)
            let g1 = try synced.backward(dy, cache: c1)
            let r0 = try #require(plain.runningStatistics)
            let r1 = try #require(synced.runningStatistics)
            for (label, a, e) in [
                ("y", y1, y0), ("dx", g1.input, g0.input), ("dweight", g1.scale!, g0.scale!),
                ("dbias", g1.offset!, g0.offset!), ("running_mean", r1.mean, r0.mean),
                ("running_var", r1.variance, r0.variance),
            ] {
                let c = Comparison(a.scalars, e.scalars)
                #expect(c.relative <= tolerance, "step \(step) \(layout) \(label): \(c)")
            }
            #expect(r1.batchesTracked == step + 1)
        }
    }

    @Test(arguments: [Layout.channelsFirst, .channelsLast])
    func localCommunicatorEqualsBatchNormInDouble(_ layout: Layout) throws {
        try Self.compare(
            layout: layout, shape: [5, 3, 4, 7], as: Double.self, tolerance: Self.doubleTolerance)
        try Self.compare(
            layout: layout, shape: [3, 17], as: Double.self, tolerance: Self.doubleTolerance)
    }

    @Test(arguments: [Layout.channelsFirst, .channelsLast])
    func localCommunicatorEqualsBatchNormInFloat(_ layout: Layout) throws {
        try Self.compare(
            layout: layout, shape: [4, 65, 3, 3], as: Float.self, tolerance: Self.floatTolerance)
    }

    @Test func inferenceUsesRunningStatisticsAndExchangesNothing() throws {
        let layer = try SyncBatchNorm<Double>(featureCount: 2, communicator: LocalCommunicator())
        try layer.load(["running_mean": Tensor([1, 2]), "running_var": Tensor([4, 9])])
        let x = try Tensor<Double>(shape: [1, 2], scalars: [3, 5])
        let (y, cache) = try layer.forward(x, mode: .inference)
        #expect(cache.synchronizedCount == nil)
        #expect(abs(y.scalars[0] - 2 / (4 + 1e-5).squareRoot()) < 1e-12)
        #expect(abs(y.scalars[1] - 3 / (9 + 1e-5).squareRoot()) < 1e-12)
    }

    @Test func badInputsAreTypedErrorsAndChangeNothing() throws {
        let layer = try SyncBatchNorm<Double>(featureCount: 3, communicator: LocalCommunicator())
        let before = layer.runningStatistics
        #expect(
            throws: NormError.channelMismatch(
                layer: "SyncBatchNorm", expected: 3, actual: 2, shape: [4, 2, 3])
        ) {
            _ = try layer.forward(Tensor(zeros: [4, 2, 3]), mode: .training)
        }
        // Every rank empty: no statistics at all.
        #expect(throws: NormError.emptyTensor(layer: "SyncBatchNorm", shape: [0, 3, 2])) {
            _ = try layer.forward(Tensor(zeros: [0, 3, 2]), mode: .training)
        }
        // One value per channel over all ranks.
        #expect(throws: NormError.singleValuePerStatistic(layer: "SyncBatchNorm", shape: [1, 3])) {
            _ = try layer.forward(Tensor(zeros: [1, 3]), mode: .training)
        }
        #expect(layer.runningStatistics == before)
        let (_, cache) = try layer.forward(Tensor(repeating: 1, shape: [2, 3]), mode: .training)
        #expect(throws: NormError.gradientShapeMismatch(expected: [2, 3], actual: [3, 3])) {
            _ = try layer.backward(Tensor(zeros: [3, 3]), cache: cache)
        }
    }

    @Test func gradientsMatchFiniteDifferences() throws {
        var g = SeededGenerator(seed: 5)
        let x = try Tensor<Double>.randomNormal(shape: [3, 2, 4], mean: 2, using: &g)
        let dy = try Tensor<Double>.randomNormal(shape: [3, 2, 4], using: &g)
        let layer = try SyncBatchNorm<Double>(featureCount: 2, communicator: LocalCommunicator())
        try layer.load(["weight": Tensor([1.5, -0.5]), "bias": Tensor([0.1, 0.2])])
        let (_, cache) = try layer.forward(x, mode: .training)
        let dx = try layer.backward(dy, cache: cache).input
        let h = 1e-6
        var worst = 0.0
        for i in 0..<x.count {
            var xp = x.scalars
            var xm = x.scalars
            xp[i] += h
            xm[i] -= h
            func loss(_ v: [Double]) throws -> Double {
                let probe = try SyncBatchNorm<Double>(
                    featureCount: 2, communicator: LocalCommunicator())
                try probe.load(["weight": Tensor([1.5, -0.5]), "bias": Tensor([0.1, 0.2])])
                let y = try probe.forward(Tensor(shape: x.shape, scalars: v), mode: .training)
                    .output
                return zip(y.scalars, dy.scalars).reduce(0) { $0 + $1.0 * $1.1 }
            }
            let numeric = (try loss(xp) - loss(xm)) / (2 * h)
            worst = max(worst, abs(numeric - dx.scalars[i]))
        }
        #expect(worst < 1e-7, "worst |dx − FD| = \(worst)")
    }
}

/// Switchable Normalization and Batch Renormalization with a one-process communicator run the
/// synchronized code path and must equal the plain layers.
@Suite("Synchronized SN and Batch Renorm on one process")
struct SynchronizedLearnedLayersTests {
    @Test(arguments: [SwitchableNorm<Double>.Weighting.softmax, .sparsestMax])
    func switchableNormWithLocalCommunicatorEqualsPlain(
        _ weighting: SwitchableNorm<Double>.Weighting
    ) throws {
        var g = SeededGenerator(seed: 21)
        let layers = try (0..<2).map { _ in
            let sn = try SwitchableNorm<Double>(channelCount: 3, weighting: weighting)
            sn.meanLogits = Tensor([0.3, -0.2, 0.5])
            sn.varianceLogits = Tensor([-0.1, 0.4, 0.2])
            sn.radius = 0.3
            return sn
        }
        layers[1].communicator = LocalCommunicator()
        for step in 0..<2 {
            let x = try Tensor<Double>.randomNormal(
                shape: [4, 3, 5], mean: step == 0 ? 1 : 1000, standardDeviation: 0.5, using: &g)
            let dy = try Tensor<Double>.randomNormal(shape: [4, 3, 5], using: &g)
            let (y0, c0) = try layers[0].forward(x, mode: .training)
            let (y1, c1) = try layers[1].forward(x, mode: .training)
            let g0 = try layers[0].backward(dy, cache: c0)
            let g1 = try layers[1].backward(dy, cache: c1)
            for (label, a, e) in [
                ("y", y1, y0), ("dx", g1.input, g0.input), ("dmean", g1.meanLogits, g0.meanLogits),
                ("dvar", g1.varianceLogits, g0.varianceLogits),
                ("running_mean", layers[1].runningMean, layers[0].runningMean),
                ("running_var", layers[1].runningVariance, layers[0].runningVariance),
            ] {
                let c = Comparison(a.scalars, e.scalars)
                #expect(c.relative <= 1e-12, "\(weighting) step \(step) \(label): \(c)")
            }
        }
    }

    @Test func batchRenormWithLocalCommunicatorEqualsPlain() throws {
        var g = SeededGenerator(seed: 22)
        let layers = try (0..<2).map { _ in
            try BatchRenorm<Double>(channelCount: 2, limits: .fixed(rMax: 1.5, dMax: 0.5))
        }
        layers[1].communicator = LocalCommunicator()
        for step in 0..<3 {
            let x = try Tensor<Double>.randomNormal(
                shape: [3, 2, 4], mean: 0.5, standardDeviation: 2, using: &g)
            let dy = try Tensor<Double>.randomNormal(shape: [3, 2, 4], using: &g)
            let (y0, c0) = try layers[0].forward(x, mode: .training)
            let (y1, c1) = try layers[1].forward(x, mode: .training)
            let g0 = try layers[0].backward(dy, cache: c0)
            let g1 = try layers[1].backward(dy, cache: c1)
            for (label, a, e) in [
                ("y", y1, y0), ("dx", g1.input, g0.input), ("dweight", g1.scale, g0.scale),
                ("running_mean", layers[1].runningMean, layers[0].runningMean),
                (
                    "running_std", layers[1].runningStandardDeviation,
                    layers[0].runningStandardDeviation
                ),
            ] {
                let c = Comparison(a.scalars, e.scalars)
                #expect(c.relative <= 1e-12, "step \(step) \(label): \(c)")
            }
        }
    }
}
