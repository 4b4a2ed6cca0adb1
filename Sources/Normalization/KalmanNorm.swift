import Foundation
import NormKernels
import TensorCore

/// The statistics Kalman Normalization layers pass down a network, and the gradients that come
/// back up: one slot per layer, in forward order.
public final class KalmanChain<Scalar: NormScalar> {
    /// Corrected estimates (μ, σ²) per layer, from the current forward pass.
    var estimates: [(mean: [Double], variance: [Double])?] = []
    /// dL/d(μ, σ²) of each layer's estimates, deposited by the next layer's backward.
    var downstream: [(mean: [Double], variance: [Double])?] = []
    /// Channel counts of the registered layers.
    var channels: [Int] = []

    /// An empty chain.
    public init() {}

    func register(channels c: Int) -> Int {
        channels.append(c)
        estimates.append(nil)
        downstream.append(nil)
        return channels.count - 1
    }
}

/// Kalman Normalization: a layer's statistics estimated from the previous normalized layer's
/// estimate (propagated through a learned transition) and the current batch's, combined with a
/// learned gain.
///
/// ```
/// prediction:  μ⁻ = A μ_prev,   σ²⁻_c = Σ_j A²_cj σ²_prev,j
/// correction:  μ = p μ⁻ + (1 − p) x̄,   σ² = p σ²⁻ + (1 − p) S + p(1 − p)(x̄ − μ⁻)²
/// y = γ (x − μ)/√(σ² + ε) + β,         p = sigmoid(q) per channel
/// ```
/// x̄ and S are the batch mean and biased variance per channel. The first layer of a chain has
/// no predecessor and is BatchNorm. Gradients flow through every layer's estimates into the
/// previous ones, A and q.
///
/// **What is the paper's and what is ours.** The recursion (prediction through a transition,
/// correction with a gain, the p(1 − p) cross term) follows Wang et al.'s description as
/// normalizers-spec.md §7 records it, marked unverified there. Our choices: covariances are
/// kept diagonal; A starts as the identity on the channels both layers share (zeros elsewhere)
/// and q at −2 (p ≈ 0.12, mostly the batch); inference uses running averages of the corrected
/// estimates (PyTorch convention, 0.1); the chain follows forward order, so it is supported in
/// sequential networks (the harness's `convnet`), not across residual branches.
///
/// ## References
/// 1. Wang, Peng, Luo, Wang & Lin 2018, "Kalman Normalization: Normalizing Internal
///    Representations Across Network Layers", NeurIPS 2018 (arXiv:1802.03133).
public final class KalmanNorm<Scalar: NormScalar> {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// C_k.
    public let channelCount: Int
    /// C_{k−1} (0 for the first layer of the chain).
    public let previousChannels: Int
    /// ε.
    public let epsilon: Double
    /// Position in the chain.
    public let index: Int
    let chain: KalmanChain<Scalar>
    /// γ.
    public var scale: Tensor<Scalar>
    /// β.
    public var offset: Tensor<Scalar>
    /// A, `[C_k, C_{k−1}]`.
    public var transition: Tensor<Scalar>
    /// q, `[C_k]`; the gain is sigmoid(q).
    public var gainLogits: Tensor<Scalar>
    /// Running corrected mean and variance.
    public var runningMean: [Double]
    /// Running corrected variance.
    public var runningVariance: [Double]
    /// The rule of the running estimates: PyTorch's default `r ← 0.9·r + 0.1·s` (no batch
    /// counter is saved, so only the exponential rule is meaningful).
    var runningAverage = RunningAverage(momentum: .pytorchDefault)

    /// Creates the next layer of `chain`.
    public init(channelCount: Int, chain: KalmanChain<Scalar>, epsilon: Double = 1e-5) throws {
        try HyperparameterCheck.epsilon(epsilon)
        self.channelCount = channelCount
        self.previousChannels = chain.channels.last ?? 0
        self.epsilon = epsilon
        self.chain = chain
        index = chain.register(channels: channelCount)
        scale = try Tensor(repeating: 1, shape: [channelCount])
        offset = try Tensor(zeros: [channelCount])
        var a = try Tensor<Scalar>(zeros: [channelCount, max(previousChannels, 1)])
        for i in 0..<min(channelCount, previousChannels) { a[i, i] = 1 }
        transition = a
        gainLogits = try Tensor(repeating: -2, shape: [channelCount])
        runningMean = [Double](repeating: 0, count: channelCount)
        runningVariance = [Double](repeating: 1, count: channelCount)
    }

    /// What forward keeps for backward.
    public struct Cache {
        let x: Tensor<Scalar>
        let plan: ReductionPlan
        /// The statistics used: the propagated source's in training, the running estimates as
        /// constants in inference.
        let statistics: SourcedStatistics
        /// The previous layer's estimates the prediction was made from (training, not the first
        /// layer).
        let previous: (mean: [Double], variance: [Double])?
        let gain: [Double]
        let training: Bool
        /// An empty batch: backward returns an empty dx and zero gradients.
        var isEmptyBatch = false
    }

    /// Gradients of the layer's own parameters.
    public struct Gradients {
        /// dL/dx.
        public var input: Tensor<Scalar>
        /// dL/dγ.
        public var scale: Tensor<Scalar>
        /// dL/dβ.
        public var offset: Tensor<Scalar>
        /// dL/dA.
        public var transition: Tensor<Scalar>
        /// dL/dq.
        public var gainLogits: Tensor<Scalar>
    }

    func indexing(_ shape: [Int]) -> ParameterIndexing {
        ParameterIndexing(divisor: Shape.strides(shape)[1], modulus: channelCount)
    }

    /// Normalizes x with the filtered statistics and records them for the next layer.
    ///
    /// Training runs the seam with ``StatisticsSource/propagated(_:)``: this layer's prediction
    /// from the previous layer's estimates, combined with the batch's moments. Inference uses
    /// the running estimates as ``StatisticsSource/fixed(mean:rstd:)`` constants.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        guard x.rank >= 2, x.shape[1] == channelCount else {
            throw NormError.channelMismatch(
                layer: "KalmanNorm", expected: channelCount, actual: x.rank >= 2 ? x.shape[1] : 0,
                shape: x.shape)
        }
        if x.count == 0 { return try forwardEmptyBatch(x, mode: mode) }
        let plan = try Normalizer.Partition.batch.plan(for: x.shape, layout: .channelsFirst)
        let op = operation
        let training = mode == .training
        if training && plan.setSize < 2 {
            throw NormError.singleValuePerStatistic(layer: "KalmanNorm", shape: x.shape)
        }
        let gain = gainLogits.scalars.map { 1 / (1 + exp(-Double($0))) }
        let previous = index > 0 ? chain.estimates[index - 1] : nil
        let statistics: SourcedStatistics
        if training {
            let batch = StatisticsReduction.local.partialMoments(
                x, plan: plan, operation: op, kernels: .automatic, indexing: indexing(x.shape))
            let prediction = previous.map { predict(from: $0, gain: gain) }
            statistics = try StatisticsSource.propagated(prediction).resolve(
                batch, operation: op, layer: "KalmanNorm")
            let variance = statistics.propagatedVariance!
            chain.estimates[index] = (statistics.mean, variance)
            let f = runningAverage.advance(countingEveryBatch: false)
            runningMean = RunningAverage.blend(runningMean, toward: statistics.mean, weightOfNew: f)
            runningVariance = RunningAverage.blend(
                runningVariance, toward: variance, weightOfNew: f)
        } else {
            statistics = try StatisticsSource.fixed(
                mean: runningMean,
                rstd: SourcedStatistics.reciprocalStandardDeviation(
                    variance: runningVariance, epsilon: epsilon)
            ).resolve(nil, operation: op, layer: "KalmanNorm")
        }
        var y = try Tensor<Scalar>(zeros: x.shape)
        try statistics.apply(
            x, plan: plan, kernels: .automatic, scale: scale, offset: offset,
            indexing: indexing(x.shape), into: &y)
        return (
            y,
            Cache(
                x: x, plan: plan, statistics: statistics, previous: previous, gain: gain,
                training: training)
        )
    }

    /// The prediction through the transition A (diagonal covariances):
    /// `μ⁻ = A μ_prev`, `σ²⁻_c = Σ_j A²_cj σ²_prev,j`.
    func predict(from previous: (mean: [Double], variance: [Double]), gain: [Double])
        -> KalmanPrediction
    {
        let a = transition.scalars.map(Double.init)
        let cp = previousChannels
        var mean = [Double](repeating: 0, count: channelCount)
        var variance = [Double](repeating: 0, count: channelCount)
        for i in 0..<channelCount {
            for j in 0..<cp {
                mean[i] += a[i * cp + j] * previous.mean[j]
                variance[i] += a[i * cp + j] * a[i * cp + j] * previous.variance[j]
            }
        }
        return KalmanPrediction(mean: mean, variance: variance, gain: gain)
    }

    /// An empty batch (N = 0), as PyTorch's BatchNorm treats one.
    ///
    /// An empty output of the input's shape and the running estimates untouched. In training
    /// the layer passes no estimate down the chain for this call (the next layer, whose batch
    /// is empty too in a sequential network, would otherwise see the previous call's). A
    /// zero-size axis other than the batch axis with N > 0 is refused with
    /// ``NormError/emptyTensor(layer:shape:)``.
    private func forwardEmptyBatch(_ x: Tensor<Scalar>, mode: Mode) throws -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        guard x.shape[0] == 0 else {
            throw NormError.emptyTensor(layer: "KalmanNorm", shape: x.shape)
        }
        let training = mode == .training
        if training { chain.estimates[index] = nil }
        let cache = Cache(
            x: x,
            plan: ReductionPlan(
                viewShape: x.shape, reduced: [Bool](repeating: false, count: x.rank)),
            statistics: .empty(setCount: channelCount, mean: runningMean), previous: nil,
            gain: [Double](repeating: 0, count: channelCount), training: training,
            isEmptyBatch: true)
        return (try Tensor(zeros: x.shape), cache)
    }

    /// Back-propagates into x, γ, β, A, q, and deposits dL/d(previous estimates) in the chain.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws -> Gradients {
        let c = channelCount
        let x = cache.x
        guard dy.shape == x.shape else {
            throw NormError.gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        if cache.isEmptyBatch {
            // The loss does not depend on an empty output: every gradient is zero, and a
            // gradient the next layer left for this one's estimates has nowhere to go.
            if cache.training { chain.downstream[index] = nil }
            return Gradients(
                input: try Tensor(zeros: x.shape), scale: try Tensor(zeros: [c]),
                offset: try Tensor(zeros: [c]), transition: try Tensor(zeros: transition.shape),
                gainLogits: try Tensor(zeros: [c]))
        }
        var dx = try Tensor<Scalar>(zeros: x.shape)
        guard cache.training else {
            // Inference: constant statistics.
            let sums = try cache.statistics.backward(
                x, outputGradient: dy, plan: cache.plan, operation: operation,
                kernels: .automatic, reduction: .local, scale: scale, indexing: indexing(x.shape),
                validate: {}, layer: "KalmanNorm", into: &dx)
            return Gradients(
                input: dx, scale: try Tensor(shape: [c], rounding: sums.scale),
                offset: try Tensor(shape: [c], rounding: sums.offset),
                transition: try Tensor(zeros: transition.shape), gainLogits: try Tensor(zeros: [c]))
        }
        // The next layer's gradient with respect to this layer's estimates joins the source's
        // backward (through the combination into x, the prediction and the gain).
        let incoming = chain.downstream[index]
        chain.downstream[index] = nil
        let sums = try cache.statistics.backward(
            x, outputGradient: dy, plan: cache.plan, operation: operation, kernels: .automatic,
            reduction: .local, scale: scale, indexing: indexing(x.shape),
            statisticsGradient: incoming.map {
                StatisticsGradient(mean: $0.mean, variance: $0.variance)
            }, validate: {}, layer: "KalmanNorm", into: &dx)
        var dTransition = [Double](repeating: 0, count: transition.count)
        var dq = [Double](repeating: 0, count: c)
        if let previous = cache.previous, index > 0, let dPrediction = sums.prediction {
            for i in 0..<c {
                let p = cache.gain[i]
                dq[i] = dPrediction.gain[i] * p * (1 - p)
            }
            // Through μ⁻ = A μ_prev and σ²⁻ = A² σ²_prev into A and the previous estimates.
            let cp = previousChannels
            let a = transition.scalars.map(Double.init)
            let dPredMean = dPrediction.prediction.mean
            let dPredVar = dPrediction.prediction.variance
            var dPrevMean = [Double](repeating: 0, count: cp)
            var dPrevVar = [Double](repeating: 0, count: cp)
            for i in 0..<c {
                for j in 0..<cp {
                    let aij = a[i * cp + j]
                    dTransition[i * cp + j] +=
                        dPredMean[i] * previous.mean[j]
                        + 2 * aij * previous.variance[j] * dPredVar[i]
                    dPrevMean[j] += aij * dPredMean[i]
                    dPrevVar[j] += aij * aij * dPredVar[i]
                }
            }
            if let existing = chain.downstream[index - 1] {
                var sumMean = existing.mean
                var sumVar = existing.variance
                for j in 0..<cp {
                    sumMean[j] += dPrevMean[j]
                    sumVar[j] += dPrevVar[j]
                }
                chain.downstream[index - 1] = (sumMean, sumVar)
            } else {
                chain.downstream[index - 1] = (dPrevMean, dPrevVar)
            }
        }
        return Gradients(
            input: dx, scale: try Tensor(shape: [c], rounding: sums.scale),
            offset: try Tensor(shape: [c], rounding: sums.offset),
            transition: try Tensor(shape: transition.shape, rounding: dTransition),
            gainLogits: try Tensor(shape: [c], rounding: dq))
    }

    /// Standardization with ε: the operation every Kalman layer normalizes with.
    var operation: ReferenceNormKernel.Operation {
        ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: epsilon)
    }
}
