import Foundation
import NormKernels
import TensorCore

/// Batch Renormalization: BatchNorm whose training output is corrected towards the moving
/// statistics, so that training and inference compute the same function.
///
/// ```
/// σ_B = √(σ²_B + ε),  r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((μ_B − μ)/σ, −d_max, d_max)
/// y = γ · ((x − μ_B)/σ_B · r + d) + β          (training; r and d are constants for gradients)
/// y = γ · (x − μ)/σ + β                         (inference)
/// μ ← μ + α(μ_B − μ),  σ ← σ + α(σ_B − σ)       (the paper tracks σ with ε inside)
/// ```
/// μ and σ are the moving mean and standard deviation *before* this batch's update (the paper's
/// Algorithm 1). With r_max = 1 and d_max = 0 this is BatchNorm (with the moving σ, not the
/// unbiased variance). The limits follow a ``Limits`` schedule over training steps.
///
/// Buffers: `running_mean` and `running_std` (σ, ε included; initially 0 and 1) and
/// `num_batches_tracked` (the step of the schedule). The Keras realisation keeps a variance and
/// separate renorm moments; this is the paper's form.
///
/// ## Shape
/// Input `[N, C, …]` (or channels-last); output the same; parameters and buffers `[C]`.
///
/// ## References
/// 1. Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
///    Batch-Normalized Models", arXiv:1702.03275.
public final class BatchRenorm<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// r_max and d_max as functions of the training step.
    public enum Limits: Sendable, Hashable {
        /// Constant limits.
        case fixed(rMax: Double, dMax: Double)
        /// BatchNorm (r_max = 1, d_max = 0) for `warmup` steps, then linear ramps reaching
        /// `rMax` after `rMaxSteps` and `dMax` after `dMaxSteps` (counted from step 0).
        case linear(warmup: Int, rMax: Double, rMaxSteps: Int, dMax: Double, dMaxSteps: Int)

        /// The paper's Inception schedule: r_max = 1 and d_max = 0 for 5,000 steps, reaching
        /// r_max = 3 at 40k steps and d_max = 5 at 25k (the ramp's shape is not given; linear).
        public static var paper: Limits {
            .linear(warmup: 5000, rMax: 3, rMaxSteps: 40000, dMax: 5, dMaxSteps: 25000)
        }

        /// (r_max, d_max) at a step.
        public func values(atStep t: Int) -> (rMax: Double, dMax: Double) {
            switch self {
            case .fixed(let r, let d):
                return (r, d)
            case .linear(let warmup, let rMax, let rSteps, let dMax, let dSteps):
                func ramp(_ end: Int) -> Double {
                    guard end > warmup else { return t >= warmup ? 1 : 0 }
                    return min(max(Double(t - warmup) / Double(end - warmup), 0), 1)
                }
                return (1 + (rMax - 1) * ramp(rSteps), dMax * ramp(dSteps))
            }
        }
    }

    /// C.
    public let channelCount: Int
    /// ε inside σ_B.
    public let epsilon: Double
    /// Channel axis.
    public let layout: Layout
    /// α, the weight of the new batch in the moving statistics.
    public var momentum: Momentum
    /// The r_max, d_max schedule.
    public var limits: Limits
    /// γ (`weight`).
    public var scale: Tensor<Scalar>
    /// β (`bias`).
    public var offset: Tensor<Scalar>
    /// μ (`running_mean`).
    public var runningMean: Tensor<Scalar>
    /// σ with ε inside (`running_std`).
    public var runningStandardDeviation: Tensor<Scalar>
    /// Training steps taken (`num_batches_tracked`), the schedule's clock.
    public var step = 0
    /// Kernels.
    public var kernels = KernelChoice.automatic
    /// Synchronizes the batch statistics over these processes in training.
    ///
    /// μ_B and σ_B are those of the
    /// batch formed by every rank's batch (all-gathered (count, μ, M2), merged with Chan's
    /// formula), and one all-reduce of the 2·C gradient sums in backward; r, d and the moving
    /// statistics are then the same on every rank.
    public var communicator: (any Communicator)?

    /// Creates a Batch Renormalization layer.
    /// - Parameters:
    ///   - momentum: α as `.exponential(weightOfNew: α)` (0.01 = Keras's renorm_momentum 0.99).
    ///   - limits: r_max and d_max over training.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, epsilon: Double = 1e-5,
        momentum: Momentum = .exponential(weightOfNew: 0.01),
        limits: Limits = .fixed(rMax: 3, dMax: 5), layout: Layout = .channelsFirst
    ) throws(NormError) {
        guard channelCount >= 1 else {
            throw .invalidHyperparameter(
                name: "channel count", value: "\(channelCount)", requirement: "must be ≥ 1")
        }
        guard epsilon > 0, epsilon.isFinite else {
            throw .invalidHyperparameter(
                name: "epsilon", value: "\(epsilon)", requirement: "must be finite and > 0")
        }
        try momentum.validate()
        if case .fixed(let r, let d) = limits, !(r >= 1 && d >= 0) {
            throw .invalidHyperparameter(
                name: "r_max, d_max", value: "\(r), \(d)",
                requirement: "need r_max ≥ 1 and d_max ≥ 0")
        }
        self.channelCount = channelCount
        self.epsilon = epsilon
        self.momentum = momentum
        self.limits = limits
        self.layout = layout
        do {
            scale = try Tensor(repeating: 1, shape: [channelCount])
            offset = try Tensor(zeros: [channelCount])
            runningMean = try Tensor(zeros: [channelCount])
            runningStandardDeviation = try Tensor(repeating: 1, shape: [channelCount])
        } catch { throw .tensor(error) }
    }

    /// What forward keeps for backward.
    public struct Cache: Sendable {
        let input: Tensor<Scalar>
        let plan: ReductionPlan
        let batchMean: [Double]
        let batchStandardDeviation: [Double]
        /// r per channel (1 in inference).
        public let r: [Double]
        /// d per channel (0 in inference).
        public let d: [Double]
        let isTraining: Bool
        /// Values per channel behind μ_B, σ_B (every rank's when synchronized).
        var count = 0
        /// An unsynchronized empty batch: backward returns an empty dx and zero gradients.
        var isEmptyBatch = false
    }

    /// Normalizes `x`; in training mode corrects by r, d and moves the running statistics.
    /// - Throws: ``NormError`` (wrong rank or channels, a single value per channel in training,
    ///   non-finite statistics); nothing changes then.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws(NormError) -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        let synchronizing = mode == .training ? communicator : nil
        // A synchronized rank with no samples still takes part in the collective calls below.
        if x.count == 0, synchronizing == nil { return try forwardEmptyBatch(x, mode: mode) }
        let validated = Result { () throws(NormError) in
            try validatedPlan(x, allowingEmptyBatch: synchronizing != nil)
        }
        if case .failure(let error) = validated, let synchronizing {
            // The other ranks are about to exchange statistics: tell them, then fail.
            _ = try? Moments.allGathered(.failure(error), over: synchronizing)
        }
        let plan = try validated.get()
        let indexing = parameterIndexing(x.shape)
        let c = channelCount
        var mean = [Double](repeating: 0, count: c)
        var rstd = [Double](repeating: 0, count: c)
        var cache: Cache
        if mode == .training {
            let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: epsilon)
            let zero = [Double](repeating: 0, count: c)
            var m =
                x.count > 0
                ? kernels.moments(x, plan: plan, operation: op, indexing: indexing)
                : FastNormKernel.Statistics(
                    mean: zero, variance: zero, biasedVariance: zero, rstd: zero)
            var count = plan.setSize
            if let synchronizing {
                let local = Moments(
                    mean: m.mean, biasedVariance: m.biasedVariance, count: plan.setSize)
                let global = try Moments.allGathered(.success(local), over: synchronizing)
                count = global.count.first ?? 0
                m.mean = global.mean
                m.biasedVariance = global.biasedVariance
            }
            guard count > 1 else {
                throw count == 0
                    ? .emptyTensor(layer: "BatchRenorm", shape: x.shape)
                    : .singleValuePerStatistic(layer: "BatchRenorm", shape: x.shape)
            }
            guard m.mean.allSatisfy(\.isFinite), m.biasedVariance.allSatisfy(\.isFinite) else {
                throw .nonFiniteStatistics(layer: "BatchRenorm")
            }
            let (rMax, dMax) = limits.values(atStep: step)
            var r = [Double](repeating: 1, count: c)
            var d = [Double](repeating: 0, count: c)
            var sigmaB = [Double](repeating: 0, count: c)
            for j in 0..<c {
                sigmaB[j] = (m.biasedVariance[j] + epsilon).squareRoot()
                let mu = Double(runningMean.scalars[j])
                let sigma = Double(runningStandardDeviation.scalars[j])
                r[j] = min(max(sigmaB[j] / sigma, 1 / rMax), rMax)
                d[j] = min(max((m.mean[j] - mu) / sigma, -dMax), dMax)
                // (x − μ_B)/σ_B·r + d = (x − (μ_B − d·σ_B/r))·(r/σ_B).
                mean[j] = m.mean[j] - d[j] * sigmaB[j] / r[j]
                rstd[j] = r[j] / sigmaB[j]
            }
            cache = Cache(
                input: x, plan: plan, batchMean: m.mean, batchStandardDeviation: sigmaB, r: r, d: d,
                isTraining: true, count: count)
            // Moving statistics with the pre-update values already used above.
            let f = momentum.weightOfNew(batchesTracked: step.addingSaturated(1))
            var newMean = runningMean.scalars.map(Double.init)
            var newSigma = runningStandardDeviation.scalars.map(Double.init)
            for j in 0..<c {
                newMean[j] += f * (m.mean[j] - newMean[j])
                newSigma[j] += f * (sigmaB[j] - newSigma[j])
            }
            do {
                runningMean = try Tensor(shape: [c], rounding: newMean)
                runningStandardDeviation = try Tensor(shape: [c], rounding: newSigma)
            } catch { throw .tensor(error) }
            step = step.addingSaturated(1)
        } else {
            for j in 0..<c {
                mean[j] = Double(runningMean.scalars[j])
                rstd[j] = 1 / Double(runningStandardDeviation.scalars[j])
            }
            cache = Cache(
                input: x, plan: plan, batchMean: mean, batchStandardDeviation: rstd.map { 1 / $0 },
                r: [Double](repeating: 1, count: c), d: [Double](repeating: 0, count: c),
                isTraining: false)
        }
        var y: Tensor<Scalar>
        do { y = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        if x.count > 0 {
            y.withUnsafeMutableBufferPointer { yb in
                kernels.forward(
                    x, plan: plan, mean: mean, rstd: rstd, scale: scale, offset: offset,
                    indexing: indexing, into: yb)
            }
        }
        return (y, cache)
    }

    /// An empty batch (N = 0) as PyTorch's BatchNorm treats one.
    ///
    /// An empty output of the input's shape, the moving statistics untouched, and in training
    /// the step (`num_batches_tracked`) counted, as PyTorch's module counts an empty batch. A
    /// zero-size axis other than the batch axis with N > 0 is refused with
    /// ``NormError/emptyTensor(layer:shape:)``.
    private func forwardEmptyBatch(_ x: Tensor<Scalar>, mode: Mode) throws(NormError) -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        try validateChannels(x)
        guard x.shape[0] == 0 else { throw .emptyTensor(layer: "BatchRenorm", shape: x.shape) }
        if mode == .training { step = step.addingSaturated(1) }
        let c = channelCount
        let y: Tensor<Scalar>
        do { y = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        let cache = Cache(
            input: x,
            plan: ReductionPlan(
                viewShape: x.shape, reduced: [Bool](repeating: false, count: x.rank)),
            batchMean: [Double](repeating: 0, count: c),
            batchStandardDeviation: [Double](repeating: 1, count: c),
            r: [Double](repeating: 1, count: c), d: [Double](repeating: 0, count: c),
            isTraining: mode == .training, isEmptyBatch: true)
        return (y, cache)
    }

    /// Gradients of a scalar loss.
    public struct Gradients: Sendable {
        /// dL/dx.
        public var input: Tensor<Scalar>
        /// dL/dγ.
        public var scale: Tensor<Scalar>
        /// dL/dβ.
        public var offset: Tensor<Scalar>
    }

    /// Back-propagates with r and d constant (the paper's definition).
    ///
    /// With g = γ·r·dy and x̂_B = (x − μ_B)/σ_B, per channel over its m values:
    /// `dx = (1/σ_B)·(g − mean(g) − x̂_B·mean(g·x̂_B))`, `dγ = Σ dy·(r·x̂_B + d)`, `dβ = Σ dy`;
    /// in inference `dx = γ·dy/σ`.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws(NormError) -> Gradients {
        let x = cache.input
        guard dy.shape == x.shape else {
            throw .gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let c = channelCount
        if cache.isEmptyBatch {
            do {
                return Gradients(
                    input: try Tensor(zeros: x.shape), scale: try Tensor(zeros: [c]),
                    offset: try Tensor(zeros: [c]))
            } catch { throw .tensor(error) }
        }
        let indexing = parameterIndexing(x.shape)
        let sigma = cache.batchStandardDeviation
        var sums = kernels.gradientSums(
            x, outputGradient: dy, plan: cache.plan, mean: cache.batchMean,
            rstd: sigma.map { 1 / $0 }, scale: scale,
            indexing: indexing)
        var m = Double(cache.plan.setSize)
        if cache.isTraining, let communicator {
            // Σg and Σg·(x − μ_B) over every rank; dγ and dβ stay local.
            let all = try Collective.allReduceSum(
                .success(sums.sumG + sums.sumGD), length: 2 * c,
                operation: "BatchRenorm backward", over: communicator)
            sums.sumG = Array(all[0..<c])
            sums.sumGD = Array(all[c...])
            m = Double(cache.count)
        }
        var a = [Double](repeating: 0, count: c)
        var b = a
        var cc = a
        var dScale = a
        for j in 0..<c {
            let r = cache.r[j]
            if cache.isTraining {
                let sumG = r * sums.sumG[j]
                let sumGD = r * sums.sumGD[j]
                a[j] = r / sigma[j]
                b[j] = -sumGD / (sigma[j] * sigma[j] * sigma[j] * m)
                cc[j] = -sumG / (sigma[j] * m)
            } else {
                a[j] = 1 / sigma[j]
            }
            dScale[j] = r * sums.scaleGradient[j] + cache.d[j] * sums.offsetGradient[j]
        }
        var dx: Tensor<Scalar>
        do { dx = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        if x.count > 0 {
            dx.withUnsafeMutableBufferPointer { dxb in
                kernels.applyGradient(
                    x, outputGradient: dy, plan: cache.plan, mean: cache.batchMean, a: a, b: b,
                    c: cc, scale: scale, indexing: indexing, into: dxb)
            }
        }
        do {
            return Gradients(
                input: dx, scale: try Tensor(shape: [c], rounding: dScale),
                offset: try Tensor(shape: [c], rounding: sums.offsetGradient))
        } catch { throw .tensor(error) }
    }

    /// Parameters and buffers by name (`weight`, `bias`, `running_mean`, `running_std`).
    func stateDictionary() -> [String: Tensor<Scalar>] {
        [
            "weight": scale, "bias": offset, "running_mean": runningMean,
            "running_std": runningStandardDeviation,
        ]
    }

    /// Loads parameters and buffers by name.
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)``; nothing is loaded then.
    public func load(_ tensors: [String: Tensor<Scalar>], step: Int? = nil) throws(NormError) {
        if let step, step < 0 {
            throw .invalidHyperparameter(
                name: "num_batches_tracked", value: "\(step)", requirement: "must be ≥ 0")
        }
        if let std = tensors["running_std"] {
            try HyperparameterCheck.runningVariance(std, name: "running_std")
        }
        for (key, value) in tensors {
            guard ["weight", "bias", "running_mean", "running_std"].contains(key),
                value.shape == [channelCount]
            else {
                throw .parameterShapeMismatch(
                    name: key, expected: [channelCount], actual: value.shape)
            }
        }
        if let t = tensors["weight"] { scale = t }
        if let t = tensors["bias"] { offset = t }
        if let t = tensors["running_mean"] { runningMean = t }
        if let t = tensors["running_std"] { runningStandardDeviation = t }
        if let step { self.step = step }
    }

    func validatedPlan(_ x: Tensor<Scalar>, allowingEmptyBatch: Bool = false) throws(NormError)
        -> ReductionPlan
    {
        // A synchronized rank may hold no samples; every other axis must be non-empty.
        guard
            x.count > 0
                || (allowingEmptyBatch && x.rank >= 2 && x.shape[0] == 0
                    && x.shape.dropFirst().allSatisfy({ $0 > 0 }))
        else { throw .emptyTensor(layer: "BatchRenorm", shape: x.shape) }
        try validateChannels(x)
        return try Normalizer.Partition.batch.plan(for: x.shape, layout: layout)
    }

    /// The rank, the channel count and the parameter and buffer shapes an input must match.
    func validateChannels(_ x: Tensor<Scalar>) throws(NormError) {
        guard x.rank >= 2 else {
            throw .invalidRank(layer: "BatchRenorm", expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
        }
        let axis = layout.channelAxis(rank: x.rank)
        guard x.shape[axis] == channelCount else {
            throw .channelMismatch(
                layer: "BatchRenorm", expected: channelCount, actual: x.shape[axis], shape: x.shape)
        }
        for (label, t) in stateDictionary() where t.shape != [channelCount] {
            throw .parameterShapeMismatch(name: label, expected: [channelCount], actual: t.shape)
        }
    }

    func parameterIndexing(_ shape: [Int]) -> ParameterIndexing {
        ParameterIndexing(
            divisor: Shape.strides(shape)[layout.channelAxis(rank: shape.count)],
            modulus: channelCount)
    }

    /// One line with the configuration.
    public var description: String {
        "BatchRenorm(\(channelCount), eps=\(epsilon), \(momentum), limits=\(limits), layout=\(layout))"
    }
}
