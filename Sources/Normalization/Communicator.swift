import Foundation

/// The processes that share one training step: all-reduce, all-gather and broadcast of small
/// buffers, a barrier, and abort.
///
/// Synchronized statistics (``SyncBatchNorm``, Switchable Normalization and Batch
/// Renormalization with a communicator) and data-parallel training run through this protocol.
/// ``LocalCommunicator`` is the single process; `MPICommunicator` (module `NormMPI`, Open MPI)
/// is the real one, kept out of this module so that the library builds without MPI.
///
/// Every call is *collective*: every rank must make the same calls in the same order with
/// buffers of the same element type (and, for ``allReduceSum(_:)`` and ``broadcast(_:from:)``,
/// the same length). A rank that cannot take part must call ``abort(_:)``, which ends every
/// rank, instead of leaving the others waiting.
public protocol Communicator: AnyObject {
    /// This process's index, 0 ..< ``size``.
    var rank: Int { get }
    /// The number of processes.
    var size: Int { get }

    /// Replaces `buffer` on every rank by the element-wise sum over the ranks.
    func allReduceSum<T: CommunicatorScalar>(_ buffer: inout [T]) throws(CommunicatorError)

    /// Every rank's buffer, in rank order, on every rank; lengths may differ between ranks.
    func allGather<T: CommunicatorScalar>(_ buffer: [T]) throws(CommunicatorError) -> [[T]]

    /// Replaces `buffer` on every rank by the root's (every rank passes the same length).
    func broadcast<T: CommunicatorScalar>(_ buffer: inout [T], from root: Int)
        throws(CommunicatorError)

    /// Returns when every rank has called it.
    func barrier() throws(CommunicatorError)

    /// Ends every rank with the message on standard error (MPI_Abort); never returns.
    func abort(_ message: String, code: Int32) -> Never
}

extension Communicator {
    /// True on rank 0, the rank that prints and writes files.
    public var isRoot: Bool { rank == 0 }

    /// Ends every rank with exit code 1.
    public func abort(_ message: String) -> Never { abort(message, code: 1) }

    /// Checks that every rank holds the same value of a setting and throws, on every rank, an
    /// error naming the setting and each rank's value when they differ (a configuration that
    /// differs between ranks would otherwise hang or compute garbage).
    public func requireSameValue(_ value: String, of name: String) throws(CommunicatorError) {
        let bytes = Array(value.utf8).map { Int64($0) }
        let all = try allGather(bytes)
        let texts = all.map {
            String(decoding: $0.map { UInt8(truncatingIfNeeded: $0) }, as: UTF8.self)
        }
        guard texts.allSatisfy({ $0 == texts[0] }) else {
            throw .mismatchedConfiguration(name: name, values: texts)
        }
    }
}

/// The element types a communicator carries.
public protocol CommunicatorScalar: Sendable, Equatable, AdditiveArithmetic {
    /// The wire type.
    static var communicatorType: CommunicatorType { get }
}

/// Wire types of ``CommunicatorScalar``.
public enum CommunicatorType: Sendable, Hashable {
    /// 32-bit IEEE float.
    case float32
    /// 64-bit IEEE float.
    case float64
    /// 64-bit signed integer.
    case int64
}

extension Float: CommunicatorScalar {
    /// `.float32`.
    public static var communicatorType: CommunicatorType { .float32 }
}

extension Double: CommunicatorScalar {
    /// `.float64`.
    public static var communicatorType: CommunicatorType { .float64 }
}

extension Int64: CommunicatorScalar {
    /// `.int64`.
    public static var communicatorType: CommunicatorType { .int64 }
}

/// What can go wrong between processes.
public enum CommunicatorError: Error, Equatable, CustomStringConvertible {
    /// The transport reported an error (MPI's error string).
    case transport(operation: String, code: Int32, message: String)
    /// A rank or root index outside 0 ..< size.
    case invalidRank(Int, size: Int)
    /// A buffer too large for one message (MPI counts are 32-bit).
    case bufferTooLarge(count: Int)
    /// A setting differs between ranks.
    case mismatchedConfiguration(name: String, values: [String])
    /// Another rank reported an error in the same collective step.
    case failedOnOtherRank(rank: Int, reason: String)
    /// Some rank reported an error in an all-reduce (which does not say which).
    case failedOnSomeRank(operation: String)
    /// Ranks contributed buffers whose lengths do not fit together.
    case mismatchedLengths(operation: String, lengths: [Int])

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .transport(let operation, let code, let message):
            return "\(operation) failed (MPI error \(code)): \(message)"
        case .invalidRank(let rank, let size):
            return "rank \(rank) does not exist in a group of \(size) processes"
        case .bufferTooLarge(let count):
            return "a buffer of \(count) elements is too large for one message (at most 2³¹ − 1)"
        case .mismatchedConfiguration(let name, let values):
            let listed = values.enumerated().map { "rank \($0.offset): \($0.element)" }
            return "\(name) differs between ranks (" + listed.joined(separator: ", ") + ")"
        case .failedOnOtherRank(let rank, let reason):
            return "rank \(rank) failed: \(reason)"
        case .failedOnSomeRank(let operation):
            return "another rank failed during \(operation)"
        case .mismatchedLengths(let operation, let lengths):
            return "\(operation): the ranks' buffers do not match (lengths \(lengths)); "
                + "do all ranks have the same channel count?"
        }
    }
}

/// One process: every collective is the identity.
public final class LocalCommunicator: Communicator {
    /// Creates the single-process communicator.
    public init() {}

    /// 0.
    public var rank: Int { 0 }
    /// 1.
    public var size: Int { 1 }

    /// Leaves the buffer unchanged (the sum over one rank).
    public func allReduceSum<T: CommunicatorScalar>(_ buffer: inout [T]) throws(CommunicatorError) {
    }

    /// `[buffer]`.
    public func allGather<T: CommunicatorScalar>(_ buffer: [T]) throws(CommunicatorError) -> [[T]] {
        [buffer]
    }

    /// Leaves the buffer unchanged; the root must be 0.
    public func broadcast<T: CommunicatorScalar>(_ buffer: inout [T], from root: Int)
        throws(CommunicatorError)
    {
        guard root == 0 else { throw .invalidRank(root, size: 1) }
    }

    /// Returns at once.
    public func barrier() throws(CommunicatorError) {}

    /// Prints the message to standard error and exits with `code`.
    public func abort(_ message: String, code: Int32) -> Never {
        FileHandle.standardError.write(Data((message + "\n").utf8))
        exit(code)
    }
}
