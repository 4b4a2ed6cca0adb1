import CMPI
import Foundation
import Normalization

/// A ``Communicator`` over Open MPI's `MPI_COMM_WORLD`: the processes that `mpirun -np K`
/// started.
///
/// ```swift
/// let world = try MPICommunicator()           // MPI_Init (once per process)
/// defer { world.finalize() }                   // MPI_Finalize, after the last collective
/// var sums = [Double](repeating: 1, count: 8)
/// try world.allReduceSum(&sums)                // every element is now world.size
/// ```
/// The communicator asks MPI to return errors instead of aborting (`MPI_ERRORS_RETURN`), so a
/// failed call throws ``CommunicatorError/transport(operation:code:message:)`` with MPI's own
/// error string. ``abort(_:code:)`` ends every rank (`MPI_Abort`): call it when one rank cannot
/// go on, so that the others do not wait forever in their next collective.
///
/// Run with `mpirun --oversubscribe --allow-run-as-root -np K normkit …` (Open MPI refuses root
/// unless told, and more ranks than cores unless oversubscribed). Started without `mpirun`, MPI
/// initializes a single process of size 1 (singleton mode).
public final class MPICommunicator: Communicator {
    /// This process's rank in `MPI_COMM_WORLD`.
    public let rank: Int
    /// The number of processes in `MPI_COMM_WORLD`.
    public let size: Int
    let comm: MPI_Comm

    /// Initializes MPI when it is not yet initialized and wraps `MPI_COMM_WORLD`.
    /// - Throws: ``CommunicatorError/transport(operation:code:message:)`` when MPI cannot start
    ///   (or was already finalized in this process).
    public init() throws(CommunicatorError) {
        var initialized: Int32 = 0
        var finalized: Int32 = 0
        MPI_Initialized(&initialized)
        MPI_Finalized(&finalized)
        guard finalized == 0 else {
            throw .transport(
                operation: "MPI_Init", code: -1,
                message: "MPI was already finalized in this process and cannot restart")
        }
        if initialized == 0 {
            let code = MPI_Init(nil, nil)
            try Self.check(code, "MPI_Init")
        }
        comm = normkit_mpi_comm_world()
        try Self.check(
            MPI_Comm_set_errhandler(comm, normkit_mpi_errors_return()), "MPI_Comm_set_errhandler")
        var r: Int32 = 0
        var s: Int32 = 0
        try Self.check(MPI_Comm_rank(comm, &r), "MPI_Comm_rank")
        try Self.check(MPI_Comm_size(comm, &s), "MPI_Comm_size")
        rank = Int(r)
        size = Int(s)
    }

    /// True when this process was started by `mpirun`/`mpiexec` (Open MPI's or PMIx's
    /// environment variables are set), so a command can decide whether to start MPI at all.
    public static var isLaunchedByMPIRun: Bool {
        let environment = ProcessInfo.processInfo.environment
        return environment["OMPI_COMM_WORLD_SIZE"] != nil || environment["PMIX_RANK"] != nil
            || environment["PMI_RANK"] != nil
    }

    /// Ends MPI in this process (`MPI_Finalize`).
    ///
    /// Every rank must call it after its last collective; calling it twice does nothing.
    public func finalize() {
        var finalized: Int32 = 0
        MPI_Finalized(&finalized)
        if finalized == 0 { MPI_Finalize() }
    }

    // MARK: - Collectives

    /// `MPI_Allreduce(MPI_IN_PLACE, …, MPI_SUM)`.
    public func allReduceSum<T: CommunicatorScalar>(_ buffer: inout [T]) throws(CommunicatorError) {
        let count = try Self.messageCount(buffer.count)
        guard count > 0 else { return }
        let type = Self.datatype(T.self)
        let code = buffer.withUnsafeMutableBytes { bytes in
            MPI_Allreduce(
                normkit_mpi_in_place(), bytes.baseAddress, count, type, normkit_mpi_sum(), comm)
        }
        try Self.check(code, "MPI_Allreduce")
    }

    /// `MPI_Allgather` of the lengths, then `MPI_Allgatherv` of the data.
    public func allGather<T: CommunicatorScalar>(_ buffer: [T]) throws(CommunicatorError) -> [[T]] {
        var counts = [Int32](repeating: 0, count: size)
        var mine = try Self.messageCount(buffer.count)
        let lengthCode = counts.withUnsafeMutableBytes { all in
            withUnsafeMutableBytes(of: &mine) { one in
                MPI_Allgather(
                    one.baseAddress, 1, normkit_mpi_int(), all.baseAddress, 1, normkit_mpi_int(),
                    comm)
            }
        }
        try Self.check(lengthCode, "MPI_Allgather")
        var displacements = [Int32](repeating: 0, count: size)
        var total = 0
        for r in 0..<size {
            displacements[r] = try Self.messageCount(total)
            total += Int(counts[r])
        }
        _ = try Self.messageCount(total)
        guard total > 0 else { return [[T]](repeating: [], count: size) }
        var gathered = [T](repeating: .zero, count: total)
        let type = Self.datatype(T.self)
        let code = buffer.withUnsafeBytes { send in
            gathered.withUnsafeMutableBytes { receive in
                counts.withUnsafeBufferPointer { c in
                    displacements.withUnsafeBufferPointer { d in
                        MPI_Allgatherv(
                            send.baseAddress, mine, type, receive.baseAddress, c.baseAddress,
                            d.baseAddress, type, comm)
                    }
                }
            }
        }
        try Self.check(code, "MPI_Allgatherv")
        return (0..<size).map { r in
            let start = Int(displacements[r])
            return Array(gathered[start..<(start + Int(counts[r]))])
        }
    }

    /// `MPI_Bcast` from `root`.
    public func broadcast<T: CommunicatorScalar>(_ buffer: inout [T], from root: Int)
        throws(CommunicatorError)
    {
        guard root >= 0, root < size else { throw .invalidRank(root, size: size) }
        let count = try Self.messageCount(buffer.count)
        guard count > 0 else { return }
        let type = Self.datatype(T.self)
        let code = buffer.withUnsafeMutableBytes { bytes in
            MPI_Bcast(bytes.baseAddress, count, type, Int32(root), comm)
        }
        try Self.check(code, "MPI_Bcast")
    }

    /// `MPI_Barrier`.
    public func barrier() throws(CommunicatorError) {
        try Self.check(MPI_Barrier(comm), "MPI_Barrier")
    }

    /// Prints `rank R: message` to standard error and ends every rank (`MPI_Abort`).
    public func abort(_ message: String, code: Int32) -> Never {
        FileHandle.standardError.write(Data("rank \(rank): \(message)\n".utf8))
        MPI_Abort(comm, code)
        exit(code)
    }

    // MARK: - Helpers

    static func datatype<T: CommunicatorScalar>(_: T.Type) -> MPI_Datatype {
        switch T.communicatorType {
        case .float32: return normkit_mpi_float()
        case .float64: return normkit_mpi_double()
        case .int64: return normkit_mpi_int64()
        }
    }

    static func messageCount(_ count: Int) throws(CommunicatorError) -> Int32 {
        guard count >= 0, count <= Int(Int32.max) else { throw .bufferTooLarge(count: count) }
        return Int32(count)
    }

    static func check(_ code: Int32, _ operation: String) throws(CommunicatorError) {
        guard code != normkit_mpi_success() else { return }
        var text = [CChar](repeating: 0, count: Int(normkit_mpi_max_error_string()) + 1)
        var length: Int32 = 0
        MPI_Error_string(code, &text, &length)
        let message = String(
            decoding: text.prefix(Int(length)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        throw .transport(operation: operation, code: code, message: message)
    }
}
