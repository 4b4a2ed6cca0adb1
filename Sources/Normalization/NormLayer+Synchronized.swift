import NormKernels
import TensorCore

// MARK: - Statistics synchronized over processes (SyncBatchNorm)

extension NormLayer {
    /// True when the partition reduces the batch axis.
    ///
    /// A statistic then spans every rank's samples (BatchNorm; a custom partition over axes
    /// that include 0). Partitions that keep
    /// the batch axis (LayerNorm, InstanceNorm, GroupNorm) have per-sample statistics, which
    /// need no synchronization.
    var synchronizesStatistics: Bool {
        switch normalizer.partition {
        case .batch: return true
        case .axes(let axes): return axes.contains(0)
        default: return false
        }
    }

    /// Training forward with statistics over the batches of every rank: the seam with
    /// ``StatisticsSource/batch(_:)`` over ``StatisticsReduction/allReduced(_:)``.
    ///
    /// 1. Each rank computes its per-set (count, μ, M2) with the moments kernel (two-pass
    ///    accuracy; a rank with an empty batch contributes count 0).
    /// 2. One all-gather of `[count…, μ…, M2…]`, merged in rank order with Chan's formula
    ///    (``Moments``): every rank gets the statistics of the concatenated batch, identical to
    ///    the last bit on every rank.
    /// 3. Each rank normalizes its own slice with the global μ, rstd, and updates the running
    ///    statistics from the global count (unbiased variance M2/(n − 1)).
    ///
    /// An input error on one rank is reported on every rank in the same collective, so no rank
    /// waits for another that has given up. Backward (``backward(_:cache:into:)``) all-reduces
    /// one buffer of per-set Σg, Σg·(x − μ) and divides by the global count; dγ and dβ stay
    /// local.
    func synchronizedForward(
        _ x: Tensor<Scalar>, over communicator: any Communicator, into output: inout Tensor<Scalar>
    ) throws(NormError) -> Cache {
        let op = normalizer.kernelOperation
        let reduction = StatisticsReduction.allReduced(communicator)
        // Local validation; an empty batch is allowed here (a rank may hold no samples).
        let local = Result { () throws(NormError) in
            let plan = try synchronizedPlan(for: x)
            return (
                plan,
                reduction.partialMoments(
                    x, plan: plan, operation: op, kernels: kernels,
                    indexing: parameterIndexing(for: x.shape))
            )
        }
        let batch = try reduction.reduce(local.map(\.1), operation: op, layer: name)
        let plan = try local.get().0
        let updateRunning = runningStatistics != nil || lazyRunningMomentum != nil
        // The same decision on every rank: the global count is the same everywhere.
        let needsTwo = requiresMultipleValues || updateRunning || normalizer.variance == .unbiased
        try batch.validate(minimumCount: needsTwo ? 2 : 1, layer: name, shape: x.shape)
        let statistics = try StatisticsSource.batch(reduction).resolve(
            batch, operation: op, layer: name)
        try statistics.apply(
            x, plan: plan, kernels: kernels, scale: scale, offset: offset,
            indexing: parameterIndexing(for: x.shape), into: &output)
        if updateRunning {
            try updateRunningStatistics(
                batch.statistics, plan: plan, runningPlan: plan.reducing([0]), x: x,
                setSize: batch.count)
        }
        return Cache(input: x, plan: plan, statistics: statistics)
    }

    /// The reduction plan of a training input that may have an empty batch.
    func synchronizedPlan(for x: Tensor<Scalar>) throws(NormError) -> ReductionPlan {
        guard x.rank >= 2 else {
            throw .invalidRank(layer: name, expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
        }
        guard x.count > 0 || x.shape[0] == 0, x.shape.dropFirst().allSatisfy({ $0 > 0 }) else {
            throw .emptyTensor(layer: name, shape: x.shape)
        }
        if let channelCount {
            let actual = x.shape[layout.channelAxis(rank: x.rank)]
            guard actual == channelCount else {
                throw .channelMismatch(
                    layer: name, expected: channelCount, actual: actual, shape: x.shape)
            }
        }
        let plan = try normalizer.partition.plan(for: x.shape, layout: layout)
        try validateParameters(inputShape: x.shape)
        try validateRunningShape(plan.reducing([0]))
        return plan
    }
}
