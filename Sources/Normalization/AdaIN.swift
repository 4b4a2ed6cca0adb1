import NormKernels
import TensorCore

/// Adaptive Instance Normalization: the content's per-(sample, channel) statistics replaced by
/// the style's.
///
/// ```
/// AdaIN(x, s) = σ_s · (x − μ_x) / σ_x + μ_s,     y = α · AdaIN(x, s) + (1 − α) · x
/// ```
/// μ and σ per (n, c) over the spatial positions of each tensor (content and style may have
/// different spatial sizes). Two conventions (normalizers-spec.md 3.1):
/// - ``Convention/pytorchPort`` (naoto0804/pytorch-AdaIN `calc_mean_std`, the default):
///   σ = √(unbiased variance + 1e-5) for content and style;
/// - ``Convention/originalTorch`` (xunhuang1995/AdaIN-style): content σ = √(biased variance +
///   1e-5), style σ = √(biased variance) with no ε.
///
/// No parameters and no running statistics, so every mode computes the same. Φ is an
/// InstanceNorm ``NormLayer`` without affine parameters; Ψ is ``ConditionalAffine`` with
/// γ = α·σ_s and β = α·μ_s per (n, c). Backward returns dL/dx and dL/d(style): the style path is
/// dμ_s = α Σ dy, dσ_s = α Σ dy ⊙ x̂ per (n, c), then
/// `ds_i = dμ_s / L_s + dσ_s · (s_i − μ_s) / (d · σ_s)` with d = L_s − 1 (port) or L_s
/// (original); where σ_s = 0 (a constant style channel, original convention) the σ term is 0.
///
/// ## Shape
/// Content `[N, C, spatial…]` (rank ≥ 3, channels-first); style `[N, C, spatial′…]` with the same
/// rank, batch and channels. Output the content's shape.
///
/// ## References
/// 1. Huang & Belongie 2017, "Arbitrary Style Transfer in Real-time with Adaptive Instance
///    Normalization", arXiv:1703.06868.
public final class AdaIN<Scalar: NormScalar>: ConditionalNormalizing, ParameterlessNormalizing,
    CustomStringConvertible
{
    /// Which reference implementation's statistics to reproduce.
    public enum Convention: String, Sendable, Hashable, CaseIterable {
        /// pytorch-AdaIN: unbiased variances, ε = 1e-5 for content and style.
        case pytorchPort = "unbiased"
        /// The original Torch code: biased variances, ε = 1e-5 for the content only.
        case originalTorch = "biased"
    }

    /// The statistics convention.
    public let convention: Convention
    /// Content–style interpolation weight α (1: pure AdaIN).
    public let alpha: Double
    /// ε inside the content's square root (and the style's, in the PyTorch port).
    public let epsilon: Double
    /// Φ: InstanceNorm without affine parameters.
    let content: NormLayer<Scalar>
    /// The style for the next call.
    private var style: Tensor<Scalar>?
    private var cache: Cache?

    private struct Cache {
        let normalized: Tensor<Scalar>
        let contentCache: NormLayer<Scalar>.Cache
        let style: Tensor<Scalar>
        let styleMean: [Double]
        let styleStd: [Double]
    }

    /// The layer's name in messages.
    public var displayName: String { "AdaIN" }
    /// One conditioning input, `style`.
    public var conditionNames: [String] { ["style"] }

    /// Creates an AdaIN layer.
    /// - Parameters:
    ///   - convention: whose statistics (default: the PyTorch port's, unbiased).
    ///   - alpha: α in [0, 1].
    ///   - epsilon: ε (1e-5 in both reference codes).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(convention: Convention = .pytorchPort, alpha: Double = 1, epsilon: Double = 1e-5)
        throws(NormError)
    {
        guard alpha >= 0, alpha <= 1 else {
            throw .invalidHyperparameter(
                name: "alpha", value: "\(alpha)", requirement: "must lie in [0, 1]")
        }
        self.convention = convention
        self.alpha = alpha
        self.epsilon = epsilon
        content = try NormLayer(
            normalizer: Normalizer(
                partition: .instance, operation: .standardize, recovery: .none,
                variance: convention == .pytorchPort ? .unbiased : .biased, epsilon: epsilon),
            requiresMultipleValues: true, name: "AdaIN")
    }

    /// Sets the style (`["style": s]`); refuses NaN, infinity and ranks below 3.
    /// - Throws: ``NormError/invalidCondition(name:problem:)``; the previous style is kept then.
    public func setConditions(_ conditions: [String: Tensor<Scalar>]) throws {
        try refuseUnknownKeys(Array(conditions.keys), known: conditionNames, layer: displayName)
        guard let s = conditions["style"] else {
            throw NormError.invalidCondition(name: "style", problem: "is missing")
        }
        guard s.rank >= 3 else {
            throw NormError.invalidCondition(
                name: "style", problem: "must have shape [N, C, spatial…], got \(s.shape)")
        }
        try requireFinite(s, name: "style")
        style = s
    }

    // MARK: - Forward

    /// y = α·(σ_s·x̂ + μ_s) + (1 − α)·x.
    ///
    /// The mode does not matter (no running statistics).
    /// - Throws: ``NormError`` when the style is missing or does not match the content.
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let style else {
            throw NormError.invalidCondition(
                name: "style", problem: "is missing (set it with setConditions)")
        }
        guard x.rank >= 3 else {
            throw NormError.invalidRank(
                layer: displayName, expected: "rank ≥ 3 (N, C, spatial…)", shape: x.shape)
        }
        guard style.rank == x.rank, style.shape[0] == x.shape[0], style.shape[1] == x.shape[1]
        else {
            throw NormError.invalidCondition(
                name: "style",
                problem: "must have the content's rank, batch and channels: style \(style.shape), "
                    + "content \(x.shape)")
        }
        let styleSize = style.shape.dropFirst(2).reduce(1, *)
        if convention == .pytorchPort, styleSize < 2 {
            throw NormError.invalidCondition(
                name: "style",
                problem: "needs at least 2 spatial positions for an unbiased variance, got "
                    + "\(style.shape)")
        }
        let plan = try Normalizer.Partition.instance.plan(for: style.shape, layout: .channelsFirst)
        let styleOperation = ReferenceNormKernel.Operation(
            centers: true, scales: true, unbiased: convention == .pytorchPort,
            epsilon: convention == .pytorchPort ? epsilon : 0)
        let moments = content.kernels.moments(
            style, plan: plan, operation: styleOperation, indexing: nil)
        let styleStd = moments.variance.map { ($0 + styleOperation.epsilon).squareRoot() }
        let (normalized, contentCache) = try content.forward(x, mode: .training)
        let recovery = ConditionalAffine(.perSampleAndChannel(x.shape))
        var y: Tensor<Scalar> = try recovery.apply(
            normalized, scale: styleStd.map { alpha * $0 }, offset: moments.mean.map { alpha * $0 })
        if alpha != 1 {
            y = try addingScaled(y, x, 1 - alpha)
        }
        cache = Cache(
            normalized: normalized, contentCache: contentCache, style: style,
            styleMean: moments.mean, styleStd: styleStd)
        return y
    }

    // MARK: - Backward

    /// dL/dx (content) and dL/d(style) under `conditions["style"]`.
    ///
    /// Content: Φ's backward of g = α·σ_s·dy, plus (1 − α)·dy. Style: dμ_s = α Σ dy and
    /// dσ_s = α Σ dy ⊙ x̂ per (n, c), spread over the style's elements by the derivatives of the
    /// mean and of σ_s = √(var + ε): ∂σ_s/∂s_i = (s_i − μ_s)/(d·σ_s), d = L_s − 1 or L_s.
    /// - Throws: ``NormError/noForwardCall(layer:)``, ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let x = cache.contentCache.input
        guard dy.shape == x.shape else {
            throw NormError.gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let recovery = ConditionalAffine(.perSampleAndChannel(x.shape))
        let (g, dGamma, dBeta) = try recovery.backward(
            dy, normalized: cache.normalized, scale: cache.styleStd.map { alpha * $0 })
        var dx = try content.backward(g, cache: cache.contentCache).input
        if alpha != 1 {
            dx = try addingScaled(dx, dy, 1 - alpha)
        }
        // dγ = Σ dy·x̂ is dL/d(α σ_s); dβ = Σ dy is dL/d(α μ_s).
        let style = cache.style
        let size = style.shape.dropFirst(2).reduce(1, *)
        let divisor = Double(convention == .pytorchPort ? size - 1 : size)
        var ds = [Double](repeating: 0, count: style.count)
        style.withUnsafeBufferPointer { sb in
            for set in 0..<cache.styleMean.count {
                let dMean = alpha * dBeta[set] / Double(size)
                let sigma = cache.styleStd[set]
                let dSigma = sigma > 0 ? alpha * dGamma[set] / (divisor * sigma) : 0
                let mean = cache.styleMean[set]
                for i in set * size..<(set + 1) * size {
                    ds[i] = dMean + dSigma * (Double(sb[i]) - mean)
                }
            }
        }
        return NormGradients(input: dx, conditions: ["style": try tensorOf(style.shape, ds)])
    }

    // MARK: - CustomStringConvertible

    /// One line with the configuration.
    public var description: String {
        "AdaIN(convention=\(convention.rawValue), alpha=\(alpha), eps=\(epsilon))"
    }
}
