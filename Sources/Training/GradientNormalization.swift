import NormKit

/// A backward-pass normalizer: the gradient of each weight, normalized before the optimiser
/// step, as the survey's Π → Φ → Ψ applied to gradients.
///
/// Π is a layer's weight gradient G, viewed as r×c with r = the weight's first dimension (the
/// outputs of a Linear or Conv2d, or of a whitened layer's V, W or A) and c the rest. Φ:
/// ```
/// scale:        G ← G / (‖G‖_F / √(r·c) + ε)                     (root mean square 1)
/// standardize:  Gᵢ ← (Gᵢ − mean(Gᵢ)) / (std(Gᵢ) + ε)   per row i   (biased std)
/// whiten:       G ← (G·Gᵀ/c + δI)^{-1/2} · G,  δ = ε·tr(G·Gᵀ/c)/r   ((1/c)·G·Gᵀ ≈ I)
/// ```
/// Ψ multiplies the result by `scale`, a learning-rate scale. Only parameters of rank ≥ 2 (the
/// weights of any layer of the harness) are normalized; biases and normalizer affine vectors
/// keep their gradients, and an all-zero gradient stays zero.
public struct GradientNormalization: Sendable, Hashable {
    /// Φ.
    public enum Method: String, Sendable, Hashable, CaseIterable, Codable {
        /// No normalization.
        case none
        /// Divide by the root mean square.
        case scale
        /// Per row: subtract the mean, divide by the standard deviation.
        case standardize
        /// Whiten the rows.
        case whiten
    }

    /// Φ.
    public var method: Method
    /// Ψ: the factor applied after Φ.
    public var scale: Double
    /// ε.
    public var epsilon: Double

    /// Creates a normalizer.
    public init(_ method: Method, scale: Double = 1, epsilon: Double = 1e-8) {
        self.method = method
        self.scale = scale
        self.epsilon = epsilon
    }

    /// Checks Ψ and ε.
    /// - Throws: ``TrainingError/invalidSetting(name:value:requirement:)``.
    public func validate() throws(TrainingError) {
        guard scale.isFinite, scale > 0 else {
            throw .invalidSetting(
                name: "gradient normalization scale", value: "\(scale)",
                requirement: "must be finite and > 0")
        }
        guard epsilon.isFinite, epsilon > 0 else {
            throw .invalidSetting(
                name: "gradient normalization epsilon", value: "\(epsilon)",
                requirement: "must be finite and > 0")
        }
    }

    /// Normalizes the gradient of every parameter of rank ≥ 2 in place.
    /// - Throws: ``LinearAlgebraError`` when whitening meets NaN or infinite gradients.
    public func apply<Scalar: NormScalar>(to parameters: [Parameter<Scalar>]) throws {
        guard method != .none else { return }
        for p in parameters where p.gradient.rank >= 2 && !p.isFrozen {
            let r = p.gradient.shape[0]
            let c = p.gradient.count / max(r, 1)
            guard r >= 1, c >= 1 else { continue }
            let g = try normalized(p.gradient.scalars.map { Double($0) }, rows: r, cols: c)
            p.gradient = try Tensor(shape: p.gradient.shape, rounding: g)
        }
    }

    /// Φ then Ψ on a row-major r×c gradient.
    func normalized(_ g: [Double], rows r: Int, cols c: Int) throws -> [Double] {
        guard g.contains(where: { $0 != 0 }) else { return g }
        switch method {
        case .none:
            return g
        case .scale:
            let rms = (g.reduce(0) { $0 + $1 * $1 } / Double(g.count)).squareRoot()
            return g.map { scale * $0 / (rms + epsilon) }
        case .standardize:
            var out = g
            for i in 0..<r {
                let row = g[(i * c)..<((i + 1) * c)]
                let mean = row.reduce(0, +) / Double(c)
                let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(c)
                let std = variance.squareRoot()
                for j in 0..<c { out[i * c + j] = scale * (g[i * c + j] - mean) / (std + epsilon) }
            }
            return out
        case .whiten:
            let m = Matrix(rows: r, cols: c, values: g)
            let gram = (1 / Double(c)) * Matrix.product(m, m, transposeB: true)
            let (values, vectors) = try gram.symmetricEigen()
            let damping = epsilon * max(gram.trace / Double(r), Double.leastNormalMagnitude)
            var root = Matrix(rows: r, cols: r)
            for k in 0..<r {
                let factor = scale / (max(values[k], 0) + damping).squareRoot()
                for i in 0..<r {
                    for j in 0..<r { root[i, j] += factor * vectors[i, k] * vectors[j, k] }
                }
            }
            return (root * m).values
        }
    }
}
