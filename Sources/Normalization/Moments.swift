import NormKernels

/// Per-set count, mean and sum of squared deviations (M2), mergeable exactly with Chan's
/// formula: the statistics of a concatenation from the statistics of its parts.
///
/// ```
/// n = n_a + n_b,   δ = μ_b − μ_a
/// μ = μ_a + δ·n_b/n,   M2 = M2_a + M2_b + δ²·n_a·n_b/n
/// ```
/// Merging never forms Σx² − n·μ², so data with |μ| ≫ σ (1000 + 0.05·noise) keeps its digits,
/// and parts of different sizes, including empty ones, merge to the statistics of the whole.
/// This is why synchronized BatchNorm all-*gathers* (count, mean, M2) instead of all-reducing
/// means: averaging means is wrong when ranks hold different numbers of samples, and averaging
/// variances ignores the spread between the ranks' means.
///
/// ## References
/// 1. Chan, Golub & LeVeque 1979, "Updating Formulae and a Pairwise Algorithm for Computing
///    Sample Variances", Stanford CS tech. report STAN-CS-79-773.
public struct Moments: Sendable, Equatable {
    /// Elements per set.
    public var count: [Int]
    /// μ per set (0 for an empty set).
    public var mean: [Double]
    /// Σ(x − μ)² per set.
    public var m2: [Double]

    /// Moments from their parts (arrays of equal length).
    public init(count: [Int], mean: [Double], m2: [Double]) {
        precondition(
            count.count == mean.count && mean.count == m2.count,
            "Moments need one count, mean and M2 per set.")
        self.count = count
        self.mean = mean
        self.m2 = m2
    }

    /// Empty moments for `setCount` sets.
    public init(setCount: Int) {
        self.init(
            count: [Int](repeating: 0, count: setCount),
            mean: [Double](repeating: 0, count: setCount),
            m2: [Double](repeating: 0, count: setCount))
    }

    /// Moments of sets of `count` elements each, from a kernel's mean and biased variance.
    public init(mean: [Double], biasedVariance: [Double], count: Int) {
        self.init(
            count: [Int](repeating: count, count: mean.count), mean: mean,
            m2: biasedVariance.map { $0 * Double(count) })
    }

    /// The number of sets.
    public var setCount: Int { count.count }

    /// Σ(x − μ)²/n per set (0 for an empty set).
    public var biasedVariance: [Double] {
        zip(m2, count).map { $1 > 0 ? $0 / Double($1) : 0 }
    }

    /// Σ(x − μ)²/(n − 1) per set (0 for a set of fewer than two elements).
    public var unbiasedVariance: [Double] {
        zip(m2, count).map { $1 > 1 ? $0 / Double($1 - 1) : 0 }
    }

    /// The moments of the concatenation of `self`'s sets with `other`'s (Chan's formula).
    public func merged(with other: Moments) -> Moments {
        precondition(other.setCount == setCount, "Merged moments need the same set count.")
        var result = self
        for s in 0..<setCount {
            let na = count[s]
            let nb = other.count[s]
            if nb == 0 { continue }
            if na == 0 {
                result.count[s] = nb
                result.mean[s] = other.mean[s]
                result.m2[s] = other.m2[s]
                continue
            }
            let n = Double(na + nb)
            let delta = other.mean[s] - mean[s]
            result.count[s] = na + nb
            result.mean[s] = mean[s] + delta * (Double(nb) / n)
            result.m2[s] = m2[s] + other.m2[s] + delta * delta * (Double(na) * Double(nb) / n)
        }
        return result
    }

    /// The moments of the concatenation of the parts, merged left to right (so every rank that
    /// merges the same gathered parts gets bit-identical results).
    public static func merging(_ parts: [Moments], setCount: Int) -> Moments {
        parts.reduce(Moments(setCount: setCount)) { $0.merged(with: $1) }
    }

    // MARK: - Exchange between ranks

    /// `[count…, mean…, M2…]`, the form the ranks exchange.
    public var packed: [Double] { count.map(Double.init) + mean + m2 }

    /// Moments from ``packed``; nil when the length is not a multiple of 3 or a count is not a
    /// non-negative integer.
    public init?(packed: [Double]) {
        guard packed.count % 3 == 0 else { return nil }
        let k = packed.count / 3
        var counts: [Int] = []
        counts.reserveCapacity(k)
        for value in packed[0..<k] {
            guard value >= 0, value < 9.0e15, value == value.rounded() else { return nil }
            counts.append(Int(value))
        }
        self.init(
            count: counts, mean: Array(packed[k..<(2 * k)]), m2: Array(packed[(2 * k)...]))
    }

    /// Every rank's moments merged in rank order: on every rank, the statistics of the batch
    /// made of all ranks' batches one after the other.
    /// - Parameter local: this rank's moments, or the error that stops it from taking part;
    ///   the error is rethrown here and every other rank throws
    ///   ``CommunicatorError/failedOnOtherRank(rank:reason:)``, so that no rank waits forever.
    /// - Throws: ``NormError/communication(_:)`` when ranks disagree on the set count, a rank
    ///   failed, or the transport failed.
    public static func allGathered(
        _ local: Result<Moments, NormError>, over communicator: any Communicator
    ) throws(NormError) -> Moments {
        let parts = try Collective.allGather(
            local.map(\.packed), operation: "gathering batch statistics", over: communicator)
        var moments: [Moments] = []
        for part in parts {
            guard let m = Moments(packed: part) else {
                throw .communication(
                    .mismatchedLengths(
                        operation: "gathering batch statistics", lengths: parts.map(\.count)))
            }
            moments.append(m)
        }
        guard let first = moments.first, moments.allSatisfy({ $0.setCount == first.setCount })
        else {
            throw .communication(
                .mismatchedLengths(
                    operation: "gathering batch statistics", lengths: parts.map(\.count)))
        }
        return merging(moments, setCount: first.setCount)
    }
}

/// Collectives that carry a failure flag, so that an error on one rank becomes an error on
/// every rank instead of a hang.
public enum Collective {
    /// Every rank's payload, in rank order; throws on every rank when any rank passed a failure.
    public static func allGather(
        _ local: Result<[Double], NormError>, operation: String, over communicator: any Communicator
    ) throws(NormError) -> [[Double]] {
        let message: [Double]
        switch local {
        case .success(let payload): message = [0] + payload
        case .failure(let error): message = [1] + error.description.utf8.map { Double($0) }
        }
        let all: [[Double]]
        do { all = try communicator.allGather(message) } catch { throw .communication(error) }
        if case .failure(let error) = local { throw error }
        for (rank, part) in all.enumerated() where part.first != 0 {
            let reason = String(
                decoding: part.dropFirst().map { UInt8(clamping: Int($0)) }, as: UTF8.self)
            throw .communication(.failedOnOtherRank(rank: rank, reason: reason))
        }
        return all.map { Array($0.dropFirst()) }
    }

    /// The element-wise sum of every rank's payload of `length` values; throws on every rank when
    /// any rank passed a failure (a failing rank contributes zeros and a flag).
    public static func allReduceSum(
        _ local: Result<[Double], NormError>, length: Int, operation: String,
        over communicator: any Communicator
    ) throws(NormError) -> [Double] {
        var buffer: [Double]
        switch local {
        case .success(let payload):
            guard payload.count == length else {
                // A length that differs would corrupt the reduction: report it as a failure.
                return try allReduceSum(
                    .failure(
                        .communication(
                            .mismatchedLengths(
                                operation: operation, lengths: [length, payload.count]))),
                    length: length, operation: operation, over: communicator)
            }
            buffer = [0] + payload
        case .failure:
            buffer = [1] + [Double](repeating: 0, count: length)
        }
        do { try communicator.allReduceSum(&buffer) } catch { throw .communication(error) }
        if case .failure(let error) = local { throw error }
        guard buffer[0] == 0 else {
            throw .communication(.failedOnSomeRank(operation: operation))
        }
        return Array(buffer.dropFirst())
    }
}
