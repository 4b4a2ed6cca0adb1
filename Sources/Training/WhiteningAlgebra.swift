import NormKit

/// The small dense algebra of the whitened layers, in Double: sample statistics, truncated PCA
/// whitening and conversions between harness tensors and ``Matrix``.
enum WhiteningAlgebra {
    /// Mean (d) and biased covariance (d×d, divided by m) of the m rows of a row-major m×d block.
    static func statistics<Scalar: NormScalar>(
        rows x: UnsafeBufferPointer<Scalar>, m: Int, d: Int
    ) -> (mean: [Double], covariance: Matrix) {
        var mean = [Double](repeating: 0, count: d)
        for i in 0..<m { for j in 0..<d { mean[j] += Double(x[i * d + j]) } }
        for j in 0..<d { mean[j] /= Double(max(m, 1)) }
        var centred = Matrix(rows: m, cols: d)
        for i in 0..<m {
            for j in 0..<d { centred.values[i * d + j] = Double(x[i * d + j]) - mean[j] }
        }
        var covariance = Matrix.product(centred, centred, transposeA: true)
        let scale = 1 / Double(max(m, 1))
        for i in covariance.values.indices { covariance.values[i] *= scale }
        return (mean, covariance)
    }

    /// Truncated PCA whitening of a covariance: with Σ + ε·mean(λ)·I = U Λ Uᵀ and U_k, Λ_k the k leading
    /// eigenpairs, `whitening = Λ_k^{-1/2} U_kᵀ` (k×d) and `inverse = U_k Λ_k^{1/2}` (d×k), its
    /// pseudo-inverse (inverse · whitening = U_k U_kᵀ, the projection on the kept subspace).
    ///
    /// The eigenvalues are clamped at ε (a covariance is positive semi-definite; LAPACK may return
    /// tiny negative values).
    /// - Throws: ``LinearAlgebraError`` when LAPACK fails (NaN or infinite entries).
    static func whitening(_ covariance: Matrix, rank k: Int, epsilon: Double) throws -> (
        whitening: Matrix, inverse: Matrix
    ) {
        let d = covariance.rows
        let (values, vectors) = try covariance.symmetricEigen()
        // ε relative to the mean eigenvalue: the same damping whatever the features' scale.
        let meanValue = values.reduce(0) { $0 + max($1, 0) } / Double(max(d, 1))
        let epsilon = epsilon * max(meanValue, Double.leastNormalMagnitude)
        var p = Matrix(rows: k, cols: d)
        var inverse = Matrix(rows: d, cols: k)
        for r in 0..<k {
            // Leading first: LAPACK returns ascending eigenvalues.
            let column = d - 1 - r
            let lambda = max(values[column], 0) + epsilon
            let (down, up) = (1 / lambda.squareRoot(), lambda.squareRoot())
            for j in 0..<d {
                let u = vectors[j, column]
                p[r, j] = down * u
                inverse[j, r] = up * u
            }
        }
        return (p, inverse)
    }

    /// A tensor of any shape as an r×c matrix (r·c must equal its count).
    static func matrix<Scalar: NormScalar>(_ t: Tensor<Scalar>, rows: Int, cols: Int) -> Matrix {
        Matrix(rows: rows, cols: cols, values: t.scalars.map { Double($0) })
    }

    /// A matrix as a tensor of `shape`, rounded to the element type.
    static func tensor<Scalar: NormScalar>(_ m: Matrix, shape: [Int]) throws -> Tensor<Scalar> {
        try Tensor(shape: shape, rounding: m.values)
    }

    /// A vector as a 1×n matrix.
    static func row(_ v: [Double]) -> Matrix { Matrix(rows: 1, cols: v.count, values: v) }

    /// m · v for a vector v.
    static func apply(_ m: Matrix, _ v: [Double]) -> [Double] {
        (0..<m.rows).map { i in (0..<m.cols).reduce(0) { $0 + m[i, $1] * v[$1] } }
    }
}
