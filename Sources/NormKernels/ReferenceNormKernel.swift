/// The plain reference implementation of every standardization-type normalizer: any
/// reduction plan, centering and/or scaling, biased or unbiased variance, optional affine.
///
/// All arithmetic is done in `Double` whatever the storage type, so a `Float` tensor is
/// normalized as accurately as a float64 reference up to the final rounding. Statistics use two
/// passes (mean, then the sum of squared deviations) because the one-pass E[x²] − E[x]² cancels
/// catastrophically when |μ| ≫ σ (an input 1000 + 0.05·noise loses every significant digit).
///
/// The fast kernels of `NormKernels` are checked against this one.
public enum ReferenceNormKernel {
    /// What the operation Φ does within each reduction set.
    public struct Operation: Sendable, Hashable {
        /// Subtract the set mean μ.
        public var centers: Bool
        /// Divide by √(σ² + ε) (or by the RMS √(E[x²] + ε) when not centering).
        public var scales: Bool
        /// Use the unbiased variance Σ(x − μ)²/(m − 1) inside the square root.
        public var unbiased: Bool
        /// ε, added inside the square root.
        public var epsilon: Double

        /// Creates an operation description.
        public init(centers: Bool, scales: Bool, unbiased: Bool = false, epsilon: Double) {
            self.centers = centers
            self.scales = scales
            self.unbiased = unbiased
            self.epsilon = epsilon
        }
    }

    /// Per-set statistics in `Double`.
    public struct Moments: Sendable, Equatable {
        /// μ per set (0 when the operation does not center).
        public var mean: [Double]
        /// The variance per set as normalized by (biased or unbiased per the operation; E[x²]
        /// for RMS scaling; 0 when the operation does not scale).
        public var variance: [Double]
        /// The biased variance Σ(x − μ)²/m per set (what running estimates start from).
        public var biasedVariance: [Double]

        /// Creates moments from arrays of equal length.
        public init(mean: [Double], variance: [Double], biasedVariance: [Double]) {
            self.mean = mean
            self.variance = variance
            self.biasedVariance = biasedVariance
        }
    }

    /// Computes the statistics of every reduction set by two passes in `Double`.
    ///
    /// - Parameters:
    ///   - x: the input, `setIndex.count` elements.
    ///   - setIndex: the statistic each element belongs to (``ReductionPlan/setIndices()``).
    ///   - setCount: number of sets.
    ///   - operation: what is computed (mean only, RMS, or mean and variance).
    public static func moments<T: BinaryFloatingPoint>(
        _ x: UnsafeBufferPointer<T>, setIndex: [Int], setCount: Int, operation: Operation
    ) -> Moments {
        var counts = [Int](repeating: 0, count: setCount)
        var sums = [Double](repeating: 0, count: setCount)
        for i in 0..<x.count {
            counts[setIndex[i]] += 1
            sums[setIndex[i]] += Double(x[i])
        }
        var mean = [Double](repeating: 0, count: setCount)
        for s in 0..<setCount where counts[s] > 0 { mean[s] = sums[s] / Double(counts[s]) }
        // Second pass: squared deviations from the exact mean (or raw squares for RMS).
        var squares = [Double](repeating: 0, count: setCount)
        var rawSquares = [Double](repeating: 0, count: setCount)
        for i in 0..<x.count {
            let s = setIndex[i]
            let d = Double(x[i]) - mean[s]
            squares[s] += d * d
            if operation.scales && !operation.centers {
                rawSquares[s] += Double(x[i]) * Double(x[i])
            }
        }
        var variance = [Double](repeating: 0, count: setCount)
        var biased = [Double](repeating: 0, count: setCount)
        for s in 0..<setCount where counts[s] > 0 {
            let m = Double(counts[s])
            biased[s] = squares[s] / m
            if operation.scales {
                if operation.centers {
                    variance[s] = operation.unbiased ? squares[s] / (m - 1) : biased[s]
                } else {
                    variance[s] = rawSquares[s] / m
                }
            }
        }
        if !operation.centers { mean = [Double](repeating: 0, count: setCount) }
        return Moments(mean: mean, variance: variance, biasedVariance: biased)
    }

    /// 1/√(σ² + ε) per set, or 1 when the operation does not scale.
    ///
    /// A set whose σ² + ε is exactly 0 (ε = 0 and no spread, e.g. a running variance of 0 in
    /// inference) gets 0: x̂ = 0, the output is β, as the training path defines it (PyTorch gives
    /// NaN). NaN stays NaN.
    public static func reciprocalStandardDeviation(
        variance: [Double], operation: Operation
    ) -> [Double] {
        guard operation.scales else { return [Double](repeating: 1, count: variance.count) }
        return variance.map { reciprocalStandardDeviation($0, epsilon: operation.epsilon) }
    }

    /// One set's 1/√(σ² + ε): 0 where σ² + ε is exactly 0 (x̂ = 0, output β), NaN for NaN.
    ///
    /// The one place this rule is written for the reference, mixture and Kalman paths.
    @inlinable
    public static func reciprocalStandardDeviation(_ variance: Double, epsilon: Double) -> Double {
        let denominator = variance + epsilon
        return denominator == 0 ? 0 : 1 / denominator.squareRoot()
    }

    /// The forward pass `y = γ ⊙ (x − μ)·rstd + β`.
    ///
    /// - Parameters:
    ///   - x: input (`setIndex.count` elements).
    ///   - setIndex: statistic index per element.
    ///   - mean, rstd: per-set statistics (μ = 0 and rstd = 1 where Φ does not use them).
    ///   - scale, offset: γ and β (nil: 1 and 0), indexed by `parameterIndexing`.
    ///   - y: overwritten with the output.
    public static func forward<T: BinaryFloatingPoint>(
        _ x: UnsafeBufferPointer<T>, setIndex: [Int], mean: [Double], rstd: [Double],
        scale: UnsafeBufferPointer<T>?, offset: UnsafeBufferPointer<T>?,
        parameterIndexing: ParameterIndexing?, into y: UnsafeMutableBufferPointer<T>
    ) {
        for i in 0..<x.count {
            let s = setIndex[i]
            var v = (Double(x[i]) - mean[s]) * rstd[s]
            if let p = parameterIndexing?(i) {
                if let scale { v *= Double(scale[p]) }
                if let offset { v += Double(offset[p]) }
            }
            y[i] = T(v)
        }
    }

    /// The backward pass: input gradient and the affine parameters' gradients.
    ///
    /// With g = dy ⊙ γ (γ broadcast *before* reducing), x̂ = (x − μ)·rstd, and within each set
    /// of m elements (d = m, or m − 1 for the unbiased variance):
    /// ```
    /// standardize: dx = rstd · (g − mean(g) − x̂ · Σ(g x̂)/d)
    /// RMS scale:   dx = rstd · (g − x̂ · mean(g x̂))
    /// center:      dx = g − mean(g)
    /// constant statistics (inference, frozen): dx = rstd · g
    /// dγ = Σ dy ⊙ x̂,  dβ = Σ dy   (over every element that shares the parameter)
    /// ```
    /// - Parameters:
    ///   - statisticsAreConstant: true when μ and rstd did not come from `x` (running
    ///     statistics), so no gradient flows through them.
    ///   - dx: overwritten. `scaleGradient`, `offsetGradient`: overwritten (one entry per
    ///     parameter).
    public static func backward<T: BinaryFloatingPoint>(
        _ x: UnsafeBufferPointer<T>, outputGradient dy: UnsafeBufferPointer<T>,
        setIndex: [Int], setCount: Int, mean: [Double], rstd: [Double], operation: Operation,
        statisticsAreConstant: Bool, scale: UnsafeBufferPointer<T>?,
        parameterIndexing: ParameterIndexing?,
        inputGradient dx: UnsafeMutableBufferPointer<T>,
        scaleGradient: inout [Double], offsetGradient: inout [Double]
    ) {
        let modulus = parameterIndexing?.modulus ?? 0
        scaleGradient = [Double](repeating: 0, count: modulus)
        offsetGradient = [Double](repeating: 0, count: modulus)
        var counts = [Int](repeating: 0, count: setCount)
        var sumG = [Double](repeating: 0, count: setCount)
        var sumGXhat = [Double](repeating: 0, count: setCount)
        // Pass 1: parameter gradients and the two per-set sums.
        for i in 0..<x.count {
            let s = setIndex[i]
            let xhat = (Double(x[i]) - mean[s]) * rstd[s]
            var g = Double(dy[i])
            if let p = parameterIndexing?(i) {
                scaleGradient[p] += g * xhat
                offsetGradient[p] += g
                if let scale { g *= Double(scale[p]) }
            }
            counts[s] += 1
            sumG[s] += g
            sumGXhat[s] += g * xhat
        }
        // Pass 2: the input gradient.
        for i in 0..<x.count {
            let s = setIndex[i]
            var g = Double(dy[i])
            if let p = parameterIndexing?(i), let scale { g *= Double(scale[p]) }
            if statisticsAreConstant || (!operation.centers && !operation.scales) {
                dx[i] = T(g * rstd[s])
                continue
            }
            let m = Double(counts[s])
            let xhat = (Double(x[i]) - mean[s]) * rstd[s]
            var v = g
            if operation.centers { v -= sumG[s] / m }
            if operation.scales {
                let divisor = operation.centers && operation.unbiased ? m - 1 : m
                v -= xhat * sumGXhat[s] / divisor
            }
            dx[i] = T(v * rstd[s])
        }
    }
}

extension ReferenceNormKernel {
    /// Per-set Σg and Σg·(x − μ) (g = dy·γ), and dγ = Σ dy·x̂, dβ = Σ dy, in Double.
    public static func gradientSums<T: BinaryFloatingPoint>(
        _ x: UnsafeBufferPointer<T>, outputGradient dy: UnsafeBufferPointer<T>, setIndex: [Int],
        setCount: Int, mean: [Double], rstd: [Double], scale: UnsafeBufferPointer<T>?,
        parameterIndexing: ParameterIndexing?
    ) -> FastNormKernel.GradientSums {
        let modulus = parameterIndexing?.modulus ?? 0
        var sums = FastNormKernel.GradientSums(
            sumG: [Double](repeating: 0, count: setCount),
            sumGD: [Double](repeating: 0, count: setCount),
            scaleGradient: [Double](repeating: 0, count: modulus),
            offsetGradient: [Double](repeating: 0, count: modulus))
        for i in 0..<x.count {
            let s = setIndex[i]
            let d = Double(x[i]) - mean[s]
            var g = Double(dy[i])
            if let p = parameterIndexing?(i) {
                sums.scaleGradient[p] += g * d * rstd[s]
                sums.offsetGradient[p] += g
                if let scale { g *= Double(scale[p]) }
            }
            sums.sumG[s] += g
            sums.sumGD[s] += g * d
        }
        return sums
    }

    /// dx = A·g + B·(x − μ) + C with per-set A, B, C, μ (g = dy·γ), in Double.
    public static func applyGradient<T: BinaryFloatingPoint>(
        _ x: UnsafeBufferPointer<T>, outputGradient dy: UnsafeBufferPointer<T>, setIndex: [Int],
        mean: [Double], a: [Double], b: [Double], c: [Double], scale: UnsafeBufferPointer<T>?,
        parameterIndexing: ParameterIndexing?, into dx: UnsafeMutableBufferPointer<T>
    ) {
        for i in 0..<x.count {
            let s = setIndex[i]
            var g = Double(dy[i])
            if let p = parameterIndexing?(i), let scale { g *= Double(scale[p]) }
            dx[i] = T(a[s] * g + b[s] * (Double(x[i]) - mean[s]) + c[s])
        }
    }
}
