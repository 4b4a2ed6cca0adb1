import ArgumentParser
import NormKit

/// `normkit apply`: one forward (and optionally backward) call of a layer on `.npy` data, with
/// parameters and buffers in PyTorch's `state_dict` names in safetensors files.
struct ApplyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apply",
        abstract: "Apply a normalization layer to an .npy tensor (forward, and backward if asked).",
        discussion: """
            A float32 input computes in Float, a float64 input in Double (outputs keep the input's \
            dtype). Parameters and buffers use PyTorch's state_dict names (weight, bias, \
            running_mean, running_var, num_batches_tracked); a missing weight or bias means ones \
            or zeros, a missing running buffer PyTorch's initial value.
            """)

    @Argument(
        help:
            "The layer: \(NormalizerRegistry.all.names.joined(separator: ", ")), or linear, conv2d (see --weight-norm)."
    )
    var layer: String

    @OptionGroup var weightLayer: WeightLayerOptions

    @Option(help: "Input tensor (.npy, float32 or float64).")
    var input: String

    @Option(help: "Where to write the output (.npy).")
    var output: String

    @Option(help: "Parameters and buffers (.safetensors) under PyTorch's state_dict names.")
    var params: String?

    @Flag(help: "Inference mode: use running statistics where the layer tracks them.")
    var eval = false

    @Option(help: "ε inside the square root (default 1e-5; RMSNorm: the dtype's machine epsilon).")
    var eps: Double?

    @Option(
        help:
            "Weight of the new batch in running statistics (default 0.1), or 'none' for a cumulative average."
    )
    var momentum: String?

    @Option(help: "Number of groups (groupnorm; default 32, or the largest divisor of C below 32).")
    var groups: Int?

    @Option(
        help:
            "Trailing dimensions to normalize (layernorm, rmsnorm; default: the rank of weight in --params, else 1)."
    )
    var normalizedDims: Int?

    @Option(
        help:
            "Channel axis position: nchw (default; dyt: nhwc below rank 4) or nhwc.")
    var layout: String?

    @Option(help: "Affine parameters: true or false (default: PyTorch's default for the layer).")
    var affine: Bool?

    @Option(
        help: "Track running statistics: true or false (default: PyTorch's default for the layer).")
    var trackRunningStats: Bool?

    @Option(
        help:
            "switchnorm, sparseswitchnorm: include batch statistics (default: from mean_weight's size, else true)."
    )
    var usingBn: Bool?

    @Option(help: "switchnorm, sparseswitchnorm: moving average (true, default) or batch average.")
    var movingAverage: Bool = true

    @Option(help: "sparseswitchnorm: the SparsestMax radius (default: the params' radius, else 0).")
    var radius: Double?

    @Option(help: "ibn: share of channels with instance normalization.")
    var ratio: Double = 0.5

    @Option(help: "metanorm: aggregations, e.g. in,bn,ln,gn2,whole,bgn2.")
    var aggregations: String = "in,bn,ln,gn2"

    @Option(help: "batchrenorm: r_max.")
    var rmax: Double = 3

    @Option(help: "batchrenorm: d_max.")
    var dmax: Double = 5

    @Option(help: "dbn, iternorm, switchwhiten: channels per group.")
    var groupSize: Int?

    @Option(help: "iternorm, switchwhiten: Newton iterations T.")
    var iterations: Int = 5

    @Option(help: "switchwhiten: 2, 3 or 5 components.")
    var swType: Int = 5

    @Option(help: "adain: the style tensor (.npy, [N, C, spatial…]).")
    var style: String?

    @Option(help: "adain: where to write dL/dstyle (.npy).")
    var gradStyle: String?

    @Option(help: "adain: content–style interpolation α (default 1); dyt: α's initial value.")
    var alpha: Double?

    @Option(
        help:
            "adain: true for the PyTorch port's unbiased statistics with ε (default), false for the original Torch code's."
    )
    var unbiased: Bool?

    @Option(help: "conditionalbn: class labels (.npy, int64 [N]).")
    var labels: String?

    @Option(help: "conditionalbn: number of classes K (default: rows of weights.weight).")
    var classes: Int?

    @Option(help: "conditionalbn, adaln: conditioning vectors (.npy, [N, D]).")
    var condition: String?

    @Option(help: "conditionalbn, adaln: where to write dL/dcondition (.npy).")
    var gradCondition: String?

    @Option(help: "spade: segmentation map (.npy, [N, labels, H, W]).")
    var segmap: String?

    @Option(help: "spade: where to write dL/dsegmap (.npy).")
    var gradSegmap: String?

    @Option(help: "spade: configuration, spadebatch3x3 (default), spadeinstance3x3, …")
    var spadeConfig: String?

    @Option(help: "spade: hidden width (default 128, or from mlp_shared.0.weight).")
    var hidden: Int?

    @Option(help: "addrmsnorm: the residual r (.npy, the input's shape).")
    var residual: String?

    @Option(help: "addrmsnorm: where to write the new residual x + r (.npy).")
    var residualOutput: String?

    @Option(help: "addrmsnorm: where to write dL/dr (.npy).")
    var gradResidual: String?

    @Option(
        help:
            "conditionalbn: γ = 1 + Linear(e) (BigGAN); addrmsnorm, qknorm: γ = 1 + w. true or false (default)."
    )
    var unitOffset: Bool?

    @Option(help: "adaln: predict a gate as well as shift and scale (default true).")
    var gate: Bool?

    @Flag(help: "adaln: FiLM, no LayerNorm and no SiLU.")
    var film = false

    @Option(help: "dyt: learn the offset b (default true, or whether --params has bias).")
    var bias: Bool?

    @Option(help: "Output gradient dL/dy (.npy); needs --grad-input.")
    var gradOutput: String?

    @Option(help: "Where to write dL/dx (.npy).")
    var gradInput: String?

    @Option(help: "Where to write dL/dweight and dL/dbias (.safetensors).")
    var gradParams: String?

    @Option(help: "Where to write all parameters and buffers after the call (.safetensors).")
    var updatedParams: String?

    func validate() throws {
        if WeightLayerKind(rawValue: layer) == nil {
            _ = try NormalizerRegistry.all.entry(named: layer)
        }
        if let layout, Layout(rawValue: layout.lowercased()) == nil {
            throw ValidationError("unknown layout '\(layout)'; expected nchw or nhwc")
        }
        let conditionGradients = [gradStyle, gradCondition, gradSegmap, gradResidual]
        if gradOutput != nil && gradInput == nil && gradParams == nil
            && conditionGradients.allSatisfy({ $0 == nil })
        {
            throw ValidationError(
                "--grad-output needs --grad-input or --grad-params to say where gradients go")
        }
        if (gradInput != nil || gradParams != nil || conditionGradients.contains { $0 != nil })
            && gradOutput == nil
        {
            throw ValidationError(
                "--grad-input, --grad-params and the --grad-<condition> options need "
                    + "--grad-output (dL/dy)")
        }
        _ = try parsedMomentum()
    }

    func parsedMomentum() throws -> Momentum {
        guard let momentum else { return .pytorchDefault }
        if ["none", "cumulative"].contains(momentum.lowercased()) { return .cumulative }
        guard let value = Double(momentum), value >= 0, value <= 1 else {
            throw ValidationError(
                "--momentum must be a number in [0, 1] or 'none', got '\(momentum)'")
        }
        return .exponential(weightOfNew: value)
    }

    /// The command line as registry options: the common flags typed, the layer-specific ones
    /// by their flag names.
    func normalizerOptions() throws -> NormalizerOptions {
        var o = NormalizerOptions()
        o.epsilon = eps
        o.momentum = try parsedMomentum()
        o.groups = groups
        o.normalizedDims = normalizedDims
        o.layout = layout.flatMap { Layout(rawValue: $0.lowercased()) } ?? .channelsFirst
        o.affine = affine
        o.trackRunningStatistics = trackRunningStats
        var v: [String: String] = [:]
        // The learned layers read --momentum as their own convention (SN: the keep value;
        // Batch Renorm: the weight of the new batch, default 0.01).
        if let momentum, Double(momentum) != nil { v["momentum"] = momentum }
        v["using-bn"] = usingBn.map { "\($0)" }
        v["moving-average"] = "\(movingAverage)"
        v["radius"] = radius.map { "\($0)" }
        v["ratio"] = "\(ratio)"
        v["aggregations"] = aggregations
        v["rmax"] = "\(rmax)"
        v["dmax"] = "\(dmax)"
        v["group-size"] = groupSize.map { "\($0)" }
        v["iterations"] = "\(iterations)"
        v["sw-type"] = "\(swType)"
        // Conditional and LLM-era layers (given only when set, so builders see their defaults).
        v["layout"] = layout
        v["alpha"] = alpha.map { "\($0)" }
        v["unbiased"] = unbiased.map { "\($0)" }
        v["classes"] = classes.map { "\($0)" }
        v["config"] = spadeConfig
        v["hidden"] = hidden.map { "\($0)" }
        v["unit-offset"] = unitOffset.map { "\($0)" }
        v["gate"] = gate.map { "\($0)" }
        v["film"] = film ? "true" : nil
        v["bias"] = bias.map { "\($0)" }
        o.values = v.compactMapValues { $0 }
        return o
    }

    func run() throws {
        if let kind = WeightLayerKind(rawValue: layer) {
            return try weightLayer.request(
                layer: kind, input: input, output: output, params: params, eval: eval, eps: eps,
                gradOutput: gradOutput, gradInput: gradInput, gradParams: gradParams,
                updatedParams: updatedParams
            ).run()
        }
        var request = ApplyRequest(
            layer: layer, input: input, output: output, params: params,
            mode: eval ? .inference : .training, options: try normalizerOptions(),
            gradOutput: gradOutput, gradInput: gradInput, gradParams: gradParams,
            updatedParams: updatedParams)
        // Conditioning inputs by the names the layers read, and where their gradients go.
        let conditionFlags: [(String, String?, String?)] = [
            ("style", style, gradStyle), ("labels", labels, nil),
            ("condition", condition, gradCondition), ("segmap", segmap, gradSegmap),
            ("residual", residual, gradResidual),
        ]
        for (name, path, gradient) in conditionFlags {
            if let path { request.conditions[name] = path }
            if let gradient { request.conditionGradients[name] = gradient }
        }
        if let residualOutput { request.auxiliaryOutputs["residual"] = residualOutput }
        // MetaNorm's default aggregation list is the CLI's documented default.
        if request.options.values["aggregations"] == nil {
            request.options.values["aggregations"] = "in,bn,ln,gn2"
        }
        try request.run()
    }
}

/// Everything `normkit apply` does, separate from argument parsing: any registry normalizer,
/// one call, files in and out.
public struct ApplyRequest: Sendable {
    /// The layer's registry name or alias.
    public var layer: String
    /// Input path (.npy).
    public var input: String
    /// Output path.
    public var output: String
    /// Parameter file.
    public var params: String?
    /// Training or inference.
    public var mode: Mode
    /// Hyperparameters.
    public var options: NormalizerOptions
    /// dL/dy path.
    public var gradOutput: String?
    /// dL/dx path.
    public var gradInput: String?
    /// Parameter-gradient path.
    public var gradParams: String?
    /// Updated state path.
    public var updatedParams: String?
    /// Conditioning inputs of conditional layers: name → .npy path.
    public var conditions: [String: String] = [:]
    /// Where to write the gradients into conditioning inputs: name → .npy path.
    public var conditionGradients: [String: String] = [:]
    /// Where to write a layer's auxiliary outputs (fused add + RMSNorm's residual): name → path.
    public var auxiliaryOutputs: [String: String] = [:]

    /// A request.
    public init(
        layer: String, input: String, output: String, params: String? = nil,
        mode: Mode = .training, options: NormalizerOptions = NormalizerOptions(),
        gradOutput: String? = nil, gradInput: String? = nil, gradParams: String? = nil,
        updatedParams: String? = nil
    ) {
        self.layer = layer
        self.input = input
        self.output = output
        self.params = params
        self.mode = mode
        self.options = options
        self.gradOutput = gradOutput
        self.gradInput = gradInput
        self.gradParams = gradParams
        self.updatedParams = updatedParams
    }

    /// Runs the request: reads, computes in the input's precision, writes.
    public func run() throws {
        let x = try Numpy.read(contentsOf: input)
        let state = try params.map { try Safetensors.read(contentsOf: $0) }
        switch x {
        case .float32(let tensor): try compute(tensor, state: state)
        case .float64(let tensor): try compute(tensor, state: state)
        case .int64: throw FileFormatError.unsupportedDType(format: "npy", dtype: "<i8")
        }
    }

    private func compute<T: NormScalar>(_ x: Tensor<T>, state file: Safetensors.File?) throws {
        // Integer entries (num_batches_tracked, Sparse SN's mean_fixed) are counters.
        var loaded = NormState<T>()
        for (key, array) in file?.tensors ?? [:] {
            if case .int64(_, let values) = array {
                guard values.count == 1 else {
                    throw NormError.parameterShapeMismatch(
                        name: key, expected: [], actual: array.shape)
                }
                loaded.counters[key] = Int(values[0])
            } else {
                loaded.tensors[key] = array.tensor(as: T.self)
            }
        }
        var conditionValues: [String: Tensor<T>] = [:]
        for (name, path) in conditions {
            conditionValues[name] = try Numpy.read(contentsOf: path).tensor(as: T.self)
        }
        let request = NormalizerRequest(
            inputShape: x.shape, options: options,
            parameterShapes: loaded.tensors.mapValues(\.shape).merging(
                loaded.counters.mapValues { _ in [] }, uniquingKeysWith: { a, _ in a }),
            conditionShapes: conditionValues.mapValues(\.shape))
        let layer = try NormalizerRegistry.all.make(self.layer, request, as: T.self)
        if !loaded.keys.isEmpty { try layer.load(loaded) }
        if let conditional = layer as? any ConditionalNormalizing<T> {
            try conditional.setConditions(conditionValues)
        } else if let name = conditions.keys.sorted().first {
            throw NormError.invalidCondition(
                name: name, problem: "\(layer.displayName) takes no conditioning input")
        }
        let y = try layer.normalize(x, mode: mode)
        let auxiliary = (layer as? any ConditionalNormalizing<T>)?.auxiliaryOutputs ?? [:]
        var gradients: NormGradients<T>?
        if let gradOutput {
            gradients = try layer.backward(
                try Numpy.read(contentsOf: gradOutput).tensor(as: T.self))
        }
        let updated = updatedParams == nil ? nil : try layer.state()

        // Outputs keep the shapes the parameter file used (the official SwitchNorm2d stores γ as
        // [1, C, 1, 1] and its running buffers as [1, C, 1]).
        let shapes = file?.tensors.mapValues(\.shape) ?? [:]
        func fileShaped(_ key: String, _ t: Tensor<T>) -> StoredArray {
            guard let shape = shapes[key], shape != t.shape, let r = try? t.reshaped(shape) else {
                return StoredArray(t)
            }
            return StoredArray(r)
        }
        for name in auxiliaryOutputs.keys.sorted() where auxiliary[name] == nil {
            throw NormError.invalidCondition(name: name, problem: "the layer has no such output")
        }
        for name in conditionGradients.keys.sorted() where gradients?.conditions[name] == nil {
            throw NormError.invalidCondition(name: name, problem: "no gradient flows into it")
        }
        // Every computation succeeded: now write the outputs.
        try Numpy.write(y, to: output)
        for (name, path) in auxiliaryOutputs { try Numpy.write(auxiliary[name]!, to: path) }
        if let gradients {
            if let gradInput { try Numpy.write(gradients.input, to: gradInput) }
            for (name, path) in conditionGradients {
                guard let g = gradients.conditions[name] else {
                    throw NormError.invalidCondition(
                        name: name, problem: "no gradient flows into it")
                }
                try Numpy.write(g, to: path)
            }
            if let gradParams {
                var out = Safetensors.File()
                for (k, v) in gradients.parameters { out.tensors[k] = fileShaped(k, v) }
                try Safetensors.write(out, to: gradParams)
            }
        }
        if let updatedParams, let updated {
            var out = Safetensors.File()
            for (k, v) in updated.tensors { out.tensors[k] = fileShaped(k, v) }
            for (k, v) in updated.counters {
                // PyTorch's num_batches_tracked is a 0-d tensor; Sparse SN's flags are [1].
                out.tensors[k] = .int64(
                    shape: shapes[k] ?? (k.hasSuffix("_fixed") ? [1] : []), values: [Int64(v)])
            }
            try Safetensors.write(out, to: updatedParams)
        }
    }
}

extension StoredArray {
    /// Wraps a tensor of either float type.
    init<T: NormScalar>(_ tensor: Tensor<T>) {
        if let t = tensor as? Tensor<Float> {
            self = .float32(t)
        } else {
            self = .float64(tensor.converted(to: Double.self))
        }
    }
}
