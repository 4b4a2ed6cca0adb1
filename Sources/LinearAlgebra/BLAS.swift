import CNormSIMD
import TensorCore

#if canImport(Accelerate)
    import Accelerate
#else
    import COpenBLAS
#endif

/// Matrix products through the platform BLAS (OpenBLAS on Linux, Accelerate on Apple).
///
/// Row-major `C ← α·op(A)·op(B) + β·C` with `op` the identity or the transpose. Two shapes skip
/// the library on x86-64 machines with AVX2 and FMA (``registerKernels``): Float products with
/// a short inner dimension (a whitening matrix times rows of data), and small Double products
/// (``Matrix/product(_:_:transposeA:transposeB:)``); at those sizes BLAS spends more time
/// packing its operands than multiplying.
public enum BLAS {
    /// OpenBLAS starts single-threaded in NormKit.
    ///
    /// Its products are small next to the work NormKit splits over its own threads, and a thread count that changes while another thread
    /// is inside a GEMM (the setting is global) is a race. Set once, on first use.
    private static let startsSingleThreaded: Bool = {
        #if !canImport(Accelerate)
            openblas_set_num_threads(1)
        #endif
        return true
    }()

    /// Whether the AVX2 + FMA register kernels of `CNormSIMD` replace BLAS for the small
    /// shapes named above: on x86-64 with AVX2 and FMA, unless the environment sets
    /// `NORMKIT_SIMD=baseline`.
    public static let registerKernels: Bool = {
        #if arch(x86_64)
            return nk_simd_enabled() == 1
        #else
            return false
        #endif
    }()

    /// The longest inner dimension k for which a Float product runs in the register kernel.
    static let registerKernelDepth = 64

    /// The most multiply-adds (m·n·k, 32³) of a Double ``Matrix`` product that runs in the
    /// register kernel.
    static let registerKernelDoubleWork = 1 << 15

    /// Limits the BLAS library's own threads (OpenBLAS keeps a pool); the default is 1.
    ///
    /// The setting is process-wide: call it before work starts (`normkit train --threads`),
    /// not while other threads multiply matrices.
    public static func setThreads(_ count: Int) {
        _ = startsSingleThreaded
        #if !canImport(Accelerate)
            let wanted = Int32(max(1, count))
            if openblas_get_num_threads() != wanted { openblas_set_num_threads(wanted) }
        #endif
    }

    /// The BLAS library's thread count (1 where the library has no pool of its own).
    public static var threadCount: Int {
        _ = startsSingleThreaded
        #if canImport(Accelerate)
            return 1
        #else
            return Int(openblas_get_num_threads())
        #endif
    }

    /// Runs `body` with BLAS limited to the calling thread.
    ///
    /// Callers that already split their work over NormKit's own threads use this: OpenBLAS's
    /// threads would otherwise spin (`sched_yield`) against them. BLAS is single-threaded by
    /// default, so this changes nothing unless someone raised the count; it then lowers it to 1
    /// for good rather than toggling the process-wide setting on every call.
    public static func singleThreaded<R>(_ body: () throws -> R) rethrows -> R {
        if threadCount != 1 { setThreads(1) }
        return try body()
    }

    /// The upper triangle of `C[n×n] ← α·A·Aᵀ + β·C` (`ssyrk`/`dsyrk`), row-major, A is n×k
    /// with row stride lda: half the work of a general product; the lower triangle is left
    /// untouched.
    public static func syrk<T: NormScalar>(
        n: Int, k: Int, alpha: T = 1, _ a: UnsafePointer<T>, lda: Int, beta: T = 0,
        _ c: UnsafeMutablePointer<T>, ldc: Int
    ) {
        _ = startsSingleThreaded
        if T.self == Float.self {
            cblas_ssyrk(
                CblasRowMajor, CblasUpper, CblasNoTrans, Int32(n), Int32(k), Float(alpha),
                UnsafeRawPointer(a).assumingMemoryBound(to: Float.self), Int32(lda), Float(beta),
                UnsafeMutableRawPointer(c).assumingMemoryBound(to: Float.self), Int32(ldc))
        } else {
            cblas_dsyrk(
                CblasRowMajor, CblasUpper, CblasNoTrans, Int32(n), Int32(k), Double(alpha),
                UnsafeRawPointer(a).assumingMemoryBound(to: Double.self), Int32(lda),
                Double(beta), UnsafeMutableRawPointer(c).assumingMemoryBound(to: Double.self),
                Int32(ldc))
        }
    }

    /// `C[m×n] ← α·op(A)·op(B) + β·C` (`sgemm`/`dgemm`), row-major; op(A) is m×k, op(B) is
    /// k×n; lda, ldb, ldc are the row strides of A, B and C as stored (blocks of a larger array).
    public static func gemm<T: NormScalar>(
        transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: T = 1,
        _ a: UnsafePointer<T>, lda: Int, _ b: UnsafePointer<T>, ldb: Int, beta: T = 0,
        _ c: UnsafeMutablePointer<T>, ldc: Int
    ) {
        #if arch(x86_64)
            if T.self == Float.self, registerKernels, !transposeA, !transposeB, alpha == 1,
                beta == 0 || beta == 1, k <= registerKernelDepth
            {
                nk_small_sgemm(
                    m, n, k, UnsafeRawPointer(a).assumingMemoryBound(to: Float.self), lda,
                    UnsafeRawPointer(b).assumingMemoryBound(to: Float.self), ldb,
                    UnsafeMutableRawPointer(c).assumingMemoryBound(to: Float.self), ldc,
                    beta == 1 ? 1 : 0)
                return
            }
        #endif
        _ = startsSingleThreaded
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
