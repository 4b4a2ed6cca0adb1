import ArgumentParser
import NormKit
import Training

/// The layers `normkit apply` runs besides the registry's normalizers: a Linear or Conv2d whose
/// weight is plain or parametrized (Weight Norm, Centered Weight Norm, Weight Standardization,
/// Spectral Norm), so that the weight methods can be cross-checked against PyTorch.
public enum WeightLayerKind: String, CaseIterable, Sendable {
    /// `y = x·Wᵀ + b`, W `[out, in]`, x `[N, in]`.
    case linear
    /// Cross-correlation, W `[out, in, k, k]`, x `[N, in, H, W]`.
    case conv2d
}

/// The flags of `normkit apply linear|conv2d`.
struct WeightLayerOptions: ParsableArguments {
    @Option(
        help:
            "linear, conv2d: the weight method, none, wn, cwn, ws, ws-bit or sn (--params then holds PyTorch's state_dict of the module with that parametrization registered; --eps defaults to the method's own ε: ws 1e-5, ws-bit 1e-10, cwn 1e-5, sn 1e-12)."
    )
    var weightNorm = "none"

    @Option(help: "conv2d: stride.")
    var stride = 1

    @Option(help: "conv2d: zero padding on every side.")
    var padding = 0

    @Option(
        help:
            "wn, sn: the axis that keeps its own norm or becomes the matrix rows (default 0; wn: 'none' for one norm over the whole tensor)."
    )
    var dim: String?

    @Option(help: "sn: power iterations per training-mode call.")
    var powerIterations = 1

    @Option(help: "cwn: the fixed scale s when --params has no learnable WNScale.")
    var cwnScale = 1.414

    /// `--dim` parsed: nil means the default 0; `.some(nil)` the whole tensor.
    func parsedDim() throws -> Int?? {
        guard let dim else { return .none }
        if dim.lowercased() == "none" { return .some(nil) }
        guard let value = Int(dim) else {
            throw ValidationError("--dim must be an integer or 'none', got '\(dim)'")
        }
        return .some(value)
    }

    func validate() throws {
        guard WeightNormMethod(rawValue: weightNorm) != nil else {
            throw ValidationError(
                "unknown --weight-norm '\(weightNorm)'; expected one of: "
                    + WeightNormMethod.allCases.map(\.rawValue).joined(separator: ", "))
        }
        guard stride >= 1, padding >= 0, powerIterations >= 1 else {
            throw ValidationError(
                "--stride and --power-iterations must be at least 1 and --padding at least 0")
        }
        _ = try parsedDim()
    }
}

/// What goes wrong in `normkit apply linear|conv2d` before any layer is built.
public enum WeightApplyError: Error, Equatable, CustomStringConvertible {
    /// --params is required: the weight comes from it.
    case missingParameters(layer: String)
    /// A tensor the method's `state_dict` must have is absent.
    case missingKey(method: String, key: String, present: [String])
    /// The weight has the wrong rank or a non-square kernel.
    case weightShape(layer: String, key: String, shape: [Int], requirement: String)

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .missingParameters(let layer):
            return "apply \(layer) needs --params: the weight (and bias) come from that file"
        case .missingKey(let method, let key, let present):
            return "--weight-norm \(method) needs '\(key)' in --params (it has: "
                + present.joined(separator: ", ") + ")"
        case .weightShape(let layer, let key, let shape, let requirement):
            return "\(layer): '\(key)' has shape \(shape); \(requirement)"
        }
    }
}

/// One `normkit apply linear|conv2d` call, separate from argument parsing.
public struct WeightApplyRequest: Sendable {
    /// The layer.
    public var layer: WeightLayerKind
    /// The weight method.
    public var method: WeightNormMethod
    /// The method's options (`epsilon` nil: the method's own).
    public var options = WeightNormMethod.Options()
    /// conv2d stride.
    public var stride = 1
    /// conv2d padding.
    public var padding = 0
    /// Input, output and parameter paths, as ``ApplyRequest``.
    public var input: String
    /// Output path.
    public var output: String
    /// The module's `state_dict` (.safetensors).
    public var params: String?
    /// Training or inference (Spectral Norm's power iteration runs in training only).
    public var mode: Mode = .training
    /// dL/dy path.
    public var gradOutput: String?
    /// dL/dx path.
    public var gradInput: String?
    /// Parameter-gradient path (keys of the parameters; buffers have none).
    public var gradParams: String?
    /// The `state_dict` after the call.
    public var updatedParams: String?

    /// A request.
    public init(layer: WeightLayerKind, method: WeightNormMethod, input: String, output: String) {
        self.layer = layer
        self.method = method
        self.input = input
        self.output = output
    }

    /// The key of the raw weight in the method's `state_dict` (the first one checked).
    static func weightKeys(_ method: WeightNormMethod, legacy: Bool) -> [String] {
        switch method {
        case .none: return ["weight"]
        case .wn:
            return legacy
                ? ["weight_v", "weight_g"]
                : [WeightNorm<Double>.directionKey, WeightNorm<Double>.magnitudeKey]
        case .cwn, .ws, .wsBiT: return ["parametrizations.weight.original"]
        case .sn:
            return legacy
                ? ["weight_orig"]
                : ["parametrizations.weight.original"]
        }
    }

    /// Runs the request: reads, computes in the input's precision, writes.
    ///
    /// Every output path is checked first and the outputs are written together at the end.
    public func run() throws {
        var outputs = try OutputSet(
            [output] + (gradOutput == nil ? [] : [gradInput, gradParams].compactMap { $0 })
                + [updatedParams].compactMap { $0 })
        let x = try Numpy.read(contentsOf: input)
        guard let params else { throw WeightApplyError.missingParameters(layer: layer.rawValue) }
        let file = try Safetensors.read(contentsOf: params)
        switch x {
        case .float32(let tensor): try compute(tensor, file: file, outputs: &outputs)
        case .float64(let tensor): try compute(tensor, file: file, outputs: &outputs)
        case .int64: throw FileFormatError.unsupportedDType(format: "npy", dtype: "<i8")
        }
        try outputs.commit()
    }

    private func compute<T: NormScalar>(
        _ x: Tensor<T>, file: Safetensors.File, outputs: inout OutputSet
    ) throws {
        var state: [String: Tensor<T>] = [:]
        for (key, array) in file.tensors {
            if case .int64 = array {
                throw FileFormatError.wrongDType(name: key, expected: T.dtypeName, actual: "int64")
            }
            state[key] = array.tensor(as: T.self)
        }
        // The legacy hooks' names say which form the checkpoint has.
        let legacy = state["weight_g"] != nil || state["weight_orig"] != nil
        let keys = Self.weightKeys(method, legacy: legacy)
        for key in keys where state[key] == nil {
            throw WeightApplyError.missingKey(
                method: method.rawValue, key: key, present: state.keys.sorted())
        }
        let weight = state[keys[0]]!
        let (rank, requirement) =
            layer == .linear ? (2, "linear needs [out, in]") : (4, "conv2d needs [out, in, k, k]")
        guard weight.rank == rank, layer == .linear || weight.shape[2] == weight.shape[3] else {
            throw WeightApplyError.weightShape(
                layer: layer.rawValue, key: keys[0], shape: weight.shape,
                requirement: requirement + (rank == 4 ? " with a square kernel" : ""))
        }
        var options = self.options
        options.legacySpectralNorm = method == .sn && legacy
        options.learnableScale = state[CenteredWeightNorm<T>.scaleKey] != nil
        let bias = state.removeValue(forKey: "bias")

        // The layer, built from the file's weight (W unchanged), then loaded with every tensor
        // (shape-checked; unknown keys refused).
        var g = SeededGenerator(seed: 0)
        let source: WeightSource<T>
        let biasParameter: Parameter<T>?
        let forward: (Tensor<T>, Mode) throws -> Tensor<T>
        let backward: (Tensor<T>) throws -> Tensor<T>
        switch layer {
        case .linear:
            let l = try Linear<T>(
                weight.shape[1], weight.shape[0], name: "m", weightNorm: method,
                weightNormOptions: options, generator: &g)
            l.bias.value = try Tensor(zeros: [weight.shape[0]])
            (source, biasParameter) = (l.weight, l.bias)
            forward = { try l.forward($0, mode: $1) }
            backward = { try l.backward($0) }
        case .conv2d:
            let c = try Conv2d<T>(
                weight.shape[1], weight.shape[0], kernel: weight.shape[2], stride: stride,
                padding: padding, bias: bias != nil, name: "m", weightNorm: method,
                weightNormOptions: options, generator: &g)
            (source, biasParameter) = (c.weight, c.bias)
            forward = { try c.forward($0, mode: $1) }
            backward = { try c.backward($0) }
        }
        if let bias, let biasParameter {
            guard bias.shape == biasParameter.value.shape else {
                throw NormError.parameterShapeMismatch(
                    name: "bias", expected: biasParameter.value.shape, actual: bias.shape)
            }
            biasParameter.value = bias
        }
        try source.load(NormState(tensors: state))

        let y = try forward(x, mode)
        var dx: Tensor<T>?
        var gradients: [String: Tensor<T>] = [:]
        if let gradOutput {
            let dy = try Numpy.read(contentsOf: gradOutput).tensor(as: T.self)
            dx = try backward(dy)
            for p in source.parameters {
                gradients[String(p.name.dropFirst("m.".count))] = p.gradient
            }
            if bias != nil, let biasParameter { gradients["bias"] = biasParameter.gradient }
        }
        var updated = source.state().tensors
        if let bias, let biasParameter {
            updated["bias"] = try biasParameter.value.reshaped(bias.shape)
        }

        // Outputs use the names the input file used (the legacy hooks' names stay legacy).
        let legacyKeys = source.parametrization?.legacyKeys ?? [:]
        var fileName: [String: String] = [:]
        for key in state.keys { fileName[legacyKeys[key] ?? key] = key }
        func named(_ tensors: [String: Tensor<T>]) -> Safetensors.File {
            var out = Safetensors.File()
            for (k, v) in tensors { out.tensors[fileName[k] ?? k] = StoredArray(v) }
            return out
        }
        // Every computation succeeded: stage the outputs (the caller commits them together).
        outputs.stage(Numpy.encode(y), to: output)
        if let dx, let gradInput { outputs.stage(Numpy.encode(dx), to: gradInput) }
        if gradOutput != nil, let gradParams {
            outputs.stage(Safetensors.encode(named(gradients)), to: gradParams)
        }
        if let updatedParams {
            outputs.stage(Safetensors.encode(named(updated)), to: updatedParams)
        }
    }
}

extension WeightLayerOptions {
    /// The request these flags and the common apply flags describe.
    func request(
        layer: WeightLayerKind, input: String, output: String, params: String?, eval: Bool,
        eps: Double?, gradOutput: String?, gradInput: String?, gradParams: String?,
        updatedParams: String?
    ) throws -> WeightApplyRequest {
        var r = WeightApplyRequest(
            layer: layer, method: WeightNormMethod(rawValue: weightNorm) ?? .none, input: input,
            output: output)
        r.params = params
        r.mode = eval ? .inference : .training
        r.stride = stride
        r.padding = padding
        r.gradOutput = gradOutput
        r.gradInput = gradInput
        r.gradParams = gradParams
        r.updatedParams = updatedParams
        r.options.epsilon = eps
        r.options.powerIterations = powerIterations
        r.options.scale = cwnScale
        if let dim = try parsedDim() { r.options.dim = dim }
        return r
    }
}
