import NormKit
import NormTestSupport
import Testing

@testable import Whitening

/// The Float32 instantiation of DBN and IterNorm (Float storage through sgemm/ssyrk) against the
/// Double one (dgemm/dsyrk; the one the fixtures and finite differences check), on awkward
/// sizes, uneven groups, offset data, both modes.
@Suite("Float whitening equals the Double path")
struct FloatWhiteningTests {
    /// Float storage with Double d × d algebra: X_c and the products carry Float rounding
    /// (about 1e-7 relative, times the condition of the whitening on correlated channels; a
    /// group with fewer samples than channels is singular up to ε and is not compared).
    static let tolerance = 2e-4

    struct Case: CustomStringConvertible, Sendable {
        var shape: [Int]
        var group: Int
        var offset = 0.0
        var description: String {
            "\(shape) group \(group)\(offset != 0 ? " offset \(offset)" : "")"
        }
    }

    static let cases: [Case] = [
        Case(shape: [3, 1, 7], group: 1),
        Case(shape: [7, 3, 1], group: 2),
        Case(shape: [1, 7, 17], group: 3),
        Case(shape: [7, 17, 3, 1], group: 8),
        Case(shape: [2, 6, 63], group: 4),
        Case(shape: [5, 4, 65], group: 4, offset: 1000),
        Case(shape: [4, 16, 7, 9], group: 16, offset: 1000),
    ]

    /// Correlated channels: x_c += 0.6·x_{c−1}, plus an offset with 0.05 noise when asked;
    /// rounded to Float so that both paths see the same input (1000 + 0.05·noise loses 6e-4 of
    /// its spread when rounded, which is the input's error, not the kernel's).
    static func data(_ c: Case, seed: UInt64) throws -> Tensor<Double> {
        var x = try WhiteningTests.data(c.shape, seed: seed)
        if c.offset != 0 { x = x.map { c.offset + 0.05 * $0 } }
        return x.converted(to: Float.self).converted(to: Double.self)
    }

    static func expectClose<T: NormScalar>(
        _ a: Tensor<Float>?, _ b: Tensor<T>?, _ label: String, _ c: Case
    ) {
        guard let a, let b else {
            #expect(a == nil && b == nil, "\(c) \(label): presence differs")
            return
        }
        let comparison = Comparison(a.scalars, b.scalars)
        #expect(comparison.relative < tolerance, "\(c) \(label): \(comparison)")
    }

    /// Both instantiations through ``Normalizing`` in training then inference: y, dx, every
    /// parameter gradient by key, and the running mean.
    static func compare(
        _ reference: any Normalizing<Double>, _ fast: any Normalizing<Float>, _ c: Case,
        seed: UInt64
    ) throws {
        let x = try Self.data(c, seed: seed)
        var g = SeededGenerator(seed: seed + 1)
        let dy = try Tensor<Double>.randomNormal(shape: c.shape, using: &g)
        for mode in [Mode.training, .inference] {
            let yr = try reference.normalize(x, mode: mode)
            let yf = try fast.normalize(x.converted(to: Float.self), mode: mode)
            Self.expectClose(yf, yr, "y \(mode)", c)
            let gr = try reference.backward(dy)
            let gf = try fast.backward(dy.converted(to: Float.self))
            Self.expectClose(gf.input, gr.input, "dx \(mode)", c)
            #expect(Set(gf.parameters.keys) == Set(gr.parameters.keys))
            for key in gr.parameters.keys.sorted() {
                Self.expectClose(gf.parameters[key], gr.parameters[key], "d\(key) \(mode)", c)
            }
            Self.expectClose(
                try fast.state()["running_mean"], try reference.state()["running_mean"],
                "running_mean", c)
        }
    }

    @Test(arguments: cases)
    func dbnFloatEqualsDouble(_ c: Case) throws {
        let reference = try DecorrelatedBatchNorm<Double>(
            channelCount: c.shape[1], groupSize: c.group)
        let fast = try DecorrelatedBatchNorm<Float>(channelCount: c.shape[1], groupSize: c.group)
        let gamma = (0..<c.shape[1]).map { 1 + 0.1 * Double($0 % 5) }
        reference.scale = try Tensor(shape: [c.shape[1]], rounding: gamma)
        fast.scale = try Tensor(shape: [c.shape[1]], rounding: gamma)
        try Self.compare(reference, fast, c, seed: 11)
    }

    @Test(arguments: cases)
    func iterNormFloatEqualsDouble(_ c: Case) throws {
        let reference = try IterNorm<Double>(channelCount: c.shape[1], groupSize: c.group)
        let fast = try IterNorm<Float>(channelCount: c.shape[1], groupSize: c.group)
        try Self.compare(reference, fast, c, seed: 21)
    }

    static let switchableCases: [(Case, type: Int)] = [
        (Case(shape: [7, 3, 1], group: 3), 5),
        (Case(shape: [4, 8, 5, 3], group: 4), 5),
        (Case(shape: [3, 6, 7], group: 3), 3),
        (Case(shape: [2, 6, 63], group: 2), 2),
        (Case(shape: [5, 4, 65], group: 4, offset: 1000), 5),
        (Case(shape: [2, 16, 9, 9], group: 16, offset: 1000), 5),
    ]

    @Test(arguments: switchableCases)
    func switchableWhiteningFloatEqualsDouble(_ c: Case, type: Int) throws {
        let reference = try SwitchableWhitening<Double>(
            channelCount: c.shape[1], groupSize: c.group, type: type)
        let fast = try SwitchableWhitening<Float>(
            channelCount: c.shape[1], groupSize: c.group, type: type)
        var g = SeededGenerator(seed: 43)
        let logits = (0..<(2 * type)).map { _ in 0.5 * g.nextNormal() }
        reference.meanLogits = try Tensor(shape: [type], rounding: Array(logits[..<type]))
        reference.varianceLogits = try Tensor(shape: [type], rounding: Array(logits[type...]))
        fast.meanLogits = reference.meanLogits.converted()
        fast.varianceLogits = reference.varianceLogits.converted()
        try Self.compare(reference, fast, c, seed: 41)
    }

    /// Results do not depend on how many threads the groups ran on.
    @Test func floatPathIsThreadIndependent() throws {
        let c = Case(shape: [4, 16, 7, 9], group: 4)
        let x = try Self.data(c, seed: 31).converted(to: Float.self)
        var outputs: [[Float]] = []
        for threads in [1, 2] {
            try Parallelism.$serialCutoffOverride.withValue(0) {
                try Parallelism.$threadLimit.withValue(threads) {
                    let layers: [any Normalizing<Float>] = [
                        try IterNorm<Float>(channelCount: 16, groupSize: 4),
                        try SwitchableWhitening<Float>(channelCount: 16, groupSize: 4),
                    ]
                    var values: [Float] = []
                    for layer in layers {
                        values += try layer.normalize(x, mode: .training).scalars
                        let g = try layer.backward(x)
                        values += g.input.scalars
                        for key in g.parameters.keys.sorted() {
                            values += g.parameters[key]!.scalars
                        }
                    }
                    outputs.append(values)
                }
            }
        }
        #expect(outputs[0] == outputs[1])
    }
}
