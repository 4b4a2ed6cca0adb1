import Foundation
import NormKernels
import TensorCore

/// Switchable Normalization: normalizes with a learned mixture of instance, layer and batch
/// statistics; with `weighting: .sparsestMax` it is Sparse Switchable Normalization.
///
/// ```
/// μ = w₀·μ_IN + w₁·μ_LN + w₂·μ_BN,   σ² = w′₀·σ²_IN + w′₁·σ²_LN + w′₂·σ²_BN
/// y = γ_c · (x − μ) / √(σ² + ε) + β_c,   w = softmax(mean logits), w′ = softmax(variance logits)
/// ```
/// Every statistic comes from the per-(sample, channel) ones, as in the official code
/// (switchablenorms/Switchable-Normalization, `SwitchNorm2d`): σ²_IN is the *unbiased* variance
/// over the spatial positions; with t = σ²_IN + μ²_IN, μ_LN = mean_c μ_IN and
/// σ²_LN = mean_c t − μ²_LN (per sample), μ_BN = mean_n μ_IN and σ²_BN = mean_n t − μ²_BN (per
/// channel), so σ²_LN and σ²_BN mix L- and (L − 1)-normalised terms exactly as the official code
/// does. NormKit evaluates mean_c t − μ² as mean_c σ²_IN + mean_c (μ_IN − μ)², the same number
/// without the cancellation.
///
/// Running statistics keep only the BN pair, with the "keep" convention
/// (`r ← 0.9·r + 0.1·s`, both buffers starting at 0), or, with `.batchAverage`, accumulate
/// Σ μ_BN and Σ (μ²_BN + σ²_BN) over the batches and use their average (the paper's "batch
/// average", whose finalisation the official code leaves out: ``finalizeBatchAverage()``).
/// Inference takes IN and LN statistics from the input and BN statistics from the running
/// estimates.
///
/// Differences from the official code, all where it fails: one spatial position (1×1 maps,
/// rank-2 input) gives σ²_IN = 0 instead of NaN; any rank ≥ 2 works. `usesBatchNorm: false`
/// mixes IN and LN only (two logits; the official setting for one image per GPU).
///
/// Sparse SN (`weighting: .sparsestMax`) replaces softmax by ``SparsestMax`` with radius
/// ``radius`` (the official `radius` buffer); ``advanceRadius()`` moves it linearly from 0 to 1
/// over ``radiusSteps`` training steps, and a weight vector that becomes one-hot is frozen (its
/// logits are set to it and no longer receive gradients), as in
/// switchablenorms/Sparse_SwitchNorm.
///
/// ## Shape
/// Input `[N, C, spatial…]` (or channels-last), any rank ≥ 2; output the same. Parameters and
/// running statistics `[C]`; logits `[3]` (`[2]` without BN).
///
/// ## References
/// 1. Luo, Ren, Peng, Zhang & Li 2019, "Differentiable Learning-to-Normalize via Switchable
///    Normalization", arXiv:1806.10779.
/// 2. Shao et al. 2019, "SSN: Learning Sparse Switchable Normalization via SparsestMax",
///    arXiv:1903.03793.
public final class SwitchableNorm<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// How importance weights come from logits.
    public enum Weighting: String, Sendable, Hashable {
        /// softmax (Switchable Normalization).
        case softmax
        /// SparsestMax with the layer's radius (Sparse Switchable Normalization).
        case sparsestMax
    }

    /// What the running statistics hold.
    public enum RunningEstimate: String, Sendable, Hashable {
        /// Exponential moving average (`using_moving_average=True`).
        case movingAverage
        /// Sums over batches, averaged at inference (`using_moving_average=False`).
        case batchAverage
    }

    /// C.
    public let channelCount: Int
    /// ε inside the square root (1e-5).
    public let epsilon: Double
    /// Where the channel axis is.
    public let layout: Layout
    /// Whether batch statistics take part (three components) or not (IN and LN only).
    public let usesBatchNorm: Bool
    /// softmax or SparsestMax.
    public let weighting: Weighting
    /// Moving or batch average.
    public let runningEstimate: RunningEstimate

    /// γ and β (`weight`, `bias`).
    public var affine: ChannelAffine<Scalar>
    /// The mean mixture's logits (IN, LN, BN; `mean_weight`) and Sparse SN's `mean_fixed`.
    public var meanMixture: MixtureLogits<Scalar>
    /// The variance mixture's logits (`var_weight`) and Sparse SN's `var_fixed`.
    public var varianceMixture: MixtureLogits<Scalar>
    /// Running BN mean (or Σ μ_BN); `running_mean`, initially 0.
    public var runningMean: Tensor<Scalar>
    /// Running BN variance (or Σ (μ²_BN + σ²_BN)); `running_var`, initially 0.
    public var runningVariance: Tensor<Scalar>
    /// The moving average's rule; its batch counter counts only for `.cumulative` (the official
    /// code keeps no counter, and none is saved).
    public var runningAverage: RunningAverage
    /// The update rule of the moving average (official: keep 0.9 for 2-D maps, 0.997 otherwise).
    public var momentum: Momentum {
        get { runningAverage.momentum }
        set { runningAverage.momentum = newValue }
    }
    /// Batches accumulated by `.batchAverage`.
    public var accumulatedBatches = 0
    /// SparsestMax radius (`radius` buffer).
    public var radius = 0.0
    /// A radius that wins over a loaded one (the CLI's `--radius`); nil: loads set the radius.
    public var radiusOverride: Double? {
        didSet { if let radiusOverride { radius = radiusOverride } }
    }
    /// Training steps over which ``advanceRadius()`` moves the radius from 0 to 1.
    public var radiusSteps: Int
    /// Steps taken by ``advanceRadius()``.
    public private(set) var radiusStep = 0
    /// Whether the mean weights are frozen one-hot (Sparse SN).
    public var isMeanFixed: Bool { meanMixture.isFrozen }
    /// Whether the variance weights are frozen one-hot (Sparse SN).
    public var isVarianceFixed: Bool { varianceMixture.isFrozen }
    /// Which kernels run the passes over the data.
    public var kernels = KernelChoice.automatic
    /// Synchronizes the BN branch over these processes in training.
    ///
    /// This is the official "Sync SN" (`syncsn_layer.py`): μ_BN and σ²_BN span every rank's
    /// samples, merged exactly with Chan's formula (``Moments``) so that uneven batches and
    /// empty ranks work, and backward all-reduces Σ_n dμ and Σ_n dσ² (one 2·C buffer). IN and
    /// LN statistics are per sample and stay local; parameter gradients stay local
    /// (data-parallel training sums them).
    public var communicator: (any Communicator)?

    /// Creates a Switchable (or Sparse Switchable) Normalization layer.
    ///
    /// - Parameters:
    ///   - channelCount: C.
    ///   - epsilon: ε.
    ///   - momentum: the keep-convention rule, `.keep(0.9)` as `SwitchNorm2d`.
    ///   - usesBatchNorm: three components (true) or IN and LN only.
    ///   - runningEstimate: moving or batch average.
    ///   - zeroInitialScale: γ = 0 (`last_gamma`, for the last normalizer of a residual block).
    ///   - weighting: softmax or SparsestMax.
    ///   - radiusSteps: steps for the SparsestMax radius to go from 0 to 1.
    ///   - layout: channel axis.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, epsilon: Double = 1e-5, momentum: Momentum = .keep(0.9),
        usesBatchNorm: Bool = true, runningEstimate: RunningEstimate = .movingAverage,
        zeroInitialScale: Bool = false, weighting: Weighting = .softmax, radiusSteps: Int = 1,
        layout: Layout = .channelsFirst
    ) throws(NormError) {
        guard channelCount >= 1 else {
            throw .invalidHyperparameter(
                name: "channel count", value: "\(channelCount)", requirement: "must be ≥ 1")
        }
        try HyperparameterCheck.epsilon(epsilon)
        guard radiusSteps >= 1 else {
            throw .invalidHyperparameter(
                name: "radius steps", value: "\(radiusSteps)", requirement: "must be ≥ 1")
        }
        try momentum.validate()
        self.channelCount = channelCount
        self.epsilon = epsilon
        self.usesBatchNorm = usesBatchNorm
        self.runningEstimate = runningEstimate
        self.weighting = weighting
        self.radiusSteps = radiusSteps
        self.layout = layout
        let k = usesBatchNorm ? 3 : 2
        affine = try ChannelAffine(channelCount: channelCount, zeroInitialScale: zeroInitialScale)
        meanMixture = try MixtureLogits(componentCount: k)
        varianceMixture = try MixtureLogits(componentCount: k)
        runningAverage = RunningAverage(momentum: momentum)
        do {
            runningMean = try Tensor(zeros: [channelCount])
            runningVariance = try Tensor(zeros: [channelCount])
        } catch { throw .tensor(error) }
    }

    var name: String { weighting == .softmax ? "SwitchableNorm" : "SparseSwitchableNorm" }
    var componentNames: [String] { usesBatchNorm ? ["IN", "LN", "BN"] : ["IN", "LN"] }

    /// SN as a configuration of the mixture engine: IN, LN and (optionally) BN aggregations.
    var engine: MixtureEngine {
        MixtureEngine(
            channelCount: channelCount,
            components: usesBatchNorm ? [.instance, .layer, .batchNorm] : [.instance, .layer],
            epsilon: epsilon, layer: name)
    }

    // MARK: - Importance weights

    /// softmax, or SparsestMax at the current radius.
    var mixtureWeighting: MixtureWeighting {
        weighting == .softmax ? .softmax : .sparsestMax(radius: radius)
    }

    /// The current importance weights, as data: component names with mean and variance
    /// weights (what the layer has learned to use).
    public var importanceWeights: (components: [String], mean: [Double], variance: [Double]) {
        (
            componentNames, meanMixture.evaluate(mixtureWeighting).weights,
            varianceMixture.evaluate(mixtureWeighting).weights
        )
    }

    /// One line per mixture.
    ///
    /// For example `mean: IN 0.210 LN 0.350 BN 0.440`.
    public var importanceSummary: String {
        let weights = importanceWeights
        func line(_ label: String, _ w: [Double]) -> String {
            var parts: [String] = []
            for (name, value) in zip(weights.components, w) {
                parts.append("\(name) " + String(format: "%.3f", value))
            }
            return label + ": " + parts.joined(separator: " ")
        }
        return line("mean", weights.mean) + "\n" + line("variance", weights.variance)
    }

    /// Moves the SparsestMax radius one step along its linear schedule (call once per training
    /// iteration, as the official training loop sets `radius` before every iteration).
    public func advanceRadius() {
        radiusStep += 1
        radius = min(Double(radiusStep) / Double(radiusSteps), 1)
    }

    /// Averages the accumulated batch statistics into running statistics (`.batchAverage`):
    /// mean = Σμ/K, variance = Σ(μ² + σ²)/K − mean², after which inference uses them directly.
    public func finalizeBatchAverage() throws(NormError) {
        guard runningEstimate == .batchAverage, accumulatedBatches > 0 else { return }
        let (mean, variance) = batchAverages()
        do {
            runningMean = try Tensor(shape: [channelCount], rounding: mean)
            runningVariance = try Tensor(shape: [channelCount], rounding: variance)
        } catch { throw .tensor(error) }
        accumulatedBatches = 0
        finalized = true
    }

    /// True once the batch average has been finalised into the running buffers.
    var finalized = false

    func batchAverages() -> ([Double], [Double]) {
        let k = Double(max(accumulatedBatches, 1))
        let mean = runningMean.scalars.map { Double($0) / k }
        let variance = zip(runningVariance.scalars, mean).map { Double($0.0) / k - $0.1 * $0.1 }
        return (mean, variance)
    }

    // MARK: - Forward

    /// What forward keeps for backward.
    public typealias Cache = MixtureCache<Scalar>
    /// Gradients of a scalar loss.
    public typealias Gradients = MixtureGradients<Scalar>

    /// Normalizes `x`; in training mode updates the running BN statistics.
    ///
    /// An empty batch (N = 0) gives an empty output and leaves the running statistics as they
    /// are, as PyTorch's normalizers do; a synchronized rank with no samples still takes part
    /// in the exchange.
    /// - Throws: ``NormError`` for a wrong rank, channel count or parameter shape, or non-finite
    ///   batch statistics (nothing changes then).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws(NormError) -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        let synchronizing = mode == .training && usesBatchNorm ? communicator : nil
        let reduction = synchronizing.map { StatisticsReduction.allReduced($0) } ?? .local
        let engine = self.engine
        let validated = Result { () throws(NormError) in
            try engine.validate(x.shape, layout: layout, allowingEmptyBatch: true)
            try validateParameters()
        }
        if case .failure(let error) = validated, synchronizing != nil {
            // The other ranks are about to exchange BN statistics: tell them, then fail.
            _ = try? reduction.merged(.failure(error))
        }
        try validated.get()
        let (plan, indexing, spatial) = engine.instancePlan(x.shape, layout: layout)
        if x.count == 0 && synchronizing == nil {
            if mode == .training && usesBatchNorm && runningEstimate == .movingAverage {
                runningAverage.countEmptyBatch(countingEveryBatch: false)
            }
            return try engine.emptyBatch(x, plan: plan, spatial: spatial, unbiased: true)
        }
        let (m, v) = engine.instanceMoments(
            x, plan: plan, indexing: indexing, spatial: spatial, unbiased: true, kernels: kernels)
        var sources: [MixtureEngine.Source] = [.batch, .batch]
        if usesBatchNorm {
            if !mode.usesRunningStatistics {
                sources.append(.batch)
            } else if runningEstimate == .batchAverage && !finalized {
                let (mean, variance) = batchAverages()
                sources.append(.fixed(mean: mean, variance: variance))
            } else {
                sources.append(
                    .fixed(
                        mean: runningMean.scalars.map(Double.init),
                        variance: runningVariance.scalars.map(Double.init)))
            }
        }
        let meanWeights = meanMixture.evaluate(mixtureWeighting)
        let varianceWeights = varianceMixture.evaluate(mixtureWeighting)
        let statistics = try engine.forward(
            m: m, v: v, n: x.shape[0], sources: sources, meanWeights: meanWeights,
            varianceWeights: varianceWeights, reduction: reduction, shape: x.shape)
        let y = try engine.apply(
            x, plan: plan, indexing: indexing, statistics: statistics, affine: affine,
            kernels: kernels)
        // Running statistics (training only, all-or-nothing after every check).
        if mode == .training && usesBatchNorm,
            let batch = statistics.channelStatistics(
                2, components: engine.components, channels: channelCount)
        {
            try updateRunning(muBN: batch.mean, varBN: batch.variance)
        }
        if mode == .training && weighting == .sparsestMax {
            _ = meanMixture.freezeIfOneHot(meanWeights.weights)
            _ = varianceMixture.freezeIfOneHot(varianceWeights.weights)
        }
        let cache = Cache(
            input: x, plan: plan, spatial: spatial, statistics: statistics,
            unbiasedInstanceVariance: true)
        return (y, cache)
    }

    func updateRunning(muBN: [Double], varBN: [Double]) throws(NormError) {
        switch runningEstimate {
        case .movingAverage:
            let current = RunningStatistics(
                mean: runningMean, variance: runningVariance,
                batchesTracked: runningAverage.batchesTracked, momentum: momentum)
            guard
                let updated = current.updated(
                    batchMean: muBN, batchVariance: varBN, countingEveryBatch: false)
            else { throw .nonFiniteStatistics(layer: name) }
            (runningMean, runningVariance) = (updated.mean, updated.variance)
            runningAverage = updated.average
        case .batchAverage:
            var newMean = runningMean.scalars.map(Double.init)
            var newVariance = runningVariance.scalars.map(Double.init)
            for j in 0..<channelCount {
                newMean[j] += muBN[j]
                newVariance[j] += muBN[j] * muBN[j] + varBN[j]
            }
            guard newMean.allSatisfy(\.isFinite), newVariance.allSatisfy(\.isFinite) else {
                throw .nonFiniteStatistics(layer: name)
            }
            do {
                runningMean = try Tensor(shape: [channelCount], rounding: newMean)
                runningVariance = try Tensor(shape: [channelCount], rounding: newVariance)
            } catch { throw .tensor(error) }
            accumulatedBatches += 1
            finalized = false
        }
    }

    // MARK: - Backward

    /// Back-propagates through the forward call that produced `cache` (``MixtureEngine``).
    ///
    /// With g = dy·γ, per (n, c): dμ = −rstd·Σg, dσ² = −½·rstd³·Σg·(x − μ); they split over the
    /// components by the weights and flow back through σ²_LN, σ²_BN to μ_IN and σ²_IN, and then
    /// `dx = rstd·g + dμ_IN/L + dσ²_IN·2(x − μ_IN)/(L − 1)`. The logits receive Jᵀa with
    /// a_k = Σ dμ·μ_k (J the softmax or SparsestMax Jacobian). In inference the BN statistics
    /// are constants. Synchronized, Σ_n dμ and Σ_n dσ² are all-reduced (one 2·C buffer).
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws(NormError) -> Gradients {
        try engine.backward(
            dy, cache: cache, affine: affine, layout: layout, kernels: kernels,
            reduction: communicator.map { .allReduced($0) } ?? .local)
    }

    // MARK: - State

    /// Parameters and buffers under the official implementation's `state_dict` names.
    func stateDictionary() -> [String: Tensor<Scalar>] {
        var tensors: [String: Tensor<Scalar>] = [
            "weight": scale, "bias": offset, "mean_weight": meanLogits,
            "var_weight": varianceLogits,
            "running_mean": runningMean, "running_var": runningVariance,
        ]
        if weighting == .sparsestMax {
            tensors["radius"] = Tensor([Scalar(radius)])
            tensors["mean_fixed"] = Tensor([isMeanFixed ? 1 : 0])
            tensors["var_fixed"] = Tensor([isVarianceFixed ? 1 : 0])
        }
        return tensors
    }

    /// Loads parameters and buffers by their official names; any shape with the right number of
    /// elements is accepted (the official buffers are `[1, C, 1]`).
    /// - Throws: ``NormError/unknownParameter(layer:key:known:)``,
    ///   ``NormError/parameterShapeMismatch(name:expected:actual:)``, or
    ///   ``NormError/invalidHyperparameter(name:value:requirement:)`` for a negative or
    ///   non-finite `running_var` or a radius outside [0, 1]; nothing is loaded then.
    public func load(_ tensors: [String: Tensor<Scalar>]) throws(NormError) {
        let k = usesBatchNorm ? 3 : 2
        let expected: [String: Int] = [
            "weight": channelCount, "bias": channelCount, "mean_weight": k, "var_weight": k,
            "running_mean": channelCount, "running_var": channelCount, "radius": 1, "mean_fixed": 1,
            "var_fixed": 1,
        ]
        // Values are checked before anything is loaded.
        if let t = tensors["running_var"] { try HyperparameterCheck.runningVariance(t) }
        if let t = tensors["radius"] {
            try HyperparameterCheck.finite(Double(t.scalars[0]), in: 0...1, name: "radius")
        }
        let flat = try loadMixtureParameters(tensors, expected: expected, layer: name)
        if let t = flat["running_mean"] { runningMean = t }
        if let t = flat["running_var"] { runningVariance = t }
        if let t = tensors["radius"] { radius = radiusOverride ?? Double(t.scalars[0]) }
        // Sparse SN's frozen flags (the official LongTensor buffers): the logits are then the
        // one-hot weights themselves.
        if let t = tensors["mean_fixed"] { meanMixture.isFrozen = t.scalars[0] != 0 }
        if let t = tensors["var_fixed"] { varianceMixture.isFrozen = t.scalars[0] != 0 }
    }

    // MARK: - Helpers

    /// γ, β, the running buffers and the logits have the shapes the configuration needs.
    func validateParameters() throws(NormError) {
        try affine.validate(channelCount: channelCount)
        for (label, t) in [("running_mean", runningMean), ("running_var", runningVariance)]
        where t.shape != [channelCount] {
            throw .parameterShapeMismatch(name: label, expected: [channelCount], actual: t.shape)
        }
        try engine.validateLogits(meanLogits, varianceLogits)
    }

    /// One line with the configuration.
    public var description: String {
        "\(name)(\(channelCount), eps=\(epsilon), \(momentum), using_bn=\(usesBatchNorm), "
            + "\(runningEstimate.rawValue), layout=\(layout))"
    }
}
