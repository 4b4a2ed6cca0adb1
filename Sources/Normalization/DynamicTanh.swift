import NormKernels
import TensorCore

/// Dynamic Tanh (DyT): an elementwise stand-in for LayerNorm in transformers, with no
/// statistics at all.
///
/// ```
/// y = w_c · tanh(α · x) + b_c,    α a learned scalar (initially 0.5), w = 1, b = 0
/// ```
/// Channels-last by default (`[*, C]`, the reference code's `channels_last=True`); channels-first
/// `[N, C, spatial…]` is the convolutional variant. Parameter keys are the reference code's:
/// `alpha` `[1]`, `weight` `[C]`, `bias` `[C]` (absent with `bias: false`). Float inputs run
/// ``DynamicTanhKernel``'s SIMD kernels; Double runs the reference. No running statistics, so
/// every mode computes the same.
///
/// ## Shape
/// Input `[*, C]` (channels-last) or `[N, C, …]`; output the same.
///
/// ## References
/// 1. Zhu, Chen, He, LeCun & Liu 2025, "Transformers without Normalization", arXiv:2503.10622.
public final class DynamicTanh<Scalar: NormScalar>: Normalizing, CustomStringConvertible {
    /// C.
    public let channelCount: Int
    /// Where the channel axis is.
    public let layout: Layout
    /// Whether the layer has the offset b.
    public let hasBias: Bool
    /// Which kernels run (`.automatic`: the fast Float kernels).
    public var kernels = KernelChoice.automatic
    private var alpha: Tensor<Scalar>
    private var weight: Tensor<Scalar>
    private var bias: Tensor<Scalar>?
    private var input: Tensor<Scalar>?

    /// Creates the layer.
    /// - Parameters:
    ///   - channelCount: C.
    ///   - alpha: α's initial value (the reference code's `alpha_init_value`, 0.5).
    ///   - bias: learn b (the "no-bias" variant without).
    ///   - layout: channels-last (default) or channels-first.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, alpha: Double = 0.5, bias: Bool = true, layout: Layout = .channelsLast
    ) throws(NormError) {
        guard channelCount >= 1 else {
            throw .invalidHyperparameter(
                name: "channel count", value: "\(channelCount)", requirement: "must be ≥ 1")
        }
        guard alpha.isFinite else {
            throw .invalidHyperparameter(
                name: "alpha", value: "\(alpha)", requirement: "must be finite")
        }
        self.channelCount = channelCount
        self.layout = layout
        hasBias = bias
        do {
            self.alpha = try Tensor(repeating: Scalar(alpha), shape: [1])
            weight = try Tensor(repeating: 1, shape: [channelCount])
            self.bias = bias ? try Tensor(zeros: [channelCount]) : nil
        } catch { throw .tensor(error) }
    }

    /// The layer's name in messages.
    public var displayName: String { "DyT" }

    /// The size of the block that shares one channel (1 channels-last).
    private func inner(_ x: Tensor<Scalar>) throws(NormError) -> Int {
        let needed = layout == .channelsLast ? 1 : 2
        guard x.rank >= needed else {
            throw .invalidRank(
                layer: displayName, expected: layout == .channelsLast ? "rank ≥ 1" : "rank ≥ 2",
                shape: x.shape)
        }
        let axis = layout == .channelsLast ? x.rank - 1 : 1
        guard x.shape[axis] == channelCount else {
            throw .channelMismatch(
                layer: displayName, expected: channelCount, actual: x.shape[axis], shape: x.shape)
        }
        return x.shape[(axis + 1)...].reduce(1, *)
    }

    private var isFast: Bool { kernels == .automatic && Scalar.self == Float.self }

    // MARK: - Forward

    /// y = w ⊙ tanh(α x) + b.
    ///
    /// Elementwise, so an empty input (N = 0 or any zero-size axis) gives an empty output of
    /// its shape, as in PyTorch.
    /// - Throws: ``NormError`` for a wrong rank or channel count.
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let inner = try inner(x)
        var y = try Tensor<Scalar>(zeros: x.shape)
        guard x.count > 0 else {
            input = x
            return y
        }
        let a = alpha.scalars[0]
        y.withUnsafeMutableBufferPointer { yb in
            x.withUnsafeBufferPointer { xb in
                weight.withUnsafeBufferPointer { wb in
                    withOptionalBuffers(bias, nil) { bb, _ in
                        if isFast {
                            DynamicTanhKernel.forward(
                                xb.asFloat, alpha: Float(a), weight: wb.asFloat, bias: bb?.asFloat,
                                channels: channelCount, inner: inner, into: yb.asFloat)
                        } else {
                            DynamicTanhKernel.reference(
                                xb, alpha: Double(a), weight: wb, bias: bb,
                                channels: channelCount, inner: inner, into: yb)
                        }
                    }
                }
            }
        }
        input = x
        return y
    }

    // MARK: - Backward

    /// dx = dy·w·α·(1 − t²), dα = Σ dy·w·x·(1 − t²), dw = Σ dy·t, db = Σ dy (t = tanh(α x)).
    /// - Throws: ``NormError/noForwardCall(layer:)``, ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let x = input else { throw NormError.noForwardCall(layer: displayName) }
        guard dy.shape == x.shape else {
            throw NormError.gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let inner = try inner(x)
        var dx = try Tensor<Scalar>(zeros: x.shape)
        if x.count == 0 {
            // An empty input: an empty dx and zero parameter gradients.
            return NormGradients(
                input: dx, parameters: try parameters.mapValues { try Tensor(zeros: $0.shape) })
        }
        var dAlpha = 0.0
        var dWeight: [Double] = []
        var dBias: [Double] = []
        let a = alpha.scalars[0]
        dx.withUnsafeMutableBufferPointer { dxb in
            x.withUnsafeBufferPointer { xb in
                dy.withUnsafeBufferPointer { dyb in
                    weight.withUnsafeBufferPointer { wb in
                        if isFast {
                            DynamicTanhKernel.backward(
                                xb.asFloat, outputGradient: dyb.asFloat, alpha: Float(a),
                                weight: wb.asFloat, channels: channelCount, inner: inner,
                                inputGradient: dxb.asFloat, alphaGradient: &dAlpha,
                                weightGradient: &dWeight, biasGradient: &dBias)
                        } else {
                            DynamicTanhKernel.referenceBackward(
                                xb, outputGradient: dyb, alpha: Double(a), weight: wb,
                                channels: channelCount, inner: inner, inputGradient: dxb,
                                alphaGradient: &dAlpha, weightGradient: &dWeight,
                                biasGradient: &dBias)
                        }
                    }
                }
            }
        }
        var parameters: [String: Tensor<Scalar>] = [
            "alpha": try tensorOf([1], [dAlpha]),
            "weight": try tensorOf([channelCount], dWeight),
        ]
        if hasBias { parameters["bias"] = try tensorOf([channelCount], dBias) }
        return NormGradients(input: dx, parameters: parameters)
    }

    // MARK: - Parameters and state

    /// `alpha`, `weight` and (unless the no-bias variant) `bias`.
    public var parameters: [String: Tensor<Scalar>] {
        var p: [String: Tensor<Scalar>] = ["alpha": alpha, "weight": weight]
        if let bias { p["bias"] = bias }
        return p
    }

    /// Replaces parameters (shape-checked, all or nothing; α must be finite).
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: parameters, layer: displayName)
        if let a = values["alpha"], !a.isFinite {
            throw NormError.invalidHyperparameter(
                name: "alpha", value: "\(a.scalars[0])", requirement: "must be finite")
        }
        if let a = values["alpha"] { alpha = a }
        if let w = values["weight"] { weight = w }
        if let b = values["bias"] { bias = b }
    }

    /// The parameters (no buffers).
    public func state() throws -> NormState<Scalar> { NormState(tensors: parameters) }

    /// Restores the parameters (shape-checked, all or nothing).
    public func load(_ state: NormState<Scalar>) throws {
        try refuseUnknownKeys(Array(state.counters.keys), known: [], layer: displayName)
        try checkStateShapes(state, current: parameters, layer: displayName)
        try setParameters(state.tensors)
    }

    // MARK: - CustomStringConvertible

    /// One line with the configuration.
    public var description: String {
        "DyT(\(channelCount), alpha=\(alpha.scalars[0]), bias=\(hasBias), layout=\(layout))"
    }
}
