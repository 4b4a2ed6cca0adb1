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

    /// Switchable, Sparse Switchable and Meta Normalization, through the `Normalizing` entry
    /// points: empty output, every parameter and buffer unchanged, empty dx, zero gradients.
    static func mixtureLayers<T: NormScalar>(_: T.Type) throws -> [(any Normalizing<T>, [Int])] {
        let sn = try SwitchableNorm<T>(channelCount: 3)
        sn.meanLogits = Tensor([0.3, -0.2, 0.5])
        sn.runningMean = Tensor([0.5, -1, 2])
        let ssn = try SwitchableNorm<T>(channelCount: 3, weighting: .sparsestMax)
        ssn.radius = 0.5
        let noBN = try SwitchableNorm<T>(
            channelCount: 2, usesBatchNorm: false, layout: .channelsLast)
        let average = try SwitchableNorm<T>(channelCount: 3, runningEstimate: .batchAverage)
        let meta = try MetaNorm<T>(channelCount: 4)
        meta.runningMean[1] = [1, 2, 3, 4]
        return [
            (sn, [0, 3, 4]), (ssn, [0, 3, 2, 2]), (noBN, [0, 5, 2]), (average, [0, 3]),
            (meta, [0, 4, 3]),
        ]
    }

    @Test func mixtureLayersTreatAnEmptyBatchAsPyTorch() throws {
        try Self.checkMixtures(Float.self)
        try Self.checkMixtures(Double.self)
    }

    static func checkMixtures<T: NormScalar>(_: T.Type) throws {
        for (layer, shape) in try Self.mixtureLayers(T.self) {
            for mode in Mode.allCases {
                let before = try layer.state()
                let y = try layer.normalize(try Tensor<T>(zeros: shape), mode: mode)
                #expect(y.shape == shape, "\(layer.displayName) \(mode)")
                #expect(
                    try layer.state() == before, "\(layer.displayName) \(mode): state untouched")
                let g = try layer.backward(try Tensor<T>(zeros: shape))
                #expect(g.input.shape == shape)
                #expect(Set(g.parameters.keys) == Set(layer.parameters.keys))
                for (key, value) in g.parameters {
                    #expect(value.shape == layer.parameters[key]?.shape, "\(key)")
                    #expect(value.scalars.allSatisfy { $0 == 0 }, "\(layer.displayName) d\(key)")
                }
                #expect(throws: NormError.self) {
                    try layer.backward(try Tensor<T>(zeros: [1, 3]))
                }
            }
        }
        // A zero-size axis other than the batch is still refused, and the channel count checked.
        let sn = try SwitchableNorm<Double>(channelCount: 3)
        #expect(throws: NormError.emptyTensor(layer: "SwitchableNorm", shape: [2, 3, 0])) {
            _ = try sn.forward(try Tensor(zeros: [2, 3, 0]), mode: .training)
        }
        let meta = try MetaNorm<Double>(channelCount: 4)
        #expect(
            throws: NormError.channelMismatch(
                layer: "MetaNorm", expected: 4, actual: 3, shape: [0, 3])
        ) { _ = try meta.forward(try Tensor(zeros: [0, 3]), mode: .training) }
    }

    @Test func anEmptyBatchDoesNotMoveTheMixtureRunningStatistics() throws {
        // SN keeps no batch counter; with exponential momentum the next real batch updates the
        // running statistics exactly as if the empty one had not happened.
        let a = try SwitchableNorm<Double>(channelCount: 2)
        let b = try SwitchableNorm<Double>(channelCount: 2)
        let x = try ErrorTests.x([4, 2, 3])
        _ = try a.forward(try Tensor(zeros: [0, 2, 3]), mode: .training)
        #expect(try a.forward(x, mode: .training).output == b.forward(x, mode: .training).output)
        #expect(a.runningMean == b.runningMean)
        #expect(a.runningVariance == b.runningVariance)
    }
}
