import TensorCore

/// Instance Normalization: standardizes every (sample, channel) over its spatial positions.
///
/// ```
/// y = γ_c · (x − μ_nc) / √(σ²_nc + ε) + β_c,   μ_nc, σ²_nc over the spatial axes
/// ```
/// PyTorch's defaults: no affine parameters and no running statistics, so inference computes
/// exactly what training does. With running statistics, training averages the per-sample mean
/// and unbiased variance over the batch before the ``Momentum`` update, and inference uses
/// them. As in PyTorch, the batch counter (`num_batches_tracked`) does not move, except under
/// `.cumulative`, which needs it: there NormKit keeps a true running average, whereas PyTorch's
/// InstanceNorm treats `momentum=None` as 0 and never updates. This is ``GroupNorm`` with one channel per group (plus optional running statistics);
/// the tests prove the equivalence.
///
/// ## Shape
/// Input `[N, C, spatial…]` with at least one spatial axis (or channels-last); output the same.
/// Statistics `[N, C]`; parameters and running statistics `[C]`.
///
/// ## References
/// 1. Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization", arXiv:1607.08022.
public final class InstanceNorm<Scalar: NormScalar>: NormLayer<Scalar> {
    /// PyTorch's `nn.InstanceNorm{1,2,3}d(featureCount, eps, momentum, affine,
    /// track_running_stats)`.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        featureCount: Int, epsilon: Double = 1e-5, momentum: Momentum = .pytorchDefault,
        affine: Bool = false, trackRunningStatistics: Bool = false, layout: Layout = .channelsFirst,
        singleValuePolicy: SingleValuePolicy = .throwError
    ) throws(NormError) {
        try super.init(
            normalizer: .standardizing(
                .instance, channels: featureCount, affine: affine, epsilon: epsilon),
            layout: layout, runningMomentum: trackRunningStatistics ? momentum : nil,
            runningShape: [featureCount], channelCount: featureCount, requiresMultipleValues: true,
            singleValuePolicy: singleValuePolicy, countsEveryBatch: false, name: "InstanceNorm")
    }
}
