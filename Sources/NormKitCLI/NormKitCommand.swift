import ArgumentParser
import NormKit

/// The `normkit` command-line tool: a thin layer of argument parsing over the libraries.
public struct NormKitCommand: ParsableCommand {
    /// The subcommands and help text.
    public static let configuration = CommandConfiguration(
        commandName: "normkit",
        abstract: "Normalization layers for deep learning: apply, check and explore them.",
        subcommands: [
            DemoCommand.self, TrainCommand.self, ApplyCommand.self, TourCommand.self,
            BenchCommand.self, WeightsCommand.self, StudyCommand.self, SyncCheckCommand.self,
            SyncBenchCommand.self,
        ]
    )

    /// Creates the command.
    public init() {}
}

/// `--threads`: refused outside 1…``Parallelism/requestLimit`` with the limit named.
func checkThreads(_ threads: Int?) throws {
    guard let threads else { return }
    guard (1...Parallelism.requestLimit).contains(threads) else {
        throw ValidationError("--threads must lie in 1…\(Parallelism.requestLimit); got \(threads)")
    }
}
