import Foundation
import NormKernels
import TensorCore

/// Meta Normalization: statistics of every (sample, channel) aggregated over the batch by U and
/// over channels by V, the matrix form in which IN, BN, LN and GN are particular (U, V), with a
/// learned mixture over several (U, V).
///
/// ```
/// M[n,c] = μ_IN,  Q[n,c] = E_s[x²] (biased),  Ū = diag(U1)⁻¹U,  V̄ = V diag(1ᵀV)⁻¹
/// μ_k = Ū_k M V̄_k,   σ²_k = Ū_k Q V̄_k − μ_k²            (per aggregation k)
/// μ = Σ_k softmax(a)_k μ_k,   σ² = Σ_k softmax(b)_k σ²_k,   y = γ_c (x − μ)/√(σ² + ε) + β_c
/// IN: U = I, V = I   BN: U = 11ᵀ, V = I   LN: U = I, V = 11ᵀ   GN(G): U = I, V = I_G ⊗ 11ᵀ
/// ```
/// U and V here are binary block structures (an equivalence relation each), so Ū M V̄ is the
/// mean of M over a block of (sample, channel) pairs, and σ²_k is computed as the block mean of
/// σ²_IN + (M − μ_k)², the same number without cancellation.
///
/// **What is learned, and how.** The binary U, V cannot be learned by gradient; NormKit relaxes
/// them to convex combinations of the aggregations in ``aggregations`` (a dictionary the user
/// chooses, by default IN, BN, LN and GN(2)): the mixture weights softmax(a) for means and
/// softmax(b) for variances are trained by gradient, as Switchable Normalization trains its
/// three. A single aggregation is a fixed (U, V) and reproduces the corresponding layer
/// exactly (tested). This is our construction: the Dynamic Normalization paper's own learning
/// rule could not be checked (normalizers-spec.md §8).
///
/// Running statistics: for aggregations that pool the batch (U = 11ᵀ), μ_k and σ²_k (per
/// channel block) are tracked with PyTorch's convention (`r ← 0.9·r + 0.1·s`, initially 0 and 1)
/// and replace the batch values in inference; per-sample aggregations always use the input.
///
/// ## Shape
/// Input `[N, C, spatial…]` (or channels-last), rank ≥ 2; output the same; γ, β `[C]`.
///
/// ## References
/// 1. Luo et al. 2019, "Differentiable Dynamic Normalization for Learning Deep Representation",
///    ICML 2019 (the matrix formulation).
/// 2. Luo, Ren, Peng, Zhang & Li 2019, arXiv:1806.10779 (learned mixtures of statistics).
public final class MetaNorm<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// One (U, V); see ``StatisticsAggregation``.
    public typealias Aggregation = StatisticsAggregation

    /// C.
    public let channelCount: Int
    /// The dictionary of aggregations the mixture is learned over.
    public let aggregations: [Aggregation]
    /// ε.
    public let epsilon: Double
    /// Channel axis.
    public let layout: Layout
    /// γ and β (`weight`, `bias`).
    public var affine: ChannelAffine<Scalar>
    /// Mean-mixture logits (`mean_weight`), one per aggregation, initially 1.
    public var meanMixture: MixtureLogits<Scalar>
    /// Variance-mixture logits (`var_weight`).
    public var varianceMixture: MixtureLogits<Scalar>
    /// The rule of the running estimates (counting batches only for `.cumulative`).
    public var runningAverage: RunningAverage
    /// Running μ_k per channel for each aggregation (only batch-pooling ones are used).
    public var runningMean: [[Double]]
    /// Running σ²_k per channel for each aggregation.
    public var runningVariance: [[Double]]
    /// Kernels.
    public var kernels = KernelChoice.automatic

    /// Running-statistic rule for batch-pooling aggregations.
    public var momentum: Momentum {
        get { runningAverage.momentum }
        set { runningAverage.momentum = newValue }
    }

    /// Creates a MetaNorm layer over a dictionary of aggregations.
    /// - Throws: ``NormError`` when the dictionary is empty or a group count does not divide C.
    public init(
        channelCount: Int,
        aggregations: [Aggregation] = [.instance, .batchNorm, .layer, .group(2)],
        epsilon: Double = 1e-5, momentum: Momentum = .pytorchDefault,
        layout: Layout = .channelsFirst
    ) throws(NormError) {
        guard channelCount >= 1, !aggregations.isEmpty else {
            throw .invalidHyperparameter(
                name: "MetaNorm",
                value: "\(channelCount) channels, \(aggregations.count) aggregations",
                requirement: "needs channels and at least one aggregation")
        }
        for a in aggregations {
            if case .groups(let g) = a.channel, g < 1 || channelCount % g != 0 {
                throw .groupsDoNotDivideChannels(groups: g, channels: channelCount)
            }
        }
        try HyperparameterCheck.epsilon(epsilon)
        try momentum.validate()
        self.channelCount = channelCount
        self.aggregations = aggregations
        self.epsilon = epsilon
        self.layout = layout
        runningAverage = RunningAverage(momentum: momentum)
        affine = try ChannelAffine(channelCount: channelCount)
        meanMixture = try MixtureLogits(componentCount: aggregations.count)
        varianceMixture = try MixtureLogits(componentCount: aggregations.count)
        runningMean = aggregations.map { _ in [Double](repeating: 0, count: channelCount) }
        runningVariance = aggregations.map { _ in [Double](repeating: 1, count: channelCount) }
    }

    /// The learned mixture weights, as data.
    public var importanceWeights: (components: [String], mean: [Double], variance: [Double]) {
        (
            aggregations.map(\.description), meanMixture.evaluate(.softmax).weights,
            varianceMixture.evaluate(.softmax).weights
        )
    }

    /// MetaNorm as a configuration of the mixture engine: the dictionary of aggregations.
    var engine: MixtureEngine {
        MixtureEngine(
            channelCount: channelCount, components: aggregations, epsilon: epsilon,
            layer: "MetaNorm")
    }

    /// What forward keeps for backward.
    public typealias Cache = MixtureCache<Scalar>
    /// Gradients.
    public typealias Gradients = MixtureGradients<Scalar>

    /// Normalizes `x`; in training mode updates the running statistics of batch-pooling
    /// aggregations.
    ///
    /// An empty batch (N = 0) gives an empty output and leaves the running statistics as they
    /// are, as PyTorch's normalizers do.
    /// - Throws: ``NormError`` for a wrong rank, channel count or logit shape, or non-finite
    ///   statistics; nothing changes then.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws(NormError) -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        let engine = self.engine
        try engine.validate(x.shape, layout: layout, allowingEmptyBatch: true)
        try engine.validateLogits(meanLogits, varianceLogits)
        let (plan, indexing, spatial) = engine.instancePlan(x.shape, layout: layout)
        if x.count == 0 {
            if mode == .training { runningAverage.countEmptyBatch(countingEveryBatch: false) }
            return try engine.emptyBatch(x, plan: plan, spatial: spatial, unbiased: false)
        }
        let (m, v) = engine.instanceMoments(
            x, plan: plan, indexing: indexing, spatial: spatial, unbiased: false, kernels: kernels)
        let sources = aggregations.indices.map { index -> MixtureEngine.Source in
            aggregations[index].batch == .all && mode.usesRunningStatistics
                ? .fixed(mean: runningMean[index], variance: runningVariance[index]) : .batch
        }
        let statistics = try engine.forward(
            m: m, v: v, n: x.shape[0], sources: sources,
            meanWeights: meanMixture.evaluate(.softmax),
            varianceWeights: varianceMixture.evaluate(.softmax), communicator: nil,
            shape: x.shape)
        let y = try engine.apply(
            x, plan: plan, indexing: indexing, statistics: statistics, affine: affine,
            kernels: kernels)
        if mode == .training {
            var average = runningAverage
            let f = average.advance(countingEveryBatch: false)
            for index in aggregations.indices {
                guard
                    let batch = statistics.channelStatistics(
                        index, components: aggregations, channels: channelCount)
                else { continue }
                runningMean[index] = RunningAverage.blend(
                    runningMean[index], toward: batch.mean, weightOfNew: f)
                runningVariance[index] = RunningAverage.blend(
                    runningVariance[index], toward: batch.variance, weightOfNew: f)
            }
            runningAverage = average
        }
        let cache = Cache(
            input: x, plan: plan, spatial: spatial, statistics: statistics,
            unbiasedInstanceVariance: false)
        return (y, cache)
    }

    /// Back-propagates through ``MixtureEngine``: each aggregation's gradient spread back over
    /// its blocks (dM += mean_B dμ_k + 2(M − μ_k)·mean_B dσ²_k, dσ²_IN += mean_B dσ²_k), then
    /// `dx = rstd·g + dM/L + dσ²_IN·2(x − M)/L`.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws(NormError) -> Gradients {
        try engine.backward(
            dy, cache: cache, affine: affine, layout: layout, kernels: kernels, communicator: nil)
    }

    /// Parameters by name (`weight`, `bias`, `mean_weight`, `var_weight`).
    func stateDictionary() -> [String: Tensor<Scalar>] {
        mixtureParameters(
            scale: scale, offset: offset, meanLogits: meanLogits, varianceLogits: varianceLogits)
    }

    /// Loads parameters by name.
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)``; nothing is loaded then.
    public func load(_ tensors: [String: Tensor<Scalar>]) throws(NormError) {
        let k = aggregations.count
        _ = try loadMixtureParameters(
            tensors,
            expected: [
                "weight": channelCount, "bias": channelCount, "mean_weight": k, "var_weight": k,
            ])
    }

    /// One line with the configuration.
    public var description: String {
        "MetaNorm(\(channelCount), aggregations=\(aggregations.map(\.description)), eps=\(epsilon), layout=\(layout))"
    }
}

/// One (U, V) of ``MetaNorm``: which samples and which channels pool their statistics.
public struct StatisticsAggregation: Sendable, Hashable, CustomStringConvertible {
    /// U: how samples share statistics.
    public enum BatchAggregation: String, Sendable, Hashable {
        /// U = I: each sample alone.
        case identity
        /// U = 11ᵀ: the whole batch.
        case all
    }

    /// V: how channels share statistics.
    public enum ChannelAggregation: Sendable, Hashable {
        /// V = I: each channel alone.
        case identity
        /// V = I_G ⊗ 11ᵀ: G groups of consecutive channels.
        case groups(Int)
        /// V = 11ᵀ: all channels.
        case all
    }

    /// U.
    public var batch: BatchAggregation
    /// V.
    public var channel: ChannelAggregation

    /// Creates an aggregation.
    public init(batch: BatchAggregation, channel: ChannelAggregation) {
        self.batch = batch
        self.channel = channel
    }

    /// InstanceNorm.
    public static let instance = StatisticsAggregation(batch: .identity, channel: .identity)
    /// BatchNorm.
    public static let batchNorm = StatisticsAggregation(batch: .all, channel: .identity)
    /// LayerNorm over (C, spatial).
    public static let layer = StatisticsAggregation(batch: .identity, channel: .all)
    /// GroupNorm.
    public static func group(_ g: Int) -> StatisticsAggregation {
        StatisticsAggregation(batch: .identity, channel: .groups(g))
    }

    /// A short name: IN, BN, LN, GN(G), or U/V.
    public var description: String {
        switch (batch, channel) {
        case (.identity, .identity): return "IN"
        case (.all, .identity): return "BN"
        case (.identity, .all): return "LN"
        case (.identity, .groups(let g)): return "GN(\(g))"
        case (.all, .all): return "whole"
        case (.all, .groups(let g)): return "batch-GN(\(g))"
        }
    }

    /// Channels per block for C channels.
    func channelBlock(_ c: Int) -> Int {
        switch channel {
        case .identity: return 1
        case .groups(let g): return c / g
        case .all: return c
        }
    }
}
