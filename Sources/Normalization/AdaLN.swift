import Foundation
import TensorCore

/// Adaptive LayerNorm with DiT's zero initialization (adaLN-Zero), and FiLM: a feature-wise
/// modulation predicted from a conditioning vector.
///
/// ```
/// (shift, scale[, gate]) = Linear(SiLU(c)).chunk(k)
/// y = LN(x) ⊙ (1 + scale) + shift                 (DiT's modulate)
/// h = r + gate ⊙ branch                            (the gated residual, ``gatedResidual(_:branch:)``)
/// ```
/// LN is a LayerNorm over the last axis without affine parameters (DiT: ε = 1e-6); with
/// `normalizes: false` the layer is FiLM, `x ⊙ (1 + scale) + shift`. The modulation map starts
/// at 0 (adaLN-Zero), so at initialization y = LN(x) and the gate is 0: a residual block
/// `r + gate ⊙ f(y)` is the identity. Φ is an unchanged ``LayerNorm``; Ψ is ``ConditionalAffine``
/// per (sample, feature). Parameters use DiT's keys, `adaLN_modulation.1.weight` `[k·D, D_c]`
/// and `adaLN_modulation.1.bias` `[k·D]`, chunk order shift, scale, gate.
///
/// A transformer block calls ``normalize(_:mode:)``, its branch, then
/// ``gatedResidual(_:branch:)``; backward runs in reverse: ``gatedResidualBackward(_:)`` (which
/// keeps dL/dgate) before ``backward(_:)``, which folds it into the modulation's gradients.
///
/// ## Shape
/// x `[N, *, D]` (rank ≥ 2; tokens share their sample's modulation); condition `[N, D_c]`.
///
/// ## References
/// 1. Perez et al. 2018, "FiLM: Visual Reasoning with a General Conditioning Layer",
///    arXiv:1709.07871.
/// 2. Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748.
public final class AdaLN<Scalar: NormScalar>: ConditionalNormalizing, CustomStringConvertible {
    /// D.
    public let featureCount: Int
    /// D_c.
    public let conditionDimension: Int
    /// Whether the map also predicts a gate (k = 3) or only shift and scale (k = 2).
    public let isGated: Bool
    /// Whether SiLU is applied to the condition first (DiT: yes; FiLM: no).
    public let appliesSiLU: Bool
    /// Φ: LayerNorm over the last axis without affine parameters, or nil (FiLM).
    public let layerNorm: LayerNorm<Scalar>?
    private var weight: Tensor<Scalar>
    private var bias: Tensor<Scalar>
    private var condition: Tensor<Scalar>?
    private var cache: Cache?
    /// dL/dgate per (n, d) from the last ``gatedResidualBackward(_:)``, until ``backward(_:)``.
    private var pendingGateGradient: [Double]?
    private var gateCache: (branch: Tensor<Scalar>, gate: [Double])?

    private struct Cache {
        let input: Tensor<Scalar>
        let normalized: Tensor<Scalar>
        let normCache: NormLayer<Scalar>.Cache?
        let condition: Tensor<Scalar>
        let hidden: [Double]
        let modulation: [Double]
    }

    static var weightKey: String { "adaLN_modulation.1.weight" }
    static var biasKey: String { "adaLN_modulation.1.bias" }

    /// The layer's name in messages.
    public var displayName: String { layerNorm == nil ? "FiLM" : "AdaLN" }
    /// One conditioning input, `condition`.
    public var conditionNames: [String] { ["condition"] }
    private var chunks: Int { isGated ? 3 : 2 }

    /// Creates the layer with the modulation map at zero.
    /// - Parameters:
    ///   - featureCount: D, the last axis of x.
    ///   - conditionDimension: D_c.
    ///   - gated: predict a gate as well (DiT's blocks; its final layer has none).
    ///   - normalizes: LayerNorm first (adaLN) or not (FiLM).
    ///   - silu: SiLU on the condition before the linear map.
    ///   - epsilon: the LayerNorm's ε (DiT: 1e-6).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        featureCount: Int, conditionDimension: Int, gated: Bool = true, normalizes: Bool = true,
        silu: Bool = true, epsilon: Double = 1e-6
    ) throws(NormError) {
        guard featureCount >= 1, conditionDimension >= 1 else {
            throw .invalidHyperparameter(
                name: "feature count and condition dimension",
                value: "\(featureCount), \(conditionDimension)", requirement: "must be ≥ 1")
        }
        self.featureCount = featureCount
        self.conditionDimension = conditionDimension
        isGated = gated
        appliesSiLU = silu
        layerNorm =
            normalizes
            ? try LayerNorm(
                normalizedShape: [featureCount], epsilon: epsilon, elementwiseAffine: false)
            : nil
        let k = gated ? 3 : 2
        let (rows, overflow) = k.multipliedReportingOverflow(by: featureCount)
        guard !overflow else {
            throw .invalidHyperparameter(
                name: "feature count", value: "\(featureCount)", requirement: "is too large")
        }
        do {
            weight = try Tensor(zeros: [rows, conditionDimension])
            bias = try Tensor(zeros: [rows])
        } catch { throw .tensor(error) }
    }

    /// Sets the conditioning vectors `[N, D_c]`.
    /// - Throws: ``NormError/invalidCondition(name:problem:)``; the previous condition is kept.
    public func setConditions(_ conditions: [String: Tensor<Scalar>]) throws {
        try refuseUnknownKeys(Array(conditions.keys), known: conditionNames, layer: displayName)
        guard let c = conditions["condition"] else {
            throw NormError.invalidCondition(name: "condition", problem: "is missing")
        }
        guard c.rank == 2, c.shape[1] == conditionDimension else {
            throw NormError.invalidCondition(
                name: "condition",
                problem: "must have shape [N, \(conditionDimension)], got \(c.shape)")
        }
        try requireFinite(c, name: "condition")
        condition = c
    }

    // MARK: - Forward

    /// y = LN(x) ⊙ (1 + scale) + shift; the gate is kept for ``gatedResidual(_:branch:)``.
    /// - Throws: ``NormError`` for a missing condition, a batch that differs from x's, or an x
    ///   whose last axis is not D; nothing changes then.
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let condition else {
            throw NormError.invalidCondition(
                name: "condition", problem: "is missing (set it with setConditions)")
        }
        guard x.rank >= 2, x.shape.last == featureCount else {
            throw NormError.normalizedShapeMismatch(
                layer: displayName, expected: [featureCount], shape: x.shape)
        }
        guard condition.shape[0] == x.shape[0] else {
            throw NormError.invalidCondition(
                name: "condition",
                problem:
                    "must have one row per sample: condition \(condition.shape), input \(x.shape)")
        }
        let batch = x.shape[0]
        let e = doubles(condition)
        let hidden = appliesSiLU ? e.map { $0 / (1 + exp(-$0)) } : e
        let w = doubles(weight)
        let b = doubles(bias)
        let rows = chunks * featureCount
        var modulation = [Double](repeating: 0, count: batch * rows)
        for n in 0..<batch {
            for r in 0..<rows {
                var v = b[r]
                for j in 0..<conditionDimension {
                    v += w[r * conditionDimension + j] * hidden[n * conditionDimension + j]
                }
                modulation[n * rows + r] = v
            }
        }
        let (shift, scale, _) = split(modulation, batch: batch)
        var normalized = x
        var normCache: NormLayer<Scalar>.Cache?
        if let layerNorm {
            (normalized, normCache) = try layerNorm.forward(x, mode: mode)
        }
        let y = try ConditionalAffine(.perSampleAndFeature(x.shape)).apply(
            normalized, scale: scale.map { 1 + $0 }, offset: shift)
        cache = Cache(
            input: x, normalized: normalized, normCache: normCache, condition: condition,
            hidden: hidden, modulation: modulation)
        pendingGateGradient = nil
        gateCache = nil
        return y
    }

    /// (shift, scale, gate) per (n, d), each `[N·D]`.
    private func split(_ modulation: [Double], batch: Int) -> ([Double], [Double], [Double]) {
        let d = featureCount
        var parts = [[Double]](repeating: [], count: 3)
        for part in 0..<chunks {
            var values = [Double](repeating: 0, count: batch * d)
            for n in 0..<batch {
                for j in 0..<d { values[n * d + j] = modulation[n * chunks * d + part * d + j] }
            }
            parts[part] = values
        }
        return (parts[0], parts[1], parts[2])
    }

    /// h = residual + gate ⊙ branch with the gate of the last ``normalize(_:mode:)`` call.
    /// - Throws: ``NormError`` when the layer has no gate, before any forward call, or when the
    ///   shapes differ from that call's input.
    public func gatedResidual(_ residual: Tensor<Scalar>, branch: Tensor<Scalar>) throws -> Tensor<
        Scalar
    > {
        let gate = try currentGate()
        let shape = cache!.input.shape
        for (name, t) in [("residual", residual), ("branch", branch)] where t.shape != shape {
            throw NormError.shapeMismatch(name: name, expected: shape, actual: t.shape)
        }
        let broadcast = ConditionalAffine.Broadcast.perSampleAndFeature(shape)
        var h = [Double](repeating: 0, count: residual.count)
        for i in 0..<h.count {
            h[i] = Double(residual.scalars[i]) + gate[broadcast(i)] * Double(branch.scalars[i])
        }
        gateCache = (branch, gate)
        return try tensorOf(shape, h)
    }

    /// dL/dresidual = dh and dL/dbranch = gate ⊙ dh; dL/dgate is kept for ``backward(_:)``.
    /// - Throws: ``NormError/noForwardCall(layer:)`` before ``gatedResidual(_:branch:)``.
    public func gatedResidualBackward(_ dh: Tensor<Scalar>) throws -> (
        residual: Tensor<Scalar>, branch: Tensor<Scalar>
    ) {
        guard let (branch, gate) = gateCache else {
            throw NormError.noForwardCall(layer: displayName + " gated residual")
        }
        guard dh.shape == branch.shape else {
            throw NormError.gradientShapeMismatch(expected: branch.shape, actual: dh.shape)
        }
        let broadcast = ConditionalAffine.Broadcast.perSampleAndFeature(branch.shape)
        var dBranch = [Double](repeating: 0, count: dh.count)
        var dGate = [Double](repeating: 0, count: gate.count)
        for i in 0..<dh.count {
            let k = broadcast(i)
            let g = Double(dh.scalars[i])
            dBranch[i] = g * gate[k]
            dGate[k] += g * Double(branch.scalars[i])
        }
        pendingGateGradient = dGate
        return (dh, try tensorOf(branch.shape, dBranch))
    }

    private func currentGate() throws(NormError) -> [Double] {
        guard isGated else {
            throw .invalidHyperparameter(
                name: "gate", value: "none", requirement: "the layer was built without a gate")
        }
        guard let cache else { throw .noForwardCall(layer: displayName) }
        return split(cache.modulation, batch: cache.input.shape[0]).2
    }

    // MARK: - Backward

    /// dL/dx through LN of g = dy ⊙ (1 + scale); dshift = Σ dy, dscale = Σ dy ⊙ x̂ over the tokens,
    /// dgate from ``gatedResidualBackward(_:)`` (0 if it was not called), then through the linear
    /// map (dW = dmodᵀ·SiLU(c), db = Σ dmod) and SiLU (σ(c)·(1 + c·(1 − σ(c)))) into the condition.
    /// - Throws: ``NormError/noForwardCall(layer:)``, ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let x = cache.input
        guard dy.shape == x.shape else {
            throw NormError.gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let batch = x.shape[0]
        let d = featureCount
        let (_, scale, _) = split(cache.modulation, batch: batch)
        let (g, dScale, dShift) = try ConditionalAffine(.perSampleAndFeature(x.shape)).backward(
            dy, normalized: cache.normalized, scale: scale.map { 1 + $0 })
        let dx: Tensor<Scalar>
        if let layerNorm, let normCache = cache.normCache {
            dx = try layerNorm.backward(g, cache: normCache).input
        } else {
            dx = g
        }
        let dGate = pendingGateGradient ?? [Double](repeating: 0, count: batch * d)
        pendingGateGradient = nil
        let rows = chunks * d
        var dMod = [Double](repeating: 0, count: batch * rows)
        for n in 0..<batch {
            for j in 0..<d {
                dMod[n * rows + j] = dShift[n * d + j]
                dMod[n * rows + d + j] = dScale[n * d + j]
                if isGated { dMod[n * rows + 2 * d + j] = dGate[n * d + j] }
            }
        }
        let dc = conditionDimension
        let w = doubles(weight)
        var dW = [Double](repeating: 0, count: rows * dc)
        var dB = [Double](repeating: 0, count: rows)
        var dHidden = [Double](repeating: 0, count: batch * dc)
        for n in 0..<batch {
            for r in 0..<rows {
                let gm = dMod[n * rows + r]
                dB[r] += gm
                for j in 0..<dc {
                    dW[r * dc + j] += gm * cache.hidden[n * dc + j]
                    dHidden[n * dc + j] += gm * w[r * dc + j]
                }
            }
        }
        var dCondition = dHidden
        if appliesSiLU {
            let e = doubles(cache.condition)
            for i in 0..<e.count {
                let s = 1 / (1 + exp(-e[i]))
                dCondition[i] *= s * (1 + e[i] * (1 - s))
            }
        }
        return NormGradients(
            input: dx,
            parameters: [
                Self.weightKey: try tensorOf(weight.shape, dW),
                Self.biasKey: try tensorOf(bias.shape, dB),
            ],
            conditions: ["condition": try tensorOf(cache.condition.shape, dCondition)])
    }

    // MARK: - Parameters and state

    /// The modulation map by DiT's keys.
    public var parameters: [String: Tensor<Scalar>] {
        [Self.weightKey: weight, Self.biasKey: bias]
    }

    /// Replaces parameters (shape-checked, all or nothing).
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        if let w = values[Self.weightKey] { weight = w }
        if let b = values[Self.biasKey] { bias = b }
    }

    /// The parameters (no buffers).
    public func state() throws -> NormState<Scalar> { NormState(tensors: parameters) }

    /// Restores the parameters (shape-checked, all or nothing).
    public func load(_ state: NormState<Scalar>) throws {
        try refuseUnknownKeys(Array(state.counters.keys), known: [], layer: displayName)
        try checkStateShapes(state, current: parameters, layer: displayName)
        try setParameters(state.tensors)
    }

    /// The modulation map is a conditioning network.
    public func role(ofParameter key: String) -> ParameterRole { .conditioning }

    // MARK: - CustomStringConvertible

    /// One line with the configuration.
    public var description: String {
        "\(displayName)(features=\(featureCount), condition=\(conditionDimension), "
            + "gate=\(isGated), silu=\(appliesSiLU)\(layerNorm.map { ", eps=\($0.normalizer.epsilon)" } ?? ""))"
    }
}
