import NormKit
import Testing

@testable import Normalization

/// Central finite differences in Double for dx, dγ and dβ of every layer, in every mode.
@Suite("Finite-difference gradient checks")
struct GradientCheckTests {
    /// Central differences with h = 1e-5 have truncation error O(h²)·f''' and rounding error
    /// O(ε·|L|/h); 1e-6 relative to the gradient's scale is far above both and far below a bug.
    static let tolerance = 1e-6

    struct Case: CustomStringConvertible, Sendable {
        var name: String
        var shape: [Int]
        var offset: Double
        var make: @Sendable () throws -> NormLayer<Double>
        var description: String { "\(name) \(shape)\(offset != 0 ? " offset \(offset)" : "")" }
    }

    static let cases: [Case] = [
        Case(name: "BatchNorm rank 2", shape: [4, 3], offset: 0) { try BatchNorm(featureCount: 3) },
        Case(name: "BatchNorm rank 4", shape: [2, 3, 2, 3], offset: 0) {
            try BatchNorm(featureCount: 3)
        },
        Case(name: "BatchNorm NHWC", shape: [2, 2, 3, 3], offset: 0) {
            try BatchNorm(featureCount: 3, layout: .channelsLast)
        },
        Case(name: "BatchNorm offset", shape: [3, 2, 2, 2], offset: 1000) {
            try BatchNorm(featureCount: 2)
        },
        Case(name: "BatchNorm no affine", shape: [3, 2, 3], offset: 0) {
            try BatchNorm(featureCount: 2, affine: false)
        },
        Case(name: "LayerNorm K=1", shape: [2, 3, 5], offset: 0) {
            try LayerNorm(normalizedShape: [5])
        },
        Case(name: "LayerNorm K=3", shape: [2, 2, 3, 2], offset: 0) {
            try LayerNorm(normalizedShape: [2, 3, 2])
        },
        Case(name: "LayerNorm offset", shape: [2, 7], offset: 1000) {
            try LayerNorm(normalizedShape: [7])
        },
        Case(name: "LayerNorm2d", shape: [2, 3, 2, 2], offset: 0) {
            try LayerNorm(channelCount: 3)
        },
        Case(name: "InstanceNorm affine tracked", shape: [2, 3, 2, 3], offset: 0) {
            try InstanceNorm(featureCount: 3, affine: true, trackRunningStatistics: true)
        },
        Case(name: "InstanceNorm NHWC", shape: [2, 3, 2, 2], offset: 0) {
            try InstanceNorm(featureCount: 2, affine: true, layout: .channelsLast)
        },
        Case(name: "GroupNorm G=2", shape: [2, 4, 2, 2], offset: 0) {
            try GroupNorm(groupCount: 2, channelCount: 4)
        },
        Case(name: "GroupNorm NHWC", shape: [2, 2, 2, 6], offset: 0) {
            try GroupNorm(groupCount: 3, channelCount: 6, layout: .channelsLast)
        },
        Case(name: "GroupNorm offset", shape: [2, 4, 3], offset: 1000) {
            try GroupNorm(groupCount: 2, channelCount: 4)
        },
        Case(name: "RMSNorm K=1", shape: [3, 6], offset: 0) {
            try RMSNorm(normalizedShape: [6], epsilon: 1e-6)
        },
        Case(name: "RMSNorm K=2", shape: [2, 2, 3], offset: 0) {
            try RMSNorm(normalizedShape: [2, 3])
        },
        Case(name: "custom (N,H) per (C,W)", shape: [3, 2, 3, 2], offset: 0) {
            try NormLayer(
                normalizer: Normalizer(
                    partition: .axes([0, 2]), recovery: .elementwiseAffine(shape: [2, 3, 2])))
        },
        Case(name: "custom center only", shape: [3, 4], offset: 0) {
            try NormLayer(
                normalizer: Normalizer(
                    partition: .batch, operation: .center, recovery: .channelAffine(channels: 4)))
        },
        Case(name: "custom unbiased", shape: [2, 3, 4], offset: 0) {
            try NormLayer(
                normalizer: Normalizer(
                    partition: .instance, recovery: .channelAffine(channels: 3), variance: .unbiased
                ))
        },
    ]

    static func data(_ c: Case, seed: UInt64) throws -> (
        Tensor<Double>, Tensor<Double>, NormLayer<Double>
    ) {
        var g = SeededGenerator(seed: seed)
        let scale = c.offset == 0 ? 1.0 : 0.05
        let x = try Tensor<Double>.randomNormal(
            shape: c.shape, mean: c.offset, standardDeviation: scale, using: &g)
        let dy = try Tensor<Double>.randomNormal(shape: c.shape, using: &g)
        let layer = try c.make()
        // Non-trivial γ and β so that their broadcast is exercised.
        if let s = layer.scale { layer.scale = s.map { _ in 1 + 0.5 * g.nextNormal() } }
        if let o = layer.offset { layer.offset = o.map { _ in 0.5 * g.nextNormal() } }
        return (x, dy, layer)
    }

    @Test(arguments: cases)
    func trainingGradientsMatchFiniteDifferences(_ c: Case) throws {
        let (x, dy, layer) = try Self.data(c, seed: 7)
        for result in try GradientCheck.run(layer, input: x, outputGradient: dy, mode: .training) {
            #expect(result.relativeError < Self.tolerance, "\(c): \(result)")
        }
    }

    @Test(arguments: cases)
    func inferenceGradientsMatchFiniteDifferences(_ c: Case) throws {
        let (x, dy, layer) = try Self.data(c, seed: 11)
        // Move running statistics (where tracked) away from their initial values first.
        _ = try layer.forward(x.map { $0 * 1.5 + 0.2 }, mode: .training)
        for result in try GradientCheck.run(layer, input: x, outputGradient: dy, mode: .inference) {
            #expect(result.relativeError < Self.tolerance, "\(c): \(result)")
        }
    }

    @Test func gradientCheckLeavesRunningStatisticsUnchanged() throws {
        let layer = try BatchNorm<Double>(featureCount: 2)
        var g = SeededGenerator(seed: 3)
        let x = try Tensor<Double>.randomNormal(shape: [3, 2], using: &g)
        let before = layer.runningStatistics
        _ = try GradientCheck.run(layer, input: x, outputGradient: x, mode: .training)
        #expect(layer.runningStatistics == before)
    }

    @Test func aWrongGradientIsCaught() throws {
        // The checker must be able to fail: compare a correct gradient with a perturbed one.
        let result = GradientCheck.compare("x", [1, 2, 3], [1, 2, 3.01])
        #expect(result.relativeError > Self.tolerance)
    }
}
