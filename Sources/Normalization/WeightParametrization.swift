import TensorCore

/// A reparametrization of a layer's weight: the layer multiplies by `W = Φ(raw parameters)`
/// instead of by a free weight, and gradients with respect to `W` flow back to the raw
/// parameters (Weight Norm's g and v, the others' original weight).
///
/// ```
/// W = Φ(θ; buffers)          forward: ``weight(mode:)``
/// dL/dθ = (∂Φ/∂θ)ᵀ · dL/dW   backward: ``backward(_:)``
/// ```
/// Φ acts on the weight seen as a matrix whose rows are the output channels (the axis `dim`
/// moved to the front, the other axes flattened in order), as PyTorch's parametrizations do.
/// Parameters and buffers use the keys PyTorch's `state_dict` gives a module whose `weight`
/// was parametrized (`parametrizations.weight.original0`, …), so a state saved there loads
/// here. A call that throws changes nothing.
public protocol WeightParametrization<Scalar>: AnyObject {
    /// The element type.
    associatedtype Scalar: NormScalar

    /// The method's name in messages (`"WeightNorm"`).
    var displayName: String { get }
    /// The shape of the weight Φ produces (`[out, in]`, `[out, in, kh, kw]`).
    var weightShape: [Int] { get }
    /// Trainable tensors by `state_dict` key.
    var parameters: [String: Tensor<Scalar>] { get }
    /// Non-trainable tensors by `state_dict` key (spectral norm's u and v).
    var buffers: [String: Tensor<Scalar>] { get }
    /// Replaces some or all parameters (every key known, every shape right, or nothing changes).
    func setParameters(_ values: [String: Tensor<Scalar>]) throws
    /// Computes W; in training mode, spectral norm first advances its power iteration.
    func weight(mode: Mode) throws -> Tensor<Scalar>
    /// dL/d(parameter) by key, from dL/dW of the last ``weight(mode:)`` call.
    func backward(_ weightGradient: Tensor<Scalar>) throws -> [String: Tensor<Scalar>]
    /// Older `state_dict` names that ``load(_:)`` accepts, mapped to the current ones.
    var legacyKeys: [String: String] { get }
    /// Replaces some or all buffers (every key known, every shape right, or nothing changes).
    func setBuffers(_ values: [String: Tensor<Scalar>]) throws
}

extension WeightParametrization {
    /// Legacy `state_dict` key → current key; none by default.
    public var legacyKeys: [String: String] { [:] }

    /// No buffers to set by default (only known keys reach this, so there is nothing to do).
    public func setBuffers(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: buffers, layer: displayName)
    }

    /// Parameters and buffers together, as a `state_dict` holds them.
    public func state() -> NormState<Scalar> {
        NormState(tensors: parameters.merging(buffers) { a, _ in a })
    }

    /// Restores parameters and buffers saved by ``state()`` or by PyTorch (the legacy keys of
    /// ``legacyKeys`` too): every key and shape is checked before anything changes; keys that
    /// are absent keep their current values.
    public func load(_ state: NormState<Scalar>) throws {
        let current = parameters
        let currentBuffers = buffers
        let known = (Array(current.keys) + Array(currentBuffers.keys)).sorted()
        if let key = state.counters.keys.sorted().first {
            throw NormError.unknownParameter(layer: displayName, key: key, known: known)
        }
        var params: [String: Tensor<Scalar>] = [:]
        var bufs: [String: Tensor<Scalar>] = [:]
        for (given, value) in state.tensors.sorted(by: { $0.key < $1.key }) {
            let key = legacyKeys[given] ?? given
            guard let old = current[key] ?? currentBuffers[key] else {
                throw NormError.unknownParameter(layer: displayName, key: given, known: known)
            }
            guard old.shape == value.shape else {
                throw NormError.parameterShapeMismatch(
                    name: given, expected: old.shape, actual: value.shape)
            }
            if current[key] != nil { params[key] = value } else { bufs[key] = value }
        }
        try setParameters(params)
        try setBuffers(bufs)
    }
}

/// What goes wrong in a weight parametrization, beyond the shape and key errors of
/// ``NormError``.
public enum WeightNormError: Error, Equatable, CustomStringConvertible {
    /// A row (or the whole tensor) has norm 0 where the method divides by it without ε.
    case zeroNorm(method: String, parameter: String, row: Int?, shape: [Int])
    /// Unbiased Weight Standardization needs at least two weights per output channel.
    case noVariance(method: String, parameter: String, fanIn: Int, shape: [Int])
    /// `dim` is not an axis of the weight.
    case dimensionOutOfRange(method: String, dim: Int, shape: [Int])
    /// The weight has no elements (a zero dimension) or no axes.
    case emptyWeight(method: String, parameter: String, shape: [Int])

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .zeroNorm(let method, let parameter, let row, let shape):
            let place = row.map { "row \($0) of " } ?? ""
            return "\(method): \(place)'\(parameter)' (shape \(shape)) has norm 0, and the method "
                + "divides by it without ε; the weight would be NaN"
        case .noVariance(let method, let parameter, let fanIn, let shape):
            return "\(method): '\(parameter)' (shape \(shape)) has a fan-in of \(fanIn); the "
                + "unbiased standard deviation needs at least 2 weights per output channel (use "
                + "the BiT convention, whose biased variance is defined)"
        case .dimensionOutOfRange(let method, let dim, let shape):
            return "\(method): dim \(dim) is not an axis of a weight of shape \(shape) (expected "
                + "0..<\(shape.count))"
        case .emptyWeight(let method, let parameter, let shape):
            return "\(method): '\(parameter)' has shape \(shape), which has no elements"
        }
    }
}

/// The weight methods by their command-line names.
public enum WeightNormMethod: String, CaseIterable, Sendable, Codable {
    /// The plain weight (key `weight`).
    case none
    /// ``WeightNorm``.
    case wn
    /// ``CenteredWeightNorm``.
    case cwn
    /// ``WeightStandardization`` with the official code's convention.
    case ws
    /// ``WeightStandardization`` with BiT's convention.
    case wsBiT = "ws-bit"
    /// ``SpectralNorm``.
    case sn

    /// The method's own ε (WS 1e-5, BiT 1e-10, CWN 1e-5, SN 1e-12; nil where there is none).
    public var defaultEpsilon: Double? {
        switch self {
        case .none, .wn: return nil
        case .cwn, .ws: return 1e-5
        case .wsBiT: return 1e-10
        case .sn: return 1e-12
        }
    }

    /// Options of ``make(weight:options:)``.
    public struct Options: Sendable, Hashable {
        /// The axis that keeps its own norm (WN; nil: one norm over the whole tensor) or that
        /// becomes the matrix rows (SN).
        public var dim: Int? = 0
        /// ε (nil: the method's own).
        public var epsilon: Double?
        /// CWN: the initial scale s.
        public var scale = 1.414
        /// CWN: s is a parameter rather than a fixed constant.
        public var learnableScale = false
        /// SN: iterations per training-mode call.
        public var powerIterations = 1
        /// SN: the legacy hook's order and keys (`weight_orig`, `weight_u`, `weight_v`).
        public var legacySpectralNorm = false
        /// SN: seed of u and v's Gaussian start.
        public var seed: UInt64 = 0

        /// Defaults.
        public init() {}
    }

    /// Wraps `weight` as PyTorch's registration does: WN starts with g = ‖w‖ and v = w (the
    /// layer is unchanged), the others keep w as their original weight.
    public func make<T: NormScalar>(weight: Tensor<T>, options: Options = Options()) throws
        -> any WeightParametrization<T>
    {
        switch self {
        case .none: return try PlainWeight(weight: weight)
        case .wn: return try WeightNorm(weight: weight, dim: options.dim)
        case .cwn:
            return try CenteredWeightNorm(
                weight: weight, scale: options.scale, learnableScale: options.learnableScale,
                epsilon: options.epsilon ?? 1e-5)
        case .ws, .wsBiT:
            let convention: WeightStandardization<T>.Convention = self == .ws ? .official : .bit
            return try WeightStandardization(
                weight: weight, convention: convention, epsilon: options.epsilon)
        case .sn:
            guard let dim = options.dim else {
                throw WeightNormError.dimensionOutOfRange(
                    method: "SpectralNorm", dim: -1, shape: weight.shape)
            }
            return try SpectralNorm(
                weight: weight, dim: dim, powerIterations: options.powerIterations,
                epsilon: options.epsilon ?? 1e-12,
                order: options.legacySpectralNorm ? .vFirst : .uFirst, seed: options.seed)
        }
    }
}

/// The identity parametrization: W is the parameter `weight` itself.
public final class PlainWeight<Scalar: NormScalar>: WeightParametrization {
    /// W.
    public private(set) var value: Tensor<Scalar>

    /// Holds `weight` unchanged.
    public init(weight: Tensor<Scalar>) throws {
        guard weight.count > 0, weight.rank >= 1 else {
            throw WeightNormError.emptyWeight(
                method: "weight", parameter: "weight", shape: weight.shape)
        }
        value = weight
    }

    /// `"weight"`.
    public var displayName: String { "weight" }
    /// W's shape.
    public var weightShape: [Int] { value.shape }
    /// `weight`.
    public var parameters: [String: Tensor<Scalar>] { ["weight": value] }
    /// None.
    public var buffers: [String: Tensor<Scalar>] { [:] }

    /// Replaces `weight` (shape-checked).
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        if let w = values["weight"] { value = w }
    }

    /// W.
    public func weight(mode: Mode) throws -> Tensor<Scalar> { value }

    /// dL/dW itself.
    public func backward(_ weightGradient: Tensor<Scalar>) throws -> [String: Tensor<Scalar>] {
        guard weightGradient.shape == value.shape else {
            throw NormError.gradientShapeMismatch(
                expected: value.shape, actual: weightGradient.shape)
        }
        return ["weight": weightGradient]
    }
}

// MARK: - Shared helpers

/// A weight seen as a matrix whose rows are the indices along one axis (moved to the front, as
/// PyTorch's `permute(dim, others…).flatten(1)`), or as one row (`axis == nil`).
struct AxisRows: Sendable, Equatable {
    /// The weight's shape.
    let shape: [Int]
    /// The row axis, or nil for the whole tensor as one row.
    let axis: Int?
    /// Rows (the axis's size, or 1).
    let rows: Int
    /// Elements per row.
    let cols: Int
    let outer: Int
    let inner: Int

    /// - Throws: ``WeightNormError`` for an empty weight or an axis out of range.
    init(shape: [Int], axis: Int?, method: String, parameter: String) throws {
        let count = try Shape.elementCount(shape)
        guard !shape.isEmpty, count > 0 else {
            throw WeightNormError.emptyWeight(method: method, parameter: parameter, shape: shape)
        }
        self.shape = shape
        self.axis = axis
        if let axis {
            guard axis >= 0, axis < shape.count else {
                throw WeightNormError.dimensionOutOfRange(method: method, dim: axis, shape: shape)
            }
            rows = shape[axis]
            cols = count / rows
            outer = shape[..<axis].reduce(1, *)
            inner = shape[(axis + 1)...].reduce(1, *)
        } else {
            rows = 1
            cols = count
            outer = 1
            inner = count
        }
    }

    /// The shape of a per-row tensor that broadcasts against the weight (PyTorch's keepdim
    /// norm: 1 everywhere except the axis; `[]` for the whole tensor).
    var keptShape: [Int] {
        guard let axis else { return [] }
        return shape.indices.map { $0 == axis ? shape[axis] : 1 }
    }

    /// Weight order → row-major `[rows, cols]`, in Double.
    func gather<S: NormScalar>(_ t: Tensor<S>) -> [Double] {
        let x = t.scalars
        guard let axis, axis != 0 else { return x.map { Double($0) } }
        var out = [Double](repeating: 0, count: x.count)
        for o in 0..<outer {
            for r in 0..<rows {
                for i in 0..<inner {
                    out[r * cols + o * inner + i] = Double(x[(o * rows + r) * inner + i])
                }
            }
        }
        return out
    }

    /// The weight's rows centred, row-major `[rows, cols]`, and Σc² per row (CWN's ‖c‖², WS's
    /// (n − 1)σ² or nσ²).
    ///
    /// Two passes, the mean and then the centred squares (no E[v²] − E[v]²): exact for
    /// 1000 + 0.05·noise weights.
    func centred<S: NormScalar>(_ weight: Tensor<S>) -> (rows: [Double], squares: [Double]) {
        var c = gather(weight)
        var squares = [Double](repeating: 0, count: rows)
        for r in 0..<rows {
            let mean = row(c, r, cols).reduce(0, +) / Double(cols)
            for j in (r * cols)..<((r + 1) * cols) { c[j] -= mean }
            squares[r] = dot(row(c, r, cols), row(c, r, cols))
        }
        return (c, squares)
    }

    /// A gradient of the weight as row-major `[rows, cols]`, after checking its shape.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    func gatheredGradient<S: NormScalar>(_ gradient: Tensor<S>) throws -> [Double] {
        guard gradient.shape == shape else {
            throw NormError.gradientShapeMismatch(expected: shape, actual: gradient.shape)
        }
        return gather(gradient)
    }

    /// Row-major `[rows, cols]` → a tensor in the weight's order.
    func scatter<S: NormScalar>(_ m: [Double], as _: S.Type = S.self) throws -> Tensor<S> {
        guard let axis, axis != 0 else { return try Tensor(shape: shape, rounding: m) }
        var out = [Double](repeating: 0, count: m.count)
        for o in 0..<outer {
            for r in 0..<rows {
                for i in 0..<inner { out[(o * rows + r) * inner + i] = m[r * cols + o * inner + i] }
            }
        }
        return try Tensor(shape: shape, rounding: out)
    }
}

/// Σ a·b in Double.
@inline(__always)
func dot(_ a: ArraySlice<Double>, _ b: ArraySlice<Double>) -> Double {
    var s = 0.0
    for (x, y) in zip(a, b) { s += x * y }
    return s
}

/// The rows of a row-major matrix as slices.
@inline(__always)
func row(_ m: [Double], _ r: Int, _ cols: Int) -> ArraySlice<Double> {
    m[(r * cols)..<((r + 1) * cols)]
}
