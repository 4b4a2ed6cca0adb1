import TensorCore

/// How a normalizer is configured when it is built by name: the hyperparameters every layer
/// understands, plus layer-specific ones by their command-line names (`ratio`, `radius`, …).
///
/// A nil field means the layer's own default (PyTorch's where PyTorch has the layer).
public struct NormalizerOptions: Sendable, Equatable {
    /// ε.
    public var epsilon: Double?
    /// The running-statistic rule.
    public var momentum: Momentum?
    /// Group count (GroupNorm, MetaNorm's gnG).
    public var groups: Int?
    /// LayerNorm's and RMSNorm's number of trailing dimensions.
    public var normalizedDims: Int?
    /// Channel axis.
    public var layout: Layout = .channelsFirst
    /// Affine parameters on/off.
    public var affine: Bool?
    /// Running statistics on/off.
    public var trackRunningStatistics: Bool?
    /// Layer-specific options by name, as strings (parsed and range-checked by the layer's
    /// builder with ``double(_:)``, ``int(_:)``, ``bool(_:)``).
    public var values: [String: String] = [:]

    /// Defaults everywhere.
    public init() {}

    /// A layer-specific option as a number; nil when absent.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` when it is not a
    ///   finite number.
    public func double(_ key: String) throws(NormError) -> Double? {
        guard let raw = values[key] else { return nil }
        guard let value = Double(raw), value.isFinite else {
            throw .invalidHyperparameter(
                name: key, value: raw, requirement: "must be a finite number")
        }
        return value
    }

    /// A layer-specific option as an integer; nil when absent.
    public func int(_ key: String) throws(NormError) -> Int? {
        guard let raw = values[key] else { return nil }
        guard let value = Int(raw) else {
            throw .invalidHyperparameter(name: key, value: raw, requirement: "must be an integer")
        }
        return value
    }

    /// A layer-specific option as a Boolean (`true`/`false`); nil when absent.
    public func bool(_ key: String) throws(NormError) -> Bool? {
        guard let raw = values[key] else { return nil }
        switch raw.lowercased() {
        case "true", "1", "yes": return true
        case "false", "0", "no": return false
        default:
            throw .invalidHyperparameter(
                name: key, value: raw, requirement: "must be true or false")
        }
    }
}

/// Everything a builder knows when it makes a layer: the input's shape (channel counts and
/// normalized shapes come from it, as PyTorch's lazy modules infer them), the options, and the
/// shapes of the state that will be loaded (so that, say, InstanceNorm turns on its affine
/// parameters when the file has `weight`).
public struct NormalizerRequest: Sendable {
    /// The input's shape.
    public var inputShape: [Int]
    /// Hyperparameters.
    public var options: NormalizerOptions
    /// Keys and shapes of the state the caller will load (empty: defaults).
    public var parameterShapes: [String: [Int]]
    /// Shapes of the conditioning inputs by name (conditional normalizers).
    public var conditionShapes: [String: [Int]]

    /// A request.
    public init(
        inputShape: [Int], options: NormalizerOptions = NormalizerOptions(),
        parameterShapes: [String: [Int]] = [:], conditionShapes: [String: [Int]] = [:]
    ) {
        self.inputShape = inputShape
        self.options = options
        self.parameterShapes = parameterShapes
        self.conditionShapes = conditionShapes
    }

    /// The channel count (the layout's channel axis; the only axis of a rank-1 input).
    /// - Throws: ``NormError/invalidRank(layer:expected:shape:)`` below `minimumRank`.
    public func channelCount(layer: String, minimumRank: Int = 2) throws(NormError) -> Int {
        let rank = inputShape.count
        guard rank >= minimumRank else {
            throw .invalidRank(
                layer: layer, expected: "rank ≥ \(minimumRank) (N, C, …)", shape: inputShape)
        }
        return rank >= 2 ? inputShape[options.layout.channelAxis(rank: rank)] : inputShape[0]
    }
}

/// Makes one kind of layer from a request, in either precision.
public protocol NormalizerBuilder: Sendable {
    /// A new layer for `request`.
    func make<T: NormScalar>(_ request: NormalizerRequest, as: T.Type) throws -> any Normalizing<T>
}

/// One registry line: a name, its aliases, a one-line summary and the builder.
public struct NormalizerEntry: Sendable {
    /// The name `normkit apply`, `bench` and `train --normalizer` use.
    public let name: String
    /// Other accepted names (`bn` for `batchnorm`).
    public let aliases: [String]
    /// One line for listings.
    public let summary: String
    /// Conditioning inputs the layer reads besides `x` (empty for most layers).
    public let conditions: [String]
    /// Whether the layer can sit in a network slot of the training harness (a slot gives it an
    /// NCHW activation and nothing else).
    public let trainable: Bool
    /// Builds the layer.
    public let builder: any NormalizerBuilder

    /// An entry.
    public init(
        _ name: String, aliases: [String] = [], summary: String, conditions: [String] = [],
        trainable: Bool = true, builder: any NormalizerBuilder
    ) {
        self.name = name
        self.aliases = aliases
        self.summary = summary
        self.conditions = conditions
        self.trainable = trainable
        self.builder = builder
    }
}

/// Names → layers.
///
/// `NormalizerRegistry.all` (in the NormKit module) lists every activation
/// normalizer; the CLI, the training harness and the studies all build layers through it.
public struct NormalizerRegistry: Sendable {
    /// The entries, in listing order.
    public let entries: [NormalizerEntry]

    /// A registry of these entries.
    public init(_ entries: [NormalizerEntry]) {
        self.entries = entries
    }

    /// Every canonical name, in listing order.
    public var names: [String] { entries.map(\.name) }

    /// The entry for a name or alias (case-insensitive).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` naming the known
    ///   layers.
    public func entry(named name: String) throws(NormError) -> NormalizerEntry {
        let key = name.lowercased()
        if let e = entries.first(where: { $0.name == key || $0.aliases.contains(key) }) {
            return e
        }
        throw .invalidHyperparameter(
            name: "normalizer", value: name,
            requirement: "unknown; known: " + names.joined(separator: ", "))
    }

    /// Builds the named layer.
    public func make<T: NormScalar>(
        _ name: String, _ request: NormalizerRequest, as _: T.Type = T.self
    ) throws -> any Normalizing<T> {
        try entry(named: name).builder.make(request, as: T.self)
    }
}
