import NormKit

/// The normalizers a network slot can hold, by the names the CLI and the experiments use.
public enum NormalizerChoice: String, CaseIterable, Sendable {
    /// Identity.
    case none
    /// BatchNorm.
    case bn
    /// GroupNorm with `groups` groups (clamped to divide the channels).
    case gn
    /// LayerNorm over (C, H, W) with per-channel affine (GroupNorm with one group).
    case ln
    /// InstanceNorm with affine parameters.
    case `in`
    /// Switchable Normalization.
    case sn
    /// Sparse Switchable Normalization.
    case ssn
    /// Batch Renormalization.
    case brn
    /// IBN-a.
    case ibn
    /// MetaNorm over IN, BN, LN and GN.
    case meta
    /// Kalman Normalization (a chain through the network's slots; sequential models only).
    case kn
}

/// A normalizer in a network slot, behind the ``Module`` interface: parameters live in
/// ``Parameter``s (γ and β in group `"norm"`, mixture logits in group `"mixture"`) and are
/// pushed into the wrapped layer before every forward.
public final class NormSlot<Scalar: NormScalar>: Module {
    /// What the slot holds.
    public let choice: NormalizerChoice
    /// The slot's name prefix in checkpoints.
    public let name: String
    let layer: Any?
    var cache: Any?
    /// The trainable parameters.
    public let parameters: [Parameter<Scalar>]

    /// Creates the normalizer for `channels` channels.
    /// - Parameter groups: GroupNorm's G (reduced to the largest divisor of C not above it).
    public init(
        _ choice: NormalizerChoice, channels: Int, groups: Int = 8, name: String,
        radiusSteps: Int = 1, chain: KalmanChain<Scalar>? = nil
    ) throws {
        self.choice = choice
        self.name = name
        var g = max(1, min(groups, channels))
        while channels % g != 0 { g -= 1 }
        func affine(_ scale: Tensor<Scalar>?, _ offset: Tensor<Scalar>?) -> [Parameter<Scalar>] {
            var out: [Parameter<Scalar>] = []
            if let scale {
                out.append(Parameter(name: name + ".weight", value: scale, group: "norm"))
            }
            if let offset {
                out.append(Parameter(name: name + ".bias", value: offset, group: "norm"))
            }
            return out
        }
        switch choice {
        case .none:
            layer = nil
            parameters = []
        case .bn, .gn, .ln, .in:
            let l: NormLayer<Scalar> =
                switch choice {
                case .bn: try BatchNorm<Scalar>(featureCount: channels)
                case .gn: try GroupNorm<Scalar>(groupCount: g, channelCount: channels)
                case .ln: try GroupNorm<Scalar>(groupCount: 1, channelCount: channels)
                default: try InstanceNorm<Scalar>(featureCount: channels, affine: true)
                }
            layer = l
            parameters = affine(l.scale, l.offset)
        case .sn, .ssn:
            let l = try SwitchableNorm<Scalar>(
                channelCount: channels, weighting: choice == .sn ? .softmax : .sparsestMax,
                radiusSteps: radiusSteps)
            layer = l
            parameters =
                affine(l.scale, l.offset) + [
                    Parameter(name: name + ".mean_weight", value: l.meanLogits, group: "mixture"),
                    Parameter(
                        name: name + ".var_weight", value: l.varianceLogits, group: "mixture"),
                ]
        case .meta:
            let l = try MetaNorm<Scalar>(
                channelCount: channels, aggregations: [.instance, .batchNorm, .layer, .group(g)])
            layer = l
            parameters =
                affine(l.scale, l.offset) + [
                    Parameter(name: name + ".mean_weight", value: l.meanLogits, group: "mixture"),
                    Parameter(
                        name: name + ".var_weight", value: l.varianceLogits, group: "mixture"),
                ]
        case .brn:
            let l = try BatchRenorm<Scalar>(
                channelCount: channels, momentum: .exponential(weightOfNew: 0.1))
            layer = l
            parameters = affine(l.scale, l.offset)
        case .kn:
            guard let chain else {
                throw TrainingError.invalidSetting(
                    name: "normalizer", value: "kn",
                    requirement: "Kalman Normalization needs a chain (convnet model)")
            }
            let l = try KalmanNorm<Scalar>(channelCount: channels, chain: chain)
            layer = l
            parameters =
                affine(l.scale, l.offset) + [
                    Parameter(name: name + ".transition", value: l.transition, group: "kalman"),
                    Parameter(name: name + ".gain", value: l.gainLogits, group: "kalman"),
                ]
        case .ibn:
            let l = try IBN<Scalar>(channelCount: max(channels, 2))
            layer = l
            parameters = [
                Parameter(name: name + ".IN.weight", value: l.instance.scale!, group: "norm"),
                Parameter(name: name + ".IN.bias", value: l.instance.offset!, group: "norm"),
                Parameter(name: name + ".BN.weight", value: l.batch.scale!, group: "norm"),
                Parameter(name: name + ".BN.bias", value: l.batch.offset!, group: "norm"),
            ]
        }
    }

    /// The importance weights of a learned normalizer (nil for the others).
    public var importanceWeights: (components: [String], mean: [Double], variance: [Double])? {
        push()
        if let l = layer as? SwitchableNorm<Scalar> { return l.importanceWeights }
        if let l = layer as? MetaNorm<Scalar> { return l.importanceWeights }
        return nil
    }

    /// Advances Sparse SN's radius schedule (call once per training step).
    public func advanceRadius() { (layer as? SwitchableNorm<Scalar>)?.advanceRadius() }

    /// Copies parameter values into the wrapped layer.
    func push() {
        let v = parameters.map(\.value)
        switch layer {
        case let l as NormLayer<Scalar>:
            l.scale = v[0]
            l.offset = v[1]
        case let l as SwitchableNorm<Scalar>:
            l.scale = v[0]
            l.offset = v[1]
            l.meanLogits = v[2]
            l.varianceLogits = v[3]
        case let l as MetaNorm<Scalar>:
            l.scale = v[0]
            l.offset = v[1]
            l.meanLogits = v[2]
            l.varianceLogits = v[3]
        case let l as BatchRenorm<Scalar>:
            l.scale = v[0]
            l.offset = v[1]
        case let l as KalmanNorm<Scalar>:
            l.scale = v[0]
            l.offset = v[1]
            l.transition = v[2]
            l.gainLogits = v[3]
        case let l as IBN<Scalar>:
            l.instance.scale = v[0]
            l.instance.offset = v[1]
            l.batch.scale = v[2]
            l.batch.offset = v[3]
        default:
            break
        }
    }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        push()
        switch layer {
        case let l as NormLayer<Scalar>:
            let (y, c) = try l.forward(x, mode: mode)
            cache = c
            return y
        case let l as SwitchableNorm<Scalar>:
            let (y, c) = try l.forward(x, mode: mode)
            cache = c
            // Sparse SN freezes one-hot weights by overwriting its logits: keep the parameters
            // in step and stop the optimiser from moving them.
            if l.isMeanFixed {
                parameters[2].value = l.meanLogits
                parameters[2].isFrozen = true
            }
            if l.isVarianceFixed {
                parameters[3].value = l.varianceLogits
                parameters[3].isFrozen = true
            }
            return y
        case let l as MetaNorm<Scalar>:
            let (y, c) = try l.forward(x, mode: mode)
            cache = c
            return y
        case let l as BatchRenorm<Scalar>:
            let (y, c) = try l.forward(x, mode: mode)
            cache = c
            return y
        case let l as IBN<Scalar>:
            let (y, c) = try l.forward(x, mode: mode)
            cache = c
            return y
        case let l as KalmanNorm<Scalar>:
            let (y, c) = try l.forward(x, mode: mode)
            cache = c
            return y
        default:
            return x
        }
    }

    func accumulate(_ grads: [Tensor<Scalar>?]) throws {
        for (p, g) in zip(parameters, grads) {
            guard let g else { continue }
            p.gradient = try p.gradient + g
        }
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        switch (layer, cache) {
        case (nil, _):
            return dy
        case (let l as NormLayer<Scalar>, let c as NormLayer<Scalar>.Cache):
            let g = try l.backward(dy, cache: c)
            try accumulate([g.scale, g.offset])
            return g.input
        case (let l as SwitchableNorm<Scalar>, let c as SwitchableNorm<Scalar>.Cache):
            let g = try l.backward(dy, cache: c)
            try accumulate([g.scale, g.offset, g.meanLogits, g.varianceLogits])
            return g.input
        case (let l as MetaNorm<Scalar>, let c as MetaNorm<Scalar>.Cache):
            let g = try l.backward(dy, cache: c)
            try accumulate([g.scale, g.offset, g.meanLogits, g.varianceLogits])
            return g.input
        case (let l as BatchRenorm<Scalar>, let c as BatchRenorm<Scalar>.Cache):
            let g = try l.backward(dy, cache: c)
            try accumulate([g.scale, g.offset])
            return g.input
        case (let l as KalmanNorm<Scalar>, let c as KalmanNorm<Scalar>.Cache):
            let g = try l.backward(dy, cache: c)
            try accumulate([g.scale, g.offset, g.transition, g.gainLogits])
            return g.input
        case (let l as IBN<Scalar>, let c as IBN<Scalar>.Cache):
            let g = try l.backward(dy, cache: c)
            try accumulate([g.instance.scale, g.instance.offset, g.batch.scale, g.batch.offset])
            return g.input
        default:
            throw TrainingError.noForward(layer: name)
        }
    }

    /// Running statistics and other non-trainable state.
    public var buffers: [String: Tensor<Scalar>] {
        var out: [String: Tensor<Scalar>] = [:]
        switch layer {
        case let l as NormLayer<Scalar>:
            if let r = l.runningStatistics {
                out[name + ".running_mean"] = r.mean
                out[name + ".running_var"] = r.variance
            }
        case let l as SwitchableNorm<Scalar>:
            out[name + ".running_mean"] = l.runningMean
            out[name + ".running_var"] = l.runningVariance
            out[name + ".radius"] = Tensor([Scalar(l.radius)])
        case let l as BatchRenorm<Scalar>:
            out[name + ".running_mean"] = l.runningMean
            out[name + ".running_std"] = l.runningStandardDeviation
        case let l as IBN<Scalar>:
            if let r = l.batch.runningStatistics {
                out[name + ".BN.running_mean"] = r.mean
                out[name + ".BN.running_var"] = r.variance
            }
        case let l as KalmanNorm<Scalar>:
            out[name + ".running_mean"] = Tensor(l.runningMean.map { Scalar($0) })
            out[name + ".running_var"] = Tensor(l.runningVariance.map { Scalar($0) })
        case let l as MetaNorm<Scalar>:
            for (k, values) in l.runningMean.enumerated() {
                out[name + ".running_mean.\(k)"] = Tensor(values.map { Scalar($0) })
                out[name + ".running_var.\(k)"] = Tensor(l.runningVariance[k].map { Scalar($0) })
            }
        default:
            break
        }
        return out
    }

    /// Restores state saved from ``buffers``.
    public func loadBuffers(_ b: [String: Tensor<Scalar>]) throws {
        func get(_ key: String) throws -> Tensor<Scalar> {
            guard let t = b[name + key] else {
                throw TrainingError.checkpoint("missing \(name + key)")
            }
            return t
        }
        switch layer {
        case let l as NormLayer<Scalar>:
            if l.runningStatistics != nil {
                try l.load([
                    "running_mean": try get(".running_mean"),
                    "running_var": try get(".running_var"),
                ])
            }
        case let l as SwitchableNorm<Scalar>:
            try l.load([
                "running_mean": try get(".running_mean"), "running_var": try get(".running_var"),
            ])
            l.radius = Double(try get(".radius").scalars[0])
        case let l as BatchRenorm<Scalar>:
            try l.load([
                "running_mean": try get(".running_mean"), "running_std": try get(".running_std"),
            ])
        case let l as IBN<Scalar>:
            try l.load([
                "BN.running_mean": try get(".BN.running_mean"),
                "BN.running_var": try get(".BN.running_var"),
            ])
        case let l as KalmanNorm<Scalar>:
            l.runningMean = try get(".running_mean").scalars.map(Double.init)
            l.runningVariance = try get(".running_var").scalars.map(Double.init)
        case let l as MetaNorm<Scalar>:
            for k in 0..<l.runningMean.count {
                l.runningMean[k] = try get(".running_mean.\(k)").scalars.map(Double.init)
                l.runningVariance[k] = try get(".running_var.\(k)").scalars.map(Double.init)
            }
        default:
            break
        }
    }
}
