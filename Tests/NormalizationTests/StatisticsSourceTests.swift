import NormKit
import NormTestSupport
import Testing

/// The statistics seam: its unfused stages (partial moments, reduction, source, apply; gradient
/// sums, reduction, rule) against the fused kernels, and the propagated source's gradients
/// against finite differences.
@Suite("Statistics seam")
struct StatisticsSourceTests {
    /// Double: the same statistics by another summation order (M2/n against the kernel's
    /// biased variance, RMS's E[x²] = M2/n + μ²).
    static let doubleTolerance = 1e-12
    /// Float: the fused kernel's shifted Float sums against the moments kernel's.
    static let floatTolerance = 1e-5
    /// Central differences with h = 1e-6 on O(1) data.
    static let finiteDifferenceTolerance = 1e-6

    struct Case: Sendable, CustomStringConvertible {
        let partition: Normalizer.Partition
        let centers: Bool
        let scales: Bool
        let unbiased: Bool
        var description: String {
            "\(partition) centers=\(centers) scales=\(scales) unbiased=\(unbiased)"
        }
    }

    static let cases: [Case] = [
        Case(partition: .batch, centers: true, scales: true, unbiased: false),
        Case(partition: .layer(trailing: 2), centers: true, scales: true, unbiased: false),
        Case(partition: .group(2), centers: true, scales: true, unbiased: true),
        Case(partition: .instance, centers: true, scales: false, unbiased: false),
        Case(partition: .layer(trailing: 1), centers: false, scales: true, unbiased: false),
    ]

    /// The batch source through a one-rank all-reduce runs every stage unfused; it must give
    /// the fused local path's output and input gradient (and the same dγ, dβ).
    static func unfusedStagesEqualFusedKernel<T: NormScalar>(
        _ c: Case, as _: T.Type, tolerance: Double
    ) throws {
        var g = SeededGenerator(seed: 21)
        let shape = [3, 4, 5]
        let x = try Tensor<T>.randomNormal(shape: shape, mean: 10, standardDeviation: 2, using: &g)
        let dy = try Tensor<T>.randomNormal(shape: shape, using: &g)
        let gamma = try Tensor<T>.randomNormal(shape: [4], mean: 1, using: &g)
        let beta = try Tensor<T>.randomNormal(shape: [4], using: &g)
        let indexing = ParameterIndexing(divisor: 5, modulus: 4)
        let plan = try c.partition.plan(for: shape, layout: .channelsFirst)
        let op = ReferenceNormKernel.Operation(
            centers: c.centers, scales: c.scales, unbiased: c.unbiased, epsilon: 1e-5)

        var fusedY = try Tensor<T>(zeros: [0])
        let fused = try StatisticsSource.batch(.local).normalize(
            x, plan: plan, operation: op, kernels: .automatic, scale: gamma, offset: beta,
            indexing: indexing, layer: "test", into: &fusedY)
        var fusedDx = try Tensor<T>(zeros: [0])
        let fusedGradients = try fused.backward(
            x, outputGradient: dy, plan: plan, operation: op, kernels: .automatic,
            reduction: .local, scale: gamma, indexing: indexing, layer: "test", into: &fusedDx)

        let reduction = StatisticsReduction.allReduced(LocalCommunicator())
        var stagedY = try Tensor<T>(zeros: [0])
        let staged = try StatisticsSource.batch(reduction).normalize(
            x, plan: plan, operation: op, kernels: .automatic, scale: gamma, offset: beta,
            indexing: indexing, layer: "test", into: &stagedY)
        #expect(staged.isAllReduced && staged.batch?.count == plan.setSize)
        var stagedDx = try Tensor<T>(zeros: [0])
        let stagedGradients = try staged.backward(
            x, outputGradient: dy, plan: plan, operation: op, kernels: .automatic,
            reduction: reduction, scale: gamma, indexing: indexing, layer: "test",
            into: &stagedDx)

        for (label, actual, expected) in [
            ("y", stagedY.scalars.map(Double.init), fusedY.scalars.map(Double.init)),
            ("dx", stagedDx.scalars.map(Double.init), fusedDx.scalars.map(Double.init)),
            ("dγ", stagedGradients.scale, fusedGradients.scale),
            ("dβ", stagedGradients.offset, fusedGradients.offset),
        ] {
            let comparison = Comparison(actual, expected)
            #expect(comparison.relative <= tolerance, "\(c) \(label): \(comparison)")
        }
    }

    @Test(arguments: cases)
    func unfusedStagesEqualFusedKernelInDouble(_ c: Case) throws {
        try Self.unfusedStagesEqualFusedKernel(c, as: Double.self, tolerance: Self.doubleTolerance)
    }

    @Test(arguments: cases)
    func unfusedStagesEqualFusedKernelInFloat(_ c: Case) throws {
        try Self.unfusedStagesEqualFusedKernel(c, as: Float.self, tolerance: Self.floatTolerance)
    }

    /// All-reduced statistics cannot be differentiated locally: backward without the forward's
    /// communicator is a typed error, not a silently local gradient.
    @Test func allReducedStatisticsNeedTheirCommunicatorInBackward() throws {
        var g = SeededGenerator(seed: 22)
        let x = try Tensor<Double>.randomNormal(shape: [4, 3], using: &g)
        let plan = try Normalizer.Partition.batch.plan(for: x.shape, layout: .channelsFirst)
        let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: 1e-5)
        var y = try Tensor<Double>(zeros: [0])
        let statistics = try StatisticsSource.batch(.allReduced(LocalCommunicator())).normalize(
            x, plan: plan, operation: op, kernels: .reference, scale: nil, offset: nil,
            indexing: nil, layer: "test", into: &y)
        #expect(throws: NormError.self) { _ = try statistics.backwardReduction(over: nil) }
        var dx = try Tensor<Double>(zeros: [0])
        #expect(throws: NormError.self) {
            _ = try statistics.backward(
                x, outputGradient: x, plan: plan, operation: op, kernels: .reference,
                reduction: .local, scale: nil, indexing: nil, layer: "test", into: &dx)
        }
    }

    /// A source without the moments it needs, or per-set values of the wrong length, is a
    /// typed error, never a trap.
    @Test func mismatchedInputsAreTypedErrors() throws {
        var g = SeededGenerator(seed: 24)
        let x = try Tensor<Double>.randomNormal(shape: [4, 3], using: &g)
        let plan = try Normalizer.Partition.batch.plan(for: x.shape, layout: .channelsFirst)
        let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: 1e-5)
        let batch = StatisticsReduction.local.partialMoments(
            x, plan: plan, operation: op, kernels: .reference, indexing: nil)
        #expect(throws: NormError.self) {
            _ = try StatisticsSource.batch(.local).resolve(nil, operation: op, layer: "t")
        }
        let wrong = Renormalization(
            runningMean: [0, 0], runningStandardDeviation: [1, 1], rMax: 3, dMax: 5, epsilon: 1e-5)
        #expect(
            throws: NormError.parameterShapeMismatch(
                name: "running_mean", expected: [3], actual: [2])
        ) {
            _ = try StatisticsSource.renormalized(wrong, .local).resolve(
                batch, operation: op, layer: "t")
        }
        let short = KalmanPrediction(mean: [0], variance: [1], gain: [0.5])
        #expect(throws: NormError.self) {
            _ = try StatisticsSource.propagated(short).resolve(batch, operation: op, layer: "t")
        }
        var y = try Tensor<Double>(zeros: [0])
        #expect(throws: NormError.self) {
            _ = try StatisticsSource.fixed(mean: [0, 0], rstd: [1, 1]).normalize(
                x, plan: plan, operation: op, kernels: .reference, scale: nil, offset: nil,
                indexing: nil, layer: "t", into: &y)
        }
    }

    /// The propagated (Kalman) source's gradients with respect to x, the prediction (μ⁻, σ²⁻),
    /// the gain p and an outside gradient on the statistics, against central differences of
    /// L = Σ y·dy + Σ (a·μ + b·σ²).
    @Test func propagatedSourceGradientsMatchFiniteDifferences() throws {
        var g = SeededGenerator(seed: 23)
        let x = try Tensor<Double>.randomNormal(
            shape: [4, 3, 2], mean: 1, standardDeviation: 2, using: &g)
        let dy = try Tensor<Double>.randomNormal(shape: x.shape, using: &g)
        let plan = try Normalizer.Partition.batch.plan(for: x.shape, layout: .channelsFirst)
        let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: 1e-5)
        let prediction = KalmanPrediction(
            mean: [0.5, -1, 2], variance: [1.5, 0.5, 3], gain: [0.2, 0.5, 0.7])
        let outside = StatisticsGradient(mean: [0.3, -0.2, 0.1], variance: [-0.1, 0.25, 0.05])

        func loss(_ x: Tensor<Double>, _ p: KalmanPrediction) throws -> Double {
            let batch = StatisticsReduction.local.partialMoments(
                x, plan: plan, operation: op, kernels: .reference, indexing: nil)
            let s = try StatisticsSource.propagated(p).resolve(batch, operation: op, layer: "t")
            var y = try Tensor<Double>(zeros: [0])
            try s.apply(
                x, plan: plan, kernels: .reference, scale: nil, offset: nil, indexing: nil,
                into: &y)
            // σ² from rstd = 1/√(σ² + ε).
            let variance = s.rstd.map { 1 / ($0 * $0) - 1e-5 }
            var total = zip(y.scalars, dy.scalars).reduce(0) { $0 + $1.0 * $1.1 }
            for i in 0..<3 {
                total += outside.mean[i] * s.mean[i] + outside.variance[i] * variance[i]
            }
            return total
        }

        let batch = StatisticsReduction.local.partialMoments(
            x, plan: plan, operation: op, kernels: .reference, indexing: nil)
        let statistics = try StatisticsSource.propagated(prediction).resolve(
            batch, operation: op, layer: "t")
        var dx = try Tensor<Double>(zeros: [0])
        let gradients = try statistics.backward(
            x, outputGradient: dy, plan: plan, operation: op, kernels: .reference,
            reduction: .local, scale: nil, indexing: nil, statisticsGradient: outside,
            layer: "t", into: &dx)
        let analytic = try #require(gradients.prediction)

        let h = 1e-6
        var worst = 0.0
        var probe = x
        for i in 0..<x.count {
            let v = probe[flat: i]
            probe[flat: i] = v + h
            let plus = try loss(probe, prediction)
            probe[flat: i] = v - h
            let minus = try loss(probe, prediction)
            probe[flat: i] = v
            worst = max(worst, abs((plus - minus) / (2 * h) - dx[flat: i]))
        }
        #expect(worst < Self.finiteDifferenceTolerance, "dx worst \(worst)")

        let parts: [(String, WritableKeyPath<KalmanPrediction, [Double]>, [Double])] = [
            ("μ⁻", \.mean, analytic.prediction.mean),
            ("σ²⁻", \.variance, analytic.prediction.variance),
            ("p", \.gain, analytic.gain),
        ]
        for (label, path, expected) in parts {
            for i in 0..<3 {
                var plus = prediction
                plus[keyPath: path][i] += h
                var minus = prediction
                minus[keyPath: path][i] -= h
                let numeric = (try loss(x, plus) - loss(x, minus)) / (2 * h)
                #expect(
                    abs(numeric - expected[i]) < Self.finiteDifferenceTolerance,
                    "\(label)[\(i)]: analytic \(expected[i]), numeric \(numeric)")
            }
        }
    }
}
