import LinearAlgebra
import TensorCore

/// A stride-1 2-D convolution (cross-correlation, as PyTorch) with zero padding k/2, so the
/// output keeps the input's height and width: SPADE's convolutions.
///
/// ```
/// out[n, o, i, j] = b[o] + Σ_{c, u, v} W[o, c, u, v] · in[n, c, i + u − p, j + v − p],  p = k/2
/// ```
/// Computed per sample as one GEMM over an im2col matrix `[C_in·k·k, H·W]` through ``BLAS``;
/// backward is two more GEMMs (dW += dout·colsᵀ, dcols = Wᵀ·dout) and the adjoint of im2col.
/// (The training harness's `Conv2d` does the same for general strides; it lives above this
/// module, so SPADE keeps this small same-size version.)
///
/// ## Shape
/// Input `[N, C_in, H, W]`; weight `[C_out, C_in, k, k]` (k odd); bias `[C_out]`; output
/// `[N, C_out, H, W]`.
struct SameConvolution<Scalar: NormScalar> {
    let inputChannels: Int
    let outputChannels: Int
    let kernelSize: Int

    var padding: Int { kernelSize / 2 }
    var patchSize: Int { inputChannels * kernelSize * kernelSize }

    /// im2col of one sample `[C_in, H, W]` into `[C_in·k·k, H·W]`.
    func im2col(
        _ x: UnsafePointer<Scalar>, height h: Int, width w: Int,
        into cols: UnsafeMutablePointer<Scalar>
    ) {
        let k = kernelSize
        let p = padding
        let plane = h * w
        for c in 0..<inputChannels {
            for u in 0..<k {
                for v in 0..<k {
                    let row = cols + ((c * k + u) * k + v) * plane
                    for i in 0..<h {
                        let si = i + u - p
                        for j in 0..<w {
                            let sj = j + v - p
                            row[i * w + j] =
                                (si >= 0 && si < h && sj >= 0 && sj < w)
                                ? x[(c * h + si) * w + sj] : 0
                        }
                    }
                }
            }
        }
    }

    /// Adds the columns back into an image gradient `[C_in, H, W]` (the adjoint of im2col).
    func col2im(
        _ cols: UnsafePointer<Scalar>, height h: Int, width w: Int,
        into dx: UnsafeMutablePointer<Scalar>
    ) {
        let k = kernelSize
        let p = padding
        let plane = h * w
        for c in 0..<inputChannels {
            for u in 0..<k {
                for v in 0..<k {
                    let row = cols + ((c * k + u) * k + v) * plane
                    for i in 0..<h {
                        let si = i + u - p
                        guard si >= 0 && si < h else { continue }
                        for j in 0..<w {
                            let sj = j + v - p
                            if sj >= 0 && sj < w { dx[(c * h + si) * w + sj] += row[i * w + j] }
                        }
                    }
                }
            }
        }
    }

    /// The convolution of `x` `[N, C_in, H, W]`.
    func forward(
        _ x: [Scalar], batch: Int, height h: Int, width w: Int, weight: [Scalar],
        bias: [Scalar]
    ) -> [Scalar] {
        let plane = h * w
        var out = [Scalar](repeating: 0, count: batch * outputChannels * plane)
        var cols = [Scalar](repeating: 0, count: patchSize * plane)
        x.withUnsafeBufferPointer { xb in
            weight.withUnsafeBufferPointer { wb in
                cols.withUnsafeMutableBufferPointer { cb in
                    out.withUnsafeMutableBufferPointer { ob in
                        for n in 0..<batch {
                            im2col(
                                xb.baseAddress! + n * inputChannels * plane, height: h, width: w,
                                into: cb.baseAddress!)
                            let o = ob.baseAddress! + n * outputChannels * plane
                            for oc in 0..<outputChannels {
                                for s in 0..<plane { o[oc * plane + s] = bias[oc] }
                            }
                            BLAS.gemm(
                                transposeA: false, transposeB: false, m: outputChannels, n: plane,
                                k: patchSize, wb.baseAddress!, lda: patchSize,
                                UnsafePointer(cb.baseAddress!), ldb: plane, beta: 1, o, ldc: plane)
                        }
                    }
                }
            }
        }
        return out
    }

    /// dL/dx, dL/dW and dL/db for an output gradient `[N, C_out, H, W]`.
    func backward(
        _ dout: [Scalar], input x: [Scalar], batch: Int, height h: Int, width w: Int,
        weight: [Scalar]
    ) -> (input: [Scalar], weight: [Scalar], bias: [Scalar]) {
        let plane = h * w
        var dx = [Scalar](repeating: 0, count: batch * inputChannels * plane)
        var dw = [Scalar](repeating: 0, count: outputChannels * patchSize)
        var db = [Scalar](repeating: 0, count: outputChannels)
        var cols = [Scalar](repeating: 0, count: patchSize * plane)
        var dcols = cols
        for n in 0..<batch {
            for oc in 0..<outputChannels {
                var s: Scalar = 0
                for i in 0..<plane { s += dout[(n * outputChannels + oc) * plane + i] }
                db[oc] += s
            }
        }
        x.withUnsafeBufferPointer { xb in
            dout.withUnsafeBufferPointer { gb in
                weight.withUnsafeBufferPointer { wb in
                    cols.withUnsafeMutableBufferPointer { cb in
                        dcols.withUnsafeMutableBufferPointer { dcb in
                            dw.withUnsafeMutableBufferPointer { dwb in
                                dx.withUnsafeMutableBufferPointer { dxb in
                                    for n in 0..<batch {
                                        let g = gb.baseAddress! + n * outputChannels * plane
                                        im2col(
                                            xb.baseAddress! + n * inputChannels * plane, height: h,
                                            width: w, into: cb.baseAddress!)
                                        // dW += dout_n · cols_nᵀ
                                        BLAS.gemm(
                                            transposeA: false, transposeB: true, m: outputChannels,
                                            n: patchSize, k: plane, g, lda: plane,
                                            UnsafePointer(cb.baseAddress!), ldb: plane, beta: 1,
                                            dwb.baseAddress!, ldc: patchSize)
                                        // dcols = Wᵀ · dout_n
                                        BLAS.gemm(
                                            transposeA: true, transposeB: false, m: patchSize,
                                            n: plane, k: outputChannels, wb.baseAddress!,
                                            lda: patchSize, g, ldb: plane, dcb.baseAddress!,
                                            ldc: plane)
                                        col2im(
                                            UnsafePointer(dcb.baseAddress!), height: h, width: w,
                                            into: dxb.baseAddress! + n * inputChannels * plane)
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return (dx, dw, db)
    }
}
