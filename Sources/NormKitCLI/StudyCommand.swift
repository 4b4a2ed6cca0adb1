import ArgumentParser
import Foundation
import NormKit
import Studies
import Training

/// `normkit study NAME`: one of the literature studies, with seeds, written as CSV, JSON
/// and an HTML report.
struct StudyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "study",
        abstract:
            "Reproduce a normalization paper's claim on real data, with seeds and error bars.",
        discussion:
            "NAME: \(StudyName.allCases.map(\.rawValue).joined(separator: ", ")), or all. Writes DIR/NAME.csv, DIR/NAME.json and DIR/report.html (every study in DIR)."
    )

    @Argument(
        help: "The study: batch-size, switchable, landscape, ablation, regularization, ngd or all.")
    var name: String
    @Flag(help: "Minutes per study (the default).") var quick = false
    @Flag(help: "The paper-shaped grid (about 45 minutes for all six on one core).") var full =
        false
    @Option(help: "Seeds per configuration (at least 3 for a spread).") var seeds = 3
    @Option(help: "Folder for the report (created if missing; other files are kept).") var output =
        "study-report"
    @Option(help: "fashion-mnist, digits or shapes.") var dataset = "fashion-mnist"
    @Option(help: "Use only the first N training examples.") var trainCount: Int?
    @Option(help: "Use only the first N test examples.") var testCount: Int?
    @Option(help: "Epochs per run.") var epochs: Int?
    @Option(help: "Channels of the network's first layer.") var width: Int?
    @Option(help: "Threads.") var threads: Int?
    @Flag(
        help:
            "regularization: also train PN + ζ(h), ζ estimated per channel (normalizers-spec section 9)."
    ) var estimatedZeta = false

    func run() throws {
        let names: [StudyName]
        if name == "all" {
            names = StudyName.allCases
        } else if let n = StudyName(rawValue: name) {
            names = [n]
        } else {
            throw ValidationError(
                "unknown study '\(name)'; known: \(StudyName.allCases.map(\.rawValue).joined(separator: ", ")), all"
            )
        }
        guard !(quick && full) else { throw ValidationError("choose --quick or --full, not both") }
        guard seeds >= 1 else { throw ValidationError("--seeds must be at least 1") }
        for (flag, value) in [
            ("--train-count", trainCount), ("--test-count", testCount), ("--epochs", epochs),
            ("--width", width),
        ] {
            if let value, value < 1 { throw ValidationError("\(flag) must be at least 1") }
        }
        if let width, width > TrainingConfig.Limits.width {
            throw ValidationError("--width must be at most \(TrainingConfig.Limits.width)")
        }
        if let threads {
            try checkThreads(threads)
            Parallelism.maximumThreads = threads
        }
        BLAS.setThreads(1)  // small GEMMs: OpenBLAS's threads cost more than they give here
        var options = StudyOptions()
        options.scale = full ? .full : .quick
        options.seeds = seeds
        options.dataset = dataset
        options.trainCount = trainCount
        options.testCount = testCount
        options.epochs = epochs
        options.width = width
        options.estimatedZeta = estimatedZeta
        try StudyReport.prepare(names, in: output)  // a bad --output fails before training
        for n in names {
            let result = try Studies.run(n, options: options) { print($0) }
            let page = try StudyReport.write(result, to: output)
            print("\(n.rawValue) (\(String(format: "%.0f", result.seconds)) s): \(result.headline)")
            print("report written to \(page)")
        }
    }
}
