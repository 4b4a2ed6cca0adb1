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
        let batchMean: [Double]
        let batchVariance: [Double]
        let mean: [Double]
        let rstd: [Double]
        let predictedMean: [Double]
        let predictedVariance: [Double]
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
        let c = channelCount
        let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: epsilon)
        let training = mode == .training
        if training && plan.setSize < 2 {
            throw NormError.singleValuePerStatistic(layer: "KalmanNorm", shape: x.shape)
        }
        var batchMean = [Double](repeating: 0, count: c)
        var batchVariance = [Double](repeating: 0, count: c)
        var mean = runningMean
        var variance = runningVariance
        var predictedMean = [Double](repeating: 0, count: c)
        var predictedVariance = [Double](repeating: 0, count: c)
        let gain = gainLogits.scalars.map { 1 / (1 + exp(-Double($0))) }
        let previous = index > 0 ? chain.estimates[index - 1] : nil
        if training {
            let m = KernelChoice.automatic.moments(
                x, plan: plan, operation: op, indexing: indexing(x.shape))
            batchMean = m.mean
            batchVariance = m.biasedVariance
            if let previous {
                let a = transition.scalars.map(Double.init)
                let cp = previousChannels
                for i in 0..<c {
                    for j in 0..<cp {
                        predictedMean[i] += a[i * cp + j] * previous.mean[j]
                        predictedVariance[i] += a[i * cp + j] * a[i * cp + j] * previous.variance[j]
                    }
                    let p = gain[i]
                    let delta = batchMean[i] - predictedMean[i]
                    mean[i] = p * predictedMean[i] + (1 - p) * batchMean[i]
                    variance[i] =
                        p * predictedVariance[i] + (1 - p) * batchVariance[i] + p * (1 - p) * delta
                        * delta
                }
            } else {
                mean = batchMean
                variance = batchVariance
            }
            guard mean.allSatisfy(\.isFinite), variance.allSatisfy(\.isFinite) else {
                throw NormError.nonFiniteStatistics(layer: "KalmanNorm")
            }
            chain.estimates[index] = (mean, variance)
            for i in 0..<c {
                runningMean[i] = 0.9 * runningMean[i] + 0.1 * mean[i]
                runningVariance[i] = 0.9 * runningVariance[i] + 0.1 * variance[i]
            }
        }
        // ε = 0 and a zero variance (a constant channel): x̂ = 0, as the other layers define it.
        let rstd = variance.map { v in
            let d = max(v, 0) + epsilon
            return d > 0 ? 1 / d.squareRoot() : 0
        }
        var y = try Tensor<Scalar>(zeros: x.shape)
        y.withUnsafeMutableBufferPointer { yb in
            KernelChoice.automatic.forward(
                x, plan: plan, mean: mean, rstd: rstd, scale: scale, offset: offset,
                indexing: indexing(x.shape), into: yb)
        }
        return (
            y,
            Cache(
                x: x, plan: plan, batchMean: batchMean, batchVariance: batchVariance, mean: mean,
                rstd: rstd,
                predictedMean: predictedMean, predictedVariance: predictedVariance,
                previous: previous, gain: gain,
                training: training)
        )
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
        let c = channelCount
        let none = [Double](repeating: 0, count: c)
        let cache = Cache(
            x: x,
            plan: ReductionPlan(
                viewShape: x.shape, reduced: [Bool](repeating: false, count: x.rank)),
            batchMean: none, batchVariance: none, mean: runningMean,
            rstd: [Double](repeating: 1, count: c), predictedMean: none, predictedVariance: none,
            previous: nil, gain: none, training: training, isEmptyBatch: true)
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
        let sums = KernelChoice.automatic.gradientSums(
            x, outputGradient: dy, plan: cache.plan, mean: cache.mean, rstd: cache.rstd,
            scale: scale,
            indexing: indexing(x.shape))
        var dTransition = [Double](repeating: 0, count: transition.count)
        var dq = [Double](repeating: 0, count: c)
        var dx = try Tensor<Scalar>(zeros: x.shape)
        guard cache.training else {
            // Inference: constant statistics.
            dx.withUnsafeMutableBufferPointer { dxb in
                KernelChoice.automatic.applyGradient(
                    x, outputGradient: dy, plan: cache.plan, mean: cache.mean, a: cache.rstd,
                    b: [Double](repeating: 0, count: c), c: [Double](repeating: 0, count: c),
                    scale: scale,
                    indexing: indexing(x.shape), into: dxb)
            }
            return Gradients(
                input: dx, scale: try Tensor(shape: [c], rounding: sums.scaleGradient),
                offset: try Tensor(shape: [c], rounding: sums.offsetGradient),
                transition: try Tensor(zeros: transition.shape), gainLogits: try Tensor(zeros: [c]))
        }
        let incoming = chain.downstream[index]
        chain.downstream[index] = nil
        let m = Double(cache.plan.setSize)
        var dxbar = [Double](repeating: 0, count: c)
        var dS = [Double](repeating: 0, count: c)
        var dPredMean = [Double](repeating: 0, count: c)
        var dPredVar = [Double](repeating: 0, count: c)
        for i in 0..<c {
            let r = cache.rstd[i]
            var dmu = -r * sums.sumG[i] + (incoming?.mean[i] ?? 0)
            var dvar = -0.5 * r * r * r * sums.sumGD[i] + (incoming?.variance[i] ?? 0)
            if cache.previous == nil {
                dxbar[i] = dmu
                dS[i] = dvar
                continue
            }
            let p = cache.gain[i]
            let delta = cache.batchMean[i] - cache.predictedMean[i]
            var dp = (cache.predictedMean[i] - cache.batchMean[i]) * dmu
            dxbar[i] += (1 - p) * dmu
            dPredMean[i] += p * dmu
            dPredVar[i] += p * dvar
            dS[i] += (1 - p) * dvar
            let dDelta = 2 * p * (1 - p) * delta * dvar
            dxbar[i] += dDelta
            dPredMean[i] -= dDelta
            dp +=
                (cache.predictedVariance[i] - cache.batchVariance[i] + (1 - 2 * p) * delta * delta)
                * dvar
            dq[i] = dp * p * (1 - p)
            dmu = 0
            dvar = 0
        }
        if let previous = cache.previous, index > 0 {
            let cp = previousChannels
            let a = transition.scalars.map(Double.init)
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
        // dx = rstd·g + dS·2(x − x̄)/m + dx̄/m.
        let b = dS.map { 2 * $0 / m }
        let cc = dxbar.map { $0 / m }
        dx.withUnsafeMutableBufferPointer { dxb in
            KernelChoice.automatic.applyGradient(
                x, outputGradient: dy, plan: cache.plan, mean: cache.batchMean, a: cache.rstd, b: b,
                c: cc,
                scale: scale, indexing: indexing(x.shape), into: dxb)
        }
        return Gradients(
            input: dx, scale: try Tensor(shape: [c], rounding: sums.scaleGradient),
            offset: try Tensor(shape: [c], rounding: sums.offsetGradient),
            transition: try Tensor(shape: transition.shape, rounding: dTransition),
            gainLogits: try Tensor(shape: [c], rounding: dq))
    }
}
