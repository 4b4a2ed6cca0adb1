import TensorCore

/// Batch Normalization: standardizes every channel over the batch and all spatial positions.
///
/// ```
/// y = γ_c · (x − μ_c) / √(σ²_c + ε) + β_c,   μ_c, σ²_c over (N, spatial…)
/// ```
/// Training normalizes with the biased batch variance and updates the running mean and the
/// running *unbiased* variance by ``Momentum`` (`r ← (1 − m)·r + m·s`, m = 0.1 by default).
/// Inference and frozen modes normalize with the running statistics, and then the layer is an
/// affine map. Without running statistics (`trackRunningStatistics: false`) every mode uses the
/// batch statistics, as PyTorch does. A statistic over one value in training (N·spatial = 1)
/// throws unless ``SingleValuePolicy`` says otherwise.
///
/// ## Shape
/// Input `[N, C]`, `[N, C, L]`, `[N, C, H, W]`, `[N, C, D, H, W]` (or channels-last); output the
/// same. Statistics and parameters `[C]`.
///
/// ## References
/// 1. Ioffe & Szegedy 2015, "Batch Normalization", arXiv:1502.03167.
public class BatchNorm<Scalar: NormScalar>: NormLayer<Scalar> {
    /// Creates a BatchNorm layer with PyTorch's defaults.
    ///
    /// - Parameters:
    ///   - featureCount: C, the number of channels.
    ///   - epsilon: ε inside the square root (PyTorch `eps`, 1e-5).
    ///   - momentum: the running-statistic rule (PyTorch `momentum=0.1`; `.cumulative` is
    ///     PyTorch's `momentum=None`).
    ///   - affine: learn γ (`weight`, init 1) and β (`bias`, init 0).
    ///   - trackRunningStatistics: keep running mean (init 0) and variance (init 1).
    ///   - layout: channels-first (NCHW) or channels-last (NHWC).
    ///   - singleValuePolicy: what training does with a single value per channel.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public convenience init(
        featureCount: Int, epsilon: Double = 1e-5, momentum: Momentum = .pytorchDefault,
        affine: Bool = true, trackRunningStatistics: Bool = true, layout: Layout = .channelsFirst,
        singleValuePolicy: SingleValuePolicy = .throwError
    ) throws(NormError) {
        try self.init(
            featureCount: featureCount, epsilon: epsilon, momentum: momentum, affine: affine,
            trackRunningStatistics: trackRunningStatistics, layout: layout,
            singleValuePolicy: singleValuePolicy, name: "BatchNorm")
    }

    /// BatchNorm under another name in messages (``SyncBatchNorm``).
    init(
        featureCount: Int, epsilon: Double, momentum: Momentum, affine: Bool,
        trackRunningStatistics: Bool, layout: Layout, singleValuePolicy: SingleValuePolicy,
        name: String
    ) throws(NormError) {
        try super.init(
            normalizer: .standardizing(
                .batch, channels: featureCount, affine: affine, epsilon: epsilon),
            layout: layout, runningMomentum: trackRunningStatistics ? momentum : nil,
            runningShape: [featureCount], channelCount: featureCount, requiresMultipleValues: true,
            singleValuePolicy: singleValuePolicy, name: name)
    }
}
