import Normalization
import TensorCore

/// DBN and IterNorm (one conformance for both): γ and β are optional (`affine: false`), the
/// running matrices a `[G, d, d]` tensor under the method's official name.
extension GroupWhiteningNorm: Normalizing, CachingNormalizer {
    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] { affineParameters(scale, offset) }
    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> {
        NormGradients(input: g.input, parameters: affineParameters(g.scale, g.offset))
    }
    /// Parameters and buffers under their `state_dict` keys.
    public func state() throws -> NormState<Scalar> { NormState(tensors: try stateDictionary()) }
    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try checkWhiteningState(state, known: try stateDictionary(), layer: displayName)
        try load(state.tensors)
    }
}

extension SwitchableWhitening: Normalizing, CachingNormalizer, MixtureNormalizing {
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
    /// Mixture logits get their own optimiser group.
    public func role(ofParameter key: String) -> ParameterRole { mixtureRole(ofParameter: key) }
    /// Parameters and buffers under their `state_dict` keys.
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
