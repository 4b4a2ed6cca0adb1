import LinearAlgebra
import NormKernels
import Normalization
import TensorCore

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

    /// The elements as Doubles (a specialized conversion for Float and Double: the generic
    /// layers would otherwise pay a witness call per element).
    static func doubles<S: NormScalar>(_ x: Tensor<S>) -> [Double] {
        if let d = x as? Tensor<Double> { return d.scalars }
        if let f = x as? Tensor<Float> { return f.scalars.map(Double.init) }
        return x.scalars.map(Double.init)
    }

    /// The channels `group` of x (given as Doubles, shape `[N, C, …]`) as a d × m matrix.
    static func gather(_ x: [Double], shape: [Int], _ group: Range<Int>) -> Matrix {
        let (n, c) = (shape[0], shape[1])
        let l = x.count / (n * c)
        var out = Matrix(rows: group.count, cols: n * l)
        out.values.withUnsafeMutableBufferPointer { o in
            x.withUnsafeBufferPointer { p in
                for (i, ch) in group.enumerated() {
                    for b in 0..<n {
                        let base = (b * c + ch) * l
                        let to = i * n * l + b * l
                        for s in 0..<l { o[to + s] = p[base + s] }
                    }
                }
            }
        }
        return out
    }

    /// The channels `group` of a tensor as a d × m matrix.
    static func gather<S: NormScalar>(_ x: Tensor<S>, _ group: Range<Int>) -> Matrix {
        gather(doubles(x), shape: x.shape, group)
    }

    /// Writes a d × m matrix into the channels `group` of `y` (Doubles, shape `[N, C, …]`).
    static func scatter(_ m: Matrix, _ group: Range<Int>, shape: [Int], into y: inout [Double]) {
        let (n, c) = (shape[0], shape[1])
        let l = y.count / (n * c)
        y.withUnsafeMutableBufferPointer { p in
            m.values.withUnsafeBufferPointer { v in
                for (i, ch) in group.enumerated() {
                    for b in 0..<n {
                        let base = (b * c + ch) * l
                        let from = i * n * l + b * l
                        for s in 0..<l { p[base + s] = v[from + s] }
                    }
                }
            }
        }
    }

    /// Writes a d × m matrix into the channels `group` of a tensor.
    static func scatter<S: NormScalar>(_ m: Matrix, _ group: Range<Int>, into y: inout Tensor<S>) {
        var values = doubles(y)
        scatter(m, group, shape: y.shape, into: &values)
        y = (try? Tensor(shape: y.shape, rounding: values)) ?? y
    }

    /// Row means of a d × m matrix, and the matrix centred by them.
    static func centre(_ x: Matrix) -> (mean: [Double], centred: Matrix) {
        var mean = [Double](repeating: 0, count: x.rows)
        for i in 0..<x.rows {
            var total = 0.0
            for j in 0..<x.cols { total += x.values[i * x.cols + j] }
            mean[i] = total / Double(x.cols)
        }
        return (mean, subtracting(rowMeans: mean, from: x))
    }

    /// x with `mean[i]` subtracted from every entry of row i (batch or running means).
    static func subtracting(rowMeans mean: [Double], from x: Matrix) -> Matrix {
        var c = x
        for i in 0..<x.rows {
            for j in 0..<x.cols { c.values[i * x.cols + j] -= mean[i] }
        }
        return c
    }

    /// Xc·Xcᵀ/m + ε·I (through BLAS).
    static func covariance(_ xc: Matrix, epsilon: Double) -> Matrix {
        var sigma = (1 / Double(xc.cols)) * Matrix.product(xc, xc, transposeB: true)
        for i in 0..<sigma.rows { sigma[i, i] += epsilon }
        return sigma
    }

    /// y = γ_c·ŷ + β_c over a whole tensor of Doubles.
    static func affine<S: NormScalar>(
        _ y: inout [Double], shape: [Int], scale: Tensor<S>?, offset: Tensor<S>?
    ) {
        guard let scale, let offset else { return }
        let (n, c) = (shape[0], shape[1])
        let l = y.count / (n * c)
        let gs = doubles(scale)
        let os = doubles(offset)
        y.withUnsafeMutableBufferPointer { p in
            for b in 0..<n {
                for ch in 0..<c {
                    let (g, o) = (gs[ch], os[ch])
                    let base = (b * c + ch) * l
                    for s in 0..<l { p[base + s] = p[base + s] * g + o }
                }
            }
        }
    }

    /// dŷ = dy·γ (per channel), dγ = Σ dy·ŷ, dβ = Σ dy, with ŷ the whitened output (Doubles).
    static func affineBackward<S: NormScalar>(
        _ dy: Tensor<S>, whitened: [Double], scale: Tensor<S>?
    ) throws -> ([Double], Tensor<S>?, Tensor<S>?) {
        var g = doubles(dy)
        guard let scale else { return (g, nil, nil) }
        let (n, c) = (dy.shape[0], dy.shape[1])
        let l = dy.count / (n * c)
        let gs = doubles(scale)
        var dg = [Double](repeating: 0, count: c)
        var db = [Double](repeating: 0, count: c)
        g.withUnsafeMutableBufferPointer { p in
            whitened.withUnsafeBufferPointer { w in
                for b in 0..<n {
                    for ch in 0..<c {
                        let base = (b * c + ch) * l
                        for s in 0..<l {
                            dg[ch] += p[base + s] * w[base + s]
                            db[ch] += p[base + s]
                            p[base + s] *= gs[ch]
                        }
                    }
                }
            }
        }
        return (g, try Tensor(shape: [c], rounding: dg), try Tensor(shape: [c], rounding: db))
    }
}
