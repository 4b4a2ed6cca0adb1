import CNormSIMD
import Testing

@testable import NormKernels

/// The fast kernels' inner loops against the same formulas in Double.
///
/// `Span`'s loops and the AVX2 + FMA column loops of `CNormSIMD`, on awkward lengths and on pointers that are not 32-byte
/// aligned, with plain and non-temporal stores. On an AVX2 machine this checks the C loops; CI
/// runs it again with `NORMKIT_SIMD=baseline`, which checks the portable Swift loops.
@Suite("SIMD inner loops against Double formulas")
struct SIMDLoopTests {
    static let lengths = [1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 65, 2047, 2049, 4100]

    /// Deterministic values around `centre` (a small linear congruential generator).
    static func values(_ n: Int, seed: UInt64, centre: Float = 0) -> [Float] {
        var state = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return (0..<n).map { _ in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return centre + Float(Int64(bitPattern: state >> 11) % 2000) / 1000 - 1
        }
    }

    static func close(_ a: Float, _ b: Double, scale: Double = 1) -> Bool {
        abs(Double(a) - b) <= 2e-6 * max(scale, abs(b))
    }

    @Test("affine, elementwise and gradient writes", arguments: lengths)
    func writes(n: Int) {
        for offset in 0..<4 {
            for stream in [false, true] {
                let x = Self.values(n + offset, seed: UInt64(n), centre: 1000)
                let dy = Self.values(n + offset, seed: UInt64(n) + 1)
                let gamma = Self.values(n + offset, seed: UInt64(n) + 2)
                let beta = Self.values(n + offset, seed: UInt64(n) + 3)
                var y = [Float](repeating: .nan, count: n + offset + 1)
                let (s, a, b, c): (Float, Float, Float, Float) = (1000, 1.5, -0.25, 0.125)
                x.withUnsafeBufferPointer { xp in
                    y.withUnsafeMutableBufferPointer { yp in
                        Span.affine(
                            xp.baseAddress! + offset, yp.baseAddress! + offset, n, shift: s,
                            scale: a, offset: b, stream: stream)
                    }
                }
                for i in 0..<n {
                    let want = (Double(x[i + offset]) - Double(s)) * Double(a) + Double(b)
                    #expect(Self.close(y[i + offset], want), "affine n=\(n) i=\(i)")
                }
                #expect(y[n + offset].isNaN, "affine wrote past the end")
                for useGamma in [false, true] {
                    y = [Float](repeating: .nan, count: n + offset + 1)
                    x.withUnsafeBufferPointer { xp in
                        gamma.withUnsafeBufferPointer { gp in
                            beta.withUnsafeBufferPointer { bp in
                                y.withUnsafeMutableBufferPointer { yp in
                                    Span.elementwise(
                                        xp.baseAddress! + offset, yp.baseAddress! + offset, n,
                                        shift: s, rstd: a, term: b,
                                        gamma: useGamma ? gp.baseAddress! + offset : nil,
                                        beta: useGamma ? bp.baseAddress! + offset : nil,
                                        stream: stream)
                                }
                            }
                        }
                    }
                    for i in 0..<n {
                        var want = (Double(x[i + offset]) - Double(s)) * Double(a) + Double(b)
                        if useGamma {
                            want = want * Double(gamma[i + offset]) + Double(beta[i + offset])
                        }
                        #expect(Self.close(y[i + offset], want), "elementwise n=\(n) i=\(i)")
                    }
                    #expect(y[n + offset].isNaN, "elementwise wrote past the end")
                    y = [Float](repeating: .nan, count: n + offset + 1)
                    x.withUnsafeBufferPointer { xp in
                        dy.withUnsafeBufferPointer { dp in
                            gamma.withUnsafeBufferPointer { gp in
                                y.withUnsafeMutableBufferPointer { yp in
                                    Span.gradient(
                                        xp.baseAddress! + offset, dp.baseAddress! + offset,
                                        yp.baseAddress! + offset, n, shift: s, a: a, b: b, c: c,
                                        gamma: useGamma ? gp.baseAddress! + offset : nil,
                                        stream: stream)
                                }
                            }
                        }
                    }
                    for i in 0..<n {
                        let g = Double(dy[i + offset]) * (useGamma ? Double(gamma[i + offset]) : 1)
                        let want =
                            g * Double(a) + (Double(x[i + offset]) - Double(s)) * Double(b)
                            + Double(c)
                        #expect(Self.close(y[i + offset], want), "gradient n=\(n) i=\(i)")
                    }
                    #expect(y[n + offset].isNaN, "gradient wrote past the end")
                }
            }
        }
    }

    @Test("shifted sums and gradient sums", arguments: lengths)
    func sums(n: Int) {
        let x = Self.values(n, seed: UInt64(n) + 10, centre: 1000)
        let dy = Self.values(n, seed: UInt64(n) + 11)
        let gamma = Self.values(n, seed: UInt64(n) + 12)
        let s: Float = 1000
        let (r, t): (Float, Float) = (2, 0.5)
        let d = x.map { Double($0) - Double(s) }
        var dgamma = [Float](repeating: 0.25, count: n)
        var dbeta = [Float](repeating: -0.5, count: n)
        x.withUnsafeBufferPointer { xp in
            dy.withUnsafeBufferPointer { dp in
                gamma.withUnsafeBufferPointer { gp in
                    let (s1, s2) = Span.shiftedSums(xp.baseAddress!, n, shift: s)
                    let w1 = d.reduce(0, +)
                    let w2 = d.reduce(0) { $0 + $1 * $1 }
                    #expect(abs(s1 - w1) <= 1e-5 * Double(n), "Σ(x − s) n=\(n)")
                    #expect(abs(s2 - w2) <= 1e-5 * max(1, w2), "Σ(x − s)² n=\(n)")
                    let (g1, g2) = Span.gradientSums(xp.baseAddress!, dp.baseAddress!, n, shift: s)
                    let v1 = dy.reduce(0.0) { $0 + Double($1) }
                    let v2 = zip(dy, d).reduce(0.0) { $0 + Double($1.0) * $1.1 }
                    #expect(abs(g1 - v1) <= 1e-5 * Double(n), "Σ dy n=\(n)")
                    #expect(abs(g2 - v2) <= 1e-5 * Double(n), "Σ dy·(x − s) n=\(n)")
                    let (e1, e2) = dgamma.withUnsafeMutableBufferPointer { dg in
                        dbeta.withUnsafeMutableBufferPointer { db in
                            Span.elementwiseGradientSums(
                                xp.baseAddress!, dp.baseAddress!, n, shift: s, rstd: r, term: t,
                                gamma: gp.baseAddress!, dgamma: dg.baseAddress!,
                                dbeta: db.baseAddress!)
                        }
                    }
                    let u1 = zip(dy, gamma).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
                    var u2 = 0.0
                    for i in 0..<n { u2 += Double(dy[i]) * Double(gamma[i]) * d[i] }
                    #expect(abs(e1 - u1) <= 1e-5 * Double(n), "Σ dy·γ n=\(n)")
                    #expect(abs(e2 - u2) <= 1e-5 * Double(n), "Σ dy·γ·(x − s) n=\(n)")
                }
            }
        }
        for i in 0..<n {
            let xhat = d[i] * Double(r) + Double(t)
            #expect(Self.close(dgamma[i], 0.25 + Double(dy[i]) * xhat, scale: 4), "dγ n=\(n)")
            #expect(Self.close(dbeta[i], -0.5 + Double(dy[i])), "dβ n=\(n)")
        }
    }

    @Test("column accumulation", arguments: lengths)
    func columnAccumulate(n: Int) {
        let x = Self.values(n, seed: UInt64(n) + 20, centre: 1000)
        let dy = Self.values(n, seed: UInt64(n) + 21)
        let shift = Self.values(n, seed: UInt64(n) + 22, centre: 1000)
        let rstd = Self.values(n, seed: UInt64(n) + 23, centre: 2)
        let term = Self.values(n, seed: UInt64(n) + 24)
        let gamma: Float = 0.75
        var sums = [Float](repeating: 1, count: n)
        var products = [Float](repeating: -1, count: n)
        let (rowX, rowD) = sums.withUnsafeMutableBufferPointer { sp in
            products.withUnsafeMutableBufferPointer { pp in
                Span.columnAccumulate(
                    x, dy, n, shift: shift, rstd: rstd, term: term, gamma: gamma,
                    sums: sp.baseAddress!, products: pp.baseAddress!, rowSums: true)
            }
        }
        var wantX = 0.0
        var wantD = 0.0
        for i in 0..<n {
            let d = Double(x[i]) - Double(shift[i])
            let g = Double(dy[i]) * Double(gamma)
            #expect(Self.close(sums[i], 1 + g), "sums n=\(n) i=\(i)")
            #expect(Self.close(products[i], -1 + g * d, scale: 4), "products n=\(n) i=\(i)")
            wantX += Double(dy[i]) * (d * Double(rstd[i]) + Double(term[i]))
            wantD += Double(dy[i])
        }
        #expect(abs(Double(rowX) - wantX) <= 1e-4 * Double(n), "row Σ dy·x̂ n=\(n)")
        #expect(abs(Double(rowD) - wantD) <= 1e-5 * Double(n), "row Σ dy n=\(n)")
    }

    #if arch(x86_64)
        /// The column loops that the column kernels call in C directly (only on AVX2 machines).
        @Test("AVX2 column rows, sums and gradient rows", arguments: lengths)
        func wideColumnLoops(n: Int) {
            guard nk_simd_level() == 1 else { return }
            let rows = 5
            for offset in [0, 1, 3] {
                for stream: Int32 in [0, 1] {
                    let x = Self.values(rows * n + offset, seed: UInt64(n) + 30, centre: 1000)
                    let dy = Self.values(n + offset, seed: UInt64(n) + 31)
                    let shift = Self.values(n, seed: UInt64(n) + 32, centre: 1000)
                    let a = Self.values(n, seed: UInt64(n) + 33, centre: 2)
                    let b = Self.values(n, seed: UInt64(n) + 34)
                    let c = Self.values(n, seed: UInt64(n) + 35)
                    let (gamma, beta): (Float, Float) = (1.25, -0.5)
                    var y = [Float](repeating: .nan, count: n + offset + 1)
                    x.withUnsafeBufferPointer { xp in
                        y.withUnsafeMutableBufferPointer { yp in
                            nk_column_row(
                                xp.baseAddress! + offset, yp.baseAddress! + offset, n, shift, a,
                                b, gamma, beta, stream)
                        }
                    }
                    for i in 0..<n {
                        let xhat =
                            (Double(x[i + offset]) - Double(shift[i])) * Double(a[i]) + Double(b[i])
                        let want = xhat * Double(gamma) + Double(beta)
                        #expect(Self.close(y[i + offset], want, scale: 4), "column row n=\(n)")
                    }
                    #expect(y[n + offset].isNaN, "column row wrote past the end")
                    y = [Float](repeating: .nan, count: n + offset + 1)
                    x.withUnsafeBufferPointer { xp in
                        dy.withUnsafeBufferPointer { dp in
                            y.withUnsafeMutableBufferPointer { yp in
                                nk_column_gradient_row(
                                    xp.baseAddress! + offset, dp.baseAddress! + offset,
                                    yp.baseAddress! + offset, n, shift, a, b, c, gamma, stream)
                            }
                        }
                    }
                    for i in 0..<n {
                        let want =
                            Double(a[i]) * Double(dy[i + offset]) * Double(gamma)
                            + Double(b[i]) * (Double(x[i + offset]) - Double(shift[i]))
                            + Double(c[i])
                        #expect(Self.close(y[i + offset], want, scale: 4), "gradient row n=\(n)")
                    }
                    #expect(y[n + offset].isNaN, "gradient row wrote past the end")
                    var acc = [Float](repeating: 0.5, count: n)
                    var sq = [Float](repeating: 0.25, count: n)
                    x.withUnsafeBufferPointer { xp in
                        nk_column_sums(xp.baseAddress! + offset, rows, n, shift, &acc, &sq)
                    }
                    for i in 0..<n {
                        var s1 = 0.5
                        var s2 = 0.25
                        for r in 0..<rows {
                            let d = Double(x[offset + r * n + i]) - Double(shift[i])
                            s1 += d
                            s2 += d * d
                        }
                        #expect(Self.close(acc[i], s1, scale: 8), "column Σ n=\(n) i=\(i)")
                        #expect(Self.close(sq[i], s2, scale: 8), "column Σ² n=\(n) i=\(i)")
                    }
                }
            }
        }

        /// The register GEMM kernels behind `BLAS.gemm` (Float, short k) and `Matrix.product`
        /// (small Double), on awkward sizes and row strides wider than the rows.
        @Test("AVX2 small GEMM kernels", arguments: [1, 3, 4, 5, 16, 17])
        func smallProducts(m: Int) {
            guard nk_simd_level() == 1 else { return }
            for n in [1, 7, 8, 15, 16, 17, 33, 100] {
                for k in [1, 3, 16, 17] {
                    let (lda, ldb, ldc) = (k + 2, n + 3, n + 1)
                    let a = Self.values(m * lda, seed: UInt64(m * 100 + n * 10 + k))
                    let b = Self.values(k * ldb, seed: UInt64(m * 100 + n * 10 + k) + 1)
                    for accumulate: Int32 in [0, 1] {
                        let start = Self.values(m * ldc, seed: UInt64(n))
                        var c = start
                        nk_small_sgemm(m, n, k, a, lda, b, ldb, &c, ldc, accumulate)
                        for i in 0..<m {
                            for j in 0..<n {
                                var want = accumulate == 1 ? Double(start[i * ldc + j]) : 0
                                for p in 0..<k {
                                    want += Double(a[i * lda + p]) * Double(b[p * ldb + j])
                                }
                                #expect(
                                    Self.close(c[i * ldc + j], want, scale: Double(k)),
                                    "sgemm \(m)×\(n)×\(k) at (\(i), \(j))")
                            }
                            // The padding beyond n is left alone.
                            for j in n..<ldc {
                                #expect(c[i * ldc + j] == start[i * ldc + j], "sgemm padding")
                            }
                        }
                    }
                    let ad = Self.values(m * k, seed: UInt64(k)).map { Double($0) / 3 }
                    let bd = Self.values(k * n, seed: UInt64(k) + 7).map { Double($0) / 7 }
                    var cd = [Double](repeating: .nan, count: m * n)
                    nk_small_dgemm(m, n, k, ad, bd, &cd)
                    for i in 0..<m {
                        for j in 0..<n {
                            var want = 0.0
                            for p in 0..<k { want += ad[i * k + p] * bd[p * n + j] }
                            #expect(
                                abs(cd[i * n + j] - want) <= 1e-14 * Double(k),
                                "dgemm \(m)×\(n)×\(k) at (\(i), \(j))")
                        }
                    }
                }
            }
        }
    #endif
}
