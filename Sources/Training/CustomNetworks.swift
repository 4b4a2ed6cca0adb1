import NormKit

extension Models {
    /// The harness ConvNet (the layout of `Models.make(.convnet, …)`, convolutions without bias)
    /// with the caller's normalization module in each of its three slots: `norm(channels, name)`.
    ///
    /// Built here, in Float, so that the layers' forward and backward passes are the ones
    /// compiled for Float in this module: a network assembled from another module wraps the
    /// generic versions, which pay a witness-table call per element (the regularization study
    /// ran several times slower that way).
    public static func convnet(
        inputShape: [Int], classes: Int, width: Int, seed: UInt64,
        norm: (Int, String) throws -> AnyModule<Float>
    ) throws -> Sequential<Float> {
        guard inputShape.count == 3, inputShape[1] >= 4, inputShape[2] >= 4 else {
            throw TrainingError.shape(
                layer: "convnet", expected: "[C, H ≥ 4, W ≥ 4] images", actual: inputShape)
        }
        var g = SeededGenerator(seed: seed)
        let c = inputShape[0]
        return Sequential(
            try Conv2d<Float>(
                c, width, kernel: 3, padding: 1, bias: false, name: "conv1", generator: &g
            )
            .erased,
            try norm(width, "norm1"), ReLU<Float>().erased,
            try Conv2d<Float>(
                width, 2 * width, kernel: 3, padding: 1, bias: false, name: "conv2", generator: &g
            ).erased,
            try norm(2 * width, "norm2"), ReLU<Float>().erased,
            Pool2d<Float>(.max, size: 2).erased,
            try Conv2d<Float>(
                2 * width, 2 * width, kernel: 3, padding: 1, bias: false, name: "conv3",
                generator: &g
            ).erased,
            try norm(2 * width, "norm3"), ReLU<Float>().erased,
            GlobalAveragePool<Float>().erased,
            try Linear<Float>(2 * width, classes, name: "fc", generator: &g).erased)
    }
}
