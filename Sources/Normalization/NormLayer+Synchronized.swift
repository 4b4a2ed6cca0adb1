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

    /// Training forward with statistics over the batches of every rank.
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
    /// waits for another that has given up.
    func synchronizedForward(
        _ x: Tensor<Scalar>, over communicator: any Communicator, into output: inout Tensor<Scalar>
    ) throws(NormError) -> Cache {
        let op = normalizer.kernelOperation
        // Local validation; an empty batch is allowed here (a rank may hold no samples).
        let local: Result<(ReductionPlan, Moments), NormError> = Result { () throws(NormError) in
            let plan = try synchronizedPlan(for: x)
            let setCount = plan.setCount
            guard x.count > 0 else { return (plan, Moments(setCount: setCount)) }
            // Always centred moments: μ and M2 merge exactly; RMS needs E[x²] = M2/n + μ².
            let centred = ReferenceNormKernel.Operation(
                centers: true, scales: true, epsilon: op.epsilon)
            let s = kernels.moments(
                x, plan: plan, operation: centred, indexing: parameterIndexing(for: x.shape))
            return (
                plan, Moments(mean: s.mean, biasedVariance: s.biasedVariance, count: plan.setSize)
            )
        }
        let global = try Moments.allGathered(local.map(\.1), over: communicator)
        let plan = try local.get().0
        guard global.setCount == plan.setCount else {
            throw .communication(
                .mismatchedLengths(
                    operation: "\(name) statistics", lengths: [plan.setCount, global.setCount]))
        }
        let count = global.count.first ?? 0
        guard count > 0 else { throw .emptyTensor(layer: name, shape: x.shape) }
        let runningPlan = plan.reducing([0])
        let updateRunning = runningStatistics != nil || lazyRunningMomentum != nil
        if count == 1, requiresMultipleValues || updateRunning || normalizer.variance == .unbiased {
            // The same decision on every rank: the global count is the same everywhere.
            throw .singleValuePerStatistic(layer: name, shape: x.shape)
        }
        guard global.mean.allSatisfy(\.isFinite), global.m2.allSatisfy(\.isFinite) else {
            throw .nonFiniteStatistics(layer: name)
        }
        let biased = global.biasedVariance
        let variance: [Double]
        let mean: [Double]
        switch (op.centers, op.scales) {
        case (true, _):
            mean = global.mean
            variance = op.unbiased ? global.unbiasedVariance : biased
        case (false, true):
            mean = [Double](repeating: 0, count: plan.setCount)
            variance = zip(biased, global.mean).map { $0 + $1 * $1 }
        case (false, false):
            mean = [Double](repeating: 0, count: plan.setCount)
            variance = [Double](repeating: 0, count: plan.setCount)
        }
        let rstd = ReferenceNormKernel.reciprocalStandardDeviation(
            variance: variance, operation: op)
        if output.shape != x.shape { output = try zeros(x.shape) }
        if x.count > 0 {
            let indexing = parameterIndexing(for: x.shape)
            output.withUnsafeMutableBufferPointer { yb in
                kernels.forward(
                    x, plan: plan, mean: mean, rstd: rstd, scale: scale, offset: offset,
                    indexing: indexing, into: yb)
            }
        }
        if updateRunning {
            let statistics = FastNormKernel.Statistics(
                mean: global.mean, variance: variance, biasedVariance: biased, rstd: rstd)
            try updateRunningStatistics(
                statistics, plan: plan, runningPlan: runningPlan, x: x, setSize: count)
        }
        return Cache(
            input: x, plan: plan, mean: mean, rstd: rstd, statisticsAreConstant: false,
            synchronizedCount: count)
    }

    /// Backward through synchronized statistics.
    ///
    /// Each rank computes its per-set Σg and Σg·(x − μ) (g = dy·γ); ONE all-reduce of the 2·sets buffer gives the global sums, and
    /// with n the global count, x̂ = (x − μ)·rstd:
    /// ```
    /// dx = rstd·(g − Σg/n − x̂·rstd·Σg(x − μ)/d),   d = n (biased) or n − 1 (unbiased)
    /// ```
    /// dγ and dβ stay local (PyTorch's convention): data-parallel training sums them with every
    /// other gradient in its one all-reduce.
    func synchronizedBackward(
        _ dy: Tensor<Scalar>, cache: Cache, globalCount: Int, over communicator: any Communicator,
        into gradients: inout Gradients
    ) throws(NormError) {
        let x = cache.input
        let plan = cache.plan
        let op = normalizer.kernelOperation
        let indexing = parameterIndexing(for: x.shape)
        let local: Result<FastNormKernel.GradientSums, NormError> = Result {
            () throws(NormError) in
            guard dy.shape == x.shape else {
                throw .gradientShapeMismatch(expected: x.shape, actual: dy.shape)
            }
            try validateParameters()
            return kernels.gradientSums(
                x, outputGradient: dy, plan: plan, mean: cache.mean, rstd: cache.rstd,
                scale: scale, indexing: indexing)
        }
        let k = plan.setCount
        let sums = try Collective.allReduceSum(
            local.map { $0.sumG + $0.sumGD }, length: 2 * k,
            operation: "\(name) backward", over: communicator)
        let localSums = try local.get()
        let n = Double(globalCount)
        let divisor = op.centers && op.unbiased ? n - 1 : n
        var a = [Double](repeating: 1, count: k)
        var b = [Double](repeating: 0, count: k)
        var c = [Double](repeating: 0, count: k)
        for s in 0..<k {
            let r = cache.rstd[s]
            if op.scales {
                a[s] = r
                b[s] = -r * r * r * sums[k + s] / divisor
            }
            if op.centers { c[s] = -a[s] * sums[s] / n }
        }
        if gradients.input.shape != x.shape { gradients.input = try zeros(x.shape) }
        if x.count > 0 {
            gradients.input.withUnsafeMutableBufferPointer { dxb in
                kernels.applyGradient(
                    x, outputGradient: dy, plan: plan, mean: cache.mean, a: a, b: b, c: c,
                    scale: scale, indexing: indexing, into: dxb)
            }
        }
        gradients.scale = nil
        gradients.offset = nil
        if let shape = normalizer.recovery.parameterShape {
            let count = shape.reduce(1, *)
            func padded(_ v: [Double]) -> [Double] {
                v.count == count ? v : [Double](repeating: 0, count: count)
            }
            gradients.scale = try rounded(shape, padded(localSums.scaleGradient))
            if normalizer.recovery.hasOffset {
                gradients.offset = try rounded(shape, padded(localSums.offsetGradient))
            }
        }
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
