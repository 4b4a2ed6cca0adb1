import TensorCore

/// Ψ = conditional(source): the representation recovery of the conditional normalizers, with γ
/// and β computed from a conditioning input instead of stored per channel.
///
/// ```
/// y = x̂ ⊙ γ[k(i)] + β[k(i)],   k(i) = (i / (repeat·inner))·inner + i mod inner
/// ```
/// for the row-major flat index i of x̂. One ``Broadcast`` covers every layer here: γ per
/// (sample, channel) of a channels-first `[N, C, spatial…]` tensor (AdaIN, conditional BN:
/// `repeat` = the spatial size, `inner` = 1), per element (SPADE: 1, 1) and per (sample,
/// feature) of a token tensor `[N, T, D]` (adaLN: T, D).
///
/// The layers keep Φ (their standardization, running statistics included) in an unchanged
/// ``NormLayer`` without affine parameters, so the input gradient is that layer's backward of
/// g = dy ⊙ γ: Φ's backward (normalizers-spec.md 0.1) multiplies by γ before reducing, and γ
/// varying inside a reduction set changes nothing else. The recovery adds dγ = Σ dy ⊙ x̂ and
/// dβ = Σ dy over the elements that share each entry.
public struct ConditionalAffine: Sendable, Hashable {
    /// How a flat index maps to its entry of γ and β.
    public struct Broadcast: Sendable, Hashable {
        /// Consecutive blocks of `inner` elements that share one row of γ.
        public var repeatCount: Int
        /// The length of one row of γ.
        public var inner: Int

        /// Creates a mapping.
        public init(repeatCount: Int, inner: Int) {
            self.repeatCount = max(repeatCount, 1)
            self.inner = max(inner, 1)
        }

        /// γ per (sample, channel) of `[N, C, spatial…]`.
        public static func perSampleAndChannel(_ shape: [Int]) -> Broadcast {
            Broadcast(repeatCount: shape.dropFirst(2).reduce(1, *), inner: 1)
        }

        /// γ per element.
        public static let elementwise = Broadcast(repeatCount: 1, inner: 1)

        /// γ per (sample, last-axis feature) of `[N, *, D]`.
        public static func perSampleAndFeature(_ shape: [Int]) -> Broadcast {
            Broadcast(
                repeatCount: shape.dropFirst().dropLast().reduce(1, *), inner: shape.last ?? 1)
        }

        /// The entry of γ for flat index `i`.
        @inline(__always)
        public func callAsFunction(_ i: Int) -> Int {
            (i / (repeatCount * inner)) * inner + i % inner
        }
    }

    /// The mapping from elements to entries of γ and β.
    public var broadcast: Broadcast

    /// A recovery with this broadcast.
    public init(_ broadcast: Broadcast) { self.broadcast = broadcast }

    /// y = x̂ ⊙ γ + β (β nil: 0).
    public func apply<Scalar: NormScalar>(
        _ xhat: Tensor<Scalar>, scale gamma: [Double], offset beta: [Double]?
    ) throws(NormError) -> Tensor<Scalar> {
        var values = [Double](repeating: 0, count: xhat.count)
        xhat.withUnsafeBufferPointer { xb in
            for i in 0..<xb.count {
                let k = broadcast(i)
                values[i] = Double(xb[i]) * gamma[k] + (beta?[k] ?? 0)
            }
        }
        return try tensorOf(xhat.shape, values)
    }

    /// g = dy ⊙ γ (the output gradient Φ's backward takes), dγ = Σ dy ⊙ x̂ and dβ = Σ dy per
    /// entry.
    public func backward<Scalar: NormScalar>(
        _ dy: Tensor<Scalar>, normalized xhat: Tensor<Scalar>, scale gamma: [Double]
    ) throws(NormError) -> (scaled: Tensor<Scalar>, scale: [Double], offset: [Double]) {
        var dGamma = [Double](repeating: 0, count: gamma.count)
        var dBeta = [Double](repeating: 0, count: gamma.count)
        var scaled = [Double](repeating: 0, count: dy.count)
        dy.withUnsafeBufferPointer { db in
            xhat.withUnsafeBufferPointer { xb in
                for i in 0..<db.count {
                    let k = broadcast(i)
                    let d = Double(db[i])
                    dGamma[k] += d * Double(xb[i])
                    dBeta[k] += d
                    scaled[i] = d * gamma[k]
                }
            }
        }
        return (try tensorOf(dy.shape, scaled), dGamma, dBeta)
    }
}

// MARK: - Checks shared by the conditional layers

/// Throws ``NormError/invalidCondition(name:problem:)`` unless every element is finite.
func requireFinite<Scalar: NormScalar>(_ t: Tensor<Scalar>, name: String) throws(NormError) {
    guard t.isFinite else {
        throw .invalidCondition(
            name: name, problem: "contains NaN or infinity (shape \(t.shape))")
    }
}

/// A tensor from Double values, rounded to `Scalar`.
func tensorOf<Scalar: NormScalar>(_ shape: [Int], _ values: [Double]) throws(NormError)
    -> Tensor<Scalar>
{
    do { return try Tensor(shape: shape, rounding: values) } catch { throw .tensor(error) }
}

/// The values of a tensor as Doubles.
func doubles<Scalar: NormScalar>(_ t: Tensor<Scalar>) -> [Double] {
    t.scalars.map { Double($0) }
}

/// Refuses keys a layer does not have (state loads), before anything is written.
func refuseUnknownKeys(_ keys: [String], known: [String], layer: String) throws(NormError) {
    for key in keys.sorted() where !known.contains(key) {
        throw .unknownParameter(layer: layer, key: key, known: known.sorted())
    }
}

/// Checks that a state's tensors have the shapes of the current ones.
func checkStateShapes<Scalar: NormScalar>(
    _ state: NormState<Scalar>, current: [String: Tensor<Scalar>], layer: String
) throws(NormError) {
    try refuseUnknownKeys(Array(state.tensors.keys), known: Array(current.keys), layer: layer)
    for (key, value) in state.tensors.sorted(by: { $0.key < $1.key }) {
        let expected = current[key]!.shape
        guard value.shape == expected else {
            throw .parameterShapeMismatch(name: key, expected: expected, actual: value.shape)
        }
    }
}
