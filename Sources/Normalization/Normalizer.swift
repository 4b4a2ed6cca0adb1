import NormKernels
import TensorCore

/// A normalizer as the literature defines it: Π (which elements share statistics) → Φ (what
/// is done with them) → Ψ (how the representation is recovered), with the variance estimator
/// and ε.
///
/// ```
/// BatchNorm    = Normalizer(partition: .batch,            operation: .standardize, recovery: .channelAffine(C))
/// LayerNorm    = Normalizer(partition: .layer(trailing: K), operation: .standardize, recovery: .elementwiseAffine(shape))
/// GroupNorm    = Normalizer(partition: .group(G),         operation: .standardize, recovery: .channelAffine(C))
/// RMSNorm      = Normalizer(partition: .layer(trailing: K), operation: .scale,       recovery: .elementwiseAffine(shape, offset: false))
/// ```
/// Any combination is valid: `Normalizer(partition: .axes([0, 2]), operation: .standardize,
/// recovery: .none)` standardizes over (N, H) separately for every (C, W).
///
/// ## References
/// 1. Huang et al. 2023, "Normalization Techniques in Training DNNs: Methodology, Analysis and
///    Application", arXiv:2009.12836 (the Π → Φ → Ψ decomposition).
public struct Normalizer: Sendable, Hashable, CustomStringConvertible {
    /// Π: which elements share one statistic.
    public enum Partition: Sendable, Hashable, CustomStringConvertible {
        /// Per channel over every other axis (BatchNorm). Statistics `[C]`.
        case batch
        /// Per leading index over the last `trailing` axes (PyTorch LayerNorm, RMSNorm).
        case layer(trailing: Int)
        /// Per sample and position over the channel axis alone (the "LayerNorm2d" of ConvNeXt;
        /// positional normalization). Statistics `[N, spatial…]`.
        case channels
        /// Per (sample, channel) over the spatial axes (InstanceNorm). Statistics `[N, C]`.
        case instance
        /// Per (sample, group of C/G consecutive channels) over the group and the spatial axes
        /// (GroupNorm). Statistics `[N, G]`.
        case group(Int)
        /// Over exactly these axes of the input, separately for every index of the others.
        case axes([Int])

        /// The view and reduced axes for an input of this shape.
        /// - Throws: ``NormError`` for a rank the partition cannot use, a group count that does
        ///   not divide the channels, or bad axes.
        public func plan(for shape: [Int], layout: Layout) throws(NormError) -> ReductionPlan {
            let rank = shape.count
            func flags(_ axes: [Int]) -> [Bool] {
                (0..<rank).map { axes.contains($0) }
            }
            switch self {
            case .batch:
                guard rank >= 2 else {
                    throw .invalidRank(
                        layer: "BatchNorm", expected: "rank ≥ 2 (N, C, …)", shape: shape)
                }
                let channel = layout.channelAxis(rank: rank)
                return ReductionPlan(viewShape: shape, reduced: (0..<rank).map { $0 != channel })
            case .layer(let trailing):
                guard trailing >= 1, rank >= trailing else {
                    throw .invalidRank(
                        layer: "LayerNorm", expected: "rank ≥ \(max(trailing, 1))", shape: shape)
                }
                return ReductionPlan(
                    viewShape: shape, reduced: flags(Array((rank - trailing)..<rank)))
            case .channels:
                guard rank >= 2 else {
                    throw .invalidRank(
                        layer: "channel LayerNorm", expected: "rank ≥ 2", shape: shape)
                }
                return ReductionPlan(
                    viewShape: shape, reduced: flags([layout.channelAxis(rank: rank)]))
            case .instance:
                guard rank >= 3 else {
                    throw .invalidRank(
                        layer: "InstanceNorm", expected: "rank ≥ 3 (N, C, spatial…)", shape: shape)
                }
                return ReductionPlan(
                    viewShape: shape, reduced: flags(layout.spatialAxes(rank: rank)))
            case .group(let groups):
                guard rank >= 2 else {
                    throw .invalidRank(
                        layer: "GroupNorm", expected: "rank ≥ 2 (N, C, …)", shape: shape)
                }
                let channel = layout.channelAxis(rank: rank)
                let channels = shape[channel]
                guard groups >= 1, channels % groups == 0 else {
                    throw .groupsDoNotDivideChannels(groups: groups, channels: channels)
                }
                // View the channel axis as (G, C/G); keep the batch axis and the group axis.
                var view = shape
                view.replaceSubrange(channel...channel, with: [groups, channels / groups])
                let reduced = (0..<view.count).map { $0 != 0 && $0 != channel }
                return ReductionPlan(viewShape: view, reduced: reduced)
            case .axes(let axes):
                let normalized = axes.map { $0 < 0 ? $0 + rank : $0 }
                guard !axes.isEmpty, Set(normalized).count == axes.count,
                    normalized.allSatisfy({ $0 >= 0 && $0 < rank })
                else { throw .invalidAxes(axes: axes, rank: rank) }
                return ReductionPlan(viewShape: shape, reduced: flags(normalized))
            }
        }

        /// A readable one-line description.
        public var description: String {
            switch self {
            case .batch: return "batch"
            case .layer(let k): return "layer(last \(k))"
            case .channels: return "channels"
            case .instance: return "instance"
            case .group(let g): return "group(\(g))"
            case .axes(let axes): return "axes\(axes)"
            }
        }
    }

    /// Φ: what is done within each reduction set.
    public enum Operation: String, Sendable, Hashable, CaseIterable {
        /// `x − μ`.
        case center
        /// `x / √(E[x²] + ε)` (RMS scaling, no centering).
        case scale
        /// `(x − μ) / √(σ² + ε)`.
        case standardize

        var centers: Bool { self != .scale }
        var scales: Bool { self != .center }
    }

    /// Ψ: how the representation is recovered after Φ.
    public enum Recovery: Sendable, Hashable, CustomStringConvertible {
        /// No parameters: y = x̂.
        case none
        /// γ (and β when `offset` is true) of shape `[channels]`, along the channel axis.
        case channelAffine(channels: Int, offset: Bool = true)
        /// γ (and β) of the given shape, applied elementwise over the trailing axes.
        case elementwiseAffine(shape: [Int], offset: Bool = true)

        /// The shape of γ and β, or nil without affine parameters.
        public var parameterShape: [Int]? {
            switch self {
            case .none: return nil
            case .channelAffine(let channels, _): return [channels]
            case .elementwiseAffine(let shape, _): return shape
            }
        }

        /// True when the recovery has an offset β.
        public var hasOffset: Bool {
            switch self {
            case .none: return false
            case .channelAffine(_, let offset), .elementwiseAffine(_, let offset): return offset
            }
        }

        /// A readable one-line description.
        public var description: String {
            switch self {
            case .none: return "none"
            case .channelAffine(let c, let offset):
                return "channel affine(\(c)\(offset ? "" : ", no offset"))"
            case .elementwiseAffine(let shape, let offset):
                return "elementwise affine(\(shape)\(offset ? "" : ", no offset"))"
            }
        }
    }

    /// The variance used inside the square root.
    public enum Variance: String, Sendable, Hashable {
        /// Σ(x − μ)²/m (BatchNorm, LayerNorm, GroupNorm, InstanceNorm).
        case biased
        /// Σ(x − μ)²/(m − 1) (Switchable Norm's instance variance, PONO, AdaIN's PyTorch port).
        case unbiased
    }

    /// Π.
    public var partition: Partition
    /// Φ.
    public var operation: Operation
    /// Ψ.
    public var recovery: Recovery
    /// The variance estimator inside the square root.
    public var variance: Variance
    /// ε, added inside the square root.
    public var epsilon: Double

    /// Creates a normalizer from its parts.
    public init(
        partition: Partition, operation: Operation = .standardize, recovery: Recovery = .none,
        variance: Variance = .biased, epsilon: Double = 1e-5
    ) {
        self.partition = partition
        self.operation = operation
        self.recovery = recovery
        self.variance = variance
        self.epsilon = epsilon
    }

    /// Standardization over `partition` with an optional per-channel γ, β: BatchNorm,
    /// SyncBatchNorm, InstanceNorm, GroupNorm and LayerNorm2d differ only in Π.
    public static func standardizing(
        _ partition: Partition, channels: Int, affine: Bool, epsilon: Double
    ) -> Normalizer {
        Normalizer(
            partition: partition, operation: .standardize,
            recovery: affine ? .channelAffine(channels: channels) : .none, epsilon: epsilon)
    }

    /// Π over the trailing `shape` (LayerNorm's and RMSNorm's `normalized_shape`), with an
    /// optional elementwise γ (and β) of that shape.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` for an empty shape
    ///   or a dimension below 1.
    public static func overTrailing(
        _ shape: [Int], operation: Operation, elementwiseAffine: Bool, offset: Bool,
        epsilon: Double
    ) throws(NormError) -> Normalizer {
        guard !shape.isEmpty, shape.allSatisfy({ $0 >= 1 }) else {
            throw .invalidHyperparameter(
                name: "normalized shape", value: "\(shape)",
                requirement: "must be non-empty with every dimension ≥ 1")
        }
        return Normalizer(
            partition: .layer(trailing: shape.count), operation: operation,
            recovery: elementwiseAffine ? .elementwiseAffine(shape: shape, offset: offset) : .none,
            epsilon: epsilon)
    }

    var kernelOperation: ReferenceNormKernel.Operation {
        ReferenceNormKernel.Operation(
            centers: operation.centers, scales: operation.scales,
            unbiased: variance == .unbiased, epsilon: epsilon)
    }

    /// A readable one-line description.
    public var description: String {
        "Π=\(partition) Φ=\(operation.rawValue) Ψ=\(recovery) var=\(variance.rawValue) eps=\(epsilon)"
    }
}
