import NormKit
import Testing

/// Every finite input normalizes correctly, whatever its magnitude; hyperparameters and loaded
/// buffers that cannot work are refused at the API boundary.
@Suite("Extreme values and hyperparameters")
struct ExtremeValueTests {
    /// Float output vs a Double oracle: the inputs are exact multiples of a power of two, so
    /// the only differences are Float rounding and ε (negligible at these magnitudes).
    static let floatTolerance = 1e-4
    static let doubleTolerance = 1e-9

    /// The layers whose statistics are sums of squares, built for `[N, C, L]` inputs.
    static func layers<T: NormScalar>(_: T.Type, channels: Int, length: Int, epsilon: Double)
        throws -> [(String, NormLayer<T>)]
    {
        [
            ("LayerNorm", try LayerNorm<T>(normalizedShape: [channels, length], epsilon: epsilon)),
            ("InstanceNorm", try InstanceNorm<T>(featureCount: channels, epsilon: epsilon)),
            (
                "GroupNorm",
                try GroupNorm<T>(groupCount: 1, channelCount: channels, epsilon: epsilon)
            ),
            ("RMSNorm", try RMSNorm<T>(normalizedShape: [length], epsilon: epsilon)),
            (
                "BatchNorm",
                try BatchNorm<T>(
                    featureCount: channels, epsilon: epsilon, trackRunningStatistics: false)
            ),
        ]
    }

    /// z with unit-scale values, exactly representable in Float.
    static func unitSample(_ count: Int, seed: UInt64) -> [Double] {
        var g = SeededGenerator(seed: seed)
        return (0..<count).map { _ in (g.nextNormal() * 1024).rounded() / 1024 + 0.5 }
    }

    /// The same layer on unit-scale data (c = 1), in Double, with the reference kernel.
    static func oracle(_ name: String, z: [Double], shape: [Int], epsilon: Double) throws
        -> [Double]
    {
        let layer = try layers(Double.self, channels: shape[1], length: shape[2], epsilon: epsilon)
            .first { $0.0 == name }!.1
        layer.kernels = .reference
        return try layer.forward(Tensor(shape: shape, scalars: z), mode: .training).output.scalars
    }

    static func worst(_ a: [Double], _ b: [Double]) -> (difference: Double, index: Int) {
        var worst = (0.0, -1)
        for i in a.indices {
            let d = abs(a[i] - b[i])
            if !(d <= worst.0) { worst = (d.isNaN ? .infinity : d, i) }
        }
        return worst
    }

    @Test(arguments: [1e-30, 1e19, 1e20, 1e30, 8e37], [1, 3, 7, 17, 63, 65])
    func floatInputsOfAnyMagnitudeNormalize(_ magnitude: Double, length: Int) throws {
        let shape = [2, 3, length]
        let z = Self.unitSample(shape.reduce(1, *), seed: UInt64(length))
        // ε = 0: at these magnitudes any ε is negligible, and 0 keeps the oracle exact.
        for (name, layer) in try Self.layers(Float.self, channels: 3, length: length, epsilon: 0) {
            if length == 1 && name == "InstanceNorm" { continue }  // one value per statistic
            let expected = try Self.oracle(name, z: z, shape: shape, epsilon: 0)
            let x = try Tensor<Float>(shape: shape, scalars: z.map { Float($0 * magnitude) })
            #expect(x.scalars.allSatisfy { $0.isFinite })
            for kernels in [KernelChoice.automatic, .reference] {
                layer.kernels = kernels
                let (y, cache) = try layer.forward(x, mode: .training)
                let (d, i) = Self.worst(y.scalars.map(Double.init), expected)
                #expect(
                    d < Self.floatTolerance,
                    "\(name) \(kernels) at \(magnitude), length \(length): worst \(d) at \(i)")
                let dx = try layer.backward(Tensor(repeating: 1, shape: shape), cache: cache)
                #expect(dx.input.scalars.allSatisfy { $0.isFinite }, "\(name) \(kernels) backward")
            }
        }
    }

    @Test(arguments: [1e-300, 1e160, 1e200, 1e300, 3e307])
    func doubleInputsOfAnyMagnitudeNormalize(_ magnitude: Double) throws {
        let shape = [2, 3, 17]
        let z = Self.unitSample(shape.reduce(1, *), seed: 5)
        for (name, layer) in try Self.layers(Double.self, channels: 3, length: 17, epsilon: 0) {
            let expected = try Self.oracle(name, z: z, shape: shape, epsilon: 0)
            let x = try Tensor<Double>(shape: shape, scalars: z.map { $0 * magnitude })
            let (y, cache) = try layer.forward(x, mode: .training)
            let (d, i) = Self.worst(y.scalars, expected)
            #expect(d < Self.doubleTolerance, "\(name) at \(magnitude): worst \(d) at \(i)")
            // The backward of a scale-invariant layer scales by 1/c: compare dx·c.
            var g = SeededGenerator(seed: 9)
            let dy = try Tensor<Double>.randomNormal(shape: shape, using: &g)
            let dx = try layer.backward(dy, cache: cache).input.scalars.map { $0 * magnitude }
            let reference = try Self.layers(Double.self, channels: 3, length: 17, epsilon: 0)
                .first { $0.0 == name }!.1
            let unit = try reference.forward(Tensor(shape: shape, scalars: z), mode: .training)
            let dxUnit = try reference.backward(dy, cache: unit.cache).input.scalars
            let (dd, di) = Self.worst(dx, dxUnit)
            #expect(dd < 1e-6, "\(name) backward at \(magnitude): worst \(dd) at \(di)")
        }
    }

    @Test func theDefaultEpsilonStillAppliesToModerateData() throws {
        // The rescaled path must not change results that the fast path gets right.
        let shape = [4, 3, 65]
        let z = Self.unitSample(shape.reduce(1, *), seed: 2).map { $0 * 1e-4 }
        let ln = try LayerNorm<Float>(normalizedShape: [65], epsilon: 1e-5)
        let fast = try ln.forward(Tensor(shape: shape, scalars: z.map(Float.init)), mode: .training)
        ln.kernels = .reference
        let reference = try ln.forward(
            Tensor(shape: shape, scalars: z.map(Float.init)), mode: .training)
        let (d, _) = Self.worst(
            fast.output.scalars.map(Double.init), reference.output.scalars.map(Double.init))
        #expect(d < 1e-5)
        // ε dominates a variance of 1e-6: the output is far below 1, as in PyTorch.
        #expect(fast.output.scalars.allSatisfy { abs($0) < 0.5 })
    }

    @Test func zeroEpsilonWithAConstantSetGivesZeroNotNaN() throws {
        for kernels in [KernelChoice.automatic, .reference] {
            let ln = try LayerNorm<Float>(normalizedShape: [5], epsilon: 0)
            ln.kernels = kernels
            ln.offset = Tensor([0.5, 0.5, 0.5, 0.5, 0.5])
            let x = try Tensor<Float>(shape: [2, 5], scalars: [3, 3, 3, 3, 3, 1, 2, 3, 4, 5])
            let (y, cache) = try ln.forward(x, mode: .training)
            #expect(Array(y.scalars[0..<5]) == [0.5, 0.5, 0.5, 0.5, 0.5], "\(kernels)")
            #expect(abs(Double(y.scalars[9]) - (0.5 + 2 / 2.0.squareRoot())) < 1e-5)
            let grads = try ln.backward(Tensor(repeating: 1, shape: [2, 5]), cache: cache)
            #expect(grads.input.scalars.allSatisfy { $0.isFinite })
            #expect(Array(grads.input.scalars[0..<5]) == [0, 0, 0, 0, 0])
            #expect(grads.scale!.scalars.allSatisfy { $0.isFinite })
        }
        let zeros = try GroupNorm<Double>(groupCount: 1, channelCount: 2, epsilon: 0)
        let y = try zeros.forward(Tensor(zeros: [1, 2, 3]), mode: .training).output
        #expect(y.scalars == [0, 0, 0, 0, 0, 0])
    }

    @Test func batchNormBlamesTheRangeNotNaNForFiniteInput() throws {
        let bn = try BatchNorm<Double>(featureCount: 2)
        let x = try Tensor<Double>(shape: [2, 2], scalars: [1e300, -1e300, -1e300, 1e300])
        ErrorTests.expectError(.statisticsOutOfRange(layer: "BatchNorm"), layer: bn) {
            _ = try bn.forward(x, mode: .training)
        }
        #expect(!NormError.statisticsOutOfRange(layer: "BatchNorm").description.contains("NaN"))
        let nan = try Tensor<Double>(shape: [2, 2], scalars: [.nan, 1, 2, 3])
        ErrorTests.expectError(.nonFiniteStatistics(layer: "BatchNorm"), layer: bn) {
            _ = try bn.forward(nan, mode: .training)
        }
        // Float data near 1e19 fits: the running variance moves, the output is normalized.
        let bnf = try BatchNorm<Float>(featureCount: 1)
        let big = try Tensor<Float>(shape: [4, 1], scalars: [1e19, -1e19, 3e19, -3e19])
        let y = try bnf.forward(big, mode: .training).output.scalars
        #expect(abs(Double(y[0]) - 1 / 5.0.squareRoot()) < 1e-5)
        #expect(bnf.runningStatistics!.variance.scalars[0].isFinite)
        #expect(bnf.runningStatistics!.variance.scalars[0] > 1e37)
    }

    @Test func theBatchCounterSaturatesInsteadOfTrapping() throws {
        // PyTorch's int64 counter wraps to Int64.min; NormKit's stays at Int64.max.
        for momentum in [Momentum.pytorchDefault, .cumulative] {
            let bn = try BatchNorm<Double>(featureCount: 2, momentum: momentum)
            try bn.load([:], batchesTracked: Int.max)
            _ = try bn.forward(try ErrorTests.x([3, 2]), mode: .training)
            #expect(bn.runningStatistics!.batchesTracked == Int.max)
            #expect(bn.runningStatistics!.mean.scalars.allSatisfy { $0.isFinite })
        }
        let brn = try BatchRenorm<Double>(channelCount: 2)
        try brn.load([:], step: Int.max)
        _ = try brn.forward(try ErrorTests.x([3, 2]), mode: .training)
        #expect(brn.step == Int.max)
        #expect(throws: NormError.self) { try brn.load([:], step: -1) }
    }

    @Test func badEpsilonIsRefusedEverywhere() throws {
        for epsilon in [-1e-5, .nan, .infinity] {
            #expect(throws: NormError.self) {
                _ = try LayerNorm<Float>(normalizedShape: [3], epsilon: epsilon)
            }
            #expect(throws: NormError.self) {
                _ = try BatchNorm<Float>(featureCount: 3, epsilon: epsilon)
            }
            #expect(throws: NormError.self) {
                _ = try MetaNorm<Float>(channelCount: 4, epsilon: epsilon)
            }
            #expect(throws: NormError.self) {
                _ = try IBN<Float>(channelCount: 4, epsilon: epsilon)
            }
            #expect(throws: NormError.self) {
                _ = try SwitchableNorm<Float>(channelCount: 4, epsilon: epsilon)
            }
            #expect(throws: NormError.self) {
                _ = try BatchRenorm<Float>(channelCount: 4, epsilon: epsilon)
            }
            #expect(throws: NormError.self) {
                _ = try IterNorm<Float>(channelCount: 4, epsilon: epsilon)
            }
            #expect(throws: NormError.self) {
                _ = try DecorrelatedBatchNorm<Float>(channelCount: 4, epsilon: epsilon)
            }
            #expect(throws: NormError.self) {
                _ = try SwitchableWhitening<Float>(channelCount: 4, groupSize: 2, epsilon: epsilon)
            }
            #expect(throws: NormError.self) { try HyperparameterCheck.epsilon(epsilon) }
        }
        for ratio in [Double.nan, .infinity, 1e300, -0.5, 0, 1] {
            #expect(throws: NormError.self) { _ = try IBN<Float>(channelCount: 4, ratio: ratio) }
        }
        #expect(throws: NormError.self) { _ = try IterNorm<Float>(channelCount: 4, groupSize: 0) }
        #expect(throws: NormError.self) { _ = try IterNorm<Float>(channelCount: 4, groupSize: -2) }
        #expect(throws: NormError.self) {
            _ = try IterNorm<Float>(channelCount: 4, iterations: 1_000_000_000)
        }
        #expect(throws: NormError.self) {
            _ = try SwitchableWhitening<Float>(channelCount: 4, groupSize: 2, iterations: 1_000_001)
        }
        _ = try IterNorm<Float>(channelCount: 4, iterations: IterNorm<Float>.maximumIterations)
    }

    @Test func negativeOrNaNRunningVarianceIsRefusedOnLoad() throws {
        let bn = try BatchNorm<Double>(featureCount: 2)
        for bad in [-1.0, .nan, .infinity] {
            ErrorTests.expectError(
                .invalidHyperparameter(
                    name: "running_var", value: "\(bad)",
                    requirement: "every entry must be finite and ≥ 0"), layer: bn
            ) {
                try bn.load(["running_var": Tensor([1, bad]), "running_mean": Tensor([5, 5])])
            }
        }
        try bn.load(["running_var": Tensor([0, 2])])
        let brn = try BatchRenorm<Double>(channelCount: 2)
        #expect(throws: NormError.self) { try brn.load(["running_std": Tensor([1, -1])]) }
    }

    /// Inference with a running variance of 0 and ε = 0 gives β, as training does (it gave
    /// NaN with exit status 0 through `normkit apply --eval`).
    @Test func aZeroRunningVarianceWithZeroEpsilonGivesBetaInInference() throws {
        let bn = try BatchNorm<Double>(featureCount: 2, epsilon: 0)
        try bn.load(["running_var": Tensor([0, 4]), "running_mean": Tensor([1, 1])])
        bn.offset = Tensor([0.25, 0.5])
        let x = try Tensor<Double>(shape: [2, 2], scalars: [3, 3, 5, 9])
        let (y, cache) = try bn.forward(x, mode: .inference)
        #expect(y.scalars == [0.25, 1.5, 0.25, 4.5])
        let dx = try bn.backward(Tensor(repeating: 1, shape: [2, 2]), cache: cache).input
        #expect(dx.scalars == [0, 0.5, 0, 0.5])
    }

    /// Every layer with running statistics refuses a negative or non-finite loaded variance
    /// (Kalman Norm and Switchable Norm took them and gave garbage in inference).
    @Test func everyRunningVarianceIsCheckedOnLoad() throws {
        for bad in [-1.0, .nan, .infinity] {
            let kalman = try KalmanNorm<Double>(channelCount: 2, chain: KalmanChain())
            let before = kalman.state()
            #expect(throws: NormError.self, "KalmanNorm \(bad)") {
                try kalman.load(NormState(tensors: ["running_var": Tensor([bad, 1])]))
            }
            #expect(kalman.state() == before)
            for weighting in [SwitchableNorm<Double>.Weighting.softmax, .sparsestMax] {
                let sn = try SwitchableNorm<Double>(channelCount: 2, weighting: weighting)
                let initial = sn.runningVariance
                #expect(throws: NormError.self, "\(weighting) \(bad)") {
                    try sn.load(["running_var": Tensor([1, bad])])
                }
                #expect(sn.runningVariance == initial)
            }
        }
        let ssn = try SwitchableNorm<Double>(channelCount: 2, weighting: .sparsestMax)
        for radius in [2.0, -1, .nan] {
            #expect(throws: NormError.self, "radius \(radius)") {
                try ssn.load(["radius": Tensor([radius])])
            }
        }
        var options = NormalizerOptions()
        options.values["radius"] = "2"
        #expect(throws: NormError.self) {
            _ = try NormalizerRegistry.all.make(
                "sparseswitchnorm", NormalizerRequest(inputShape: [2, 2, 3], options: options),
                as: Double.self)
        }
    }

    /// A misspelt key is named as unknown, not reported as a shape mismatch.
    @Test func unknownKeysAreNamedInTheMixtureLayersAndBatchRenorm() throws {
        let sn = try SwitchableNorm<Double>(channelCount: 4)
        let meta = try MetaNorm<Double>(channelCount: 4)
        let brn = try BatchRenorm<Double>(channelCount: 4)
        let loads: [(String, ([String: Tensor<Double>]) throws -> Void)] = [
            ("SwitchableNorm", { try sn.load($0) }), ("MetaNorm", { try meta.load($0) }),
            ("BatchRenorm", { try brn.load($0) }),
        ]
        for (name, load) in loads {
            do {
                try load(["wieght": Tensor(zeros: [4])])
                Issue.record("\(name): a misspelt key was accepted")
            } catch NormError.unknownParameter(_, let key, _) {
                #expect(key == "wieght", "\(name)")
            } catch {
                Issue.record("\(name): \(error), not unknownParameter")
            }
        }
    }

    /// Sizes that would allocate terabytes are refused with a typed error naming the limit.
    @Test func absurdLayerSizesAreRefusedBeforeAllocation() throws {
        #expect(throws: NormError.self) {
            _ = try ConditionalBatchNorm<Double>(
                channelCount: 16, source: .embedding(classes: 1_000_000_000_000))
        }
        #expect(throws: NormError.self) {
            _ = try SPADE<Double>(channelCount: 4, labelCount: 3, hiddenCount: 1_000_000_000)
        }
        #expect(throws: NormError.self) {
            _ = try SPADE<Double>(channelCount: 4, labelCount: 3, hiddenCount: Int.max)
        }
        #expect(throws: NormError.self) {
            _ = try SpectralNorm<Double>(
                weight: Tensor(zeros: [2, 2]), powerIterations: 1_000_000_000)
        }
    }
}
