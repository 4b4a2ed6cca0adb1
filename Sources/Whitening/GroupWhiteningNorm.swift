import LinearAlgebra
import NormKernels
import Normalization
import TensorCore

/// Group whitening over the batch, with the method as a choice: the one layer behind
/// ``DecorrelatedBatchNorm`` (eigendecomposition) and ``IterNorm`` (Newton's iterations).
///
/// ```
/// per group of d channels, X (d × m), m = N·spatial:
/// μ = mean, X_c = X − μ1ᵀ, Σ = X_c X_cᵀ/m + ε·I, W = whitening(Σ) ≈ Σ^{-1/2}, ŷ = W X_c
/// y = γ_c ŷ + β_c
/// backward, G = diag(γ) dy, dW = G X_cᵀ, dΣ = method.backward(dW), ḡ = G1/m:
/// dX = (2/m) dΣ X_c + Wᵀ G − Wᵀ ḡ 1ᵀ
/// ```
/// (dΣ is symmetric and X_c 1 = 0, so the mean's path through Σ vanishes.) Running statistics
/// follow PyTorch's convention (`r ← (1 − f)·r + f·s`, f = 0.1 by default) for the mean and for
/// the *whitening matrix* (initially I); inference applies `running_W (X − running_mean)` and
/// its backward is `dX = running_Wᵀ G`.
///
/// Data stays in the tensor's scalar type (Float32 storage for `Float`) and moves through BLAS
/// (``GroupWhitening``); the d × d algebra is Double. Groups run in parallel on NormKit's threads
/// with BLAS single-threaded inside them.
///
/// An empty batch (N = 0, or a spatial size 0) gives an empty output and leaves the running
/// statistics untouched, as PyTorch's BatchNorm does; its backward gives an empty dx and zero
/// parameter gradients.
///
/// ## Shape
/// Input `[N, C, spatial…]` (rank ≥ 2, channels-first), output the same. The cache keeps X_c
/// (the input's shape) and W per group.
public class GroupWhiteningNorm<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// C.
    public let channelCount: Int
    /// d (channels per group; the last group may be smaller).
    public let groupSize: Int
    /// How W is computed from Σ.
    public let method: WhiteningMethod
    /// ε added to Σ.
    public let epsilon: Double
    /// Running-statistic rule and its batch count (counted for the cumulative rule only: the
    /// official layers keep no `num_batches_tracked`).
    public var average: RunningAverage
    /// Running-statistic rule.
    public var momentum: Momentum {
        get { average.momentum }
        set { average.momentum = newValue }
    }
    /// γ (`weight`), nil without affine.
    public var scale: Tensor<Scalar>?
    /// β (`bias`).
    public var offset: Tensor<Scalar>?
    /// Running mean `[C]` (`running_mean`).
    public var runningMean: Tensor<Scalar>
    /// Running whitening matrix per group (DBN's `running_projection`, IterNorm's
    /// `running_wm`), initially I.
    public var runningWhitening: [Matrix]
    let groups: [Range<Int>]

    /// A group whitening layer.
    /// - Parameters:
    ///   - groupSize: channels per group, 1…C; the last group takes what is left.
    ///   - method: ``WhiteningMethod/eigendecomposition`` or ``WhiteningMethod/newton(iterations:)``
    ///     with 1…``IterNorm/maximumIterations`` iterations.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` for a size outside
    ///   its range, an iteration count outside 1…1000, ε not finite and > 0, or a bad momentum.
    public init(
        channelCount: Int, groupSize: Int, method: WhiteningMethod, epsilon: Double = 1e-5,
        momentum: Momentum = .pytorchDefault, affine: Bool = true
    ) throws(NormError) {
        self.method = method
        let iterations: Int? =
            if case .newton(let t) = method { t } else { nil }
        groups = try GroupWhitening.checkedGroups(
            channelCount: channelCount, groupSize: groupSize, epsilon: epsilon,
            iterations: iterations, momentum: momentum)
        self.channelCount = channelCount
        self.groupSize = groupSize
        self.epsilon = epsilon
        average = RunningAverage(momentum: momentum)
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
        let shape: [Int]
        let training: Bool
        /// X_c at the input's offsets (empty for an empty batch).
        let centred: [Scalar]
        /// W per group.
        let whitening: [Matrix]
        /// The method's factors per group (training only).
        let factors: [WhiteningMethod.Factors]
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

    /// The layer's name in messages and errors.
    public var displayName: String {
        method == .eigendecomposition ? "DecorrelatedBatchNorm" : "IterNorm"
    }

    // MARK: - Forward

    /// Whitens `x`.
    /// - Throws: ``NormError`` for a wrong shape, a single sample per statistic in training, or
    ///   a failed or non-finite whitening; nothing changes then.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        try GroupWhitening.validate(x, channels: channelCount, layer: displayName)
        let training = mode == .training
        if x.count == 0 {
            if training { average.countEmptyBatch(countingEveryBatch: false) }
            return (
                x,
                Cache(shape: x.shape, training: training, centred: [], whitening: [], factors: [])
            )
        }
        let shape = GroupWhitening.Shape(x.shape)
        if training && shape.m < 2 {
            throw NormError.singleValuePerStatistic(layer: displayName, shape: x.shape)
        }
        let (y, centred, results) = try whiten(x, shape: shape, training: training)
        if training {
            var average = self.average
            let f = average.advance(countingEveryBatch: false)
            var batchMean = [Double](repeating: 0, count: channelCount)
            for (k, group) in groups.enumerated() {
                for (i, ch) in group.enumerated() { batchMean[ch] = results[k].mean[i] }
            }
            let newMean = RunningAverage.blend(
                runningMean.scalars.map { Double($0) }, toward: batchMean, weightOfNew: f)
            let newWhitening = GroupWhitening.blend(
                runningWhitening, toward: results.map(\.w), weightOfNew: f)
            guard newMean.allSatisfy(\.isFinite) else {
                throw NormError.nonFiniteStatistics(layer: displayName)
            }
            runningMean = try Tensor(shape: [channelCount], rounding: newMean)
            runningWhitening = newWhitening
            self.average = average
        }
        return (
            y,
            Cache(
                shape: x.shape, training: training, centred: centred,
                whitening: results.map(\.w), factors: results.compactMap(\.factors))
        )
    }

    /// What forward found for one group.
    struct GroupResult: Sendable {
        /// The mean subtracted (the batch's in training, the running one in inference).
        var mean: [Double]
        /// W (the batch's or the running one).
        var w: Matrix
        /// The method's factors (training only).
        var factors: WhiteningMethod.Factors?
    }

    /// The forward over all groups: y, X_c, and per group the mean, W and factors used.
    @_specialize(where Scalar == Float)
    @_specialize(where Scalar == Double)
    func whiten(_ x: Tensor<Scalar>, shape: GroupWhitening.Shape, training: Bool) throws -> (
        Tensor<Scalar>, [Scalar], [GroupResult]
    ) {
        let scale = self.scale.map { $0.scalars.map { Double($0) } }
        let offset = self.offset?.scalars
        let runningMean = self.runningMean.scalars.map { Double($0) }
        let (groups, running, method, epsilon) = (self.groups, runningWhitening, method, epsilon)
        let layer = displayName
        let (y, (centred, results)) = try GroupWhitening.filled(x.count) { yb in
            try GroupWhitening.filled(x.count) { (cb: UnsafeMutablePointer<Scalar>) in
                try x.withUnsafeBufferPointer { xp in
                    let xb = xp.baseAddress!
                    let work = x.count * max(1, groups[0].count)
                    return try GroupWhitening.forEachBlock(groups.count, work: work) { k in
                        let block = GroupWhitening.Block(group: groups[k], samples: 0..<shape.n)
                        let mean =
                            training
                            ? GroupWhitening.means(xb, shape, block)
                            : block.group.map { runningMean[$0] }
                        GroupWhitening.centre(xb, shape, block, mean: mean, into: cb)
                        var result = GroupResult(mean: mean, w: running[k])
                        if training {
                            let sigma = GroupWhitening.covariance(
                                cb, shape, block, divisor: Double(shape.m), epsilon: epsilon)
                            (result.w, result.factors) = try method.whitening(
                                sigma, epsilon: epsilon, layer: layer)
                        }
                        guard result.w.values.allSatisfy(\.isFinite) else {
                            throw NormError.nonFiniteStatistics(layer: layer)
                        }
                        let a: [Scalar] = GroupWhitening.stored(
                            result.w, rowScale: scale.map { s in block.group.map { s[$0] } })
                        let rowOffsets = block.group.map { offset?[$0] ?? 0 }
                        GroupWhitening.apply(
                            a, rowOffsets: rowOffsets, centred: cb, shape, block, into: yb)
                        return result
                    }
                }
            }
        }
        return (try Tensor(shape: x.shape, scalars: y), centred, results)
    }

    // MARK: - Backward

    /// Back-propagates through the affine recovery, the whitening and the statistics:
    /// `dx = A X_c + B dy − c 1ᵀ` per group with A = (2/m)·dΣ, B = Wᵀ diag(γ), c = Wᵀ ḡ in
    /// training and A = 0, B = Wᵀ diag(γ), c = 0 in inference (see the type's formula).
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws -> Gradients {
        guard dy.shape == cache.shape else {
            throw NormError.gradientShapeMismatch(expected: cache.shape, actual: dy.shape)
        }
        let zeros = try scale.map { _ in try Tensor<Scalar>(zeros: [channelCount]) }
        guard dy.count > 0 else { return Gradients(input: dy, scale: zeros, offset: zeros) }
        let (dx, dScale, dOffset) = try backward(
            dy, cache: cache, shape: GroupWhitening.Shape(dy.shape))
        guard scale != nil else { return Gradients(input: dx, scale: nil, offset: nil) }
        return Gradients(
            input: dx, scale: try Tensor(shape: [channelCount], rounding: dScale),
            offset: try Tensor(shape: [channelCount], rounding: dOffset))
    }

    @_specialize(where Scalar == Float)
    @_specialize(where Scalar == Double)
    func backward(_ dy: Tensor<Scalar>, cache: Cache, shape: GroupWhitening.Shape) throws -> (
        Tensor<Scalar>, [Double], [Double]
    ) {
        let gammas = scale.map { $0.scalars.map { Double($0) } }
        let (groups, m) = (self.groups, Double(shape.m))
        let (dx, sums) = try GroupWhitening.filled(dy.count) { dxb in
            try dy.withUnsafeBufferPointer { dyp in
                try cache.centred.withUnsafeBufferPointer { cp in
                    let (dyb, cb) = (dyp.baseAddress!, cp.baseAddress!)
                    let work = dy.count * max(1, groups[0].count)
                    return try GroupWhitening.forEachBlock(groups.count, work: work) { k in
                        let block = GroupWhitening.Block(group: groups[k], samples: 0..<shape.n)
                        let d = block.d
                        let w = cache.whitening[k]
                        let (dyX, rowSums) = GroupWhitening.gradientProducts(
                            dyb, centred: cb, shape, block)
                        // dγ_i = Σ dy_i ŷ_i = Σ_j W[i, j]·(dy X_cᵀ)[i, j]; dβ_i = Σ dy_i.
                        var dGamma = [Double](repeating: 0, count: d)
                        for i in 0..<d { for j in 0..<d { dGamma[i] += w[i, j] * dyX[i, j] } }
                        let gamma = block.group.map { gammas?[$0] ?? 1 }
                        let b: [Scalar] = GroupWhitening.stored(
                            GroupWhitening.transposedTimesGamma(w, gamma))
                        var a: [Scalar]? = nil
                        var c = [Scalar](repeating: 0, count: d)
                        if cache.training {
                            // dW = G X_cᵀ with G = diag(γ)·dy; c = Wᵀ ḡ.
                            var dW = dyX
                            for i in 0..<d { for j in 0..<d { dW[i, j] *= gamma[i] } }
                            let dSigma = WhiteningMethod.backward(dW, cache.factors[k])
                            a = GroupWhitening.stored((2 / m) * dSigma)
                            for i in 0..<d {
                                var ci = 0.0
                                for j in 0..<d { ci += w[j, i] * gamma[j] * rowSums[j] / m }
                                c[i] = Scalar(ci)
                            }
                        }
                        GroupWhitening.applyGradient(
                            a: a, b: b, c: c, centred: cb, dy: dyb, shape, block, into: dxb)
                        return (dGamma, rowSums)
                    }
                }
            }
        }
        return (try Tensor(shape: dy.shape, scalars: dx), sums.flatMap(\.0), sums.flatMap(\.1))
    }

    // MARK: - CustomStringConvertible

    /// One line with the configuration.
    public var description: String {
        "\(displayName)(\(channelCount), group=\(groupSize), \(method), eps=\(epsilon), \(momentum))"
    }
}
