/// Which elements of a tensor share one statistic: a view of the tensor's shape and the
/// axes of that view that are reduced.
///
/// Every partition Π of the normalization literature is a reshape (a *view*, which never moves
/// data) followed by a reduction over some axes of the view:
///
/// ```
/// BatchNorm  [N, C, H, W]        reduce {0, 2, 3}   → statistics [C]
/// GroupNorm  [N, G, C/G, H, W]   reduce {2, 3, 4}   → statistics [N, G]
/// LayerNorm  [N, T, D]           reduce {2}         → statistics [N, T]
/// ```
///
/// Statistics are numbered in row-major order over the kept axes of the view.
public struct ReductionPlan: Sendable, Hashable {
    /// The shape the tensor is viewed as (same element count, same memory order).
    public let viewShape: [Int]
    /// `reduced[axis]` is true when `axis` of the view is reduced.
    public let reduced: [Bool]

    /// Creates a plan; `reduced` must have one entry per view axis.
    public init(viewShape: [Int], reduced: [Bool]) {
        precondition(viewShape.count == reduced.count, "One reduce flag is needed per view axis.")
        self.viewShape = viewShape
        self.reduced = reduced
    }

    /// The number of elements.
    public var elementCount: Int { viewShape.reduce(1, *) }
    /// The number of elements that share one statistic (m).
    public var setSize: Int {
        zip(viewShape, reduced).reduce(1) { $0 * ($1.1 ? $1.0 : 1) }
    }
    /// The number of statistics (reduction sets).
    public var setCount: Int {
        zip(viewShape, reduced).reduce(1) { $0 * ($1.1 ? 1 : $1.0) }
    }
    /// The shape of the statistics: the kept axes of the view, in order.
    public var statisticShape: [Int] {
        zip(viewShape, reduced).compactMap { $0.1 ? nil : $0.0 }
    }

    /// The same view with more axes reduced.
    public func reducing(_ axes: [Int]) -> ReductionPlan {
        var flags = reduced
        for axis in axes { flags[axis] = true }
        return ReductionPlan(viewShape: viewShape, reduced: flags)
    }

    /// For every element (row-major), the index of the statistic it belongs to.
    ///
    /// - Complexity: O(elementCount · rank); used by the reference path only.
    public func setIndices() -> [Int] {
        let rank = viewShape.count
        // Stride of each view axis in the statistic table (0 on reduced axes).
        var setStrides = [Int](repeating: 0, count: rank)
        var running = 1
        for axis in stride(from: rank - 1, through: 0, by: -1) where !reduced[axis] {
            setStrides[axis] = running
            running *= viewShape[axis]
        }
        let count = elementCount
        var result = [Int](repeating: 0, count: count)
        guard count > 0 else { return result }
        var index = [Int](repeating: 0, count: rank)
        var set = 0
        for flat in 0..<count {
            result[flat] = set
            // Advance the multi-index like an odometer, keeping `set` in step.
            var axis = rank - 1
            while axis >= 0 {
                index[axis] += 1
                set += setStrides[axis]
                if index[axis] < viewShape[axis] { break }
                set -= setStrides[axis] * index[axis]
                index[axis] = 0
                axis -= 1
            }
        }
        return result
    }
}

/// Maps a flat element index to the index of its affine parameter:
/// `(flat / divisor) % modulus`.
///
/// A per-channel γ along an axis with stride `s` and size `C` is `(s, C)`; an elementwise γ over
/// the trailing `P` elements is `(1, P)`.
public struct ParameterIndexing: Sendable, Hashable {
    /// Elements between consecutive parameters.
    public let divisor: Int
    /// Number of parameters.
    public let modulus: Int

    /// Creates the mapping `(flat / divisor) % modulus`.
    public init(divisor: Int, modulus: Int) {
        precondition(divisor > 0 && modulus > 0, "Parameter indexing needs positive sizes.")
        self.divisor = divisor
        self.modulus = modulus
    }

    /// The parameter index of an element.
    @inlinable
    public func callAsFunction(_ flat: Int) -> Int { (flat / divisor) % modulus }
}
