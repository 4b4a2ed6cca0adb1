import NormKit

/// A conformance check that did not hold; thrown so that a test's `try` fails with the message.
public struct ConformanceFailure: Error, CustomStringConvertible {
    /// What failed, with the numbers.
    public let description: String
}

/// The four checks every normalizer passes, for any ``Normalizing`` layer.
///
/// The checks:
/// golden fixture, float64 central finite differences, fast kernels against the reference
/// kernel, and "an error leaves the layer unchanged". Each throws ``ConformanceFailure`` naming
/// the tensor and the error found.
///
/// ```swift
/// try Conformance.checkGradients(layer, input: x, mode: .training)
/// try Conformance.checkFastMatchesReference({ try MyNorm<Float>(…) }, input: xf)
/// try Conformance.checkErrorLeavesStateUnchanged(layer, badInput: wrongShape, mode: .training)
/// ```
public enum Conformance {
    /// Central differences of L = Σ y·dy (dy random from `seed`) against the analytic gradients
    /// of the input, every parameter and every conditioning input.
    public static func checkGradients(
        _ layer: any Normalizing<Double>, input x: Tensor<Double>, mode: Mode,
        conditions: [String: Tensor<Double>] = [:], tolerance: Double = 1e-6, seed: UInt64 = 99,
        step: Double = 1e-5
    ) throws {
        var g = SeededGenerator(seed: seed)
        let dy = try Tensor<Double>.randomNormal(shape: x.shape, using: &g)
        let results = try GradientCheck.run(
            layer, input: x, outputGradient: dy, mode: mode, conditions: conditions, step: step)
        let expected = 1 + layer.parameters.count + conditions.count
        guard results.count >= expected - conditions.count else {
            throw ConformanceFailure(
                description: "\(layer.displayName): \(results.count) gradients checked, expected "
                    + "\(expected) (a parameter without a gradient?)")
        }
        for r in results where !(r.relativeError < tolerance) {
            throw ConformanceFailure(
                description: "\(layer.displayName) \(mode): \(r) (tolerance \(tolerance))")
        }
    }

    /// Output (and, with `outputGradient`, every gradient) against golden values.
    public static func checkGolden(
        _ layer: any Normalizing<Double>, input x: Tensor<Double>, mode: Mode,
        expectedOutput: Tensor<Double>, outputGradient: Tensor<Double>? = nil,
        expectedInputGradient: Tensor<Double>? = nil,
        expectedParameterGradients: [String: Tensor<Double>] = [:], tolerance: Double = 1e-9
    ) throws {
        let y = try layer.normalize(x, mode: mode)
        try compare("output", y, expectedOutput, tolerance, layer.displayName)
        guard let dy = outputGradient else { return }
        let g = try layer.backward(dy)
        if let expectedInputGradient {
            try compare("dx", g.input, expectedInputGradient, tolerance, layer.displayName)
        }
        for (key, expected) in expectedParameterGradients.sorted(by: { $0.key < $1.key }) {
            guard let actual = g.parameters[key] else {
                throw ConformanceFailure(
                    description: "\(layer.displayName): no gradient for \(key)")
            }
            try compare("d" + key, actual, expected, tolerance, layer.displayName)
        }
    }

    /// The fast kernels against the reference kernel on the same input and state: output and
    /// every gradient within `tolerance` (relative to each tensor's largest magnitude).
    /// - Returns: false when the layer has no selectable kernels (nothing to compare).
    @discardableResult
    public static func checkFastMatchesReference(
        _ make: () throws -> any Normalizing<Float>, input x: Tensor<Float>, mode: Mode = .training,
        tolerance: Double = 1e-4, seed: UInt64 = 5
    ) throws -> Bool {
        var g = SeededGenerator(seed: seed)
        let dy = try Tensor<Float>.randomNormal(shape: x.shape, using: &g)
        let fast = try make()
        let reference = try make()
        guard let selectable = reference as? any KernelSelectable else { return false }
        selectable.kernels = .reference
        try reference.load(try fast.state())
        let yf = try fast.normalize(x, mode: mode)
        let yr = try reference.normalize(x, mode: mode)
        try compare("output", yf, yr, tolerance, fast.displayName)
        let gf = try fast.backward(dy)
        let gr = try reference.backward(dy)
        try compare("dx", gf.input, gr.input, tolerance, fast.displayName)
        for (key, value) in gr.parameters.sorted(by: { $0.key < $1.key }) {
            guard let other = gf.parameters[key] else {
                throw ConformanceFailure(
                    description: "\(fast.displayName): fast path lacks d\(key)")
            }
            try compare("d" + key, other, value, tolerance, fast.displayName)
        }
        try compare(
            "state after the call", try fast.state(), try reference.state(), tolerance,
            fast.displayName)
        return true
    }

    /// A call that throws must leave parameters, buffers and counters exactly as they were.
    public static func checkErrorLeavesStateUnchanged<Scalar: NormScalar>(
        _ layer: any Normalizing<Scalar>, badInput: Tensor<Scalar>, mode: Mode = .training
    ) throws {
        let before = try layer.state()
        do {
            _ = try layer.normalize(badInput, mode: mode)
        } catch {
            guard try layer.state() == before else {
                throw ConformanceFailure(
                    description: "\(layer.displayName): the state changed on error \(error)")
            }
            return
        }
        throw ConformanceFailure(
            description: "\(layer.displayName): input of shape \(badInput.shape) was accepted")
    }

    static func compare<Scalar: NormScalar>(
        _ name: String, _ a: Tensor<Scalar>, _ b: Tensor<Scalar>, _ tolerance: Double,
        _ layer: String
    ) throws {
        guard a.count == b.count else {
            throw ConformanceFailure(
                description: "\(layer) \(name): shape \(a.shape) against \(b.shape)")
        }
        var worst = 0.0
        var scale = 1e-12
        for (x, y) in zip(a.scalars, b.scalars) {
            worst = max(worst, abs(Double(x) - Double(y)))
            scale = max(scale, abs(Double(y)))
        }
        // Both NaN-free and within tolerance of the larger tensor's scale (absolute below 1).
        guard worst.isFinite, worst <= tolerance * max(scale, 1) else {
            throw ConformanceFailure(
                description: "\(layer) \(name): max difference \(worst) at scale \(scale)")
        }
    }

    static func compare<Scalar: NormScalar>(
        _ name: String, _ a: NormState<Scalar>, _ b: NormState<Scalar>, _ tolerance: Double,
        _ layer: String
    ) throws {
        guard a.keys == b.keys, a.counters == b.counters else {
            throw ConformanceFailure(description: "\(layer) \(name): keys or counters differ")
        }
        for key in a.tensors.keys.sorted() {
            try compare(name + " " + key, a.tensors[key]!, b.tensors[key]!, tolerance, layer)
        }
    }
}
