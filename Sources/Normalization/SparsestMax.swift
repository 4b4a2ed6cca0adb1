/// Sparsemax and SparsestMax: projections of logits onto the probability simplex whose output
/// can be exactly sparse (one-hot), with their exact Jacobians.
///
/// ```
/// sparsemax(v) = argmin_{p ∈ Δ} ‖p − v‖²  = max(v − τ, 0)
/// SparsestMax(v, r): sparsemax, then push the point radially out to distance r from the centre
///                    of its face (recursing onto a smaller face when the push leaves the simplex)
/// ```
/// As r grows from 0 to 1 the output is driven from dense to one-hot. Guards the reference code
/// lacks: a point at the centre of its face (distance below 1e-12) is returned unpushed instead of dividing
/// by zero; the radius of a recursive call is √max(r² − ‖u − u_in‖², 0), never the square root
/// of a negative number; the one-hot test allows a rounding error of 1e-12.
///
/// ## References
/// 1. Martins & Astudillo 2016, "From Softmax to Sparsemax", arXiv:1602.02068.
/// 2. Shao et al. 2019, "SSN: Learning Sparse Switchable Normalization via SparsestMax",
///    arXiv:1903.03793.
public enum SparsestMax {
    /// sparsemax(v) and its support.
    public static func sparsemax(_ v: [Double]) -> [Double] {
        let sorted = v.sorted(by: >)
        var cumulative = 0.0
        var tau = 0.0
        for (k, value) in sorted.enumerated() {
            cumulative += value
            let candidate = (cumulative - 1) / Double(k + 1)
            if value - candidate > 0 { tau = candidate }
        }
        return v.map { max($0 - tau, 0) }
    }

    /// The output and the Jacobian ∂p/∂v (row i = ∂p_i/∂v) of SparsestMax(v, r).
    public static func evaluate(_ v: [Double], radius: Double) -> (
        p: [Double], jacobian: [[Double]]
    ) {
        let k = v.count
        var jacobian = identity(k)
        let p = step(v, radius: radius, centre: nil, jacobian: &jacobian)
        return (p, jacobian)
    }

    /// One level of the recursion; `jacobian` accumulates ∂(current)/∂v.
    static func step(
        _ v: [Double], radius: Double, centre uIn: [Double]?, jacobian: inout [[Double]]
    ) -> [Double] {
        let k = v.count
        let w = sparsemax(v)
        let support = w.map { $0 > 0 ? 1.0 : 0.0 }
        let size = support.reduce(0, +)
        // Sparsemax Jacobian: diag(s) − s sᵀ/|S|.
        var jsm = [[Double]](repeating: [Double](repeating: 0, count: k), count: k)
        for i in 0..<k {
            for j in 0..<k {
                jsm[i][j] = (i == j ? support[i] : 0) - support[i] * support[j] / size
            }
        }
        if (w.max() ?? 0) - (w.min() ?? 0) >= 1 - 1e-12 {
            // One-hot: the output no longer moves with the logits.
            jacobian = [[Double]](repeating: [Double](repeating: 0, count: k), count: k)
            return w
        }
        jacobian = multiply(jsm, jacobian)
        let u = support.map { $0 / size }
        var rr = radius
        if let uIn {
            let gap = zip(u, uIn).reduce(0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
            rr = max(radius * radius - gap, 0).squareRoot()
        }
        let diff = zip(w, u).map { $0 - $1 }
        let dist = diff.reduce(0) { $0 + $1 * $1 }.squareRoot()
        // At (or within rounding of) the centre the push has no direction: return unpushed.
        if dist >= rr || dist < 1e-12 { return w }
        let p = zip(u, diff).map { $0 + rr * $1 / dist }
        // Radial step Jacobian: (rr/dist)·(I − d dᵀ/dist²).
        var jp = [[Double]](repeating: [Double](repeating: 0, count: k), count: k)
        for i in 0..<k {
            for j in 0..<k {
                jp[i][j] = rr / dist * ((i == j ? 1 : 0) - diff[i] * diff[j] / (dist * dist))
            }
        }
        jacobian = multiply(jp, jacobian)
        if (p.min() ?? 0) < 0 {
            return step(p, radius: rr, centre: u, jacobian: &jacobian)
        }
        return p.map { min(max($0, 0), 1) }
    }

    static func identity(_ k: Int) -> [[Double]] {
        (0..<k).map { i in (0..<k).map { $0 == i ? 1 : 0 } }
    }

    static func multiply(_ a: [[Double]], _ b: [[Double]]) -> [[Double]] {
        let k = a.count
        return (0..<k).map { i in
            (0..<k).map { j in (0..<k).reduce(0) { $0 + a[i][$1] * b[$1][j] } }
        }
    }
}
