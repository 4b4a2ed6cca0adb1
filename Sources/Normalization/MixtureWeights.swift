import Foundation
import TensorCore

/// The softmax that turns mixture logits into importance weights (Switchable Normalization,
/// MetaNorm, Switchable Whitening), with its backward.
public enum MixtureWeights {
    /// softmax(v), computed from v − max(v) so that large logits do not overflow.
    public static func softmax(_ v: [Double]) -> [Double] {
        let top = v.max() ?? 0
        let e = v.map { exp($0 - top) }
        let total = e.reduce(0, +)
        return e.map { $0 / total }
    }

    /// ∂w_i/∂v_l = w_i(δ_il − w_l).
    public static func softmaxJacobian(_ w: [Double]) -> [[Double]] {
        (0..<w.count).map { i in (0..<w.count).map { l in w[i] * ((i == l ? 1 : 0) - w[l]) } }
    }

    /// dL/dv from a_k = dL/dw_k: w ⊙ (a − ⟨w, a⟩).
    public static func softmaxBackward(_ w: [Double], _ a: [Double]) -> [Double] {
        let dot = zip(w, a).reduce(0) { $0 + $1.0 * $1.1 }
        return zip(w, a).map { $0 * ($1 - dot) }
    }
}

/// How a learned mixture turns its logits into importance weights.
public enum MixtureWeighting: Sendable, Hashable {
    /// softmax (Switchable Normalization, MetaNorm, Switchable Whitening).
    case softmax
    /// ``SparsestMax`` with radius r (Sparse Switchable Normalization).
    case sparsestMax(radius: Double)
}

/// One logit vector of a learned mixture (`mean_weight` or `var_weight`), its importance
/// weights and their backward.
///
/// ```
/// w = softmax(v)  or  SparsestMax(v, r)          dL/dv = Jᵀ·a,  a_k = dL/dw_k
/// ```
/// A frozen vector (Sparse SN, once its weights are one-hot) *is* its weights: w = v, and its
/// logits receive no gradient.
///
/// ## Shape
/// Logits `[K]`, one per mixture component.
public struct MixtureLogits<Scalar: NormScalar>: Sendable, Equatable {
    /// v; `mean_weight` or `var_weight` in checkpoints.
    public var logits: Tensor<Scalar>
    /// Whether v is frozen to its one-hot weights (Sparse SN's `mean_fixed`, `var_fixed`).
    public var isFrozen: Bool

    /// K logits of 1 (uniform weights), as the official code initialises them.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` when K < 1.
    public init(componentCount: Int) throws(NormError) {
        guard componentCount >= 1 else {
            throw .invalidHyperparameter(
                name: "mixture components", value: "\(componentCount)", requirement: "must be ≥ 1")
        }
        do { logits = try Tensor(repeating: 1, shape: [componentCount]) } catch {
            throw .tensor(error)
        }
        isFrozen = false
    }

    /// A logit vector from given values.
    public init(logits: Tensor<Scalar>, isFrozen: Bool = false) {
        self.logits = logits
        self.isFrozen = isFrozen
    }

    /// The importance weights under `weighting`.
    public func evaluate(_ weighting: MixtureWeighting) -> MixtureEvaluation {
        let v = logits.scalars.map(Double.init)
        if isFrozen { return MixtureEvaluation(weights: v, weighting: nil, jacobian: []) }
        switch weighting {
        case .softmax:
            return MixtureEvaluation(
                weights: MixtureWeights.softmax(v), weighting: weighting, jacobian: [])
        case .sparsestMax(let radius):
            let result = SparsestMax.evaluate(v, radius: radius)
            return MixtureEvaluation(
                weights: result.p, weighting: weighting, jacobian: result.jacobian)
        }
    }

    /// Freezes the vector to `weights` when they are one-hot (within 1e-12); true when it did.
    public mutating func freezeIfOneHot(_ weights: [Double]) -> Bool {
        guard !isFrozen, (weights.max() ?? 0) - (weights.min() ?? 0) >= 1 - 1e-12,
            let frozen = try? Tensor<Scalar>(shape: [weights.count], rounding: weights)
        else { return false }
        logits = frozen
        isFrozen = true
        return true
    }
}

/// The importance weights of one ``MixtureLogits`` vector and what their backward needs.
public struct MixtureEvaluation: Sendable {
    /// w, one per component, summing to 1.
    public let weights: [Double]
    /// How w was computed (nil when frozen).
    let weighting: MixtureWeighting?
    /// ∂w/∂v for SparsestMax (row i = ∂w_i/∂v); empty otherwise.
    let jacobian: [[Double]]

    /// dL/dv from a_k = dL/dw_k: zero when frozen, w ⊙ (a − ⟨w, a⟩) for softmax, Jᵀa for
    /// SparsestMax.
    public func logitGradient(_ a: [Double]) -> [Double] {
        precondition(a.count == weights.count, "One upstream gradient per component.")
        switch weighting {
        case nil:
            return [Double](repeating: 0, count: a.count)
        case .softmax:
            return MixtureWeights.softmaxBackward(weights, a)
        case .sparsestMax:
            return (0..<a.count).map { l in
                (0..<a.count).reduce(0) { $0 + jacobian[$1][l] * a[$1] }
            }
        }
    }
}
