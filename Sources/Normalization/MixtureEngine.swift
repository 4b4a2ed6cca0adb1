import NormKernels

/// The engine behind Switchable Normalization, Sparse SN and MetaNorm: statistics of several
/// partitions aggregated from the per-(sample, channel) ones, mixed by learned weights.
///
/// ```
/// M[n,c], V[n,c]     per-(sample, channel) mean and variance (the finest partition)
/// μ_k = mean_B M,    σ²_k = mean_B (V + (M − μ_k)²)       over each block B of component k
/// μ = Σ_k w_k μ_k,   σ² = Σ_k w′_k σ²_k,   rstd = 1/√(max(σ², 0) + ε)
/// ```
/// A component is a ``StatisticsAggregation`` (U, V): IN, LN and BN give Switchable
/// Normalization (SN's V is the unbiased spatial variance, MetaNorm's the biased one; the
/// engine takes V as given). Each component's statistics come from a ``Source``: this batch,
/// or fixed values per channel (running estimates in inference). A batch-pooling component's
/// blocks are ``Moments`` (count, mean, M2), so that ranks merge them exactly with Chan's
/// formula when the source is synchronized.
///
/// Backward (with g = γ·dy and the kernel's per-(n, c) sums Σg, Σg·(x − μ)):
/// ```
/// dμ = −rstd·Σg,   dσ² = −½·rstd³·Σg·(x − μ)                       per (n, c)
/// dL/dw_k = Σ dμ·μ_k,  dL/dw′_k = Σ dσ²·σ²_k  → logits through softmax or SparsestMax
/// per block B of a batch-dependent component: m = w_k·Σ_B dμ/|B|,  v = w′_k·Σ_B dσ²/|B|
///           dM += m + 2(M − μ_k)·v,   dV += v
/// ```
/// and the layer turns (dM, dV) into dx with its own ∂V/∂x. The block sums of batch-pooling
/// components are all-reduced when the source is synchronized.
struct MixtureEngine: Sendable {
    /// C.
    let channelCount: Int
    /// The components, in logit order.
    let components: [StatisticsAggregation]
    /// ε.
    let epsilon: Double
    /// The layer's name in errors.
    let layer: String

    /// Where one component's statistics come from.
    enum Source {
        /// This batch (merged over `communicator`'s ranks when given and the component pools
        /// the batch).
        case batch
        /// Given per-channel values (running estimates), constants for backward.
        case fixed(mean: [Double], variance: [Double])
    }

    /// What forward computed and backward reuses.
    struct Statistics: Sendable {
        /// N (local).
        let n: Int
        /// M and V, `[N·C]`.
        let instanceMean: [Double]
        let instanceVariance: [Double]
        /// μ_k and σ²_k expanded to `[N·C]` per component.
        let componentMean: [[Double]]
        let componentVariance: [[Double]]
        /// Per component: block statistics (count, mean, biased variance as M2/count), over
        /// every rank for synchronized batch-pooling components; nil for fixed components.
        let blocks: [Moments?]
        /// The mixed μ and rstd, `[N·C]`.
        let mean: [Double]
        let rstd: [Double]
        /// The weights of the mean and variance mixtures.
        let meanWeights: MixtureEvaluation
        let varianceWeights: MixtureEvaluation

        /// The per-channel mean and variance of batch-pooling component `k` (for the running
        /// estimates); nil when it is fixed or per sample.
        func channelStatistics(_ k: Int, components: [StatisticsAggregation], channels: Int)
            -> (mean: [Double], variance: [Double])?
        {
            guard let m = blocks[k], components[k].batch == .all else { return nil }
            let width = components[k].channelBlock(channels)
            return (
                (0..<channels).map { m.mean[$0 / width] },
                (0..<channels).map {
                    m.count[$0 / width] > 0 ? m.m2[$0 / width] / Double(m.count[$0 / width]) : 0
                }
            )
        }
    }

    /// Block layout of a component for N samples: (sample groups, samples per group, channel
    /// blocks, channels per block).
    func layout(_ a: StatisticsAggregation, n: Int) -> (Int, Int, Int, Int) {
        let width = a.channelBlock(channelCount)
        return a.batch == .all
            ? (1, n, channelCount / width, width) : (n, 1, channelCount / width, width)
    }

    /// Local block moments of component `a` from M and V (count in (n, c) entries).
    func blockMoments(_ a: StatisticsAggregation, m: [Double], v: [Double], n: Int) -> Moments {
        let c = channelCount
        let (groups, samples, blocks, width) = layout(a, n: n)
        var result = Moments(setCount: groups * blocks)
        guard n > 0 else { return result }
        for g in 0..<groups {
            for b in 0..<blocks {
                let i0 = g * samples
                let j0 = b * width
                var total = 0.0
                for i in i0..<(i0 + samples) {
                    for j in j0..<(j0 + width) { total += m[i * c + j] }
                }
                let count = samples * width
                let mean = total / Double(count)
                var spread = 0.0
                for i in i0..<(i0 + samples) {
                    for j in j0..<(j0 + width) {
                        let d = m[i * c + j] - mean
                        spread += v[i * c + j] + d * d
                    }
                }
                let set = g * blocks + b
                result.count[set] = count
                result.mean[set] = mean
                result.m2[set] = spread
            }
        }
        return result
    }

    /// μ_k, σ²_k for every component, mixed into μ and rstd.
    /// - Parameters:
    ///   - m: M, `[N·C]`.  - v: V, `[N·C]` (non-negative).
    ///   - sources: one per component.
    ///   - communicator: merges batch-pooling components over ranks (training, synchronized).
    /// - Throws: ``NormError/nonFiniteStatistics(layer:)``; ``NormError/emptyTensor(layer:shape:)``
    ///   when a batch-pooling component has no sample on any rank; communication errors.
    func forward(
        m: [Double], v: [Double], n: Int, sources: [Source],
        meanWeights: MixtureEvaluation,
        varianceWeights: MixtureEvaluation,
        communicator: (any Communicator)?, shape: [Int]
    ) throws(NormError) -> Statistics {
        let c = channelCount
        guard m.allSatisfy(\.isFinite), v.allSatisfy(\.isFinite) else {
            throw .nonFiniteStatistics(layer: layer)
        }
        var componentMean: [[Double]] = []
        var componentVariance: [[Double]] = []
        var blocks: [Moments?] = []
        for (a, source) in zip(components, sources) {
            switch source {
            case .fixed(let means, let variances):
                componentMean.append((0..<(n * c)).map { means[$0 % c] })
                componentVariance.append((0..<(n * c)).map { variances[$0 % c] })
                blocks.append(nil)
            case .batch:
                var moments = blockMoments(a, m: m, v: v, n: n)
                if a.batch == .all {
                    if let communicator {
                        moments = try Moments.allGathered(.success(moments), over: communicator)
                    }
                    guard moments.count.allSatisfy({ $0 > 0 }) else {
                        throw .emptyTensor(layer: layer, shape: shape)
                    }
                    guard moments.mean.allSatisfy(\.isFinite), moments.m2.allSatisfy(\.isFinite)
                    else { throw .nonFiniteStatistics(layer: layer) }
                }
                let (_, samples, blockCount, width) = layout(a, n: n)
                var mu = [Double](repeating: 0, count: n * c)
                var variance = [Double](repeating: 0, count: n * c)
                for i in 0..<n {
                    for j in 0..<c {
                        let set = (i / samples) * blockCount + j / width
                        mu[i * c + j] = moments.mean[set]
                        variance[i * c + j] = moments.m2[set] / Double(moments.count[set])
                    }
                }
                componentMean.append(mu)
                componentVariance.append(variance)
                blocks.append(moments)
            }
        }
        let w = meanWeights.weights
        let wv = varianceWeights.weights
        var mean = [Double](repeating: 0, count: n * c)
        var rstd = [Double](repeating: 0, count: n * c)
        for s in 0..<(n * c) {
            var mu = 0.0
            var variance = 0.0
            for k in components.indices {
                mu += w[k] * componentMean[k][s]
                variance += wv[k] * componentVariance[k][s]
            }
            mean[s] = mu
            // ε = 0 on a set with no spread: x̂ = 0 (the output is β, no gradient), as the
            // standard layers define it, instead of PyTorch's 0/0.
            let denominator = max(variance, 0) + epsilon
            rstd[s] = denominator > 0 ? 1 / denominator.squareRoot() : 0
        }
        return Statistics(
            n: n, instanceMean: m, instanceVariance: v, componentMean: componentMean,
            componentVariance: componentVariance, blocks: blocks, mean: mean, rstd: rstd,
            meanWeights: meanWeights, varianceWeights: varianceWeights)
    }

    /// dL/dM, dL/dV and the logit gradients from the kernel's per-(n, c) sums Σg and
    /// Σg·(x − μ).
    /// - Throws: communication errors of the synchronized block-sum reduction.
    func backward(
        sumG: [Double], sumGD: [Double], statistics st: Statistics,
        communicator: (any Communicator)?
    ) throws(NormError) -> (
        dM: [Double], dV: [Double], meanLogits: [Double], varianceLogits: [Double]
    ) {
        let c = channelCount
        let n = st.n
        let count = n * c
        var dmu = [Double](repeating: 0, count: count)
        var dvar = [Double](repeating: 0, count: count)
        for s in 0..<count {
            let r = st.rstd[s]
            dmu[s] = -r * sumG[s]
            dvar[s] = -0.5 * r * r * r * sumGD[s]
        }
        let k = components.count
        var aMean = [Double](repeating: 0, count: k)
        var aVar = [Double](repeating: 0, count: k)
        for index in 0..<k {
            for s in 0..<count {
                aMean[index] += dmu[s] * st.componentMean[index][s]
                aVar[index] += dvar[s] * st.componentVariance[index][s]
            }
        }
        // Block sums Σ_B dμ, Σ_B dσ² of every batch-dependent component; the batch-pooling
        // ones are reduced over the ranks in one buffer.
        var sums: [(mu: [Double], variance: [Double])] = []
        var pooled: [Double] = []
        for (index, a) in components.enumerated() {
            guard st.blocks[index] != nil else {
                sums.append(([], []))
                continue
            }
            let (groups, samples, blockCount, width) = layout(a, n: n)
            var sMu = [Double](repeating: 0, count: groups * blockCount)
            var sVar = sMu
            for i in 0..<n {
                for j in 0..<c {
                    let set = (i / samples) * blockCount + j / width
                    sMu[set] += dmu[i * c + j]
                    sVar[set] += dvar[i * c + j]
                }
            }
            sums.append((sMu, sVar))
            if a.batch == .all { pooled += sMu + sVar }
        }
        if let communicator, !pooled.isEmpty {
            pooled = try Collective.allReduceSum(
                .success(pooled), length: pooled.count, operation: "\(layer) backward",
                over: communicator)
            var offset = 0
            for (index, a) in components.enumerated() where st.blocks[index] != nil {
                guard a.batch == .all else { continue }
                let length = sums[index].mu.count
                sums[index].mu = Array(pooled[offset..<(offset + length)])
                sums[index].variance = Array(pooled[(offset + length)..<(offset + 2 * length)])
                offset += 2 * length
            }
        }
        var dM = [Double](repeating: 0, count: count)
        var dV = [Double](repeating: 0, count: count)
        let w = st.meanWeights.weights
        let wv = st.varianceWeights.weights
        for (index, a) in components.enumerated() {
            guard let blocks = st.blocks[index] else { continue }
            let (_, samples, blockCount, width) = layout(a, n: n)
            let perBlock = blocks.count.indices.map { set -> (Double, Double) in
                let size = Double(blocks.count[set])
                return (
                    w[index] * sums[index].mu[set] / size,
                    wv[index] * sums[index].variance[set] / size
                )
            }
            for i in 0..<n {
                for j in 0..<c {
                    let s = i * c + j
                    let (m, v) = perBlock[(i / samples) * blockCount + j / width]
                    dM[s] += m + 2 * (st.instanceMean[s] - st.componentMean[index][s]) * v
                    dV[s] += v
                }
            }
        }
        return (
            dM, dV, st.meanWeights.logitGradient(aMean), st.varianceWeights.logitGradient(aVar)
        )
    }
}
