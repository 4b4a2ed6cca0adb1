import TensorCore

/// Central finite-difference checks of a layer's backward pass, in `Double`.
///
/// The loss is `L = Σ y ⊙ dy` for a fixed random `dy` (llm.c's trick), so one scalar checks the
/// whole Jacobian–vector product: `∂L/∂θ_i ≈ (L(θ_i + h) − L(θ_i − h)) / 2h` for every input
/// element and every affine parameter. Running statistics are restored after every evaluation,
/// so the check leaves the layer as it found it.
public enum GradientCheck {
    /// The worst disagreement found for one tensor.
    public struct Result: Sendable, CustomStringConvertible {
        /// The checked tensor (`"x"`, `"weight"`, `"bias"`).
        public var name: String
        /// max |analytic − numeric|.
        public var maxAbsoluteError: Double
        /// max |analytic − numeric| / max(max |numeric|, 1e-12): error relative to the gradient's scale.
        public var relativeError: Double

        /// A readable one-line description.
        public var description: String {
            "\(name): max abs error \(maxAbsoluteError), relative \(relativeError)"
        }
    }

    /// Compares the analytic gradients of any normalizer at `x` with central differences: the
    /// input, every parameter, and every conditioning input of a conditional layer.
    ///
    /// The layer's whole state (parameters, running statistics, counters, schedules that live
    /// in its state) is saved first and restored before every evaluation and at the end, so
    /// layers whose training output depends on running estimates (Batch Renorm) are checked at
    /// one fixed state and the layer is left as it was found.
    /// - Parameters:
    ///   - conditions: the conditioning inputs of a ``ConditionalNormalizing`` layer.
    ///   - step: h.
    /// - Returns: one result for `x`, one per parameter (named by key) and one per condition.
    public static func run(
        _ layer: any Normalizing<Double>, input x: Tensor<Double>,
        outputGradient dy: Tensor<Double>,
        mode: Mode, conditions: [String: Tensor<Double>] = [:], step: Double = 1e-5
    ) throws -> [Result] {
        let saved = try layer.state()
        defer { try? layer.load(saved) }
        let conditional = layer as? any ConditionalNormalizing<Double>
        try conditional?.setConditions(conditions)
        _ = try layer.normalize(x, mode: mode)
        let analytic = try layer.backward(dy)

        func loss(
            _ input: Tensor<Double>, parameters: [String: Tensor<Double>] = [:],
            conditions changed: [String: Tensor<Double>] = [:]
        ) throws -> Double {
            try layer.load(saved)
            if !parameters.isEmpty { try layer.setParameters(parameters) }
            try conditional?.setConditions(conditions.merging(changed) { _, new in new })
            let y = try layer.normalize(input, mode: mode)
            return zip(y.scalars, dy.scalars).reduce(0) { $0 + $1.0 * $1.1 }
        }
        /// Central differences of the loss over every element of one tensor.
        func numeric(_ t: Tensor<Double>, _ evaluate: (Tensor<Double>) throws -> Double) throws
            -> [Double]
        {
            var probe = t
            var out = [Double](repeating: 0, count: t.count)
            for i in 0..<t.count {
                let original = probe.scalars[i]
                probe[flat: i] = original + step
                let plus = try evaluate(probe)
                probe[flat: i] = original - step
                let minus = try evaluate(probe)
                probe[flat: i] = original
                out[i] = (plus - minus) / (2 * step)
            }
            return out
        }

        var results = [compare("x", analytic.input.scalars, try numeric(x) { try loss($0) })]
        let parameters = saved.tensors.filter { layer.parameters[$0.key] != nil }
        for (key, value) in parameters.sorted(by: { $0.key < $1.key }) {
            guard let g = analytic.parameters[key] else { continue }
            let n = try numeric(value) { try loss(x, parameters: [key: $0]) }
            results.append(compare(key, g.scalars, n))
        }
        for (key, value) in conditions.sorted(by: { $0.key < $1.key }) {
            guard let g = analytic.conditions[key] else { continue }
            let n = try numeric(value) { try loss(x, conditions: [key: $0]) }
            results.append(compare(key, g.scalars, n))
        }
        try layer.load(saved)
        try conditional?.setConditions(conditions)
        return results
    }

    /// Compares analytic and numeric gradients and returns the worst error.
    public static func compare(_ name: String, _ analytic: [Double], _ numeric: [Double]) -> Result
    {
        var worst = 0.0
        var scale = 1e-12
        for (a, n) in zip(analytic, numeric) {
            worst = max(worst, abs(a - n))
            scale = max(scale, abs(n))
        }
        return Result(name: name, maxAbsoluteError: worst, relativeError: worst / scale)
    }
}
