import Foundation
import TensorCore

/// The registry lines of the normalizers in this module. `NormalizerRegistry.all` (NormKit)
/// adds the whitening layers and anything else above.
extension NormalizerRegistry {
    /// The standard, learned and Kalman normalizers.
    public static let builtin: [NormalizerEntry] =
        StandardLayer.allCases.map { layer in
            NormalizerEntry(
                layer.rawValue, aliases: layer.aliases, summary: layer.summary,
                builder: StandardBuilder(layer: layer))
        } + [
            NormalizerEntry(
                "switchnorm", aliases: ["sn"],
                summary: "Switchable Normalization (softmax over IN, LN, BN)",
                builder: SwitchableBuilder(sparse: false)),
            NormalizerEntry(
                "sparseswitchnorm", aliases: ["ssn"],
                summary: "Sparse Switchable Normalization (SparsestMax weights)",
                builder: SwitchableBuilder(sparse: true)),
            NormalizerEntry(
                "metanorm", aliases: ["meta"],
                summary: "Meta Normalization (learned mixture of aggregations)",
                builder: MetaNormBuilder()),
            NormalizerEntry(
                "ibn",
                summary: "IBN-a: InstanceNorm on a share of the channels, BatchNorm on the rest",
                builder: IBNBuilder()),
            NormalizerEntry(
                "batchrenorm", aliases: ["brn"],
                summary: "Batch Renormalization (r, d corrections)",
                builder: BatchRenormBuilder()),
            NormalizerEntry(
                "kalmannorm", aliases: ["kn"],
                summary: "Kalman Normalization (a single layer is the first of its chain)",
                builder: KalmanBuilder()),
        ]
}

extension StandardLayer {
    /// Short names the training harness has always accepted.
    var aliases: [String] {
        switch self {
        case .batchnorm: return ["bn"]
        case .layernorm: return []
        case .layernorm2d: return ["ln"]
        case .instancenorm: return ["in"]
        case .groupnorm: return ["gn"]
        case .rmsnorm: return ["rms"]
        }
    }

    var summary: String {
        switch self {
        case .batchnorm: return "BatchNorm: per channel over (N, spatial)"
        case .layernorm: return "LayerNorm over the last K dimensions (elementwise affine)"
        case .layernorm2d: return "LayerNorm over (C, spatial) with per-channel affine"
        case .instancenorm: return "InstanceNorm: per (sample, channel) over the spatial axes"
        case .groupnorm: return "GroupNorm: per (sample, group of channels)"
        case .rmsnorm: return "RMSNorm over the last K dimensions"
        }
    }
}

struct StandardBuilder: NormalizerBuilder {
    let layer: StandardLayer

    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        var options = LayerOptions()
        options.epsilon = o.epsilon
        options.momentum = o.momentum ?? .pytorchDefault
        options.groups = o.groups
        if layer == .groupnorm, o.groups == nil {
            // No group count given: 32 (the GroupNorm paper's default), or the largest divisor
            // of the channel count below it.
            let channels = try request.channelCount(layer: "GroupNorm")
            var g = max(1, min(32, channels))
            while channels % g != 0 { g -= 1 }
            options.groups = g
        }
        options.layout = o.layout
        options.affine = o.affine
        options.trackRunningStatistics = o.trackRunningStatistics
        // LayerNorm and RMSNorm: without an explicit K, the weight's rank says how many trailing
        // dimensions PyTorch's normalized_shape had.
        if let k = o.normalizedDims {
            options.normalizedDims = k
        } else if let weight = request.parameterShapes["weight"], !weight.isEmpty {
            options.normalizedDims = weight.count
        }
        return try layer.make(
            inputShape: request.inputShape, options: options,
            parameterNames: Set(request.parameterShapes.keys), as: T.self)
    }
}

struct SwitchableBuilder: NormalizerBuilder {
    let sparse: Bool

    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        let channels = try request.channelCount(layer: "SwitchableNorm")
        // Two mixture weights in the file mean the official `using_bn=False` (IN and LN only).
        let usesBN =
            try o.bool("using-bn")
            ?? (request.parameterShapes["mean_weight"].map { $0.reduce(1, *) != 2 } ?? true)
        // The official SwitchNorm keeps 0.9 of the running value in 2-D and 0.997 otherwise;
        // `momentum` here is that keep value, as in the official constructor.
        let keep = try o.double("momentum") ?? (request.inputShape.count == 4 ? 0.9 : 0.997)
        let layer = try SwitchableNorm<T>(
            channelCount: channels, epsilon: o.epsilon ?? 1e-5, momentum: .keep(keep),
            usesBatchNorm: usesBN,
            runningEstimate: try o.bool("moving-average") ?? true ? .movingAverage : .batchAverage,
            weighting: sparse ? .sparsestMax : .softmax,
            radiusSteps: try o.int("radius-steps") ?? 1, layout: o.layout)
        if let radius = try o.double("radius") {
            try HyperparameterCheck.finite(radius, in: 0...1, name: "radius")
            layer.radiusOverride = radius
        }
        return layer
    }
}

struct MetaNormBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        let channels = try request.channelCount(layer: "MetaNorm")
        let aggregations: [StatisticsAggregation]
        if let list = o.values["aggregations"] {
            aggregations = try StatisticsAggregation.parseList(list)
        } else {
            // In, BN, LN and GroupNorm with the requested groups (2 by default), reduced to a
            // divisor of the channel count.
            var g = max(1, min(o.groups ?? 2, channels))
            while channels % g != 0 { g -= 1 }
            aggregations = [.instance, .batchNorm, .layer, .group(g)]
        }
        return try MetaNorm<T>(
            channelCount: channels, aggregations: aggregations, epsilon: o.epsilon ?? 1e-5,
            layout: o.layout)
    }
}

struct IBNBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        return try IBN<T>(
            channelCount: try request.channelCount(layer: "IBN"),
            ratio: try o.double("ratio") ?? 0.5,
            epsilon: o.epsilon ?? 1e-5, layout: o.layout)
    }
}

struct BatchRenormBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        return try BatchRenorm<T>(
            channelCount: try request.channelCount(layer: "BatchRenorm"),
            epsilon: o.epsilon ?? 1e-5,
            momentum: .exponential(weightOfNew: try o.double("momentum") ?? 0.01),
            limits: .fixed(rMax: try o.double("rmax") ?? 3, dMax: try o.double("dmax") ?? 5),
            layout: o.layout)
    }
}

struct KalmanBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        guard request.options.layout == .channelsFirst else {
            throw NormError.invalidHyperparameter(
                name: "layout", value: "nhwc", requirement: "Kalman Normalization is channels-first"
            )
        }
        return try KalmanNorm<T>(
            channelCount: try request.channelCount(layer: "KalmanNorm"), chain: KalmanChain(),
            epsilon: request.options.epsilon ?? 1e-5)
    }
}

extension StatisticsAggregation {
    /// Parses `in,bn,ln,gn2,whole,bgn2`.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` naming the item.
    public static func parseList(_ list: String) throws(NormError) -> [StatisticsAggregation] {
        var out: [StatisticsAggregation] = []
        for raw in list.split(separator: ",", omittingEmptySubsequences: false) {
            let item = raw.trimmingCharacters(in: .whitespaces).lowercased()
            switch item {
            case "in": out.append(.instance)
            case "bn": out.append(.batchNorm)
            case "ln": out.append(.layer)
            case "whole": out.append(StatisticsAggregation(batch: .all, channel: .all))
            default:
                if item.hasPrefix("gn"), let g = Int(item.dropFirst(2)), g >= 1 {
                    out.append(.group(g))
                } else if item.hasPrefix("bgn"), let g = Int(item.dropFirst(3)), g >= 1 {
                    out.append(StatisticsAggregation(batch: .all, channel: .groups(g)))
                } else {
                    throw .invalidHyperparameter(
                        name: "aggregations", value: item,
                        requirement: "use in, bn, ln, gnG, whole or bgnG, separated by commas")
                }
            }
        }
        return out
    }
}
