import NormKit
import NormTestSupport
import Testing

@testable import Whitening

/// Decorrelated BN and IterNorm: finite differences in Double, whitened covariance, IterNorm's
/// convergence to ZCA, inference.
@Suite("Whitening")
struct WhiteningTests {
    static func data(_ shape: [Int], seed: UInt64) throws -> Tensor<Double> {
        var g = SeededGenerator(seed: seed)
        var x = try Tensor<Double>.randomNormal(shape: shape, using: &g)
        // Correlate the channels: x_c += 0.6·x_{c−1}.
        let (n, c) = (shape[0], shape[1])
        let l = x.count / (n * c)
        for b in 0..<n {
            for ch in 1..<c {
                for s in 0..<l {
                    x[flat: (b * c + ch) * l + s] +=
                        0.6 * x[flat: (b * c + ch - 1) * l + s] + Double(ch)
                }
            }
        }
        return x
    }

    @Test(arguments: [([6, 4, 3], 2), ([5, 3, 2, 2], 3), ([8, 5], 3)])
    func dbnGradientsMatchFiniteDifferences(_ shape: [Int], _ group: Int) throws {
        let x = try Self.data(shape, seed: 1)
        var g = SeededGenerator(seed: 2)
        let layer = try DecorrelatedBatchNorm<Double>(channelCount: shape[1], groupSize: group)
        layer.scale = layer.scale!.map { _ in 1 + 0.3 * g.nextNormal() }
        try Conformance.checkGradients(
            layer, input: x, mode: .training, tolerance: 1e-5, seed: 2, step: 1e-6)
    }

    @Test(arguments: [([6, 4, 3], 4, 5), ([5, 6, 2, 2], 3, 3), ([8, 4], 2, 7)])
    func iterNormGradientsMatchFiniteDifferences(_ shape: [Int], _ group: Int, _ t: Int) throws {
        let x = try Self.data(shape, seed: 3)
        let layer = try IterNorm<Double>(channelCount: shape[1], groupSize: group, iterations: t)
        try Conformance.checkGradients(
            layer, input: x, mode: .training, tolerance: 1e-6, seed: 4, step: 1e-6)
    }

    /// The whitened covariance of each group (over the batch) is the identity, up to ε.
    /// (Plain loops, independent of the layers' BLAS kernels.)
    static func groupCovariances(_ y: Tensor<Double>, group: Int) -> [Matrix] {
        let (n, c) = (y.shape[0], y.shape[1])
        let l = y.count / (n * c)
        let m = Double(n * l)
        return stride(from: 0, to: c, by: group).map { first in
            let rows = (first..<min(c, first + group)).map { ch in
                (0..<n).flatMap { b in (0..<l).map { y[flat: (b * c + ch) * l + $0] } }
            }
            let means = rows.map { $0.reduce(0, +) / m }
            var sigma = Matrix(rows: rows.count, cols: rows.count)
            for i in rows.indices {
                for j in rows.indices {
                    for t in rows[i].indices {
                        sigma[i, j] += (rows[i][t] - means[i]) * (rows[j][t] - means[j]) / m
                    }
                }
            }
            return sigma
        }
    }

    @Test func dbnOutputIsWhite() throws {
        let x = try Self.data([64, 6, 3, 3], seed: 5)
        let layer = try DecorrelatedBatchNorm<Double>(channelCount: 6, groupSize: 3, epsilon: 1e-9)
        let y = try layer.forward(x, mode: .training).output
        for sigma in Self.groupCovariances(y, group: 3) {
            let error = zip(sigma.values, Matrix.identity(3).values).map { abs($0 - $1) }.max() ?? 1
            #expect(error < 1e-6)
        }
    }

    @Test func iterNormTendsToZCA() throws {
        let x = try Self.data([64, 4, 4], seed: 6)
        let zca = try DecorrelatedBatchNorm<Double>(channelCount: 4, groupSize: 4, affine: false)
        let y = try zca.forward(x, mode: .training).output
        var previous = Double.infinity
        for t in [1, 3, 6, 12] {
            let it = try IterNorm<Double>(channelCount: 4, iterations: t, affine: false)
            let distance = Comparison(try it.forward(x, mode: .training).output.scalars, y.scalars)
                .maxAbsolute
            #expect(distance < previous, "T = \(t): \(distance)")
            previous = distance
        }
        #expect(previous < 1e-3)
    }

    @Test func inferenceUsesTheRunningWhiteningMatrix() throws {
        let layer = try IterNorm<Double>(
            channelCount: 3, iterations: 4, momentum: .exponential(weightOfNew: 1))
        let x = try Self.data([16, 3, 2], seed: 7)
        let train = try layer.forward(x, mode: .training).output
        // With weight of new 1 the running estimates are this batch's: inference reproduces it.
        let inference = try layer.forward(x, mode: .inference).output
        #expect(Comparison(inference.scalars, train.scalars).maxAbsolute < 1e-10)
        // Inference is affine: its gradient is Wᵀ dy.
        try Conformance.checkGradients(
            layer, input: x, mode: .inference, tolerance: 1e-8, seed: 8, step: 1e-6)
    }

    /// A NaN in the input makes Σ non-finite: a named error (not a LAPACK failure or NaN
    /// output), and nothing changes.
    @Test func nonFiniteInputIsANamedErrorAndChangesNothing() throws {
        var x = try Self.data([6, 4, 3], seed: 9)
        x[flat: 5] = .nan
        let layers: [any Normalizing<Double>] = [
            try DecorrelatedBatchNorm<Double>(channelCount: 4, groupSize: 2),
            try IterNorm<Double>(channelCount: 4, groupSize: 2),
            try SwitchableWhitening<Double>(channelCount: 4, groupSize: 2),
        ]
        for layer in layers {
            let before = try layer.state()
            #expect(throws: NormError.nonFiniteStatistics(layer: layer.displayName)) {
                _ = try layer.normalize(x, mode: .training)
            }
            #expect(try layer.state() == before, "\(layer.displayName)")
        }
    }

    @Test func badInputIsRefused() throws {
        let layer = try DecorrelatedBatchNorm<Double>(channelCount: 4)
        #expect(throws: NormError.self) {
            _ = try layer.forward(try Tensor(zeros: [2, 3, 2]), mode: .training)
        }
        #expect(throws: NormError.self) {
            _ = try layer.forward(try Tensor(zeros: [1, 4]), mode: .training)
        }
        #expect(throws: NormError.self) { _ = try IterNorm<Double>(channelCount: 4, iterations: 0) }
        #expect(layer.runningMean.scalars == [0, 0, 0, 0])
    }
}

@Suite("Switchable Whitening")
struct SwitchableWhiteningTests {
    @Test(arguments: [(2, [4, 4, 3]), (3, [3, 4, 2, 2]), (5, [4, 4, 5]), (5, [3, 6, 2, 3])])
    func gradientsMatchFiniteDifferences(_ type: Int, _ shape: [Int]) throws {
        let x = try WhiteningTests.data(shape, seed: UInt64(10 + type))
        var g = SeededGenerator(seed: 11)
        let layer = try SwitchableWhitening<Double>(
            channelCount: shape[1], groupSize: shape[1] == 6 ? 3 : 2, type: type, iterations: 4)
        layer.meanLogits = layer.meanLogits.map { _ in g.nextNormal() }
        layer.varianceLogits = layer.varianceLogits.map { _ in g.nextNormal() }
        for mode in [Mode.training, .inference] {
            try Conformance.checkGradients(
                layer, input: x, mode: mode, tolerance: 1e-6, seed: 11, step: 1e-6)
        }
    }

    @Test func typeFiveNeverUsesTheBNAndINVarianceWeights() throws {
        let x = try WhiteningTests.data([4, 4, 3], seed: 20)
        let layer = try SwitchableWhitening<Double>(channelCount: 4, groupSize: 2, type: 5)
        let (_, cache) = try layer.forward(x, mode: .training)
        var g = SeededGenerator(seed: 21)
        let grads = try layer.backward(
            try Tensor.randomNormal(shape: x.shape, using: &g), cache: cache)
        // w′₂ and w′₃ only enter through the softmax normalisation.
        let w = layer.importanceWeights.variance
        let a2 = grads.varianceLogits[flat: 2] / w[2]
        let a3 = grads.varianceLogits[flat: 3] / w[3]
        #expect(abs(a2 - a3) < 1e-12)
    }

    @Test func batchWhiteningAloneWhitensTheBatch() throws {
        let x = try WhiteningTests.data([64, 4, 3], seed: 22)
        let layer = try SwitchableWhitening<Double>(
            channelCount: 4, groupSize: 4, type: 2, iterations: 20, epsilon: 1e-9)
        layer.meanLogits = Tensor([60, 0])
        layer.varianceLogits = Tensor([60, 0])
        let y = try layer.forward(x, mode: .training).output
        for sigma in WhiteningTests.groupCovariances(y, group: 4) {
            let error = zip(sigma.values, Matrix.identity(4).values).map { abs($0 - $1) }.max() ?? 1
            #expect(error < 1e-3, "\(error)")
        }
    }
}

/// An empty batch behaves as PyTorch's BatchNorm does (checked with torch.nn.BatchNorm1d on
/// (0, 4, 3), (2, 4, 0) and (0, 4)): an empty output of the input's shape, running statistics
/// untouched, an empty dx and zero parameter gradients.
@Suite("Whitening empty batches")
struct WhiteningEmptyBatchTests {
    static func layers<T: NormScalar>(_: T.Type) throws -> [any Normalizing<T>] {
        [
            try DecorrelatedBatchNorm<T>(channelCount: 4, groupSize: 3),
            try IterNorm<T>(channelCount: 4, groupSize: 2),
            try SwitchableWhitening<T>(channelCount: 4, groupSize: 2, type: 5),
            try SwitchableWhitening<T>(channelCount: 4, groupSize: 4, type: 2),
        ]
    }

    static func check<T: NormScalar>(_: T.Type) throws {
        for layer in try layers(T.self) {
            // A real batch first, so that the running statistics are not their initial values.
            _ = try layer.normalize(
                try WhiteningTests.data([5, 4, 3], seed: 40).converted(), mode: .training)
            for shape in [[0, 4, 3], [2, 4, 0], [0, 4], [0, 4, 2, 2]] {
                for mode in Mode.allCases {
                    let before = try layer.state()
                    let y = try layer.normalize(try Tensor<T>(zeros: shape), mode: mode)
                    #expect(y.shape == shape, "\(layer.displayName) \(shape) \(mode)")
                    #expect(try layer.state() == before, "\(layer.displayName) \(mode): state")
                    let g = try layer.backward(try Tensor<T>(zeros: shape))
                    #expect(g.input.shape == shape)
                    #expect(Set(g.parameters.keys) == Set(layer.parameters.keys))
                    for (key, value) in g.parameters {
                        #expect(value.shape == layer.parameters[key]?.shape)
                        #expect(
                            value.scalars.allSatisfy { $0 == 0 }, "\(layer.displayName) d\(key)")
                    }
                }
            }
        }
    }

    @Test func emptyBatchesGiveEmptyOutputsAndZeroGradients() throws {
        try Self.check(Float.self)
        try Self.check(Double.self)
    }

    @Test func anEmptyBatchStillChecksTheChannelCount() throws {
        let layer = try IterNorm<Double>(channelCount: 4)
        #expect(
            throws: NormError.channelMismatch(
                layer: "IterNorm", expected: 4, actual: 3, shape: [0, 3])
        ) {
            _ = try layer.forward(try Tensor(zeros: [0, 3]), mode: .training)
        }
    }

    /// After an empty batch a real one gives what it gives alone (nothing was cached or moved).
    @Test func anEmptyBatchThenARealOneMatchesARealOneAlone() throws {
        let x = try WhiteningTests.data([6, 4, 3], seed: 41)
        for (a, b) in [
            (
                try DecorrelatedBatchNorm<Double>(channelCount: 4) as any Normalizing<Double>,
                try DecorrelatedBatchNorm<Double>(channelCount: 4) as any Normalizing<Double>
            ),
            (
                try SwitchableWhitening<Double>(channelCount: 4, groupSize: 2),
                try SwitchableWhitening<Double>(channelCount: 4, groupSize: 2)
            ),
        ] {
            _ = try a.normalize(try Tensor(zeros: [0, 4, 3]), mode: .training)
            #expect(try a.normalize(x, mode: .training) == b.normalize(x, mode: .training))
            #expect(try a.state() == b.state())
        }
    }
}
