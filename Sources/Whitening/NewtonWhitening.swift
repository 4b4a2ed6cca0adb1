import Foundation
import LinearAlgebra

/// Σ^{-1/2} by Newton's iterations on the trace-normalized covariance, and its exact backward:
/// shared by ``IterNorm`` and ``SwitchableWhitening``.
///
/// ```
/// Σ_N = Σ/tr Σ,  P₀ = I,  P_k = (3P_{k−1} − P_{k−1}³Σ_N)/2,  W = P_T/√tr Σ
/// ```
/// The backward runs the iterations in reverse (normalizers-spec.md §6.2) and returns the
/// symmetrised dL/dΣ.
enum NewtonWhitening {
    /// W and the iterates P₀…P_T.
    static func forward(_ sigma: Matrix, iterations: Int) -> (whitening: Matrix, iterates: [Matrix])
    {
        let tr = sigma.trace
        let sn = (1 / tr) * sigma
        var p = Matrix.identity(sigma.rows)
        var iterates = [p]
        for _ in 0..<iterations {
            p = 1.5 * p - 0.5 * (p * p * p * sn)
            iterates.append(p)
        }
        return ((1 / tr.squareRoot()) * p, iterates)
    }

    /// The symmetrised dL/dΣ from dL/dW.
    static func backward(_ dW: Matrix, sigma: Matrix, iterates ps: [Matrix]) -> Matrix {
        let iterations = ps.count - 1
        let tr = sigma.trace
        let sn = (1 / tr) * sigma
        var dP = (1 / tr.squareRoot()) * dW
        let dtr = -0.5 * pow(tr, -1.5) * Matrix.frobenius(dW, ps[iterations])
        var dSn = Matrix(rows: sigma.rows, cols: sigma.cols)
        // Every iterate is a polynomial in Σ_N, so A = P_{k−1} is symmetric and commutes with
        // Σ_N: the step's three terms dP (A²Σ_N)ᵀ + Aᵀ dP (AΣ_N)ᵀ + A²ᵀ dP Σ_Nᵀ are
        // (dP A² + A dP A + A² dP) Σ_N, and A³ᵀ dP = A (A (A dP)): 7 products instead of 10.
        for step in stride(from: iterations, through: 1, by: -1) {
            let a = ps[step - 1]
            let aDP = a * dP
            let a2DP = a * aDP
            dSn = dSn - 0.5 * (a * a2DP)
            let inner = dP * (a * a) + aDP * a + a2DP
            dP = 1.5 * dP - 0.5 * (inner * sn)
        }
        var dSigma = (1 / tr) * dSn
        let diagonal = dtr - Matrix.frobenius(dSn, sigma) / (tr * tr)
        for i in 0..<dSigma.rows { dSigma[i, i] += diagonal }
        return 0.5 * (dSigma + dSigma.transposed)
    }
}
