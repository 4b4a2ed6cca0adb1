import NormKit
import Testing

/// An empty batch behaves as in PyTorch 2.15 (checked with torch.nn modules): an empty output
/// of the input's shape, running statistics untouched, `num_batches_tracked` incremented by
/// BatchNorm in training, an empty dx and zero parameter gradients.
@Suite("Empty batches")
struct EmptyBatchTests {
    static func layers<T: NormScalar>(_: T.Type) throws -> [(String, NormLayer<T>, [Int])] {
        [
            ("BatchNorm", try BatchNorm<T>(featureCount: 3), [0, 3, 4]),
            ("BatchNorm rank 2", try BatchNorm<T>(featureCount: 3, momentum: .cumulative), [0, 3]),
            (
                "BatchNorm NHWC", try BatchNorm<T>(featureCount: 3, layout: .channelsLast),
                [0, 2, 3]
            ),
            ("LayerNorm", try LayerNorm<T>(normalizedShape: [4]), [0, 4]),
            ("LayerNorm, empty middle axis", try LayerNorm<T>(normalizedShape: [4]), [2, 0, 4]),
            ("GroupNorm", try GroupNorm<T>(groupCount: 1, channelCount: 3), [0, 3, 4]),
            (
                "InstanceNorm tracking",
                try InstanceNorm<T>(featureCount: 3, affine: true, trackRunningStatistics: true),
                [0, 3, 4]
            ),
            ("RMSNorm", try RMSNorm<T>(normalizedShape: [4]), [0, 4]),
            ("LayerNorm2d", try LayerNorm<T>(channelCount: 3), [0, 3, 2, 2]),
        ]
    }

    @Test func emptyBatchesGiveEmptyOutputsAndZeroGradients() throws {
        try Self.check(Float.self)
        try Self.check(Double.self)
    }

    static func check<T: NormScalar>(_: T.Type) throws {
        for (name, layer, shape) in try Self.layers(T.self) {
            for mode in Mode.allCases {
                let before = layer.runningStatistics
                let x = try Tensor<T>(zeros: shape)
                let (y, cache) = try layer.forward(x, mode: mode)
                #expect(y.shape == shape, "\(name) \(mode)")
                #expect(y.count == 0)
                let after = layer.runningStatistics
                #expect(after?.mean == before?.mean, "\(name) \(mode): running mean untouched")
                #expect(after?.variance == before?.variance)
                let counts = mode == .training && (name.hasPrefix("BatchNorm"))
                #expect(
                    after?.batchesTracked == before.map { $0.batchesTracked + (counts ? 1 : 0) },
                    "\(name) \(mode): num_batches_tracked")
                let grads = try layer.backward(try Tensor(zeros: shape), cache: cache)
                #expect(grads.input.shape == shape)
                if let scale = layer.scale {
                    #expect(grads.scale?.shape == scale.shape)
                    #expect(grads.scale?.scalars.allSatisfy { $0 == 0 } == true)
                }
                if let offset = layer.offset {
                    #expect(grads.offset?.shape == offset.shape)
                    #expect(grads.offset?.scalars.allSatisfy { $0 == 0 } == true)
                }
            }
        }
    }

    @Test func anEmptyBatchStillChecksTheChannelCount() throws {
        let bn = try BatchNorm<Double>(featureCount: 3)
        ErrorTests.expectError(
            .channelMismatch(layer: "BatchNorm", expected: 3, actual: 4, shape: [0, 4]), layer: bn
        ) {
            _ = try bn.forward(try Tensor(zeros: [0, 4]), mode: .training)
        }
    }

    @Test func anEmptyBatchThenARealOneMatchesARealOneAlone() throws {
        // Exponential momentum ignores the count, so the empty batch changes nothing after it.
        let a = try BatchNorm<Double>(featureCount: 2)
        let b = try BatchNorm<Double>(featureCount: 2)
        let x = try ErrorTests.x([4, 2])
        _ = try a.forward(try Tensor(zeros: [0, 2]), mode: .training)
        let ya = try a.forward(x, mode: .training).output
        let yb = try b.forward(x, mode: .training).output
        #expect(ya == yb)
        #expect(a.runningStatistics?.mean == b.runningStatistics?.mean)
        #expect(a.runningStatistics?.batchesTracked == 2)
    }
}
