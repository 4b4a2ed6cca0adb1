import TensorCore

/// The standard layers by name, as `normkit apply` and experiment configurations name them.
public enum StandardLayer: String, CaseIterable, Sendable {
    /// ``BatchNorm``.
    case batchnorm
    /// ``LayerNorm`` over the last K dimensions.
    case layernorm
    /// ``LayerNorm`` over the channel axis.
    case layernorm2d
    /// ``InstanceNorm``.
    case instancenorm
    /// ``GroupNorm``.
    case groupnorm
    /// ``RMSNorm``.
    case rmsnorm

    /// Builds the layer for an input of this shape (channel count and normalized shape come
    /// from the input, as PyTorch's lazy modules infer them).
    ///
    /// - Parameters:
    ///   - parameterNames: the `state_dict` keys that will be loaded; InstanceNorm turns on
    ///     affine parameters and running statistics when they are present (PyTorch's defaults
    ///     have neither, so a default module's `state_dict` is empty).
    /// - Throws: ``NormError`` for a shape or option the layer cannot take.
    public func make<T: NormScalar>(
        inputShape: [Int], options: LayerOptions = LayerOptions(), parameterNames: Set<String> = [],
        as _: T.Type = T.self
    ) throws(NormError) -> NormLayer<T> {
        try StandardLayerFactory.make(
            self, inputShape: inputShape, options: options, parameterNames: parameterNames,
            as: T.self)
    }
}

/// How a standard layer is configured; shapes come from the input.
public struct LayerOptions: Sendable {
    /// ε; nil means the layer's PyTorch default (1e-5, or machine epsilon for RMSNorm).
    public var epsilon: Double?
    /// The running-statistic rule.
    public var momentum: Momentum = .pytorchDefault
    /// GroupNorm's G.
    public var groups: Int?
    /// LayerNorm's and RMSNorm's K.
    public var normalizedDims: Int = 1
    /// Whether a caller may infer ``normalizedDims`` from a parameter's rank (the CLI does when
    /// `--normalized-dims` is not given).
    public var inferNormalizedDims = false
    /// Channel axis.
    public var layout: Layout = .channelsFirst
    /// Affine parameters on/off; nil means the layer's PyTorch default (InstanceNorm: on when
    /// the parameter file has `weight` or `bias`).
    public var affine: Bool?
    /// Running statistics on/off; nil means the PyTorch default (InstanceNorm: on when the
    /// parameter file has `running_mean` or `running_var`).
    public var trackRunningStatistics: Bool?

    /// Default options.
    public init() {}
}

enum StandardLayerFactory {
    /// Builds the named layer for an input of this shape.
    static func make<T: NormScalar>(
        _ name: StandardLayer, inputShape shape: [Int], options: LayerOptions,
        parameterNames: Set<String>,
        as _: T.Type
    ) throws(NormError) -> NormLayer<T> {
        let rank = shape.count
        let channels =
            rank >= 2 ? shape[options.layout.channelAxis(rank: rank)] : (shape.first ?? 0)
        let eps = options.epsilon ?? 1e-5
        switch name {
        case .batchnorm:
            guard rank >= 2 else {
                throw .invalidRank(layer: "BatchNorm", expected: "rank ≥ 2 (N, C, …)", shape: shape)
            }
            return try BatchNorm<T>(
                featureCount: channels, epsilon: eps, momentum: options.momentum,
                affine: options.affine ?? true,
                trackRunningStatistics: options.trackRunningStatistics ?? true,
                layout: options.layout)
        case .instancenorm:
            guard rank >= 3 else {
                throw .invalidRank(
                    layer: "InstanceNorm", expected: "rank ≥ 3 (N, C, spatial…)", shape: shape)
            }
            let affine = options.affine ?? !parameterNames.isDisjoint(with: ["weight", "bias"])
            let track =
                options.trackRunningStatistics ?? !parameterNames.isDisjoint(with: [
                    "running_mean", "running_var",
                ])
            return try InstanceNorm<T>(
                featureCount: channels, epsilon: eps, momentum: options.momentum, affine: affine,
                trackRunningStatistics: track, layout: options.layout)
        case .groupnorm:
            guard let groups = options.groups else {
                throw .invalidHyperparameter(
                    name: "--groups", value: "missing",
                    requirement: "groupnorm needs the number of groups")
            }
            guard rank >= 2 else {
                throw .invalidRank(layer: "GroupNorm", expected: "rank ≥ 2 (N, C, …)", shape: shape)
            }
            return try GroupNorm<T>(
                groupCount: groups, channelCount: channels, epsilon: eps,
                affine: options.affine ?? true,
                layout: options.layout)
        case .layernorm, .rmsnorm:
            let k = options.normalizedDims
            guard k >= 1, k <= rank else {
                throw .invalidHyperparameter(
                    name: "--normalized-dims", value: "\(k)",
                    requirement: "must lie in 1…\(rank) for an input of shape \(shape)")
            }
            let normalized = Array(shape.suffix(k))
            if name == .layernorm {
                return try LayerNorm<T>(
                    normalizedShape: normalized, epsilon: eps,
                    elementwiseAffine: options.affine ?? true,
                    bias: options.affine ?? true)
            }
            return try RMSNorm<T>(
                normalizedShape: normalized, epsilon: options.epsilon,
                elementwiseAffine: options.affine ?? true)
        case .layernorm2d:
            guard rank >= 2 else {
                throw .invalidRank(
                    layer: "LayerNorm2d", expected: "rank ≥ 2 (N, C, …)", shape: shape)
            }
            return try LayerNorm<T>(
                channelCount: channels, epsilon: eps, affine: options.affine ?? true,
                layout: options.layout)
        }
    }
}
