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
