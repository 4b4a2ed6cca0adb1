/// Fast Float kernels (SIMD and threads) for every standardization whose reduction sets have
/// one of two memory shapes; anything else runs on ``ReferenceNormKernel``.
///
/// ```
/// rows:     [rows, length], set of row r = r mod setCount   (LayerNorm, RMSNorm, InstanceNorm and
///           GroupNorm NCHW, BatchNorm NCHW as [N·C, H·W] with setCount = C, LayerNorm2d NHWC)
/// columns:  [outer, mid, inner], reduce mid (and outer when reduceOuter), sets of groupWidth
///           consecutive inner indices (BatchNorm, InstanceNorm and GroupNorm NHWC, LayerNorm2d NCHW)
/// ```
/// Each set is processed whole by one thread: statistics, then the output, while its data is
/// still in cache (x is read from memory once where a set fits in cache). Statistics are shifted
/// sums Σ(x − s), Σ(x − s)² with s the set's first element, accumulated in Float blocks and
/// Double totals; when s turns out far from the mean (more than two standard deviations) the
/// set is summed again around its mean, so a large offset or an outlier first element never
/// costs accuracy. The affine is folded into y = a·(x − s) + b per set and channel, with the
/// shift kept apart from `a·x` so that offset data does not cancel. Work is split in chunks
/// fixed by the problem size and partial parameter gradients merge in chunk order, so results
/// do not depend on the thread count.
///
/// Checked against ``ReferenceNormKernel`` on awkward sizes in both layouts.
public enum FastNormKernel {
    /// How the reduction sets and γ lie in memory.
    public enum Geometry: Sendable, Hashable {
        /// `count` contiguous rows of `length`; row r belongs to set `r % setCount`.
        case rows(count: Int, length: Int, setCount: Int, gamma: RowGamma)
        /// `[outer, mid, inner]`, reducing `mid` (and `outer` when `reduceOuter`); a set is
        /// `groupWidth` consecutive inner indices (per outer index unless `reduceOuter`).
        case columns(
            outer: Int, mid: Int, inner: Int, groupWidth: Int, reduceOuter: Bool, gamma: ColumnGamma
        )
    }

    /// Where γ varies in a row geometry.
    public enum RowGamma: Sendable, Hashable {
        /// No γ.
        case none
        /// Constant over segments of `segment` elements: γ index of element j of row r is
        /// `(r % cycle)·(length / segment) + j / segment`.
        case segments(cycle: Int, segment: Int)
        /// One γ per element: index `(r % cycle)·length + j`.
        case elementwise(cycle: Int)
    }

    /// Where γ varies in a column geometry.
    public enum ColumnGamma: Sendable, Hashable {
        /// No γ.
        case none
        /// γ[inner index] (channels-last channel affine).
        case alongInner
        /// γ[mid index] (channel affine when the channel axis is the reduced one).
        case alongMid
    }

    /// Recognises a plan and parameter layout the fast kernels handle, or returns nil.
    ///
    /// - Parameters:
    ///   - plan: the reduction plan.
    ///   - parameters: how elements map to γ and β (nil without affine parameters).
    public static func geometry(for plan: ReductionPlan, parameters: ParameterIndexing?)
        -> Geometry?
    {
        // Merge adjacent axes with the same flag, dropping size-1 axes.
        var blocks: [(size: Int, reduced: Bool)] = []
        for (size, reduced) in zip(plan.viewShape, plan.reduced) where size != 1 {
            if let last = blocks.last, last.reduced == reduced {
                blocks[blocks.count - 1].size *= size
            } else {
                blocks.append((size, reduced))
            }
        }
        let total = plan.elementCount
        guard total > 0 else { return nil }
        if blocks.isEmpty { blocks = [(1, true)] }
        let pattern = blocks.map(\.reduced)
        switch pattern {
        case [true], [false, true], [true, false, true]:
            // Rows: [kept, reduced] or [reduced A, kept K, reduced L] as rows (a, k) of length L.
            let length = blocks.last!.size
            let rows = total / length
            let setCount = pattern == [true, false, true] ? blocks[1].size : rows
            guard let gamma = rowGamma(parameters, length: length) else { return nil }
            return .rows(count: rows, length: length, setCount: setCount, gamma: gamma)
        case [true, false], [false, true, false], [false, true, false, true]:
            // Columns: the last kept block is contiguous; an optional trailing reduced block is a
            // group width (GroupNorm channels-last).
            let hasGroups = pattern.last == true
            let groupWidth = hasGroups ? blocks.last!.size : 1
            let keptInner = hasGroups ? blocks[blocks.count - 2].size : blocks.last!.size
            let inner = keptInner * groupWidth
            let reduceOuter = pattern.first == true
            let outer = reduceOuter ? 1 : blocks[0].size
            let mid = total / (outer * inner)
            let gamma: ColumnGamma
            if let p = parameters {
                if p.divisor == 1 && p.modulus == inner {
                    gamma = .alongInner
                } else if p.divisor == inner && p.modulus == mid && !reduceOuter {
                    gamma = .alongMid
                } else {
                    return nil
                }
            } else {
                gamma = .none
            }
            return .columns(
                outer: outer, mid: mid, inner: inner, groupWidth: groupWidth,
                reduceOuter: reduceOuter, gamma: gamma)
        default:
            return nil
        }
    }

    static func rowGamma(_ p: ParameterIndexing?, length: Int) -> RowGamma? {
        guard let p else { return RowGamma.none }
        if p.divisor == 1 {
            // Elementwise γ repeating every `modulus` elements, a multiple of the row length.
            guard p.modulus % length == 0 else { return nil }
            return .elementwise(cycle: p.modulus / length)
        }
        guard length % p.divisor == 0 else { return nil }
        let segmentsPerRow = length / p.divisor
        guard p.modulus % segmentsPerRow == 0 else { return nil }
        return .segments(cycle: p.modulus / segmentsPerRow, segment: p.divisor)
    }

    /// What forward computed per set, in Double.
    public struct Statistics: Sendable, Equatable {
        /// Mean per set (0 where the operation does not center).
        public var mean: [Double]
        /// The variance the operation divides by (biased, unbiased, or E[x²] for RMS).
        public var variance: [Double]
        /// Σ(x − μ)²/m per set.
        public var biasedVariance: [Double]
        /// 1/√(variance + ε) (1 where the operation does not scale).
        public var rstd: [Double]

        /// Creates statistics from arrays of equal length.
        public init(mean: [Double], variance: [Double], biasedVariance: [Double], rstd: [Double]) {
            self.mean = mean
            self.variance = variance
            self.biasedVariance = biasedVariance
            self.rstd = rstd
        }

        /// Zero means and variances and unit rstd for `setCount` sets, to be filled in.
        init(setCount: Int) {
            self.init(
                mean: [Double](repeating: 0, count: setCount),
                variance: [Double](repeating: 0, count: setCount),
                biasedVariance: [Double](repeating: 0, count: setCount),
                rstd: [Double](repeating: 1, count: setCount))
        }
    }

    /// Per-set gradient sums: Σg and Σg·(x − μ) with g = dy·γ, and the affine parameters'
    /// gradients dγ = Σ dy·x̂, dβ = Σ dy (x̂ = (x − μ)·rstd).
    public struct GradientSums: Sendable, Equatable {
        /// Σ g per set.
        public var sumG: [Double]
        /// Σ g·(x − μ) per set.
        public var sumGD: [Double]
        /// dγ per parameter.
        public var scaleGradient: [Double]
        /// dβ per parameter.
        public var offsetGradient: [Double]

        /// Creates sums from arrays.
        public init(
            sumG: [Double], sumGD: [Double], scaleGradient: [Double], offsetGradient: [Double]
        ) {
            self.sumG = sumG
            self.sumGD = sumGD
            self.scaleGradient = scaleGradient
            self.offsetGradient = offsetGradient
        }
    }

    /// Mean, variance for Φ, biased variance and rstd of a set of n elements from its shifted
    /// sums; `inverseCount` = 1/n (multiplications: a short row pays for every division).
    @inline(__always)
    static func finish(
        n: Int, inverseCount: Double, shift: Float, s1: Double, s2: Double,
        operation op: ReferenceNormKernel.Operation
    ) -> (mean: Double, variance: Double, biased: Double, rstd: Double) {
        let meanShift = s1 * inverseCount
        let m2 = max(s2 - s1 * meanShift, 0)
        let mean = Double(shift) + meanShift
        let biased = m2 * inverseCount
        var variance = 0.0
        if op.scales {
            variance = op.centers ? (op.unbiased ? m2 / Double(n - 1) : biased) : s2 * inverseCount
        }
        let rstd = op.scales ? 1 / (variance + op.epsilon).squareRoot() : 1
        return (op.centers ? mean : 0, variance, biased, rstd)
    }

    /// True when the shift lies more than two standard deviations from the mean (sum again):
    /// (Σd/n)² > 4·M2/n ⇔ (Σd)² > 4·n·M2 with M2 = Σd² − (Σd)²/n.
    @inline(__always)
    static func shiftIsFar(n: Int, inverseCount: Double, s1: Double, s2: Double) -> Bool {
        let square = s1 * s1
        let m2 = max(s2 - square * inverseCount, 0)
        return square > 4 * Double(n) * m2 && s1 != 0
    }
}
