import TensorCore

/// Spectral Normalization: the weight divided by an estimate of its largest singular value.
///
/// ```
/// W_m = W with axis `dim` moved to the front, flattened to [h, w]
/// power iteration (training mode only, `powerIterations` times, without gradient):
///     uFirst (torch.nn.utils.parametrizations.spectral_norm):  u ← N(W_m v); v ← N(W_mᵀ u)
///     vFirst (the legacy torch.nn.utils.spectral_norm hook):    v ← N(W_mᵀ u); u ← N(W_m v)
/// N(z) = z / max(‖z‖, ε),  σ = uᵀ W_m v,  W_SN = W / σ
/// ```
/// Inference reuses the stored u and v (σ from the current W). u and v are constants for the
/// gradient, as in PyTorch:
/// ```
/// dW = (G − Σ(G ⊙ W_SN) · u vᵀ) / σ
/// ```
/// u and v start as normalized Gaussians from `seed`; the `uFirst` form then runs 15
/// iterations, as PyTorch's registration does (the legacy hook runs none). A 1-D weight in the
/// `uFirst` form is just normalized, w = v / max(‖v‖, ε), with no u or v (PyTorch's exact
/// path); the legacy form treats it as an [h, 1] matrix, as the hook does.
///
/// Keys: `parametrizations.weight.original`, `parametrizations.weight.0._u`, `…_v`; legacy
/// `weight_orig`, `weight_u`, `weight_v`. A weight with a zero dimension, or σ = 0, is refused.
///
/// ## Shape
/// weight: any rank ≥ 1; u: [h] (the size of `dim`); v: [w] (the other sizes' product).
///
/// ## References
/// 1. Miyato, Kataoka, Koyama & Yoshida 2018, arXiv:1802.05957.
public final class SpectralNorm<Scalar: NormScalar>: WeightParametrization {
    /// Which vector the power iteration updates first (and which keys the state uses).
    public enum Order: String, Sendable, Hashable, CaseIterable {
        /// u first, then v: `torch.nn.utils.parametrizations.spectral_norm`.
        case uFirst
        /// v first, then u: the legacy `torch.nn.utils.spectral_norm` hook.
        case vFirst
    }

    /// The axis that becomes the matrix rows (1 for transposed convolutions).
    public let dim: Int
    /// Iterations per training-mode call (≥ 1).
    public let powerIterations: Int
    /// The most power iterations per call that are accepted (PyTorch's default is 1; the
    /// iteration converges geometrically, so more than this only spends time).
    public static var maximumPowerIterations: Int { 10_000 }
    /// ε of the normalizations.
    public let epsilon: Double
    /// The power-iteration order and key names.
    public let order: Order
    /// The original weight.
    public private(set) var original: Tensor<Scalar>
    /// u, [h] (nil for a 1-D weight in the `uFirst` form).
    public private(set) var u: Tensor<Scalar>?
    /// v, [w].
    public private(set) var v: Tensor<Scalar>?
    /// σ of the last call.
    public private(set) var lastSigma: Double?
    let rows: AxisRows
    /// (σ, u, v, W_SN row-major) of the last call, or (‖v‖, [], [], ŵ) on the 1-D path.
    var cache: (sigma: Double, u: [Double], v: [Double], normalized: [Double])?

    /// Key of the original weight.
    public var originalKey: String {
        order == .uFirst ? "parametrizations.weight.original" : "weight_orig"
    }
    /// Key of u.
    public var uKey: String { order == .uFirst ? "parametrizations.weight.0._u" : "weight_u" }
    /// Key of v.
    public var vKey: String { order == .uFirst ? "parametrizations.weight.0._v" : "weight_v" }

    /// Whether the weight is just normalized (1-D, `uFirst`).
    var isVector: Bool { order == .uFirst && original.rank == 1 }

    /// - Parameters:
    ///   - weight: the original weight.
    ///   - dim: the row axis, in 0..<rank.
    ///   - powerIterations: iterations per training-mode call (PyTorch's n_power_iterations).
    ///   - epsilon: ε of the normalizations (1e-12).
    ///   - order: ``Order/uFirst`` (current PyTorch) or ``Order/vFirst`` (legacy hook).
    ///   - seed: seed of the Gaussian start of u and v.
    /// - Throws: ``WeightNormError`` for an empty weight or `dim` out of range; ``NormError``
    ///   for fewer than one iteration or a negative ε.
    public init(
        weight: Tensor<Scalar>, dim: Int = 0, powerIterations: Int = 1, epsilon: Double = 1e-12,
        order: Order = .uFirst, seed: UInt64 = 0
    ) throws {
        guard powerIterations >= 1, epsilon >= 0, epsilon.isFinite else {
            throw NormError.invalidHyperparameter(
                name: "SpectralNorm iterations, ε", value: "\(powerIterations), \(epsilon)",
                requirement: "at least 1 iteration and a finite ε ≥ 0")
        }
        try HyperparameterCheck.count(
            powerIterations, limit: Self.maximumPowerIterations, name: "power iterations")
        let key = order == .uFirst ? "parametrizations.weight.original" : "weight_orig"
        rows = try AxisRows(shape: weight.shape, axis: dim, method: "SpectralNorm", parameter: key)
        self.dim = dim
        self.powerIterations = powerIterations
        self.epsilon = epsilon
        self.order = order
        original = weight
        if order == .uFirst && weight.rank == 1 { return }
        var g = SeededGenerator(seed: seed)
        let u0 = normalize((0..<rows.rows).map { _ in g.nextNormal() })
        let v0 = normalize((0..<rows.cols).map { _ in g.nextNormal() })
        let m = rows.gather(weight)
        let (u1, v1) = order == .uFirst ? iterate(m, u0, v0, count: 15) : (u0, v0)
        u = try Tensor(shape: [rows.rows], rounding: u1)
        v = try Tensor(shape: [rows.cols], rounding: v1)
    }

    /// `"SpectralNorm"`.
    public var displayName: String { "SpectralNorm" }
    /// The weight's shape.
    public var weightShape: [Int] { original.shape }
    /// The original weight.
    public var parameters: [String: Tensor<Scalar>] { [originalKey: original] }
    /// u and v.
    public var buffers: [String: Tensor<Scalar>] {
        guard let u, let v else { return [:] }
        return [uKey: u, vKey: v]
    }

    /// Replaces the original weight (shape-checked).
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        if let w = values[originalKey] { original = w }
        cache = nil
    }

    /// Replaces u and/or v (shape-checked: u has the length of `dim`, v the rest).
    public func setBuffers(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: buffers, layer: displayName)
        if let t = values[uKey] { u = t }
        if let t = values[vKey] { v = t }
    }

    /// N(z) = z / max(‖z‖, ε).
    func normalize(_ z: [Double]) -> [Double] {
        let norm = max(dot(z[...], z[...]).squareRoot(), epsilon)
        return z.map { $0 / norm }
    }

    /// `count` power iterations in this form's order.
    func iterate(_ m: [Double], _ u0: [Double], _ v0: [Double], count: Int) -> (
        [Double], [Double]
    ) {
        var (u, v) = (u0, v0)
        let (h, w) = (rows.rows, rows.cols)
        func mv(_ x: [Double]) -> [Double] { (0..<h).map { dot(row(m, $0, w), x[...]) } }
        func mtv(_ y: [Double]) -> [Double] {
            var out = [Double](repeating: 0, count: w)
            for r in 0..<h where y[r] != 0 {
                for j in 0..<w { out[j] += m[r * w + j] * y[r] }
            }
            return out
        }
        for _ in 0..<count {
            if order == .uFirst {
                u = normalize(mv(v))
                v = normalize(mtv(u))
            } else {
                v = normalize(mtv(u))
                u = normalize(mv(v))
            }
        }
        return (u, v)
    }

    /// W / σ; in training mode u and v first advance by ``powerIterations`` iterations.
    /// - Throws: ``WeightNormError/zeroNorm(method:parameter:row:shape:)`` when σ = 0 (u and
    ///   v are then left as they were).
    public func weight(mode: Mode) throws -> Tensor<Scalar> {
        let m = rows.gather(original)
        if isVector {
            let norm = dot(m[...], m[...]).squareRoot()
            let denominator = max(norm, epsilon)
            guard denominator > 0 else {
                throw WeightNormError.zeroNorm(
                    method: displayName, parameter: originalKey, row: nil, shape: original.shape)
            }
            let out = m.map { $0 / denominator }
            cache = (norm, [], [], out)
            lastSigma = denominator
            return try rows.scatter(out)
        }
        var uu = (u?.scalars ?? []).map { Double($0) }
        var vv = (v?.scalars ?? []).map { Double($0) }
        if mode == .training { (uu, vv) = iterate(m, uu, vv, count: powerIterations) }
        var sigma = 0.0
        for r in 0..<rows.rows where uu[r] != 0 {
            sigma += uu[r] * dot(row(m, r, rows.cols), vv[...])
        }
        guard sigma != 0, sigma.isFinite else {
            throw WeightNormError.zeroNorm(
                method: displayName, parameter: originalKey, row: nil, shape: original.shape)
        }
        let out = m.map { $0 / sigma }
        if mode == .training {
            u = try Tensor(shape: [rows.rows], rounding: uu)
            v = try Tensor(shape: [rows.cols], rounding: vv)
        }
        cache = (sigma, uu, vv, out)
        lastSigma = sigma
        return try rows.scatter(out)
    }

    /// dW = (G − Σ(G ⊙ W_SN)·u vᵀ)/σ (1-D: the gradient of v/max(‖v‖, ε)).
    public func backward(_ weightGradient: Tensor<Scalar>) throws -> [String: Tensor<Scalar>] {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let grad = try rows.gatheredGradient(weightGradient)
        let gw = dot(grad[...], cache.normalized[...])
        var dw = grad
        if isVector {
            // ‖v‖ > ε: the norm's gradient; otherwise the denominator is the constant ε.
            let norm = cache.sigma
            let denominator = max(norm, epsilon)
            for j in dw.indices {
                dw[j] =
                    norm > epsilon
                    ? (grad[j] - cache.normalized[j] * gw) / norm : grad[j] / denominator
            }
        } else {
            let w = rows.cols
            for r in 0..<rows.rows {
                for j in 0..<w {
                    dw[r * w + j] = (grad[r * w + j] - gw * cache.u[r] * cache.v[j]) / cache.sigma
                }
            }
        }
        return [originalKey: try rows.scatter(dw)]
    }
}
