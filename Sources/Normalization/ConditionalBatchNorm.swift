import TensorCore

/// Conditional Batch Normalization: BatchNorm without affine parameters, then γ and β chosen
/// per sample from its class or predicted from its conditioning vector.
///
/// ```
/// y = γ(c_n) ⊙ BN(x) + β(c_n)
/// embedding:  γ(k) = W_γ[k],  β(k) = W_β[k]                  (keys weights.weight, biases.weight)
/// linear:     γ(e) = [1 +] A_γ·e + a_γ,   β(e) = A_β·e + a_β     (keys gain.*, bias.*)
/// ```
/// The embedding form is the class-conditional BN of cGANs with a projection discriminator; the
/// linear form with `1 +` is BigGAN's `ccbn`, without it de Vries et al.'s conditional BN. Φ is
/// an unchanged ``BatchNorm`` without affine parameters (biased batch variance; running mean and
/// unbiased variance under PyTorch's momentum rule; inference uses them); Ψ is
/// ``ConditionalAffine`` per (sample, channel). Gradients reach the embedding rows of the
/// classes in the batch, the linear maps and the conditioning vector.
///
/// Initial values make γ = 1 and β = 0 for every condition (embedding rows 1 and 0; linear maps
/// 0 with `gain.bias` 1, or 0 under `1 +`), so an untrained layer is plain BatchNorm.
///
/// ## Shape
/// x `[N, C, spatial…]` (rank ≥ 2, channels-first); labels `[N]` (class indices, integral values
/// in 0..<K) or condition `[N, D]`. Parameters `[K, C]`, or `[C, D]` and `[C]`.
///
/// ## References
/// 1. de Vries et al. 2017, "Modulating early visual processing by language", arXiv:1707.00683.
/// 2. Miyato & Koyama 2018, "cGANs with Projection Discriminator", arXiv:1802.05637.
/// 3. Brock, Donahue & Simonyan 2019, "Large Scale GAN Training for High Fidelity Natural Image
///    Synthesis", arXiv:1809.11096.
public final class ConditionalBatchNorm<Scalar: NormScalar>: ConditionalNormalizing,
    CustomStringConvertible
{
    /// Where γ and β come from.
    public enum Source: Sendable, Hashable {
        /// One row of γ and β per class.
        case embedding(classes: Int)
        /// Linear maps of a conditioning vector of this dimension; `unitOffset` gives BigGAN's
        /// γ = 1 + Linear(e).
        case linear(conditionDimension: Int, unitOffset: Bool)
    }

    /// C.
    public let channelCount: Int
    /// The conditioning source.
    public let source: Source
    /// Φ: BatchNorm without affine parameters.
    public let batchNorm: BatchNorm<Scalar>
    private var values: [String: Tensor<Scalar>]
    private var condition: Tensor<Scalar>?
    private var cache: Cache?

    private struct Cache {
        let normalized: Tensor<Scalar>
        let normCache: NormLayer<Scalar>.Cache
        let condition: Tensor<Scalar>
        let gamma: [Double]
    }

    /// The layer's name in messages.
    public var displayName: String { "ConditionalBatchNorm" }
    /// `["labels"]` for the embedding form, `["condition"]` for the linear form.
    public var conditionNames: [String] {
        if case .embedding = source { return ["labels"] }
        return ["condition"]
    }

    /// Creates the layer.
    /// - Parameters:
    ///   - channelCount: C.
    ///   - source: embedding per class or linear map.
    ///   - epsilon, momentum: BatchNorm's (1e-5, PyTorch's 0.1).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, source: Source, epsilon: Double = 1e-5,
        momentum: Momentum = .pytorchDefault
    ) throws(NormError) {
        batchNorm = try BatchNorm(
            featureCount: channelCount, epsilon: epsilon, momentum: momentum, affine: false)
        self.channelCount = channelCount
        self.source = source
        switch source {
        case .embedding(let classes):
            guard classes >= 1 else {
                throw .invalidHyperparameter(
                    name: "classes", value: "\(classes)", requirement: "must be ≥ 1")
            }
            try HyperparameterCheck.parameterSize([classes, channelCount], name: "weights.weight")
            values = [
                "weights.weight": try Self.filled(1, [classes, channelCount]),
                "biases.weight": try Self.filled(0, [classes, channelCount]),
            ]
        case .linear(let d, let unitOffset):
            guard d >= 1 else {
                throw .invalidHyperparameter(
                    name: "condition dimension", value: "\(d)", requirement: "must be ≥ 1")
            }
            try HyperparameterCheck.parameterSize([channelCount, d], name: "gain.weight")
            values = [
                "gain.weight": try Self.filled(0, [channelCount, d]),
                "gain.bias": try Self.filled(unitOffset ? 0 : 1, [channelCount]),
                "bias.weight": try Self.filled(0, [channelCount, d]),
                "bias.bias": try Self.filled(0, [channelCount]),
            ]
        }
    }

    private static func filled(_ v: Scalar, _ shape: [Int]) throws(NormError) -> Tensor<Scalar> {
        do { return try Tensor(repeating: v, shape: shape) } catch { throw .tensor(error) }
    }

    /// Sets the labels (`[N]`, integral class indices) or the conditioning vectors (`[N, D]`).
    /// - Throws: ``NormError/invalidCondition(name:problem:)`` for a missing, NaN, non-integral
    ///   or out-of-range value or a wrong shape; the previous condition is kept then.
    public func setConditions(_ conditions: [String: Tensor<Scalar>]) throws {
        try refuseUnknownKeys(Array(conditions.keys), known: conditionNames, layer: displayName)
        let name = conditionNames[0]
        guard let c = conditions[name] else {
            throw NormError.invalidCondition(name: name, problem: "is missing")
        }
        try requireFinite(c, name: name)
        switch source {
        case .embedding(let classes):
            guard c.rank == 1 else {
                throw NormError.invalidCondition(
                    name: name, problem: "must be a vector [N] of class indices, got \(c.shape)")
            }
            for (n, v) in c.scalars.enumerated()
            where v != v.rounded() || v < 0 || v >= Scalar(classes) {
                throw NormError.invalidCondition(
                    name: name,
                    problem: "entry \(n) is \(v), not a class index in 0..<\(classes) "
                        + "(labels shape \(c.shape))")
            }
        case .linear(let d, _):
            guard c.rank == 2, c.shape[1] == d else {
                throw NormError.invalidCondition(
                    name: name, problem: "must have shape [N, \(d)], got \(c.shape)")
            }
        }
        condition = c
    }

    // MARK: - Forward

    /// BN(x) (training: batch statistics, running statistics updated; otherwise running), then
    /// γ(c_n), β(c_n) per sample and channel.
    /// - Throws: ``NormError`` for a missing condition or one whose batch differs from x's;
    ///   nothing changes then (running statistics included).
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let name = conditionNames[0]
        guard let condition else {
            throw NormError.invalidCondition(
                name: name, problem: "is missing (set it with setConditions)")
        }
        guard x.rank >= 2 else {
            throw NormError.invalidRank(
                layer: displayName, expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
        }
        guard condition.shape[0] == x.shape[0] else {
            throw NormError.invalidCondition(
                name: name,
                problem: "must have one entry per sample: \(name) \(condition.shape), input "
                    + "\(x.shape)")
        }
        let (gamma, beta) = modulation(condition, batch: x.shape[0])
        let (normalized, normCache) = try batchNorm.forward(x, mode: mode)
        let y = try ConditionalAffine(.perSampleAndChannel(x.shape)).apply(
            normalized, scale: gamma, offset: beta)
        cache = Cache(
            normalized: normalized, normCache: normCache, condition: condition, gamma: gamma)
        return y
    }

    /// γ and β per (n, c), row-major `[N, C]`.
    private func modulation(_ c: Tensor<Scalar>, batch: Int) -> ([Double], [Double]) {
        let channels = channelCount
        var gamma = [Double](repeating: 0, count: batch * channels)
        var beta = gamma
        switch source {
        case .embedding:
            let w = doubles(values["weights.weight"]!)
            let b = doubles(values["biases.weight"]!)
            for n in 0..<batch {
                let k = Int(Double(c.scalars[n]))
                for ch in 0..<channels {
                    gamma[n * channels + ch] = w[k * channels + ch]
                    beta[n * channels + ch] = b[k * channels + ch]
                }
            }
        case .linear(let d, let unitOffset):
            let e = doubles(c)
            let gw = doubles(values["gain.weight"]!)
            let gb = doubles(values["gain.bias"]!)
            let bw = doubles(values["bias.weight"]!)
            let bb = doubles(values["bias.bias"]!)
            for n in 0..<batch {
                for ch in 0..<channels {
                    var g = gb[ch] + (unitOffset ? 1 : 0)
                    var b = bb[ch]
                    for j in 0..<d {
                        g += gw[ch * d + j] * e[n * d + j]
                        b += bw[ch * d + j] * e[n * d + j]
                    }
                    gamma[n * channels + ch] = g
                    beta[n * channels + ch] = b
                }
            }
        }
        return (gamma, beta)
    }

    // MARK: - Backward

    /// dL/dx through BatchNorm of g = dy ⊙ γ; dγ_{n,c} = Σ dy ⊙ x̂ and dβ_{n,c} = Σ dy over the
    /// spatial positions, then into the embedding rows (summed over samples of one class) or the
    /// linear maps and the conditioning vector (`conditions["condition"]`).
    /// - Throws: ``NormError/noForwardCall(layer:)``, ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let x = cache.normCache.input
        guard dy.shape == x.shape else {
            throw NormError.gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let (g, dGamma, dBeta) = try ConditionalAffine(.perSampleAndChannel(x.shape)).backward(
            dy, normalized: cache.normalized, scale: cache.gamma)
        let dx = try batchNorm.backward(g, cache: cache.normCache).input
        let batch = x.shape[0]
        let channels = channelCount
        let c = cache.condition
        var parameters: [String: Tensor<Scalar>] = [:]
        var conditions: [String: Tensor<Scalar>] = [:]
        switch source {
        case .embedding(let classes):
            var dw = [Double](repeating: 0, count: classes * channels)
            var db = dw
            for n in 0..<batch {
                let k = Int(Double(c.scalars[n]))
                for ch in 0..<channels {
                    dw[k * channels + ch] += dGamma[n * channels + ch]
                    db[k * channels + ch] += dBeta[n * channels + ch]
                }
            }
            parameters["weights.weight"] = try tensorOf([classes, channels], dw)
            parameters["biases.weight"] = try tensorOf([classes, channels], db)
        case .linear(let d, _):
            let e = doubles(c)
            let gw = doubles(values["gain.weight"]!)
            let bw = doubles(values["bias.weight"]!)
            var dgw = [Double](repeating: 0, count: channels * d)
            var dbw = dgw
            var dgb = [Double](repeating: 0, count: channels)
            var dbb = dgb
            var de = [Double](repeating: 0, count: batch * d)
            for n in 0..<batch {
                for ch in 0..<channels {
                    let gG = dGamma[n * channels + ch]
                    let gB = dBeta[n * channels + ch]
                    dgb[ch] += gG
                    dbb[ch] += gB
                    for j in 0..<d {
                        dgw[ch * d + j] += gG * e[n * d + j]
                        dbw[ch * d + j] += gB * e[n * d + j]
                        de[n * d + j] += gG * gw[ch * d + j] + gB * bw[ch * d + j]
                    }
                }
            }
            parameters["gain.weight"] = try tensorOf([channels, d], dgw)
            parameters["gain.bias"] = try tensorOf([channels], dgb)
            parameters["bias.weight"] = try tensorOf([channels, d], dbw)
            parameters["bias.bias"] = try tensorOf([channels], dbb)
            conditions["condition"] = try tensorOf([batch, d], de)
        }
        return NormGradients(input: dx, parameters: parameters, conditions: conditions)
    }

    // MARK: - Parameters and state

    /// The embedding tables or linear maps, by their PyTorch keys.
    public var parameters: [String: Tensor<Scalar>] { values }

    /// Replaces parameters (shape-checked, all or nothing).
    public func setParameters(_ new: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(new, current: values, layer: displayName)
        values.merge(new) { $1 }
    }

    /// Parameters, `running_mean`, `running_var` and `num_batches_tracked`.
    public func state() throws -> NormState<Scalar> {
        let bn = batchNorm.state()
        return NormState(
            tensors: values.merging(bn.tensors) { $1 },
            counters: bn.counters)
    }

    /// Restores parameters and BatchNorm buffers (shape-checked, all or nothing).
    public func load(_ state: NormState<Scalar>) throws {
        let current = try self.state()
        try checkStateShapes(state, current: current.tensors, layer: displayName)
        try refuseUnknownKeys(
            Array(state.counters.keys), known: ["num_batches_tracked"], layer: displayName)
        let buffers = state.tensors.filter { values[$0.key] == nil }
        try batchNorm.load(buffers, batchesTracked: state.counters["num_batches_tracked"])
        values.merge(state.tensors.filter { values[$0.key] != nil }) { $1 }
    }

    /// Embedding tables and linear maps are conditioning weights.
    public func role(ofParameter key: String) -> ParameterRole { .conditioning }

    // MARK: - CustomStringConvertible

    /// One line with the configuration.
    public var description: String {
        switch source {
        case .embedding(let k):
            return "ConditionalBatchNorm(\(channelCount), classes=\(k), \(batchNorm.normalizer))"
        case .linear(let d, let unitOffset):
            return
                "ConditionalBatchNorm(\(channelCount), linear(\(d))\(unitOffset ? ", 1 + γ" : ""))"
        }
    }
}
