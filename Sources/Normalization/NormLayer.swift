import NormKernels
import TensorCore

/// A normalization layer built from a ``Normalizer``: parameters, running state and the
/// forward and backward passes of any Π → Φ → Ψ combination.
///
/// ```
/// y = γ ⊙ Φ(x; Π) + β,   Φ = (x − μ)/√(σ² + ε), (x − μ), or x/√(E[x²] + ε)
/// ```
/// The five standard layers (``BatchNorm``, ``LayerNorm``, ``InstanceNorm``, ``GroupNorm``,
/// ``RMSNorm``) are this class with a fixed configuration, and a user can compose one nobody
/// shipped:
/// ```swift
/// // Standardize over (N, H) separately for every (C, W).
/// let odd = try NormLayer<Double>(normalizer: Normalizer(partition: .axes([0, 2])))
/// let (y, cache) = try odd.forward(x, mode: .training)
/// let grads = try odd.backward(dy, cache: cache)
/// ```
///
/// Training mode normalizes with batch statistics and, when the layer tracks them, updates
/// ``runningStatistics`` (see ``RunningStatistics`` for the rule). Inference and frozen modes
/// normalize with the running statistics when the layer tracks them, and otherwise with the
/// input's own statistics. A call that throws changes nothing.
///
/// The ``Cache`` holds the input (shared, not copied) and μ, rstd per statistic; backward
/// recomputes x̂ from them instead of storing it (half the memory for one more multiply).
///
/// ## Shape
/// Input and output: any shape the partition accepts (see ``Normalizer/Partition``). Statistics:
/// the kept axes of the partition's view, e.g. `[C]` for BatchNorm, `[N, G]` for GroupNorm.
public class NormLayer<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// Π, Φ, Ψ, the variance estimator and ε.
    public let normalizer: Normalizer
    /// Where the channel axis is.
    public let layout: Layout
    /// The layer's name in messages (`"BatchNorm"`).
    public let name: String
    /// The channel count the input must have, when the layer has one.
    public let channelCount: Int?
    /// The trailing shape the input must end with, when the layer has one.
    public let trailingShape: [Int]?
    /// Whether training refuses a statistic over a single value (BatchNorm, InstanceNorm).
    public let requiresMultipleValues: Bool
    /// What training does when a statistic would be over a single value.
    public let singleValuePolicy: SingleValuePolicy
    /// Whether every training batch increments ``RunningStatistics/batchesTracked`` (PyTorch's
    /// BatchNorm does; its InstanceNorm does not, so NormKit's counts only for `.cumulative`).
    public let countsEveryBatch: Bool

    /// γ, or nil when the recovery has no parameters; initially 1.
    ///
    /// `weight` in PyTorch checkpoints.
    public var scale: Tensor<Scalar>?
    /// β, or nil when the recovery has no offset; initially 0.
    ///
    /// `bias` in PyTorch checkpoints.
    public var offset: Tensor<Scalar>?
    /// Running estimates for inference, or nil when the layer does not track them.
    public var runningStatistics: RunningStatistics<Scalar>?
    /// Which kernels compute the layer (`.automatic`: the fast Float kernels where the
    /// partition's memory shape allows, the reference kernel otherwise).
    public var kernels = KernelChoice.automatic
    /// Synchronizes training statistics over these processes when the partition reduces the
    /// batch axis (BatchNorm becomes SyncBatchNorm; see `NormLayer+Synchronized.swift`); nil or
    /// a partition that keeps the batch axis computes them locally.
    public var communicator: (any Communicator)?
    /// The momentum of lazily created running statistics (layers whose statistic shape is only
    /// known from the first input).
    let lazyRunningMomentum: Momentum?

    /// Creates a layer from a normalizer.
    ///
    /// - Parameters:
    ///   - normalizer: Π, Φ, Ψ, variance and ε.
    ///   - layout: where the channel axis is.
    ///   - runningMomentum: track running statistics with this rule (nil: do not track).
    ///   - runningShape: their shape when known in advance; nil creates them (mean 0, variance 1)
    ///     on the first training call, from the partition's statistics with the batch axis
    ///     averaged out.
    ///   - channelCount: the channel count inputs must have (checked on every call).
    ///   - trailingShape: the trailing dimensions inputs must have.
    ///   - requiresMultipleValues: refuse single-value statistics in training.
    ///   - singleValuePolicy: what to do instead of refusing.
    ///   - countsEveryBatch: increment the batch counter on every training batch, not only
    ///     for a cumulative average.
    ///   - name: the name used in error messages.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` for a negative or
    ///   non-finite ε, a momentum outside [0, 1], or an empty parameter shape.
    public init(
        normalizer: Normalizer, layout: Layout = .channelsFirst, runningMomentum: Momentum? = nil,
        runningShape: [Int]? = nil, channelCount: Int? = nil, trailingShape: [Int]? = nil,
        requiresMultipleValues: Bool = false, singleValuePolicy: SingleValuePolicy = .throwError,
        countsEveryBatch: Bool = true, name: String = "NormLayer"
    ) throws(NormError) {
        try HyperparameterCheck.epsilon(normalizer.epsilon)
        if let channelCount, channelCount < 1 {
            throw .invalidHyperparameter(
                name: "channel count", value: "\(channelCount)", requirement: "must be ≥ 1")
        }
        try runningMomentum?.validate()
        self.normalizer = normalizer
        self.layout = layout
        self.name = name
        self.channelCount = channelCount
        self.trailingShape = trailingShape
        self.requiresMultipleValues = requiresMultipleValues
        self.singleValuePolicy = singleValuePolicy
        self.countsEveryBatch = countsEveryBatch
        if let shape = normalizer.recovery.parameterShape {
            guard !shape.isEmpty, shape.allSatisfy({ $0 >= 1 }) else {
                throw .invalidHyperparameter(
                    name: "parameter shape", value: "\(shape)",
                    requirement: "every dimension must be ≥ 1")
            }
            do {
                scale = try Tensor(repeating: 1, shape: shape)
                offset = normalizer.recovery.hasOffset ? try Tensor(zeros: shape) : nil
            } catch { throw .tensor(error) }
        }
        if let runningMomentum, let runningShape {
            runningStatistics = try RunningStatistics(
                shape: runningShape, momentum: runningMomentum)
        }
        lazyRunningMomentum = runningStatistics == nil ? runningMomentum : nil
    }

    // MARK: - Forward

    /// What ``forward(_:mode:)`` keeps for ``backward(_:cache:)``.
    public struct Cache: Sendable {
        /// The input (shares storage with the caller's tensor).
        public let input: Tensor<Scalar>
        /// The reduction plan whose sets the statistics belong to.
        public let plan: ReductionPlan
        /// μ per statistic (0 where Φ does not center).
        public let mean: [Double]
        /// 1/√(σ² + ε) per statistic (1 where Φ does not scale).
        public let rstd: [Double]
        /// True when the statistics came from running estimates: no gradient flows through them.
        public let statisticsAreConstant: Bool
        /// True when some set was recomputed on rescaled data (values near the type's limits);
        /// backward then runs the reference kernel, in Double throughout.
        var rescaled = false
        /// Elements per statistic over every rank, when the statistics were synchronized
        /// (backward then all-reduces its sums and divides by this count).
        public var synchronizedCount: Int? = nil
    }

    /// Normalizes `x`; in training mode updates running statistics.
    ///
    /// - Returns: the output (same shape as `x`) and the cache for ``backward(_:cache:)``.
    /// - Throws: ``NormError`` for an input the layer cannot take; nothing changes then.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws(NormError) -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        var output = try tensor(shape: [0], scalars: [])
        let cache = try forward(x, mode: mode, into: &output)
        return (output, cache)
    }

    /// Normalizes `x` into a caller-owned output tensor, reusing its storage when it already has
    /// `x`'s shape and is not shared (no allocation per call in a training loop).
    ///
    /// - Returns: the cache for ``backward(_:cache:)``.
    /// - Throws: ``NormError`` for an input the layer cannot take; nothing changes then.
    public func forward(_ x: Tensor<Scalar>, mode: Mode, into output: inout Tensor<Scalar>)
        throws(NormError) -> Cache
    {
        // Synchronized statistics first: a rank with an empty batch still takes part in the
        // collective calls.
        if mode == .training, let communicator, synchronizesStatistics {
            return try synchronizedForward(x, over: communicator, into: &output)
        }
        if x.count == 0 { return try forwardEmptyBatch(x, mode: mode, into: &output) }
        var plan = try validatedPlan(for: x)
        let op = normalizer.kernelOperation
        let runningPlan = plan.reducing([0])
        try validateRunningShape(runningPlan)

        var useRunning = mode.usesRunningStatistics && (runningStatistics != nil)
        var updateRunning =
            mode == .training && (runningStatistics != nil || lazyRunningMomentum != nil)
        if mode == .training, plan.setSize == 1,
            requiresMultipleValues || updateRunning || normalizer.variance == .unbiased
        {
            switch singleValuePolicy {
            case .throwError:
                throw .singleValuePerStatistic(layer: name, shape: x.shape)
            case .useRunningStatistics:
                guard runningStatistics != nil else {
                    throw .runningStatisticsUnavailable(layer: name)
                }
                useRunning = true
            case .useInstanceStatistics:
                // Per (sample, channel) over the spatial axes; a rank-2 input has none, so
                // every element is its own set.
                plan =
                    x.rank >= 3
                    ? try Normalizer.Partition.instance.plan(for: x.shape, layout: layout)
                    : ReductionPlan(
                        viewShape: x.shape, reduced: [Bool](repeating: false, count: x.rank))
            }
            updateRunning = false
        }

        let indexing = parameterIndexing(for: x.shape)
        if output.shape != x.shape {
            output = try zeros(x.shape)
        }
        let mean: [Double]
        let rstd: [Double]
        if useRunning, let running = runningStatistics {
            plan = runningPlan
            mean =
                op.centers
                ? running.mean.scalars.map(Double.init)
                : [Double](repeating: 0, count: plan.setCount)
            let variance = running.variance.scalars.map(Double.init)
            rstd = ReferenceNormKernel.reciprocalStandardDeviation(
                variance: variance, operation: op)
            output.withUnsafeMutableBufferPointer { yb in
                kernels.forward(
                    x, plan: plan, mean: mean, rstd: rstd, scale: scale, offset: offset,
                    indexing: indexing, into: yb)
            }
        } else {
            let (statistics, rescaled) = output.withUnsafeMutableBufferPointer { yb in
                kernels.forwardTraining(
                    x, plan: plan, operation: op, scale: scale, offset: offset, indexing: indexing,
                    into: yb)
            }
            if updateRunning {
                try updateRunningStatistics(statistics, plan: plan, runningPlan: runningPlan, x: x)
            }
            return Cache(
                input: x, plan: plan, mean: statistics.mean, rstd: statistics.rstd,
                statisticsAreConstant: false, rescaled: rescaled)
        }
        return Cache(
            input: x, plan: plan, mean: mean, rstd: rstd, statisticsAreConstant: useRunning)
    }

    /// An empty batch (N = 0), or an input whose kept axes leave no statistic set.
    ///
    /// As PyTorch: an empty output of the same shape, running statistics untouched, and in
    /// training the batch counted where a non-empty batch would be (PyTorch's BatchNorm module
    /// increments `num_batches_tracked` for it too). A zero-size axis that would be reduced
    /// over while its sets exist (LayerNorm's normalized axes, an empty spatial extent) is
    /// refused with ``NormError/emptyTensor(layer:shape:)``.
    private func forwardEmptyBatch(
        _ x: Tensor<Scalar>, mode: Mode, into output: inout Tensor<Scalar>
    ) throws(NormError) -> Cache {
        try validateShape(of: x)
        let plan = try normalizer.partition.plan(for: x.shape, layout: layout)
        // Empty batch, or no statistic sets at all (a kept axis of size 0): nothing to compute.
        guard x.rank >= 1, x.shape[0] == 0 || plan.setCount == 0 else {
            throw .emptyTensor(layer: name, shape: x.shape)
        }
        if mode == .training, var running = runningStatistics {
            running.average.countEmptyBatch(countingEveryBatch: countsEveryBatch)
            runningStatistics = running
        }
        output = try zeros(x.shape)
        return Cache(
            input: x,
            plan: ReductionPlan(
                viewShape: x.shape, reduced: [Bool](repeating: false, count: x.rank)),
            mean: [], rstd: [], statisticsAreConstant: true)
    }

    // MARK: - Fused residual add

    /// `h = x + residual; y = norm(h)`: the residual add of a pre-norm transformer block fused
    /// with the normalization, so x and the residual are read once and h is written once.
    ///
    /// Backward is ``backward(_:cache:)`` of the returned cache: its input gradient is dL/dh,
    /// which is also dL/dx and dL/dresidual (add dL/dh from h's other uses first). The fused
    /// kernel runs for Float LayerNorm, RMSNorm and channels-last LayerNorm2d with batch
    /// statistics; other layers compute h and then call ``forward(_:mode:)``, with the same
    /// result.
    /// - Returns: y, h and the cache.
    /// - Throws: ``NormError/shapeMismatch(name:expected:actual:)`` when the residual's shape
    ///   differs from x's, and whatever ``forward(_:mode:)`` throws.
    public func forward(_ x: Tensor<Scalar>, adding residual: Tensor<Scalar>, mode: Mode)
        throws(NormError) -> (output: Tensor<Scalar>, sum: Tensor<Scalar>, cache: Cache)
    {
        var y = try zeros([0])
        var h = try zeros([0])
        let cache = try forward(x, adding: residual, mode: mode, sum: &h, into: &y)
        return (y, h, cache)
    }

    /// The fused residual add into caller-owned tensors, reusing their storage when they
    /// already have x's shape (no allocation per call in a training loop).
    /// - Returns: the cache for ``backward(_:cache:)``.
    /// - Throws: as ``forward(_:adding:mode:)``.
    public func forward(
        _ x: Tensor<Scalar>, adding residual: Tensor<Scalar>, mode: Mode,
        sum h: inout Tensor<Scalar>,
        into y: inout Tensor<Scalar>
    ) throws(NormError) -> Cache {
        guard residual.shape == x.shape else {
            throw .shapeMismatch(name: "residual", expected: x.shape, actual: residual.shape)
        }
        let usesBatchStatistics = runningStatistics == nil && lazyRunningMomentum == nil
        if usesBatchStatistics, x.count > 0 {
            let plan = try validatedPlan(for: x)
            let indexing = parameterIndexing(for: x.shape)
            if plan.setSize > 1 || (!requiresMultipleValues && normalizer.variance == .biased),
                let geometry = kernels.fastGeometry(Scalar.self, plan: plan, indexing: indexing)
            {
                if y.shape != x.shape { y = try zeros(x.shape) }
                if h.shape != x.shape { h = try zeros(x.shape) }
                let statistics = x.withUnsafeBufferPointer { xb in
                    residual.withUnsafeBufferPointer { rb in
                        h.withUnsafeMutableBufferPointer { hb in
                            y.withUnsafeMutableBufferPointer { yb in
                                withOptionalBuffers(scale, offset) { sb, ob in
                                    FastNormKernel.forwardTrainingAddingResidual(
                                        xb.asFloat, residual: rb.asFloat, geometry: geometry,
                                        operation: normalizer.kernelOperation, scale: sb?.asFloat,
                                        offset: ob?.asFloat, sum: hb.asFloat, into: yb.asFloat)
                                }
                            }
                        }
                    }
                }
                // Sums that overflowed or underflowed: the unfused path rescales those sets.
                if let statistics,
                    ReferenceNormKernel.setsNeedingRescale(
                        mean: statistics.mean, variance: statistics.variance,
                        rstd: statistics.rstd, operation: normalizer.kernelOperation,
                        tinyVariance: 1e-30) == nil
                {
                    return Cache(
                        input: h, plan: plan, mean: statistics.mean, rstd: statistics.rstd,
                        statisticsAreConstant: false)
                }
            }
        }
        do { h = try x + residual } catch { throw .tensor(error) }
        return try forward(h, mode: mode, into: &y)
    }

    // MARK: - Backward

    /// Gradients of a scalar loss with respect to the input and the affine parameters.
    public struct Gradients: Sendable {
        /// dL/dx, the input's shape.
        public var input: Tensor<Scalar>
        /// dL/dγ (`weight`), nil without γ.
        public var scale: Tensor<Scalar>?
        /// dL/dβ (`bias`), nil without β.
        public var offset: Tensor<Scalar>?
    }

    /// Back-propagates `dy` through the forward call that produced `cache`.
    ///
    /// Within each reduction set of m elements, with g = dy ⊙ γ and x̂ the normalized input:
    /// ```
    /// dx = rstd · (g − mean(g) − x̂ · mean(g x̂))      (standardize, biased variance)
    /// dγ = Σ dy ⊙ x̂,   dβ = Σ dy
    /// ```
    /// and `dx = rstd · g` when the statistics were running estimates (constants). See
    /// ``ReferenceNormKernel/backward(_:outputGradient:setIndex:setCount:mean:rstd:operation:statisticsAreConstant:scale:parameterIndexing:inputGradient:scaleGradient:offsetGradient:)``
    /// for the other operations.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws(NormError) -> Gradients {
        var gradients = Gradients(input: try tensor(shape: [0], scalars: []))
        try backward(dy, cache: cache, into: &gradients)
        return gradients
    }

    /// Back-propagates into caller-owned gradients, reusing their storage when the shapes
    /// already match (no allocation of dx per call in a training loop).
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache, into gradients: inout Gradients)
        throws(NormError)
    {
        let x = cache.input
        if let count = cache.synchronizedCount, !cache.statisticsAreConstant {
            guard let communicator else {
                throw .communication(
                    .failedOnSomeRank(operation: "backward without the communicator of forward"))
            }
            return try synchronizedBackward(
                dy, cache: cache, globalCount: count, over: communicator, into: &gradients)
        }
        guard dy.shape == x.shape else {
            throw .gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        try validateParameters()
        if x.count == 0 {
            // An empty batch: an empty dx and zero parameter gradients, as PyTorch.
            gradients.input = try zeros(x.shape)
            gradients.scale = try normalizer.recovery.parameterShape.map { (s) throws(NormError) in
                try zeros(s)
            }
            gradients.offset =
                normalizer.recovery.hasOffset ? try zeros(normalizer.recovery.parameterShape!) : nil
            return
        }
        let indexing = parameterIndexing(for: x.shape)
        if gradients.input.shape != x.shape {
            gradients.input = try zeros(x.shape)
        }
        var dScale: [Double] = []
        var dOffset: [Double] = []
        let kernels = cache.rescaled ? KernelChoice.reference : kernels
        gradients.input.withUnsafeMutableBufferPointer { dxb in
            kernels.backward(
                x, outputGradient: dy, plan: cache.plan, mean: cache.mean, rstd: cache.rstd,
                operation: normalizer.kernelOperation,
                statisticsAreConstant: cache.statisticsAreConstant, scale: scale,
                indexing: indexing, inputGradient: dxb, scaleGradient: &dScale,
                offsetGradient: &dOffset)
        }
        gradients.scale = nil
        gradients.offset = nil
        if let shape = normalizer.recovery.parameterShape {
            gradients.scale = try rounded(shape, dScale)
            if normalizer.recovery.hasOffset {
                gradients.offset = try rounded(shape, dOffset)
            }
        }
    }

    // MARK: - State

    /// Parameters and buffers under PyTorch's `state_dict` names (see ``ParameterKey``);
    /// `num_batches_tracked` is returned separately as an integer.
    func stateTensors() -> (tensors: [String: Tensor<Scalar>], batchesTracked: Int?) {
        var tensors: [String: Tensor<Scalar>] = [:]
        if let scale { tensors[ParameterKey.scale.rawValue] = scale }
        if let offset { tensors[ParameterKey.offset.rawValue] = offset }
        if let running = runningStatistics {
            tensors[ParameterKey.runningMean.rawValue] = running.mean
            tensors[ParameterKey.runningVariance.rawValue] = running.variance
        }
        return (tensors, runningStatistics?.batchesTracked)
    }

    /// Loads parameters and buffers by PyTorch name; missing entries keep their values.
    ///
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)`` for a wrong shape,
    ///   ``NormError/unknownParameter(layer:key:known:)`` for a name the layer does not have,
    ///   ``NormError/invalidHyperparameter(name:value:requirement:)`` for a negative or NaN
    ///   running variance; nothing is loaded then.
    public func load(_ tensors: [String: Tensor<Scalar>], batchesTracked: Int? = nil)
        throws(NormError)
    {
        var newScale = scale
        var newOffset = offset
        var newRunning = runningStatistics
        for (key, value) in tensors {
            switch ParameterKey(rawValue: key) {
            case .scale? where scale != nil:
                try checkShape(key, value.shape, scale!.shape)
                newScale = value
            case .offset? where offset != nil:
                try checkShape(key, value.shape, offset!.shape)
                newOffset = value
            case .runningMean? where runningStatistics != nil:
                try checkShape(key, value.shape, runningStatistics!.mean.shape)
                newRunning?.mean = value
            case .runningVariance? where runningStatistics != nil:
                try checkShape(key, value.shape, runningStatistics!.variance.shape)
                try HyperparameterCheck.runningVariance(value, name: key)
                newRunning?.variance = value
            default:
                throw .unknownParameter(layer: name, key: key, known: state().tensors.keys.sorted())
            }
        }
        if let batchesTracked {
            guard newRunning != nil, batchesTracked >= 0 else {
                throw .invalidHyperparameter(
                    name: ParameterKey.batchesTracked.rawValue, value: "\(batchesTracked)",
                    requirement: "needs running statistics and a count ≥ 0")
            }
            newRunning?.batchesTracked = batchesTracked
        }
        scale = newScale
        offset = newOffset
        runningStatistics = newRunning
    }

    // MARK: - Validation and helpers

    func validatedPlan(for x: Tensor<Scalar>) throws(NormError) -> ReductionPlan {
        guard x.count > 0 else { throw .emptyTensor(layer: name, shape: x.shape) }
        try validateShape(of: x)
        let plan = try normalizer.partition.plan(for: x.shape, layout: layout)
        return plan
    }

    /// The channel count, trailing shape and parameter shapes an input must match.
    private func validateShape(of x: Tensor<Scalar>) throws(NormError) {
        if let channelCount {
            guard x.rank >= 2 else {
                throw .invalidRank(layer: name, expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
            }
            let actual = x.shape[layout.channelAxis(rank: x.rank)]
            guard actual == channelCount else {
                throw .channelMismatch(
                    layer: name, expected: channelCount, actual: actual, shape: x.shape)
            }
        }
        if let trailingShape {
            guard x.rank >= trailingShape.count,
                Array(x.shape.suffix(trailingShape.count)) == trailingShape
            else {
                throw .normalizedShapeMismatch(layer: name, expected: trailingShape, shape: x.shape)
            }
        }
        try validateParameters(inputShape: x.shape)
    }

    func validateParameters(inputShape: [Int]? = nil) throws(NormError) {
        guard let shape = normalizer.recovery.parameterShape else { return }
        if let scale { try checkShape(ParameterKey.scale.rawValue, scale.shape, shape) }
        if let offset { try checkShape(ParameterKey.offset.rawValue, offset.shape, shape) }
        guard let inputShape else { return }
        switch normalizer.recovery {
        case .channelAffine(let channels, _):
            let actual =
                inputShape.count >= 2 ? inputShape[layout.channelAxis(rank: inputShape.count)] : 0
            guard actual == channels else {
                throw .channelMismatch(
                    layer: name, expected: channels, actual: actual, shape: inputShape)
            }
        case .elementwiseAffine(let trailing, _):
            guard Array(inputShape.suffix(trailing.count)) == trailing else {
                throw .normalizedShapeMismatch(layer: name, expected: trailing, shape: inputShape)
            }
        case .none:
            break
        }
    }

    func validateRunningShape(_ runningPlan: ReductionPlan) throws(NormError) {
        guard let running = runningStatistics else { return }
        let expected = runningPlan.statisticShape
        let count = runningPlan.setCount
        guard running.mean.count == count else {
            throw .parameterShapeMismatch(
                name: ParameterKey.runningMean.rawValue, expected: expected,
                actual: running.mean.shape)
        }
        guard running.variance.count == count else {
            throw .parameterShapeMismatch(
                name: ParameterKey.runningVariance.rawValue, expected: expected,
                actual: running.variance.shape)
        }
    }

    private func checkShape(_ name: String, _ actual: [Int], _ expected: [Int]) throws(NormError) {
        guard actual == expected else {
            throw .parameterShapeMismatch(name: name, expected: expected, actual: actual)
        }
    }

    /// Applies one training batch to the running statistics (all-or-nothing); `setSize` is the
    /// number of elements per statistic (the global count for synchronized statistics).
    func updateRunningStatistics(
        _ moments: FastNormKernel.Statistics, plan: ReductionPlan, runningPlan: ReductionPlan,
        x: Tensor<Scalar>, setSize: Int? = nil
    ) throws(NormError) {
        guard moments.mean.allSatisfy(\.isFinite), moments.biasedVariance.allSatisfy(\.isFinite)
        else {
            // Finite input whose variance exceeds Double's range is not the input's fault.
            if x.scalars.allSatisfy(\.isFinite) { throw .statisticsOutOfRange(layer: name) }
            throw .nonFiniteStatistics(layer: name)
        }
        var running: RunningStatistics<Scalar>
        if let existing = runningStatistics {
            running = existing
        } else {
            running = try RunningStatistics(
                shape: runningPlan.statisticShape, momentum: lazyRunningMomentum!)
        }
        let m = Double(setSize ?? plan.setSize)
        let slots = runningPlan.setCount
        // Sets are numbered row-major over the kept view axes; when the batch axis is kept it is
        // the outermost, so set s belongs to running slot s % slots (averaged over the batch).
        let perSlot = Double(plan.setCount / slots)
        var batchMean = [Double](repeating: 0, count: slots)
        var batchVariance = [Double](repeating: 0, count: slots)
        let centers = normalizer.operation.centers
        for s in 0..<plan.setCount {
            let variance = centers ? moments.biasedVariance[s] * m / (m - 1) : moments.variance[s]
            batchMean[s % slots] += moments.mean[s] / perSlot
            batchVariance[s % slots] += variance / perSlot
        }
        // Saturates at Int64.max (PyTorch's int64 counter wraps to Int64.min instead).
        guard
            let updated = running.updated(
                batchMean: batchMean, batchVariance: batchVariance,
                countingEveryBatch: countsEveryBatch)
        else { throw .statisticsOutOfRange(layer: name) }
        runningStatistics = updated
    }

    func parameterIndexing(for shape: [Int]) -> ParameterIndexing? {
        switch normalizer.recovery {
        case .none:
            return nil
        case .channelAffine(let channels, _):
            let axis = layout.channelAxis(rank: shape.count)
            return ParameterIndexing(divisor: Shape.strides(shape)[axis], modulus: channels)
        case .elementwiseAffine(let trailing, _):
            return ParameterIndexing(divisor: 1, modulus: trailing.reduce(1, *))
        }
    }

    func rounded(_ shape: [Int], _ values: [Double]) throws(NormError) -> Tensor<Scalar> {
        do { return try Tensor(shape: shape, rounding: values) } catch { throw .tensor(error) }
    }

    func zeros(_ shape: [Int]) throws(NormError) -> Tensor<Scalar> {
        do { return try Tensor(zeros: shape) } catch { throw .tensor(error) }
    }

    private func tensor(shape: [Int], scalars: [Scalar]) throws(NormError) -> Tensor<Scalar> {
        do { return try Tensor(shape: shape, scalars: scalars) } catch { throw .tensor(error) }
    }

    // MARK: - CustomStringConvertible

    /// One line with the layer's configuration, like PyTorch's `extra_repr`.
    public var description: String {
        var parts = [normalizer.description, "layout=\(layout)"]
        if let running = runningStatistics { parts.append("running(\(running.momentum))") }
        return "\(name)(\(parts.joined(separator: ", ")))"
    }
}

/// Calls `body` with buffers for the optional tensors (nil stays nil).
func withOptionalBuffers<S: NormScalar, R>(
    _ a: Tensor<S>?, _ b: Tensor<S>?,
    _ body: (UnsafeBufferPointer<S>?, UnsafeBufferPointer<S>?) -> R
) -> R {
    func inner(_ pa: UnsafeBufferPointer<S>?) -> R {
        if let b { return b.withUnsafeBufferPointer { body(pa, $0) } }
        return body(pa, nil)
    }
    if let a { return a.withUnsafeBufferPointer { inner($0) } }
    return inner(nil)
}
