import TensorCore

/// Weight Standardization: each output filter standardized over its fan-in, before the layer
/// uses it; meant to be followed by GroupNorm (or BatchNorm) on the activations.
///
/// Two conventions, both in use:
/// ```
/// official:  w = (v − μ) / (σ_u + ε)      σ_u² = Σ(v − μ)²/(n − 1), ε = 1e-5 outside the root
/// bit:       w = (v − μ) / √(σ_b² + ε)    σ_b² = Σ(v − μ)²/n,       ε = 1e-10 inside the root
/// ```
/// with μ and σ over the n = C_in·kh·kw weights of one output channel. Backward, with
/// c = v − μ and G = dL/dw:
/// ```
/// official:  q = σ_u + ε;  dv = (G − mean G)/q − (Σ G ⊙ c) · c / (q² (n − 1) σ_u)
/// bit:       r = 1/√(σ_b² + ε), ŵ = c·r;  dv = r · (G − mean G − ŵ · mean(G ⊙ ŵ))
/// ```
/// There are no parameters besides the original weight (`parametrizations.weight.original`).
/// The official convention needs n ≥ 2 (an unbiased variance of one value is undefined);
/// a filter with σ = 0 and ε = 0 is refused rather than turned into NaN.
///
/// ## References
/// 1. Qiao, Wang, Liu, Shen & Yuille 2019, arXiv:1903.10520; official code
///    joe-siyuan-qiao/WeightStandardization.
/// 2. Kolesnikov et al. 2020, "Big Transfer (BiT)", arXiv:1912.11370 (StdConv2d).
public final class WeightStandardization<Scalar: NormScalar>: WeightParametrization {
    /// Which variance and where ε goes.
    public enum Convention: String, Sendable, Hashable, CaseIterable {
        /// The official code: unbiased standard deviation, ε added to it (default 1e-5).
        case official
        /// BiT's StdConv2d: biased variance, ε inside the square root (default 1e-10).
        case bit

        /// The convention's own ε.
        public var defaultEpsilon: Double { self == .official ? 1e-5 : 1e-10 }
    }

    /// Key of the original weight.
    public static var originalKey: String { "parametrizations.weight.original" }

    /// The convention.
    public let convention: Convention
    /// ε.
    public let epsilon: Double
    /// v.
    public private(set) var original: Tensor<Scalar>
    let rows: AxisRows
    /// c = v − μ (row-major) and the per-row σ (σ_u or σ_b) of the last call.
    var cache: (centred: [Double], sigma: [Double])?

    /// - Parameters:
    ///   - weight: the original weight, `[out, …]`.
    ///   - convention: ``Convention/official`` or ``Convention/bit``.
    ///   - epsilon: ε ≥ 0 (nil: the convention's own).
    /// - Throws: ``WeightNormError/noVariance(method:parameter:fanIn:shape:)`` for the official
    ///   convention on a fan-in of 1; ``WeightNormError`` for an empty weight; ``NormError``
    ///   for a negative ε.
    public init(weight: Tensor<Scalar>, convention: Convention = .official, epsilon: Double? = nil)
        throws
    {
        let eps = epsilon ?? convention.defaultEpsilon
        guard eps >= 0, eps.isFinite else {
            throw NormError.invalidHyperparameter(
                name: "WeightStandardization ε", value: "\(eps)", requirement: "finite and ≥ 0")
        }
        rows = try AxisRows(
            shape: weight.shape, axis: 0, method: "WeightStandardization",
            parameter: Self.originalKey)
        if convention == .official && rows.cols < 2 {
            throw WeightNormError.noVariance(
                method: "WeightStandardization", parameter: Self.originalKey, fanIn: rows.cols,
                shape: weight.shape)
        }
        self.convention = convention
        self.epsilon = eps
        original = weight
    }

    /// `"WeightStandardization"`.
    public var displayName: String { "WeightStandardization" }
    /// v's shape.
    public var weightShape: [Int] { original.shape }
    /// The original weight.
    public var parameters: [String: Tensor<Scalar>] { [Self.originalKey: original] }
    /// None.
    public var buffers: [String: Tensor<Scalar>] { [:] }

    /// Replaces the original weight (shape-checked).
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        if let v = values[Self.originalKey] { original = v }
        cache = nil
    }

    /// The denominator of a row: σ_u + ε or √(σ_b² + ε).
    @inline(__always)
    func denominator(_ sigma: Double) -> Double {
        convention == .official ? sigma + epsilon : (sigma * sigma + epsilon).squareRoot()
    }

    /// The standardized weight.
    public func weight(mode: Mode) throws -> Tensor<Scalar> {
        let (c, squares) = rows.centred(original)
        let n = rows.cols
        var out = c
        var sigmas = [Double](repeating: 0, count: rows.rows)
        let divisor = Double(convention == .official ? n - 1 : n)
        for r in 0..<rows.rows {
            let sigma = (squares[r] / divisor).squareRoot()
            let q = denominator(sigma)
            guard q > 0 else {
                throw WeightNormError.zeroNorm(
                    method: displayName, parameter: Self.originalKey, row: r,
                    shape: original.shape)
            }
            sigmas[r] = sigma
            for j in (r * n)..<((r + 1) * n) { out[j] = c[j] / q }
        }
        cache = (c, sigmas)
        return try rows.scatter(out)
    }

    /// dv (see the type's documentation).
    public func backward(_ weightGradient: Tensor<Scalar>) throws -> [String: Tensor<Scalar>] {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let grad = try rows.gatheredGradient(weightGradient)
        let n = rows.cols
        var dv = grad
        for r in 0..<rows.rows {
            let sigma = cache.sigma[r]
            let q = denominator(sigma)
            let meanG = row(grad, r, n).reduce(0, +) / Double(n)
            let gc = dot(row(grad, r, n), row(cache.centred, r, n))
            // official: q = σ_u + ε, ∂σ_u/∂c = c/((n − 1)σ_u); bit: q = √(σ_b² + ε),
            // ∂q/∂c = c/(n q). Both give dv = (G − mean G)/q − k·c.
            let k: Double
            switch convention {
            case .official: k = sigma > 0 ? gc / (q * q * Double(n - 1) * sigma) : 0
            case .bit: k = gc / (q * q * q * Double(n))
            }
            for j in (r * n)..<((r + 1) * n) {
                dv[j] = (grad[j] - meanG) / q - k * cache.centred[j]
            }
        }
        return [Self.originalKey: try rows.scatter(dv)]
    }
}
