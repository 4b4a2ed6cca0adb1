import NormKit
import NormTestSupport
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

/// Every `NormalizerRegistry.all` entry, through the `Normalizing` protocol, on an empty batch.
@Suite("Empty batches: every registry normalizer")
struct RegistryEmptyBatchTests {
    static let names = NormalizerRegistry.all.names

    /// `[N, 4, 2, 3]`, or the conditioning input called `name` for a batch of N.
    static func tensor<T: NormScalar>(
        _ name: String, batch: Int, constant: Bool = false, as _: T.Type
    ) throws -> Tensor<T> {
        let shapes = [
            "x": [batch, 4, 2, 3], "residual": [batch, 4, 2, 3], "style": [batch, 4, 3, 3],
            "segmap": [batch, 3, 2, 3], "condition": [batch, 5], "labels": [batch],
        ]
        let shape = try #require(shapes[name], "no test shape for the condition '\(name)'")
        // Class labels must be valid indices; everything else is ordinary data.
        if name == "labels" { return try Tensor(zeros: shape) }
        if constant { return try Tensor(repeating: 2, shape: shape) }
        var g = SeededGenerator(seed: 11)
        return try Tensor<T>.randomNormal(shape: shape, mean: 0.5, standardDeviation: 2, using: &g)
    }

    /// Builds the layer for an empty input, as `normkit apply` does from the input's shape.
    static func layer<T: NormScalar>(_ name: String, epsilon: Double? = nil, as _: T.Type) throws
        -> any Normalizing<T>
    {
        let entry = try NormalizerRegistry.all.entry(named: name)
        var options = NormalizerOptions()
        options.epsilon = epsilon
        options.values["classes"] = "3"
        var conditionShapes: [String: [Int]] = [:]
        if let first = entry.conditions.first {
            conditionShapes[first] = try tensor(first, batch: 0, as: T.self).shape
        }
        return try NormalizerRegistry.all.make(
            name,
            NormalizerRequest(
                inputShape: [0, 4, 2, 3], options: options, conditionShapes: conditionShapes),
            as: T.self)
    }

    /// Normalizes a batch of `batch` samples, with conditioning inputs of the same batch
    /// (`constant`: x and the residual are all 2).
    static func normalize<T: NormScalar>(
        _ layer: any Normalizing<T>, batch: Int, mode: Mode, constant: Bool = false
    ) throws -> Tensor<T> {
        if let conditional = layer as? any ConditionalNormalizing<T> {
            var conditions: [String: Tensor<T>] = [:]
            for name in conditional.conditionNames {
                conditions[name] = try tensor(
                    name, batch: batch, constant: constant && name == "residual", as: T.self)
            }
            try conditional.setConditions(conditions)
        }
        return try layer.normalize(
            try tensor("x", batch: batch, constant: constant, as: T.self), mode: mode)
    }

    @Test(arguments: names)
    func everyRegistryNormalizerTakesAnEmptyBatchAsPyTorch(_ name: String) throws {
        try Self.check(name, as: Double.self)
        try Self.check(name, as: Float.self)
    }

    /// After a real training batch (so the running statistics are not their initial values):
    /// for every mode, an empty batch gives an empty output of its shape, leaves every tensor
    /// of the state unchanged, counts `num_batches_tracked` in training only (PyTorch's
    /// BatchNorm module increments it before it looks at the batch), and backward gives an
    /// empty dx, zero parameter gradients and empty conditioning gradients.
    static func check<T: NormScalar>(_ name: String, as _: T.Type) throws {
        let layer = try Self.layer(name, as: T.self)
        _ = try normalize(layer, batch: 2, mode: .training)
        for mode in Mode.allCases {
            let before = try layer.state()
            let y = try normalize(layer, batch: 0, mode: mode)
            #expect(y.shape == [0, 4, 2, 3], "\(name) \(mode): output shape")
            let after = try layer.state()
            #expect(after.tensors == before.tensors, "\(name) \(mode): a buffer changed")
            var counters = before.counters
            for key in counters.keys where key.hasSuffix("num_batches_tracked") && mode == .training
            {
                counters[key]! += 1
            }
            #expect(after.counters == counters, "\(name) \(mode): counters")

            let grads = try layer.backward(try Tensor<T>(zeros: [0, 4, 2, 3]))
            #expect(grads.input.shape == [0, 4, 2, 3], "\(name) \(mode): dx shape")
            for (key, parameter) in layer.parameters {
                let g = try #require(
                    grads.parameters[key], "\(name) \(mode): no gradient of \(key)")
                #expect(g.shape == parameter.shape, "\(name) \(mode): gradient shape of \(key)")
                #expect(g.scalars.allSatisfy { $0 == 0 }, "\(name) \(mode): \(key) gradient ≠ 0")
            }
            for (key, g) in grads.conditions {
                #expect(g.count == 0, "\(name) \(mode): the gradient of \(key) is not empty")
            }
        }
    }
}

extension EmptyBatchTests {
    /// N > 0 with an empty spatial axis has statistic sets of no values: a clear error, not an
    /// empty output (PyTorch's BatchNorm returns one; the issue asks for the error).
    @Test func anEmptySpatialAxisWithSamplesIsRefused() throws {
        let x = try Tensor<Double>(zeros: [2, 4, 0])
        let layers: [any Normalizing<Double>] = [
            try BatchRenorm<Double>(channelCount: 4), try IBN<Double>(channelCount: 4),
            try KalmanNorm<Double>(channelCount: 4, chain: KalmanChain()),
        ]
        for layer in layers {
            for mode in [Mode.training, .inference] {
                #expect(throws: NormError.emptyTensor(layer: layer.displayName, shape: [2, 4, 0])) {
                    _ = try layer.normalize(x, mode: mode)
                }
            }
        }
    }

    @Test func kalmanNormChecksTheGradientShape() throws {
        let layer = try KalmanNorm<Double>(channelCount: 2, chain: KalmanChain())
        _ = try layer.normalize(try ErrorTests.x([4, 2]), mode: .training)
        #expect(throws: NormError.gradientShapeMismatch(expected: [4, 2], actual: [3, 2])) {
            _ = try layer.backward(try Tensor<Double>(zeros: [3, 2]))
        }
    }

    /// An empty batch in a Kalman chain passes no estimate down: the next layer then
    /// normalizes a real batch with its own statistics (as the first layer of a chain), not
    /// with the estimate of an earlier call.
    @Test func anEmptyKalmanBatchPassesNoStaleEstimate() throws {
        let chain = KalmanChain<Double>()
        let first = try KalmanNorm<Double>(channelCount: 2, chain: chain)
        let second = try KalmanNorm<Double>(channelCount: 2, chain: chain)
        let x = try ErrorTests.x([4, 2])
        _ = try first.normalize(x, mode: .training)
        _ = try first.normalize(try Tensor(zeros: [0, 2]), mode: .training)
        let y = try second.normalize(x, mode: .training)
        let alone = try KalmanNorm<Double>(channelCount: 2, chain: KalmanChain())
        #expect(y == (try alone.normalize(x, mode: .training)))
    }
}

/// Issue 14, defect 7: ε = 0 on a constant input gave NaN with exit status 0.
///
/// Every registry
/// normalizer either refuses ε = 0 when it is built or gives a finite output (x̂ = 0 where
/// σ² + ε = 0, so the output is β), in training and in inference.
@Suite("ε = 0 on a constant input: every registry normalizer")
struct RegistryZeroEpsilonTests {
    @Test(arguments: RegistryEmptyBatchTests.names)
    func zeroEpsilonIsRefusedOrGivesAFiniteOutput(_ name: String) throws {
        let layer: any Normalizing<Double>
        do {
            layer = try RegistryEmptyBatchTests.layer(name, epsilon: 0, as: Double.self)
        } catch let error as NormError {
            // Refused when built, with a typed error naming the hyperparameter: allowed.
            guard case .invalidHyperparameter = error else { throw error }
            return
        }
        for mode in [Mode.training, .inference] {
            let y = try RegistryEmptyBatchTests.normalize(
                layer, batch: 2, mode: mode, constant: true)
            #expect(y.isFinite, "\(name) \(mode): ε = 0 on a constant input")
            // The backward of that forward is finite too (no 0·∞ in the chain rule).
            var g = SeededGenerator(seed: 5)
            let dy = try Tensor<Double>.randomNormal(shape: y.shape, using: &g)
            let grads = try layer.backward(dy)
            #expect(grads.input.isFinite, "\(name) \(mode): dx for ε = 0 on a constant input")
            for (key, gradient) in grads.parameters {
                #expect(gradient.isFinite, "\(name) \(mode): d\(key) for ε = 0")
            }
        }
    }
}
