import LinearAlgebra
import NormKernels
import Normalization
import TensorCore

/// The block kernels every whitening layer runs on: data stays in the tensor's own scalar type
/// (Float32 or Float64) and moves through BLAS; only the d × d algebra is Double.
///
/// ```
/// a block: channels `group` (d of them) × samples `samples`; X_b = x[b, group, :] is d × L,
/// contiguous in NCHW (row stride L), so no gather is needed
/// X_c = X − μ 1ᵀ, written at x's own offsets into a tensor-sized buffer
/// Σ = Σ_b X_c,b X_c,bᵀ / m + ε·I        (syrk per sample block, accumulated; m = |samples|·L)
/// y_b = A X_c,b + a 1ᵀ                   (gemm straight into the output; A = diag(γ)W)
/// dx_b = A X_c,b + B dy_b − c 1ᵀ         (two gemm into dx)
/// ```
/// DBN and IterNorm use one block per channel group over the whole batch; Switchable Whitening
/// one block per group and sample. Every backward of these layers has the dx form above (see
/// ``GroupWhiteningNorm/backward(_:cache:)`` and ``SwitchableWhitening/backward(_:cache:)``).
///
/// The mean is a shifted sum (x − s with s the channel's first element in the block, exact for
/// offset data) and X_c = (x − s) − (μ − s), so data at 1000 + 0.05·noise stays accurate.
enum GroupWhitening {
    /// The layout of an `[N, C, spatial…]` tensor.
    struct Shape: Sendable {
        let n: Int
        let c: Int
        let l: Int
        /// Samples per channel over the batch, N·L.
        var m: Int { n * l }

        init(_ shape: [Int]) {
            n = shape[0]
            c = shape[1]
            l = shape.dropFirst(2).reduce(1, *)
        }

        /// The offset of x[b, channel, 0].
        func offset(_ b: Int, _ channel: Int) -> Int { (b * c + channel) * l }
    }

    /// The channels and samples one whitening matrix acts on.
    struct Block: Sendable {
        let group: Range<Int>
        let samples: Range<Int>
        var d: Int { group.count }
    }

    /// Consecutive channel blocks of `size` (the last one may be smaller).
    static func groups(channels: Int, size: Int) -> [Range<Int>] {
        stride(from: 0, to: channels, by: size).map { $0..<min(channels, $0 + size) }
    }

    /// The channel groups, after checking C ≥ 1, d in 1…C, ε finite and > 0, T (Newton) in
    /// 1…``maximumNewtonIterations``, and the momentum.
    static func checkedGroups(
        channelCount: Int, groupSize: Int, epsilon: Double, iterations: Int?, momentum: Momentum
    ) throws(NormError) -> [Range<Int>] {
        try HyperparameterCheck.count(channelCount, limit: Int.max, name: "channel count")
        try HyperparameterCheck.count(groupSize, limit: channelCount, name: "group size")
        guard epsilon > 0, epsilon.isFinite else {
            throw .invalidHyperparameter(
                name: "epsilon", value: "\(epsilon)", requirement: "must be finite and > 0")
        }
        if let iterations {
            try HyperparameterCheck.count(
                iterations, limit: maximumNewtonIterations, name: "iterations")
        }
        try momentum.validate()
        return groups(channels: channelCount, size: groupSize)
    }

    /// Checks rank ≥ 2 and the layer's channel count.
    ///
    /// An empty tensor (N = 0, or a spatial size 0) passes: it gives an empty output, as
    /// PyTorch's BatchNorm does.
    static func validate<S: NormScalar>(_ x: Tensor<S>, channels: Int, layer: String)
        throws(NormError)
    {
        guard x.rank >= 2 else {
            throw .invalidRank(layer: layer, expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
        }
        guard x.shape[1] == channels else {
            throw .channelMismatch(
                layer: layer, expected: channels, actual: x.shape[1], shape: x.shape)
        }
    }

    /// Σ of one row of `count` values minus `shift`, with four accumulators (no loop-carried
    /// dependency on one register; the shift keeps offset data exact).
    @inline(__always)
    static func shiftedSum<S: NormScalar>(_ row: UnsafePointer<S>, _ count: Int, shift: S) -> Double
    {
        var (a0, a1, a2, a3) = (S.zero, S.zero, S.zero, S.zero)
        var j = 0
        while j + 4 <= count {
            a0 += row[j] - shift
            a1 += row[j + 1] - shift
            a2 += row[j + 2] - shift
            a3 += row[j + 3] - shift
            j += 4
        }
        while j < count {
            a0 += row[j] - shift
            j += 1
        }
        return Double((a0 + a1) + (a2 + a3))
    }

    /// The channel means of a block (Double), from shifted row sums.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func means<S: NormScalar>(_ x: UnsafePointer<S>, _ shape: Shape, _ block: Block)
        -> [Double]
    {
        let first = block.samples.lowerBound
        let count = Double(block.samples.count * shape.l)
        return block.group.map { ch in
            let s = x[shape.offset(first, ch)]
            var total = 0.0
            for b in block.samples {
                total += shiftedSum(x + shape.offset(b, ch), shape.l, shift: s)
            }
            return Double(s) + total / count
        }
    }

    /// Writes X_c = (x − s) − (μ − s) of the block into `out` (x's offsets).
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func centre<S: NormScalar>(
        _ x: UnsafePointer<S>, _ shape: Shape, _ block: Block, mean: [Double],
        into out: UnsafeMutablePointer<S>
    ) {
        let first = block.samples.lowerBound
        for (i, ch) in block.group.enumerated() {
            let s = x[shape.offset(first, ch)]
            let rest = S(mean[i] - Double(s))
            for b in block.samples {
                let o = shape.offset(b, ch)
                let (row, target) = (x + o, out + o)
                for j in 0..<shape.l { target[j] = (row[j] - s) - rest }
            }
        }
    }

    /// Σ_b X_c,b X_c,bᵀ / divisor (+ ε on the diagonal) in Double, one syrk per sample block.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func covariance<S: NormScalar>(
        _ centred: UnsafePointer<S>, _ shape: Shape, _ block: Block, divisor: Double,
        epsilon: Double = 0
    ) -> Matrix {
        let d = block.d
        var upper = [S](repeating: 0, count: d * d)
        upper.withUnsafeMutableBufferPointer { u in
            for b in block.samples {
                BLAS.syrk(
                    n: d, k: shape.l, centred + shape.offset(b, block.group.lowerBound),
                    lda: shape.l, beta: b == block.samples.lowerBound ? 0 : 1, u.baseAddress!,
                    ldc: d)
            }
        }
        var sigma = Matrix(rows: d, cols: d)
        for i in 0..<d {
            for j in i..<d {
                sigma[i, j] = Double(upper[i * d + j]) / divisor
                sigma[j, i] = sigma[i, j]
            }
            sigma[i, i] += epsilon
        }
        return sigma
    }

    /// A Double matrix in the storage type, optionally with row i scaled by `rowScale[i]`.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func stored<S: NormScalar>(_ a: Matrix, rowScale: [Double]? = nil) -> [S] {
        var out = [S](repeating: 0, count: a.values.count)
        for i in 0..<a.rows {
            let g = rowScale?[i] ?? 1
            for j in 0..<a.cols { out[i * a.cols + j] = S(g * a[i, j]) }
        }
        return out
    }

    /// y_b = A X_c,b + a 1ᵀ for every sample of the block (A is d × d in the storage type).
    ///
    /// The rows start as a (one fill) and the product adds to them (β = 1), which saves BLAS's
    /// β = 0 clearing pass and a separate pass for the offsets.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func apply<S: NormScalar>(
        _ a: [S], rowOffsets: [S], centred: UnsafePointer<S>, _ shape: Shape, _ block: Block,
        into y: UnsafeMutablePointer<S>
    ) {
        let (d, l) = (block.d, shape.l)
        a.withUnsafeBufferPointer { ap in
            for b in block.samples {
                let o = shape.offset(b, block.group.lowerBound)
                for i in 0..<d { (y + o + i * l).initialize(repeating: rowOffsets[i], count: l) }
                BLAS.gemm(
                    transposeA: false, transposeB: false, m: d, n: l, k: d, ap.baseAddress!,
                    lda: d, centred + o, ldb: l, beta: 1, y + o, ldc: l)
            }
        }
    }

    /// Σ_b dy_b X_c,bᵀ (d × d, Double) and the row sums of dy over the block.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func gradientProducts<S: NormScalar>(
        _ dy: UnsafePointer<S>, centred: UnsafePointer<S>, _ shape: Shape, _ block: Block
    ) -> (dyX: Matrix, rowSums: [Double]) {
        let (d, l) = (block.d, shape.l)
        var product = [S](repeating: 0, count: d * d)
        var sums = [Double](repeating: 0, count: d)
        product.withUnsafeMutableBufferPointer { p in
            for b in block.samples {
                let o = shape.offset(b, block.group.lowerBound)
                BLAS.gemm(
                    transposeA: false, transposeB: true, m: d, n: d, k: l, dy + o, lda: l,
                    centred + o, ldb: l, beta: b == block.samples.lowerBound ? 0 : 1,
                    p.baseAddress!, ldc: d)
                for i in 0..<d { sums[i] += shiftedSum(dy + o + i * l, l, shift: 0) }
            }
        }
        return (Matrix(rows: d, cols: d, values: product.map { Double($0) }), sums)
    }

    /// dx_b = A X_c,b + B dy_b − c 1ᵀ for every sample of the block (A nil: no data term).
    ///
    /// The rows start as −c and both products add to them (β = 1), as in ``apply``.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func applyGradient<S: NormScalar>(
        a: [S]?, b bMatrix: [S], c cVector: [S], centred: UnsafePointer<S>,
        dy: UnsafePointer<S>, _ shape: Shape, _ block: Block, into dx: UnsafeMutablePointer<S>
    ) {
        let (d, l) = (block.d, shape.l)
        for b in block.samples {
            let o = shape.offset(b, block.group.lowerBound)
            for i in 0..<d { (dx + o + i * l).initialize(repeating: -cVector[i], count: l) }
            if let a {
                a.withUnsafeBufferPointer { ap in
                    BLAS.gemm(
                        transposeA: false, transposeB: false, m: d, n: l, k: d, ap.baseAddress!,
                        lda: d, centred + o, ldb: l, beta: 1, dx + o, ldc: l)
                }
            }
            bMatrix.withUnsafeBufferPointer { bp in
                BLAS.gemm(
                    transposeA: false, transposeB: false, m: d, n: l, k: d, bp.baseAddress!,
                    lda: d, dy + o, ldb: l, beta: 1, dx + o, ldc: l)
            }
        }
    }

    /// The running matrices after one batch: ``RunningAverage/blend(_:toward:weightOfNew:)``
    /// entry by entry, `(1 − f)·R + f·S`.
    static func blend(_ old: [Matrix], toward new: [Matrix], weightOfNew f: Double) -> [Matrix] {
        zip(old, new).map { r, s in
            Matrix(
                rows: r.rows, cols: r.cols,
                values: RunningAverage.blend(r.values, toward: s.values, weightOfNew: f))
        }
    }

    /// Wᵀ·diag(γ): the B of every backward here.
    static func transposedTimesGamma(_ w: Matrix, _ gamma: [Double]) -> Matrix {
        let d = w.rows
        var b = Matrix(rows: d, cols: d)
        for i in 0..<d { for j in 0..<d { b[i, j] = w[j, i] * gamma[j] } }
        return b
    }

    /// A new array of `count` (> 0) elements that `body` writes in full through the pointer: the
    /// tensor-sized buffers (y, X_c, dx) are overwritten by the kernels anyway, so they get no
    /// zero-fill pass (and no per-element work in unspecialized generic code).
    static func filled<S: NormScalar, R>(
        _ count: Int, _ body: (UnsafeMutablePointer<S>) throws -> R
    ) rethrows -> ([S], R) {
        precondition(count > 0, "An empty tensor takes the empty-batch path.")
        var result: R? = nil
        let array = try [S](unsafeUninitializedCapacity: count) { buffer, initialized in
            result = try body(buffer.baseAddress!)
            initialized = count
        }
        return (array, result!)
    }

    /// Runs `body(k)` for every block on NormKit's threads with BLAS single-threaded inside
    /// them, collecting one result per block (in block order) or the first error.
    static func forEachBlock<R>(_ count: Int, work: Int, _ body: (Int) throws -> R) throws -> [R] {
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
