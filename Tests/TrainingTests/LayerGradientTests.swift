import NormKit
import NormTestSupport
import Studies
import Testing

@testable import Training

/// Central finite differences in Double for every layer of the harness: input and parameters.
@Suite("Harness layers: finite differences")
struct LayerGradientTests {
    /// Checks dx and every parameter gradient of `module` at `x` (loss Σ y·dy).
    static func check<M: Module>(
        _ module: M, _ x: Tensor<Double>, label: String, mode: Mode = .training, h: Double = 1e-6
    ) throws where M.Scalar == Double {
        var g = SeededGenerator(seed: 77)
        let y0 = try module.forward(x, mode: mode)
        let dy = try Tensor<Double>.randomNormal(shape: y0.shape, using: &g)
        for p in module.parameters { p.zeroGradient() }
        let dx = try module.backward(dy)
        let analytic = module.parameters.map(\.gradient)
        func loss(_ input: Tensor<Double>) throws -> Double {
            zip(try module.forward(input, mode: mode).scalars, dy.scalars).reduce(0) {
                $0 + $1.0 * $1.1
            }
        }
        var worst = 0.0
        var probe = x
        for i in 0..<x.count {
            let v = probe[flat: i]
            probe[flat: i] = v + h
            let plus = try loss(probe)
            probe[flat: i] = v - h
            let minus = try loss(probe)
            probe[flat: i] = v
            worst = max(worst, abs((plus - minus) / (2 * h) - dx[flat: i]))
        }
        #expect(worst < 1e-6, "\(label) dx: worst \(worst)")
        for (p, a) in zip(module.parameters, analytic) {
            var worstP = 0.0
            for i in 0..<p.value.count {
                let v = p.value[flat: i]
                p.value[flat: i] = v + h
                let plus = try loss(x)
                p.value[flat: i] = v - h
                let minus = try loss(x)
                p.value[flat: i] = v
                worstP = max(worstP, abs((plus - minus) / (2 * h) - a[flat: i]))
            }
            #expect(worstP < 1e-6, "\(label) d\(p.name): worst \(worstP)")
        }
    }

    static func input(_ shape: [Int], seed: UInt64 = 5) throws -> Tensor<Double> {
        var g = SeededGenerator(seed: seed)
        return try Tensor.randomNormal(shape: shape, using: &g)
    }

    @Test func linear() throws {
        var g = SeededGenerator(seed: 1)
        try Self.check(
            try Linear<Double>(5, 3, generator: &g), try Self.input([4, 5]), label: "Linear")
    }

    @Test(arguments: [(1, 0), (1, 1), (2, 1), (2, 0)])
    func conv2d(_ stride: Int, _ padding: Int) throws {
        var g = SeededGenerator(seed: 2)
        let conv = try Conv2d<Double>(
            2, 3, kernel: 3, stride: stride, padding: padding, generator: &g)
        try Self.check(conv, try Self.input([2, 2, 5, 6]), label: "Conv2d s\(stride) p\(padding)")
    }

    /// `apply conv2d --padding 2^62` trapped on overflow and `--padding 10000` aborted on a
    /// 86 GB allocation: sizes past the limits are typed errors before anything is allocated.
    @Test func conv2dRefusesAbsurdSizes() throws {
        var g = SeededGenerator(seed: 2)
        for padding in [1 << 62, Int.max, Conv2d<Float>.sizeLimit + 1] {
            #expect(throws: TrainingError.self, "padding \(padding)") {
                _ = try Conv2d<Float>(2, 3, kernel: 3, padding: padding, generator: &g)
            }
        }
        let conv = try Conv2d<Float>(2, 3, kernel: 3, padding: 10_000, generator: &g)
        #expect(throws: TrainingError.self) {
            _ = try conv.forward(try Tensor(zeros: [4, 2, 6, 6]), mode: .inference)
        }
    }

    @Test func reluAndPooling() throws {
        // Offsets keep every input away from ReLU's kink and max-pool ties.
        var x = try Self.input([2, 3, 4, 4])
        for i in 0..<x.count { x[flat: i] += x[flat: i] > 0 ? 0.1 : -0.1 }
        try Self.check(ReLU<Double>(), x, label: "ReLU")
        try Self.check(Pool2d<Double>(.max), x, label: "MaxPool")
        try Self.check(Pool2d<Double>(.average), x, label: "AvgPool")
        try Self.check(GlobalAveragePool<Double>(), x, label: "GlobalAveragePool")
        try Self.check(Flatten<Double>(), x, label: "Flatten")
    }

    @Test(arguments: [NormalizerChoice.bn, .gn, .ln, .in, .sn, .ssn, .brn, .ibn, .meta, .none])
    func normSlots(_ choice: NormalizerChoice) throws {
        let slot = try NormSlot<Double>(choice, channels: 4, groups: 2, name: "n")
        // Batch Renormalization's training gradient treats r and d as constants, which finite
        // differences of the full function cannot (BatchRenormTests checks it against the
        // detached function); here its inference mode is checked.
        try Self.check(
            slot, try Self.input([3, 4, 2, 3]), label: "NormSlot \(choice)",
            mode: choice == .brn ? .inference : .training)
    }

    @Test func residualBlockAndSequential() throws {
        var g = SeededGenerator(seed: 3)
        let block = try ResidualBlock<Double>(
            2, 4, stride: 2, normalizer: .gn, groups: 2, name: "b", generator: &g)
        try Self.check(block, try Self.input([2, 2, 4, 4]), label: "ResidualBlock")
        let net = try Models.make(
            .convnet, normalizer: .bn, inputShape: [1, 4, 4], classes: 3, width: 2, groups: 1,
            seed: 4, as: Double.self)
        try Self.check(net, try Self.input([3, 1, 4, 4]), label: "convnet")
    }

    @Test func softmaxCrossEntropyGradient() throws {
        let logits = try Self.input([3, 4])
        let labels = [0, 3, 1]
        let (_, gradient, _) = try SoftmaxCrossEntropy.evaluate(logits, labels: labels)
        var probe = logits
        for i in 0..<logits.count {
            let v = probe[flat: i]
            probe[flat: i] = v + 1e-6
            let plus = try SoftmaxCrossEntropy.evaluate(probe, labels: labels).loss
            probe[flat: i] = v - 1e-6
            let minus = try SoftmaxCrossEntropy.evaluate(probe, labels: labels).loss
            probe[flat: i] = v
            #expect(abs((plus - minus) / 2e-6 - gradient[flat: i]) < 1e-8)
        }
        #expect(throws: TrainingError.self) {
            _ = try SoftmaxCrossEntropy.evaluate(logits, labels: [0, 4, 1])
        }
    }
}

/// Kalman Normalization: gradients through the whole chain (input, γ, β, transitions, gains),
/// and its first layer equals BatchNorm.
@Suite("Kalman Normalization")
struct KalmanNormTests {
    @Test func gradientsThroughTheChainMatchFiniteDifferences() throws {
        let net = try Models.make(
            .convnet, normalizer: .kn, inputShape: [1, 4, 4], classes: 3, width: 2, groups: 1,
            seed: 9, as: Double.self)
        // Move the gains and transitions away from their initial values.
        var g = SeededGenerator(seed: 10)
        for p in net.parameters where p.group == "kalman" {
            p.value = p.value.map { $0 + 0.3 * g.nextNormal() }
        }
        try LayerGradientTests.check(
            net, try LayerGradientTests.input([4, 1, 4, 4], seed: 11), label: "KN convnet")
    }

    @Test func theFirstLayerIsBatchNorm() throws {
        let chain = KalmanChain<Double>()
        let kn = try KalmanNorm<Double>(channelCount: 3, chain: chain)
        let bn = try BatchNorm<Double>(featureCount: 3)
        let x = try LayerGradientTests.input([4, 3, 5], seed: 12)
        let a = try kn.forward(x, mode: .training).0
        let b = try bn.forward(x, mode: .training).output
        #expect(Comparison(a.scalars, b.scalars).relative < 1e-12)
    }

    @Test func residualNetworksAreRefused() {
        #expect(throws: TrainingError.self) {
            _ = try Models.make(
                .resnet, normalizer: .kn, inputShape: [1, 8, 8], classes: 3, seed: 1, as: Float.self
            )
        }
    }
}
