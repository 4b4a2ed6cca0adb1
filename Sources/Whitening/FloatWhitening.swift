import LinearAlgebra
import NormKernels
import Normalization
import TensorCore

/// The Float32 path of the group whitening layers (DBN, IterNorm): data stays in Float and moves
/// through BLAS; only the d × d algebra (Σ, its eigendecomposition or Newton iterates, the
/// backward's d × d terms) is Double.
///
/// ```
/// per group of d channels, sample b: X_b = x[b, group, :] (d × L, contiguous in NCHW)
/// X_c = X − μ 1ᵀ, kept as one d × m Float block (m = N·L; backward needs it)
/// Σ = X_c X_cᵀ/m + ε·I           (ssyrk over the block, half a GEMM)
/// y_b = diag(γ) W X_c,b + β 1ᵀ     (sgemm straight into the output)
/// dx_b = A X_c,b + B dy_b − c 1ᵀ   (two sgemm into dx; A, B, c are d × d / d, from the layer)
/// ```
/// Every backward here has that form: DBN's closed form through the eigendecomposition gives
/// A = U Sᵀ Uᵀ, B = U Dᵀ diag(γ), c = U f; IterNorm's gives A = (2/m)·dΣ_sym,
/// B = Wᵀ diag(γ), c = Wᵀ ḡ; inference gives A = 0, B = Wᵀ diag(γ), c = 0. The one product
/// backward needs from the data, dy·X_cᵀ, gives both dγ = Σ dy ⊙ (W X_c) and dW.
///
/// The mean is a shifted sum (x − s with s the channel's first element, exact for offset data),
/// and X_c = (x − s) − (μ − s) keeps offset data accurate. Groups run in parallel on NormKit's
/// threads with BLAS single-threaded inside them.
enum FloatWhitening {
    /// The layout of an `[N, C, spatial…]` tensor.
    struct Shape {
        let n: Int
        let c: Int
        let l: Int
        var m: Int { n * l }

        init(_ shape: [Int]) {
            n = shape[0]
            c = shape[1]
            l = shape.dropFirst(2).reduce(1, *)
        }
    }

    /// What one group's forward keeps for backward.
    struct Group: Sendable {
        /// X_c, d × m Float, column b·L + s.
        var centred: [Float]
        /// The whitening matrix W (Double d × d).
        var whitening: Matrix
    }

    /// Shifted channel means of the group (Double), from Float row sums.
    static func means(
        _ x: UnsafePointer<Float>, _ shape: Shape, _ group: Range<Int>
    ) -> [Double] {
        let (n, c, l) = (shape.n, shape.c, shape.l)
        return group.map { ch in
            let s = x[ch * l]
            var total = 0.0
            for b in 0..<n {
                let row = x + (b * c + ch) * l
                var acc = SIMD8<Float>(repeating: 0)
                var j = 0
                while j + 8 <= l {
                    acc +=
                        UnsafeRawPointer(row + j).loadUnaligned(as: SIMD8<Float>.self)
                        - SIMD8(repeating: s)
                    j += 8
                }
                var tail: Float = 0
                while j < l {
                    tail += row[j] - s
                    j += 1
                }
                total += Double(acc.sum()) + Double(tail)
            }
            return Double(s) + total / Double(shape.m)
        }
    }

    /// Writes X_c = (x − s) − (μ − s) for the group into `out` (d × m).
    static func centre(
        _ x: UnsafePointer<Float>, _ shape: Shape, _ group: Range<Int>, mean: [Double],
        into out: UnsafeMutablePointer<Float>
    ) {
        let (n, c, l, m) = (shape.n, shape.c, shape.l, shape.m)
        for (i, ch) in group.enumerated() {
            let s = x[ch * l]
            let rest = Float(mean[i] - Double(s))
            for b in 0..<n {
                let row = x + (b * c + ch) * l
                let o = out + i * m + b * l
                for j in 0..<l { o[j] = (row[j] - s) - rest }
            }
        }
    }

    /// Σ = X_c X_cᵀ/m + ε·I in Double, from one ssyrk over the centred block.
    static func covariance(
        _ centred: UnsafePointer<Float>, d: Int, m: Int, epsilon: Double
    ) -> Matrix {
        var upper = [Float](repeating: 0, count: d * d)
        upper.withUnsafeMutableBufferPointer {
            BLAS.ssyrk(
                n: d, k: m, alpha: 1 / Float(m), centred, lda: m, beta: 0, $0.baseAddress!, ldc: d)
        }
        var sigma = Matrix(rows: d, cols: d)
        for i in 0..<d {
            for j in i..<d {
                sigma[i, j] = Double(upper[i * d + j])
                sigma[j, i] = sigma[i, j]
            }
            sigma[i, i] += epsilon
        }
        return sigma
    }

    /// y_b = diag(γ) W X_c,b + β for every sample of the group.
    static func apply(
        _ w: Matrix, centred: UnsafePointer<Float>, _ shape: Shape, _ group: Range<Int>,
        scale: [Float]?, offset: [Float]?, into y: UnsafeMutablePointer<Float>
    ) {
        let d = group.count
        let (n, c, l, m) = (shape.n, shape.c, shape.l, shape.m)
        var a = [Float](repeating: 0, count: d * d)
        for i in 0..<d {
            let g = Double(scale?[group.lowerBound + i] ?? 1)
            for j in 0..<d { a[i * d + j] = Float(g * w[i, j]) }
        }
        a.withUnsafeBufferPointer { ap in
            for b in 0..<n {
                let block = y + (b * c + group.lowerBound) * l
                BLAS.sgemm(
                    transposeA: false, transposeB: false, m: d, n: l, k: d, ap.baseAddress!,
                    lda: d, centred + b * l, ldb: m, beta: 0, block, ldc: l)
                if let offset {
                    for i in 0..<d {
                        let beta = offset[group.lowerBound + i]
                        let row = block + i * l
                        for j in 0..<l { row[j] += beta }
                    }
                }
            }
        }
    }

    /// Σ_b dy_b X_c,bᵀ (d × d, Double) and the row sums of dy over the group.
    static func gradientProducts(
        _ dy: UnsafePointer<Float>, centred: UnsafePointer<Float>, _ shape: Shape,
        _ group: Range<Int>
    ) -> (dyX: Matrix, rowSums: [Double]) {
        let d = group.count
        let (n, c, l, m) = (shape.n, shape.c, shape.l, shape.m)
        var product = [Float](repeating: 0, count: d * d)
        var sums = [Double](repeating: 0, count: d)
        product.withUnsafeMutableBufferPointer { p in
            for b in 0..<n {
                let block = dy + (b * c + group.lowerBound) * l
                BLAS.sgemm(
                    transposeA: false, transposeB: true, m: d, n: d, k: l, block, lda: l,
                    centred + b * l, ldb: m, beta: b == 0 ? 0 : 1, p.baseAddress!, ldc: d)
                for i in 0..<d {
                    let row = block + i * l
                    var acc: Float = 0
                    for j in 0..<l { acc += row[j] }
                    sums[i] += Double(acc)
                }
            }
        }
        return (Matrix(rows: d, cols: d, values: product.map(Double.init)), sums)
    }

    /// dx_b = A X_c,b + B dy_b − c for every sample of the group (A nil: no data term).
    static func applyGradient(
        a: Matrix?, b bMatrix: Matrix, c cVector: [Double], centred: UnsafePointer<Float>,
        dy: UnsafePointer<Float>, _ shape: Shape, _ group: Range<Int>,
        into dx: UnsafeMutablePointer<Float>
    ) {
        let d = group.count
        let (n, c, l, m) = (shape.n, shape.c, shape.l, shape.m)
        let af = a.map { $0.values.map(Float.init) }
        let bf = bMatrix.values.map(Float.init)
        let cf = cVector.map(Float.init)
        bf.withUnsafeBufferPointer { bp in
            for b in 0..<n {
                let offset = (b * c + group.lowerBound) * l
                if let af {
                    af.withUnsafeBufferPointer { ap in
                        BLAS.sgemm(
                            transposeA: false, transposeB: false, m: d, n: l, k: d,
                            ap.baseAddress!, lda: d, centred + b * l, ldb: m, beta: 0,
                            dx + offset, ldc: l)
                    }
                }
                BLAS.sgemm(
                    transposeA: false, transposeB: false, m: d, n: l, k: d, bp.baseAddress!,
                    lda: d, dy + offset, ldb: l, beta: af == nil ? 0 : 1, dx + offset, ldc: l)
                for i in 0..<d where cf[i] != 0 {
                    let row = dx + offset + i * l
                    for j in 0..<l { row[j] -= cf[i] }
                }
            }
        }
    }

    /// Runs `body(k)` for every group on NormKit's threads with BLAS single-threaded, collecting
    /// one result per group (in group order) or the first error.
    static func forEachGroup<R>(
        _ count: Int, work: Int, _ body: (Int) throws -> R
    ) throws -> [R] {
        var results = [Result<R, any Error>?](repeating: nil, count: count)
        results.withUnsafeMutableBufferPointer { out in
            let base = out.baseAddress!
            BLAS.singleThreaded {
                Parallelism.forEachChunk(count, work: work) { k in
                    base[k] = Result { try body(k) }
                }
            }
        }
        return try results.map { try $0!.get() }
    }
}
