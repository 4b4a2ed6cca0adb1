import Foundation
import NormKit

/// One training call of a synchronized layer with the batch split over the ranks, gathered so
/// that rank 0 holds exactly what one process computes on the whole batch: the library side of
/// `mpirun -np K normkit apply LAYER --sync [--shard-sizes 3,0,5] …`.
///
/// Every rank holds the full input (and output gradient); rank r takes the r-th contiguous
/// slice of the batch axis, the layer synchronizes its statistics through the communicator,
/// and the slices of y and dx are gathered in rank order. Parameter gradients (local in
/// synchronized layers, as in PyTorch) are summed over the ranks in one all-reduce. Running
/// statistics are identical on every rank afterwards, so rank 0's layer holds the updated
/// parameters and buffers that a single process would hold.
public enum ShardedApply {
    /// What rank 0 receives.
    public struct Result<Scalar: NormScalar>: Sendable {
        /// y for the whole batch.
        public var output: Tensor<Scalar>
        /// dx for the whole batch, when an output gradient was given.
        public var inputGradient: Tensor<Scalar>?
        /// Parameter gradients summed over the ranks, by `state_dict` key.
        public var parameterGradients: [String: Tensor<Scalar>]
    }

    /// The shard sizes of a batch: `spec` as `3,0,5` (one non-negative size per rank, summing
    /// to the batch), or, when nil, as even as possible (the first `batch % ranks` ranks take
    /// one more).
    /// - Throws: ``ShardError`` naming what does not fit.
    public static func shardSizes(batch: Int, ranks: Int, spec: String?) throws(ShardError)
        -> [Int]
    {
        guard ranks >= 1 else { throw .invalid("there must be at least one rank") }
        guard let spec else {
            return (0..<ranks).map { batch / ranks + ($0 < batch % ranks ? 1 : 0) }
        }
        var sizes: [Int] = []
        for part in spec.split(separator: ",", omittingEmptySubsequences: false) {
            guard let size = Int(part.trimmingCharacters(in: .whitespaces)), size >= 0 else {
                throw .invalid("'\(spec)' is not a comma-separated list of sizes ≥ 0")
            }
            sizes.append(size)
        }
        guard sizes.count == ranks else {
            throw .invalid("'\(spec)' has \(sizes.count) sizes for \(ranks) ranks")
        }
        var total = 0
        for size in sizes {
            let (sum, overflow) = total.addingReportingOverflow(size)
            guard !overflow else { throw .invalid("the sizes in '\(spec)' overflow") }
            total = sum
        }
        guard total == batch else {
            throw .invalid("the sizes in '\(spec)' add up to \(total), the batch has \(batch)")
        }
        return sizes
    }

    /// Rows `start ..< start + count` of the batch axis.
    public static func slice<Scalar: NormScalar>(_ x: Tensor<Scalar>, start: Int, count: Int)
        throws -> Tensor<Scalar>
    {
        precondition(x.rank >= 1 && start >= 0 && count >= 0 && start + count <= x.shape[0])
        let row = x.shape.dropFirst().reduce(1, *)
        var shape = x.shape
        shape[0] = count
        return try Tensor(
            shape: shape, scalars: Array(x.scalars[(start * row)..<((start + count) * row)]))
    }

    /// Runs one call of a synchronized layer on this rank's slice and gathers the results.
    ///
    /// - Parameters:
    ///   - input: the whole batch, the same on every rank.
    ///   - outputGradient: dL/dy for the whole batch (the same on every rank), or nil for a
    ///     forward call only.
    ///   - shardSizes: one size per rank (``shardSizes(batch:ranks:spec:)``).
    ///   - communicator: the ranks; the layer must already synchronize over it.
    ///   - forward: the layer's training forward on a slice.
    ///   - backward: the layer's backward for that call: dx and parameter gradients by key.
    /// - Returns: the gathered results on rank 0, nil on the other ranks.
    public static func run<Scalar: NormScalar>(
        input: Tensor<Scalar>, outputGradient: Tensor<Scalar>?, shardSizes: [Int],
        communicator: any Communicator,
        forward: (Tensor<Scalar>) throws -> Tensor<Scalar>,
        backward: (Tensor<Scalar>) throws -> (
            input: Tensor<Scalar>, parameters: [String: Tensor<Scalar>]
        )
    ) throws -> Result<Scalar>? {
        guard shardSizes.count == communicator.size, input.rank >= 1,
            shardSizes.reduce(0, +) == input.shape[0]
        else {
            throw ShardError.invalid(
                "shard sizes \(shardSizes) do not split a batch of \(input.shape.first ?? 0) over "
                    + "\(communicator.size) ranks")
        }
        if let outputGradient, outputGradient.shape != input.shape {
            throw NormError.gradientShapeMismatch(
                expected: input.shape, actual: outputGradient.shape)
        }
        let rank = communicator.rank
        let start = shardSizes[..<rank].reduce(0, +)
        let x = try slice(input, start: start, count: shardSizes[rank])
        let y = try forward(x)
        let output = try gather(y, like: input, over: communicator)
        guard let outputGradient else {
            return rank == 0
                ? Result(output: output, inputGradient: nil, parameterGradients: [:]) : nil
        }
        let g = try backward(try slice(outputGradient, start: start, count: shardSizes[rank]))
        let dx = try gather(g.input, like: input, over: communicator)
        let summed = try sumOverRanks(g.parameters, over: communicator)
        return rank == 0
            ? Result(output: output, inputGradient: dx, parameterGradients: summed) : nil
    }

    /// Concatenates every rank's slice along the batch axis, in rank order.
    static func gather<Scalar: NormScalar>(
        _ part: Tensor<Scalar>, like whole: Tensor<Scalar>, over communicator: any Communicator
    ) throws -> Tensor<Scalar> {
        // Exchanged as float64: exact for Float and Double alike.
        let parts = try communicator.allGather(part.scalars.map(Double.init))
        return try Tensor(shape: whole.shape, rounding: parts.flatMap { $0 })
    }

    /// Sums tensors by key over the ranks in ONE all-reduce (keys sorted; every rank must hold
    /// the same keys and shapes).
    public static func sumOverRanks<Scalar: NormScalar>(
        _ tensors: [String: Tensor<Scalar>], over communicator: any Communicator
    ) throws -> [String: Tensor<Scalar>] {
        let keys = tensors.keys.sorted()
        try communicator.requireSameValue(
            keys.map { "\($0)\(tensors[$0]!.shape)" }.joined(separator: ";"),
            of: "parameter gradients")
        var buffer = keys.flatMap { tensors[$0]!.scalars.map(Double.init) }
        try communicator.allReduceSum(&buffer)
        var out: [String: Tensor<Scalar>] = [:]
        var offset = 0
        for key in keys {
            let t = tensors[key]!
            out[key] = try Tensor(
                shape: t.shape, rounding: Array(buffer[offset..<(offset + t.count)]))
            offset += t.count
        }
        return out
    }
}

/// A shard specification that does not fit the batch or the ranks.
public enum ShardError: Error, Equatable, CustomStringConvertible {
    /// What is wrong, in words.
    case invalid(String)

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .invalid(let text): return "--shard-sizes: \(text)"
        }
    }
}
