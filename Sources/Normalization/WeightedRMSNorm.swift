import TensorCore

/// RMSNorm over the last axis as the LLM code bases write it: plain weight (LLaMA) or the
/// (1 + w) convention with w initialised at 0 (Gemma); the base of ``AddRMSNorm`` and ``QKNorm``.
///
/// ```
/// y = x / √(mean(x²) + ε) ⊙ w          (plain, w = 1 initially)
/// y = x / √(mean(x²) + ε) ⊙ (1 + w)    (unit offset, w = 0 initially)
/// ```
/// Mean over the last axis (D), ε inside the root (default 1e-6, the value of the LLaMA and
/// Gemma configurations; PyTorch's `nn.RMSNorm` default is the machine epsilon). Parameter key
/// `weight`. No running statistics. The arithmetic is an unchanged ``RMSNorm`` whose γ is w or
/// 1 + w, so Float inputs run the fast row kernels; dL/dw = dL/dγ in both conventions.
///
/// ## Shape
/// Input `[*, D]`; output the same; `weight` `[D]`.
///
/// ## References
/// 1. Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467.
/// 2. Gemma Team 2024, "Gemma: Open Models Based on Gemini Research and Technology",
///    arXiv:2403.08295 (the (1 + w) weight).
public class WeightedRMSNorm<Scalar: NormScalar>: Normalizing, CustomStringConvertible {
    /// D.
    public let featureCount: Int
    /// ε inside the root.
    public let epsilon: Double
    /// Whether γ = 1 + w (true) or γ = w.
    public let hasUnitOffset: Bool
    /// w, `weight` in checkpoints.
    public private(set) var weight: Tensor<Scalar>
    /// Φ and Ψ: an RMSNorm whose γ is set from w before every call.
    let inner: RMSNorm<Scalar>
    var cache: NormLayer<Scalar>.Cache?

    /// Creates the layer with w = 1 (plain) or w = 0 (unit offset).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(featureCount: Int, epsilon: Double = 1e-6, unitOffset: Bool = false)
        throws(NormError)
    {
        inner = try RMSNorm(normalizedShape: [featureCount], epsilon: epsilon)
        self.featureCount = featureCount
        self.epsilon = epsilon
        hasUnitOffset = unitOffset
        do {
            weight = try Tensor(repeating: unitOffset ? 0 : 1, shape: [featureCount])
        } catch { throw .tensor(error) }
        syncScale()
    }

    /// The layer's name in messages.
    public var displayName: String { hasUnitOffset ? "RMSNorm(1+w)" : "RMSNorm" }

    func syncScale() {
        inner.scale = hasUnitOffset ? weight.map { 1 + $0 } : weight
    }

    // MARK: - Forward and backward

    /// y = RMSNorm(x) ⊙ γ.
    /// - Throws: ``NormError`` when the last axis is not D.
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        try validate(x)
        let (y, c) = try inner.forward(x, mode: mode)
        cache = c
        return y
    }

    /// Shape checks before anything runs (subclasses add theirs).
    func validate(_ x: Tensor<Scalar>) throws(NormError) {
        guard x.rank >= 1, x.shape.last == featureCount else {
            throw .normalizedShapeMismatch(
                layer: displayName, expected: [featureCount], shape: x.shape)
        }
    }

    /// dx = r·(g − x̂·mean(g x̂)) with g = dy ⊙ γ, r = 1/rms; dw = Σ dy ⊙ x̂.
    /// - Throws: ``NormError/noForwardCall(layer:)``, ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let g = try inner.backward(dy, cache: cache)
        return NormGradients(input: g.input, parameters: ["weight": g.scale!])
    }

    // MARK: - Parameters and state

    /// `weight`.
    public var parameters: [String: Tensor<Scalar>] { ["weight": weight] }

    /// Replaces `weight` (shape-checked).
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        if let w = values["weight"] {
            weight = w
            syncScale()
        }
    }

    /// `weight`.
    public func state() throws -> NormState<Scalar> { NormState(tensors: parameters) }

    /// Restores `weight` (shape-checked).
    public func load(_ state: NormState<Scalar>) throws {
        try refuseUnknownKeys(Array(state.counters.keys), known: [], layer: displayName)
        try checkStateShapes(state, current: parameters, layer: displayName)
        try setParameters(state.tensors)
    }

    /// Which kernels run (`.automatic`: the fast Float row kernels).
    public var kernels: KernelChoice {
        get { inner.kernels }
        set { inner.kernels = newValue }
    }

    // MARK: - CustomStringConvertible

    /// One line with the configuration.
    public var description: String {
        "\(displayName)(\(featureCount), eps=\(epsilon))"
    }
}

/// QK-norm: RMSNorm over the head dimension of attention queries or keys.
///
/// ```
/// q̂ = q / √(mean_head_dim(q²) + ε) ⊙ w,     q `[B, heads, T, head_dim]`
/// ```
/// One instance per tensor (queries and keys have their own w, shared by all heads), as in the
/// LLMs that normalize per head (`q_norm`, `k_norm` of `head_dim`). A ``WeightedRMSNorm`` that
/// insists on rank 4, so that a `[B, T, D]` tensor is not silently normalized over D.
///
/// ## References
/// 1. Henry et al. 2020, "Query-Key Normalization for Transformers", arXiv:2010.04245.
/// 2. Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters",
///    arXiv:2302.05442.
public final class QKNorm<Scalar: NormScalar>: WeightedRMSNorm<Scalar> {
    /// Creates a QK-norm over `headDimension` (w = 1, or 0 with the unit offset).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(headDimension: Int, epsilon: Double = 1e-6, unitOffset: Bool = false)
        throws(NormError)
    {
        try super.init(featureCount: headDimension, epsilon: epsilon, unitOffset: unitOffset)
    }

    /// The layer's name in messages.
    public override var displayName: String { "QKNorm" }

    override func validate(_ x: Tensor<Scalar>) throws(NormError) {
        guard x.rank == 4 else {
            throw .invalidRank(
                layer: displayName, expected: "rank 4 [B, heads, T, head_dim]", shape: x.shape)
        }
        try super.validate(x)
    }
}

/// Fused residual add and RMSNorm, returning the normalized output and the new residual, as
/// the fused kernels of LLM inference engines do.
///
/// ```
/// h = x + r,    y = RMSNorm(h) ⊙ γ        (γ = w, or 1 + w)
/// ```
/// ``normalize(_:mode:)`` returns y; ``residualOutput`` holds h. Backward takes dL/dy and,
/// through ``backward(_:residualOutputGradient:)``, dL/dh from h's other uses; then
/// dL/dx = dL/dr = dL/dh + RMSNorm's input gradient. x and r are read once and h written once
/// (``NormLayer/forward(_:adding:mode:)``'s fused Float kernel).
///
/// ## Shape
/// x, residual, y and h `[*, D]`; `weight` `[D]`.
public final class AddRMSNorm<Scalar: NormScalar>: WeightedRMSNorm<Scalar>,
    ConditionalNormalizing
{
    private var residual: Tensor<Scalar>?
    /// h = x + r from the last call.
    public private(set) var residualOutput: Tensor<Scalar>?
    /// `["residual": h]` after a call (what `normkit apply --residual-output` writes).
    public var auxiliaryOutputs: [String: Tensor<Scalar>] {
        residualOutput.map { ["residual": $0] } ?? [:]
    }

    /// The layer's name in messages.
    public override var displayName: String { "AddRMSNorm" }
    /// One conditioning input, `residual`.
    public var conditionNames: [String] { ["residual"] }

    /// Sets the residual r for the next call.
    /// - Throws: ``NormError/invalidCondition(name:problem:)`` when it is missing.
    public func setConditions(_ conditions: [String: Tensor<Scalar>]) throws {
        try refuseUnknownKeys(Array(conditions.keys), known: conditionNames, layer: displayName)
        guard let r = conditions["residual"] else {
            throw NormError.invalidCondition(name: "residual", problem: "is missing")
        }
        residual = r
    }

    /// y = RMSNorm(x + r) ⊙ γ; h = x + r is kept in ``residualOutput``.
    /// - Throws: ``NormError`` for a missing residual or one whose shape differs from x's.
    public override func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let residual else {
            throw NormError.invalidCondition(
                name: "residual", problem: "is missing (set it with setConditions)")
        }
        try validate(x)
        let (y, h, c) = try inner.forward(x, adding: residual, mode: mode)
        cache = c
        residualOutput = h
        return y
    }

    /// Backward with no other use of h (dL/dh = 0 besides the norm).
    public override func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        try backward(dy, residualOutputGradient: nil)
    }

    /// dL/dx = dL/dr = dL/dh + RMSNorm's input gradient; dL/dw as RMSNorm's dγ.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)`` for a wrong shape.
    public func backward(_ dy: Tensor<Scalar>, residualOutputGradient dh: Tensor<Scalar>?) throws
        -> NormGradients<Scalar>
    {
        var g = try super.backward(dy)
        if let dh {
            guard dh.shape == g.input.shape else {
                throw NormError.gradientShapeMismatch(expected: g.input.shape, actual: dh.shape)
            }
            g.input = try g.input + dh
        }
        g.conditions["residual"] = g.input
        return g
    }
}
