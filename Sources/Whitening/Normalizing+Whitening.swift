import Normalization
import TensorCore

/// The whitening layers keep γ and β optional (`affine: false`) and their running matrices as
/// `[G, d, d]` tensors under the official names.
extension DecorrelatedBatchNorm: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String { "DecorrelatedBatchNorm" }
    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] { affineParameters(scale, offset) }
    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> {
        NormGradients(input: g.input, parameters: affineParameters(g.scale, g.offset))
    }
    /// Parameters, buffers and counters under their `state_dict` keys.
    public func state() throws -> NormState<Scalar> { NormState(tensors: try stateDictionary()) }
    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try checkWhiteningState(state, known: try stateDictionary(), layer: displayName)
        try load(state.tensors)
    }
}

extension IterNorm: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String { "IterNorm" }
    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] { affineParameters(scale, offset) }
    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> {
        NormGradients(input: g.input, parameters: affineParameters(g.scale, g.offset))
    }
    /// Parameters, buffers and counters under their `state_dict` keys.
    public func state() throws -> NormState<Scalar> { NormState(tensors: try stateDictionary()) }
    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try checkWhiteningState(state, known: try stateDictionary(), layer: displayName)
        try load(state.tensors)
    }
}

extension SwitchableWhitening: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String { "SwitchableWhitening" }
    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] {
        mixtureParameters(
            scale: scale, offset: offset, meanLogits: meanLogits, varianceLogits: varianceLogits,
            logitPrefix: "sw_")
    }
    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> {
        NormGradients(
            input: g.input,
            parameters: mixtureParameters(
                scale: g.scale, offset: g.offset, meanLogits: g.meanLogits,
                varianceLogits: g.varianceLogits, logitPrefix: "sw_"))
    }
    /// Mixture and Kalman parameters get their own optimiser group.
    public func role(ofParameter key: String) -> ParameterRole { mixtureRole(ofParameter: key) }
    /// Parameters, buffers and counters under their `state_dict` keys.
    public func state() throws -> NormState<Scalar> { NormState(tensors: try stateDictionary()) }
    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try checkWhiteningState(state, known: try stateDictionary(), layer: displayName)
        try load(state.tensors)
    }
}

func affineParameters<Scalar: NormScalar>(_ scale: Tensor<Scalar>?, _ offset: Tensor<Scalar>?)
    -> [String: Tensor<Scalar>]
{
    var out: [String: Tensor<Scalar>] = [:]
    out["weight"] = scale
    out["bias"] = offset
    return out
}

/// Whitening layers have no integer buffers, and a key they do not have is named.
func checkWhiteningState<Scalar: NormScalar>(
    _ state: NormState<Scalar>, known: [String: Tensor<Scalar>], layer: String
) throws {
    try rejectUnknownCounters(state, allowed: [], layer: layer)
    for key in state.tensors.keys.sorted() where known[key] == nil {
        throw NormError.unknownParameter(layer: layer, key: key, known: known.keys.sorted())
    }
}
extension SwitchableWhitening: MixtureNormalizing {}
