import Foundation
import NormKernels
import TensorCore

/// Switchable Normalization: normalizes with a learned mixture of instance, layer and batch
/// statistics; with `weighting: .sparsestMax` it is Sparse Switchable Normalization.
///
/// ```
/// μ = w₀·μ_IN + w₁·μ_LN + w₂·μ_BN,   σ² = w′₀·σ²_IN + w′₁·σ²_LN + w′₂·σ²_BN
/// y = γ_c · (x − μ) / √(σ² + ε) + β_c,   w = softmax(mean logits), w′ = softmax(variance logits)
/// ```
/// Every statistic comes from the per-(sample, channel) ones, as in the official code
/// (switchablenorms/Switchable-Normalization, `SwitchNorm2d`): σ²_IN is the *unbiased* variance
/// over the spatial positions; with t = σ²_IN + μ²_IN, μ_LN = mean_c μ_IN and
/// σ²_LN = mean_c t − μ²_LN (per sample), μ_BN = mean_n μ_IN and σ²_BN = mean_n t − μ²_BN (per
/// channel), so σ²_LN and σ²_BN mix L- and (L − 1)-normalised terms exactly as the official code
/// does. NormKit evaluates mean_c t − μ² as mean_c σ²_IN + mean_c (μ_IN − μ)², the same number
/// without the cancellation.
///
/// Running statistics keep only the BN pair, with the "keep" convention
/// (`r ← 0.9·r + 0.1·s`, both buffers starting at 0), or, with `.batchAverage`, accumulate
/// Σ μ_BN and Σ (μ²_BN + σ²_BN) over the batches and use their average (the paper's "batch
/// average", whose finalisation the official code leaves out: ``finalizeBatchAverage()``).
/// Inference takes IN and LN statistics from the input and BN statistics from the running
/// estimates.
///
/// Differences from the official code, all where it fails: one spatial position (1×1 maps,
/// rank-2 input) gives σ²_IN = 0 instead of NaN; any rank ≥ 2 works. `usesBatchNorm: false`
/// mixes IN and LN only (two logits; the official setting for one image per GPU).
///
/// Sparse SN (`weighting: .sparsestMax`) replaces softmax by ``SparsestMax`` with radius
/// ``radius`` (the official `radius` buffer); ``advanceRadius()`` moves it linearly from 0 to 1
/// over ``radiusSteps`` training steps, and a weight vector that becomes one-hot is frozen (its
/// logits are set to it and no longer receive gradients), as in
/// switchablenorms/Sparse_SwitchNorm.
///
/// ## Shape
/// Input `[N, C, spatial…]` (or channels-last), any rank ≥ 2; output the same. Parameters and
/// running statistics `[C]`; logits `[3]` (`[2]` without BN).
///
/// ## References
/// 1. Luo, Ren, Peng, Zhang & Li 2019, "Differentiable Learning-to-Normalize via Switchable
///    Normalization", arXiv:1806.10779.
/// 2. Shao et al. 2019, "SSN: Learning Sparse Switchable Normalization via SparsestMax",
///    arXiv:1903.03793.
public final class SwitchableNorm<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// How importance weights come from logits.
    public enum Weighting: String, Sendable, Hashable {
        /// softmax (Switchable Normalization).
        case softmax
        /// SparsestMax with the layer's radius (Sparse Switchable Normalization).
        case sparsestMax
    }

    /// What the running statistics hold.
    public enum RunningEstimate: String, Sendable, Hashable {
        /// Exponential moving average (`using_moving_average=True`).
        case movingAverage
        /// Sums over batches, averaged at inference (`using_moving_average=False`).
        case batchAverage
    }

    /// C.
    public let channelCount: Int
    /// ε inside the square root (1e-5).
    public let epsilon: Double
    /// Where the channel axis is.
    public let layout: Layout
    /// Whether batch statistics take part (three components) or not (IN and LN only).
    public let usesBatchNorm: Bool
    /// softmax or SparsestMax.
    public let weighting: Weighting
    /// Moving or batch average.
    public let runningEstimate: RunningEstimate
    /// The update rule of the moving average (official: keep 0.9 for 2-D maps, 0.997 otherwise).
    public var momentum: Momentum

    /// γ; `weight` in checkpoints.
    public var scale: Tensor<Scalar>
    /// β; `bias` in checkpoints.
    public var offset: Tensor<Scalar>
    /// Logits of the mean mixture (IN, LN, BN); `mean_weight` in checkpoints.
    public var meanLogits: Tensor<Scalar>
    /// Logits of the variance mixture; `var_weight` in checkpoints.
    public var varianceLogits: Tensor<Scalar>
    /// Running BN mean (or Σ μ_BN); `running_mean`, initially 0.
    public var runningMean: Tensor<Scalar>
    /// Running BN variance (or Σ (μ²_BN + σ²_BN)); `running_var`, initially 0.
    public var runningVariance: Tensor<Scalar>
    /// Batches accumulated by `.batchAverage`.
    public var accumulatedBatches = 0
    /// SparsestMax radius (`radius` buffer).
    public var radius = 0.0
    /// A radius that wins over a loaded one (the CLI's `--radius`); nil: loads set the radius.
    public var radiusOverride: Double? {
        didSet { if let radiusOverride { radius = radiusOverride } }
    }
    /// Training steps over which ``advanceRadius()`` moves the radius from 0 to 1.
    public var radiusSteps: Int
    /// Steps taken by ``advanceRadius()``.
    public private(set) var radiusStep = 0
    /// Whether the mean weights are frozen one-hot (Sparse SN).
    public private(set) var isMeanFixed = false
    /// Whether the variance weights are frozen one-hot (Sparse SN).
    public private(set) var isVarianceFixed = false
    /// Which kernels run the passes over the data.
    public var kernels = KernelChoice.automatic
    /// Synchronizes the BN branch over these processes in training (the official "Sync SN",
    /// `syncsn_layer.py`): μ_BN and σ²_BN span every rank's samples, merged exactly with
    /// Chan's formula (``Moments``) so that uneven batches and empty ranks work, and backward
    /// all-reduces Σ_n dμ and Σ_n dσ² (one 2·C buffer). IN and LN statistics are per sample and
    /// stay local; parameter gradients stay local (data-parallel training sums them).
    public var communicator: (any Communicator)?

    /// Creates a Switchable (or Sparse Switchable) Normalization layer.
    ///
    /// - Parameters:
    ///   - channelCount: C.
    ///   - epsilon: ε.
    ///   - momentum: the keep-convention rule, `.keep(0.9)` as `SwitchNorm2d`.
    ///   - usesBatchNorm: three components (true) or IN and LN only.
    ///   - runningEstimate: moving or batch average.
    ///   - zeroInitialScale: γ = 0 (`last_gamma`, for the last normalizer of a residual block).
    ///   - weighting: softmax or SparsestMax.
    ///   - radiusSteps: steps for the SparsestMax radius to go from 0 to 1.
    ///   - layout: channel axis.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, epsilon: Double = 1e-5, momentum: Momentum = .keep(0.9),
        usesBatchNorm: Bool = true, runningEstimate: RunningEstimate = .movingAverage,
        zeroInitialScale: Bool = false, weighting: Weighting = .softmax, radiusSteps: Int = 1,
        layout: Layout = .channelsFirst
    ) throws(NormError) {
        guard channelCount >= 1 else {
            throw .invalidHyperparameter(
                name: "channel count", value: "\(channelCount)", requirement: "must be ≥ 1")
        }
        try HyperparameterCheck.epsilon(epsilon)
        guard radiusSteps >= 1 else {
            throw .invalidHyperparameter(
                name: "radius steps", value: "\(radiusSteps)", requirement: "must be ≥ 1")
        }
        try momentum.validate()
        self.channelCount = channelCount
        self.epsilon = epsilon
        self.momentum = momentum
        self.usesBatchNorm = usesBatchNorm
        self.runningEstimate = runningEstimate
        self.weighting = weighting
        self.radiusSteps = radiusSteps
        self.layout = layout
        let k = usesBatchNorm ? 3 : 2
        do {
            scale = try Tensor(repeating: zeroInitialScale ? 0 : 1, shape: [channelCount])
            offset = try Tensor(zeros: [channelCount])
            meanLogits = try Tensor(repeating: 1, shape: [k])
            varianceLogits = try Tensor(repeating: 1, shape: [k])
            runningMean = try Tensor(zeros: [channelCount])
            runningVariance = try Tensor(zeros: [channelCount])
        } catch { throw .tensor(error) }
    }

    var name: String { weighting == .softmax ? "SwitchableNorm" : "SparseSwitchableNorm" }
    var componentNames: [String] { usesBatchNorm ? ["IN", "LN", "BN"] : ["IN", "LN"] }

    // MARK: - Importance weights

    /// The importance weights and ∂w/∂logits for one logit vector.
    func weights(_ logits: Tensor<Scalar>, fixed: Bool) -> (w: [Double], jacobian: [[Double]]) {
        let v = logits.scalars.map(Double.init)
        let k = v.count
        if fixed {
            return (v, [[Double]](repeating: [Double](repeating: 0, count: k), count: k))
        }
        switch weighting {
        case .softmax:
            let w = MixtureWeights.softmax(v)
            return (w, MixtureWeights.softmaxJacobian(w))
        case .sparsestMax:
            let result = SparsestMax.evaluate(v, radius: radius)
            return (result.p, result.jacobian)
        }
    }

    /// The current importance weights, as data: component names with mean and variance
    /// weights (what the layer has learned to use).
    public var importanceWeights: (components: [String], mean: [Double], variance: [Double]) {
        (
            componentNames, weights(meanLogits, fixed: isMeanFixed).w,
            weights(varianceLogits, fixed: isVarianceFixed).w
        )
    }

    /// One line per mixture.
    ///
    /// For example `mean: IN 0.210 LN 0.350 BN 0.440`.
    public var importanceSummary: String {
        let weights = importanceWeights
        func line(_ label: String, _ w: [Double]) -> String {
            var parts: [String] = []
            for (name, value) in zip(weights.components, w) {
                parts.append("\(name) " + String(format: "%.3f", value))
            }
            return label + ": " + parts.joined(separator: " ")
        }
        return line("mean", weights.mean) + "\n" + line("variance", weights.variance)
    }

    /// Moves the SparsestMax radius one step along its linear schedule (call once per training
    /// iteration, as the official training loop sets `radius` before every iteration).
    public func advanceRadius() {
        radiusStep += 1
        radius = min(Double(radiusStep) / Double(radiusSteps), 1)
    }

    /// Averages the accumulated batch statistics into running statistics (`.batchAverage`):
    /// mean = Σμ/K, variance = Σ(μ² + σ²)/K − mean², after which inference uses them directly.
    public func finalizeBatchAverage() throws(NormError) {
        guard runningEstimate == .batchAverage, accumulatedBatches > 0 else { return }
        let (mean, variance) = batchAverages()
        do {
            runningMean = try Tensor(shape: [channelCount], rounding: mean)
            runningVariance = try Tensor(shape: [channelCount], rounding: variance)
        } catch { throw .tensor(error) }
        accumulatedBatches = 0
        finalized = true
    }

    /// True once the batch average has been finalised into the running buffers.
    var finalized = false

    func batchAverages() -> ([Double], [Double]) {
        let k = Double(max(accumulatedBatches, 1))
        let mean = runningMean.scalars.map { Double($0) / k }
        let variance = zip(runningVariance.scalars, mean).map { Double($0.0) / k - $0.1 * $0.1 }
        return (mean, variance)
    }

    // MARK: - Forward

    /// What forward keeps for backward.
    public struct Cache: Sendable {
        let input: Tensor<Scalar>
        let plan: ReductionPlan
        let n: Int
        let c: Int
        let spatial: Int
        /// Per (n, c): μ_IN, σ²_IN, mixed μ and rstd.
        let muIn: [Double]
        let varIn: [Double]
        let mu: [Double]
        let rstd: [Double]
        let muLN: [Double]
        let varLN: [Double]
        let muBN: [Double]
        let varBN: [Double]
        /// Samples behind μ_BN, σ²_BN: the local N, or every rank's when synchronized.
        let batchCount: Int
        let meanWeights: [Double]
        let varianceWeights: [Double]
        let meanJacobian: [[Double]]
        let varianceJacobian: [[Double]]
        let batchIsConstant: Bool
    }

    /// Gradients of a scalar loss.
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

    /// Normalizes `x`; in training mode updates the running BN statistics.
    /// - Throws: ``NormError`` for a wrong rank, channel count or parameter shape, or non-finite
    ///   batch statistics (nothing changes then).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws(NormError) -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        let synchronizing = mode == .training && usesBatchNorm ? communicator : nil
        let validated = Result { () throws(NormError) in
            let result = try validatedPlan(x, allowingEmptyBatch: synchronizing != nil)
            let k = usesBatchNorm ? 3 : 2
            for (label, t) in [("mean_weight", meanLogits), ("var_weight", varianceLogits)]
            where t.count != k {
                throw .parameterShapeMismatch(name: label, expected: [k], actual: t.shape)
            }
            return result
        }
        if case .failure(let error) = validated, let synchronizing {
            // The other ranks are about to exchange BN statistics: tell them, then fail.
            _ = try? Moments.allGathered(.failure(error), over: synchronizing)
        }
        let (plan, n, c, spatial) = try validated.get()
        let op = ReferenceNormKernel.Operation(
            centers: true, scales: true, unbiased: false, epsilon: 0)
        let moments = kernels.moments(
            x, plan: plan, operation: op, indexing: indexing(for: x.shape))
        let muIn = moments.mean
        // Unbiased instance variance; one position gives 0 (the official code gives NaN).
        let correction = spatial > 1 ? Double(spatial) / Double(spatial - 1) : 0
        let varIn = moments.biasedVariance.map { $0 * correction }
        // LN statistics per sample: mean_c t − μ² = mean_c σ² + mean_c (μ_IN − μ)².
        var muLN = [Double](repeating: 0, count: n)
        var varLN = [Double](repeating: 0, count: n)
        for i in 0..<n {
            var m = 0.0
            for j in 0..<c { m += muIn[i * c + j] }
            m /= Double(c)
            var v = 0.0
            for j in 0..<c {
                let d = muIn[i * c + j] - m
                v += varIn[i * c + j] + d * d
            }
            muLN[i] = m
            varLN[i] = v / Double(c)
        }
        // BN statistics per channel, from the batch or the running estimates.
        let batchIsConstant = mode.usesRunningStatistics
        var muBN = [Double](repeating: 0, count: c)
        var varBN = [Double](repeating: 0, count: c)
        var batchCount = n
        if usesBatchNorm {
            if batchIsConstant {
                if runningEstimate == .batchAverage && !finalized {
                    (muBN, varBN) = batchAverages()
                } else {
                    muBN = runningMean.scalars.map(Double.init)
                    varBN = runningVariance.scalars.map(Double.init)
                }
            } else {
                // Per channel over the batch: count n, mean μ_BN and "M2" = Σ_n (σ²_IN + (μ_IN −
                // μ_BN)²), so that σ²_BN = M2/n and ranks merge exactly with Chan's formula.
                var local = Moments(setCount: c)
                for j in 0..<c where n > 0 {
                    var m = 0.0
                    for i in 0..<n { m += muIn[i * c + j] }
                    m /= Double(n)
                    var v = 0.0
                    for i in 0..<n {
                        let d = muIn[i * c + j] - m
                        v += varIn[i * c + j] + d * d
                    }
                    local.count[j] = n
                    local.mean[j] = m
                    local.m2[j] = v
                }
                var merged = local
                if let synchronizing {
                    merged = try Moments.allGathered(.success(local), over: synchronizing)
                }
                batchCount = merged.count.first ?? 0
                guard batchCount > 0 else { throw .emptyTensor(layer: name, shape: x.shape) }
                guard merged.mean.allSatisfy(\.isFinite), merged.m2.allSatisfy(\.isFinite) else {
                    throw .nonFiniteStatistics(layer: name)
                }
                for j in 0..<c {
                    muBN[j] = merged.mean[j]
                    varBN[j] = merged.m2[j] / Double(batchCount)
                }
            }
        }
        guard muIn.allSatisfy(\.isFinite), varIn.allSatisfy(\.isFinite) else {
            throw .nonFiniteStatistics(layer: name)
        }
        let (w, jw) = weights(meanLogits, fixed: isMeanFixed)
        let (wv, jwv) = weights(varianceLogits, fixed: isVarianceFixed)
        var mu = [Double](repeating: 0, count: n * c)
        var rstd = [Double](repeating: 0, count: n * c)
        for i in 0..<n {
            for j in 0..<c {
                let s = i * c + j
                var m = w[0] * muIn[s] + w[1] * muLN[i]
                var v = wv[0] * varIn[s] + wv[1] * varLN[i]
                if usesBatchNorm {
                    m += w[2] * muBN[j]
                    v += wv[2] * varBN[j]
                }
                mu[s] = m
                rstd[s] = 1 / (max(v, 0) + epsilon).squareRoot()
            }
        }
        var y = try zeros(x.shape)
        let parameterIndexing = indexing(for: x.shape)
        if x.count > 0 {
            y.withUnsafeMutableBufferPointer { yb in
                kernels.forward(
                    x, plan: plan, mean: mu, rstd: rstd, scale: scale, offset: offset,
                    indexing: parameterIndexing,
                    into: yb)
            }
        }
        // Running statistics (training only, all-or-nothing after every check).
        if mode == .training && usesBatchNorm {
            try updateRunning(muBN: muBN, varBN: varBN)
        }
        if mode == .training && weighting == .sparsestMax { freezeOneHotWeights(w, wv) }
        let cache = Cache(
            input: x, plan: plan, n: n, c: c, spatial: spatial, muIn: muIn, varIn: varIn, mu: mu,
            rstd: rstd,
            muLN: muLN, varLN: varLN, muBN: muBN, varBN: varBN, batchCount: batchCount,
            meanWeights: w, varianceWeights: wv,
            meanJacobian: jw, varianceJacobian: jwv,
            batchIsConstant: batchIsConstant || !usesBatchNorm)
        return (y, cache)
    }

    func updateRunning(muBN: [Double], varBN: [Double]) throws(NormError) {
        let oldMean = runningMean.scalars.map(Double.init)
        let oldVariance = runningVariance.scalars.map(Double.init)
        var newMean = oldMean
        var newVariance = oldVariance
        switch runningEstimate {
        case .movingAverage:
            let f = momentum.weightOfNew(batchesTracked: 1)
            for j in 0..<channelCount {
                newMean[j] = (1 - f) * oldMean[j] + f * muBN[j]
                newVariance[j] = (1 - f) * oldVariance[j] + f * varBN[j]
            }
        case .batchAverage:
            for j in 0..<channelCount {
                newMean[j] = oldMean[j] + muBN[j]
                newVariance[j] = oldVariance[j] + muBN[j] * muBN[j] + varBN[j]
            }
        }
        guard newMean.allSatisfy(\.isFinite), newVariance.allSatisfy(\.isFinite) else {
            throw .nonFiniteStatistics(layer: name)
        }
        do {
            runningMean = try Tensor(shape: [channelCount], rounding: newMean)
            runningVariance = try Tensor(shape: [channelCount], rounding: newVariance)
        } catch { throw .tensor(error) }
        if runningEstimate == .batchAverage {
            accumulatedBatches += 1
            finalized = false
        }
    }

    /// SSN: a weight vector that has become one-hot is frozen, its logits set to it.
    func freezeOneHotWeights(_ w: [Double], _ wv: [Double]) {
        func isOneHot(_ v: [Double]) -> Bool { (v.max() ?? 0) - (v.min() ?? 0) >= 1 - 1e-12 }
        if !isMeanFixed && isOneHot(w) {
            isMeanFixed = true
            meanLogits = (try? Tensor(shape: [w.count], rounding: w)) ?? meanLogits
        }
        if !isVarianceFixed && isOneHot(wv) {
            isVarianceFixed = true
            varianceLogits = (try? Tensor(shape: [wv.count], rounding: wv)) ?? varianceLogits
        }
    }

    // MARK: - Backward

    /// Back-propagates through the forward call that produced `cache`.
    ///
    /// With g = dy·γ, per (n, c): dμ = −rstd·Σg, dσ² = −½·rstd³·Σg·(x − μ); they split over the
    /// components by the weights (dμ_IN = w₀·dμ, dμ_LN = w₁·Σ_c dμ, dμ_BN = w₂·Σ_n dμ, likewise
    /// for σ²), flow back through σ²_LN, σ²_BN to μ_IN and σ²_IN, and then
    /// `dx = rstd·g + dμ_IN/L + dσ²_IN·2(x − μ_IN)/(L − 1)`. The logits receive Jᵀa with
    /// a_k = Σ dμ·μ_k (J the softmax or SparsestMax Jacobian). In inference the BN statistics
    /// are constants.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws(NormError) -> Gradients {
        let x = cache.input
        guard dy.shape == x.shape else {
            throw .gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let (n, c, spatial) = (cache.n, cache.c, cache.spatial)
        let parameterIndexing = indexing(for: x.shape)
        let sums = kernels.gradientSums(
            x, outputGradient: dy, plan: cache.plan, mean: cache.mu, rstd: cache.rstd, scale: scale,
            indexing: parameterIndexing)
        var dmu = [Double](repeating: 0, count: n * c)
        var dvar = [Double](repeating: 0, count: n * c)
        for s in 0..<(n * c) {
            let r = cache.rstd[s]
            dmu[s] = -r * sums.sumG[s]
            dvar[s] = -0.5 * r * r * r * sums.sumGD[s]
        }
        let w = cache.meanWeights
        let wv = cache.varianceWeights
        // Logit gradients: a_k = Σ dμ·μ_k, then Jᵀa.
        var aMean = [Double](repeating: 0, count: w.count)
        var aVar = [Double](repeating: 0, count: w.count)
        for i in 0..<n {
            for j in 0..<c {
                let s = i * c + j
                aMean[0] += dmu[s] * cache.muIn[s]
                aMean[1] += dmu[s] * cache.muLN[i]
                aVar[0] += dvar[s] * cache.varIn[s]
                aVar[1] += dvar[s] * cache.varLN[i]
                if usesBatchNorm {
                    aMean[2] += dmu[s] * cache.muBN[j]
                    aVar[2] += dvar[s] * cache.varBN[j]
                }
            }
        }
        func transposeTimes(_ jac: [[Double]], _ a: [Double]) -> [Double] {
            (0..<a.count).map { l in (0..<a.count).reduce(0) { $0 + jac[$1][l] * a[$1] } }
        }
        let dMeanLogits = transposeTimes(cache.meanJacobian, aMean)
        let dVarLogits = transposeTimes(cache.varianceJacobian, aVar)
        // Split over components and flow back to μ_IN and σ²_IN.
        var dmuIn = dmu.map { $0 * w[0] }
        var dvarIn = dvar.map { $0 * wv[0] }
        for i in 0..<n {
            var dmuLN = 0.0
            var dvarLN = 0.0
            for j in 0..<c {
                dmuLN += dmu[i * c + j]
                dvarLN += dvar[i * c + j]
            }
            dmuLN *= w[1]
            dvarLN *= wv[1]
            // σ²_LN = mean_c(σ²_IN + μ²_IN) − μ²_LN.
            dmuLN += -2 * cache.muLN[i] * dvarLN
            for j in 0..<c {
                let s = i * c + j
                dvarIn[s] += dvarLN / Double(c)
                dmuIn[s] += 2 * cache.muIn[s] * dvarLN / Double(c) + dmuLN / Double(c)
            }
        }
        if usesBatchNorm && !cache.batchIsConstant {
            // Σ_n dμ and Σ_n dσ² per channel, over every rank when synchronized.
            var batchSums = [Double](repeating: 0, count: 2 * c)
            for j in 0..<c {
                for i in 0..<n {
                    batchSums[j] += dmu[i * c + j]
                    batchSums[c + j] += dvar[i * c + j]
                }
            }
            if let communicator {
                batchSums = try Collective.allReduceSum(
                    .success(batchSums), length: 2 * c, operation: "\(name) backward",
                    over: communicator)
            }
            let count = Double(cache.batchCount)
            for j in 0..<c {
                var dmuBN = w[2] * batchSums[j]
                let dvarBN = wv[2] * batchSums[c + j]
                dmuBN += -2 * cache.muBN[j] * dvarBN
                for i in 0..<n {
                    let s = i * c + j
                    dvarIn[s] += dvarBN / count
                    dmuIn[s] += 2 * cache.muIn[s] * dvarBN / count + dmuBN / count
                }
            }
        }
        // dx = rstd·g + dμ_IN/L + dσ²_IN·2(x − μ_IN)/(L − 1), per (n, c).
        let l = Double(spatial)
        let a = cache.rstd
        let b = dvarIn.map { spatial > 1 ? 2 * $0 / (l - 1) : 0 }
        let cc = dmuIn.map { $0 / l }
        var dx = try zeros(x.shape)
        if x.count > 0 {
            dx.withUnsafeMutableBufferPointer { dxb in
                kernels.applyGradient(
                    x, outputGradient: dy, plan: cache.plan, mean: cache.muIn, a: a, b: b, c: cc,
                    scale: scale,
                    indexing: parameterIndexing, into: dxb)
            }
        }
        do {
            return Gradients(
                input: dx, scale: try Tensor(shape: [channelCount], rounding: sums.scaleGradient),
                offset: try Tensor(shape: [channelCount], rounding: sums.offsetGradient),
                meanLogits: try Tensor(
                    shape: [w.count],
                    rounding: isMeanFixed ? [Double](repeating: 0, count: w.count) : dMeanLogits),
                varianceLogits: try Tensor(
                    shape: [w.count],
                    rounding: isVarianceFixed ? [Double](repeating: 0, count: w.count) : dVarLogits)
            )
        } catch { throw .tensor(error) }
    }

    // MARK: - State

    /// Parameters and buffers under the official implementation's `state_dict` names.
    func stateDictionary() -> [String: Tensor<Scalar>] {
        var tensors: [String: Tensor<Scalar>] = [
            "weight": scale, "bias": offset, "mean_weight": meanLogits,
            "var_weight": varianceLogits,
            "running_mean": runningMean, "running_var": runningVariance,
        ]
        if weighting == .sparsestMax {
            tensors["radius"] = Tensor([Scalar(radius)])
            tensors["mean_fixed"] = Tensor([isMeanFixed ? 1 : 0])
            tensors["var_fixed"] = Tensor([isVarianceFixed ? 1 : 0])
        }
        return tensors
    }

    /// Loads parameters and buffers by their official names; any shape with the right number of
    /// elements is accepted (the official buffers are `[1, C, 1]`).
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)``; nothing is loaded then.
    public func load(_ tensors: [String: Tensor<Scalar>]) throws(NormError) {
        let k = usesBatchNorm ? 3 : 2
        let expected: [String: Int] = [
            "weight": channelCount, "bias": channelCount, "mean_weight": k, "var_weight": k,
            "running_mean": channelCount, "running_var": channelCount, "radius": 1, "mean_fixed": 1,
            "var_fixed": 1,
        ]
        for (key, value) in tensors {
            guard let count = expected[key], value.count == count else {
                throw .parameterShapeMismatch(
                    name: key, expected: expected[key].map { [$0] } ?? [], actual: value.shape)
            }
        }
        func flat(_ t: Tensor<Scalar>) -> Tensor<Scalar> { (try? t.reshaped([t.count])) ?? t }
        if let t = tensors["weight"] { scale = flat(t) }
        if let t = tensors["bias"] { offset = flat(t) }
        if let t = tensors["mean_weight"] { meanLogits = flat(t) }
        if let t = tensors["var_weight"] { varianceLogits = flat(t) }
        if let t = tensors["running_mean"] { runningMean = flat(t) }
        if let t = tensors["running_var"] { runningVariance = flat(t) }
        if let t = tensors["radius"] { radius = radiusOverride ?? Double(t.scalars[0]) }
        // Sparse SN's frozen flags (the official LongTensor buffers): the logits are then the
        // one-hot weights themselves.
        if let t = tensors["mean_fixed"] { isMeanFixed = t.scalars[0] != 0 }
        if let t = tensors["var_fixed"] { isVarianceFixed = t.scalars[0] != 0 }
    }

    // MARK: - Helpers

    func validatedPlan(_ x: Tensor<Scalar>, allowingEmptyBatch: Bool = false) throws(NormError)
        -> (ReductionPlan, Int, Int, Int)
    {
        // A synchronized rank may hold no samples; every other axis must be non-empty.
        guard
            x.count > 0
                || (allowingEmptyBatch && x.rank >= 2 && x.shape[0] == 0
                    && x.shape.dropFirst().allSatisfy({ $0 > 0 }))
        else { throw .emptyTensor(layer: name, shape: x.shape) }
        guard x.rank >= 2 else {
            throw .invalidRank(layer: name, expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
        }
        let axis = layout.channelAxis(rank: x.rank)
        guard x.shape[axis] == channelCount else {
            throw .channelMismatch(
                layer: name, expected: channelCount, actual: x.shape[axis], shape: x.shape)
        }
        for (label, t) in [
            ("weight", scale), ("bias", offset), ("running_mean", runningMean),
            ("running_var", runningVariance),
        ]
        where t.shape != [channelCount] {
            throw .parameterShapeMismatch(name: label, expected: [channelCount], actual: t.shape)
        }
        // Per (sample, channel) over the spatial axes (none for rank 2).
        let spatialAxes = layout.spatialAxes(rank: x.rank)
        let plan = ReductionPlan(
            viewShape: x.shape, reduced: (0..<x.rank).map { spatialAxes.contains($0) })
        let n = x.shape[0]
        return (plan, n, channelCount, spatialAxes.reduce(1) { $0 * x.shape[$1] })
    }

    func indexing(for shape: [Int]) -> ParameterIndexing {
        ParameterIndexing(
            divisor: Shape.strides(shape)[layout.channelAxis(rank: shape.count)],
            modulus: channelCount)
    }

    func zeros(_ shape: [Int]) throws(NormError) -> Tensor<Scalar> {
        do { return try Tensor(zeros: shape) } catch { throw .tensor(error) }
    }

    /// One line with the configuration.
    public var description: String {
        "\(name)(\(channelCount), eps=\(epsilon), \(momentum), using_bn=\(usesBatchNorm), "
            + "\(runningEstimate.rawValue), layout=\(layout))"
    }
}
