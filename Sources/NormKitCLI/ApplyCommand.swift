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

    @Argument(help: "The layer: \(ApplyRequest.layerNames.joined(separator: ", ")).")
    var layer: String

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

    @Option(help: "Number of groups (groupnorm).")
    var groups: Int?

    @Option(
        help:
            "Trailing dimensions to normalize (layernorm, rmsnorm; default: the rank of weight in --params, else 1)."
    )
    var normalizedDims: Int?

    @Option(help: "Channel axis position: nchw (default) or nhwc.")
    var layout: String = "nchw"

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

    @Option(help: "Output gradient dL/dy (.npy); needs --grad-input.")
    var gradOutput: String?

    @Option(help: "Where to write dL/dx (.npy).")
    var gradInput: String?

    @Option(help: "Where to write dL/dweight and dL/dbias (.safetensors).")
    var gradParams: String?

    @Option(help: "Where to write all parameters and buffers after the call (.safetensors).")
    var updatedParams: String?

    func validate() throws {
        guard ApplyRequest.layerNames.contains(layer) else {
            throw ValidationError(
                "unknown layer '\(layer)'; expected one of: \(ApplyRequest.layerNames.joined(separator: ", "))"
            )
        }
        guard Layout(rawValue: layout.lowercased()) != nil else {
            throw ValidationError("unknown layout '\(layout)'; expected nchw or nhwc")
        }
        if gradOutput != nil && gradInput == nil && gradParams == nil {
            throw ValidationError(
                "--grad-output needs --grad-input or --grad-params to say where gradients go")
        }
        if (gradInput != nil || gradParams != nil) && gradOutput == nil {
            throw ValidationError("--grad-input and --grad-params need --grad-output (dL/dy)")
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

    func run() throws {
        var request = ApplyRequest(
            layer: layer, input: input, output: output, params: params,
            mode: eval ? .inference : .training,
            options: {
                var o = LayerOptions()
                o.epsilon = eps
                o.momentum = (try? parsedMomentum()) ?? .pytorchDefault
                o.groups = groups
                o.normalizedDims = normalizedDims ?? 1
                o.inferNormalizedDims = normalizedDims == nil
                o.layout = Layout(rawValue: layout.lowercased()) ?? .channelsFirst
                o.affine = affine
                o.trackRunningStatistics = trackRunningStats
                return o
            }(),
            gradOutput: gradOutput, gradInput: gradInput, gradParams: gradParams,
            updatedParams: updatedParams)
        request.learned = LearnedOptions(
            momentum: momentum.flatMap(Double.init), usesBatchNorm: usingBn,
            movingAverage: movingAverage,
            radius: radius, ratio: ratio, aggregations: aggregations, rMax: rmax, dMax: dmax)
        request.learned.groupSize = groupSize
        request.learned.iterations = iterations
        request.learned.switchType = swType
        try request.run()
    }
}

/// Everything `normkit apply` does, separate from argument parsing.
public struct ApplyRequest: Sendable {
    /// The layer.
    public var layer: String
    /// Options of the learned normalizers.
    public var learned = LearnedOptions()

    /// Every layer name `apply` accepts.
    public static let layerNames =
        StandardLayer.allCases.map(\.rawValue) + LearnedLayerName.allCases.map(\.rawValue)
    /// Paths.
    public var input: String
    /// Output path.
    public var output: String
    /// Parameter file.
    public var params: String?
    /// Training or inference.
    public var mode: Mode
    /// Hyperparameters.
    public var options: LayerOptions
    /// dL/dy path.
    public var gradOutput: String?
    /// dL/dx path.
    public var gradInput: String?
    /// Parameter-gradient path.
    public var gradParams: String?
    /// Updated state path.
    public var updatedParams: String?

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

    private func compute<T: NormScalar>(_ x: Tensor<T>, state: Safetensors.File?) throws {
        guard let standard = StandardLayer(rawValue: self.layer) else {
            return try computeLearned(x, state: state)
        }
        var options = self.options
        // LayerNorm and RMSNorm: without --normalized-dims, the weight's rank says how many
        // trailing dimensions PyTorch's normalized_shape had.
        if options.inferNormalizedDims, [.layernorm, .rmsnorm].contains(standard),
            let weight = state?.tensors["weight"], !weight.shape.isEmpty
        {
            options.normalizedDims = weight.shape.count
        }
        let names = Set(state?.tensors.keys.map { $0 } ?? [])
        let layer = try standard.make(
            inputShape: x.shape, options: options, parameterNames: names, as: T.self)
        if let state {
            var tensors: [String: Tensor<T>] = [:]
            var batches: Int?
            for (key, array) in state.tensors {
                if key == ParameterKey.batchesTracked.rawValue {
                    guard case .int64(_, let values) = array, values.count == 1 else {
                        throw NormError.parameterShapeMismatch(
                            name: key, expected: [], actual: array.shape)
                    }
                    // A layer without running statistics ignores the counter, as PyTorch's
                    // state_dict of such a layer would not have it.
                    batches = layer.runningStatistics == nil ? nil : Int(values[0])
                    continue
                }
                if case .int64 = array {
                    throw FileFormatError.wrongDType(
                        name: key, expected: T.dtypeName, actual: "int64")
                }
                tensors[key] = array.tensor(as: T.self)
            }
            try layer.load(tensors, batchesTracked: batches)
        }
        let (y, cache) = try layer.forward(x, mode: mode)
        var gradients: NormLayer<T>.Gradients?
        if let gradOutput {
            let dy = try Numpy.read(contentsOf: gradOutput).tensor(as: T.self)
            gradients = try layer.backward(dy, cache: cache)
        }
        // Every computation succeeded: now write the outputs.
        try Numpy.write(y, to: output)
        if let gradients {
            if let gradInput { try Numpy.write(gradients.input, to: gradInput) }
            if let gradParams {
                var file = Safetensors.File()
                if let g = gradients.scale { file.tensors[ParameterKey.scale.rawValue] = .init(g) }
                if let g = gradients.offset {
                    file.tensors[ParameterKey.offset.rawValue] = .init(g)
                }
                try Safetensors.write(file, to: gradParams)
            }
        }
        if let updatedParams {
            let (tensors, batches) = layer.state()
            var file = Safetensors.File()
            for (key, value) in tensors { file.tensors[key] = .init(value) }
            if let batches {
                file.tensors[ParameterKey.batchesTracked.rawValue] = .int64(
                    shape: [], values: [Int64(batches)])
            }
            try Safetensors.write(file, to: updatedParams)
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
