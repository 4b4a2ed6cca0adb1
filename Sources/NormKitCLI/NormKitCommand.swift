import ArgumentParser

/// The `normkit` command-line tool: a thin layer of argument parsing over the libraries.
public struct NormKitCommand: ParsableCommand {
    /// The subcommands and help text.
    public static let configuration = CommandConfiguration(
        commandName: "normkit",
        abstract: "Normalization layers for deep learning: apply, check and explore them.",
        subcommands: [
            DemoCommand.self, TrainCommand.self, ApplyCommand.self, TourCommand.self,
            BenchCommand.self, WeightsCommand.self, StudyCommand.self,
        ]
    )

    /// Creates the command.
    public init() {}
}
