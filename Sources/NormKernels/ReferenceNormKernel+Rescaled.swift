extension ReferenceNormKernel {
    /// Which sets' statistics cannot be trusted because a sum overflowed or underflowed: a
    /// non-finite mean, a non-finite or zero rstd, or (when ε cannot hide it) a variance so
    /// small that its squares may have underflowed.
    ///
    /// - Parameter tinyVariance: below this a variance may be an underflow of the storage
    ///   type's squares (`1e-30` for Float accumulators, `1e-290` for Double).
    /// - Returns: one flag per set, or nil when every set is fine (the common case).
    public static func setsNeedingRescale(
        mean: [Double], variance: [Double], rstd: [Double], operation op: Operation,
        tinyVariance: Double
    ) -> [Bool]? {
        var flags: [Bool]?
        for s in 0..<mean.count {
            var bad = !mean[s].isFinite
            if op.scales {
                bad =
                    bad || !variance[s].isFinite || !rstd[s].isFinite || rstd[s] == 0
                    || (variance[s] < tinyVariance && op.epsilon < 1e6 * tinyVariance)
            }
            if bad {
                if flags == nil { flags = [Bool](repeating: false, count: mean.count) }
                flags![s] = true
            }
        }
        return flags
    }

    /// Recomputes the flagged sets on x / c, with c the power of two at or just below the set's
    /// largest |x|, so that no sum over the set can overflow or underflow, and rewrites their
    /// statistics and output.
    ///
    /// This is the rare path beside the fast kernels (compare swift-numerics' rescaled
    /// division): it runs only for sets whose statistics ``setsNeedingRescale(mean:variance:rstd:operation:tinyVariance:)``
    /// flagged, so Float inputs around 1e19…3e38 and Double inputs around 1e160…1e308 (and
    /// their tiny counterparts) normalize as accurately as moderate ones.
    ///
    /// A set that holds a NaN or an infinity is left as computed (NaN propagates, as in
    /// PyTorch). A set whose σ² + ε is exactly 0 (ε = 0 and a constant set) gets x̂ = 0 and
    /// rstd = 0: its output is β, and no gradient flows to its inputs.
    ///
    /// - Parameters:
    ///   - x: the input; `setIndex`, `setCount` as for ``moments(_:setIndex:setCount:operation:)``.
    ///   - flags: the sets to recompute.
    ///   - mean, variance, biasedVariance, rstd: the statistics, overwritten for flagged sets
    ///     (in x's units; a variance beyond Double's range becomes +∞ while rstd stays exact).
    ///   - y: overwritten for the elements of flagged sets.
    public static func rescaleSets<T: BinaryFloatingPoint>(
        _ x: UnsafeBufferPointer<T>, setIndex: [Int], setCount: Int, flags: [Bool],
        operation op: Operation, scale: UnsafeBufferPointer<T>?, offset: UnsafeBufferPointer<T>?,
        parameterIndexing: ParameterIndexing?,
        mean: inout [Double], variance: inout [Double], biasedVariance: inout [Double],
        rstd: inout [Double], into y: UnsafeMutableBufferPointer<T>
    ) {
        var largest = [Double](repeating: 0, count: setCount)
        var finite = [Bool](repeating: true, count: setCount)
        var counts = [Int](repeating: 0, count: setCount)
        for i in 0..<x.count where flags[setIndex[i]] {
            let s = setIndex[i]
            let v = Double(x[i])
            if !v.isFinite { finite[s] = false }
            largest[s] = max(largest[s], abs(v))
            counts[s] += 1
        }
        // c = 2^k ≤ max|x| < 2c: dividing by it is exact, and c itself is finite even for
        // |x| near the largest Double (2^(k+1) would be 2^1024 = ∞ there, and x/∞ = 0).
        let c = largest.map {
            $0 > 0 && $0.isFinite ? Double(sign: .plus, exponent: $0.exponent, significand: 1) : 1
        }
        var sums = [Double](repeating: 0, count: setCount)
        for i in 0..<x.count where flags[setIndex[i]] {
            sums[setIndex[i]] += Double(x[i]) / c[setIndex[i]]
        }
        var scaledMean = [Double](repeating: 0, count: setCount)
        for s in 0..<setCount where flags[s] && counts[s] > 0 {
            scaledMean[s] = sums[s] / Double(counts[s])
        }
        var squares = [Double](repeating: 0, count: setCount)
        var raw = [Double](repeating: 0, count: setCount)
        for i in 0..<x.count where flags[setIndex[i]] {
            let s = setIndex[i]
            let u = Double(x[i]) / c[s]
            let d = u - scaledMean[s]
            squares[s] += d * d
            raw[s] += u * u
        }
        var scaledRstd = [Double](repeating: 1, count: setCount)
        for s in 0..<setCount where flags[s] && finite[s] && counts[s] > 0 {
            let m = Double(counts[s])
            let biased = squares[s] / m
            var v = 0.0
            if op.scales {
                if op.centers {
                    v = op.unbiased ? (m > 1 ? squares[s] / (m - 1) : .nan) : biased
                } else {
                    v = raw[s] / m
                }
                // ε/c², divided twice: c² alone can underflow (c ≈ 1e-300) or overflow.
                let denominator = v + op.epsilon / c[s] / c[s]
                scaledRstd[s] = denominator > 0 ? 1 / denominator.squareRoot() : 0
            }
            mean[s] = op.centers ? scaledMean[s] * c[s] : 0
            variance[s] = v * c[s] * c[s]
            biasedVariance[s] = biased * c[s] * c[s]
            rstd[s] = op.scales ? scaledRstd[s] / c[s] : 1
        }
        for i in 0..<x.count {
            let s = setIndex[i]
            guard flags[s], finite[s] else { continue }
            let u = Double(x[i]) / c[s]
            var v = op.centers ? (u - scaledMean[s]) * scaledRstd[s] : u * scaledRstd[s]
            if !op.scales { v *= c[s] }
            if scaledRstd[s] == 0 { v = 0 }
            if let p = parameterIndexing?(i) {
                if let scale { v *= Double(scale[p]) }
                if let offset { v += Double(offset[p]) }
            }
            y[i] = T(v)
        }
    }
}
