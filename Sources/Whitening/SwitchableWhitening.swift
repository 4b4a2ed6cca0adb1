import Foundation
import LinearAlgebra
import NormKernels
import Normalization
import TensorCore

/// Switchable Whitening: batch and instance whitening, mixed with BN, IN and LN statistics by
/// learned softmax weights, then whitened by Newton's iterations (as IterNorm).
///
/// ```
/// per group of d channels and sample n:
/// type 2: μ = w₀μ_BW + w₁μ_IW,               Σ = w′₀Σ_BW + w′₁Σ_IW + εI
/// type 3: … + w₂μ_LN,                         … + w′₂σ²_LN·I
/// type 5: μ = (w₀+w₂)μ_BW + (w₁+w₃)μ_IW + w₄μ_LN,
///         Σ = w′₀Σ_BW + w′₁Σ_IW + w′₀diag(Σ_BW) + w′₁diag(Σ_IW) + w′₄σ²_LN·I + εI
/// ŷ = P_T(Σ)/√tr Σ · (x − μ),   y = γ_c ŷ + β_c
/// ```
/// Σ_BW is the covariance over (N, spatial) (biased), Σ_IW over the spatial positions of one
/// sample, μ_LN and σ²_LN the mean and *unbiased* variance of one sample over all its channels
/// and positions, as in the official `SwitchWhiten2d` (XingangPan/Switchable-Whitening).
///
/// **Where the official code looks unintended, reproduced here.** In type 5 the diagonal (BN
/// and IN) terms reuse the variance weights w′₀ and w′₁ of the whitening terms, so w′₂ and w′₃
/// never act (their gradients are 0), and the BN/IN mean weights w₂, w₃ only add to w₀, w₁.
/// NormKit computes what the published code computes and says so rather than "fix" it.
///
/// Running statistics (keep convention, 0.99): the BW mean and covariance, starting at 0 (the
/// constructor's I is zeroed by `reset_parameters` in the official code). Inference takes BW
/// and BN statistics from them, IW, IN and LN from the sample, and still runs the iterations.
///
/// Channels-first, any rank ≥ 3 (rank 2 has one position per sample: instance statistics are
/// those of one value, and are defined as 0 variance). An empty batch gives an empty output,
/// leaves the running statistics untouched and has zero parameter and logit gradients.
///
/// Data stays in the tensor's scalar type (Float32 storage for `Float`): per group and sample one
/// pass for the instance mean, one to centre, one syrk for the instance covariance, one gemm for
/// the output; batch and layer statistics are merged from the instance ones (``GroupWhitening``),
/// and backward is two gemm per unit plus the d × d algebra in Double.
///
/// ## References
/// 1. Pan, Zhan, Shi, Tang & Luo 2019, "Switchable Whitening for Deep Representation
///    Learning", arXiv:1904.09739.
public final class SwitchableWhitening<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// C.
    public let channelCount: Int
    /// d (channels per group, `num_pergroup`).
    public let groupSize: Int
    /// 2, 3 or 5 components.
    public let type: Int
    /// T.
    public let iterations: Int
    /// ε.
    public let epsilon: Double
    /// Keep-convention rule (0.99) and its batch count (counted for the cumulative rule only).
    public var average: RunningAverage
    /// Keep-convention rule (0.99).
    public var momentum: Momentum {
        get { average.momentum }
        set { average.momentum = newValue }
    }
    /// γ (`weight`).
    public var scale: Tensor<Scalar>
    /// β (`bias`).
    public var offset: Tensor<Scalar>
    /// The mean and variance mixtures (`sw_mean_weight`, `sw_var_weight`), softmax-weighted.
    public var mixture: (mean: MixtureLogits<Scalar>, variance: MixtureLogits<Scalar>)
    /// `sw_mean_weight`.
    public var meanLogits: Tensor<Scalar> {
        get { mixture.mean.logits }
        set { mixture.mean.logits = newValue }
    }
    /// `sw_var_weight`.
    public var varianceLogits: Tensor<Scalar> {
        get { mixture.variance.logits }
        set { mixture.variance.logits = newValue }
    }
    /// `running_mean` `[C]`.
    public var runningMean: [Double]
    /// `running_cov` per group (d × d), initially 0.
    public var runningCovariance: [Matrix]
    let groups: [Range<Int>]

    /// Creates a Switchable Whitening layer.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` for a type other
    ///   than 2, 3, 5, a group size that does not divide C, ε not finite and > 0, or T outside
    ///   1…1000.
    public init(
        channelCount: Int, groupSize: Int = 16, type: Int = 5, iterations: Int = 5,
        epsilon: Double = 1e-5,
        momentum: Momentum = .keep(0.99)
    ) throws(NormError) {
        guard [2, 3, 5].contains(type) else {
            throw .invalidHyperparameter(
                name: "sw_type", value: "\(type)", requirement: "must be 2, 3 or 5")
        }
        self.type = type
        let d = min(groupSize, channelCount)
        guard d >= 1, channelCount % d == 0 else {
            // (groupsDoNotDivideChannels speaks of a group *count*; this is a group size.)
            throw .invalidHyperparameter(
                name: "group size", value: "\(groupSize)",
                requirement: "must be ≥ 1 and divide the channel count \(channelCount)")
        }
        groups = try GroupWhitening.checkedGroups(
            channelCount: channelCount, groupSize: d, epsilon: epsilon, iterations: iterations,
            momentum: momentum)
        self.channelCount = channelCount
        self.groupSize = d
        self.iterations = iterations
        self.epsilon = epsilon
        average = RunningAverage(momentum: momentum)
        do {
            scale = try Tensor(repeating: 1, shape: [channelCount])
            offset = try Tensor(zeros: [channelCount])
        } catch { throw .tensor(error) }
        mixture = (try MixtureLogits(componentCount: type), try MixtureLogits(componentCount: type))
        runningMean = [Double](repeating: 0, count: channelCount)
        runningCovariance = groups.map { Matrix(rows: $0.count, cols: $0.count) }
    }

    /// The importance weights (BW, IW[, LN] or BW, IW, BN, IN, LN).
    public var importanceWeights: (components: [String], mean: [Double], variance: [Double]) {
        let names =
            type == 2
            ? ["BW", "IW"] : type == 3 ? ["BW", "IW", "LN"] : ["BW", "IW", "BN", "IN", "LN"]
        return (
            names, mixture.mean.evaluate(.softmax).weights,
            mixture.variance.evaluate(.softmax).weights
        )
    }

    /// What forward keeps per group and sample (a unit; index `k·N + b`).
    struct Unit: Sendable {
        /// The sample's channel means over its positions (IW/IN), d.
        var meanIn: [Double]
        /// The sample's covariance over its positions (biased), d × d.
        var covIn: Matrix
        /// The mixed mean μ subtracted.
        var mu: [Double] = []
        /// W = P_T(Σ)/√tr Σ.
        var whitening = Matrix(rows: 0, cols: 0)
        /// Σ and the Newton iterates.
        var factors: WhiteningMethod.Factors? = nil
    }

    /// What forward keeps for backward.
    public struct Cache: Sendable {
        let shape: [Int]
        /// X − μ_IN per sample and channel, at the input's offsets (empty for an empty batch).
        let centred: [Scalar]
        let units: [Unit]
        let meanBW: [[Double]]
        let covBW: [Matrix]
        let muLN: [Double]
        let varLN: [Double]
        let w: MixtureEvaluation
        let wv: MixtureEvaluation
        let batchIsConstant: Bool
    }

    /// Gradients.
    public struct Gradients: Sendable {
        /// dL/dx.
        public var input: Tensor<Scalar>
        /// dL/dγ.
        public var scale: Tensor<Scalar>
        /// dL/dβ.
        public var offset: Tensor<Scalar>
        /// dL/d(mean logits).
        public var meanLogits: Tensor<Scalar>
        /// dL/d(variance logits).
        public var varianceLogits: Tensor<Scalar>
    }

    /// The effective weights of the five statistics (mean: BW, IW, LN; variance: BW, IW,
    /// diag BW, diag IW, LN), from the type and the softmax weights.
    func effective(_ w: [Double], _ wv: [Double]) -> (m: [Double], v: [Double]) {
        switch type {
        case 2: return ([w[0], w[1], 0], [wv[0], wv[1], 0, 0, 0])
        case 3: return ([w[0], w[1], w[2]], [wv[0], wv[1], 0, 0, wv[2]])
        default: return ([w[0] + w[2], w[1] + w[3], w[4]], [wv[0], wv[1], wv[0], wv[1], wv[4]])
        }
    }

    /// The block of unit u = k·N + b: group k, sample b.
    func unitBlock(_ u: Int, n: Int) -> GroupWhitening.Block {
        GroupWhitening.Block(group: groups[u / n], samples: (u % n)..<(u % n + 1))
    }

    // MARK: - Forward

    /// Whitens `x`.
    ///
    /// Per unit (group, sample) the instance statistics come from one pass and one syrk over
    /// the sample's d × L block; the batch (BW) and layer (LN) statistics are merged from them
    /// (Chan's formula: Σ_BW = mean_b[Σ_IN,b + (μ_IN,b − μ_BW)(μ_IN,b − μ_BW)ᵀ], and LN from the
    /// channel means and variances), so x is read twice and written once.
    /// - Throws: ``NormError`` for a wrong shape or non-finite statistics.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        try GroupWhitening.validate(x, channels: channelCount, layer: displayName)
        for t in [meanLogits, varianceLogits] where t.count != type {
            throw NormError.parameterShapeMismatch(
                name: "sw_mean_weight", expected: [type], actual: t.shape)
        }
        let w = mixture.mean.evaluate(.softmax)
        let wv = mixture.variance.evaluate(.softmax)
        let batchIsConstant = mode.usesRunningStatistics
        guard x.count > 0 else {
            if mode == .training { average.countEmptyBatch(countingEveryBatch: false) }
            let cache = Cache(
                shape: x.shape, centred: [], units: [], meanBW: [], covBW: [], muLN: [],
                varLN: [], w: w, wv: wv, batchIsConstant: batchIsConstant)
            return (x, cache)
        }
        let shape = GroupWhitening.Shape(x.shape)
        if mode == .training && shape.m < 2 {
            throw NormError.singleValuePerStatistic(layer: displayName, shape: x.shape)
        }
        let (centred, instance) = try GroupWhitening.filled(x.count) {
            try instanceStatistics(x, shape: shape, into: $0)
        }
        // LN: per sample over all channels and positions (unbiased variance).
        let (n, l) = (shape.n, Double(shape.l))
        let cl = Double(shape.c) * l
        var muLN = [Double](repeating: 0, count: n)
        var varLN = [Double](repeating: 0, count: n)
        for b in 0..<n {
            let parts = stride(from: b, to: instance.count, by: n).map { instance[$0] }
            muLN[b] = parts.reduce(0) { $0 + $1.meanIn.reduce(0, +) } / Double(shape.c)
            var m2 = 0.0
            for unit in parts {
                for (i, mean) in unit.meanIn.enumerated() {
                    m2 += l * (unit.covIn[i, i] + (mean - muLN[b]) * (mean - muLN[b]))
                }
            }
            varLN[b] = cl > 1 ? m2 / (cl - 1) : 0
        }
        // BW: over the batch, merged from the units, or the running estimates.
        var meanBW: [[Double]] = []
        var covBW: [Matrix] = []
        for (k, group) in groups.enumerated() {
            if batchIsConstant {
                meanBW.append(Array(runningMean[group]))
                covBW.append(runningCovariance[k])
                continue
            }
            let parts = instance[(k * n)..<((k + 1) * n)]
            var mean = [Double](repeating: 0, count: group.count)
            for unit in parts { for i in mean.indices { mean[i] += unit.meanIn[i] / Double(n) } }
            var cov = Matrix(rows: group.count, cols: group.count)
            for unit in parts {
                for i in mean.indices {
                    for j in mean.indices {
                        cov[i, j] +=
                            (unit.covIn[i, j] + (unit.meanIn[i] - mean[i])
                                * (unit.meanIn[j] - mean[j]))
                            / Double(n)
                    }
                }
            }
            meanBW.append(mean)
            covBW.append(cov)
        }
        let (y, units) = try whiten(
            x, shape: shape, centred: centred, units: instance, meanBW: meanBW, covBW: covBW,
            muLN: muLN, varLN: varLN, weights: effective(w.weights, wv.weights))
        if mode == .training {
            let f = average.advance(countingEveryBatch: false)
            runningMean = RunningAverage.blend(
                runningMean, toward: meanBW.flatMap { $0 }, weightOfNew: f)
            runningCovariance = GroupWhitening.blend(
                runningCovariance, toward: covBW, weightOfNew: f)
        }
        return (
            y,
            Cache(
                shape: x.shape, centred: centred, units: units, meanBW: meanBW, covBW: covBW,
                muLN: muLN, varLN: varLN, w: w, wv: wv, batchIsConstant: batchIsConstant)
        )
    }

    /// μ_IN and Σ_IN per unit, and X − μ_IN into `centred`.
    @_specialize(where Scalar == Float)
    @_specialize(where Scalar == Double)
    func instanceStatistics(
        _ x: Tensor<Scalar>, shape: GroupWhitening.Shape, into cb: UnsafeMutablePointer<Scalar>
    ) throws -> [Unit] {
        let count = groups.count * shape.n
        return try x.withUnsafeBufferPointer { xp in
            let xb = xp.baseAddress!
            return try GroupWhitening.forEachBlock(count, work: x.count * groupSize) { u in
                let block = unitBlock(u, n: shape.n)
                let mean = GroupWhitening.means(xb, shape, block)
                GroupWhitening.centre(xb, shape, block, mean: mean, into: cb)
                let cov = GroupWhitening.covariance(cb, shape, block, divisor: Double(shape.l))
                return Unit(meanIn: mean, covIn: cov)
            }
        }
    }

    /// The mixture, W by Newton's iterations, and y = diag(γ) W (X − μ) + β per unit.
    @_specialize(where Scalar == Float)
    @_specialize(where Scalar == Double)
    func whiten(
        _ x: Tensor<Scalar>, shape: GroupWhitening.Shape, centred: [Scalar], units previous: [Unit],
        meanBW: [[Double]], covBW: [Matrix], muLN: [Double], varLN: [Double],
        weights: (m: [Double], v: [Double])
    ) throws -> (Tensor<Scalar>, [Unit]) {
        let (em, ev) = weights
        let method = WhiteningMethod.newton(iterations: iterations)
        let gammas = scale.scalars.map { Double($0) }
        let betas = offset.scalars.map { Double($0) }
        let (y, units) = try centred.withUnsafeBufferPointer { cp in
            try GroupWhitening.filled(x.count) { yb in
                let cb = cp.baseAddress!
                let work = x.count * groupSize
                return try GroupWhitening.forEachBlock(previous.count, work: work) { u in
                    var unit = previous[u]
                    let (k, b) = (u / shape.n, u % shape.n)
                    let block = unitBlock(u, n: shape.n)
                    let d = block.d
                    let (cBW, cIn) = (covBW[k], unit.covIn)
                    var sigma = Matrix(rows: d, cols: d)
                    unit.mu = (0..<d).map {
                        em[0] * meanBW[k][$0] + em[1] * unit.meanIn[$0] + em[2] * muLN[b]
                    }
                    for i in 0..<d {
                        for j in 0..<d { sigma[i, j] = ev[0] * cBW[i, j] + ev[1] * cIn[i, j] }
                        sigma[i, i] +=
                            ev[2] * cBW[i, i] + ev[3] * cIn[i, i] + ev[4] * varLN[b] + epsilon
                    }
                    (unit.whitening, unit.factors) = try method.whitening(
                        sigma, epsilon: epsilon, layer: "SwitchableWhitening")
                    // y = diag(γ) W X_cIN + (diag(γ) W (μ_IN − μ) + β) 1ᵀ.
                    let gamma = block.group.map { gammas[$0] }
                    let a: [Scalar] = GroupWhitening.stored(unit.whitening, rowScale: gamma)
                    var rowOffsets = [Scalar](repeating: 0, count: d)
                    for i in 0..<d {
                        var v = 0.0
                        for j in 0..<d { v += unit.whitening[i, j] * (unit.meanIn[j] - unit.mu[j]) }
                        rowOffsets[i] = Scalar(gamma[i] * v + betas[block.group.lowerBound + i])
                    }
                    GroupWhitening.apply(
                        a, rowOffsets: rowOffsets, centred: cb, shape, block, into: yb)
                    return unit
                }
            }
        }
        return (try Tensor(shape: x.shape, scalars: y), units)
    }

    // MARK: - Backward

    /// Back-propagates through the whitening, the mixture and the statistics.
    ///
    /// Per unit, with G = diag(γ) dy and r = G1: dW = G (X − μ)ᵀ, dΣ from Newton's backward,
    /// dμ = −Wᵀ r. dμ and dΣ split over the statistics by the mixture weights; every statistic
    /// is a mean or a covariance of X, so per unit dx = A X_cIN + B dy − c 1ᵀ with
    /// `A = (2/L) dΣ_IN + (2/m) dΣ_BW + 2 dσ²_LN/(CL − 1)·I`, `B = Wᵀ diag(γ)` and c collecting
    /// the mean terms (the BW terms only when the batch statistics were used).
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws -> Gradients {
        guard dy.shape == cache.shape else {
            throw NormError.gradientShapeMismatch(expected: cache.shape, actual: dy.shape)
        }
        let c = channelCount
        guard dy.count > 0 else {
            let zeros = try Tensor<Scalar>(zeros: [c])
            let logits = try Tensor<Scalar>(zeros: [type])
            return Gradients(
                input: dy, scale: zeros, offset: zeros, meanLogits: logits,
                varianceLogits: logits)
        }
        let shape = GroupWhitening.Shape(dy.shape)
        let (n, l) = (shape.n, Double(shape.l))
        let (m, cl) = (Double(shape.m), Double(c) * l)
        let (em, ev) = effective(cache.w.weights, cache.wv.weights)
        let terms = try unitGradients(dy, cache: cache, shape: shape)
        var dScale = [Double](repeating: 0, count: c)
        var dOffset = [Double](repeating: 0, count: c)
        var aMean = [Double](repeating: 0, count: 3)  // Σ dμ·(BW, IW, LN)
        var aVar = [Double](repeating: 0, count: 5)  // Σ ⟨dΣ, (BW, IW, diagBW, diagIW, LN·I)⟩
        var dmuLN = [Double](repeating: 0, count: n)
        var dvarLN = [Double](repeating: 0, count: n)
        var dMeanBW = groups.map { [Double](repeating: 0, count: $0.count) }
        var dCovBW = groups.map { Matrix(rows: $0.count, cols: $0.count) }
        for (u, term) in terms.enumerated() {
            let (k, b) = (u / n, u % n)
            let unit = cache.units[u]
            let (dSigma, dmu) = (term.dSigma, term.dmu)
            for (i, ch) in groups[k].enumerated() {
                dScale[ch] += term.dGamma[i]
                dOffset[ch] += term.rowSums[i]
                dMeanBW[k][i] += em[0] * dmu[i]
                dmuLN[b] += em[2] * dmu[i]
                dvarLN[b] += ev[4] * dSigma[i, i]
                aMean[0] += dmu[i] * cache.meanBW[k][i]
                aMean[1] += dmu[i] * unit.meanIn[i]
                aMean[2] += dmu[i] * cache.muLN[b]
                aVar[2] += dSigma[i, i] * cache.covBW[k][i, i]
                aVar[3] += dSigma[i, i] * unit.covIn[i, i]
                aVar[4] += dSigma[i, i] * cache.varLN[b]
            }
            dCovBW[k] = dCovBW[k] + ev[0] * dSigma
            for i in 0..<groups[k].count {
                dCovBW[k][i, i] += ev[2] * dSigma[i, i]
            }
            aVar[0] += Matrix.frobenius(dSigma, cache.covBW[k])
            aVar[1] += Matrix.frobenius(dSigma, unit.covIn)
        }
        let batch = !cache.batchIsConstant
        let ln = cl > 1 ? 2 / (cl - 1) : 0
        let gammas = scale.scalars.map { Double($0) }
        let (dx, _) = try GroupWhitening.filled(dy.count) { dxb in
            try dy.withUnsafeBufferPointer { dyp in
                try cache.centred.withUnsafeBufferPointer { cp in
                    let (dyb, cb) = (dyp.baseAddress!, cp.baseAddress!)
                    _ = try GroupWhitening.forEachBlock(terms.count, work: dy.count * groupSize) {
                        u in
                        let (k, b) = (u / n, u % n)
                        let (unit, term, block) = (cache.units[u], terms[u], unitBlock(u, n: n))
                        let d = block.d
                        var a = (2 / l) * ev[1] * term.dSigma
                        if batch { a = a + (2 / m) * dCovBW[k] }
                        var cVector = [Scalar](repeating: 0, count: d)
                        for i in 0..<d {
                            a[i, i] += (2 / l) * ev[3] * term.dSigma[i, i] + ln * dvarLN[b]
                            var v = em[1] * term.dmu[i] / l + dmuLN[b] / cl
                            v += ln * dvarLN[b] * (unit.meanIn[i] - cache.muLN[b])
                            if batch {
                                v += dMeanBW[k][i] / m
                                for j in 0..<d {
                                    v +=
                                        (2 / m) * dCovBW[k][i, j]
                                        * (unit.meanIn[j] - cache.meanBW[k][j])
                                }
                            }
                            cVector[i] = Scalar(-v)
                        }
                        let gamma = block.group.map { gammas[$0] }
                        GroupWhitening.applyGradient(
                            a: GroupWhitening.stored(a),
                            b: GroupWhitening.stored(
                                GroupWhitening.transposedTimesGamma(unit.whitening, gamma)),
                            c: cVector, centred: cb, dy: dyb, shape, block, into: dxb)
                    }
                }
            }
        }
        // Logits through the type's mixture, then softmax.
        let dw: [Double]
        let dwv: [Double]
        switch type {
        case 2:
            dw = [aMean[0], aMean[1]]
            dwv = [aVar[0], aVar[1]]
        case 3:
            dw = [aMean[0], aMean[1], aMean[2]]
            dwv = [aVar[0], aVar[1], aVar[4]]
        default:
            dw = [aMean[0], aMean[1], aMean[0], aMean[1], aMean[2]]
            dwv = [aVar[0] + aVar[2], aVar[1] + aVar[3], 0, 0, aVar[4]]
        }
        return Gradients(
            input: try Tensor(shape: dy.shape, scalars: dx),
            scale: try Tensor(shape: [c], rounding: dScale),
            offset: try Tensor(shape: [c], rounding: dOffset),
            meanLogits: try Tensor(
                shape: [type], rounding: cache.w.logitGradient(dw)),
            varianceLogits: try Tensor(
                shape: [type], rounding: cache.wv.logitGradient(dwv)))
    }

    /// Per unit: dΣ, dμ, dγ and the row sums of dy (dβ).
    struct UnitGradient: Sendable {
        var dSigma: Matrix
        var dmu: [Double]
        var dGamma: [Double]
        var rowSums: [Double]
    }

    /// dW = diag(γ)·dy X_cINᵀ + r (μ_IN − μ)ᵀ through Newton's backward, per unit.
    @_specialize(where Scalar == Float)
    @_specialize(where Scalar == Double)
    func unitGradients(_ dy: Tensor<Scalar>, cache: Cache, shape: GroupWhitening.Shape) throws
        -> [UnitGradient]
    {
        let gammas = scale.scalars.map { Double($0) }
        return try dy.withUnsafeBufferPointer { dyp in
            try cache.centred.withUnsafeBufferPointer { cp in
                let (dyb, cb) = (dyp.baseAddress!, cp.baseAddress!)
                let count = cache.units.count
                return try GroupWhitening.forEachBlock(count, work: dy.count * groupSize) { u in
                    let unit = cache.units[u]
                    let block = unitBlock(u, n: shape.n)
                    let d = block.d
                    let (dyX, rowSums) = GroupWhitening.gradientProducts(
                        dyb, centred: cb, shape, block)
                    let shift = (0..<d).map { unit.meanIn[$0] - unit.mu[$0] }
                    // dy (X − μ)ᵀ, dγ_i = Σ_j W[i, j]·(dy (X − μ)ᵀ)[i, j].
                    var product = dyX
                    var dGamma = [Double](repeating: 0, count: d)
                    for i in 0..<d {
                        for j in 0..<d {
                            product[i, j] += rowSums[i] * shift[j]
                            dGamma[i] += unit.whitening[i, j] * product[i, j]
                        }
                    }
                    let gamma = block.group.map { gammas[$0] }
                    var dW = product
                    for i in 0..<d { for j in 0..<d { dW[i, j] *= gamma[i] } }
                    let dSigma = WhiteningMethod.backward(dW, unit.factors!)
                    var dmu = [Double](repeating: 0, count: d)
                    for i in 0..<d {
                        for j in 0..<d { dmu[i] -= unit.whitening[j, i] * gamma[j] * rowSums[j] }
                    }
                    return UnitGradient(
                        dSigma: dSigma, dmu: dmu, dGamma: dGamma, rowSums: rowSums)
                }
            }
        }
    }

    /// One line with the configuration.
    public var description: String {
        "SwitchableWhitening(\(channelCount), group=\(groupSize), type=\(type), T=\(iterations), eps=\(epsilon))"
    }
}
