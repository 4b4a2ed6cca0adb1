import NormKit

extension Models {
    /// The convnet with every convolution and the classifier whitened.
    ///
    /// The layers are ``WhitenedConv2d`` and ``WhitenedLinear``; the normalizer slots are as in
    /// the plain network. The rank is capped
    /// at each layer's whitened dimension (the first convolution of a one-channel image has
    /// only 9 patch values).
    static func whitenedConvnet<Scalar: NormScalar>(
        _ settings: WhiteningSettings, channels c: Int, width: Int, classes: Int,
        kind: ModelKind, weightNorm: WeightNormMethod,
        norm: (Int, String) throws -> AnyModule<Scalar>, generator g: inout SeededGenerator
    ) throws -> Sequential<Scalar> {
        guard kind == .convnet else {
            throw TrainingError.invalidSetting(
                name: "whitened layers", value: "\(settings.kind.rawValue) with \(kind.rawValue)",
                requirement: "whitened layers are built for the convnet model only")
        }
        guard weightNorm == .none else {
            throw TrainingError.invalidSetting(
                name: "whitened layers", value: "\(settings.kind.rawValue) with \(weightNorm)",
                requirement: "a whitened layer reparametrizes its weight itself: use no weight norm"
            )
        }
        func capped(inputs: Int, outputs: Int) -> WhiteningSettings {
            var s = settings
            let whitened = settings.kind == .gwnn ? outputs : inputs
            s.rank = settings.rank.map { min($0, whitened) }
            s.gradientRank = settings.gradientRank.map { min($0, outputs) }
            return s
        }
        func conv(_ cin: Int, _ cout: Int, _ name: String, _ g: inout SeededGenerator) throws
            -> AnyModule<Scalar>
        {
            try WhitenedConv2d<Scalar>(
                cin, cout, kernel: 3, padding: 1,
                settings: capped(inputs: cin * 9, outputs: cout), name: name, generator: &g
            ).erased
        }
        return Sequential(
            try conv(c, width, "conv1", &g), try norm(width, "norm1"), ReLU<Scalar>().erased,
            try conv(width, 2 * width, "conv2", &g), try norm(2 * width, "norm2"),
            ReLU<Scalar>().erased, Pool2d<Scalar>(.max, size: 2).erased,
            try conv(2 * width, 2 * width, "conv3", &g), try norm(2 * width, "norm3"),
            ReLU<Scalar>().erased, GlobalAveragePool<Scalar>().erased,
            try WhitenedLinear<Scalar>(
                2 * width, classes, settings: capped(inputs: 2 * width, outputs: classes),
                name: "fc", generator: &g
            ).erased)
    }
}
