import Foundation
import LinearAlgebra
import Normalization

/// How a whitening layer turns a covariance Σ (d × d, ε already added) into W ≈ Σ^{-1/2}, and
/// dL/dW back into dL/dΣ.
///
/// ```
/// eigendecomposition:  Σ = D Λ Dᵀ,  W = D Λ^{-1/2} Dᵀ                        (ZCA, DBN)
/// newton(T):           P₀ = I, P_k = (3P_{k−1} − P_{k−1}³Σ_N)/2, W = P_T/√tr Σ  (IterNorm, SW)
/// ```
/// The eigendecomposition's backward is the Daleckii–Krein formula for a matrix function f:
/// `dΣ = D (K ∘ Dᵀ sym(dW) D) Dᵀ` with `K_ij = (f(λ_i) − f(λ_j))/(λ_i − λ_j)` and
/// `K_ii = f′(λ_i)`; for f(λ) = λ^{-1/2} that is `K_ij = −1/(√λ_i √λ_j (√λ_i + √λ_j))`, which
/// has no eigenvalue gap in a denominator, so repeated eigenvalues (equal channels, ε-dominated
/// groups) give an exact gradient. Newton's backward runs the T iterations in reverse
/// (``NewtonWhitening``, normalizers-spec.md §6.2). Both return dΣ symmetrised.
public enum WhiteningMethod: Sendable, Equatable, CustomStringConvertible {
    /// ZCA whitening by LAPACK's symmetric eigendecomposition (`dsyev`).
    case eigendecomposition
    /// Newton's iterations on the trace-normalized covariance; tends to ZCA as T grows.
    case newton(iterations: Int)

    /// What backward needs besides W.
    enum Factors: Sendable {
        /// Eigenvalues (floored as W used them) and eigenvectors (columns).
        case eigen(values: [Double], vectors: Matrix)
        /// Σ and the iterates P₀…P_T.
        case newton(sigma: Matrix, iterates: [Matrix])
    }

    /// W and the factors of its backward.
    /// - Throws: ``NormError/nonFiniteStatistics(layer:)`` naming `layer` when Σ or W has a NaN
    ///   or infinite entry (NaN or overflowing input), ``LinearAlgebraError`` when LAPACK fails.
    func whitening(_ sigma: Matrix, epsilon: Double, layer: String) throws -> (
        w: Matrix, factors: Factors
    ) {
        guard sigma.values.allSatisfy(\.isFinite) else {
            throw NormError.nonFiniteStatistics(layer: layer)
        }
        let result = try unchecked(sigma, epsilon: epsilon)
        guard result.w.values.allSatisfy(\.isFinite) else {
            throw NormError.nonFiniteStatistics(layer: layer)
        }
        return result
    }

    func unchecked(_ sigma: Matrix, epsilon: Double) throws -> (w: Matrix, factors: Factors) {
        switch self {
        case .eigendecomposition:
            let (raw, d) = try sigma.symmetricEigen()
            // ε is on Σ's diagonal, so λ ≥ ε up to rounding; the floor only guards that rounding.
            let floor = epsilon * 1e-6
            let lambda = raw.map { max($0, floor) }
            var scaled = d
            for i in 0..<d.rows {
                for j in 0..<d.cols { scaled[i, j] /= lambda[j].squareRoot() }
            }
            return (Matrix.product(scaled, d, transposeB: true), .eigen(values: lambda, vectors: d))
        case .newton(let iterations):
            let (w, iterates) = NewtonWhitening.forward(sigma, iterations: iterations)
            return (w, .newton(sigma: sigma, iterates: iterates))
        }
    }

    /// The symmetrised dL/dΣ from dL/dW.
    static func backward(_ dW: Matrix, _ factors: Factors) -> Matrix {
        switch factors {
        case .eigen(let lambda, let d):
            let n = d.rows
            let root = lambda.map { $0.squareRoot() }
            let symmetric = 0.5 * (dW + dW.transposed)
            var inner = Matrix.product(Matrix.product(d, symmetric, transposeA: true), d)
            for i in 0..<n {
                for j in 0..<n { inner[i, j] *= -1 / (root[i] * root[j] * (root[i] + root[j])) }
            }
            return Matrix.product(Matrix.product(d, inner), d, transposeB: true)
        case .newton(let sigma, let iterates):
            return NewtonWhitening.backward(dW, sigma: sigma, iterates: iterates)
        }
    }

    /// `eigendecomposition` or `newton(T=…)`.
    public var description: String {
        switch self {
        case .eigendecomposition: return "eigendecomposition"
        case .newton(let t): return "newton(T=\(t))"
        }
    }
}
