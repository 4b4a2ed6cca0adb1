import TensorCore

/// The unit-norm projection of nGPT: every vector along the last axis divided by its Euclidean
/// norm, with no ε and no parameters (a Φ without Ψ).
///
/// ```
/// y = x / ‖x‖₂,    dx = (dy − y·⟨y, dy⟩) / ‖x‖₂
/// ```
/// Computed as RMS scaling (``Normalizer/Operation/scale`` with ε = 0, the same kernels as
/// ``RMSNorm``) times 1/√D, since ‖x‖ = √D · rms(x). A vector of zeros has no direction: the call
/// throws ``NormError/nonFiniteStatistics(layer:)`` instead of returning NaN.
///
/// ## Shape
/// Input `[*, D]`; output the same.
///
/// ## References
/// 1. Loshchilov et al. 2024, "nGPT: Normalized Transformer with Representation Learning on the
///    Hypersphere", arXiv:2410.01131.
public final class UnitNorm<Scalar: NormScalar>: Normalizing, CustomStringConvertible {
    /// Φ: RMS scaling over the last axis with ε = 0.
    let inner: NormLayer<Scalar>
    private var cache: (norm: NormLayer<Scalar>.Cache, factor: Double)?

    /// Creates the projection.
    public init() throws(NormError) {
        inner = try NormLayer(
            normalizer: Normalizer(
                partition: .layer(trailing: 1), operation: .scale, recovery: .none, epsilon: 0),
            name: "UnitNorm")
    }

    /// The layer's name in messages.
    public var displayName: String { "UnitNorm" }

    /// y = x/‖x‖ over the last axis.
    /// - Throws: ``NormError`` for an empty input or a vector of zeros.
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank >= 1, let d = x.shape.last, d >= 1 else {
            throw NormError.emptyTensor(layer: displayName, shape: x.shape)
        }
        let (scaled, c) = try inner.forward(x, mode: mode)
        guard c.rstd.allSatisfy(\.isFinite) else {
            throw NormError.nonFiniteStatistics(layer: displayName)
        }
        let factor = 1 / Double(d).squareRoot()
        cache = (c, factor)
        return scaled.map { $0 * Scalar(factor) }
    }

    /// dx = (dy − y·⟨y, dy⟩)/‖x‖, through RMS scaling's backward of dy/√D.
    /// - Throws: ``NormError/noForwardCall(layer:)``, ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let g = try inner.backward(dy.map { $0 * Scalar(cache.factor) }, cache: cache.norm)
        return NormGradients(input: g.input)
    }

    /// No parameters.
    public var parameters: [String: Tensor<Scalar>] { [:] }

    /// Refuses every key.
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: [:], layer: displayName)
    }

    /// An empty state.
    public func state() throws -> NormState<Scalar> { NormState() }

    /// Accepts only an empty state.
    public func load(_ state: NormState<Scalar>) throws {
        try refuseUnknownKeys(state.keys, known: [], layer: displayName)
    }

    /// One line.
    public var description: String { "UnitNorm(last axis, no eps)" }
}
