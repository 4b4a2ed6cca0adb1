import TensorCore

/// The one place where NormKit's layers check their numeric hyperparameters and loaded
/// buffers, so that the library (not only the command-line tool) refuses a bad value with a
/// ``NormError/invalidHyperparameter(name:value:requirement:)`` that names it.
///
/// Rules, the same for every layer:
/// - ε must be finite and ≥ 0. ε = 0 is allowed; a reduction set whose σ² + ε is then exactly
///   0 (a constant set) normalizes to x̂ = 0 (output β) with no gradient to its inputs, where
///   PyTorch returns NaN.
/// - a momentum (weight of the new batch) must lie in [0, 1]; NaN is refused.
/// - a fraction (IBN's instance share, a test split) must be finite and strictly inside its
///   range.
/// - a loaded running variance (or standard deviation) must be finite and ≥ 0 everywhere.
/// - iteration and group counts must be ≥ 1 and at most a documented limit.
public enum HyperparameterCheck {
    /// Refuses a negative, NaN or infinite ε.
    public static func epsilon(_ value: Double, name: String = "epsilon") throws(NormError) {
        guard value >= 0, value.isFinite else {
            throw .invalidHyperparameter(
                name: name, value: "\(value)", requirement: "must be finite and ≥ 0")
        }
    }

    /// Refuses a value outside `range` (NaN included).
    public static func finite(
        _ value: Double, in range: ClosedRange<Double>, name: String
    ) throws(NormError) {
        guard value.isFinite, range.contains(value) else {
            throw .invalidHyperparameter(
                name: name, value: "\(value)",
                requirement: "must be a finite number in [\(range.lowerBound), \(range.upperBound)]"
            )
        }
    }

    /// Refuses a value that is not strictly between `lower` and `upper` (NaN included).
    public static func fraction(
        _ value: Double, above lower: Double = 0, below upper: Double = 1, name: String
    ) throws(NormError) {
        guard value.isFinite, value > lower, value < upper else {
            throw .invalidHyperparameter(
                name: name, value: "\(value)",
                requirement: "must be a finite number strictly between \(lower) and \(upper)")
        }
    }

    /// Refuses a count below 1 or above `limit`.
    public static func count(_ value: Int, limit: Int, name: String) throws(NormError) {
        guard value >= 1, value <= limit else {
            throw .invalidHyperparameter(
                name: name, value: "\(value)", requirement: "must lie in 1…\(limit)")
        }
    }

    /// Refuses a parameter shape with more than ``SizeLimits/maximumElements`` elements
    /// (overflow-checked), before anything of that size is allocated.
    public static func parameterSize(_ shape: [Int], name: String) throws(NormError) {
        do {
            try SizeLimits.checkElements(shape, name: name)
        } catch {
            throw .invalidHyperparameter(
                name: name, value: "\(shape)", requirement: error.requirement)
        }
    }

    /// Refuses a running variance or standard deviation with a negative, NaN or infinite entry.
    public static func runningVariance<Scalar: NormScalar>(
        _ values: Tensor<Scalar>, name: String = "running_var"
    ) throws(NormError) {
        if let bad = values.scalars.first(where: { !($0 >= 0 && $0.isFinite) }) {
            throw .invalidHyperparameter(
                name: name, value: "\(bad)",
                requirement: "every entry must be finite and ≥ 0")
        }
    }
}

extension Int {
    /// `self + other`, or the nearest representable value on overflow.
    func addingSaturated(_ other: Int) -> Int {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? (other > 0 ? .max : .min) : sum
    }
}
