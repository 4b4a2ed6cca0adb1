import TensorCore

/// Layer Normalization: standardizes each sample over its trailing dimensions.
///
/// ```
/// y = γ ⊙ (x − μ) / √(σ² + ε) + β,   μ, σ² over the last K axes of every leading index
/// ```
/// With ``init(normalizedShape:epsilon:elementwiseAffine:bias:)`` this is PyTorch's
/// `nn.LayerNorm(normalized_shape)`: biased variance, γ and β of the normalized shape
/// (elementwise). With ``init(channelCount:epsilon:affine:layout:)`` it is the "LayerNorm2d"
/// of ConvNeXt: statistics over the channel axis alone at every (sample, position), with
/// per-channel γ and β. LayerNorm keeps no running statistics; every mode computes the same.
///
/// CNN papers (GN, SN, SW) use "LN" for statistics over (C, H, W) with per-channel affine, which
/// is ``GroupNorm`` with one group.
///
/// ## Shape
/// Input `[*, normalizedShape…]` (or `[N, C, spatial…]` for the channel form); output the same.
/// Statistics `[*]` (or `[N, spatial…]`).
///
/// ## References
/// 1. Ba, Kiros & Hinton 2016, "Layer Normalization", arXiv:1607.06450.
/// 2. Liu et al. 2022, "A ConvNet for the 2020s", arXiv:2201.03545 (channel-axis LayerNorm).
public final class LayerNorm<Scalar: NormScalar>: NormLayer<Scalar> {
    /// The trailing dimensions the layer normalizes over (PyTorch `normalized_shape`).
    public let normalizedShape: [Int]

    /// PyTorch's `nn.LayerNorm(normalizedShape, eps, elementwise_affine, bias)`.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` for an empty
    ///   normalized shape or a dimension below 1.
    public init(
        normalizedShape: [Int], epsilon: Double = 1e-5, elementwiseAffine: Bool = true,
        bias: Bool = true
    ) throws(NormError) {
        self.normalizedShape = normalizedShape
        try super.init(
            normalizer: .overTrailing(
                normalizedShape, operation: .standardize, elementwiseAffine: elementwiseAffine,
                offset: bias, epsilon: epsilon),
            trailingShape: normalizedShape, name: "LayerNorm")
    }

    /// LayerNorm over the channel axis of an image tensor ("LayerNorm2d"), per-channel affine.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, epsilon: Double = 1e-6, affine: Bool = true,
        layout: Layout = .channelsFirst
    ) throws(NormError) {
        self.normalizedShape = [channelCount]
        try super.init(
            normalizer: .standardizing(
                .channels, channels: channelCount, affine: affine, epsilon: epsilon),
            layout: layout, channelCount: channelCount, name: "LayerNorm2d")
    }
}
