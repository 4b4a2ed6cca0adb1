import TensorCore

/// Synchronized Batch Normalization: BatchNorm whose training statistics span the batches of
/// every process of a ``Communicator``.
///
/// ```
/// μ_c, σ²_c over (N, spatial…) of the batch formed by every rank's batch, one after another
/// y = γ_c · (x − μ_c) / √(σ²_c + ε) + β_c          (each rank on its own slice)
/// ```
/// Forward all-gathers every rank's per-channel (count, μ, M2) and merges them with Chan's
/// formula (``Moments``), so ranks with different batch sizes, including a rank with no
/// samples, get the statistics of the concatenated batch. Backward all-reduces one buffer of
/// 2·C sums (Σg, Σg·(x − μ), g = dy·γ) and divides by the global count; dγ and dβ stay local, as
/// PyTorch's `SyncBatchNorm` leaves them for the data-parallel gradient all-reduce. The running
/// statistics (PyTorch's rule, unbiased variance from the global count) are identical on every
/// rank. Inference and frozen modes use the running statistics and exchange nothing.
///
/// It is a ``BatchNorm`` whose statistics source in training is ``StatisticsSource/batch(_:)``
/// over ``StatisticsReduction/allReduced(_:)`` (so it is `Normalizing` wherever BatchNorm is,
/// with BatchNorm's `state_dict` keys). With a ``LocalCommunicator`` it is ``BatchNorm`` (equal
/// to the last bits, through the synchronized code path). Every rank must call forward and
/// backward together; a rank whose input is wrong reports it to the others in the same
/// exchange, so every rank throws.
///
/// ## Shape
/// Input `[N, C, …]` (or channels-last), N ≥ 0 on each rank; output the same. Parameters and
/// running statistics `[C]`.
///
/// ## References
/// 1. Ioffe & Szegedy 2015, "Batch Normalization", arXiv:1502.03167.
/// 2. Zhang et al. 2018, "Context Encoding for Semantic Segmentation" (cross-GPU BN),
///    arXiv:1803.08904; PyTorch `torch.nn.SyncBatchNorm`.
public final class SyncBatchNorm<Scalar: NormScalar>: BatchNorm<Scalar> {
    /// Creates a synchronized BatchNorm layer with PyTorch's defaults.
    ///
    /// - Parameters:
    ///   - featureCount: C.
    ///   - communicator: the processes whose batches form one batch.
    ///   - epsilon, momentum, affine, trackRunningStatistics, layout: as ``BatchNorm``.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        featureCount: Int, communicator: any Communicator, epsilon: Double = 1e-5,
        momentum: Momentum = .pytorchDefault, affine: Bool = true,
        trackRunningStatistics: Bool = true, layout: Layout = .channelsFirst
    ) throws(NormError) {
        try super.init(
            featureCount: featureCount, epsilon: epsilon, momentum: momentum, affine: affine,
            trackRunningStatistics: trackRunningStatistics, layout: layout,
            singleValuePolicy: .throwError, name: "SyncBatchNorm")
        self.communicator = communicator
    }
}
