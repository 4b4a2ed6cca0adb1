import TensorCore
import Testing

@Suite("Tensor")
struct TensorTests {
    @Test func shapesAndCountsMustAgree() throws {
        #expect(throws: TensorError.countMismatch(shape: [2, 3], count: 5)) {
            _ = try Tensor<Float>(shape: [2, 3], scalars: [1, 2, 3, 4, 5])
        }
        #expect(throws: TensorError.negativeDimension(shape: [2, -1])) {
            _ = try Tensor<Float>(zeros: [2, -1])
        }
        #expect(throws: TensorError.shapeOverflow(shape: [Int.max, 2])) {
            _ = try Tensor<Float>(zeros: [Int.max, 2])
        }
        let scalar = try Tensor<Double>(shape: [], scalars: [3])
        #expect(scalar.rank == 0 && scalar.count == 1)
    }

    @Test func valueSemantics() throws {
        let a = try Tensor<Float>(shape: [2, 2], scalars: [1, 2, 3, 4])
        var b = a
        b[1, 0] = 9
        #expect(a[1, 0] == 3)
        #expect(b[1, 0] == 9)
        #expect(b[flat: 2] == 9)
    }

    @Test func reshapeKeepsOrder() throws {
        let a = try Tensor<Double>(shape: [2, 3], scalars: [0, 1, 2, 3, 4, 5])
        let b = try a.reshaped([3, 2])
        #expect(b[2, 1] == 5 && b[1, 0] == 2)
        #expect(throws: TensorError.self) { _ = try a.reshaped([4]) }
    }

    @Test func stridesAreRowMajor() {
        #expect(Shape.strides([2, 3, 4]) == [12, 4, 1])
        #expect(Shape.strides([]) == [])
    }

    @Test func layoutsPlaceTheChannelAxis() {
        #expect(Layout.channelsFirst.channelAxis(rank: 4) == 1)
        #expect(Layout.channelsLast.channelAxis(rank: 4) == 3)
        #expect(Layout.channelsLast.spatialAxes(rank: 4) == [1, 2])
        #expect(Layout.channelsFirst.spatialAxes(rank: 5) == [2, 3, 4])
        #expect(Layout.channelsLast.channelAxis(rank: 2) == 1)
    }

    @Test func seededGeneratorIsReproducibleAndRoughlyNormal() throws {
        var g1 = SeededGenerator(seed: 5)
        var g2 = SeededGenerator(seed: 5)
        let a = try Tensor<Double>.randomNormal(shape: [10_000], using: &g1)
        let b = try Tensor<Double>.randomNormal(shape: [10_000], using: &g2)
        #expect(a == b)
        let mean = a.scalars.reduce(0, +) / 10_000
        let variance = a.scalars.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / 10_000
        #expect(abs(mean) < 0.05 && abs(variance - 1) < 0.05)
    }

    @Test func conversionRoundsToNearest() {
        let d = Tensor<Double>([1.0 / 3.0])
        #expect(d.converted(to: Float.self).scalars == [Float(1.0 / 3.0)])
    }
}
