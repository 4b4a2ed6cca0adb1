import Foundation

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
