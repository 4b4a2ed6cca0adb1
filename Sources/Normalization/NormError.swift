import TensorCore

/// Everything that can go wrong when a normalization layer is built or called.
///
/// Every case names the problem in words a user understands; a call that throws leaves the
/// layer's parameters and running statistics exactly as they were.
public enum NormError: Error, Equatable, CustomStringConvertible {
    /// The input has a rank the layer does not accept.
    case invalidRank(layer: String, expected: String, shape: [Int])
    /// The channel axis does not have the size the layer was built for.
    case channelMismatch(layer: String, expected: Int, actual: Int, shape: [Int])
    /// The trailing dimensions do not equal the layer's normalized shape.
    case normalizedShapeMismatch(layer: String, expected: [Int], shape: [Int])
    /// GroupNorm's group count does not divide the channel count.
    case groupsDoNotDivideChannels(groups: Int, channels: Int)
    /// A training-mode statistic would be computed over a single value.
    case singleValuePerStatistic(layer: String, shape: [Int])
    /// The input has no elements: a zero-size dimension that would be reduced over with no
    /// elements, or an empty batch given to a layer that does not accept one.
    case emptyTensor(layer: String, shape: [Int])
    /// A parameter or buffer has the wrong shape.
    case parameterShapeMismatch(name: String, expected: [Int], actual: [Int])
    /// A hyperparameter is out of its valid range.
    case invalidHyperparameter(name: String, value: String, requirement: String)
    /// Axes given to a custom partition are out of range or repeated.
    case invalidAxes(axes: [Int], rank: Int)
    /// A second input (a residual) does not have the first input's shape.
    case shapeMismatch(name: String, expected: [Int], actual: [Int])
    /// The output gradient does not have the forward output's shape.
    case gradientShapeMismatch(expected: [Int], actual: [Int])
    /// Batch statistics are NaN or infinite; running statistics were left unchanged.
    case nonFiniteStatistics(layer: String)
    /// The input is finite, but its batch statistics (or the running estimates they would
    /// update) do not fit the scalar type; running statistics were left unchanged.
    case statisticsOutOfRange(layer: String)
    /// Running statistics were requested from a layer that does not track them.
    case runningStatisticsUnavailable(layer: String)
    /// A parameter, buffer or state key the layer does not have.
    case unknownParameter(layer: String, key: String, known: [String])
    /// A conditioning input (AdaIN's style, SPADE's segmentation map…) is missing or unusable.
    case invalidCondition(name: String, problem: String)
    /// backward was called before any forward call.
    case noForwardCall(layer: String)
    /// A tensor could not be built.
    case tensor(TensorError)
    /// Synchronized statistics could not be exchanged between processes (see ``Communicator``).
    case communication(CommunicatorError)

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .invalidRank(let layer, let expected, let shape):
            return "\(layer) expects \(expected) input, got shape \(shape) (rank \(shape.count))"
        case .channelMismatch(let layer, let expected, let actual, let shape):
            return
                "\(layer) was built for \(expected) channels, but the input of shape \(shape) has "
                + "\(actual) on its channel axis"
        case .normalizedShapeMismatch(let layer, let expected, let shape):
            return
                "\(layer) normalizes over trailing dimensions \(expected), but the input has shape "
                + "\(shape)"
        case .groupsDoNotDivideChannels(let groups, let channels):
            return "GroupNorm needs the group count to divide the channel count: \(groups) groups "
                + "do not divide \(channels) channels"
        case .singleValuePerStatistic(let layer, let shape):
            return "\(layer) in training mode would compute a statistic over a single value "
                + "(input shape \(shape)); use a larger batch, inference mode, or another "
                + "single-value policy"
        case .emptyTensor(let layer, let shape):
            if shape.first == 0 {
                return
                    "\(layer) got an empty batch (N = 0, shape \(shape)), which it does not accept"
            }
            return "\(layer) got an input of shape \(shape): a dimension it would reduce over has "
                + "size 0 (only an empty batch, N = 0, gives an empty output)"
        case .parameterShapeMismatch(let name, let expected, let actual):
            return "parameter '\(name)' must have shape \(expected), got \(actual)"
        case .invalidHyperparameter(let name, let value, let requirement):
            return "\(name) = \(value) is invalid: \(requirement)"
        case .invalidAxes(let axes, let rank):
            return "axes \(axes) are not distinct axes of a rank-\(rank) tensor"
        case .shapeMismatch(let name, let expected, let actual):
            return "the \(name) must have the input's shape \(expected), got \(actual)"
        case .gradientShapeMismatch(let expected, let actual):
            return "the output gradient must have the output's shape \(expected), got \(actual)"
        case .nonFiniteStatistics(let layer):
            return "\(layer) computed NaN or infinite batch statistics (is there a NaN or inf in "
                + "the input?); running statistics were left unchanged"
        case .statisticsOutOfRange(let layer):
            return "\(layer): the input is finite, but its batch variance does not fit the "
                + "running statistics' type (values near the largest finite number); running "
                + "statistics were left unchanged"
        case .runningStatisticsUnavailable(let layer):
            return "\(layer) does not track running statistics, so they cannot be used here"
        case .unknownParameter(let layer, let key, let known):
            return "\(layer) has no parameter or buffer named '\(key)' (it has: "
                + known.joined(separator: ", ") + ")"
        case .invalidCondition(let name, let problem):
            return "conditioning input '\(name)': \(problem)"
        case .noForwardCall(let layer):
            return "\(layer): backward needs a forward call first"
        case .tensor(let error):
            return error.description
        case .communication(let error):
            return error.description
        }
    }
}
