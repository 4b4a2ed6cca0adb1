import NormKit

/// The networks the harness builds.
public enum ModelKind: String, CaseIterable, Sendable {
    /// conv–norm–ReLU ×2, max-pool, conv–norm–ReLU, global average pool, linear.
    case convnet
    /// A stem convolution and two residual blocks (the second halves the resolution), global
    /// average pool, linear.
    case resnet
}

/// Builds networks with any normalizer in every normalization slot.
public enum Models {
    /// A network for `[C, H, W]` inputs and `classes` outputs; weights from `seed`.
    public static func make<Scalar: NormScalar>(
        _ kind: ModelKind, normalizer: NormalizerChoice, inputShape: [Int], classes: Int,
        width: Int = 16,
        groups: Int = 8, seed: UInt64, radiusSteps: Int = 1,
        weightNorm: WeightNormMethod = .none, whitening: WhiteningSettings? = nil,
        as _: Scalar.Type = Scalar.self
    ) throws -> Sequential<Scalar> {
        guard inputShape.count == 3, inputShape[1] >= 4, inputShape[2] >= 4 else {
            throw TrainingError.shape(
                layer: kind.rawValue, expected: "[C, H ≥ 4, W ≥ 4] images", actual: inputShape)
        }
        var g = SeededGenerator(seed: seed)
        let c = inputShape[0]
        let bias = normalizer == .none
        // Every convolution takes the weight method; the classifier only Weight Norm and
        // Spectral Norm (the WS and CWN papers standardize the hidden layers).
        let wn = weightNorm
        let head: WeightNormMethod = [.wn, .sn].contains(weightNorm) ? weightNorm : .none
        if normalizer == .kn && kind != .convnet {
            throw TrainingError.invalidSetting(
                name: "normalizer", value: "kn with \(kind.rawValue)",
                requirement:
                    "Kalman Normalization chains through a sequential network: use the convnet model"
            )
        }
        let chain: KalmanChain<Scalar>? = normalizer == .kn ? KalmanChain<Scalar>() : nil
        func norm(_ channels: Int, _ name: String) throws -> AnyModule<Scalar> {
            try NormSlot<Scalar>(
                normalizer, channels: channels, groups: groups, name: name,
                radiusSteps: radiusSteps, chain: chain
            ).erased
        }
        if let whitening {
            return try whitenedConvnet(
                whitening, channels: c, width: width, classes: classes, kind: kind,
                weightNorm: weightNorm, norm: norm, generator: &g)
        }
        switch kind {
        case .convnet:
            return Sequential(
                try Conv2d<Scalar>(
                    c, width, kernel: 3, padding: 1, bias: bias, name: "conv1", weightNorm: wn,
                    generator: &g
                ).erased,
                try norm(width, "norm1"), ReLU<Scalar>().erased,
                try Conv2d<Scalar>(
                    width, 2 * width, kernel: 3, padding: 1, bias: bias, name: "conv2",
                    weightNorm: wn,
                    generator: &g
                ).erased,
                try norm(2 * width, "norm2"), ReLU<Scalar>().erased,
                Pool2d<Scalar>(.max, size: 2).erased,
                try Conv2d<Scalar>(
                    2 * width, 2 * width, kernel: 3, padding: 1, bias: bias, name: "conv3",
                    weightNorm: wn,
                    generator: &g
                )
                .erased,
                try norm(2 * width, "norm3"), ReLU<Scalar>().erased,
                GlobalAveragePool<Scalar>().erased,
                try Linear<Scalar>(2 * width, classes, name: "fc", weightNorm: head, generator: &g)
                    .erased)
        case .resnet:
            return Sequential(
                try Conv2d<Scalar>(
                    c, width, kernel: 3, padding: 1, bias: bias, name: "stem", weightNorm: wn,
                    generator: &g
                ).erased,
                try norm(width, "stem_norm"), ReLU<Scalar>().erased,
                try ResidualBlock<Scalar>(
                    width, width, normalizer: normalizer, groups: groups, name: "block1",
                    generator: &g,
                    radiusSteps: radiusSteps, weightNorm: wn
                ).erased,
                try ResidualBlock<Scalar>(
                    width, 2 * width, stride: 2, normalizer: normalizer, groups: groups,
                    name: "block2", generator: &g,
                    radiusSteps: radiusSteps, weightNorm: wn
                ).erased,
                GlobalAveragePool<Scalar>().erased,
                try Linear<Scalar>(2 * width, classes, name: "fc", weightNorm: head, generator: &g)
                    .erased)
        }
    }

    /// Every normalizer slot of a network, in order.
    public static func normSlots<Scalar: NormScalar>(_ module: any Module) -> [NormSlot<Scalar>] {
        switch module {
        case let slot as NormSlot<Scalar>: return [slot]
        case let s as Sequential<Scalar>:
            return s.layers.flatMap { normSlots($0) as [NormSlot<Scalar>] }
        case let a as AnyModule<Scalar>: return normSlots(a.base)
        case let r as ResidualBlock<Scalar>:
            return normSlots(r.body)
                + (r.shortcut.map { normSlots($0) as [NormSlot<Scalar>] } ?? [])
        default: return []
        }
    }
}
