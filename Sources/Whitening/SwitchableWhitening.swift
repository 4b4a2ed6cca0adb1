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
/// those of one value, and are defined as 0 variance).
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
    /// Keep-convention rule (0.99).
    public var momentum: Momentum
    /// γ (`weight`).
    public var scale: Tensor<Scalar>
    /// β (`bias`).
    public var offset: Tensor<Scalar>
    /// `sw_mean_weight`.
    public var meanLogits: Tensor<Scalar>
    /// `sw_var_weight`.
    public var varianceLogits: Tensor<Scalar>
    /// `running_mean` `[C]`.
    public var runningMean: [Double]
    /// `running_cov` per group (d × d), initially 0.
    public var runningCovariance: [Matrix]
    let groups: [Range<Int>]

    /// Creates a Switchable Whitening layer.
    /// - Throws: ``NormError`` for a type other than 2, 3, 5 or a group size that does not divide C.
    public init(
        channelCount: Int, groupSize: Int = 16, type: Int = 5, iterations: Int = 5,
        epsilon: Double = 1e-5,
        momentum: Momentum = .keep(0.99)
    ) throws(NormError) {
        guard [2, 3, 5].contains(type) else {
            throw .invalidHyperparameter(
                name: "sw_type", value: "\(type)", requirement: "must be 2, 3 or 5")
        }
        let d = min(groupSize, channelCount)
        guard d >= 1, channelCount % d == 0 else {
            throw .groupsDoNotDivideChannels(groups: d, channels: channelCount)
        }
        guard epsilon > 0, epsilon.isFinite else {
            throw .invalidHyperparameter(
                name: "epsilon", value: "\(epsilon)", requirement: "must be finite and > 0")
        }
        try HyperparameterCheck.count(
            iterations, limit: IterNorm<Scalar>.maximumIterations, name: "iterations")
        try momentum.validate()
        self.channelCount = channelCount
        self.groupSize = d
        self.type = type
        self.iterations = iterations
        self.epsilon = epsilon
        self.momentum = momentum
        groups = GroupWhitening.groups(channels: channelCount, size: d)
        do {
            scale = try Tensor(repeating: 1, shape: [channelCount])
            offset = try Tensor(zeros: [channelCount])
            meanLogits = try Tensor(repeating: 1, shape: [type])
            varianceLogits = try Tensor(repeating: 1, shape: [type])
        } catch { throw .tensor(error) }
        runningMean = [Double](repeating: 0, count: channelCount)
        runningCovariance = groups.map { Matrix(rows: $0.count, cols: $0.count) }
    }

    static func softmax(_ t: Tensor<Scalar>) -> [Double] {
        MixtureWeights.softmax(t.scalars.map(Double.init))
    }

    /// The importance weights (BW, IW[, LN] or BW, IW, BN, IN, LN).
    public var importanceWeights: (components: [String], mean: [Double], variance: [Double]) {
        let names =
            type == 2
            ? ["BW", "IW"] : type == 3 ? ["BW", "IW", "LN"] : ["BW", "IW", "BN", "IN", "LN"]
        return (names, Self.softmax(meanLogits), Self.softmax(varianceLogits))
    }

    /// Per-sample, per-group quantities forward keeps.
    struct Unit: Sendable {
        var x: Matrix  // d × L
        var mu: [Double]
        var sigma: Matrix
        var iterates: [Matrix]
        var whitening: Matrix
        var meanIn: [Double]
        var covIn: Matrix
    }

    /// What forward keeps for backward.
    public struct Cache: Sendable {
        let input: Tensor<Scalar>
        let whitened: [Double]
        let units: [[Unit]]  // [n][group]
        let meanBW: [[Double]]
        let covBW: [Matrix]
        let centredBW: [Matrix]
        let muLN: [Double]
        let varLN: [Double]
        let w: [Double]
        let wv: [Double]
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

    /// Whitens `x`.
    /// - Throws: ``NormError`` for a wrong shape or non-finite statistics.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        try GroupWhitening.validate(x, channels: channelCount, layer: "SwitchableWhitening")
        for t in [meanLogits, varianceLogits] where t.count != type {
            throw NormError.parameterShapeMismatch(
                name: "sw_mean_weight", expected: [type], actual: t.shape)
        }
        let n = x.shape[0]
        let c = channelCount
        let l = x.count / (n * c)
        let batchIsConstant = mode.usesRunningStatistics
        if mode == .training && n * l < 2 {
            throw NormError.singleValuePerStatistic(layer: "SwitchableWhitening", shape: x.shape)
        }
        let w = Self.softmax(meanLogits)
        let wv = Self.softmax(varianceLogits)
        let (em, ev) = effective(w, wv)
        // LN statistics per sample over all channels and positions (unbiased variance).
        var muLN = [Double](repeating: 0, count: n)
        var varLN = [Double](repeating: 0, count: n)
        let xAll = GroupWhitening.doubles(x)
        do {
            for b in 0..<n {
                let values = xAll[(b * c * l)..<((b + 1) * c * l)]
                let mean = values.reduce(0, +) / Double(values.count)
                muLN[b] = mean
                varLN[b] =
                    values.count > 1
                    ? values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +)
                        / Double(values.count - 1) : 0
            }
        }
        var meanBW: [[Double]] = []
        var covBW: [Matrix] = []
        var centredBW: [Matrix] = []
        var units = [[Unit]](repeating: [], count: n)
        let xd = GroupWhitening.doubles(x)
        var yd = [Double](repeating: 0, count: x.count)
        var newMean = runningMean
        var newCov = runningCovariance
        let f = momentum.weightOfNew(batchesTracked: 1)
        for (k, group) in groups.enumerated() {
            let xg = GroupWhitening.gather(xd, shape: x.shape, group)  // d × (N·L)
            let d = group.count
            var mBW: [Double]
            var cBW: Matrix
            if batchIsConstant {
                mBW = Array(runningMean[group])
                cBW = runningCovariance[k]
                centredBW.append(Matrix(rows: 0, cols: 0))
            } else {
                let (mean, xc) = GroupWhitening.centre(xg)
                mBW = mean
                cBW = (1 / Double(xc.cols)) * Matrix.product(xc, xc, transposeB: true)
                centredBW.append(xc)
                for (i, ch) in group.enumerated() {
                    newMean[ch] = (1 - f) * runningMean[ch] + f * mean[i]
                }
                newCov[k] = (1 - f) * runningCovariance[k] + f * cBW
            }
            meanBW.append(mBW)
            covBW.append(cBW)
            var out = Matrix(rows: d, cols: n * l)
            for b in 0..<n {
                var xn = Matrix(rows: d, cols: l)
                for i in 0..<d { for s in 0..<l { xn[i, s] = xg[i, b * l + s] } }
                let (meanIn, xcIn) = GroupWhitening.centre(xn)
                let covIn = (1 / Double(l)) * Matrix.product(xcIn, xcIn, transposeB: true)
                var mu = [Double](repeating: 0, count: d)
                var sigma = Matrix(rows: d, cols: d)
                for i in 0..<d {
                    mu[i] = em[0] * mBW[i] + em[1] * meanIn[i] + em[2] * muLN[b]
                    for j in 0..<d {
                        sigma[i, j] = ev[0] * cBW[i, j] + ev[1] * covIn[i, j]
                    }
                    sigma[i, i] +=
                        ev[2] * cBW[i, i] + ev[3] * covIn[i, i] + ev[4] * varLN[b] + epsilon
                }
                let (wm, iterates) = NewtonWhitening.forward(sigma, iterations: iterations)
                let yn = wm * GroupWhitening.subtracting(rowMeans: mu, from: xn)
                for i in 0..<d { for s in 0..<l { out[i, b * l + s] = yn[i, s] } }
                units[b].append(
                    Unit(
                        x: xn, mu: mu, sigma: sigma, iterates: iterates, whitening: wm,
                        meanIn: meanIn, covIn: covIn))
            }
            GroupWhitening.scatter(out, group, shape: x.shape, into: &yd)
        }
        guard yd.allSatisfy(\.isFinite) else {
            throw NormError.nonFiniteStatistics(layer: "SwitchableWhitening")
        }
        if mode == .training {
            runningMean = newMean
            runningCovariance = newCov
        }
        let whitened = yd
        GroupWhitening.affine(&yd, shape: x.shape, scale: scale, offset: offset)
        let y = try Tensor<Scalar>(shape: x.shape, rounding: yd)
        return (
            y,
            Cache(
                input: x, whitened: whitened, units: units, meanBW: meanBW, covBW: covBW,
                centredBW: centredBW,
                muLN: muLN, varLN: varLN, w: w, wv: wv, batchIsConstant: batchIsConstant)
        )
    }

    /// Back-propagates through the whitening, the mixture and the statistics.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws -> Gradients {
        let x = cache.input
        guard dy.shape == x.shape else {
            throw NormError.gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let n = x.shape[0]
        let c = channelCount
        let l = x.count / (n * c)
        let (em, ev) = effective(cache.w, cache.wv)
        // dŷ and the affine gradients.
        let (g, dScale, dOffset) = try GroupWhitening.affineBackward(
            dy, whitened: cache.whitened, scale: scale)
        let xd = GroupWhitening.doubles(x)
        var dx = [Double](repeating: 0, count: x.count)
        var aMean = [Double](repeating: 0, count: 3)  // Σ dμ·(BW, IW, LN) contributions
        var aVar = [Double](repeating: 0, count: 5)  // Σ ⟨dΣ, (BW, IW, diagBW, diagIW, LN·I)⟩
        var dmuLN = [Double](repeating: 0, count: n)
        var dvarLN = [Double](repeating: 0, count: n)
        for (k, group) in groups.enumerated() {
            let d = group.count
            let gk = GroupWhitening.gather(g, shape: dy.shape, group)
            var dMeanBW = [Double](repeating: 0, count: d)
            var dCovBW = Matrix(rows: d, cols: d)
            for b in 0..<n {
                let unit = cache.units[b][k]
                var gn = Matrix(rows: d, cols: l)
                for i in 0..<d { for s in 0..<l { gn[i, s] = gk[i, b * l + s] } }
                let xmu = GroupWhitening.subtracting(rowMeans: unit.mu, from: unit.x)
                let dW = Matrix.product(gn, xmu, transposeB: true)
                let dSigma = NewtonWhitening.backward(
                    dW, sigma: unit.sigma, iterates: unit.iterates)
                let wtg = Matrix.product(unit.whitening, gn, transposeA: true)  // direct dX
                var dmu = [Double](repeating: 0, count: d)
                for i in 0..<d { for s in 0..<l { dmu[i] -= wtg[i, s] } }
                // Split over the statistics.
                var dCovIn = ev[1] * dSigma
                for i in 0..<d { dCovIn[i, i] += ev[3] * dSigma[i, i] }
                let dMeanIn = dmu.map { em[1] * $0 }
                for i in 0..<d {
                    dMeanBW[i] += em[0] * dmu[i]
                    dmuLN[b] += em[2] * dmu[i]
                    dvarLN[b] += ev[4] * dSigma[i, i]
                }
                dCovBW = dCovBW + ev[0] * dSigma
                for i in 0..<d { dCovBW[i, i] += ev[2] * dSigma[i, i] }
                // Logit sums.
                for i in 0..<d {
                    aMean[0] += dmu[i] * cache.meanBW[k][i]
                    aMean[1] += dmu[i] * unit.meanIn[i]
                    aMean[2] += dmu[i] * cache.muLN[b]
                    aVar[2] += dSigma[i, i] * cache.covBW[k][i, i]
                    aVar[3] += dSigma[i, i] * unit.covIn[i, i]
                    aVar[4] += dSigma[i, i] * cache.varLN[b]
                }
                aVar[0] += Matrix.frobenius(dSigma, cache.covBW[k])
                aVar[1] += Matrix.frobenius(dSigma, unit.covIn)
                // dX_n: direct path, instance mean and covariance.
                var xcIn = unit.x
                for i in 0..<d { for s in 0..<l { xcIn[i, s] -= unit.meanIn[i] } }
                let fromCov = (2 / Double(l)) * (dCovIn * xcIn)
                for (i, ch) in group.enumerated() {
                    for s in 0..<l {
                        dx[(b * c + ch) * l + s] +=
                            wtg[i, s] + dMeanIn[i] / Double(l) + fromCov[i, s]
                    }
                }
            }
            if !cache.batchIsConstant {
                let m = Double(n * l)
                let xc = cache.centredBW[k]
                let fromCov = (2 / m) * (dCovBW * xc)
                for (i, ch) in group.enumerated() {
                    for b in 0..<n {
                        for s in 0..<l {
                            dx[(b * c + ch) * l + s] += dMeanBW[i] / m + fromCov[i, b * l + s]
                        }
                    }
                }
            }
        }
        // LN statistics of each sample over all C·L values (unbiased variance).
        let cl = Double(c * l)
        for b in 0..<n {
            for j in 0..<(c * l) {
                let i = b * c * l + j
                var v = dmuLN[b] / cl
                if c * l > 1 { v += dvarLN[b] * 2 * (xd[i] - cache.muLN[b]) / (cl - 1) }
                dx[i] += v
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
            input: try Tensor(shape: x.shape, rounding: dx), scale: dScale!, offset: dOffset!,
            meanLogits: try Tensor(
                shape: [type], rounding: MixtureWeights.softmaxBackward(cache.w, dw)),
            varianceLogits: try Tensor(
                shape: [type], rounding: MixtureWeights.softmaxBackward(cache.wv, dwv)))
    }

    /// One line with the configuration.
    public var description: String {
        "SwitchableWhitening(\(channelCount), group=\(groupSize), type=\(type), T=\(iterations), eps=\(epsilon))"
    }
}
