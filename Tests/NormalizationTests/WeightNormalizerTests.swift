import Foundation
import NormKit
import NormTestSupport
import Testing

/// Weight Norm, Centered Weight Norm, Weight Standardization and Spectral Norm as
/// parametrizations of a weight tensor: PyTorch's numbers, finite differences, properties and
/// bad input.
@Suite("Weight parametrizations")
struct WeightNormalizerTests {
    /// float64 against float64 PyTorch: only summation order differs (worst measured 1.6e-13).
    static let doubleTolerance = 1e-10
    /// Float against float64 PyTorch: the statistics accumulate in Double, so only the final
    /// rounding to Float remains (worst measured 7.2e-8).
    static let floatTolerance = 1e-5

    /// Replays a fixture through the parametrization alone: earlier training calls, the final
    /// call's weight, its backward from PyTorch's dL/dW, and the state afterwards.
    func replay<T: NormScalar>(_ name: String, as _: T.Type, tolerance: Double) throws {
        let f = try WeightFixture(name)
        let p: any WeightParametrization<T> = try f.makeParametrization()
        for _ in 0..<f.steps { _ = try p.weight(mode: .training) }
        let w = try p.weight(mode: f.isEval ? .inference : .training)
        var checks: [(String, Tensor<T>, Tensor<Double>)] = [
            ("weight", w, f.raw.tensor("weight.eff"))
        ]
        let grads = try p.backward(f.raw.tensor("dweight.eff", as: T.self))
        let expectedGrads: [String: Tensor<Double>] = f.state("grad/")
        for (key, expected) in expectedGrads where key != "bias" {
            let got = try #require(grads[f.libraryKey(key, in: p)], "no gradient for \(key)")
            checks.append(("d" + key, got, expected))
        }
        #expect(grads.count == expectedGrads.count - 1, "gradient keys \(grads.keys.sorted())")
        let after = p.state().tensors
        let expectedAfter: [String: Tensor<Double>] = f.state("out/")
        for (key, expected) in expectedAfter where key != "bias" {
            let got = try #require(after[f.libraryKey(key, in: p)], "no state \(key)")
            checks.append(("out " + key, got, expected))
        }
        #expect(after.count == expectedAfter.count - 1, "state keys \(after.keys.sorted())")
        for (label, got, expected) in checks {
            #expect(got.shape == expected.shape, "\(name) \(label) shape")
            let c = Comparison(got.scalars, expected.scalars)
            #expect(c.relative < tolerance, "\(name) \(label): \(c)")
        }
    }

    @Test(arguments: WeightFixture.names)
    func matchesPyTorchInDouble(_ name: String) throws {
        try replay(name, as: Double.self, tolerance: Self.doubleTolerance)
    }

    @Test(arguments: WeightFixture.names)
    func matchesPyTorchInFloat(_ name: String) throws {
        try replay(name, as: Float.self, tolerance: Self.floatTolerance)
    }

    // MARK: - Finite differences

    /// Every method on two weight shapes, with the options that change the arithmetic.
    static let gradientCases: [(String, WeightNormMethod, WeightNormMethod.Options, [Int])] = {
        var out: [(String, WeightNormMethod, WeightNormMethod.Options, [Int])] = []
        for shape in [[3, 4], [2, 3, 2, 2]] {
            var o = WeightNormMethod.Options()
            out.append(("wn dim 0", .wn, o, shape))
            o.dim = nil
            out.append(("wn whole", .wn, o, shape))
            o.dim = 1
            out.append(("wn dim 1", .wn, o, shape))
            o = .init()
            out.append(("cwn", .cwn, o, shape))
            o.learnableScale = true
            out.append(("cwn learnable", .cwn, o, shape))
            o = .init()
            out.append(("ws", .ws, o, shape))
            out.append(("ws-bit", .wsBiT, o, shape))
            o.epsilon = 0.3  // a large ε makes its placement visible in the gradient
            out.append(("ws ε 0.3", .ws, o, shape))
            out.append(("ws-bit ε 0.3", .wsBiT, o, shape))
            o = .init()
            out.append(("sn", .sn, o, shape))
            o.dim = 1
            out.append(("sn dim 1", .sn, o, shape))
            o.dim = 0
            o.legacySpectralNorm = true
            out.append(("sn legacy", .sn, o, shape))
        }
        return out
    }()

    /// Central differences of L = Σ W(θ) ⊙ R into every parameter, in inference mode (spectral
    /// norm's u and v fixed, which is what PyTorch's gradient assumes in every mode).
    @Test(arguments: 0..<gradientCases.count)
    func gradientsMatchFiniteDifferences(_ index: Int) throws {
        let (label, method, options, shape) = Self.gradientCases[index]
        var g = SeededGenerator(seed: UInt64(100 + index))
        let weight = try Tensor<Double>.randomNormal(shape: shape, using: &g)
        let p = try method.make(weight: weight, options: options)
        // Move every parameter off its initial value (g = ‖v‖ would hide errors in dg).
        var moved: [String: Tensor<Double>] = [:]
        for (key, value) in p.parameters {
            moved[key] = try Tensor(
                shape: value.shape,
                scalars: value.scalars.map {
                    $0 * (1 + 0.3 * g.nextNormal()) + 0.1 * g.nextNormal()
                }
            )
        }
        try p.setParameters(moved)
        let r = try Tensor<Double>.randomNormal(shape: shape, using: &g)
        func loss() throws -> Double {
            zip(try p.weight(mode: .inference).scalars, r.scalars).reduce(0) { $0 + $1.0 * $1.1 }
        }
        _ = try p.weight(mode: .inference)
        let analytic = try p.backward(r)
        #expect(Set(analytic.keys) == Set(p.parameters.keys), "\(label) gradient keys")
        let h = 1e-6
        for (key, value) in p.parameters {
            var worst = 0.0
            for i in 0..<value.count {
                var plus = value
                plus[flat: i] += h
                try p.setParameters([key: plus])
                let lp = try loss()
                var minus = value
                minus[flat: i] -= h
                try p.setParameters([key: minus])
                let lm = try loss()
                try p.setParameters([key: value])
                let numeric = (lp - lm) / (2 * h)
                let a = try #require(analytic[key])[flat: i]
                worst = max(worst, abs(a - numeric) / max(1, abs(numeric)))
            }
            // Central differences with h = 1e-6 in Double: truncation ~h², rounding ~1e-16/h.
            #expect(worst < 1e-7, "\(label) \(shape) d\(key): worst relative error \(worst)")
        }
    }

    // MARK: - Properties

    @Test func weightNormRowsHaveNormG() throws {
        var g = SeededGenerator(seed: 7)
        let v = try Tensor<Double>.randomNormal(shape: [4, 3, 2, 2], using: &g)
        let magnitude = try Tensor<Double>(shape: [4, 1, 1, 1], scalars: [0.5, 2, 3, 0.25])
        let wn = try WeightNorm(magnitude: magnitude, direction: v)
        let w = try wn.weight(mode: .training)
        for o in 0..<4 {
            let norm = w.scalars[(o * 12)..<((o + 1) * 12)].reduce(0) { $0 + $1 * $1 }.squareRoot()
            #expect(abs(norm - magnitude.scalars[o]) < 1e-12)
        }
        // Registration leaves the layer unchanged: g = ‖w‖, v = w, so W = w.
        let fresh = try WeightNorm(weight: v, dim: nil)
        #expect(
            Comparison(try fresh.weight(mode: .training).scalars, v.scalars).maxAbsolute < 1e-14)
    }

    @Test(arguments: WeightStandardization<Double>.Convention.allCases)
    func standardizedFiltersHaveMeanZeroAndVarianceOne(
        _ convention: WeightStandardization<Double>.Convention
    ) throws {
        var g = SeededGenerator(seed: 8)
        // Weights far from zero: the two-pass statistics must still standardize them.
        let v = try Tensor<Double>.randomNormal(
            shape: [5, 3, 3, 3], mean: 1000, standardDeviation: 0.05, using: &g)
        let ws = try WeightStandardization(weight: v, convention: convention, epsilon: 0)
        let w = try ws.weight(mode: .training)
        for o in 0..<5 {
            let filter = w.scalars[(o * 27)..<((o + 1) * 27)]
            let mean = filter.reduce(0, +) / 27
            let squares = filter.reduce(0) { $0 + ($1 - mean) * ($1 - mean) }
            let variance = squares / (convention == .official ? 26 : 27)
            #expect(
                abs(mean) < 1e-9 && abs(variance - 1) < 1e-9, "filter \(o): \(mean), \(variance)")
        }
    }

    /// The largest singular value of a row-major [h, w] matrix, by many power iterations on
    /// MᵀM (independent of the layer's own u and v).
    static func largestSingularValue(_ m: [Double], rows h: Int, cols w: Int) -> Double {
        var v = (0..<w).map { Double($0 % 3) + 1 }
        var sigma = 0.0
        for _ in 0..<2000 {
            let mv = (0..<h).map { r in (0..<w).reduce(0) { $0 + m[r * w + $1] * v[$1] } }
            var mtmv = [Double](repeating: 0, count: w)
            for r in 0..<h { for j in 0..<w { mtmv[j] += m[r * w + j] * mv[r] } }
            let norm = mtmv.reduce(0) { $0 + $1 * $1 }.squareRoot()
            v = mtmv.map { $0 / norm }
            sigma = norm.squareRoot()
        }
        return sigma
    }

    @Test(arguments: [SpectralNorm<Double>.Order.uFirst, .vFirst])
    func spectralNormConvergesToUnitSigma(_ order: SpectralNorm<Double>.Order) throws {
        var g = SeededGenerator(seed: 9)
        let weight = try Tensor<Double>.randomNormal(shape: [6, 2, 2, 2], using: &g)
        let sn = try SpectralNorm(weight: weight, order: order, seed: 3)
        let before = Self.largestSingularValue(weight.scalars, rows: 6, cols: 8)
        var w = weight
        for _ in 0..<300 { w = try sn.weight(mode: .training) }
        #expect(abs(Self.largestSingularValue(w.scalars, rows: 6, cols: 8) - 1) < 1e-8)
        #expect(abs(try #require(sn.lastSigma) - before) < 1e-8 * before)
        // Inference reuses u and v: the same weight again, and the buffers do not move.
        let buffers = sn.buffers
        #expect(try sn.weight(mode: .inference) == w)
        #expect(sn.buffers == buffers)
    }

    @Test func oneDimensionalWeightIsJustNormalized() throws {
        let v = Tensor<Double>([3, 0, 4])
        let sn = try SpectralNorm(weight: v)
        #expect(sn.buffers.isEmpty)
        #expect(try sn.weight(mode: .training).scalars == [0.6, 0, 0.8])
    }

    @Test func seededStartIsReproducible() throws {
        var g = SeededGenerator(seed: 10)
        let weight = try Tensor<Double>.randomNormal(shape: [4, 5], using: &g)
        let a = try SpectralNorm(weight: weight, seed: 5)
        let b = try SpectralNorm(weight: weight, seed: 5)
        let c = try SpectralNorm(weight: weight, seed: 6)
        #expect(a.buffers == b.buffers)
        #expect(a.buffers != c.buffers)
    }

    // MARK: - Bad input

    @Test func zeroRowOfWeightNormIsRefused() throws {
        let v = try Tensor<Double>(shape: [2, 3], scalars: [1, 2, 3, 0, 0, 0])
        let wn = try WeightNorm(weight: v)
        #expect(
            throws: WeightNormError.zeroNorm(
                method: "WeightNorm", parameter: WeightNorm<Double>.directionKey, row: 1,
                shape: [2, 3])
        ) { try wn.weight(mode: .training) }
        let whole = try WeightNorm(weight: try Tensor<Double>(zeros: [2, 3]), dim: nil)
        #expect(throws: WeightNormError.self) { try whole.weight(mode: .training) }
    }

    @Test func constantRowOfCenteredWeightNormFollowsEpsilon() throws {
        let v = try Tensor<Double>(shape: [2, 3], scalars: [1, 2, 3, 5, 5, 5])
        // The official ε keeps a constant row finite: it becomes 0.
        let w = try CenteredWeightNorm(weight: v).weight(mode: .training)
        #expect(w.isFinite && Array(w.scalars[3...]) == [0, 0, 0])
        let exact = try CenteredWeightNorm(weight: v, epsilon: 0)
        #expect(throws: WeightNormError.self) { try exact.weight(mode: .training) }
    }

    @Test func unbiasedStandardizationOnFanInOneIsRefused() throws {
        let v = try Tensor<Double>(shape: [3, 1, 1, 1], scalars: [1, 2, 3])
        #expect(
            throws: WeightNormError.noVariance(
                method: "WeightStandardization",
                parameter: WeightStandardization<Double>.originalKey, fanIn: 1, shape: [3, 1, 1, 1])
        ) { try WeightStandardization(weight: v, convention: .official) }
        // BiT's biased variance is 0 there, and ε inside the root keeps w = 0.
        let bit = try WeightStandardization(weight: v, convention: .bit)
        #expect(try bit.weight(mode: .training).scalars == [0, 0, 0])
    }

    @Test func dimOutOfRangeIsRefused() throws {
        let v = try Tensor<Double>(zeros: [2, 3])
        #expect(
            throws: WeightNormError.dimensionOutOfRange(
                method: "WeightNorm", dim: 2, shape: [2, 3])
        ) {
            try WeightNorm(weight: v, dim: 2)
        }
        #expect(
            throws: WeightNormError.dimensionOutOfRange(
                method: "SpectralNorm", dim: -1, shape: [2, 3])
        ) {
            try SpectralNorm(weight: v, dim: -1)
        }
    }

    @Test func zeroDimensionIsRefused() throws {
        let v = try Tensor<Double>(zeros: [0, 3])
        for method in WeightNormMethod.allCases {
            #expect(throws: WeightNormError.self, "\(method)") { try method.make(weight: v) }
        }
    }

    @Test func zeroSpectralNormIsRefusedAndBuffersKept() throws {
        var g = SeededGenerator(seed: 11)
        let sn = try SpectralNorm(
            weight: try Tensor<Double>.randomNormal(shape: [3, 4], using: &g))
        let buffers = sn.buffers
        try sn.setParameters([sn.originalKey: try Tensor(zeros: [3, 4])])
        #expect(throws: WeightNormError.self) { try sn.weight(mode: .training) }
        #expect(sn.buffers == buffers)
    }

    @Test func wrongShapesOnLoadAreRefusedAndNothingChanges() throws {
        var g = SeededGenerator(seed: 12)
        let weight = try Tensor<Double>.randomNormal(shape: [4, 3, 2, 2], using: &g)
        let wn = try WeightNorm(weight: weight)
        let before = wn.state()
        let badG = try Tensor<Double>(zeros: [4])
        #expect(
            throws: NormError.parameterShapeMismatch(
                name: "weight_g", expected: [4, 1, 1, 1], actual: [4])
        ) {
            try wn.load(NormState(tensors: ["weight_v": weight.map { $0 * 2 }, "weight_g": badG]))
        }
        #expect(wn.state() == before)
        // The legacy names load when their shapes are right.
        try wn.load(NormState(tensors: ["weight_v": weight.map { $0 * 2 }]))
        #expect(wn.direction == weight.map { $0 * 2 })

        let sn = try SpectralNorm(weight: weight)
        let snBefore = sn.state()
        #expect(
            throws: NormError.parameterShapeMismatch(
                name: sn.uKey, expected: [4], actual: [5])
        ) {
            try sn.load(
                NormState(tensors: [
                    sn.originalKey: weight.map { $0 + 1 }, sn.uKey: try Tensor(zeros: [5]),
                ]))
        }
        #expect(sn.state() == snBefore)
        #expect(throws: NormError.self) {
            try sn.load(NormState(tensors: ["weight_u": try Tensor(zeros: [4])]))
        }
    }
}
