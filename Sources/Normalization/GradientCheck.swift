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

    /// Compares the analytic gradients of `layer` at `x` with central differences.
    /// - Parameters:
    ///   - step: h.
    /// - Returns: one result for the input and one per affine parameter.
    public static func run(
        _ layer: NormLayer<Double>, input x: Tensor<Double>, outputGradient dy: Tensor<Double>,
        mode: Mode, step: Double = 1e-5
    ) throws(NormError) -> [Result] {
        let saved = layer.runningStatistics
        defer { layer.runningStatistics = saved }
        let (_, cache) = try layer.forward(x, mode: mode)
        let analytic = try layer.backward(dy, cache: cache)
        layer.runningStatistics = saved

        func loss(_ input: Tensor<Double>) throws(NormError) -> Double {
            let y = try layer.forward(input, mode: mode).output
            layer.runningStatistics = saved
            return zip(y.scalars, dy.scalars).reduce(0) { $0 + $1.0 * $1.1 }
        }

        var results: [Result] = []
        // Input.
        var numeric = [Double](repeating: 0, count: x.count)
        var probe = x
        for i in 0..<x.count {
            let original = probe.scalars[i]
            probe[flat: i] = original + step
            let plus = try loss(probe)
            probe[flat: i] = original - step
            let minus = try loss(probe)
            probe[flat: i] = original
            numeric[i] = (plus - minus) / (2 * step)
        }
        results.append(compare("x", analytic.input.scalars, numeric))

        // Affine parameters.
        for (name, analyticGradient) in [("weight", analytic.scale), ("bias", analytic.offset)] {
            guard let analyticGradient else { continue }
            let isScale = name == "weight"
            guard let parameter = isScale ? layer.scale : layer.offset else { continue }
            var numeric = [Double](repeating: 0, count: parameter.count)
            for i in 0..<parameter.count {
                let original = parameter.scalars[i]
                func set(_ value: Double) {
                    var updated = parameter
                    updated[flat: i] = value
                    if isScale { layer.scale = updated } else { layer.offset = updated }
                }
                set(original + step)
                let plus = try loss(x)
                set(original - step)
                let minus = try loss(x)
                set(original)
                numeric[i] = (plus - minus) / (2 * step)
            }
            results.append(compare(name, analyticGradient.scalars, numeric))
        }
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
