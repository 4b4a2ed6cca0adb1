import NormKernels
import TensorCore

// The statistics seam: a training forward is (a) per-set partial moments of this rank's input,
// (b) a reduction (local, or over every rank) and a source that turns the batch's moments into
// the statistics used, and (c) apply, `y = γ·(x − μ)·rstd + β`. Backward mirrors it: per-set
// sums Σg, Σg·(x − μ) (g = dy·γ), the same reduction, and the source's rule that turns the sums
// into `dx = A·g + B·(x − c) + C` per set.

// MARK: - (a) and (b): partial moments and their reduction

/// The per-set moments of a batch: how many elements stand behind each set (every rank's after
/// an all-reduce) and the kernel's mean, variances and rstd.
///
/// These are ``Moments`` (count, μ, M2 = count·biased variance) in the form the kernels produce;
/// locally they pass through unchanged (converting to M2 and back would round), and across ranks
/// they are exchanged as ``Moments`` and merged with Chan's formula.
public struct BatchMoments: Sendable, Equatable {
    /// Elements per set.
    public var count: Int
    /// μ, the operation's variance, the biased variance and 1/√(variance + ε) per set.
    public var statistics: FastNormKernel.Statistics

    /// Moments from a kernel's statistics over sets of `count` elements.
    public init(count: Int, statistics: FastNormKernel.Statistics) {
        self.count = count
        self.statistics = statistics
    }

    /// Refuses a batch with no element per set (``NormError/emptyTensor(layer:shape:)``), fewer
    /// than `minimumCount` (``NormError/singleValuePerStatistic(layer:shape:)``), or non-finite
    /// moments (``NormError/nonFiniteStatistics(layer:)``).
    public func validate(minimumCount: Int, layer: String, shape: [Int]) throws(NormError) {
        guard count > 0 else { throw .emptyTensor(layer: layer, shape: shape) }
        guard count >= minimumCount else {
            throw .singleValuePerStatistic(layer: layer, shape: shape)
        }
        guard statistics.mean.allSatisfy(\.isFinite),
            statistics.biasedVariance.allSatisfy(\.isFinite)
        else { throw .nonFiniteStatistics(layer: layer) }
    }
}

/// Whose batch a statistic is over: this process's, or every rank's of a ``Communicator``.
///
/// Forward reduces per-set partial moments, backward per-set gradient sums; with `.local` both
/// pass through, so a layer's local and synchronized paths are one code path.
public enum StatisticsReduction {
    /// This process's batch is the batch.
    case local
    /// The batch is every rank's batch, one after another: partial moments are all-gathered as
    /// (count, μ, M2) and merged in rank order with Chan's formula (identical on every rank);
    /// gradient sums are all-reduced. Every rank must take part in every call.
    case allReduced(any Communicator)

    /// True for `.allReduced`.
    public var isAllReduced: Bool {
        if case .allReduced = self { return true }
        return false
    }

    /// The operation whose partial moments this reduction merges.
    ///
    /// Locally the layer's own (RMS's E[x²] straight from the kernel). Across ranks always the
    /// centred one: μ and M2 merge exactly, and RMS's E[x²] = M2/n + μ² is formed after the merge.
    public func partialOperation(_ op: ReferenceNormKernel.Operation)
        -> ReferenceNormKernel.Operation
    {
        switch self {
        case .local: return op
        case .allReduced:
            return ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: op.epsilon)
        }
    }

    /// (a) This rank's per-set partial moments of `x` (an empty batch gives count 0).
    public func partialMoments<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, operation op: ReferenceNormKernel.Operation,
        kernels: KernelChoice, indexing: ParameterIndexing?
    ) -> BatchMoments {
        guard x.count > 0 else {
            let zero = [Double](repeating: 0, count: plan.setCount)
            return BatchMoments(
                count: 0,
                statistics: FastNormKernel.Statistics(
                    mean: zero, variance: zero, biasedVariance: zero, rstd: zero))
        }
        return BatchMoments(
            count: plan.setSize,
            statistics: kernels.moments(
                x, plan: plan, operation: partialOperation(op), indexing: indexing))
    }

    /// (b) The batch's moments from this rank's partial ones, for operation `op`.
    ///
    /// - Parameter local: this rank's moments (from ``partialMoments(_:plan:operation:kernels:indexing:)``),
    ///   or the error that stops this rank; across ranks the error is reported to every rank in
    ///   the same exchange, so that none waits for another that has given up.
    /// - Throws: the local error; ``NormError/communication(_:)`` when ranks disagree on the set
    ///   count or the transport fails.
    public func reduce(
        _ local: Result<BatchMoments, NormError>, operation op: ReferenceNormKernel.Operation,
        layer: String
    ) throws(NormError) -> BatchMoments {
        guard case .allReduced(let communicator) = self else { return try local.get() }
        let global = try Moments.allGathered(
            local.map {
                Moments(
                    mean: $0.statistics.mean, biasedVariance: $0.statistics.biasedVariance,
                    count: $0.count)
            }, over: communicator)
        let setCount = try local.get().statistics.mean.count
        guard global.setCount == setCount else {
            throw .communication(
                .mismatchedLengths(
                    operation: "\(layer) statistics", lengths: [setCount, global.setCount]))
        }
        let biased = global.biasedVariance
        let variance: [Double]
        switch (op.centers, op.scales) {
        case (true, _):
            variance = op.unbiased ? global.unbiasedVariance : biased
        case (false, true):
            variance = zip(biased, global.mean).map { $0 + $1 * $1 }
        case (false, false):
            variance = [Double](repeating: 0, count: setCount)
        }
        // The mean stays the batch's (running estimates track it); the source decides whether
        // apply subtracts it.
        return BatchMoments(
            count: global.count.first ?? 0,
            statistics: FastNormKernel.Statistics(
                mean: global.mean, variance: variance, biasedVariance: biased,
                rstd: ReferenceNormKernel.reciprocalStandardDeviation(
                    variance: variance, operation: op)))
    }

    /// (b) for moments already in (count, μ, M2) form (the mixture engine's batch-pooling
    /// blocks): unchanged locally, all-gathered and merged in rank order across ranks.
    /// - Throws: the local error (reported to every rank), communication errors.
    public func merged(_ local: Result<Moments, NormError>) throws(NormError) -> Moments {
        guard case .allReduced(let communicator) = self else { return try local.get() }
        return try Moments.allGathered(local, over: communicator)
    }

    /// (b) of backward: the element-wise sum over ranks of `length` per-set sums (the local
    /// sums themselves for `.local`); a failing rank fails every rank.
    public func reduceSums(
        _ local: Result<[Double], NormError>, length: Int, operation: String
    ) throws(NormError) -> [Double] {
        guard case .allReduced(let communicator) = self else { return try local.get() }
        return try Collective.allReduceSum(
            local, length: length, operation: operation, over: communicator)
    }
}

// MARK: - The source

/// Where the statistics of one forward call come from, between the batch's moments and apply.
///
/// | case | layer | statistics used | gradient through them |
/// |---|---|---|---|
/// | `.batch(.local)` | BatchNorm, LayerNorm, GroupNorm, … | this batch's | yes (fused kernel) |
/// | `.batch(.allReduced)` | SyncBatchNorm | every rank's batch | yes, sums all-reduced |
/// | `.fixed` | inference, frozen statistics | running estimates | no |
/// | `.renormalized` | Batch Renormalization | batch's, corrected by r, d | r, d constant |
/// | `.propagated` | Kalman Normalization | batch's and a prediction | into the prediction |
///
/// An enum, not a protocol: the sources form a small closed set that every layer chooses from
/// per call (training or inference), and the one decision that matters for speed, whether the
/// fused statistics-and-apply kernel may run, is a single `switch` here
/// (``normalize(_:plan:operation:kernels:scale:offset:indexing:into:)``): only the local batch
/// source, whose statistics need nothing but the set in cache, takes it. A protocol would spread
/// that decision over its conformers and dispatch through an existential on every call.
/// (The mixture engine of SN, SSN and MetaNorm keeps its own per-component `.batch`/`.fixed`
/// choice, since it mixes several partitions' statistics; its batch-pooling components reduce
/// through the same ``StatisticsReduction``.)
public enum StatisticsSource {
    /// This batch's statistics, over this process's batch or every rank's.
    case batch(StatisticsReduction)
    /// Given per-set μ and rstd (running estimates in inference, frozen statistics in
    /// fine-tuning): constants for backward.
    case fixed(mean: [Double], rstd: [Double])
    /// The batch's statistics corrected toward moving ones (Batch Renormalization).
    case renormalized(Renormalization, StatisticsReduction)
    /// The batch's statistics combined with a prediction from the previous layer (Kalman
    /// Normalization); nil for the first layer of a chain, which uses the batch's own.
    case propagated(KalmanPrediction?)

    /// Running estimates as constants: μ (0 where Φ does not center) and rstd from the running
    /// variance, for inference and frozen statistics.
    public static func running<Scalar: NormScalar>(
        _ running: RunningStatistics<Scalar>, operation op: ReferenceNormKernel.Operation
    ) -> StatisticsSource {
        let mean =
            op.centers
            ? running.mean.scalars.map(Double.init)
            : [Double](repeating: 0, count: running.mean.count)
        return .fixed(
            mean: mean,
            rstd: ReferenceNormKernel.reciprocalStandardDeviation(
                variance: running.variance.scalars.map(Double.init), operation: op))
    }

    /// The reduction behind the source's batch statistics (`.local` for the others).
    public var reduction: StatisticsReduction {
        switch self {
        case .batch(let r), .renormalized(_, let r): return r
        case .fixed, .propagated: return .local
        }
    }

    /// (b) The statistics used, from the batch's (reduced) moments; `batch` is ignored by
    /// `.fixed`.
    /// - Throws: ``NormError/nonFiniteStatistics(layer:)`` when a corrected or propagated
    ///   statistic is not finite.
    public func resolve(
        _ batch: BatchMoments?, operation op: ReferenceNormKernel.Operation, layer: String
    ) throws(NormError) -> SourcedStatistics {
        if case .fixed(let mean, let rstd) = self {
            try Self.checkLength(rstd.count, of: "rstd", expected: mean.count)
            return SourcedStatistics(mean: mean, rstd: rstd, batch: nil, rule: .constant)
        }
        guard let batch else {
            throw .invalidHyperparameter(
                name: "batch moments", value: "nil",
                requirement: "every source but .fixed needs the batch's moments")
        }
        let setCount = batch.statistics.mean.count
        switch self {
        case .fixed:
            preconditionFailure("Handled above.")
        case .batch(let reduction):
            let s = batch.statistics
            let mean = op.centers ? s.mean : [Double](repeating: 0, count: s.mean.count)
            return SourcedStatistics(
                mean: mean, rstd: s.rstd, batch: batch,
                rule: .batch(allReduced: reduction.isAllReduced))
        case .renormalized(let renormalization, let reduction):
            try Self.checkLength(
                renormalization.runningMean.count, of: "running_mean", expected: setCount)
            try Self.checkLength(
                renormalization.runningStandardDeviation.count, of: "running_std",
                expected: setCount)
            return renormalization.resolve(batch, allReduced: reduction.isAllReduced)
        case .propagated(let prediction):
            if let prediction {
                for (name, values) in [
                    ("predicted mean", prediction.mean),
                    ("predicted variance", prediction.variance),
                    ("gain", prediction.gain),
                ] {
                    try Self.checkLength(values.count, of: name, expected: setCount)
                }
            }
            return try KalmanPrediction.resolve(
                prediction, batch: batch, epsilon: op.epsilon, layer: layer)
        }
    }

    /// Refuses per-set values whose count is not the set count.
    static func checkLength(_ count: Int, of name: String, expected: Int) throws(NormError) {
        guard count == expected else {
            throw .parameterShapeMismatch(name: name, expected: [expected], actual: [count])
        }
    }

    /// One forward call through the seam into `output` (reused when it has x's shape): the
    /// fused kernel for the local batch source (statistics and apply while each set is in
    /// cache, with the rescaled rare path), otherwise (a) the partial moments, (b) reduction and
    /// this source, (c) apply.
    ///
    /// An all-reduced source exchanges the moments here, so every rank must call this together;
    /// a synchronized layer that must report its own input errors to the other ranks validates
    /// and reduces through ``StatisticsReduction/reduce(_:operation:layer:)`` itself, then calls
    /// ``resolve(_:operation:layer:)`` and
    /// ``SourcedStatistics/apply(_:plan:kernels:scale:offset:indexing:into:)``.
    public func normalize<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, operation op: ReferenceNormKernel.Operation,
        kernels: KernelChoice, scale: Tensor<Scalar>?, offset: Tensor<Scalar>?,
        indexing: ParameterIndexing?, layer: String, into output: inout Tensor<Scalar>
    ) throws(NormError) -> SourcedStatistics {
        if output.shape != x.shape {
            do { output = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        }
        if case .batch(.local) = self {
            let (statistics, rescaled) = output.withUnsafeMutableBufferPointer { yb in
                kernels.forwardTraining(
                    x, plan: plan, operation: op, scale: scale, offset: offset, indexing: indexing,
                    into: yb)
            }
            return .localBatch(statistics, count: plan.setSize, rescaled: rescaled)
        }
        var batch: BatchMoments?
        if case .fixed = self {
            batch = nil
        } else {
            let partial = reduction.partialMoments(
                x, plan: plan, operation: op, kernels: kernels, indexing: indexing)
            batch = try reduction.reduce(.success(partial), operation: op, layer: layer)
        }
        let sourced = try resolve(batch, operation: op, layer: layer)
        try sourced.apply(
            x, plan: plan, kernels: kernels, scale: scale, offset: offset, indexing: indexing,
            into: &output)
        return sourced
    }
}

// MARK: - What a source resolved, and backward through it

/// The statistics one forward call normalized with, and what backward needs to differentiate
/// through them (the design's `Statistics`).
public struct SourcedStatistics: Sendable {
    /// μ per set that apply subtracts (0 where Φ does not center).
    public let mean: [Double]
    /// 1/√(σ² + ε) per set that apply multiplies by (1 where Φ does not scale).
    public let rstd: [Double]
    /// The batch's own moments behind them (every rank's when all-reduced); nil for `.fixed`.
    public let batch: BatchMoments?
    /// How backward treats the statistics.
    let rule: GradientRule
    /// True when some set was recomputed on rescaled data (values near the type's limits);
    /// backward then runs the reference kernel, in Double throughout.
    var rescaled = false

    init(mean: [Double], rstd: [Double], batch: BatchMoments?, rule: GradientRule) {
        self.mean = mean
        self.rstd = rstd
        self.batch = batch
        self.rule = rule
    }

    /// This process's batch statistics from a fused kernel, as they are.
    static func localBatch(
        _ statistics: FastNormKernel.Statistics, count: Int, rescaled: Bool = false
    ) -> SourcedStatistics {
        var sourced = SourcedStatistics(
            mean: statistics.mean, rstd: statistics.rstd,
            batch: BatchMoments(count: count, statistics: statistics),
            rule: .batch(allReduced: false))
        sourced.rescaled = rescaled
        return sourced
    }

    /// Statistics that never saw a batch (an empty input): constants.
    static func empty(setCount: Int, mean: [Double]? = nil) -> SourcedStatistics {
        SourcedStatistics(
            mean: mean ?? [Double](repeating: 0, count: setCount),
            rstd: [Double](repeating: 1, count: setCount), batch: nil, rule: .constant)
    }

    /// How gradients flow through the statistics.
    enum GradientRule: Sendable {
        /// Constants (running or frozen estimates): dx = rstd·g.
        case constant
        /// The batch's own statistics: the standard formula, over every rank when all-reduced.
        case batch(allReduced: Bool)
        /// Batch Renormalization: r and d constant.
        case renormalized(Renormalization.Correction)
        /// Kalman Normalization: through the prediction's combination with the batch.
        case propagated(KalmanPrediction.Combination)
    }

    /// True when no gradient flows through the statistics.
    public var isConstant: Bool {
        if case .constant = rule { return true }
        return false
    }

    /// True when the statistics came from every rank's batch.
    public var isAllReduced: Bool {
        switch rule {
        case .batch(let allReduced): return allReduced
        case .renormalized(let correction): return correction.allReduced
        case .constant, .propagated: return false
        }
    }

    /// The reduction backward must use: the forward's communicator for all-reduced statistics
    /// (every rank then takes part in the sums' all-reduce, and one whose dy is wrong reports it
    /// there), `.local` otherwise.
    /// - Throws: ``NormError/communication(_:)`` when the statistics were all-reduced and the
    ///   layer no longer has a communicator.
    public func backwardReduction(over communicator: (any Communicator)?) throws(NormError)
        -> StatisticsReduction
    {
        guard isAllReduced else { return .local }
        guard let communicator else {
            throw .communication(
                .failedOnSomeRank(operation: "backward without the communicator of forward"))
        }
        return .allReduced(communicator)
    }

    /// (c) `y = γ·(x − μ)·rstd + β` per set, into `output` (shaped like x by the caller or here).
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)`` when the statistics
    ///   are not one per set of `plan`.
    public func apply<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, kernels: KernelChoice, scale: Tensor<Scalar>?,
        offset: Tensor<Scalar>?, indexing: ParameterIndexing?, into output: inout Tensor<Scalar>
    ) throws(NormError) {
        try StatisticsSource.checkLength(mean.count, of: "mean", expected: plan.setCount)
        try StatisticsSource.checkLength(rstd.count, of: "rstd", expected: plan.setCount)
        if output.shape != x.shape {
            output = try zeros(x.shape)
        }
        guard x.count > 0 else { return }
        output.withUnsafeMutableBufferPointer { yb in
            kernels.forward(
                x, plan: plan, mean: mean, rstd: rstd, scale: scale, offset: offset,
                indexing: indexing, into: yb)
        }
    }

    /// What backward returns besides dx.
    public struct Gradients: Sendable {
        /// dγ per parameter (local: data-parallel training sums them with every other
        /// gradient), empty without γ.
        public var scale: [Double]
        /// dβ per parameter, empty without β.
        public var offset: [Double]
        /// dL/d(predicted μ⁻, σ²⁻) and dL/dp of a propagated source; nil for the others.
        public var prediction: KalmanPrediction.Gradients?
    }

    /// Backward through apply and the source into `dx` (reused when it has x's shape).
    ///
    /// The constant and local batch rules run the fused backward kernel (the reference kernel
    /// after a rescaled forward). The others: (a) per-set Σg and Σg·(x − c) with g = dy·γ,
    /// (b) the forward's reduction over those sums, (c) the rule's A, B, C and
    /// `dx = A·g + B·(x − c) + C`.
    /// - Parameters:
    ///   - reduction: the forward's (its communicator, for all-reduced statistics).
    ///   - statisticsGradient: dL/d(μ, σ²) of the statistics from outside the layer (the next
    ///     Kalman layer's), added before the rule runs.
    ///   - validate: input checks; on failure an all-reduced rule still takes part in the
    ///     exchange, reporting the error to every rank.
    public func backward<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, outputGradient dy: Tensor<Scalar>, plan: ReductionPlan,
        operation op: ReferenceNormKernel.Operation, kernels: KernelChoice,
        reduction: StatisticsReduction, scale: Tensor<Scalar>?, indexing: ParameterIndexing?,
        statisticsGradient: StatisticsGradient? = nil,
        validate: () throws(NormError) -> Void = {}, layer: String,
        into dx: inout Tensor<Scalar>
    ) throws(NormError) -> Gradients {
        try StatisticsSource.checkLength(mean.count, of: "mean", expected: plan.setCount)
        var fused: Bool
        switch rule {
        case .constant: fused = true
        case .batch(let allReduced): fused = !allReduced
        case .renormalized, .propagated: fused = false
        }
        if fused {
            try validate()
            if dx.shape != x.shape { dx = try zeros(x.shape) }
            var dScale: [Double] = []
            var dOffset: [Double] = []
            let kernels = rescaled ? KernelChoice.reference : kernels
            dx.withUnsafeMutableBufferPointer { dxb in
                kernels.backward(
                    x, outputGradient: dy, plan: plan, mean: mean, rstd: rstd, operation: op,
                    statisticsAreConstant: isConstant, scale: scale, indexing: indexing,
                    inputGradient: dxb, scaleGradient: &dScale, offsetGradient: &dOffset)
            }
            return Gradients(scale: dScale, offset: dOffset, prediction: nil)
        }
        // (a) Per-set sums around the center the rule differentiates at.
        let (center, centerRstd) = sumCenter
        let local = Result { () throws(NormError) in
            try validate()
            return kernels.gradientSums(
                x, outputGradient: dy, plan: plan, mean: center, rstd: centerRstd, scale: scale,
                indexing: indexing)
        }
        // (b) Reduced over the ranks (an all-reduced rule), in one buffer [Σg…, Σg·(x − c)…].
        let k = plan.setCount
        var reduced: [Double]?
        if isAllReduced {
            guard reduction.isAllReduced else {
                throw .communication(
                    .failedOnSomeRank(operation: "backward without the communicator of forward"))
            }
            reduced = try reduction.reduceSums(
                local.map { $0.sumG + $0.sumGD }, length: 2 * k, operation: "\(layer) backward")
        }
        var sums = try local.get()
        if let reduced {
            sums.sumG = Array(reduced[0..<k])
            sums.sumGD = Array(reduced[k...])
        }
        // (c) The rule's coefficients, then dx.
        var coefficients: Coefficients
        switch rule {
        case .constant:
            preconditionFailure("Constant statistics take the fused path.")
        case .batch:
            coefficients = batchCoefficients(sums, operation: op)
        case .renormalized(let correction):
            coefficients = correction.coefficients(sums)
        case .propagated(let combination):
            coefficients = combination.coefficients(
                sums, rstd: rstd, statisticsGradient: statisticsGradient)
        }
        if dx.shape != x.shape { dx = try zeros(x.shape) }
        if x.count > 0 {
            dx.withUnsafeMutableBufferPointer { dxb in
                kernels.applyGradient(
                    x, outputGradient: dy, plan: plan, mean: coefficients.center,
                    a: coefficients.a, b: coefficients.b, c: coefficients.c, scale: scale,
                    indexing: indexing, into: dxb)
            }
        }
        return Gradients(
            scale: coefficients.scaleGradient ?? sums.scaleGradient, offset: sums.offsetGradient,
            prediction: coefficients.prediction)
    }

    /// The per-set center and rstd the gradient sums are taken around.
    private var sumCenter: (mean: [Double], rstd: [Double]) {
        switch rule {
        case .renormalized(let correction):
            return (correction.batchMean, correction.batchStandardDeviation.map { 1 / $0 })
        case .propagated, .batch, .constant:
            return (mean, rstd)
        }
    }

    /// `dx = a·g + b·(x − center) + c` per set, and what else the rule's backward produced.
    struct Coefficients {
        var center: [Double]
        var a: [Double]
        var b: [Double]
        var c: [Double]
        /// dγ when the rule changes it (Batch Renorm's r·x̂ + d); nil: the kernel's Σ dy·x̂.
        var scaleGradient: [Double]? = nil
        var prediction: KalmanPrediction.Gradients? = nil
    }

    /// The batch rule.
    ///
    /// Over n = ``BatchMoments/count`` elements per set, with x̂ = (x − μ)·rstd:
    /// ```
    /// dx = rstd·(g − Σg/n − x̂·rstd·Σg(x − μ)/d),   d = n (biased) or n − 1 (unbiased)
    /// ```
    private func batchCoefficients(
        _ sums: FastNormKernel.GradientSums, operation op: ReferenceNormKernel.Operation
    ) -> Coefficients {
        let k = mean.count
        let n = Double(batch?.count ?? 0)
        let divisor = op.centers && op.unbiased ? n - 1 : n
        var a = [Double](repeating: 1, count: k)
        var b = [Double](repeating: 0, count: k)
        var c = [Double](repeating: 0, count: k)
        for s in 0..<k {
            let r = rstd[s]
            if op.scales {
                a[s] = r
                b[s] = -r * r * r * sums.sumGD[s] / divisor
            }
            if op.centers { c[s] = -a[s] * sums.sumG[s] / n }
        }
        return Coefficients(center: mean, a: a, b: b, c: c)
    }

    private func zeros<Scalar: NormScalar>(_ shape: [Int]) throws(NormError) -> Tensor<Scalar> {
        do { return try Tensor(zeros: shape) } catch { throw .tensor(error) }
    }
}
