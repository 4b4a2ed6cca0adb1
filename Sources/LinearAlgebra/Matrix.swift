import CNormSIMD
import TensorCore

#if canImport(Accelerate)
    import Accelerate
#else
    import CLAPACKE
#endif

/// A small dense row-major matrix of Doubles (covariances, whitening matrices), with products
/// through BLAS and the symmetric eigendecomposition through LAPACK.
public struct Matrix: Sendable, Equatable {
    /// Rows.
    public var rows: Int
    /// Columns.
    public var cols: Int
    /// Row-major values.
    public var values: [Double]

    /// A zero matrix.
    @inlinable
    public init(rows: Int, cols: Int) {
        self.rows = rows
        self.cols = cols
        values = [Double](repeating: 0, count: rows * cols)
    }

    /// A matrix from values.
    @inlinable
    public init(rows: Int, cols: Int, values: [Double]) {
        precondition(
            values.count == rows * cols, "A \(rows)×\(cols) matrix needs \(rows * cols) values.")
        self.rows = rows
        self.cols = cols
        self.values = values
    }

    /// The identity.
    public static func identity(_ n: Int) -> Matrix {
        var m = Matrix(rows: n, cols: n)
        for i in 0..<n { m.values[i * n + i] = 1 }
        return m
    }

    /// Element access (inlinable: the whitening layers' d × d loops index it element by element).
    @inlinable
    public subscript(_ i: Int, _ j: Int) -> Double {
        get { values[i * cols + j] }
        set { values[i * cols + j] = newValue }
    }

    /// The transpose.
    public var transposed: Matrix {
        var t = Matrix(rows: cols, cols: rows)
        for i in 0..<rows { for j in 0..<cols { t.values[j * rows + i] = values[i * cols + j] } }
        return t
    }

    /// The trace.
    public var trace: Double { (0..<min(rows, cols)).reduce(0) { $0 + self[$1, $1] } }

    /// op(a)·op(b) through BLAS; untransposed products of at most 32³ multiply-adds (the
    /// whitening layers' d × d algebra for d ≤ 32) run in `CNormSIMD`'s AVX2 + FMA loop instead
    /// (see ``BLAS/registerKernels``): at these sizes `dgemm` spends more time packing and
    /// zeroing than multiplying.
    public static func product(
        _ a: Matrix, _ b: Matrix, transposeA: Bool = false, transposeB: Bool = false
    ) -> Matrix {
        let m = transposeA ? a.cols : a.rows
        let k = transposeA ? a.rows : a.cols
        let n = transposeB ? b.rows : b.cols
        precondition(k == (transposeB ? b.cols : b.rows), "Matrix product sizes do not agree.")
        var c = Matrix(rows: m, cols: n)
        #if arch(x86_64)
            if BLAS.registerKernels, !transposeA, !transposeB,
                m * n * k <= BLAS.registerKernelDoubleWork
            {
                a.values.withUnsafeBufferPointer { pa in
                    b.values.withUnsafeBufferPointer { pb in
                        c.values.withUnsafeMutableBufferPointer { pc in
                            nk_small_dgemm(
                                m, n, k, pa.baseAddress!, pb.baseAddress!, pc.baseAddress!)
                        }
                    }
                }
                return c
            }
        #endif
        a.values.withUnsafeBufferPointer { pa in
            b.values.withUnsafeBufferPointer { pb in
                c.values.withUnsafeMutableBufferPointer { pc in
                    BLAS.gemm(
                        transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k,
                        pa.baseAddress!,
                        lda: a.cols, pb.baseAddress!, ldb: b.cols, pc.baseAddress!, ldc: n)
                }
            }
        }
        return c
    }

    /// a·b.
    public static func * (a: Matrix, b: Matrix) -> Matrix { product(a, b) }
    /// Elementwise sum.
    @inlinable
    public static func + (a: Matrix, b: Matrix) -> Matrix {
        Matrix(rows: a.rows, cols: a.cols, values: zip(a.values, b.values).map { $0 + $1 })
    }
    /// Elementwise difference.
    @inlinable
    public static func - (a: Matrix, b: Matrix) -> Matrix {
        Matrix(rows: a.rows, cols: a.cols, values: zip(a.values, b.values).map { $0 - $1 })
    }
    /// Scaling.
    @inlinable
    public static func * (s: Double, a: Matrix) -> Matrix {
        Matrix(rows: a.rows, cols: a.cols, values: a.values.map { s * $0 })
    }
    /// Σ a ∘ b.
    @inlinable
    public static func frobenius(_ a: Matrix, _ b: Matrix) -> Double {
        zip(a.values, b.values).reduce(0) { $0 + $1.0 * $1.1 }
    }

    /// Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix, by `dsyev`.
    ///
    /// A 0×0 matrix has none (LAPACK is not called). LAPACK only ever sees a square, finite
    /// matrix whose size fits its 32-bit integers: anything else is refused first, so that a
    /// caller gets an error naming the problem rather than an `info` code (LAPACKE answers a NaN
    /// with −5, the number of its matrix argument).
    /// - Throws: ``LinearAlgebraError/invalidDimensions(routine:rows:cols:)`` for a non-square or
    ///   too large matrix; ``LinearAlgebraError/nonFinite(routine:)`` for NaN or infinite entries;
    ///   ``LinearAlgebraError/lapackFailure(routine:info:)`` when LAPACK still reports a failure
    ///   (the iteration did not converge).
    public func symmetricEigen() throws -> (values: [Double], vectors: Matrix) {
        let (values, a) = try eigen(vectors: true)
        #if canImport(Accelerate)
            // Column-major LAPACK: the eigenvectors are the columns of the column-major result.
            return (values, Matrix(rows: rows, cols: rows, values: a).transposed)
        #else
            return (values, Matrix(rows: rows, cols: rows, values: a))
        #endif
    }

    /// The eigenvalues (ascending) of a symmetric matrix, by `dsyev` without eigenvectors
    /// (several times faster than ``symmetricEigen()`` for large matrices); the same checks
    /// and errors.
    public func symmetricEigenvalues() throws -> [Double] {
        try eigen(vectors: false).values
    }

    /// `dsyev` after the checks of ``symmetricEigen()``: the eigenvalues and LAPACK's array
    /// (the eigenvectors, in its storage order, when asked for).
    func eigen(vectors: Bool) throws -> (values: [Double], array: [Double]) {
        guard rows == cols, rows <= Int(Int32.max) / 3 else {
            throw LinearAlgebraError.invalidDimensions(routine: "dsyev", rows: rows, cols: cols)
        }
        guard values.allSatisfy({ $0.isFinite }) else {
            throw LinearAlgebraError.nonFinite(routine: "dsyev")
        }
        if rows == 0 { return ([], []) }
        var a = values
        var w = [Double](repeating: 0, count: rows)
        let n = rows
        let job = Int8(UInt8(ascii: vectors ? "V" : "N"))
        #if canImport(Accelerate)
            var jobz = job
            var uplo = Int8(UInt8(ascii: "U"))
            var nn = __CLPK_integer(n)
            var lda = nn
            var lwork = __CLPK_integer(max(1, 3 * n))
            var work = [Double](repeating: 0, count: Int(lwork))
            var info: __CLPK_integer = 0
            // Column-major LAPACK on a symmetric matrix: the row-major values are its transpose,
            // which is the same matrix.
            dsyev_(&jobz, &uplo, &nn, &a, &lda, &w, &work, &lwork, &info)
            let status = Int(info)
        #else
            let status = Int(
                LAPACKE_dsyev(
                    LAPACK_ROW_MAJOR, job, Int8(UInt8(ascii: "U")), Int32(n), &a, Int32(n), &w))
        #endif
        guard status == 0 else {
            throw LinearAlgebraError.lapackFailure(routine: "dsyev", info: status)
        }
        return (w, a)
    }
}

/// A failure reported by BLAS or LAPACK.
public enum LinearAlgebraError: Error, Equatable, CustomStringConvertible {
    /// A LAPACK routine returned a non-zero `info`.
    case lapackFailure(routine: String, info: Int)
    /// The matrix has NaN or infinite entries (refused before LAPACK sees it).
    case nonFinite(routine: String)
    /// The matrix is not square, or too large for LAPACK's 32-bit sizes (refused before LAPACK).
    case invalidDimensions(routine: String, rows: Int, cols: Int)

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .lapackFailure(let routine, let info):
            return "LAPACK \(routine) failed (info \(info)): the iteration did not converge"
        case .nonFinite(let routine):
            return "\(routine): the matrix has NaN or infinite entries"
        case .invalidDimensions(let routine, let rows, let cols):
            return
                "\(routine): a \(rows)×\(cols) matrix is not square or is too large for LAPACK"
        }
    }
}
