import TensorCore

/// A layer whose `forward(_:mode:)` returns its backward cache: ``Normalizing`` conformance
/// then only needs the gradients by key (the cache of the last call is kept in `lastCache`).
public protocol CachingNormalizer: Normalizing {
    /// What forward keeps for backward.
    associatedtype Cache
    /// The layer's own gradient type.
    associatedtype Gradients
    /// The cache of the last ``Normalizing/normalize(_:mode:)`` call.
    var lastCache: Cache? { get set }
    /// Forward, returning the cache instead of keeping it.
    func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> (output: Tensor<Scalar>, cache: Cache)
    /// Backward for a cache.
    func backward(_ dy: Tensor<Scalar>, cache: Cache) throws -> Gradients
    /// The gradients under the parameters' `state_dict` keys.
    func keyed(_ gradients: Gradients) -> NormGradients<Scalar>
}

extension CachingNormalizer {
    /// Normalizes `x` and keeps the cache for ``backward(_:)``.
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let (y, cache) = try forward(x, mode: mode)
        lastCache = cache
        return y
    }

    /// Gradients for the last ``normalize(_:mode:)`` call.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let cache = lastCache else { throw NormError.noForwardCall(layer: displayName) }
        return keyed(try backward(dy, cache: cache))
    }

    /// Sets parameters through ``Normalizing/load(_:)`` after checking keys and shapes.
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        try load(NormState(tensors: values))
    }
}

extension NormLayer: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String { name }

    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] {
        var out: [String: Tensor<Scalar>] = [:]
        out[ParameterKey.scale.rawValue] = scale
        out[ParameterKey.offset.rawValue] = offset
        return out
    }

    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> {
        var out: [String: Tensor<Scalar>] = [:]
        out[ParameterKey.scale.rawValue] = g.scale
        out[ParameterKey.offset.rawValue] = g.offset
        return NormGradients(input: g.input, parameters: out)
    }

    /// Parameters, buffers and counters under their `state_dict` keys.
    public func state() -> NormState<Scalar> {
        let (tensors, batches) = stateTensors()
        return NormState(
            tensors: tensors,
            counters: batches.map { [ParameterKey.batchesTracked.rawValue: $0] } ?? [:])
    }

    /// Loads a state; a layer without running statistics ignores `num_batches_tracked` (PyTorch's
    /// `state_dict` of such a layer does not have it).
    public func load(_ state: NormState<Scalar>) throws {
        let key = ParameterKey.batchesTracked.rawValue
        try rejectUnknownCounters(state, allowed: [key], layer: name)
        let known = stateTensors().tensors
        for k in state.tensors.keys.sorted() where known[k] == nil {
            throw NormError.unknownParameter(layer: name, key: k, known: known.keys.sorted())
        }
        let batches = runningStatistics == nil ? nil : state.counters[key]
        try load(state.tensors, batchesTracked: batches)
    }
}

extension SwitchableNorm: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String {
        weighting == .softmax ? "SwitchableNorm" : "SparseSwitchableNorm"
    }

    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] {
        mixtureParameters(
            scale: scale, offset: offset, meanLogits: meanLogits, varianceLogits: varianceLogits)
    }

    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> { g.keyed }

    /// Mixture and Kalman parameters get their own optimiser group.
    public func role(ofParameter key: String) -> ParameterRole { mixtureRole(ofParameter: key) }

    /// Sparse SN's `mean_fixed` / `var_fixed` flags are counters (int64 buffers officially).
    public func state() -> NormState<Scalar> {
        var tensors = stateDictionary()
        var counters: [String: Int] = [:]
        for key in ["mean_fixed", "var_fixed"] {
            if let t = tensors.removeValue(forKey: key) {
                counters[key] = t.scalars.first.map { $0 != 0 ? 1 : 0 } ?? 0
            }
        }
        return NormState(tensors: tensors, counters: counters)
    }

    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try rejectUnknownCounters(state, allowed: ["mean_fixed", "var_fixed"], layer: displayName)
        var tensors = state.tensors
        for (key, value) in state.counters { tensors[key] = Tensor([Scalar(value)]) }
        try load(tensors)
    }
}

extension MetaNorm: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String { "MetaNorm" }

    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] { stateDictionary() }

    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> { g.keyed }

    /// Mixture and Kalman parameters get their own optimiser group.
    public func role(ofParameter key: String) -> ParameterRole { mixtureRole(ofParameter: key) }

    /// The parameters, and the running estimates of every aggregation as `running_mean.k` /
    /// `running_var.k` (`[C]` each).
    public func state() -> NormState<Scalar> {
        var tensors = stateDictionary()
        for k in runningMean.indices {
            tensors["running_mean.\(k)"] = Tensor(runningMean[k].map { Scalar($0) })
            tensors["running_var.\(k)"] = Tensor(runningVariance[k].map { Scalar($0) })
        }
        return NormState(tensors: tensors)
    }

    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try rejectUnknownCounters(state, allowed: [], layer: displayName)
        var parameters = state.tensors
        var means = runningMean
        var variances = runningVariance
        for k in runningMean.indices {
            for (key, isMean) in [("running_mean.\(k)", true), ("running_var.\(k)", false)] {
                guard let t = parameters.removeValue(forKey: key) else { continue }
                guard t.count == channelCount else {
                    throw NormError.parameterShapeMismatch(
                        name: key, expected: [channelCount], actual: t.shape)
                }
                if isMean {
                    means[k] = t.scalars.map(Double.init)
                } else {
                    variances[k] = t.scalars.map(Double.init)
                }
            }
        }
        for key in parameters.keys
        where !["weight", "bias", "mean_weight", "var_weight"].contains(key) {
            throw NormError.unknownParameter(layer: displayName, key: key, known: self.state().keys)
        }
        try load(parameters)
        runningMean = means
        runningVariance = variances
    }
}

extension IBN: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String { "IBN" }

    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] {
        var out: [String: Tensor<Scalar>] = [:]
        for (k, v) in instance.parameters { out["IN." + k] = v }
        for (k, v) in batch.parameters { out["BN." + k] = v }
        return out
    }

    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> {
        var out: [String: Tensor<Scalar>] = [:]
        for (k, v) in instance.keyed(g.instance).parameters { out["IN." + k] = v }
        for (k, v) in batch.keyed(g.batch).parameters { out["BN." + k] = v }
        return NormGradients(input: g.input, parameters: out)
    }

    /// Parameters, buffers and counters under their `state_dict` keys.
    public func state() -> NormState<Scalar> {
        let (tensors, batches) = stateTensors()
        return NormState(
            tensors: tensors, counters: batches.map { ["BN.num_batches_tracked": $0] } ?? [:])
    }

    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try rejectUnknownCounters(state, allowed: ["BN.num_batches_tracked"], layer: displayName)
        try load(state.tensors, batchesTracked: state.counters["BN.num_batches_tracked"])
    }
}

extension BatchRenorm: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String { "BatchRenorm" }

    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] { ["weight": scale, "bias": offset] }

    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> {
        NormGradients(input: g.input, parameters: ["weight": g.scale, "bias": g.offset])
    }

    /// Parameters, buffers and counters under their `state_dict` keys.
    public func state() -> NormState<Scalar> {
        NormState(tensors: stateDictionary(), counters: ["num_batches_tracked": step])
    }

    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try rejectUnknownCounters(state, allowed: ["num_batches_tracked"], layer: displayName)
        try load(state.tensors, step: state.counters["num_batches_tracked"])
    }
}

extension KalmanNorm: Normalizing, CachingNormalizer {
    /// The layer's name in messages.
    public var displayName: String { "KalmanNorm" }

    /// The trainable parameters by `state_dict` key.
    public var parameters: [String: Tensor<Scalar>] {
        ["weight": scale, "bias": offset, "transition": transition, "gain": gainLogits]
    }

    /// The gradients under the parameters' `state_dict` keys.
    public func keyed(_ g: Gradients) -> NormGradients<Scalar> {
        NormGradients(
            input: g.input,
            parameters: [
                "weight": g.scale, "bias": g.offset, "transition": g.transition,
                "gain": g.gainLogits,
            ])
    }

    /// Mixture and Kalman parameters get their own optimiser group.
    public func role(ofParameter key: String) -> ParameterRole {
        ["transition", "gain"].contains(key) ? .kalman : .affine
    }

    /// Parameters, buffers and counters under their `state_dict` keys.
    public func state() -> NormState<Scalar> {
        var tensors = parameters
        tensors["running_mean"] = Tensor(runningMean.map { Scalar($0) })
        tensors["running_var"] = Tensor(runningVariance.map { Scalar($0) })
        return NormState(tensors: tensors)
    }

    /// Restores a state: keys and shapes checked, all or nothing.
    public func load(_ state: NormState<Scalar>) throws {
        try rejectUnknownCounters(state, allowed: [], layer: displayName)
        let current = self.state().tensors
        try checkedParameterUpdate(state.tensors, current: current, layer: displayName)
        let t = state.tensors
        if let v = t["weight"] { scale = v }
        if let v = t["bias"] { offset = v }
        if let v = t["transition"] { transition = v }
        if let v = t["gain"] { gainLogits = v }
        if let v = t["running_mean"] { runningMean = v.scalars.map(Double.init) }
        if let v = t["running_var"] { runningVariance = v.scalars.map(Double.init) }
    }
}

/// Refuses integer buffers a layer does not have, naming them.
public func rejectUnknownCounters<Scalar: NormScalar>(
    _ state: NormState<Scalar>, allowed: Set<String>, layer: String
) throws(NormError) {
    for key in state.counters.keys.sorted() where !allowed.contains(key) {
        throw .unknownParameter(layer: layer, key: key, known: allowed.sorted())
    }
}

extension SwitchableNorm: MixtureNormalizing, ScheduledNormalizing {
    /// Advances the SparsestMax radius by one training step.
    public func advanceSchedule() { advanceRadius() }
    /// The weight vectors Sparse SN has frozen at one-hot.
    public var frozenParameterKeys: Set<String> {
        var keys: Set<String> = []
        if isMeanFixed { keys.insert("mean_weight") }
        if isVarianceFixed { keys.insert("var_weight") }
        return keys
    }
}

extension MetaNorm: MixtureNormalizing {}

extension NormLayer: KernelSelectable {}
extension SwitchableNorm: KernelSelectable {}
extension MetaNorm: KernelSelectable {}
extension BatchRenorm: KernelSelectable {}
