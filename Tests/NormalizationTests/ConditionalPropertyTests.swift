import Foundation
import NormKit
import NormTestSupport
import Testing

private func random<T: NormScalar>(
    _ shape: [Int], seed: UInt64, mean: Double = 0, std: Double = 1, as _: T.Type = T.self
) throws -> Tensor<T> {
    var g = SeededGenerator(seed: seed)
    let count = shape.reduce(1, *)
    return try Tensor(shape: shape, rounding: (0..<count).map { _ in mean + std * g.nextNormal() })
}

/// Per-(n, c) mean and unbiased standard deviation of `[N, C, spatial…]`.
private func channelStatistics(_ t: Tensor<Double>) -> (mean: [Double], std: [Double]) {
    let sets = t.shape[0] * t.shape[1]
    let size = t.count / sets
    var means: [Double] = []
    var stds: [Double] = []
    for s in 0..<sets {
        let values = t.scalars[s * size..<(s + 1) * size]
        let mean = values.reduce(0, +) / Double(size)
        let variance = values.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(size - 1)
        means.append(mean)
        stds.append(variance.squareRoot())
    }
    return (means, stds)
}

@Suite("Conditional layers: properties")
struct ConditionalPropertyTests {
    @Test func adainOutputHasTheStylesStatistics() throws {
        let x: Tensor<Double> = try random([2, 3, 6, 7], seed: 1, mean: 4, std: 3)
        let s: Tensor<Double> = try random([2, 3, 5, 5], seed: 2, mean: -2, std: 0.7)
        let adain = try AdaIN<Double>()
        try adain.setConditions(["style": s])
        let y = try adain.normalize(x, mode: .inference)
        let out = channelStatistics(y)
        let style = channelStatistics(s)
        for i in 0..<out.mean.count {
            #expect(abs(out.mean[i] - style.mean[i]) < 1e-12)
            // σ_s = √(var_s + ε) and the content's √(var/(var + ε)) differ from the plain
            // standard deviations by O(ε/var) ≈ 1e-5.
            #expect(abs(out.std[i] / style.std[i] - 1) < 1e-4, "channel \(i)")
        }
    }

    @Test func adainWithAlphaZeroIsTheContent() throws {
        let x: Tensor<Double> = try random([1, 2, 3, 3], seed: 3)
        let adain = try AdaIN<Double>(alpha: 0)
        try adain.setConditions(["style": try random([1, 2, 4, 4], seed: 4)])
        let y = try adain.normalize(x, mode: .training)
        #expect(Comparison(y.scalars, x.scalars).maxAbsolute < 1e-15)
    }

    @Test(arguments: [false, true])
    func adaLNZeroAtInitializationIsTheIdentityOnTheResidualBranch(_ silu: Bool) throws {
        let x: Tensor<Double> = try random([3, 4, 6], seed: 5, mean: 1, std: 2)
        let layer = try AdaLN<Double>(featureCount: 6, conditionDimension: 5, silu: silu)
        try layer.setConditions(["condition": try random([3, 5], seed: 6)])
        let y = try layer.normalize(x, mode: .training)
        // The modulation starts at zero: y is the affine-free LayerNorm of x …
        let ln = try LayerNorm<Double>(
            normalizedShape: [6], epsilon: 1e-6, elementwiseAffine: false)
        #expect(
            Comparison(y.scalars, try ln.forward(x, mode: .training).output.scalars).maxAbsolute
                < 1e-14)
        // … and the gate is zero, so r + gate ⊙ f(y) = r whatever the branch computes.
        let r: Tensor<Double> = try random([3, 4, 6], seed: 7)
        let branch: Tensor<Double> = try random([3, 4, 6], seed: 8, std: 10)
        #expect(try layer.gatedResidual(r, branch: branch) == r)
    }

    @Test(arguments: [1, 3, 7, 17, 63, 65])
    func fusedAddRMSNormEqualsAddThenRMSNorm(_ d: Int) throws {
        let x: Tensor<Float> = try random([5, d], seed: UInt64(d))
        let r: Tensor<Float> = try random([5, d], seed: UInt64(d) + 100)
        let w: Tensor<Float> = try random([d], seed: UInt64(d) + 200, mean: 1, std: 0.3)
        let fused = try AddRMSNorm<Float>(featureCount: d)
        try fused.setParameters(["weight": w])
        try fused.setConditions(["residual": r])
        let y = try fused.normalize(x, mode: .training)
        let h = try x + r
        let plain = try RMSNorm<Float>(normalizedShape: [d], epsilon: 1e-6)
        plain.scale = w
        let (expected, cache) = try plain.forward(h, mode: .training)
        #expect(fused.residualOutput == h)
        #expect(Comparison(y.scalars, expected.scalars).maxAbsolute < 1e-6)
        let dy: Tensor<Float> = try random([5, d], seed: UInt64(d) + 300)
        let dh: Tensor<Float> = try random([5, d], seed: UInt64(d) + 400)
        let g = try fused.backward(dy, residualOutputGradient: dh)
        let pg = try plain.backward(dy, cache: cache)
        let expectedDx = try pg.input + dh
        #expect(Comparison(g.input.scalars, expectedDx.scalars).maxAbsolute < 1e-5)
        #expect(g.conditions["residual"] == g.input)
        #expect(Comparison(g.parameters["weight"]!.scalars, pg.scale!.scalars).maxAbsolute < 1e-5)
    }

    @Test func unitOffsetRMSNormStartsAsPlainRMSNorm() throws {
        let x: Tensor<Double> = try random([4, 9], seed: 9)
        let a = try WeightedRMSNorm<Double>(featureCount: 9, unitOffset: true)
        let b = try WeightedRMSNorm<Double>(featureCount: 9)
        #expect(a.parameters["weight"]!.scalars.allSatisfy { $0 == 0 })
        #expect(try a.normalize(x, mode: .training) == b.normalize(x, mode: .training))
    }

    @Test func unitNormGivesUnitVectors() throws {
        let x: Tensor<Double> = try random([3, 4, 11], seed: 10, mean: 1000, std: 0.05)
        let y = try UnitNorm<Double>().normalize(x, mode: .training)
        for row in 0..<12 {
            let norm = y.scalars[row * 11..<(row + 1) * 11].reduce(0) { $0 + $1 * $1 }
            #expect(abs(norm - 1) < 1e-12)
        }
    }

    @Test func conditionalBatchNormWithOneClassIsBatchNorm() throws {
        let x: Tensor<Double> = try random([4, 3, 2, 2], seed: 11)
        let gamma: Tensor<Double> = try random([3], seed: 12, mean: 1, std: 0.5)
        let beta: Tensor<Double> = try random([3], seed: 13)
        let cbn = try ConditionalBatchNorm<Double>(channelCount: 3, source: .embedding(classes: 1))
        try cbn.setParameters([
            "weights.weight": try gamma.reshaped([1, 3]),
            "biases.weight": try beta.reshaped([1, 3]),
        ])
        try cbn.setConditions(["labels": try Tensor(zeros: [4])])
        let bn = try BatchNorm<Double>(featureCount: 3)
        try bn.load(["weight": gamma, "bias": beta])
        let y = try cbn.normalize(x, mode: .training)
        #expect(
            Comparison(y.scalars, try bn.forward(x, mode: .training).output.scalars).maxAbsolute
                < 1e-14)
        #expect(try cbn.state().tensors["running_mean"] == bn.state().tensors["running_mean"])
    }

    @Test func spadeWithZeroHeadsIsTheParameterFreeNorm() throws {
        let x: Tensor<Double> = try random([2, 3, 4, 4], seed: 14)
        let spade = try SPADE<Double>(
            configuration: "spadeinstance3x3", channelCount: 3, labelCount: 2, hiddenCount: 8)
        var zeros: [String: Tensor<Double>] = [:]
        for key in ["mlp_gamma.weight", "mlp_gamma.bias", "mlp_beta.weight", "mlp_beta.bias"] {
            zeros[key] = try Tensor(zeros: spade.parameters[key]!.shape)
        }
        try spade.setParameters(zeros)
        try spade.setConditions(["segmap": try random([2, 2, 8, 8], seed: 15)])
        let y = try spade.normalize(x, mode: .training)
        let instance = try InstanceNorm<Double>(featureCount: 3)
        #expect(
            Comparison(y.scalars, try instance.forward(x, mode: .training).output.scalars)
                .maxAbsolute < 1e-14)
    }

    @Test func spadeConfigurationStringsFollowTheOfficialConvention() throws {
        #expect(try SPADE<Float>.parse("spadebatch3x3") == (.batch, 3))
        #expect(try SPADE<Float>.parse("spadesyncbatch5x5") == (.batch, 5))
        #expect(try SPADE<Float>.parse("spadeinstance1x1") == (.instance, 1))
        for bad in ["batch3x3", "spadegroup3x3", "spadebatch3x5", "spadebatch"] {
            #expect(throws: NormError.self) { _ = try SPADE<Float>.parse(bad) }
        }
        #expect(throws: NormError.self) {
            _ = try SPADE<Float>(channelCount: 2, labelCount: 2, kernelSize: 4)
        }
    }
}

/// Bad conditioning inputs: typed errors naming the argument and the shapes, nothing changed.
@Suite("Conditional layers: bad input")
struct ConditionalErrorTests {
    static func problem(_ body: () throws -> Void) -> (name: String, text: String)? {
        do {
            try body()
        } catch let error as NormError {
            if case .invalidCondition(let name, _) = error { return (name, error.description) }
            return ("", error.description)
        } catch {
            return ("", "\(error)")
        }
        return nil
    }

    @Test func adainRefusesAStyleWithOtherChannels() throws {
        let adain = try AdaIN<Float>()
        try adain.setConditions(["style": try random([2, 4, 3, 3], seed: 1)])
        let p = Self.problem {
            _ = try adain.normalize(try random([2, 3, 3, 3], seed: 2), mode: .training)
        }
        #expect(p?.name == "style")
        #expect(
            p?.text.contains("[2, 4, 3, 3]") == true && p?.text.contains("[2, 3, 3, 3]") == true)
        // The failed call left no cache behind.
        #expect(throws: NormError.noForwardCall(layer: "AdaIN")) {
            _ = try adain.backward(try Tensor(zeros: [2, 3, 3, 3]))
        }
    }

    @Test func spadeRefusesASegmapWithAnotherBatchOrRank() throws {
        let spade = try SPADE<Float>(channelCount: 2, labelCount: 3, hiddenCount: 4)
        let before = try spade.state()
        try spade.setConditions(["segmap": try random([3, 3, 4, 4], seed: 3)])
        let x: Tensor<Float> = try random([2, 2, 4, 4], seed: 4)
        let p = Self.problem { _ = try spade.normalize(x, mode: .training) }
        #expect(p?.name == "segmap")
        #expect(
            p?.text.contains("[3, 3, 4, 4]") == true && p?.text.contains("[2, 2, 4, 4]") == true)
        #expect(try spade.state() == before)  // running statistics untouched
        let rank = Self.problem {
            try spade.setConditions(["segmap": try random([2, 3, 4], seed: 5)])
        }
        #expect(rank?.name == "segmap" && rank?.text.contains("[2, 3, 4]") == true)
    }

    @Test func conditionalBatchNormRefusesAClassOutOfRange() throws {
        let cbn = try ConditionalBatchNorm<Float>(channelCount: 2, source: .embedding(classes: 3))
        let p = Self.problem { try cbn.setConditions(["labels": Tensor([0, 3])]) }
        #expect(p?.name == "labels" && p?.text.contains("0..<3") == true)
        let fraction = Self.problem { try cbn.setConditions(["labels": Tensor([0, 1.5])]) }
        #expect(fraction?.name == "labels")
        // A label vector for another batch size: refused before BatchNorm touches its buffers.
        try cbn.setConditions(["labels": Tensor([0, 1, 2])])
        let before = try cbn.state()
        let batch = Self.problem {
            _ = try cbn.normalize(try random([2, 2, 3, 3], seed: 6), mode: .training)
        }
        #expect(batch?.name == "labels" && batch?.text.contains("[2, 2, 3, 3]") == true)
        #expect(try cbn.state() == before)
    }

    @Test func nanInAConditioningInputIsRefused() throws {
        let nan = try Tensor<Float>(shape: [2, 3], scalars: [1, 2, .nan, 4, 5, 6])
        let adaln = try AdaLN<Float>(featureCount: 4, conditionDimension: 3)
        #expect(Self.problem { try adaln.setConditions(["condition": nan]) }?.name == "condition")
        let linear = try ConditionalBatchNorm<Float>(
            channelCount: 2, source: .linear(conditionDimension: 3, unitOffset: true))
        #expect(Self.problem { try linear.setConditions(["condition": nan]) }?.name == "condition")
        let style = try Tensor<Float>(shape: [1, 1, 1, 3], scalars: [1, .nan, 2])
        #expect(
            Self.problem { try AdaIN<Float>().setConditions(["style": style]) }?.name == "style")
        let segmap = try Tensor<Float>(shape: [1, 1, 1, 2], scalars: [.infinity, 0])
        let spade = try SPADE<Float>(channelCount: 1, labelCount: 1, hiddenCount: 2)
        #expect(Self.problem { try spade.setConditions(["segmap": segmap]) }?.name == "segmap")
    }

    @Test func missingConditionsAndWrongShapesAreTypedErrors() throws {
        #expect(
            Self.problem {
                _ = try AdaIN<Float>().normalize(try Tensor(zeros: [1, 1, 2, 2]), mode: .training)
            }?.name == "style")
        let add = try AddRMSNorm<Float>(featureCount: 4)
        #expect(
            Self.problem { _ = try add.normalize(try Tensor(zeros: [2, 4]), mode: .training) }?.name
                == "residual")
        try add.setConditions(["residual": try Tensor(zeros: [3, 4])])
        #expect(throws: NormError.self) {
            _ = try add.normalize(try Tensor(zeros: [2, 4]), mode: .training)
        }
        #expect(throws: NormError.self) {
            _ = try QKNorm<Float>(headDimension: 4).normalize(
                try Tensor(zeros: [2, 4]), mode: .training)
        }
        #expect(throws: NormError.self) {
            _ = try UnitNorm<Float>().normalize(try Tensor(zeros: [2, 4]), mode: .training)
        }
        let dyt = try DynamicTanh<Float>(channelCount: 3)
        #expect(throws: NormError.self) {
            _ = try dyt.normalize(try Tensor(zeros: [2, 4]), mode: .training)
        }
        #expect(throws: NormError.self) { try dyt.setParameters(["alpha": Tensor([1, 2])]) }
        #expect(throws: NormError.self) { try dyt.setParameters(["gamma": Tensor([1, 2, 3])]) }
    }
}

/// The fast Float kernels of DyT and of the fused add + RMSNorm against the reference kernels on
/// awkward sizes, threaded.
@Suite("DyT and fused add + RMSNorm: fast vs reference")
struct LLMKernelParityTests {
    static let sizes = [1, 3, 7, 17, 63, 65]

    @Test func simdTanhIsWithinAFewUlpsOfTheCLibrary() {
        var worst: Float = 0
        var z: Float = -12
        while z <= 12 {
            let fast = DynamicTanhKernel.tanhScalar(z)
            let exact = Float(tanh(Double(z)))
            worst = max(worst, abs(fast - exact) / max(abs(exact).ulp, Float.leastNormalMagnitude))
            z += 0.000_37
        }
        #expect(worst <= 4, "worst error \(worst) ulps")
        #expect(DynamicTanhKernel.tanhScalar(.nan).isNaN)
        #expect(DynamicTanhKernel.tanhScalar(1e-30) == 1e-30)
    }

    @Test(arguments: sizes, [Layout.channelsLast, .channelsFirst])
    func dytFastEqualsReference(_ size: Int, _ layout: Layout) throws {
        let shape = layout == .channelsLast ? [9, size] : [3, size, 2, 5]
        let channels = size
        let x: Tensor<Float> = try random(shape, seed: UInt64(size), std: 2)
        let dy: Tensor<Float> = try random(shape, seed: UInt64(size) + 1)
        let fast = try DynamicTanh<Float>(channelCount: channels, alpha: 0.7, layout: layout)
        try fast.setParameters([
            "weight": try random([channels], seed: 5, mean: 1, std: 0.5),
            "bias": try random([channels], seed: 6),
        ])
        let reference = try DynamicTanh<Float>(channelCount: channels, alpha: 0.7, layout: layout)
        try reference.setParameters(fast.parameters)
        reference.kernels = .reference
        try Parallelism.$serialCutoffOverride.withValue(0) {
            let yf = try fast.normalize(x, mode: .training)
            let yr = try reference.normalize(x, mode: .training)
            #expect(Comparison(yf.scalars, yr.scalars).maxAbsolute < 2e-6)
            let gf = try fast.backward(dy)
            let gr = try reference.backward(dy)
            #expect(Comparison(gf.input.scalars, gr.input.scalars).maxAbsolute < 2e-6)
            for key in ["alpha", "weight", "bias"] {
                let c = Comparison(gf.parameters[key]!.scalars, gr.parameters[key]!.scalars)
                #expect(c.relative < 1e-5, "\(key): \(c)")
            }
        }
    }

    @Test(arguments: sizes)
    func addRMSNormFastEqualsReference(_ d: Int) throws {
        let x: Tensor<Float> = try random([7, 3, d], seed: UInt64(d), mean: 1000, std: 0.05)
        let r: Tensor<Float> = try random([7, 3, d], seed: UInt64(d) + 1)
        let dy: Tensor<Float> = try random([7, 3, d], seed: UInt64(d) + 2)
        let fast = try AddRMSNorm<Float>(featureCount: d, unitOffset: true)
        try fast.setParameters(["weight": try random([d], seed: 3, std: 0.3)])
        let reference = try AddRMSNorm<Float>(featureCount: d, unitOffset: true)
        try reference.setParameters(fast.parameters)
        reference.kernels = .reference
        try Parallelism.$serialCutoffOverride.withValue(0) {
            for layer in [fast, reference] { try layer.setConditions(["residual": r]) }
            let yf = try fast.normalize(x, mode: .training)
            let yr = try reference.normalize(x, mode: .training)
            #expect(Comparison(yf.scalars, yr.scalars).maxAbsolute < 1e-5)
            #expect(fast.residualOutput == reference.residualOutput)
            let gf = try fast.backward(dy, residualOutputGradient: dy)
            let gr = try reference.backward(dy, residualOutputGradient: dy)
            #expect(Comparison(gf.input.scalars, gr.input.scalars).relative < 1e-5)
            #expect(
                Comparison(gf.parameters["weight"]!.scalars, gr.parameters["weight"]!.scalars)
                    .relative < 1e-5)
        }
    }
}
