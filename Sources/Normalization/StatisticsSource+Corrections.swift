import NormKernels

// The two sources that transform the batch's statistics before apply: Batch Renormalization's
// correction toward moving statistics and Kalman Normalization's combination with a prediction
// from the previous layer. Both run behind `StatisticsSource` (forward) and
// `SourcedStatistics.backward` (their gradient rules), so their layers hold only parameters,
// running buffers and, for Kalman, the chain.

// MARK: - Batch Renormalization

/// Batch Renormalization's source: the batch's (μ_B, σ_B) corrected toward moving (μ, σ).
///
/// ```
/// σ_B = √(σ²_B + ε),  r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((μ_B − μ)/σ, −d_max, d_max)
/// (x − μ_B)/σ_B·r + d = (x − μ′)·rstd′,   μ′ = μ_B − d·σ_B/r,  rstd′ = r/σ_B
/// ```
/// so apply is the standard one with (μ′, rstd′). Backward holds r and d constant (the paper's
/// definition): with g = γ·dy and m values per set (every rank's when all-reduced),
/// `dx = (r/σ_B)·(g − mean(g) − x̂_B·mean(g·x̂_B))`, `dγ = Σ dy·(r·x̂_B + d)`.
public struct Renormalization: Sendable {
    /// μ, the moving mean per channel (before this batch's update).
    public var runningMean: [Double]
    /// σ, the moving standard deviation per channel (ε inside).
    public var runningStandardDeviation: [Double]
    /// r_max ≥ 1.
    public var rMax: Double
    /// d_max ≥ 0.
    public var dMax: Double
    /// ε inside σ_B.
    public var epsilon: Double

    /// A correction toward the given moving statistics with the given limits.
    public init(
        runningMean: [Double], runningStandardDeviation: [Double], rMax: Double, dMax: Double,
        epsilon: Double
    ) {
        self.runningMean = runningMean
        self.runningStandardDeviation = runningStandardDeviation
        self.rMax = rMax
        self.dMax = dMax
        self.epsilon = epsilon
    }

    /// What backward needs: r, d and the batch's μ_B, σ_B.
    struct Correction: Sendable {
        let r: [Double]
        let d: [Double]
        let batchMean: [Double]
        let batchStandardDeviation: [Double]
        /// Values per set behind μ_B, σ_B.
        let count: Int
        let allReduced: Bool

        /// r and d constant: A = r/σ_B, B = −r·Σg(x − μ_B)/(σ_B³·m), C = −r·Σg/(σ_B·m) around μ_B,
        /// and dγ = r·Σ dy·x̂_B + d·Σ dy.
        func coefficients(_ sums: FastNormKernel.GradientSums)
            -> SourcedStatistics.Coefficients
        {
            let k = r.count
            let m = Double(count)
            var a = [Double](repeating: 0, count: k)
            var b = a
            var c = a
            var dScale = a
            for j in 0..<k {
                let rj = r[j]
                let sigma = batchStandardDeviation[j]
                let sumG = rj * sums.sumG[j]
                let sumGD = rj * sums.sumGD[j]
                a[j] = rj / sigma
                b[j] = -sumGD / (sigma * sigma * sigma * m)
                c[j] = -sumG / (sigma * m)
                dScale[j] = rj * sums.scaleGradient[j] + d[j] * sums.offsetGradient[j]
            }
            return SourcedStatistics.Coefficients(
                center: batchMean, a: a, b: b, c: c, scaleGradient: dScale)
        }
    }

    /// (b) r, d and the corrected (μ′, rstd′) from the batch's moments.
    func resolve(_ batch: BatchMoments, allReduced: Bool) -> SourcedStatistics {
        let m = batch.statistics
        let k = m.mean.count
        var r = [Double](repeating: 1, count: k)
        var d = [Double](repeating: 0, count: k)
        var sigmaB = [Double](repeating: 0, count: k)
        var mean = [Double](repeating: 0, count: k)
        var rstd = [Double](repeating: 0, count: k)
        for j in 0..<k {
            sigmaB[j] = (m.biasedVariance[j] + epsilon).squareRoot()
            let sigma = runningStandardDeviation[j]
            r[j] = min(max(sigmaB[j] / sigma, 1 / rMax), rMax)
            d[j] = min(max((m.mean[j] - runningMean[j]) / sigma, -dMax), dMax)
            // (x − μ_B)/σ_B·r + d = (x − (μ_B − d·σ_B/r))·(r/σ_B).
            mean[j] = m.mean[j] - d[j] * sigmaB[j] / r[j]
            rstd[j] = r[j] / sigmaB[j]
        }
        return SourcedStatistics(
            mean: mean, rstd: rstd, batch: batch,
            rule: .renormalized(
                Correction(
                    r: r, d: d, batchMean: m.mean, batchStandardDeviation: sigmaB,
                    count: batch.count, allReduced: allReduced)))
    }
}

// MARK: - Kalman Normalization

/// dL/d(μ, σ²) of a layer's statistics from outside the layer (the next Kalman layer's
/// prediction reads them).
public struct StatisticsGradient: Sendable {
    /// dL/dμ per set.
    public var mean: [Double]
    /// dL/dσ² per set.
    public var variance: [Double]

    /// A gradient from its parts.
    public init(mean: [Double], variance: [Double]) {
        self.mean = mean
        self.variance = variance
    }
}

/// Kalman Normalization's source: the batch's mean x̄ and biased variance S combined with a
/// prediction (μ⁻, σ²⁻) propagated from the previous layer, under a gain p.
///
/// ```
/// μ = p μ⁻ + (1 − p) x̄,   σ² = p σ²⁻ + (1 − p) S + p(1 − p)(x̄ − μ⁻)²,   rstd = 1/√(σ² + ε)
/// ```
/// Without a prediction (the first layer of a chain) μ = x̄, σ² = S: BatchNorm. Backward
/// differentiates through the combination into x (through x̄ and S), μ⁻, σ²⁻ and p; the layer
/// turns those into gradients of its transition, its gain logits and the previous layer.
public struct KalmanPrediction: Sendable {
    /// μ⁻ per channel.
    public var mean: [Double]
    /// σ²⁻ per channel.
    public var variance: [Double]
    /// p per channel, in [0, 1].
    public var gain: [Double]

    /// A prediction from its parts (arrays of the layer's channel count).
    public init(mean: [Double], variance: [Double], gain: [Double]) {
        self.mean = mean
        self.variance = variance
        self.gain = gain
    }

    /// dL/dμ⁻, dL/dσ²⁻ and dL/dp.
    public struct Gradients: Sendable {
        /// dL/dμ⁻ and dL/dσ²⁻ per channel.
        public var prediction: StatisticsGradient
        /// dL/dp per channel.
        public var gain: [Double]
    }

    /// What backward needs: the prediction, the batch's x̄ and S, and the combined σ².
    struct Combination: Sendable {
        let prediction: KalmanPrediction?
        let batchMean: [Double]
        let batchVariance: [Double]
        /// σ², the combined variance (what the running estimate tracks).
        let variance: [Double]
        let count: Int

        /// The gradient rule through the combination.
        ///
        /// With dμ = −rstd·Σg + dμ_out and dσ² = −½·rstd³·Σg(x − μ) + dσ²_out per channel:
        /// ```
        /// dx̄ = (1 − p)·dμ + 2p(1 − p)(x̄ − μ⁻)·dσ²,   dS = (1 − p)·dσ²
        /// dμ⁻ = p·dμ − 2p(1 − p)(x̄ − μ⁻)·dσ²,       dσ²⁻ = p·dσ²
        /// dp = (μ⁻ − x̄)·dμ + (σ²⁻ − S + (1 − 2p)(x̄ − μ⁻)²)·dσ²
        /// dx = rstd·g + dS·2(x − x̄)/m + dx̄/m
        /// ```
        func coefficients(
            _ sums: FastNormKernel.GradientSums, rstd: [Double],
            statisticsGradient incoming: StatisticsGradient?
        ) -> SourcedStatistics.Coefficients {
            let c = rstd.count
            let m = Double(count)
            var dxbar = [Double](repeating: 0, count: c)
            var dS = [Double](repeating: 0, count: c)
            var dPredMean = [Double](repeating: 0, count: c)
            var dPredVar = [Double](repeating: 0, count: c)
            var dGain = [Double](repeating: 0, count: c)
            for i in 0..<c {
                let r = rstd[i]
                let dmu = -r * sums.sumG[i] + (incoming?.mean[i] ?? 0)
                let dvar = -0.5 * r * r * r * sums.sumGD[i] + (incoming?.variance[i] ?? 0)
                guard let prediction else {
                    dxbar[i] = dmu
                    dS[i] = dvar
                    continue
                }
                let p = prediction.gain[i]
                let delta = batchMean[i] - prediction.mean[i]
                var dp = (prediction.mean[i] - batchMean[i]) * dmu
                dxbar[i] += (1 - p) * dmu
                dPredMean[i] += p * dmu
                dPredVar[i] += p * dvar
                dS[i] += (1 - p) * dvar
                let dDelta = 2 * p * (1 - p) * delta * dvar
                dxbar[i] += dDelta
                dPredMean[i] -= dDelta
                dp +=
                    (prediction.variance[i] - batchVariance[i] + (1 - 2 * p) * delta * delta) * dvar
                dGain[i] = dp
            }
            return SourcedStatistics.Coefficients(
                center: batchMean, a: rstd, b: dS.map { 2 * $0 / m }, c: dxbar.map { $0 / m },
                prediction: prediction == nil
                    ? nil
                    : Gradients(
                        prediction: StatisticsGradient(mean: dPredMean, variance: dPredVar),
                        gain: dGain))
        }
    }

    /// (b) The combined statistics from the batch's moments and an optional prediction.
    /// - Throws: ``NormError/nonFiniteStatistics(layer:)``.
    static func resolve(
        _ prediction: KalmanPrediction?, batch: BatchMoments, epsilon: Double, layer: String
    ) throws(NormError) -> SourcedStatistics {
        let batchMean = batch.statistics.mean
        let batchVariance = batch.statistics.biasedVariance
        var mean = batchMean
        var variance = batchVariance
        if let prediction {
            for i in mean.indices {
                let p = prediction.gain[i]
                let delta = batchMean[i] - prediction.mean[i]
                mean[i] = p * prediction.mean[i] + (1 - p) * batchMean[i]
                variance[i] =
                    p * prediction.variance[i] + (1 - p) * batchVariance[i] + p * (1 - p) * delta
                    * delta
            }
        }
        guard mean.allSatisfy(\.isFinite), variance.allSatisfy(\.isFinite) else {
            throw .nonFiniteStatistics(layer: layer)
        }
        return SourcedStatistics(
            mean: mean,
            rstd: SourcedStatistics.reciprocalStandardDeviation(
                variance: variance, epsilon: epsilon),
            batch: batch,
            rule: .propagated(
                Combination(
                    prediction: prediction, batchMean: batchMean, batchVariance: batchVariance,
                    variance: variance, count: batch.count)))
    }
}

extension SourcedStatistics {
    /// 1/√(max(σ², 0) + ε) for a variance combined from several estimates (which may round
    /// below 0); ε = 0 with σ² = 0 gives 0, so x̂ = 0 there, as the standard layers define it.
    static func reciprocalStandardDeviation(variance: [Double], epsilon: Double) -> [Double] {
        variance.map { reciprocalStandardDeviation(combined: $0, epsilon: epsilon) }
    }

    /// One set's 1/√(max(σ², 0) + ε), 0 where that is 0 (the mixture engine's and Kalman's);
    /// NaN stays NaN.
    @inline(__always)
    static func reciprocalStandardDeviation(combined variance: Double, epsilon: Double) -> Double {
        ReferenceNormKernel.reciprocalStandardDeviation(max(variance, 0), epsilon: epsilon)
    }

    /// The combined σ² of a propagated source (what Kalman's running estimate tracks).
    var propagatedVariance: [Double]? {
        if case .propagated(let combination) = rule { return combination.variance }
        return nil
    }

    /// r and d of a renormalized source.
    var renormalization: Renormalization.Correction? {
        if case .renormalized(let correction) = rule { return correction }
        return nil
    }
}
