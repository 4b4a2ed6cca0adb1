/// How a layer is being used on one call; always passed explicitly, never global state.
public enum Mode: String, Sendable, Hashable, CaseIterable {
    /// Batch statistics normalize the input and, where tracked, update running statistics.
    case training
    /// Running statistics normalize the input (layers that do not track them use the input's
    /// own statistics, as PyTorch does); nothing is updated.
    case inference
    /// Fine-tuning with frozen statistics ("frozen BN"): the same arithmetic as ``inference``,
    /// named separately because the affine parameters are still being trained. Backward returns
    /// their gradients in every mode.
    case frozenStatistics

    /// True for the two modes that read running statistics instead of batch statistics.
    public var usesRunningStatistics: Bool { self != .training }
}

/// How running statistics move towards each batch's statistics.
///
/// "Momentum" means different things in different libraries, so NormKit names the rule:
/// ```
/// exponential(weightOfNew: m):  r ← (1 − m)·r + m·s      (PyTorch; m = 0.1 by default)
/// cumulative:                   r ← r + (s − r)/k         (PyTorch momentum=None; k = batches seen)
/// keep(k) = exponential(1 − k): r ← k·r + (1 − k)·s       (Keras/TensorFlow, SN: k = 0.9…0.997)
/// ```
public enum Momentum: Sendable, Hashable, CustomStringConvertible {
    /// `r ← (1 − m)·r + m·s`, m the weight of the new batch.
    case exponential(weightOfNew: Double)
    /// The simple average of every batch seen so far.
    case cumulative

    /// PyTorch's default, `exponential(weightOfNew: 0.1)`.
    public static let pytorchDefault = Momentum.exponential(weightOfNew: 0.1)

    /// The "keep" convention of Keras, TensorFlow and Switchable Normalization:
    /// `r ← keep·r + (1 − keep)·s`.
    public static func keep(_ keep: Double) -> Momentum {
        .exponential(weightOfNew: 1 - keep)
    }

    /// The weight of the new batch after `batchesTracked` batches (counting this one).
    public func weightOfNew(batchesTracked: Int) -> Double {
        switch self {
        case .exponential(let m): return m
        case .cumulative: return 1 / Double(max(batchesTracked, 1))
        }
    }

    /// Throws when an exponential weight lies outside [0, 1].
    public func validate() throws(NormError) {
        if case .exponential(let m) = self, !(m >= 0 && m <= 1) {
            throw .invalidHyperparameter(
                name: "momentum", value: "\(m)",
                requirement: "the weight of the new batch must lie in [0, 1]")
        }
    }

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .exponential(let m): return "momentum=\(m)"
        case .cumulative: return "momentum=cumulative"
        }
    }
}

/// What a training-mode call does when a statistic would be computed over a single value
/// (BatchNorm with one sample and no spatial extent; InstanceNorm with one spatial position).
public enum SingleValuePolicy: Sendable, Hashable {
    /// Throw ``NormError/singleValuePerStatistic(layer:shape:)``, as PyTorch does.
    case throwError
    /// Normalize with the running statistics and leave them unchanged.
    case useRunningStatistics
    /// Normalize each (sample, channel) with its own statistics over the spatial positions and
    /// leave running statistics unchanged (over a single value this gives x̂ = 0, so y = β).
    case useInstanceStatistics
}
