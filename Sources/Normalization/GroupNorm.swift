import TensorCore

/// Group Normalization: standardizes every sample over groups of consecutive channels.
///
/// ```
/// y = γ_c · (x − μ_ng) / √(σ²_ng + ε) + β_c,   μ_ng, σ²_ng over channels of group g and all positions
/// ```
/// Biased variance, per-channel γ and β (init 1 and 0), no running statistics, so every mode
/// computes the same. One group is the CNN papers' LayerNorm over (C, H, W); C groups is
/// InstanceNorm with affine parameters.
///
/// ## Shape
/// Input `[N, C, …]` (or channels-last) with C divisible by G; output the same.
/// Statistics `[N, G]`; parameters `[C]`.
///
/// ## References
/// 1. Wu & He 2018, "Group Normalization", arXiv:1803.08494.
public final class GroupNorm<Scalar: NormScalar>: NormLayer<Scalar> {
    /// G.
    public let groupCount: Int

    /// PyTorch's `nn.GroupNorm(groupCount, channelCount, eps, affine)`.
    /// - Throws: ``NormError/groupsDoNotDivideChannels(groups:channels:)`` when G does not
    ///   divide C.
    public init(
        groupCount: Int, channelCount: Int, epsilon: Double = 1e-5, affine: Bool = true,
        layout: Layout = .channelsFirst
    ) throws(NormError) {
        guard groupCount >= 1, channelCount >= 1, channelCount % groupCount == 0 else {
            throw .groupsDoNotDivideChannels(groups: groupCount, channels: channelCount)
        }
        self.groupCount = groupCount
        try super.init(
            normalizer: .standardizing(
                .group(groupCount), channels: channelCount, affine: affine, epsilon: epsilon),
            layout: layout, channelCount: channelCount, name: "GroupNorm")
    }
}
