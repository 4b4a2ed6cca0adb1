import LinearAlgebra
import Normalization
import TensorCore

/// Decorrelated Batch Normalization: ZCA whitening of groups of channels over the batch, the
/// ``GroupWhiteningNorm`` with ``WhiteningMethod/eigendecomposition``.
///
/// ```
/// per group of d channels, X (d × m), m = N·spatial:
/// μ = mean, Σ = (X − μ)(X − μ)ᵀ/m + ε·I = D Λ Dᵀ,  W = D Λ^{-1/2} Dᵀ,  ŷ = W (X − μ)
/// y = γ_c ŷ + β_c
/// ```
/// The eigendecomposition is LAPACK's (`dsyev`); ε is added to Σ before it, as the official
/// spatial module does (`eps_first`). Backward goes through the eigendecomposition in closed
/// form (``WhiteningMethod``; Huang et al. 2018, normalizers-spec.md §6.1): its kernel
/// `−1/(√λ_i √λ_j (√λ_i + √λ_j))` has no eigenvalue gap in a denominator, so (numerically)
/// repeated eigenvalues need no clamping. Running statistics follow PyTorch's convention
/// (`r ← 0.9·r + 0.1·s`) for the mean and for the *whitening matrix* (`running_projection`,
/// initially I); inference applies `running_projection (X − running_mean)`.
///
/// Channels-first layout; any rank ≥ 2. Groups: consecutive blocks of `groupSize` channels
/// (the last may be smaller); the default is C/2 as in the official code.
///
/// ## References
/// 1. Huang, Yang, Lang & Deng 2018, "Decorrelated Batch Normalization", arXiv:1804.08450.
public final class DecorrelatedBatchNorm<Scalar: NormScalar>: GroupWhiteningNorm<Scalar> {
    /// Creates a DBN layer.
    /// - Parameter groupSize: channels per group (default C/2; more than C means one group).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, groupSize: Int? = nil, epsilon: Double = 1e-5,
        momentum: Momentum = .pytorchDefault, affine: Bool = true
    ) throws(NormError) {
        if let groupSize {
            try HyperparameterCheck.count(groupSize, limit: Int.max, name: "DBN group size")
        }
        let d = groupSize ?? max(1, channelCount / 2)
        try super.init(
            channelCount: channelCount, groupSize: max(1, min(d, channelCount)),
            method: .eigendecomposition, epsilon: epsilon, momentum: momentum, affine: affine)
    }

    /// Running whitening matrix per group (`running_projection`, initially I).
    public var runningProjections: [Matrix] {
        get { runningWhitening }
        set { runningWhitening = newValue }
    }
}
