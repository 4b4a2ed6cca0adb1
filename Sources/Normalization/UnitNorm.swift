import TensorCore

/// The unit-norm projection of nGPT: every vector along the last axis divided by its Euclidean
/// norm, with no ε and no parameters (a Φ without Ψ).
///
/// ```
/// y = x / ‖x‖₂,    dx = (dy − y·⟨y, dy⟩) / ‖x‖₂
/// ```
/// Computed as RMS scaling (``Normalizer/Operation/scale`` with ε = 0, the same kernels as
/// ``RMSNorm``) with a fixed elementwise γ = 1/√D, since ‖x‖ = √D · rms(x). A vector of zeros
/// has no direction: the call throws ``NormError/nonFiniteStatistics(layer:)`` instead of
/// returning NaN.
///
/// ## Shape
/// Input `[*, D]`; output the same.
///
/// ## References
/// 1. Loshchilov et al. 2024, "nGPT: Normalized Transformer with Representation Learning on the
///    Hypersphere", arXiv:2410.01131.
public final class UnitNorm<Scalar: NormScalar>: ParameterlessNormalizing,
    CustomStringConvertible
{
    /// Φ: RMS scaling over the last axis with ε = 0 and the constant γ = 1/√D (rebuilt when D
    /// changes).
    private var inner: NormLayer<Scalar>?
    private var cache: NormLayer<Scalar>.Cache?

    /// Creates the projection.
    public init() throws(NormError) {}

    private func layer(for d: Int) throws(NormError) -> NormLayer<Scalar> {
        if let inner, inner.trailingShape == [d] { return inner }
        let layer = try NormLayer<Scalar>(
            normalizer: Normalizer(
                partition: .layer(trailing: 1), operation: .scale,
                recovery: .elementwiseAffine(shape: [d], offset: false), epsilon: 0),
            trailingShape: [d], name: "UnitNorm")
        do {
            layer.scale = try Tensor(repeating: Scalar(1 / Double(d).squareRoot()), shape: [d])
        } catch { throw .tensor(error) }
        return layer
    }

    /// The layer's name in messages.
    public var displayName: String { "UnitNorm" }

    /// y = x/‖x‖ over the last axis.
    /// - Throws: ``NormError`` for an empty input or a vector of zeros.
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank >= 1, let d = x.shape.last, d >= 1 else {
            throw NormError.emptyTensor(layer: displayName, shape: x.shape)
        }
        let norm = try layer(for: d)
        let (y, c) = try norm.forward(x, mode: mode)
        // A zero vector has no direction (no ε, as nGPT): with ε = 0 the RMS kernel reports it
        // as rstd 0 (x̂ = 0), which would be a silent zero here.
        guard c.rstd.allSatisfy({ $0.isFinite && $0 > 0 }) else {
            throw NormError.invalidHyperparameter(
                name: "input", value: "a vector with ‖x‖ = 0 or a non-finite norm",
                requirement: "x/‖x‖ needs a finite, non-zero norm in every vector")
        }
        inner = norm
        cache = c
        return y
    }

    /// dx = (dy − y·⟨y, dy⟩)/‖x‖, through RMS scaling's backward with γ = 1/√D.
    /// - Throws: ``NormError/noForwardCall(layer:)``, ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let cache, let inner else { throw NormError.noForwardCall(layer: displayName) }
        return NormGradients(input: try inner.backward(dy, cache: cache).input)
    }

    /// One line.
    public var description: String { "UnitNorm(last axis, no eps)" }
}
