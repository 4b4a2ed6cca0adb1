import Foundation
import NormKit
import Testing

@testable import Training

/// NaN or infinite values on their way to LAPACK: typed errors that name the problem (LAPACKE
/// answers a NaN matrix with info −5, which read like a bad leading dimension), and no state
/// changed by a refused refresh.
@Suite("Divergence and LAPACK input")
struct DivergenceTests {
    @Test func theEigendecompositionRefusesWhatLAPACKCannotTake() throws {
        var nan = Matrix.identity(3)
        nan[1, 2] = .nan
        nan[2, 1] = .nan
        #expect(throws: LinearAlgebraError.nonFinite(routine: "dsyev")) {
            try nan.symmetricEigen()
        }
        var infinite = Matrix.identity(2)
        infinite[0, 0] = .infinity
        #expect(throws: LinearAlgebraError.nonFinite(routine: "dsyev")) {
            try infinite.symmetricEigen()
        }
        #expect(throws: LinearAlgebraError.invalidDimensions(routine: "dsyev", rows: 2, cols: 3)) {
            try Matrix(rows: 2, cols: 3).symmetricEigen()
        }
        let empty = try Matrix(rows: 0, cols: 0).symmetricEigen()
        #expect(empty.values.isEmpty && empty.vectors.rows == 0)
        let (values, vectors) = try Matrix(rows: 2, cols: 2, values: [2, 1, 1, 2]).symmetricEigen()
        #expect(abs(values[0] - 1) < 1e-12 && abs(values[1] - 3) < 1e-12)
        #expect(abs(abs(vectors[0, 1]) - 0.5.squareRoot()) < 1e-12)
        #expect(
            "\(LinearAlgebraError.nonFinite(routine: "dsyev"))"
                == "dsyev: the matrix has NaN or infinite entries")
    }

    /// A NaN input on a refresh step is ``TrainingError/diverged(layer:what:)`` naming the layer,
    /// and the layer's parameters, whitening and step are as before.
    @Test(arguments: WhitenedLayerKind.allCases)
    func aNaNInputOnARefreshIsTypedAndChangesNothing(_ kind: WhitenedLayerKind) throws {
        var g = SeededGenerator(seed: 8)
        let layer = try WhitenedLinear<Double>(
            4, 3, settings: WhiteningSettings(kind: kind, period: 2), name: "fc", generator: &g)
        var values = (0..<20).map { Double($0 % 7) - 2.5 + 0.1 * Double($0) }
        values[5] = .nan
        let x = try Tensor<Double>(shape: [5, 4], scalars: values)
        let parameters = layer.parameters.map(\.value)
        let buffers = layer.buffers
        #expect(
            throws: TrainingError.diverged(layer: "fc", what: "the input of a whitening refresh")
        ) { try layer.forward(x, mode: .training) }
        #expect(layer.parameters.map(\.value) == parameters)
        #expect(layer.buffers == buffers)
        let message = "\(TrainingError.diverged(layer: "fc", what: "the weight W"))"
        #expect(message.contains("fc") && message.contains("smaller learning rate"))
    }

    /// EigenNet's gradient whitening refuses a NaN output gradient the same way.
    @Test func aNaNOutputGradientOnARefreshIsTyped() throws {
        var g = SeededGenerator(seed: 9)
        let layer = try WhitenedLinear<Double>(
            4, 3, settings: WhiteningSettings(kind: .eigennet, period: 2), name: "fc",
            generator: &g)
        let x = try Tensor<Double>(
            shape: [5, 4], scalars: (0..<20).map { Double(($0 * 5) % 11) - 4 })
        _ = try layer.forward(x, mode: .training)
        var dy = [Double](repeating: 0.1, count: 15)
        dy[4] = .infinity
        let s = layer.core.gradientWhitening
        #expect(
            throws: TrainingError.diverged(
                layer: "fc", what: "the output gradient of a whitening refresh")
        ) { try layer.backward(Tensor(shape: [5, 3], scalars: dy)) }
        #expect(layer.core.gradientWhitening == s)
    }
}
