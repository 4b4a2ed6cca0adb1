import TensorCore

/// Weight Normalization: the weight's direction and length as separate parameters.
///
/// ```
/// w = g · v / ‖v‖        ‖v‖ over every axis except `dim` (one norm over the whole tensor
///                         when `dim` is nil); no ε
/// ```
/// Backward, with ŵ = v/‖v‖ and G = dL/dw, for each row (index along `dim`):
/// ```
/// dg = Σ G ⊙ ŵ            dv = (g/‖v‖) · (G − ŵ · dg)
/// ```
/// As `torch.nn.utils.parametrizations.weight_norm`: g has the weight's rank with 1s except
/// along `dim` (a 0-d tensor for `dim = nil`), initial g = ‖w‖ and v = w, keys
/// `parametrizations.weight.original0` (g) and `parametrizations.weight.original1` (v). The
/// deprecated hook's `weight_g` and `weight_v` load too. A row of v with norm 0 is refused
/// with ``WeightNormError/zeroNorm(method:parameter:row:shape:)`` (PyTorch returns NaN).
///
/// ## Shape
/// v: any weight shape; g: ``keptShape``.
///
/// ## References
/// 1. Salimans & Kingma 2016, arXiv:1602.07868.
public final class WeightNorm<Scalar: NormScalar>: WeightParametrization {
    /// Key of g.
    public static var magnitudeKey: String { "parametrizations.weight.original0" }
    /// Key of v.
    public static var directionKey: String { "parametrizations.weight.original1" }

    /// The axis that keeps its own norm, or nil for one norm over the whole tensor.
    public let dim: Int?
    /// g, the length of each row.
    public private(set) var magnitude: Tensor<Scalar>
    /// v, the direction.
    public private(set) var direction: Tensor<Scalar>
    let rows: AxisRows
    /// ŵ (row-major) and ‖v‖ of each row, from the last ``weight(mode:)`` call.
    var cache: (unit: [Double], norms: [Double], g: [Double])?

    /// Reparametrizes `weight` as PyTorch's registration does: g = ‖w‖, v = w.
    /// - Throws: ``WeightNormError`` for an empty weight or `dim` out of range.
    public init(weight: Tensor<Scalar>, dim: Int? = 0) throws {
        let view = try AxisRows(
            shape: weight.shape, axis: dim, method: "WeightNorm", parameter: Self.directionKey)
        let m = view.gather(weight)
        let norms = (0..<view.rows).map { r in
            dot(row(m, r, view.cols), row(m, r, view.cols)).squareRoot()
        }
        rows = view
        self.dim = dim
        magnitude = try Tensor(shape: view.keptShape, rounding: norms)
        direction = weight
    }

    /// g and v given directly.
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)`` when g does not
    ///   have the kept shape of v along `dim`.
    public convenience init(magnitude: Tensor<Scalar>, direction: Tensor<Scalar>, dim: Int? = 0)
        throws
    {
        try self.init(weight: direction, dim: dim)
        try setParameters([Self.magnitudeKey: magnitude])
    }

    /// The shape of g for this weight.
    public var keptShape: [Int] { rows.keptShape }

    /// `"WeightNorm"`.
    public var displayName: String { "WeightNorm" }
    /// v's shape.
    public var weightShape: [Int] { direction.shape }
    /// g and v.
    public var parameters: [String: Tensor<Scalar>] {
        [Self.magnitudeKey: magnitude, Self.directionKey: direction]
    }
    /// None.
    public var buffers: [String: Tensor<Scalar>] { [:] }
    /// The deprecated hook's names.
    public var legacyKeys: [String: String] {
        ["weight_g": Self.magnitudeKey, "weight_v": Self.directionKey]
    }

    /// Replaces g and/or v (shape-checked).
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        if let g = values[Self.magnitudeKey] { magnitude = g }
        if let v = values[Self.directionKey] { direction = v }
        cache = nil
    }

    /// w = g · v / ‖v‖.
    /// - Throws: ``WeightNormError/zeroNorm(method:parameter:row:shape:)`` for a zero row of v.
    public func weight(mode: Mode) throws -> Tensor<Scalar> {
        let m = rows.gather(direction)
        let g = magnitude.scalars.map { Double($0) }
        var unit = m
        var out = m
        var norms = [Double](repeating: 0, count: rows.rows)
        for r in 0..<rows.rows {
            let norm = dot(row(m, r, rows.cols), row(m, r, rows.cols)).squareRoot()
            guard norm > 0 else {
                throw WeightNormError.zeroNorm(
                    method: displayName, parameter: Self.directionKey,
                    row: dim == nil ? nil : r, shape: direction.shape)
            }
            norms[r] = norm
            for j in (r * rows.cols)..<((r + 1) * rows.cols) {
                unit[j] = m[j] / norm
                out[j] = g[r] * unit[j]
            }
        }
        cache = (unit, norms, g)
        return try rows.scatter(out)
    }

    /// dg = Σ G ⊙ ŵ, dv = (g/‖v‖)(G − ŵ·dg), per row.
    public func backward(_ weightGradient: Tensor<Scalar>) throws -> [String: Tensor<Scalar>] {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let grad = try rows.gatheredGradient(weightGradient)
        var dg = [Double](repeating: 0, count: rows.rows)
        var dv = grad
        for r in 0..<rows.rows {
            dg[r] = dot(row(grad, r, rows.cols), row(cache.unit, r, rows.cols))
            let factor = cache.g[r] / cache.norms[r]
            for j in (r * rows.cols)..<((r + 1) * rows.cols) {
                dv[j] = factor * (grad[j] - cache.unit[j] * dg[r])
            }
        }
        return [
            Self.magnitudeKey: try Tensor(shape: magnitude.shape, rounding: dg),
            Self.directionKey: try rows.scatter(dv),
        ]
    }
}

/// Centered Weight Normalization: each output row centred, then scaled to length s.
///
/// ```
/// c = v − mean(v)         per output row (axis 0), over the fan-in
/// w = s · c / (‖c‖ + ε)   ε = 1e-5 added to the norm, as the official CWNorm
/// ```
/// Backward, with q = ‖c‖ + ε, G_s = s·G:
/// ```
/// dc = G_s/q − (Σ G_s ⊙ c)/(q²‖c‖) · c      dv = dc − mean(dc)      ds = Σ G ⊙ c/q
/// ```
/// (the second term of dc is 0 when ‖c‖ = 0, as autograd's subgradient of the norm). With the
/// default ε a constant row gives w = 0; with ε = 0 it is refused. s is a fixed constant (1.414,
/// the official NScale; not in the `state_dict`) or, with `learnableScale`, the parameter
/// `parametrizations.weight.0.WNScale` of shape `[out, 1, …]` (the official adjustScale). The
/// original weight is `parametrizations.weight.original`.
///
/// ## References
/// 1. Huang, Liu, Lang & Tao 2017, "Centered Weight Normalization in Accelerating Training of
///    Deep Neural Networks", ICCV; official code huangleiBuaa/CenteredWN (CWNorm).
public final class CenteredWeightNorm<Scalar: NormScalar>: WeightParametrization {
    /// Key of the original weight.
    public static var originalKey: String { "parametrizations.weight.original" }
    /// Key of the learnable scale.
    public static var scaleKey: String { "parametrizations.weight.0.WNScale" }

    /// ε added to the row norm.
    public let epsilon: Double
    /// Whether s is trained.
    public let isScaleLearnable: Bool
    /// v.
    public private(set) var original: Tensor<Scalar>
    /// s, `[out, 1, …]`.
    public private(set) var scale: Tensor<Scalar>
    let rows: AxisRows
    var cache: (centred: [Double], norms: [Double], s: [Double])?

    /// - Parameters:
    ///   - weight: the initial original weight, `[out, …]`.
    ///   - scale: the initial s of every row (1.414, the official NScale).
    ///   - learnableScale: s is a parameter.
    ///   - epsilon: added to ‖c‖ (≥ 0).
    /// - Throws: ``WeightNormError`` for an empty weight, ``NormError`` for a negative ε.
    public init(
        weight: Tensor<Scalar>, scale: Double = 1.414, learnableScale: Bool = false,
        epsilon: Double = 1e-5
    ) throws {
        guard epsilon >= 0, epsilon.isFinite, scale.isFinite else {
            throw NormError.invalidHyperparameter(
                name: "CenteredWeightNorm ε, scale", value: "\(epsilon), \(scale)",
                requirement: "a finite ε ≥ 0 and a finite scale")
        }
        rows = try AxisRows(
            shape: weight.shape, axis: 0, method: "CenteredWeightNorm",
            parameter: Self.originalKey)
        self.epsilon = epsilon
        isScaleLearnable = learnableScale
        original = weight
        self.scale = try Tensor(repeating: Scalar(scale), shape: rows.keptShape)
    }

    /// `"CenteredWeightNorm"`.
    public var displayName: String { "CenteredWeightNorm" }
    /// v's shape.
    public var weightShape: [Int] { original.shape }
    /// The original weight, and s when it is learnable.
    public var parameters: [String: Tensor<Scalar>] {
        isScaleLearnable
            ? [Self.originalKey: original, Self.scaleKey: scale] : [Self.originalKey: original]
    }
    /// None (a fixed s is a hyperparameter, as in the issue's `state_dict`).
    public var buffers: [String: Tensor<Scalar>] { [:] }

    /// Replaces the original weight and/or s (shape-checked).
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        if let v = values[Self.originalKey] { original = v }
        if let s = values[Self.scaleKey] { scale = s }
        cache = nil
    }

    /// w = s · c / (‖c‖ + ε).
    public func weight(mode: Mode) throws -> Tensor<Scalar> {
        let (c, squares) = rows.centred(original)
        let s = scale.scalars.map { Double($0) }
        var out = c
        var norms = [Double](repeating: 0, count: rows.rows)
        let n = rows.cols
        for r in 0..<rows.rows {
            let norm = squares[r].squareRoot()
            let q = norm + epsilon
            guard q > 0 else {
                throw WeightNormError.zeroNorm(
                    method: displayName, parameter: Self.originalKey, row: r,
                    shape: original.shape)
            }
            norms[r] = norm
            for j in (r * n)..<((r + 1) * n) { out[j] = s[r] * c[j] / q }
        }
        cache = (c, norms, s)
        return try rows.scatter(out)
    }

    /// dv and, when learnable, ds (see the type's documentation).
    public func backward(_ weightGradient: Tensor<Scalar>) throws -> [String: Tensor<Scalar>] {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let grad = try rows.gatheredGradient(weightGradient)
        let n = rows.cols
        var dv = grad
        var ds = [Double](repeating: 0, count: rows.rows)
        for r in 0..<rows.rows {
            let norm = cache.norms[r]
            let q = norm + epsilon
            let gc = dot(row(grad, r, n), row(cache.centred, r, n))
            ds[r] = gc / q
            let s = cache.s[r]
            let k = norm > 0 ? s * gc / (q * q * norm) : 0
            var mean = 0.0
            for j in (r * n)..<((r + 1) * n) {
                dv[j] = s * grad[j] / q - k * cache.centred[j]
                mean += dv[j]
            }
            mean /= Double(n)
            for j in (r * n)..<((r + 1) * n) { dv[j] -= mean }
        }
        var out = [Self.originalKey: try rows.scatter(dv, as: Scalar.self)]
        if isScaleLearnable { out[Self.scaleKey] = try Tensor(shape: scale.shape, rounding: ds) }
        return out
    }
}
