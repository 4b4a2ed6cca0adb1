import NormKit

/// Where a Linear or Conv2d layer gets its weight: a plain trainable parameter, or a
/// ``WeightParametrization`` (Weight Norm, Centered Weight Norm, Weight Standardization,
/// Spectral Norm) whose raw parameters are the trainable ones.
///
/// Checkpoint names keep the parametrized form, as PyTorch's `state_dict` does: `conv1.weight`
/// for a plain weight; `conv1.parametrizations.weight.original0` and `…original1` for Weight
/// Norm; `conv1.parametrizations.weight.original` (and the buffers
/// `conv1.parametrizations.weight.0._u`, `…_v` of Spectral Norm) for the others.
public final class WeightSource<Scalar: NormScalar> {
    /// The plain weight, or nil when a parametrization computes it.
    public let plain: Parameter<Scalar>?
    /// The parametrization, or nil for a plain weight.
    public let parametrization: (any WeightParametrization<Scalar>)?
    /// The parametrization's raw parameters as trainable parameters, by key.
    let raw: [(key: String, parameter: Parameter<Scalar>)]
    /// The layer's name followed by a period.
    let prefix: String
    /// W as the last forward call computed it (the initial weight before any call).
    public private(set) var current: Tensor<Scalar>

    /// Wraps `initial` with `method`; Spectral Norm's u and v start from a seed derived from the
    /// layer's name, so that adding it does not change any other layer's initial weights.
    init(
        name: String, initial: Tensor<Scalar>, method: WeightNormMethod,
        options: WeightNormMethod.Options = .init()
    ) throws {
        prefix = name + "."
        current = initial
        if method == .none {
            plain = Parameter(name: name + ".weight", value: initial)
            parametrization = nil
            raw = []
        } else {
            var o = options
            // FNV-1a of the name: a stable seed per layer.
            o.seed = name.utf8.reduce(0xcbf2_9ce4_8422_2325 as UInt64) {
                ($0 ^ UInt64($1)) &* 0x100_0000_01b3
            }
            let p = try method.make(weight: initial, options: o)
            parametrization = p
            plain = nil
            raw = p.parameters.sorted { $0.key < $1.key }.map {
                (key: $0.key, parameter: Parameter(name: name + "." + $0.key, value: $0.value))
            }
        }
    }

    /// The trainable parameters.
    public var parameters: [Parameter<Scalar>] { plain.map { [$0] } ?? raw.map(\.parameter) }

    /// W for this call (Spectral Norm advances u and v in training mode).
    func weight(mode: Mode) throws -> Tensor<Scalar> {
        if let plain {
            current = plain.value
            return current
        }
        guard let parametrization else { return current }
        // The optimiser updates the Parameter objects; the parametrization reads them here.
        try parametrization.setParameters(
            Dictionary(uniqueKeysWithValues: raw.map { ($0.key, $0.parameter.value) }))
        current = try parametrization.weight(mode: mode)
        return current
    }

    /// Adds dL/dW's share to the gradients of the trainable parameters.
    func accumulate(_ weightGradient: Tensor<Scalar>) throws {
        if let plain {
            plain.gradient = try plain.gradient + weightGradient
            return
        }
        guard let parametrization else { return }
        let gradients = try parametrization.backward(weightGradient)
        for (key, parameter) in raw {
            if let g = gradients[key] { parameter.gradient = try parameter.gradient + g }
        }
    }

    /// The weight's part of the layer's `state_dict`, keys relative to the layer (`weight`, or
    /// `parametrizations.weight.original0`, …, with buffers).
    public func state() -> NormState<Scalar> {
        if let plain { return NormState(tensors: ["weight": plain.value]) }
        var tensors: [String: Tensor<Scalar>] = parametrization?.buffers ?? [:]
        for (key, parameter) in raw { tensors[key] = parameter.value }
        return NormState(tensors: tensors)
    }

    /// Loads the weight's part of a PyTorch `state_dict` (keys relative to the layer; legacy
    /// names such as `weight_g` accepted): every key and shape checked before anything changes.
    public func load(_ state: NormState<Scalar>) throws {
        if let plain {
            try checkedParameterUpdate(
                state.tensors, current: ["weight": plain.value], layer: "weight")
            if let w = state.tensors["weight"] { plain.value = w }
            return
        }
        guard let parametrization else { return }
        // Bring the parametrization up to date first, so a partial load keeps trained values.
        try parametrization.setParameters(
            Dictionary(uniqueKeysWithValues: raw.map { ($0.key, $0.parameter.value) }))
        try parametrization.load(state)
        let loaded = parametrization.parameters
        for (key, parameter) in raw { if let t = loaded[key] { parameter.value = t } }
    }

    /// Spectral Norm's u and v under `<layer>.<key>`.
    var buffers: [String: Tensor<Scalar>] {
        var out: [String: Tensor<Scalar>] = [:]
        for (key, value) in parametrization?.buffers ?? [:] { out[prefix + key] = value }
        return out
    }

    /// Restores the buffers of this layer found in `all` (shape-checked).
    func loadBuffers(_ all: [String: Tensor<Scalar>]) throws {
        guard let parametrization else { return }
        var mine: [String: Tensor<Scalar>] = [:]
        for key in parametrization.buffers.keys {
            if let t = all[prefix + key] { mine[key] = t }
        }
        try parametrization.setBuffers(mine)
    }
}
