import NormKit

/// The normalizer of a network slot, by name: `none`, the harness's short presets (`bn`, `gn`,
/// `ln`, `in`, `sn`, `ssn`, `brn`, `ibn`, `meta`, `kn`) or any trainable name of
/// ``NormalizerRegistry/all`` (`batchnorm`, `dbn`, `iternorm`, …).
public struct NormalizerChoice: RawRepresentable, Hashable, Sendable, CaseIterable,
    CustomStringConvertible
{
    /// The canonical name: a preset's short name, or the registry name.
    public let rawValue: String

    /// The choice for a name, a preset, a registry name or an alias; nil when unknown.
    ///
    /// Registry names that have a preset resolve to it (`batchnorm` → `bn`), so the same layer
    /// is built whichever name is used.
    public init?(rawValue: String) {
        let name = rawValue.lowercased()
        if name == "none" || Self.presets.contains(name) {
            self.rawValue = name
            return
        }
        guard let entry = try? NormalizerRegistry.all.entry(named: name), entry.trainable else {
            return nil
        }
        self.rawValue = Self.presetOfEntry[entry.name] ?? entry.name
    }

    private init(preset: String) { rawValue = preset }

    static let presets: [String] = [
        "bn", "gn", "ln", "in", "sn", "ssn", "brn", "ibn", "meta", "kn",
    ]
    static let presetOfEntry: [String: String] = [
        "batchnorm": "bn", "groupnorm": "gn", "layernorm": "ln", "instancenorm": "in",
        "switchnorm": "sn", "sparseswitchnorm": "ssn", "batchrenorm": "brn", "ibn": "ibn",
        "metanorm": "meta", "kalmannorm": "kn",
    ]

    /// Identity.
    public static let none = Self(preset: "none")
    /// BatchNorm.
    public static let bn = Self(preset: "bn")
    /// GroupNorm with `groups` groups (reduced to a divisor of the channels).
    public static let gn = Self(preset: "gn")
    /// LayerNorm over (C, H, W) with per-channel affine (GroupNorm with one group).
    public static let ln = Self(preset: "ln")
    /// InstanceNorm with affine parameters.
    public static let `in` = Self(preset: "in")
    /// Switchable Normalization.
    public static let sn = Self(preset: "sn")
    /// Sparse Switchable Normalization.
    public static let ssn = Self(preset: "ssn")
    /// Batch Renormalization (weight of the new batch 0.1).
    public static let brn = Self(preset: "brn")
    /// IBN-a.
    public static let ibn = Self(preset: "ibn")
    /// MetaNorm over IN, BN, LN and GN.
    public static let meta = Self(preset: "meta")
    /// Kalman Normalization (a chain through the network's slots; sequential models only).
    public static let kn = Self(preset: "kn")

    /// `none`, the presets, then every other trainable registry name.
    public static var allCases: [NormalizerChoice] {
        [.none] + presets.map(Self.init(preset:))
            + NormalizerRegistry.all.entries.filter {
                $0.trainable && presetOfEntry[$0.name] == nil
            }
            .map { Self(preset: $0.name) }
    }

    /// A readable one-line description.
    public var description: String { rawValue }

    /// The registry request a preset stands for (nil for `none` and `kn`, which needs a chain).
    func request(channels: Int, groups g: Int, radiusSteps: Int) -> (String, NormalizerRequest)? {
        var o = NormalizerOptions()
        var name = rawValue
        switch rawValue {
        case "none", "kn": return nil
        case "bn": name = "batchnorm"
        case "gn":
            name = "groupnorm"
            o.groups = g
        case "ln":
            name = "groupnorm"
            o.groups = 1
        case "in":
            name = "instancenorm"
            o.affine = true
        case "sn", "ssn":
            name = rawValue == "sn" ? "switchnorm" : "sparseswitchnorm"
            o.values["radius-steps"] = "\(radiusSteps)"
        case "brn":
            name = "batchrenorm"
            o.values["momentum"] = "0.1"
        case "meta":
            name = "metanorm"
            o.groups = g
        default:
            o.groups = g
        }
        return (name, NormalizerRequest(inputShape: [2, channels, 1, 1], options: o))
    }
}

/// A normalizer in a network slot, behind the ``Module`` interface: the layer's parameters live
/// in ``Parameter``s named `slot.key` (optimiser group `"norm"`, `"mixture"` for mixture logits,
/// `"kalman"` for Kalman Normalization's) and are pushed into the layer before every forward.
public final class NormSlot<Scalar: NormScalar>: Module {
    /// What the slot holds.
    public let choice: NormalizerChoice
    /// The slot's name prefix in checkpoints.
    public let name: String
    /// The normalizer (nil for `none`).
    public let layer: (any Normalizing<Scalar>)?
    /// The trainable parameters, sorted by key.
    public let parameters: [Parameter<Scalar>]
    let keys: [String]

    /// Creates the normalizer for `channels` channels of NCHW activations.
    /// - Parameter groups: GroupNorm's G (reduced to the largest divisor of C not above it).
    public init(
        _ choice: NormalizerChoice, channels: Int, groups: Int = 8, name: String,
        radiusSteps: Int = 1, chain: KalmanChain<Scalar>? = nil
    ) throws {
        self.choice = choice
        self.name = name
        var g = max(1, min(groups, channels))
        while channels % g != 0 { g -= 1 }
        if choice == .kn {
            guard let chain else {
                throw TrainingError.invalidSetting(
                    name: "normalizer", value: "kn",
                    requirement: "Kalman Normalization needs a chain (convnet model)")
            }
            layer = try KalmanNorm<Scalar>(channelCount: channels, chain: chain)
        } else if choice.rawValue == "rmsnorm" {
            // RMSNorm of a convolutional activation: the RMS over (C, H, W) of each sample, with
            // a per-channel gain (a configuration of the Π → Φ → Ψ engine).
            layer = try NormLayer<Scalar>(
                normalizer: Normalizer(
                    partition: .layer(trailing: 3), operation: .scale,
                    recovery: .channelAffine(channels: channels, offset: false),
                    epsilon: Double(Float.ulpOfOne)),
                channelCount: channels, name: "RMSNorm")
        } else if let (entry, request) = choice.request(
            channels: channels, groups: g, radiusSteps: radiusSteps)
        {
            layer = try NormalizerRegistry.all.make(entry, request, as: Scalar.self)
        } else {
            layer = nil
        }
        let built = layer
        let values = built?.parameters ?? [:]
        let sortedKeys = values.keys.sorted()
        keys = sortedKeys
        parameters = sortedKeys.map { key in
            let group: String
            switch built?.role(ofParameter: key) ?? .affine {
            case .affine, .conditioning: group = "norm"
            case .mixture: group = "mixture"
            case .kalman: group = "kalman"
            }
            return Parameter(name: name + "." + key, value: values[key]!, group: group)
        }
    }

    /// The importance weights of a learned normalizer (nil for the others).
    public var importanceWeights: (components: [String], mean: [Double], variance: [Double])? {
        try? push()
        return (layer as? any MixtureNormalizing)?.importanceWeights
    }

    /// Advances a per-step schedule (Sparse SN's radius; call once per training step).
    public func advanceRadius() { (layer as? any ScheduledNormalizing)?.advanceSchedule() }

    /// Copies parameter values into the wrapped layer.
    func push() throws {
        guard let layer, !keys.isEmpty else { return }
        var values: [String: Tensor<Scalar>] = [:]
        for (key, p) in zip(keys, parameters) { values[key] = p.value }
        try layer.setParameters(values)
    }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let layer else { return x }
        try push()
        let y = try layer.normalize(x, mode: mode)
        // Sparse SN freezes one-hot weights by overwriting its logits: keep the parameters in
        // step and stop the optimiser from moving them.
        if let scheduled = layer as? any ScheduledNormalizing {
            let frozen = scheduled.frozenParameterKeys
            if !frozen.isEmpty {
                let current = layer.parameters
                for (key, p) in zip(keys, parameters) where frozen.contains(key) {
                    p.value = current[key] ?? p.value
                    p.isFrozen = true
                }
            }
        }
        return y
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let layer else { return dy }
        let g = try layer.backward(dy)
        for (key, p) in zip(keys, parameters) {
            guard let grad = g.parameters[key] else { continue }
            p.gradient = try p.gradient + grad
        }
        return g.input
    }

    /// Running statistics and other non-trainable state, under `slot.key`; integer buffers are
    /// stored as scalars.
    public var buffers: [String: Tensor<Scalar>] {
        guard let layer, let state = try? layer.state() else { return [:] }
        var out: [String: Tensor<Scalar>] = [:]
        for (key, value) in state.tensors where !keys.contains(key) {
            out[name + "." + key] = value
        }
        for (key, value) in state.counters {
            out[name + "." + key] = Tensor([Scalar(value)])
        }
        return out
    }

    /// Restores state saved from ``buffers``.
    public func loadBuffers(_ b: [String: Tensor<Scalar>]) throws {
        guard let layer else { return }
        let current = try layer.state()
        var state = NormState<Scalar>()
        for key in current.tensors.keys where !keys.contains(key) {
            guard let t = b[name + "." + key] else {
                throw TrainingError.checkpoint("missing \(name + "." + key)")
            }
            state.tensors[key] = t
        }
        for key in current.counters.keys {
            guard let t = b[name + "." + key], t.count == 1, let v = t.scalars.first,
                v.isFinite, v >= 0, v < 1e15
            else {
                throw TrainingError.checkpoint("missing or invalid \(name + "." + key)")
            }
            state.counters[key] = Int(v)
        }
        try layer.load(state)
    }
}
