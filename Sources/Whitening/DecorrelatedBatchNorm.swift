import Foundation
import LinearAlgebra
import NormKernels
import Normalization
import TensorCore

/// Decorrelated Batch Normalization: ZCA whitening of groups of channels over the batch.
///
/// ```
/// per group of d channels, X (d × m), m = N·spatial:
/// μ = mean, Σ = (X − μ)(X − μ)ᵀ/m + ε·I = D Λ Dᵀ,  W = D Λ^{-1/2} Dᵀ,  ŷ = W (X − μ)
/// y = γ_c ŷ + β_c
/// ```
/// The eigendecomposition is LAPACK's (`dsyev`); ε is added to Σ before it, as the official
/// spatial module does (`eps_first`). Backward is the closed form through the
/// eigendecomposition (Huang et al. 2018, normalizers-spec.md §6.1). Running statistics follow
/// PyTorch's convention (`r ← 0.9·r + 0.1·s`) for the mean and for the *whitening matrix*
/// (initially I); inference applies `running_projection (X − running_mean)`.
///
/// **Near-degenerate eigenvalues.** The backward divides by eigenvalue gaps λ_j − λ_i; gaps
/// below 1e-10·λ_max are replaced by ±1e-10·λ_max (the official code adds 1e-45, which only
/// avoids an exact 0). The forward is exact whatever the gaps; only the gradient inside a
/// (numerically) repeated eigenspace is approximate, and ε keeps every λ ≥ ε.
///
/// Channels-first layout; any rank ≥ 2. Groups: consecutive blocks of `groupSize` channels
/// (the last may be smaller); the default is C/2 as in the official code.
///
/// ## References
/// 1. Huang, Yang, Lang & Deng 2018, "Decorrelated Batch Normalization", arXiv:1804.08450.
public final class DecorrelatedBatchNorm<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// C.
    public let channelCount: Int
    /// d (channels per group).
    public let groupSize: Int
    /// ε added to Σ.
    public let epsilon: Double
    /// Running-statistic rule.
    public var momentum: Momentum
    /// γ (`weight`), nil without affine.
    public var scale: Tensor<Scalar>?
    /// β (`bias`).
    public var offset: Tensor<Scalar>?
    /// Running mean `[C]` (`running_mean`).
    public var runningMean: Tensor<Scalar>
    /// Running whitening matrix per group (`running_projection`, initially I).
    public var runningProjections: [Matrix]
    let groups: [Range<Int>]

    /// Creates a DBN layer.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, groupSize: Int? = nil, epsilon: Double = 1e-5,
        momentum: Momentum = .pytorchDefault,
        affine: Bool = true
    ) throws(NormError) {
        let d = groupSize ?? max(1, channelCount / 2)
        guard channelCount >= 1, d >= 1, epsilon > 0, epsilon.isFinite else {
            throw .invalidHyperparameter(
                name: "DBN", value: "C \(channelCount), group \(d), eps \(epsilon)",
                requirement: "positive sizes and ε")
        }
        try momentum.validate()
        self.channelCount = channelCount
        self.groupSize = min(d, channelCount)
        self.epsilon = epsilon
        self.momentum = momentum
        groups = GroupWhitening.groups(channels: channelCount, size: self.groupSize)
        do {
            if affine {
                scale = try Tensor(repeating: 1, shape: [channelCount])
                offset = try Tensor(zeros: [channelCount])
            }
            runningMean = try Tensor(zeros: [channelCount])
        } catch { throw .tensor(error) }
        runningProjections = groups.map { .identity($0.count) }
    }

    /// What forward keeps for backward.
    public struct Cache: Sendable {
        let input: Tensor<Scalar>
        let whitened: [Double]
        let centred: [Matrix]
        let eigenvalues: [[Double]]
        let eigenvectors: [Matrix]
        let projections: [Matrix]
        let training: Bool
    }

    /// Gradients.
    public struct Gradients: Sendable {
        /// dL/dx.
        public var input: Tensor<Scalar>
        /// dL/dγ.
        public var scale: Tensor<Scalar>?
        /// dL/dβ.
        public var offset: Tensor<Scalar>?
    }

    /// Whitens `x`.
    /// - Throws: ``NormError`` for a wrong shape, a single sample per statistic in training, or
    ///   a failed eigendecomposition; nothing changes then.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        try GroupWhitening.validate(x, channels: channelCount, layer: "DecorrelatedBatchNorm")
        let m = x.count / channelCount
        let xd = GroupWhitening.doubles(x)
        var yd = [Double](repeating: 0, count: x.count)
        var centred: [Matrix] = []
        var values: [[Double]] = []
        var vectors: [Matrix] = []
        var projections: [Matrix] = []
        var newMean = runningMean.scalars.map(Double.init)
        var newProjections = runningProjections
        let training = mode == .training
        if training && m < 2 {
            throw NormError.singleValuePerStatistic(layer: "DecorrelatedBatchNorm", shape: x.shape)
        }
        let f = momentum.weightOfNew(batchesTracked: 1)
        for (k, group) in groups.enumerated() {
            let xg = GroupWhitening.gather(xd, shape: x.shape, group)
            if training {
                let (mu, xc) = GroupWhitening.centre(xg)
                let sigma = GroupWhitening.covariance(xc, epsilon: epsilon)
                let (lambda, d) = try sigma.symmetricEigen()
                let floor = epsilon * 1e-6
                let inverseRoot = lambda.map { 1 / max($0, floor).squareRoot() }
                var dScaled = d
                for i in 0..<d.rows { for j in 0..<d.cols { dScaled[i, j] *= inverseRoot[j] } }
                let w = Matrix.product(dScaled, d, transposeB: true)
                GroupWhitening.scatter(w * xc, group, shape: x.shape, into: &yd)
                centred.append(xc)
                values.append(lambda)
                vectors.append(d)
                projections.append(w)
                for (i, ch) in group.enumerated() {
                    newMean[ch] = (1 - f) * newMean[ch] + f * mu[i]
                }
                newProjections[k] = (1 - f) * runningProjections[k] + f * w
            } else {
                let xc = GroupWhitening.subtracting(
                    rowMeans: group.map { Double(runningMean.scalars[$0]) }, from: xg)
                GroupWhitening.scatter(runningProjections[k] * xc, group, shape: x.shape, into: &yd)
                centred.append(xc)
                projections.append(runningProjections[k])
            }
        }
        guard yd.allSatisfy(\.isFinite) || !x.isFinite else {
            throw NormError.nonFiniteStatistics(layer: "DecorrelatedBatchNorm")
        }
        if training {
            guard newMean.allSatisfy(\.isFinite) else {
                throw NormError.nonFiniteStatistics(layer: "DecorrelatedBatchNorm")
            }
            runningMean = try Tensor(shape: [channelCount], rounding: newMean)
            runningProjections = newProjections
        }
        let whitened = yd
        GroupWhitening.affine(&yd, shape: x.shape, scale: scale, offset: offset)
        let y = try Tensor<Scalar>(shape: x.shape, rounding: yd)
        return (
            y,
            Cache(
                input: x, whitened: whitened, centred: centred, eigenvalues: values,
                eigenvectors: vectors,
                projections: projections, training: training)
        )
    }

    /// Back-propagates through the whitening, in closed form through the eigendecomposition.
    ///
    /// With rows as samples, U = D Λ^{-1/2}, Ẑ = X_c U, dZ = dŶ D, F = dZᵀẐ/m, f = mean rows of
    /// dZ, S₀[i][j] = (λ_i F[j][i] + √(λ_iλ_j) F[i][j])/(λ_j − λ_i), S = S₀ + S₀ᵀ − diag(F):
    /// `dX = (Ẑ S + dZ − 1fᵀ) Uᵀ`. In inference `dX = dŶ Pᵀ` with P the running projection.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws -> Gradients {
        guard dy.shape == cache.input.shape else {
            throw NormError.gradientShapeMismatch(expected: cache.input.shape, actual: dy.shape)
        }
        let (g, dScale, dOffset) = try GroupWhitening.affineBackward(
            dy, whitened: cache.whitened, scale: scale)
        var dxd = [Double](repeating: 0, count: dy.count)
        for (k, group) in groups.enumerated() {
            let dYw = GroupWhitening.gather(g, shape: dy.shape, group)  // d × m
            if !cache.training {
                GroupWhitening.scatter(
                    Matrix.product(cache.projections[k], dYw, transposeA: true), group,
                    shape: dy.shape,
                    into: &dxd)
                continue
            }
            let lambda = cache.eigenvalues[k]
            let d = cache.eigenvectors[k]
            // d × m; the formulas below use its transpose (rows = samples).
            let xc = cache.centred[k]
            let m = Double(xc.cols)
            let n = d.rows
            let floor = epsilon * 1e-6
            var u = d
            for i in 0..<n { for j in 0..<n { u[i, j] /= max(lambda[j], floor).squareRoot() } }
            let zh = Matrix.product(xc, u, transposeA: true)  // X_c U, m × d
            let dZ = Matrix.product(dYw, d, transposeA: true)  // dŶ D, m × d
            let f = (1 / m) * Matrix.product(dZ, zh, transposeA: true)
            var colMeans = [Double](repeating: 0, count: n)
            for r in 0..<dZ.rows { for j in 0..<n { colMeans[j] += dZ[r, j] / m } }
            let top = lambda.max() ?? 1
            var s0 = Matrix(rows: n, cols: n)
            for i in 0..<n {
                for j in 0..<n where i != j {
                    var gap = lambda[j] - lambda[i]
                    if abs(gap) < 1e-10 * top { gap = gap < 0 ? -1e-10 * top : 1e-10 * top }
                    s0[i, j] =
                        (lambda[i] * f[j, i] + (lambda[i] * lambda[j]).squareRoot() * f[i, j]) / gap
                }
            }
            var s = s0 + s0.transposed
            for i in 0..<n { s[i, i] -= f[i, i] }
            var inner = zh * s + dZ
            for r in 0..<inner.rows { for j in 0..<n { inner[r, j] -= colMeans[j] } }
            // dX (d × m) = U·innerᵀ, the transpose of the rows form inner·Uᵀ.
            GroupWhitening.scatter(
                Matrix.product(u, inner, transposeB: true), group, shape: dy.shape, into: &dxd)
        }
        return Gradients(
            input: try Tensor(shape: dy.shape, rounding: dxd), scale: dScale, offset: dOffset)
    }

    /// One line with the configuration.
    public var description: String {
        "DecorrelatedBatchNorm(\(channelCount), group=\(groupSize), eps=\(epsilon), \(momentum))"
    }
}

/// IterNorm: whitening by Newton's iterations on the trace-normalized covariance, without an
/// eigendecomposition.
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
public final class IterNorm<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)``.
    public var lastCache: Cache?

    /// C.
    public let channelCount: Int
    /// d.
    public let groupSize: Int
    /// T.
    public let iterations: Int
    /// ε.
    public let epsilon: Double
    /// Running rule.
    public var momentum: Momentum
    /// γ (`weight`).
    public var scale: Tensor<Scalar>?
    /// β (`bias`).
    public var offset: Tensor<Scalar>?
    /// `running_mean`.
    public var runningMean: Tensor<Scalar>
    /// `running_wm` per group.
    public var runningWhitening: [Matrix]
    let groups: [Range<Int>]

    /// The most Newton iterations a layer accepts (the paper uses T = 5; each iteration costs
    /// two d×d matrix products per group, so far more is a mistake, not a setting).
    public static var maximumIterations: Int { 1000 }

    /// Creates an IterNorm layer.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` for a channel or
    ///   group count below 1, T outside 1…``maximumIterations``, or ε not finite and > 0.
    public init(
        channelCount: Int, groupSize: Int? = nil, iterations: Int = 5, epsilon: Double = 1e-5,
        momentum: Momentum = .pytorchDefault, affine: Bool = true
    ) throws(NormError) {
        guard channelCount >= 1, epsilon > 0, epsilon.isFinite else {
            throw .invalidHyperparameter(
                name: "IterNorm", value: "C \(channelCount), eps \(epsilon)",
                requirement: "positive sizes and a finite ε > 0")
        }
        try HyperparameterCheck.count(
            iterations, limit: Self.maximumIterations, name: "IterNorm iterations")
        if let groupSize {
            try HyperparameterCheck.count(groupSize, limit: Int.max, name: "IterNorm group size")
        }
        try momentum.validate()
        var d = min(groupSize ?? channelCount, channelCount)
        while d > 1 && channelCount % d != 0 { d /= 2 }
        self.channelCount = channelCount
        self.groupSize = max(d, 1)
        self.iterations = iterations
        self.epsilon = epsilon
        self.momentum = momentum
        groups = GroupWhitening.groups(channels: channelCount, size: self.groupSize)
        do {
            if affine {
                scale = try Tensor(repeating: 1, shape: [channelCount])
                offset = try Tensor(zeros: [channelCount])
            }
            runningMean = try Tensor(zeros: [channelCount])
        } catch { throw .tensor(error) }
        runningWhitening = groups.map { .identity($0.count) }
    }

    /// What forward keeps for backward.
    public struct Cache: Sendable {
        let input: Tensor<Scalar>
        let whitened: [Double]
        let centred: [Matrix]
        let sigma: [Matrix]
        let iterates: [[Matrix]]
        let whitening: [Matrix]
        let training: Bool
    }

    /// Gradients.
    public struct Gradients: Sendable {
        /// dL/dx.
        public var input: Tensor<Scalar>
        /// dL/dγ.
        public var scale: Tensor<Scalar>?
        /// dL/dβ.
        public var offset: Tensor<Scalar>?
    }

    /// Whitens `x`.
    /// - Throws: ``NormError`` for a wrong shape or a single sample per statistic in training.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        try GroupWhitening.validate(x, channels: channelCount, layer: "IterNorm")
        let training = mode == .training
        if training && x.count / channelCount < 2 {
            throw NormError.singleValuePerStatistic(layer: "IterNorm", shape: x.shape)
        }
        let xd = GroupWhitening.doubles(x)
        var yd = [Double](repeating: 0, count: x.count)
        var centred: [Matrix] = []
        var sigmas: [Matrix] = []
        var iterates: [[Matrix]] = []
        var whitenings: [Matrix] = []
        var newMean = runningMean.scalars.map(Double.init)
        var newWhitening = runningWhitening
        let f = momentum.weightOfNew(batchesTracked: 1)
        for (k, group) in groups.enumerated() {
            let xg = GroupWhitening.gather(xd, shape: x.shape, group)
            if training {
                let (mu, xc) = GroupWhitening.centre(xg)
                let sigma = GroupWhitening.covariance(xc, epsilon: epsilon)
                let (w, ps) = NewtonWhitening.forward(sigma, iterations: iterations)
                GroupWhitening.scatter(w * xc, group, shape: x.shape, into: &yd)
                centred.append(xc)
                sigmas.append(sigma)
                iterates.append(ps)
                whitenings.append(w)
                for (i, ch) in group.enumerated() {
                    newMean[ch] = (1 - f) * newMean[ch] + f * mu[i]
                }
                newWhitening[k] = (1 - f) * runningWhitening[k] + f * w
            } else {
                let xc = GroupWhitening.subtracting(
                    rowMeans: group.map { Double(runningMean.scalars[$0]) }, from: xg)
                GroupWhitening.scatter(runningWhitening[k] * xc, group, shape: x.shape, into: &yd)
                centred.append(xc)
                whitenings.append(runningWhitening[k])
            }
        }
        if training {
            guard newMean.allSatisfy(\.isFinite) else {
                throw NormError.nonFiniteStatistics(layer: "IterNorm")
            }
            runningMean = try Tensor(shape: [channelCount], rounding: newMean)
            runningWhitening = newWhitening
        }
        let whitened = yd
        GroupWhitening.affine(&yd, shape: x.shape, scale: scale, offset: offset)
        let y = try Tensor<Scalar>(shape: x.shape, rounding: yd)
        return (
            y,
            Cache(
                input: x, whitened: whitened, centred: centred, sigma: sigmas, iterates: iterates,
                whitening: whitenings, training: training)
        )
    }

    /// Back-propagates through the T Newton steps (normalizers-spec.md §6.2, FD-checked there and
    /// in the tests).
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws -> Gradients {
        guard dy.shape == cache.input.shape else {
            throw NormError.gradientShapeMismatch(expected: cache.input.shape, actual: dy.shape)
        }
        let (gValues, dScale, dOffset) = try GroupWhitening.affineBackward(
            dy, whitened: cache.whitened, scale: scale)
        var dxd = [Double](repeating: 0, count: dy.count)
        for (k, group) in groups.enumerated() {
            let g = GroupWhitening.gather(gValues, shape: dy.shape, group)
            let w = cache.whitening[k]
            if !cache.training {
                GroupWhitening.scatter(
                    Matrix.product(w, g, transposeA: true), group, shape: dy.shape, into: &dxd)
                continue
            }
            let xc = cache.centred[k]
            let m = Double(xc.cols)
            let dW = Matrix.product(g, xc, transposeB: true)
            let dSym = NewtonWhitening.backward(
                dW, sigma: cache.sigma[k], iterates: cache.iterates[k])
            let centredG = GroupWhitening.centre(g).centred
            let dX = Matrix.product(w, centredG, transposeA: true) + (2 / m) * (dSym * xc)
            GroupWhitening.scatter(dX, group, shape: dy.shape, into: &dxd)
        }
        return Gradients(
            input: try Tensor(shape: dy.shape, rounding: dxd), scale: dScale, offset: dOffset)
    }

    /// One line with the configuration.
    public var description: String {
        "IterNorm(\(channelCount), group=\(groupSize), T=\(iterations), eps=\(epsilon), \(momentum))"
    }
}
