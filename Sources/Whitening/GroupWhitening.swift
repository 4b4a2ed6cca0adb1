import NormKit
import Training

/// Shared plumbing of the group whitening layers: channel groups, moving a group between an
/// `[N, C, spatial…]` tensor and a `d × m` matrix (m = N·spatial), and the affine recovery.
enum GroupWhitening {
    /// Consecutive channel blocks of `size` (the last one may be smaller).
    static func groups(channels: Int, size: Int) -> [Range<Int>] {
        stride(from: 0, to: channels, by: size).map { $0..<min(channels, $0 + size) }
    }

    static func validate<S: NormScalar>(_ x: Tensor<S>, channels: Int, layer: String)
        throws(NormError)
    {
        guard x.count > 0 else { throw .emptyTensor(layer: layer, shape: x.shape) }
        guard x.rank >= 2 else {
            throw .invalidRank(layer: layer, expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
        }
        guard x.shape[1] == channels else {
            throw .channelMismatch(
                layer: layer, expected: channels, actual: x.shape[1], shape: x.shape)
        }
    }

    /// The channels `group` of x as a d × m matrix (columns in (n, s) order).
    static func gather<S: NormScalar>(_ x: Tensor<S>, _ group: Range<Int>) -> Matrix {
        let (n, c) = (x.shape[0], x.shape[1])
        let l = x.count / (n * c)
        var out = Matrix(rows: group.count, cols: n * l)
        x.withUnsafeBufferPointer { p in
            for (i, ch) in group.enumerated() {
                for b in 0..<n {
                    let base = (b * c + ch) * l
                    for s in 0..<l { out.values[i * n * l + b * l + s] = Double(p[base + s]) }
                }
            }
        }
        return out
    }

    /// Writes a d × m matrix into the channels `group` of `y`.
    static func scatter<S: NormScalar>(_ m: Matrix, _ group: Range<Int>, into y: inout Tensor<S>) {
        let (n, c) = (y.shape[0], y.shape[1])
        let l = y.count / (n * c)
        y.withUnsafeMutableBufferPointer { p in
            for (i, ch) in group.enumerated() {
                for b in 0..<n {
                    let base = (b * c + ch) * l
                    for s in 0..<l { p[base + s] = S(m.values[i * n * l + b * l + s]) }
                }
            }
        }
    }

    /// Row means of a d × m matrix, and the matrix centred by them.
    static func centre(_ x: Matrix) -> (mean: [Double], centred: Matrix) {
        var mean = [Double](repeating: 0, count: x.rows)
        var c = x
        for i in 0..<x.rows {
            var total = 0.0
            for j in 0..<x.cols { total += x.values[i * x.cols + j] }
            mean[i] = total / Double(x.cols)
            for j in 0..<x.cols { c.values[i * x.cols + j] -= mean[i] }
        }
        return (mean, c)
    }

    /// Xc·Xcᵀ/m + ε·I (through BLAS).
    static func covariance(_ xc: Matrix, epsilon: Double) -> Matrix {
        var sigma = (1 / Double(xc.cols)) * Matrix.product(xc, xc, transposeB: true)
        for i in 0..<sigma.rows { sigma[i, i] += epsilon }
        return sigma
    }

    /// y = γ_c·ŷ + β_c over a whole tensor, and the per-channel sums for dγ, dβ.
    static func affine<S: NormScalar>(_ y: inout Tensor<S>, scale: Tensor<S>?, offset: Tensor<S>?) {
        guard let scale, let offset else { return }
        let (n, c) = (y.shape[0], y.shape[1])
        let l = y.count / (n * c)
        y.withUnsafeMutableBufferPointer { p in
            for b in 0..<n {
                for ch in 0..<c {
                    let g = scale.scalars[ch]
                    let o = offset.scalars[ch]
                    for s in 0..<l { p[(b * c + ch) * l + s] = p[(b * c + ch) * l + s] * g + o }
                }
            }
        }
    }

    /// dŷ = dy·γ (per channel), dγ = Σ dy·ŷ, dβ = Σ dy.
    static func affineBackward<S: NormScalar>(
        _ dy: Tensor<S>, whitened: Tensor<S>, scale: Tensor<S>?
    ) throws -> (Tensor<S>, Tensor<S>?, Tensor<S>?) {
        guard let scale else { return (dy, nil, nil) }
        let (n, c) = (dy.shape[0], dy.shape[1])
        let l = dy.count / (n * c)
        var dg = [Double](repeating: 0, count: c)
        var db = [Double](repeating: 0, count: c)
        var g = dy
        for b in 0..<n {
            for ch in 0..<c {
                for s in 0..<l {
                    let i = (b * c + ch) * l + s
                    dg[ch] += Double(dy[flat: i]) * Double(whitened[flat: i])
                    db[ch] += Double(dy[flat: i])
                    g[flat: i] = dy[flat: i] * scale.scalars[ch]
                }
            }
        }
        return (g, try Tensor(shape: [c], rounding: dg), try Tensor(shape: [c], rounding: db))
    }
}
