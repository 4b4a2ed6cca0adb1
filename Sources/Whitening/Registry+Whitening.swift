import Normalization
import TensorCore

extension NormalizerRegistry {
    /// Decorrelated BN, IterNorm and Switchable Whitening.
    public static let whitening: [NormalizerEntry] = [
        NormalizerEntry(
            "dbn",
            summary: "Decorrelated BatchNorm (ZCA whitening by eigendecomposition, per group)",
            builder: WhiteningBuilder(kind: .dbn)),
        NormalizerEntry(
            "iternorm", summary: "IterNorm (ZCA whitening by Newton iterations, per group)",
            builder: WhiteningBuilder(kind: .iterNorm)),
        NormalizerEntry(
            "switchwhiten", aliases: ["sw"],
            summary: "Switchable Whitening (learned mixture of whitening and standardization)",
            builder: WhiteningBuilder(kind: .switchable)),
    ]
}

/// The largest Newton iteration count the whitening layers accept (each iteration is a few
/// d×d products per group; far beyond this nothing changes but the time).
public let maximumNewtonIterations = 1000

struct WhiteningBuilder: NormalizerBuilder {
    enum Kind { case dbn, iterNorm, switchable }
    let kind: Kind

    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        guard o.layout == .channelsFirst else {
            throw NormError.invalidHyperparameter(
                name: "layout", value: "nhwc",
                requirement: "the whitening layers are channels-first")
        }
        let channels = try request.channelCount(layer: "whitening")
        let eps = o.epsilon ?? 1e-5
        let groupSize = try o.int("group-size")
        if let groupSize, groupSize < 1 {
            throw NormError.invalidHyperparameter(
                name: "group-size", value: "\(groupSize)", requirement: "must be ≥ 1")
        }
        let iterations = try o.int("iterations") ?? 5
        guard iterations >= 1, iterations <= maximumNewtonIterations else {
            throw NormError.invalidHyperparameter(
                name: "iterations", value: "\(iterations)",
                requirement: "must lie in 1…\(maximumNewtonIterations)")
        }
        switch kind {
        case .dbn:
            return try DecorrelatedBatchNorm<T>(
                channelCount: channels, groupSize: groupSize, epsilon: eps)
        case .iterNorm:
            return try IterNorm<T>(
                channelCount: channels, groupSize: groupSize, iterations: iterations, epsilon: eps)
        case .switchable:
            return try SwitchableWhitening<T>(
                channelCount: channels, groupSize: groupSize ?? 16, type: try o.int("sw-type") ?? 5,
                iterations: iterations, epsilon: eps)
        }
    }
}
