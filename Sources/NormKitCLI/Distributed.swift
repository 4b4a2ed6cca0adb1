import ArgumentParser
import NormKit
import NormMPI

/// How a command meets MPI: the world communicator under `mpirun`, one process otherwise.
enum Distributed {
    /// Runs `body` with the processes of this run.
    ///
    /// Started by `mpirun`/`mpiexec`, MPI is initialized and `body` gets `MPI_COMM_WORLD`; an
    /// error on any rank then ends every rank (`MPI_Abort`, with the rank and the message on
    /// standard error) instead of leaving the others waiting in their next collective, and
    /// MPI is finalized after a successful run. Started without them, MPI is never touched and
    /// `body` gets a ``LocalCommunicator``.
    static func run(_ body: (any Communicator) throws -> Void) throws {
        guard MPICommunicator.isLaunchedByMPIRun else {
            try body(LocalCommunicator())
            return
        }
        let world = try MPICommunicator()
        do {
            try body(world)
        } catch let exit as ExitCode {
            // A deliberate exit (Ctrl-C agreed by every rank in the same step): no abort.
            world.finalize()
            throw exit
        } catch {
            if world.size > 1 { world.abort("\(error)", code: 1) }
            world.finalize()
            throw error
        }
        world.finalize()
    }
}
