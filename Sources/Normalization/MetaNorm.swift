import Foundation
import NormKernels
import TensorCore

/// Meta Normalization: statistics of every (sample, channel) aggregated over the batch by U and
/// over channels by V, the matrix form in which IN, BN, LN and GN are particular (U, V), with a
/// learned mixture over several (U, V).
///
/// ```
/// M[n,c] = μ_IN,  Q[n,c] = E_s[x²] (biased),  Ū = diag(U1)⁻¹U,  V̄ = V diag(1ᵀV)⁻¹
/// μ_k = Ū_k M V̄_k,   σ²_k = Ū_k Q V̄_k − μ_k²            (per aggregation k)
/// μ = Σ_k softmax(a)_k μ_k,   σ² = Σ_k softmax(b)_k σ²_k,   y = γ_c (x − μ)/√(σ² + ε) + β_c
/// IN: U = I, V = I   BN: U = 11ᵀ, V = I   LN: U = I, V = 11ᵀ   GN(G): U = I, V = I_G ⊗ 11ᵀ
/// ```
/// U and V here are binary block structures (an equivalence relation each), so Ū M V̄ is the
/// mean of M over a block of (sample, channel) pairs, and σ²_k is computed as the block mean of
/// σ²_IN + (M − μ_k)², the same number without cancellation.
///
/// **What is learned, and how.** The binary U, V cannot be learned by gradient; NormKit relaxes
/// them to convex combinations of the aggregations in ``aggregations`` (a dictionary the user
/// chooses, by default IN, BN, LN and GN(2)): the mixture weights softmax(a) for means and
/// softmax(b) for variances are trained by gradient, as Switchable Normalization trains its
/// three. A single aggregation is a fixed (U, V) and reproduces the corresponding layer
/// exactly (tested). This is our construction: the Dynamic Normalization paper's own learning
/// rule could not be checked (normalizers-spec.md §8).
///
/// Running statistics: for aggregations that pool the batch (U = 11ᵀ), μ_k and σ²_k (per
/// channel block) are tracked with PyTorch's convention (`r ← 0.9·r + 0.1·s`, initially 0 and 1)
/// and replace the batch values in inference; per-sample aggregations always use the input.
///
/// ## Shape
/// Input `[N, C, spatial…]` (or channels-last), rank ≥ 2; output the same; γ, β `[C]`.
///
/// ## References
/// 1. Luo et al. 2019, "Differentiable Dynamic Normalization for Learning Deep Representation",
///    ICML 2019 (the matrix formulation).
/// 2. Luo, Ren, Peng, Zhang & Li 2019, arXiv:1806.10779 (learned mixtures of statistics).
public final class MetaNorm<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// One (U, V); see ``StatisticsAggregation``.
    public typealias Aggregation = StatisticsAggregation

    /// C.
    public let channelCount: Int
    /// The dictionary of aggregations the mixture is learned over.
    public let aggregations: [Aggregation]
    /// ε.
    public let epsilon: Double
    /// Channel axis.
    public let layout: Layout
    /// Running-statistic rule for batch-pooling aggregations.
    public var momentum: Momentum
    /// γ (`weight`).
    public var scale: Tensor<Scalar>
    /// β (`bias`).
    public var offset: Tensor<Scalar>
    /// Mean-mixture logits (`mean_weight`), one per aggregation, initially 1.
    public var meanLogits: Tensor<Scalar>
    /// Variance-mixture logits (`var_weight`).
    public var varianceLogits: Tensor<Scalar>
    /// Running μ_k per channel for each aggregation (only batch-pooling ones are used).
    public var runningMean: [[Double]]
    /// Running σ²_k per channel for each aggregation.
    public var runningVariance: [[Double]]
    /// Kernels.
    public var kernels = KernelChoice.automatic

    /// Creates a MetaNorm layer over a dictionary of aggregations.
    /// - Throws: ``NormError`` when the dictionary is empty or a group count does not divide C.
    public init(
        channelCount: Int,
        aggregations: [Aggregation] = [.instance, .batchNorm, .layer, .group(2)],
        epsilon: Double = 1e-5, momentum: Momentum = .pytorchDefault,
        layout: Layout = .channelsFirst
    ) throws(NormError) {
        guard channelCount >= 1, !aggregations.isEmpty else {
            throw .invalidHyperparameter(
                name: "MetaNorm",
                value: "\(channelCount) channels, \(aggregations.count) aggregations",
                requirement: "needs channels and at least one aggregation")
        }
        for a in aggregations {
            if case .groups(let g) = a.channel, g < 1 || channelCount % g != 0 {
                throw .groupsDoNotDivideChannels(groups: g, channels: channelCount)
            }
        }
        try HyperparameterCheck.epsilon(epsilon)
        try momentum.validate()
        self.channelCount = channelCount
        self.aggregations = aggregations
        self.epsilon = epsilon
        self.momentum = momentum
        self.layout = layout
        do {
            scale = try Tensor(repeating: 1, shape: [channelCount])
            offset = try Tensor(zeros: [channelCount])
            meanLogits = try Tensor(repeating: 1, shape: [aggregations.count])
            varianceLogits = try Tensor(repeating: 1, shape: [aggregations.count])
        } catch { throw .tensor(error) }
        runningMean = aggregations.map { _ in [Double](repeating: 0, count: channelCount) }
        runningVariance = aggregations.map { _ in [Double](repeating: 1, count: channelCount) }
    }

    /// The learned mixture weights, as data.
    public var importanceWeights: (components: [String], mean: [Double], variance: [Double]) {
        (aggregations.map(\.description), softmax(meanLogits), softmax(varianceLogits))
    }

    func softmax(_ t: Tensor<Scalar>) -> [Double] {
        MixtureWeights.softmax(t.scalars.map(Double.init))
    }

    /// What forward keeps for backward.
    public struct Cache: Sendable {
        let input: Tensor<Scalar>
        let plan: ReductionPlan
        let n: Int
        let spatial: Int
        let m: [Double]
        let mu: [Double]
        let rstd: [Double]
        let muK: [[Double]]
        let varK: [[Double]]
        let constant: [Bool]
        let w: [Double]
        let wv: [Double]
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

    /// Block mean over aggregation `a` of a per-(n, c) table: every entry replaced by its block's mean.
    func blockMean(_ t: [Double], _ a: Aggregation, n: Int) -> [Double] {
        let c = channelCount
        let width = a.channelBlock(c)
        let samples = a.batch == .all ? n : 1
        var out = [Double](repeating: 0, count: n * c)
        for i0 in stride(from: 0, to: n, by: samples) {
            for j0 in stride(from: 0, to: c, by: width) {
                var total = 0.0
                for i in i0..<(i0 + samples) {
                    for j in j0..<(j0 + width) { total += t[i * c + j] }
                }
                let mean = total / Double(samples * width)
                for i in i0..<(i0 + samples) {
                    for j in j0..<(j0 + width) { out[i * c + j] = mean }
                }
            }
        }
        return out
    }

    /// Normalizes `x`; in training mode updates the running statistics of batch-pooling
    /// aggregations.
    /// - Throws: ``NormError`` for a wrong rank, channel count or logit shape, or non-finite
    ///   statistics; nothing changes then.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws(NormError) -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        guard x.count > 0 else { throw .emptyTensor(layer: "MetaNorm", shape: x.shape) }
        guard x.rank >= 2 else {
            throw .invalidRank(layer: "MetaNorm", expected: "rank ≥ 2 (N, C, …)", shape: x.shape)
        }
        let axis = layout.channelAxis(rank: x.rank)
        let c = channelCount
        guard x.shape[axis] == c else {
            throw .channelMismatch(
                layer: "MetaNorm", expected: c, actual: x.shape[axis], shape: x.shape)
        }
        let k = aggregations.count
        for (label, t) in [("mean_weight", meanLogits), ("var_weight", varianceLogits)]
        where t.count != k {
            throw .parameterShapeMismatch(name: label, expected: [k], actual: t.shape)
        }
        let n = x.shape[0]
        let spatialAxes = layout.spatialAxes(rank: x.rank)
        let plan = ReductionPlan(
            viewShape: x.shape, reduced: (0..<x.rank).map { spatialAxes.contains($0) })
        let indexing = ParameterIndexing(divisor: Shape.strides(x.shape)[axis], modulus: c)
        let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: 0)
        let moments = kernels.moments(x, plan: plan, operation: op, indexing: indexing)
        let m = moments.mean
        let vb = moments.biasedVariance
        guard m.allSatisfy(\.isFinite), vb.allSatisfy(\.isFinite) else {
            throw .nonFiniteStatistics(layer: "MetaNorm")
        }
        var muK: [[Double]] = []
        var varK: [[Double]] = []
        var constant: [Bool] = []
        var newRunningMean = runningMean
        var newRunningVariance = runningVariance
        for (index, a) in aggregations.enumerated() {
            let useRunning = a.batch == .all && mode.usesRunningStatistics
            constant.append(useRunning)
            if useRunning {
                let means = runningMean[index]
                let variances = runningVariance[index]
                muK.append((0..<(n * c)).map { (s: Int) -> Double in means[s % c] })
                varK.append((0..<(n * c)).map { (s: Int) -> Double in variances[s % c] })
                continue
            }
            let mu = blockMean(m, a, n: n)
            var spread = [Double](repeating: 0, count: n * c)
            for s in 0..<(n * c) {
                let d = m[s] - mu[s]
                spread[s] = vb[s] + d * d
            }
            let variance = blockMean(spread, a, n: n)
            muK.append(mu)
            varK.append(variance)
            if a.batch == .all && mode == .training {
                let f = momentum.weightOfNew(batchesTracked: 1)
                for j in 0..<c {
                    newRunningMean[index][j] = (1 - f) * runningMean[index][j] + f * mu[j]
                    newRunningVariance[index][j] =
                        (1 - f) * runningVariance[index][j] + f * variance[j]
                }
            }
        }
        let w = softmax(meanLogits)
        let wv = softmax(varianceLogits)
        var mu = [Double](repeating: 0, count: n * c)
        var rstd = [Double](repeating: 0, count: n * c)
        for s in 0..<(n * c) {
            var mean = 0.0
            var variance = 0.0
            for index in 0..<k {
                mean += w[index] * muK[index][s]
                variance += wv[index] * varK[index][s]
            }
            mu[s] = mean
            rstd[s] = 1 / (max(variance, 0) + epsilon).squareRoot()
        }
        var y: Tensor<Scalar>
        do { y = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        y.withUnsafeMutableBufferPointer { yb in
            kernels.forward(
                x, plan: plan, mean: mu, rstd: rstd, scale: scale, offset: offset,
                indexing: indexing, into: yb)
        }
        if mode == .training {
            runningMean = newRunningMean
            runningVariance = newRunningVariance
        }
        let cache = Cache(
            input: x, plan: plan, n: n, spatial: x.count / (n * c), m: m, mu: mu, rstd: rstd,
            muK: muK, varK: varK,
            constant: constant, w: w, wv: wv)
        return (y, cache)
    }

    /// Back-propagates: as Switchable Normalization, with each aggregation's gradient spread
    /// back over its blocks (dM += mean_B dμ_k, dσ²_IN += mean_B dσ²_k,
    /// dM += 2(M − μ_k)·mean_B dσ²_k), then `dx = rstd·g + dM/L + dσ²_IN·2(x − M)/L`.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws(NormError) -> Gradients {
        let x = cache.input
        guard dy.shape == x.shape else {
            throw .gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let c = channelCount
        let n = cache.n
        let indexing = ParameterIndexing(
            divisor: Shape.strides(x.shape)[layout.channelAxis(rank: x.rank)], modulus: c)
        let sums = kernels.gradientSums(
            x, outputGradient: dy, plan: cache.plan, mean: cache.mu, rstd: cache.rstd, scale: scale,
            indexing: indexing)
        let count = n * c
        var dmu = [Double](repeating: 0, count: count)
        var dvar = [Double](repeating: 0, count: count)
        for s in 0..<count {
            let r = cache.rstd[s]
            dmu[s] = -r * sums.sumG[s]
            dvar[s] = -0.5 * r * r * r * sums.sumGD[s]
        }
        let k = aggregations.count
        var aMean = [Double](repeating: 0, count: k)
        var aVar = [Double](repeating: 0, count: k)
        var dM = [Double](repeating: 0, count: count)
        var dV = [Double](repeating: 0, count: count)
        for (index, a) in aggregations.enumerated() {
            for s in 0..<count {
                aMean[index] += dmu[s] * cache.muK[index][s]
                aVar[index] += dvar[s] * cache.varK[index][s]
            }
            if cache.constant[index] { continue }
            let dmuK = blockMean(dmu.map { $0 * cache.w[index] }, a, n: n)
            let dvarK = blockMean(dvar.map { $0 * cache.wv[index] }, a, n: n)
            for s in 0..<count {
                dM[s] += dmuK[s] + 2 * (cache.m[s] - cache.muK[index][s]) * dvarK[s]
                dV[s] += dvarK[s]
            }
        }
        // The blocks' means are over |B| entries; blockMean already divided by |B|, and each
        // entry's share of Σ_B is the same, which is what mean_B of the upstream gives.
        let l = Double(cache.spatial)
        let b = dV.map { 2 * $0 / l }
        let cc = dM.map { $0 / l }
        var dx: Tensor<Scalar>
        do { dx = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        dx.withUnsafeMutableBufferPointer { dxb in
            kernels.applyGradient(
                x, outputGradient: dy, plan: cache.plan, mean: cache.m, a: cache.rstd, b: b, c: cc,
                scale: scale,
                indexing: indexing, into: dxb)
        }
        do {
            return Gradients(
                input: dx, scale: try Tensor(shape: [c], rounding: sums.scaleGradient),
                offset: try Tensor(shape: [c], rounding: sums.offsetGradient),
                meanLogits: try Tensor(
                    shape: [k], rounding: MixtureWeights.softmaxBackward(cache.w, aMean)),
                varianceLogits: try Tensor(
                    shape: [k], rounding: MixtureWeights.softmaxBackward(cache.wv, aVar)))
        } catch { throw .tensor(error) }
    }

    /// Parameters by name (`weight`, `bias`, `mean_weight`, `var_weight`).
    func stateDictionary() -> [String: Tensor<Scalar>] {
        mixtureParameters(
            scale: scale, offset: offset, meanLogits: meanLogits, varianceLogits: varianceLogits)
    }

    /// Loads parameters by name.
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)``; nothing is loaded then.
    public func load(_ tensors: [String: Tensor<Scalar>]) throws(NormError) {
        let expected = [
            "weight": channelCount, "bias": channelCount, "mean_weight": aggregations.count,
            "var_weight": aggregations.count,
        ]
        for (key, value) in tensors where expected[key] != value.count {
            throw .parameterShapeMismatch(
                name: key, expected: expected[key].map { [$0] } ?? [], actual: value.shape)
        }
        func flat(_ t: Tensor<Scalar>) -> Tensor<Scalar> { (try? t.reshaped([t.count])) ?? t }
        if let t = tensors["weight"] { scale = flat(t) }
        if let t = tensors["bias"] { offset = flat(t) }
        if let t = tensors["mean_weight"] { meanLogits = flat(t) }
        if let t = tensors["var_weight"] { varianceLogits = flat(t) }
    }

    /// One line with the configuration.
    public var description: String {
        "MetaNorm(\(channelCount), aggregations=\(aggregations.map(\.description)), eps=\(epsilon), layout=\(layout))"
    }
}

/// One (U, V) of ``MetaNorm``: which samples and which channels pool their statistics.
public struct StatisticsAggregation: Sendable, Hashable, CustomStringConvertible {
    /// U: how samples share statistics.
    public enum BatchAggregation: String, Sendable, Hashable {
        /// U = I: each sample alone.
        case identity
        /// U = 11ᵀ: the whole batch.
        case all
    }

    /// V: how channels share statistics.
    public enum ChannelAggregation: Sendable, Hashable {
        /// V = I: each channel alone.
        case identity
        /// V = I_G ⊗ 11ᵀ: G groups of consecutive channels.
        case groups(Int)
        /// V = 11ᵀ: all channels.
        case all
    }

    /// U.
    public var batch: BatchAggregation
    /// V.
    public var channel: ChannelAggregation

    /// Creates an aggregation.
    public init(batch: BatchAggregation, channel: ChannelAggregation) {
        self.batch = batch
        self.channel = channel
    }

    /// InstanceNorm.
    public static let instance = StatisticsAggregation(batch: .identity, channel: .identity)
    /// BatchNorm.
    public static let batchNorm = StatisticsAggregation(batch: .all, channel: .identity)
    /// LayerNorm over (C, spatial).
    public static let layer = StatisticsAggregation(batch: .identity, channel: .all)
    /// GroupNorm.
    public static func group(_ g: Int) -> StatisticsAggregation {
        StatisticsAggregation(batch: .identity, channel: .groups(g))
    }

    /// A short name: IN, BN, LN, GN(G), or U/V.
    public var description: String {
        switch (batch, channel) {
        case (.identity, .identity): return "IN"
        case (.all, .identity): return "BN"
        case (.identity, .all): return "LN"
        case (.identity, .groups(let g)): return "GN(\(g))"
        case (.all, .all): return "whole"
        case (.all, .groups(let g)): return "batch-GN(\(g))"
        }
    }

    /// Channels per block for C channels.
    func channelBlock(_ c: Int) -> Int {
        switch channel {
        case .identity: return 1
        case .groups(let g): return c / g
        case .all: return c
        }
    }
}
