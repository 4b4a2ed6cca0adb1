import TensorCore

#if canImport(Accelerate)
    import Accelerate
#else
    import COpenBLAS
#endif

/// Matrix products through the platform BLAS (OpenBLAS on Linux, Accelerate on Apple).
///
/// Row-major `C ← α·op(A)·op(B) + β·C` with `op` the identity or the transpose; NormKit writes no
/// GEMM of its own.
public enum BLAS {
    /// Limits the BLAS library's own threads (OpenBLAS keeps a pool).
    public static func setThreads(_ count: Int) {
        #if !canImport(Accelerate)
            openblas_set_num_threads(Int32(max(1, count)))
        #endif
    }

    /// `C[m×n] ← α·op(A)·op(B) + β·C`, row-major; op(A) is m×k, op(B) is k×n.
    public static func gemm<T: NormScalar>(
        transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: T = 1,
        _ a: UnsafePointer<T>, lda: Int, _ b: UnsafePointer<T>, ldb: Int, beta: T = 0,
        _ c: UnsafeMutablePointer<T>, ldc: Int
    ) {
        let ta = transposeA ? CblasTrans : CblasNoTrans
        let tb = transposeB ? CblasTrans : CblasNoTrans
        if T.self == Float.self {
            cblas_sgemm(
                CblasRowMajor, ta, tb, Int32(m), Int32(n), Int32(k), Float(alpha),
                UnsafeRawPointer(a).assumingMemoryBound(to: Float.self), Int32(lda),
                UnsafeRawPointer(b).assumingMemoryBound(to: Float.self), Int32(ldb), Float(beta),
                UnsafeMutableRawPointer(c).assumingMemoryBound(to: Float.self), Int32(ldc))
        } else {
            cblas_dgemm(
                CblasRowMajor, ta, tb, Int32(m), Int32(n), Int32(k), Double(alpha),
                UnsafeRawPointer(a).assumingMemoryBound(to: Double.self), Int32(lda),
                UnsafeRawPointer(b).assumingMemoryBound(to: Double.self), Int32(ldb), Double(beta),
                UnsafeMutableRawPointer(c).assumingMemoryBound(to: Double.self), Int32(ldc))
        }
    }
}
