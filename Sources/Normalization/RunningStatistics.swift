import TensorCore

/// Running estimates of a layer's statistics, used in inference.
///
/// The variance estimate is the *unbiased* batch variance Σ(x − μ)²/(m − 1), as PyTorch keeps
/// it, although training normalizes with the biased one (PyTorch's convention; mlx-swift keeps
/// the biased one). Both update by ``Momentum``:
/// ```
/// batchesTracked ← batchesTracked + 1
/// f = momentum.weightOfNew(batchesTracked)
/// mean     ← (1 − f)·mean     + f·μ_batch
/// variance ← (1 − f)·variance + f·σ²_batch·m/(m − 1)
/// ```
/// Where the partition keeps the batch axis (InstanceNorm), the per-sample statistics are
/// averaged over the batch before the update, as PyTorch does.
public struct RunningStatistics<Scalar: NormScalar>: Sendable, Equatable {
    /// Running mean, initially 0.
    ///
    /// `running_mean` in PyTorch checkpoints.
    public var mean: Tensor<Scalar>
    /// Running unbiased variance, initially 1.
    ///
    /// `running_var` in PyTorch checkpoints.
    public var variance: Tensor<Scalar>
    /// Number of training batches seen; `num_batches_tracked` in PyTorch checkpoints.
    public var batchesTracked: Int
    /// The update rule.
    public var momentum: Momentum

    /// PyTorch's initial state: mean 0, variance 1, no batches.
    public init(shape: [Int], momentum: Momentum) throws(NormError) {
        do {
            self.mean = try Tensor(zeros: shape)
            self.variance = try Tensor(repeating: 1, shape: shape)
        } catch { throw .tensor(error) }
        self.batchesTracked = 0
        self.momentum = momentum
    }

    /// Creates running statistics from given values.
    public init(
        mean: Tensor<Scalar>, variance: Tensor<Scalar>, batchesTracked: Int, momentum: Momentum
    ) {
        self.mean = mean
        self.variance = variance
        self.batchesTracked = batchesTracked
        self.momentum = momentum
    }
}

extension RunningStatistics {
    /// The rule and counter of these statistics.
    public var average: RunningAverage {
        get { RunningAverage(momentum: momentum, batchesTracked: batchesTracked) }
        set {
            momentum = newValue.momentum
            batchesTracked = newValue.batchesTracked
        }
    }

    /// The statistics after one training batch whose per-slot mean and variance (the variance
    /// as stored: unbiased where the layer keeps the unbiased one) are given; nil when a new
    /// value is not finite in `Scalar` (then nothing may change).
    /// - Parameter countingEveryBatch: see ``RunningAverage/advance(countingEveryBatch:)``.
    public func updated(
        batchMean: [Double], batchVariance: [Double], countingEveryBatch: Bool = true
    ) -> RunningStatistics? {
        var result = self
        let f = result.average.advance(countingEveryBatch: countingEveryBatch)
        let newMean = RunningAverage.blend(
            mean.scalars.map(Double.init), toward: batchMean, weightOfNew: f
        ).map { Scalar($0) }
        let newVariance = RunningAverage.blend(
            variance.scalars.map(Double.init), toward: batchVariance, weightOfNew: f
        ).map { Scalar($0) }
        guard newMean.allSatisfy(\.isFinite), newVariance.allSatisfy(\.isFinite),
            let m = try? Tensor(shape: mean.shape, scalars: newMean),
            let v = try? Tensor(shape: variance.shape, scalars: newVariance)
        else { return nil }
        result.mean = m
        result.variance = v
        return result
    }
}

/// The update rule and batch counter of a running estimate, for any buffer of statistics
/// (means, variances, whitening's covariance matrices): the one place where
/// `r ← (1 − f)·r + f·s` is written.
///
/// ```
/// advance:  batchesTracked ← batchesTracked + 1   (saturating at Int.max)
///           f = 1/batchesTracked (cumulative)  or  m (exponential)
/// blend:    r ← (1 − f)·r + f·s
/// ```
/// PyTorch's BatchNorm counts every training batch (its int64 `num_batches_tracked` would wrap
/// to Int64.min; NormKit saturates). Layers whose PyTorch counterpart keeps no counter
/// (Switchable Normalization, MetaNorm, the whitening layers) advance with
/// `countingEveryBatch: false`, which counts only for the cumulative rule, where the count is
/// the rule.
public struct RunningAverage: Sendable, Hashable {
    /// The update rule.
    public var momentum: Momentum
    /// Training batches counted so far; `num_batches_tracked` where a layer saves it.
    public var batchesTracked: Int

    /// A rule with a counter (0: no batch yet).
    public init(momentum: Momentum, batchesTracked: Int = 0) {
        self.momentum = momentum
        self.batchesTracked = batchesTracked
    }

    /// Counts one more batch (always when `countingEveryBatch`, otherwise only for the
    /// cumulative rule) and returns f, the weight of that batch.
    public mutating func advance(countingEveryBatch: Bool = true) -> Double {
        if countingEveryBatch || momentum == .cumulative {
            batchesTracked = batchesTracked.addingSaturated(1)
        }
        return momentum.weightOfNew(batchesTracked: batchesTracked)
    }

    /// Counts a batch that updates no statistic (an empty batch in training, which PyTorch's
    /// BatchNorm counts too).
    public mutating func countEmptyBatch(countingEveryBatch: Bool = true) {
        if countingEveryBatch || momentum == .cumulative {
            batchesTracked = batchesTracked.addingSaturated(1)
        }
    }

    /// `(1 − f)·old + f·new`, entry by entry.
    public static func blend(_ old: [Double], toward new: [Double], weightOfNew f: Double)
        -> [Double]
    {
        precondition(old.count == new.count, "A running estimate and its update need one length.")
        return zip(old, new).map { (1 - f) * $0 + f * $1 }
    }
}

/// The parameters and buffers of a layer under PyTorch's `state_dict` key names: the one table
/// that maps NormKit's names to PyTorch's.
public enum ParameterKey: String, Sendable, CaseIterable {
    /// γ, ``NormLayer/scale``.
    case scale = "weight"
    /// β, ``NormLayer/offset``.
    case offset = "bias"
    /// ``RunningStatistics/mean``.
    case runningMean = "running_mean"
    /// ``RunningStatistics/variance``.
    case runningVariance = "running_var"
    /// ``RunningStatistics/batchesTracked`` (an integer).
    case batchesTracked = "num_batches_tracked"
}
