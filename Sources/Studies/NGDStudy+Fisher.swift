import Foundation
import NormKit
import Training

extension NGDStudy {
    /// The exact empirical Fisher of one parameter block on a batch, and its damped natural
    /// gradient.
    ///
    /// With the per-example gradients Gᵢ (the rows of `rows`, m of them):
    /// ```
    /// ḡ = (1/m) Σᵢ Gᵢ          F = (1/m) Σᵢ Gᵢ Gᵢᵀ = U Λ Uᵀ
    /// λ = damping · mean(Λ)     F⁻¹g := (F + λI)⁻¹ ḡ = U (Λ + λI)⁻¹ Uᵀ ḡ
    /// κ = (max Λ + λ) / (min Λ + λ)
    /// ```
    /// The damping is relative to the mean eigenvalue, so κ does not depend on the
    /// parameters' scale and compares blocks in different coordinates.
    struct Fisher {
        /// ḡ.
        var gradient: [Double]
        /// F, n×n.
        var matrix: Matrix
        /// The eigenvalues of F, ascending (negative rounding errors clamped to 0).
        var eigenvalues: [Double]
        /// The eigenvectors (columns), when asked for.
        var eigenvectors: Matrix?
        /// λ.
        var damping: Double

        /// Forms F and ḡ from the rows; with `vectors`, also the eigenvectors (needed for the
        /// natural gradient).
        init(rows: Matrix, damping relative: Double, vectors: Bool = true) throws {
            let m = Double(max(rows.rows, 1))
            var f = Matrix.product(rows, rows, transposeA: true)
            for i in f.values.indices { f.values[i] /= m }
            gradient = (0..<rows.cols).map { j in
                (0..<rows.rows).reduce(0) { $0 + rows[$1, j] } / m
            }
            matrix = f
            if vectors {
                let (values, u) = try f.symmetricEigen()
                eigenvalues = values.map { max($0, 0) }
                eigenvectors = u
            } else {
                eigenvalues = try f.symmetricEigenvalues().map { max($0, 0) }
                eigenvectors = nil
            }
            let mean = eigenvalues.reduce(0, +) / Double(max(eigenvalues.count, 1))
            damping = relative * max(mean, Double.leastNormalMagnitude)
        }

        /// κ of F + λI.
        var condition: Double {
            ((eigenvalues.last ?? 0) + damping) / ((eigenvalues.first ?? 0) + damping)
        }

        /// (F + λI)⁻¹ v.
        func solve(_ v: [Double]) -> [Double] { solve(v, damping: damping) }

        /// (F + λ′I)⁻¹ v for another absolute damping λ′.
        func solve(_ v: [Double], damping: Double) -> [Double] {
            guard let u = eigenvectors else { return [] }
            let n = v.count
            var coefficients = [Double](repeating: 0, count: n)
            for c in 0..<n {
                var dot = 0.0
                for i in 0..<n { dot += u[i, c] * v[i] }
                coefficients[c] = dot / (eigenvalues[c] + damping)
            }
            var out = [Double](repeating: 0, count: n)
            for i in 0..<n {
                var s = 0.0
                for c in 0..<n { s += u[i, c] * coefficients[c] }
                out[i] = s
            }
            return out
        }

        /// The damped natural gradient (F + λI)⁻¹ ḡ.
        var natural: [Double] { solve(gradient) }

        /// (F + λ′I)⁻¹ ḡ with λ′ = `relative` · mean(Λ).
        func natural(relativeDamping relative: Double) -> [Double] {
            let mean = eigenvalues.reduce(0, +) / Double(max(eigenvalues.count, 1))
            return solve(gradient, damping: relative * max(mean, Double.leastNormalMagnitude))
        }
    }

    /// cos(a, b) (0 when either is zero).
    static func cosine(_ a: [Double], _ b: [Double]) -> Double {
        var (ab, aa, bb) = (0.0, 0.0, 0.0)
        for (x, y) in zip(a, b) {
            ab += x * y
            aa += x * x
            bb += y * y
        }
        guard aa > 0, bb > 0 else { return 0 }
        return ab / (aa.squareRoot() * bb.squareRoot())
    }

    /// (W, b) flattened as the rows of ``outerRows(_:scale:_:)`` lay them out: for each output
    /// o, W[o, 0…d−1] then b[o].
    static func flatten(_ w: Matrix, _ b: [Double]) -> [Double] {
        var out: [Double] = []
        out.reserveCapacity(w.rows * (w.cols + 1))
        for o in 0..<w.rows {
            for j in 0..<w.cols { out.append(w[o, j]) }
            out.append(b[o])
        }
        return out
    }

    /// The second, stronger damping of the natural gradient (× the mean eigenvalue): with
    /// κ ~ 10⁵, (F + λI)⁻¹ḡ at the weak damping is dominated by the smallest eigenvalues, which
    /// a batch of m examples estimates worst.
    static let strongDamping = 0.1

    /// What one probe measured on one layer.
    struct LayerProbe: Sendable {
        /// cos(−Δθ_eff, F⁻¹g): the step SGD takes on the layer's own parameters, as the change
        /// of (W_eff, b_eff), against the damped natural gradient in those coordinates.
        var updateCosine: Double
        /// cos(ḡ, F⁻¹g) at the same weights: what a plain SGD step on (W_eff, b_eff) would do.
        var gradientCosine: Double
        /// The step's cosine with the natural gradient under the stronger damping
        /// ``strongDamping`` (× the mean eigenvalue).
        var updateCosineStrong: Double
        /// cos(ḡ, ·) under the stronger damping.
        var gradientCosineStrong: Double
        /// κ of the Fisher block of (W_eff, b_eff).
        var effectiveCondition: Double
        /// κ of the Fisher block of the layer's own trainable weight and bias.
        var ownCondition: Double
        /// κ of the input-side Kronecker factor of that block, the second moment of [âᵢ, 1]
        /// (≈ 1 right after a whitening refresh on the same batch).
        var inputFactorCondition: Double
    }

    /// Measures every layer of `net` on the batch (x, labels), leaving its parameters and
    /// buffers as they were.
    ///
    /// The batch's gradient comes from one forward and backward pass: in training mode for BN
    /// (batch statistics, as its SGD step sees them; running statistics restored after), in
    /// inference mode for the whitened layers (their current whitening, no refresh). A trial
    /// SGD step of learning rate η on each layer's own parameters gives the change of its
    /// effective map, which is compared with the natural gradient of the effective map's
    /// Fisher on the same batch.
    static func probe(
        _ net: Network, _ x: Tensor<Double>, _ labels: [Int], learningRate eta: Double,
        damping: Double
    ) throws -> [LayerProbe] {
        let buffers = net.buffers
        let mode: Mode = net.layers[0].method == .bn ? .training : .inference
        _ = try net.lossAndGradients(x, labels, mode: mode)
        var result: [LayerProbe] = []
        for layer in net.layers {
            let fisher = try Fisher(rows: layer.effectiveRows(), damping: damping)
            let natural = fisher.natural
            let strong = fisher.natural(relativeDamping: strongDamping)
            let before = layer.effective()
            let saved = layer.parameters.map(\.value)
            for p in layer.parameters { try descend(p, eta) }
            let after = layer.effective()
            for (p, v) in zip(layer.parameters, saved) { p.value = v }
            let change = zip(flatten(before.weight, before.bias), flatten(after.weight, after.bias))
                .map { $0 - $1 }  // −Δθ_eff
            let own =
                layer.method == .plain
                ? fisher.condition
                : try Fisher(rows: layer.ownRows(), damping: damping, vectors: false).condition
            let inputFactor = try Fisher(
                rows: layer.ownInputFactorRows(), damping: damping, vectors: false)
            result.append(
                LayerProbe(
                    updateCosine: cosine(change, natural),
                    gradientCosine: cosine(fisher.gradient, natural),
                    updateCosineStrong: cosine(change, strong),
                    gradientCosineStrong: cosine(fisher.gradient, strong),
                    effectiveCondition: fisher.condition, ownCondition: own,
                    inputFactorCondition: inputFactor.condition))
        }
        for p in net.parameters { p.zeroGradient() }
        try net.loadBuffers(buffers)
        return result
    }
}
