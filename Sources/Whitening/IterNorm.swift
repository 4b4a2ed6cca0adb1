import LinearAlgebra
import Normalization
import TensorCore

/// IterNorm: whitening by Newton's iterations on the trace-normalized covariance, without an
/// eigendecomposition; the ``GroupWhiteningNorm`` with ``WhiteningMethod/newton(iterations:)``.
///
/// ```
/// Σ = X_cX_cᵀ/m + ε·I,  Σ_N = Σ/tr(Σ),  P₀ = I,  P_k = (3P_{k−1} − P_{k−1}³Σ_N)/2  (k = 1…T)
/// W = P_T/√tr(Σ),  ŷ = W X_c,  y = γ_c ŷ + β_c
/// ```
/// As T grows, W tends to Σ^{-1/2} (ZCA; tested). Exact backward through the T iterations
/// (normalizers-spec.md §6.2). Running mean and running whitening matrix (`running_wm`, initially
/// I) with PyTorch's convention. Groups of `groupSize` channels; when C is not divisible, the
/// group size is halved until it divides (as the official code does); default: one group.
///
/// ## References
/// 1. Huang, Zhou, Zhu, Liu & Shao 2019, "Iterative Normalization: Beyond Standardization towards
///    Efficient Whitening", arXiv:1904.03441.
public final class IterNorm<Scalar: NormScalar>: GroupWhiteningNorm<Scalar> {
    /// The most Newton iterations a layer accepts (the paper uses T = 5; each iteration costs
    /// two d×d matrix products per group, so far more is a mistake, not a setting).
    public static var maximumIterations: Int { maximumNewtonIterations }

    /// T.
    public var iterations: Int {
        if case .newton(let t) = method { return t }
        return 0
    }

    /// Creates an IterNorm layer.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` for a channel or
    ///   group count below 1, T outside 1…``maximumIterations``, or ε not finite and > 0.
    public init(
        channelCount: Int, groupSize: Int? = nil, iterations: Int = 5, epsilon: Double = 1e-5,
        momentum: Momentum = .pytorchDefault, affine: Bool = true
    ) throws(NormError) {
        if let groupSize {
            try HyperparameterCheck.count(groupSize, limit: Int.max, name: "IterNorm group size")
        }
        var d = min(groupSize ?? channelCount, channelCount)
        while d > 1 && channelCount % d != 0 { d /= 2 }
        try super.init(
            channelCount: channelCount, groupSize: max(d, 1),
            method: .newton(iterations: iterations), epsilon: epsilon, momentum: momentum,
            affine: affine)
    }
}
