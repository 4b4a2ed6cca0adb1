import NormKernels
import Testing

/// The fast kernels' per-sample column forward (GroupNorm, InstanceNorm, LayerNorm2d
/// channels-last), the sampled shifts (BatchNorm channels-last, LayerNorm) and the
/// storage-order backward of short BatchNorm rows, called directly against
/// ``ReferenceNormKernel`` on awkward sizes and on 1000 + 0.05·noise, and bit-identical on 1, 2
/// and 3 threads.
@Suite("Fast kernel paths against the reference")
struct FastKernelPathTests {
    struct Case: CustomStringConvertible, Sendable {
        var name: String
        var shape: [Int]
        var reduced: [Bool]
        /// (divisor, modulus) of the parameter indexing; nil without γ, β.
        var parameters: (Int, Int)?
        var offset: Float = 0
        var centers = true
        var description: String {
            "\(name) \(shape)\(offset != 0 ? " offset \(offset)" : "")\(centers ? "" : " RMS")"
        }
    }

    static let sizes = [1, 3, 7, 17, 63, 65]

    static let cases: [Case] = {
        var cases: [Case] = []
        for (i, hw) in sizes.enumerated() {
            let n = [1, 3, 2][i % 3]
            let width = [3, 1, 2][i % 3]
            let groups = [1, 3, 7, 17][i % 4]
            let c = groups * width
            // GroupNorm NHWC: [N, HW, G, C/G], reducing HW and the group's channels.
            cases.append(
                Case(
                    name: "groupnorm nhwc", shape: [n, hw, groups, width],
                    reduced: [false, true, false, true], parameters: (1, c)))
            // InstanceNorm NHWC: [N, HW, C].
            cases.append(
                Case(
                    name: "instancenorm nhwc", shape: [n, hw, sizes[(i + 2) % sizes.count]],
                    reduced: [false, true, false], parameters: (1, sizes[(i + 2) % sizes.count])))
            // LayerNorm2d NCHW: [N, C, HW] reducing C, γ along C.
            cases.append(
                Case(
                    name: "layernorm2d nchw", shape: [n, sizes[(i + 1) % sizes.count], hw],
                    reduced: [false, true, false], parameters: (hw, sizes[(i + 1) % sizes.count])))
            // BatchNorm NHWC: [N·H·W, C].
            cases.append(
                Case(
                    name: "batchnorm nhwc", shape: [n * hw, sizes[(i + 3) % sizes.count]],
                    reduced: [true, false], parameters: (1, sizes[(i + 3) % sizes.count])))
            // BatchNorm NCHW: [N, C, H·W], γ per channel (short rows: storage-order backward).
            cases.append(
                Case(
                    name: "batchnorm nchw", shape: [n + 1, sizes[(i + 5) % sizes.count], hw],
                    reduced: [true, false, true], parameters: (hw, sizes[(i + 5) % sizes.count])))
            // LayerNorm: [rows, length], γ per element.
            cases.append(
                Case(
                    name: "layernorm", shape: [n * hw, sizes[(i + 4) % sizes.count]],
                    reduced: [false, true], parameters: (1, sizes[(i + 4) % sizes.count])))
        }
        // Large offset, threaded sizes, no affine, RMS.
        for offset: Float in [0, 1000] {
            cases.append(
                Case(
                    name: "groupnorm nhwc", shape: [4, 65, 8, 8],
                    reduced: [false, true, false, true],
                    parameters: (1, 64), offset: offset))
            cases.append(
                Case(
                    name: "instancenorm nhwc", shape: [3, 1000, 17], reduced: [false, true, false],
                    parameters: nil, offset: offset))
            cases.append(
                Case(
                    name: "batchnorm nhwc", shape: [1000, 65], reduced: [true, false],
                    parameters: (1, 65), offset: offset))
            cases.append(
                Case(
                    name: "layernorm", shape: [67, 1000], reduced: [false, true],
                    parameters: (1, 1000), offset: offset))
            cases.append(
                Case(
                    name: "batchnorm nchw", shape: [300, 65, 7], reduced: [true, false, true],
                    parameters: (7, 65), offset: offset))
            cases.append(
                Case(
                    name: "batchnorm nchw", shape: [64, 17, 49], reduced: [true, false, true],
                    parameters: nil, offset: offset))
        }
        cases.append(
            Case(
                name: "layernorm", shape: [130, 63], reduced: [false, true], parameters: (1, 63),
                centers: false))
        return cases
    }()

    /// Deterministic normal-ish values: the sum of four uniforms, centred and scaled.
    static func values(_ count: Int, seed: UInt64, offset: Float, spread: Float) -> [Float] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        func uniform() -> Float {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Float(state >> 40) / Float(1 << 24)
        }
        return (0..<count).map { _ in
            offset + spread * 1.7 * (uniform() + uniform() + uniform() + uniform() - 2)
        }
    }

    /// max |a − b| / max |b|.
    static func relativeError(_ a: [Float], _ b: [Float]) -> Double {
        let scale = max(b.map { abs(Double($0)) }.max() ?? 0, 1e-30)
        return zip(a, b).map { abs(Double($0) - Double($1)) }.max().map { $0 / scale } ?? 0
    }

    static func relativeError(_ a: [Double], _ b: [Double]) -> Double {
        let scale = max(b.map(abs).max() ?? 0, 1e-30)
        return zip(a, b).map { abs($0 - $1) }.max().map { $0 / scale } ?? 0
    }

    struct Outputs: Equatable {
        var y: [Float]
        var mean: [Double]
        var rstd: [Double]
        var dx: [Float]
        var dgamma: [Double]
        var dbeta: [Double]
    }

    static func fast(
        _ c: Case, plan: ReductionPlan, geometry: FastNormKernel.Geometry, x: [Float], dy: [Float],
        gamma: [Float], beta: [Float], op: ReferenceNormKernel.Operation
    ) -> Outputs {
        let count = x.count
        var y = [Float](repeating: .nan, count: count)
        var dx = [Float](repeating: .nan, count: count)
        var dgamma: [Double] = []
        var dbeta: [Double] = []
        let affine = c.parameters != nil
        let statistics = x.withUnsafeBufferPointer { xp in
            gamma.withUnsafeBufferPointer { gp in
                beta.withUnsafeBufferPointer { bp in
                    y.withUnsafeMutableBufferPointer { yp in
                        FastNormKernel.forwardTraining(
                            xp, geometry: geometry, operation: op, scale: affine ? gp : nil,
                            offset: affine ? bp : nil, into: yp)
                    }
                }
            }
        }
        x.withUnsafeBufferPointer { xp in
            dy.withUnsafeBufferPointer { dyp in
                gamma.withUnsafeBufferPointer { gp in
                    dx.withUnsafeMutableBufferPointer { dxp in
                        FastNormKernel.backward(
                            xp, outputGradient: dyp, geometry: geometry, mean: statistics.mean,
                            rstd: statistics.rstd, operation: op, statisticsAreConstant: false,
                            scale: affine ? gp : nil, parameterCount: affine ? gamma.count : 0,
                            inputGradient: dxp, scaleGradient: &dgamma, offsetGradient: &dbeta)
                    }
                }
            }
        }
        return Outputs(
            y: y, mean: statistics.mean, rstd: statistics.rstd, dx: dx, dgamma: dgamma,
            dbeta: dbeta)
    }

    @Test(arguments: cases)
    func fastEqualsReference(_ c: Case) throws {
        let plan = ReductionPlan(viewShape: c.shape, reduced: c.reduced)
        let indexing = c.parameters.map { ParameterIndexing(divisor: $0.0, modulus: $0.1) }
        // Size-1 axes merge away; some such shapes are not fast geometries (the layers then use
        // the reference kernel): nothing to compare.
        guard let geometry = FastNormKernel.geometry(for: plan, parameters: indexing) else {
            #expect(c.shape.contains(1), "\(c) is not a fast geometry")
            return
        }
        let count = plan.elementCount
        let spread: Float = c.offset == 0 ? 1 : 0.05
        let x = Self.values(count, seed: UInt64(count), offset: c.offset, spread: spread)
        let dy = Self.values(count, seed: UInt64(count) + 7, offset: 0, spread: 1)
        let parameterCount = c.parameters?.1 ?? 0
        let gamma = Self.values(parameterCount, seed: 3, offset: 1, spread: 0.5)
        let beta = Self.values(parameterCount, seed: 4, offset: 0, spread: 0.5)
        let op = ReferenceNormKernel.Operation(centers: c.centers, scales: true, epsilon: 1e-5)

        // The reference, in Double.
        let setIndex = plan.setIndices()
        let moments = x.withUnsafeBufferPointer {
            ReferenceNormKernel.moments(
                $0, setIndex: setIndex, setCount: plan.setCount, operation: op)
        }
        let rstd = ReferenceNormKernel.reciprocalStandardDeviation(
            variance: moments.variance, operation: op)
        var yr = [Float](repeating: 0, count: count)
        var dxr = [Float](repeating: 0, count: count)
        var dgr: [Double] = []
        var dbr: [Double] = []
        let g = c.parameters == nil ? nil : gamma
        let b = c.parameters == nil ? nil : beta
        x.withUnsafeBufferPointer { xp in
            dy.withUnsafeBufferPointer { dyp in
                (g ?? []).withUnsafeBufferPointer { gp in
                    (b ?? []).withUnsafeBufferPointer { bp in
                        yr.withUnsafeMutableBufferPointer { yp in
                            ReferenceNormKernel.forward(
                                xp, setIndex: setIndex, mean: moments.mean, rstd: rstd,
                                scale: g == nil ? nil : gp, offset: b == nil ? nil : bp,
                                parameterIndexing: indexing, into: yp)
                        }
                        dxr.withUnsafeMutableBufferPointer { dxp in
                            ReferenceNormKernel.backward(
                                xp, outputGradient: dyp, setIndex: setIndex,
                                setCount: plan.setCount, mean: moments.mean, rstd: rstd,
                                operation: op, statisticsAreConstant: false,
                                scale: g == nil ? nil : gp, parameterIndexing: indexing,
                                inputGradient: dxp, scaleGradient: &dgr, offsetGradient: &dbr)
                        }
                    }
                }
            }
        }

        var runs: [Outputs] = []
        for threads in [1, 2, 3] {
            Parallelism.$serialCutoffOverride.withValue(threads == 1 ? nil : 0) {
                Parallelism.$threadLimit.withValue(threads) {
                    runs.append(
                        Self.fast(
                            c, plan: plan, geometry: geometry, x: x, dy: dy, gamma: gamma,
                            beta: beta, op: op))
                }
            }
        }
        let fast = runs[0]
        #expect(Self.relativeError(fast.y, yr) < 2e-5, "\(c) y")
        #expect(Self.relativeError(fast.dx, dxr) < 2e-5, "\(c) dx")
        if c.parameters != nil {
            #expect(Self.relativeError(fast.dgamma, dgr) < 2e-5, "\(c) dgamma")
            #expect(Self.relativeError(fast.dbeta, dbr) < 2e-5, "\(c) dbeta")
        }
        // Means within a tiny fraction of a standard deviation, standard deviations to 1e-6.
        let meanError =
            zip(zip(fast.mean, moments.mean), rstd).map { abs($0.0 - $0.1) * $1 }
            .max() ?? 0
        #expect(meanError < 1e-5, "\(c) mean off by \(meanError) standard deviations")
        #expect(
            Self.relativeError(fast.rstd.map { 1 / $0 }, rstd.map { 1 / $0 }) < 1e-6, "\(c) std")
        #expect(runs[1] == runs[0] && runs[2] == runs[0], "\(c): results depend on the threads")
    }

    /// Sets whose sampled rows (the shift estimate reads 16 rows spread evenly) are outliers
    /// still normalize to Double accuracy: the far shift is corrected by a second summation.
    @Test(arguments: [false, true])
    func farShiftIsSummedAgain(_ reduceOuter: Bool) throws {
        let plan = ReductionPlan(
            viewShape: [2, 500, 4], reduced: [reduceOuter, true, false])
        let geometry = try #require(FastNormKernel.geometry(for: plan, parameters: nil))
        let sampled = Set((0..<16).map { $0 * 500 / 16 })
        let noise = Self.values(4000, seed: 11, offset: 0, spread: 0.05)
        let x = (0..<4000).map { sampled.contains(($0 / 4) % 500) ? 5000 : 1000 + noise[$0] }
        let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: 0)
        let moments = x.withUnsafeBufferPointer {
            ReferenceNormKernel.moments(
                $0, setIndex: plan.setIndices(), setCount: plan.setCount, operation: op)
        }
        let out = Self.fast(
            Case(name: "ramp", shape: plan.viewShape, reduced: plan.reduced), plan: plan,
            geometry: geometry, x: x, dy: x, gamma: [], beta: [], op: op)
        let rstd = moments.variance.map { 1 / $0.squareRoot() }
        let meanError =
            zip(zip(out.mean, moments.mean), rstd).map { abs($0.0 - $0.1) * $1 }
            .max() ?? 0
        #expect(meanError < 1e-6)
        #expect(Self.relativeError(out.rstd.map { 1 / ($0 * $0) }, moments.variance) < 1e-6)
    }
}
