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
/// μ ← (1 − α)μ + αμ_B,  σ ← (1 − α)σ + ασ_B     (the paper tracks σ with ε inside)
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
        /// The statistics used: the renormalized source's in training (r, d, μ_B, σ_B), the
        /// moving ones as constants in inference.
        let statistics: SourcedStatistics
        /// An unsynchronized empty batch: backward returns an empty dx and zero gradients.
        var isEmptyBatch = false

        /// r per channel (1 in inference).
        public var r: [Double] {
            statistics.renormalization?.r
                ?? [Double](repeating: 1, count: statistics.mean.count)
        }
        /// d per channel (0 in inference).
        public var d: [Double] {
            statistics.renormalization?.d
                ?? [Double](repeating: 0, count: statistics.mean.count)
        }
    }

    /// Normalizes `x`; in training mode corrects by r, d and moves the running statistics.
    ///
    /// Training runs the seam with ``StatisticsSource/renormalized(_:_:)`` (over every rank's
    /// batch when ``communicator`` is set); inference normalizes with the moving statistics as
    /// ``StatisticsSource/fixed(mean:rstd:)`` constants.
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
        let indexing = parameterIndexing(x.shape)
        let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: epsilon)
        let mu = runningMean.scalars.map(Double.init)
        let sigma = runningStandardDeviation.scalars.map(Double.init)
        let statistics: SourcedStatistics
        if mode == .training {
            let reduction = synchronizing.map { StatisticsReduction.allReduced($0) } ?? .local
            // A rank whose input is wrong still takes part in the exchange and tells the others.
            let local = validated.map { plan in
                reduction.partialMoments(
                    x, plan: plan, operation: op, kernels: kernels, indexing: indexing)
            }
            let batch = try reduction.reduce(local, operation: op, layer: "BatchRenorm")
            try batch.validate(minimumCount: 2, layer: "BatchRenorm", shape: x.shape)
            let (rMax, dMax) = limits.values(atStep: step)
            let source = StatisticsSource.renormalized(
                Renormalization(
                    runningMean: mu, runningStandardDeviation: sigma, rMax: rMax, dMax: dMax,
                    epsilon: epsilon), reduction)
            statistics = try source.resolve(batch, operation: op, layer: "BatchRenorm")
            // Moving statistics with the pre-update values already used above.
            // (RunningAverage's (1 − f)·r + f·s; the paper writes r + f·(s − r), the same value
            // up to the last bit of the Double before rounding to Scalar.)
            var average = RunningAverage(momentum: momentum, batchesTracked: step)
            let f = average.advance()
            let newMean = RunningAverage.blend(mu, toward: batch.statistics.mean, weightOfNew: f)
            let newSigma = RunningAverage.blend(
                sigma, toward: statistics.renormalization!.batchStandardDeviation, weightOfNew: f)
            do {
                runningMean = try Tensor(shape: [channelCount], rounding: newMean)
                runningStandardDeviation = try Tensor(shape: [channelCount], rounding: newSigma)
            } catch { throw .tensor(error) }
            step = average.batchesTracked
        } else {
            _ = try validated.get()
            statistics = try StatisticsSource.fixed(mean: mu, rstd: sigma.map { 1 / $0 })
                .resolve(nil, operation: op, layer: "BatchRenorm")
        }
        let plan = try validated.get()
        var y: Tensor<Scalar>
        do { y = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        try statistics.apply(
            x, plan: plan, kernels: kernels, scale: scale, offset: offset, indexing: indexing,
            into: &y)
        return (y, Cache(input: x, plan: plan, statistics: statistics))
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
        if mode == .training {
            var average = RunningAverage(momentum: momentum, batchesTracked: step)
            average.countEmptyBatch()
            step = average.batchesTracked
        }
        let y: Tensor<Scalar>
        do { y = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        let cache = Cache(
            input: x,
            plan: ReductionPlan(
                viewShape: x.shape, reduced: [Bool](repeating: false, count: x.rank)),
            statistics: .empty(setCount: channelCount), isEmptyBatch: true)
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
    /// in inference `dx = γ·dy/σ`. The rules are the sources' (``Renormalization``,
    /// ``StatisticsSource/fixed(mean:rstd:)``); synchronized statistics all-reduce the 2·C sums
    /// Σg, Σg·(x − μ_B) and keep dγ, dβ local.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws(NormError) -> Gradients {
        let x = cache.input
        let statistics = cache.statistics
        let validate = { () throws(NormError) in
            guard dy.shape == x.shape else {
                throw .gradientShapeMismatch(expected: x.shape, actual: dy.shape)
            }
        }
        let reduction = try statistics.backwardReduction(over: communicator)
        if !reduction.isAllReduced { try validate() }
        let c = channelCount
        if cache.isEmptyBatch {
            do {
                return Gradients(
                    input: try Tensor(zeros: x.shape), scale: try Tensor(zeros: [c]),
                    offset: try Tensor(zeros: [c]))
            } catch { throw .tensor(error) }
        }
        var dx: Tensor<Scalar>
        do { dx = try Tensor(zeros: [0]) } catch { throw .tensor(error) }
        let sums = try statistics.backward(
            x, outputGradient: dy, plan: cache.plan,
            operation: ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: epsilon),
            kernels: kernels, reduction: reduction, scale: scale,
            indexing: parameterIndexing(x.shape), validate: validate, layer: "BatchRenorm",
            into: &dx)
        do {
            return Gradients(
                input: dx, scale: try Tensor(shape: [c], rounding: sums.scale),
                offset: try Tensor(shape: [c], rounding: sums.offset))
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
    /// - Throws: ``NormError/unknownParameter(layer:key:known:)``,
    ///   ``NormError/parameterShapeMismatch(name:expected:actual:)``; nothing is loaded then.
    public func load(_ tensors: [String: Tensor<Scalar>], step: Int? = nil) throws(NormError) {
        if let step, step < 0 {
            throw .invalidHyperparameter(
                name: "num_batches_tracked", value: "\(step)", requirement: "must be ≥ 0")
        }
        if let std = tensors["running_std"] {
            try HyperparameterCheck.runningVariance(std, name: "running_std")
        }
        let known = ["bias", "running_mean", "running_std", "weight"]
        for key in tensors.keys.sorted() where !known.contains(key) {
            throw .unknownParameter(layer: "BatchRenorm", key: key, known: known)
        }
        for (key, value) in tensors {
            guard value.shape == [channelCount] else {
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
