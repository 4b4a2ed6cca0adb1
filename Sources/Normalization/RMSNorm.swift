import TensorCore

/// Root-mean-square normalization: scales each sample by the RMS of its trailing dimensions,
/// without centering.
///
/// ```
/// y = γ ⊙ x / √(mean(x²) + ε),   mean over the last K axes
/// ```
/// PyTorch's `nn.RMSNorm` conventions: ε inside the root; `eps=None` means the machine epsilon
/// of the element type (1.19e-7 for Float, 2.22e-16 for Double); γ elementwise, init 1; no
/// bias; no running statistics.
///
/// ## Shape
/// Input `[*, normalizedShape…]`; output the same. Statistics `[*]`; γ `normalizedShape`.
///
/// ## References
/// 1. Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467.
public final class RMSNorm<Scalar: NormScalar>: NormLayer<Scalar> {
    /// The trailing dimensions the layer normalizes over.
    public let normalizedShape: [Int]

    /// PyTorch's `nn.RMSNorm(normalizedShape, eps, elementwise_affine)`.
    /// - Parameter epsilon: ε inside the root; nil uses `Scalar.ulpOfOne` (PyTorch's default).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        normalizedShape: [Int], epsilon: Double? = nil, elementwiseAffine: Bool = true
    ) throws(NormError) {
        self.normalizedShape = normalizedShape
        try super.init(
            normalizer: .overTrailing(
                normalizedShape, operation: .scale, elementwiseAffine: elementwiseAffine,
                offset: false, epsilon: epsilon ?? Double(Scalar.ulpOfOne)),
            trailingShape: normalizedShape, name: "RMSNorm")
    }
}
