import NormKit

/// The learned and composite normalizers `normkit apply` runs, with their official checkpoint
/// names.
public enum LearnedLayerName: String, CaseIterable, Sendable {
    /// ``SwitchableNorm`` with softmax (`weight`, `bias`, `mean_weight`, `var_weight`,
    /// `running_mean`, `running_var`).
    case switchnorm
    /// ``SwitchableNorm`` with SparsestMax (the same names, plus `radius`).
    case sparseswitchnorm
    /// ``MetaNorm`` (`weight`, `bias`, `mean_weight`, `var_weight`).
    case metanorm
    /// ``IBN`` (`IN.weight`, `IN.bias`, `BN.weight`, `BN.bias`, `BN.running_mean`,
    /// `BN.running_var`, `BN.num_batches_tracked`).
    case ibn
    /// ``BatchRenorm`` (`weight`, `bias`, `running_mean`, `running_std`, `num_batches_tracked`).
    case batchrenorm
    /// Decorrelated BN (`weight`, `bias`, `running_mean`, `running_projection` [G, d, d]).
    case dbn
    /// IterNorm (`weight`, `bias`, `running_mean`, `running_wm` [G, d, d]).
    case iternorm
    /// Switchable Whitening (`weight`, `bias`, `sw_mean_weight`, `sw_var_weight`,
    /// `running_mean`, `running_cov` [G, d, d]).
    case switchwhiten
    /// Kalman Normalization: a single layer has no predecessor and is BatchNorm, so `apply`
    /// refuses it and points to `batchnorm` (the chain is trained with `normkit train`).
    case kalmannorm
}

/// Options of the learned normalizers on the command line.
public struct LearnedOptions: Sendable {
    /// switchnorm: the keep value (default 0.9 for rank 4, 0.997 otherwise, as the official
    /// SwitchNorm2d/1d/3d); batchrenorm: α, the weight of the new batch (default 0.01).
    public var momentum: Double?
    /// switchnorm: three components or IN and LN only.
    public var usesBatchNorm: Bool?
    /// switchnorm: moving or batch average.
    public var movingAverage = true
    /// sparseswitchnorm: radius.
    public var radius: Double?
    /// ibn: ratio.
    public var ratio = 0.5
    /// metanorm: the aggregations.
    public var aggregations = "in,bn,ln,gn2"
    /// batchrenorm: r_max, d_max.
    public var rMax = 3.0
    /// batchrenorm: d_max.
    public var dMax = 5.0
    /// dbn, iternorm, switchwhiten: channels per group (nil: the layer's default).
    public var groupSize: Int?
    /// iternorm, switchwhiten: Newton iterations.
    public var iterations = 5
    /// switchwhiten: 2, 3 or 5.
    public var switchType = 5

    /// Defaults.
    public init(
        momentum: Double? = nil, usesBatchNorm: Bool? = nil, movingAverage: Bool = true,
        radius: Double? = nil,
        ratio: Double = 0.5, aggregations: String = "in,bn,ln,gn2", rMax: Double = 3,
        dMax: Double = 5
    ) {
        self.momentum = momentum
        self.usesBatchNorm = usesBatchNorm
        self.movingAverage = movingAverage
        self.radius = radius
        self.ratio = ratio
        self.aggregations = aggregations
        self.rMax = rMax
        self.dMax = dMax
    }

    /// Parses `in,bn,ln,gn2,whole,bgn2`.
    func parsedAggregations() throws -> [StatisticsAggregation] {
        try aggregations.split(separator: ",").map { raw in
            let item = raw.trimmingCharacters(in: .whitespaces).lowercased()
            switch item {
            case "in": return .instance
            case "bn": return .batchNorm
            case "ln": return .layer
            case "whole": return StatisticsAggregation(batch: .all, channel: .all)
            default:
                if item.hasPrefix("gn"), let g = Int(item.dropFirst(2)) { return .group(g) }
                if item.hasPrefix("bgn"), let g = Int(item.dropFirst(3)) {
                    return StatisticsAggregation(batch: .all, channel: .groups(g))
                }
                throw NormError.invalidHyperparameter(
                    name: "--aggregations", value: item,
                    requirement: "use in, bn, ln, gnG, whole or bgnG")
            }
        }
    }
}

/// One learned layer behind a uniform interface for `apply`.
struct LearnedAdapter<T: NormScalar> {
    var load: ([String: Tensor<T>], Int?) throws -> Void
    var forward: (Tensor<T>, Mode) throws -> Tensor<T>
    /// dL/dx and the parameter gradients by checkpoint name, for the last forward.
    var backward: (Tensor<T>) throws -> (Tensor<T>, [String: Tensor<T>])
    var state: () -> ([String: Tensor<T>], Int?)

    /// An adapter for a layer whose forward returns (output, cache): keeps the last cache for
    /// backward.
    init<Cache>(
        load: @escaping ([String: Tensor<T>], Int?) throws -> Void,
        forward: @escaping (Tensor<T>, Mode) throws -> (Tensor<T>, Cache),
        backward: @escaping (Tensor<T>, Cache) throws -> (Tensor<T>, [String: Tensor<T>]),
        state: @escaping () -> ([String: Tensor<T>], Int?)
    ) {
        var last: Cache?
        self.load = load
        self.forward = { x, mode in
            let (y, c) = try forward(x, mode)
            last = c
            return y
        }
        self.backward = { dy in
            guard let c = last else {
                throw NormError.gradientShapeMismatch(expected: [], actual: dy.shape)
            }
            return try backward(dy, c)
        }
        self.state = state
    }
}

extension ApplyRequest {
    func computeLearned<T: NormScalar>(_ x: Tensor<T>, state: Safetensors.File?) throws {
        guard let name = LearnedLayerName(rawValue: layer) else {
            throw NormError.invalidHyperparameter(
                name: "layer", value: layer, requirement: "unknown layer")
        }
        var tensors: [String: Tensor<T>] = [:]
        var counter: Int?
        for (key, array) in state?.tensors ?? [:] {
            if key.hasSuffix("num_batches_tracked") {
                guard case .int64(_, let values) = array, values.count == 1 else {
                    throw NormError.parameterShapeMismatch(
                        name: key, expected: [], actual: array.shape)
                }
                counter = Int(values[0])
                continue
            }
            // Integer buffers other than the counter: Sparse SN's mean_fixed / var_fixed flags.
            if case .int64 = array, !["mean_fixed", "var_fixed"].contains(key) {
                throw FileFormatError.wrongDType(name: key, expected: T.dtypeName, actual: "int64")
            }
            tensors[key] = array.tensor(as: T.self)
        }
        // Outputs keep the shapes the parameter file used (the official SwitchNorm2d stores γ as
        // [1, C, 1, 1] and its running buffers as [1, C, 1]).
        let shapes = tensors.mapValues(\.shape)
        func inputShape(_ key: String, _ t: Tensor<T>) -> Tensor<T> {
            guard let shape = shapes[key], shape != t.shape, let reshaped = try? t.reshaped(shape)
            else { return t }
            return reshaped
        }
        let adapter = try makeAdapter(name, x: x, parameters: tensors, as: T.self)
        try adapter.load(tensors, counter)
        let y = try adapter.forward(x, mode)
        var gradients: (Tensor<T>, [String: Tensor<T>])?
        if let gradOutput {
            gradients = try adapter.backward(
                try Numpy.read(contentsOf: gradOutput).tensor(as: T.self))
        }
        // Every computation succeeded: now write the outputs.
        try Numpy.write(y, to: output)
        if let gradients {
            if let gradInput { try Numpy.write(gradients.0, to: gradInput) }
            if let gradParams {
                var file = Safetensors.File()
                for (k, v) in gradients.1 { file.tensors[k] = .init(inputShape(k, v)) }
                try Safetensors.write(file, to: gradParams)
            }
        }
        if let updatedParams {
            let (tensors, counter) = adapter.state()
            var file = Safetensors.File()
            for (k, v) in tensors {
                if k == "mean_fixed" || k == "var_fixed" {
                    file.tensors[k] = .int64(
                        shape: [1], values: [v.scalars.first.map { $0 != 0 ? 1 : 0 } ?? 0])
                } else {
                    file.tensors[k] = .init(inputShape(k, v))
                }
            }
            if let counter {
                let key = name == .ibn ? "BN.num_batches_tracked" : "num_batches_tracked"
                file.tensors[key] = .int64(shape: [], values: [Int64(counter)])
            }
            try Safetensors.write(file, to: updatedParams)
        }
    }

    func makeAdapter<T: NormScalar>(
        _ name: LearnedLayerName, x: Tensor<T>, parameters: [String: Tensor<T>], as _: T.Type
    ) throws -> LearnedAdapter<T> {
        guard x.rank >= 2 else {
            throw NormError.invalidRank(
                layer: name.rawValue, expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
        }
        let layout = options.layout
        let channels = x.shape[layout.channelAxis(rank: x.rank)]
        let eps = options.epsilon ?? 1e-5
        switch name {
        case .switchnorm, .sparseswitchnorm:
            let usesBN =
                learned.usesBatchNorm ?? (parameters["mean_weight"].map { $0.count != 2 } ?? true)
            let keep = learned.momentum ?? (x.rank == 4 ? 0.9 : 0.997)
            let layer = try SwitchableNorm<T>(
                channelCount: channels, epsilon: eps, momentum: .keep(keep), usesBatchNorm: usesBN,
                runningEstimate: learned.movingAverage ? .movingAverage : .batchAverage,
                weighting: name == .switchnorm ? .softmax : .sparsestMax, layout: layout)
            return LearnedAdapter(
                load: { tensors, _ in
                    try layer.load(tensors)
                    if let radius = learned.radius { layer.radius = radius }
                },
                forward: { try layer.forward($0, mode: $1) },
                backward: { dy, cache in
                    let g = try layer.backward(dy, cache: cache)
                    return (
                        g.input,
                        [
                            "weight": g.scale, "bias": g.offset, "mean_weight": g.meanLogits,
                            "var_weight": g.varianceLogits,
                        ]
                    )
                },
                state: { (layer.state(), nil) })
        case .metanorm:
            let layer = try MetaNorm<T>(
                channelCount: channels, aggregations: try learned.parsedAggregations(),
                epsilon: eps, layout: layout)
            return LearnedAdapter(
                load: { tensors, _ in try layer.load(tensors) },
                forward: { try layer.forward($0, mode: $1) },
                backward: { dy, cache in
                    let g = try layer.backward(dy, cache: cache)
                    return (
                        g.input,
                        [
                            "weight": g.scale, "bias": g.offset, "mean_weight": g.meanLogits,
                            "var_weight": g.varianceLogits,
                        ]
                    )
                },
                state: { (layer.state(), nil) })
        case .ibn:
            let layer = try IBN<T>(
                channelCount: channels, ratio: learned.ratio, epsilon: eps, layout: layout)
            return LearnedAdapter(
                load: { tensors, counter in try layer.load(tensors, batchesTracked: counter) },
                forward: { try layer.forward($0, mode: $1) },
                backward: { dy, cache in
                    let g = try layer.backward(dy, cache: cache)
                    var grads: [String: Tensor<T>] = [:]
                    if let t = g.instance.scale { grads["IN.weight"] = t }
                    if let t = g.instance.offset { grads["IN.bias"] = t }
                    if let t = g.batch.scale { grads["BN.weight"] = t }
                    if let t = g.batch.offset { grads["BN.bias"] = t }
                    return (g.input, grads)
                },
                state: { layer.state() })
        case .kalmannorm:
            throw NormError.invalidHyperparameter(
                name: "layer", value: "kalmannorm",
                requirement:
                    "a single Kalman Normalization layer has no predecessor and is BatchNorm: use batchnorm, "
                    + "or train a chain with normkit train --normalizer kn")
        case .dbn:
            let layer = try DecorrelatedBatchNorm<T>(
                channelCount: channels, groupSize: learned.groupSize, epsilon: eps)
            return LearnedAdapter(
                load: { tensors, _ in try layer.load(tensors) },
                forward: { try layer.forward($0, mode: $1) },
                backward: { dy, cache in
                    let g = try layer.backward(dy, cache: cache)
                    var grads: [String: Tensor<T>] = [:]
                    if let s = g.scale { grads["weight"] = s }
                    if let o = g.offset { grads["bias"] = o }
                    return (g.input, grads)
                },
                state: { ((try? layer.state()) ?? [:], nil) })
        case .iternorm:
            let layer = try IterNorm<T>(
                channelCount: channels, groupSize: learned.groupSize,
                iterations: learned.iterations, epsilon: eps)
            return LearnedAdapter(
                load: { tensors, _ in try layer.load(tensors) },
                forward: { try layer.forward($0, mode: $1) },
                backward: { dy, cache in
                    let g = try layer.backward(dy, cache: cache)
                    var grads: [String: Tensor<T>] = [:]
                    if let s = g.scale { grads["weight"] = s }
                    if let o = g.offset { grads["bias"] = o }
                    return (g.input, grads)
                },
                state: { ((try? layer.state()) ?? [:], nil) })
        case .switchwhiten:
            let layer = try SwitchableWhitening<T>(
                channelCount: channels, groupSize: learned.groupSize ?? 16,
                type: learned.switchType,
                iterations: learned.iterations, epsilon: eps)
            return LearnedAdapter(
                load: { tensors, _ in try layer.load(tensors) },
                forward: { try layer.forward($0, mode: $1) },
                backward: { dy, cache in
                    let g = try layer.backward(dy, cache: cache)
                    return (
                        g.input,
                        [
                            "weight": g.scale, "bias": g.offset, "sw_mean_weight": g.meanLogits,
                            "sw_var_weight": g.varianceLogits,
                        ]
                    )
                },
                state: { ((try? layer.state()) ?? [:], nil) })
        case .batchrenorm:
            let layer = try BatchRenorm<T>(
                channelCount: channels, epsilon: eps,
                momentum: .exponential(weightOfNew: learned.momentum ?? 0.01),
                limits: .fixed(rMax: learned.rMax, dMax: learned.dMax), layout: layout)
            return LearnedAdapter(
                load: { tensors, counter in try layer.load(tensors, step: counter) },
                forward: { try layer.forward($0, mode: $1) },
                backward: { dy, cache in
                    let g = try layer.backward(dy, cache: cache)
                    return (g.input, ["weight": g.scale, "bias": g.offset])
                },
                state: { (layer.state(), layer.step) })
        }
    }
}
