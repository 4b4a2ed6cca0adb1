import ArgumentParser
import Foundation
import NormKit
import Studies
import Training

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Set by SIGINT; the training loop checks it between steps.
nonisolated(unsafe) var interruptRequested: sig_atomic_t = 0

/// `normkit train`: one network, one normalizer, checkpoints that resume exactly.
struct TrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train", abstract: "Train a small network with any normalizer in every slot.")

    @Option(help: "digits (shipped UCI digits) or shapes (procedural).") var dataset = "digits"
    @Option(help: "convnet or resnet.") var model = "convnet"
    @Option(
        help:
            "Any name --list-normalizers prints, a short preset (bn, gn, ln, in, sn, ssn, brn, ibn, meta, kn), or none."
    ) var normalizer = "bn"
    @Flag(help: "Print the registry's activation-normalizer names, one per line, and exit.")
    var listNormalizers = false
    @Option(help: "Weight normalization of the convolutions: none, wn, cwn, ws, ws-bit or sn.")
    var weightNorm = "none"
    @Option(help: "Examples per step.") var batchSize = 32
    @Option(help: "Epochs.") var epochs = 5
    @Option(name: .customLong("lr"), help: "Base learning rate.") var learningRate = 0.05
    @Option(help: "SGD momentum.") var momentum = 0.9
    @Option(help: "Weight decay.") var weightDecay = 5e-4
    @Option(help: "constant, cosine or step.") var schedule = "cosine"
    @Option(help: "Seed of weights, split and shuffling.") var seed: UInt64 = 1
    @Option(help: "Threads (kernels and BLAS).") var threads: Int?
    @Option(help: "Write per-epoch metrics here (.csv or .json).") var metrics: String?
    @Option(help: "Checkpoint file written at the end and on Ctrl-C.") var checkpoint =
        "normkit-checkpoint.safetensors"
    @Option(help: "Continue from this checkpoint (its configuration wins).") var resume: String?

    func run() throws {
        if listNormalizers {
            for entry in NormalizerRegistry.all.entries where entry.trainable {
                print(entry.name)
            }
            return
        }
        if let threads {
            guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
            Parallelism.maximumThreads = threads
            BLAS.setThreads(threads)
        }
        let trainer: Trainer
        if let resume {
            trainer = try Trainer.resume(from: resume)
        } else {
            var c = TrainingConfig()
            c.dataset = dataset
            c.model = model
            c.normalizer = normalizer
            c.weightNorm = weightNorm == "none" ? nil : weightNorm
            c.batchSize = batchSize
            c.epochs = epochs
            c.learningRate = learningRate
            c.momentum = momentum
            c.weightDecay = weightDecay
            c.schedule = schedule
            c.seed = seed
            trainer = try Trainer(c)
        }
        let c = trainer.config
        print(
            "training \(c.model) with \(c.normalizer) on \(c.dataset): \(trainer.train.count) train / \(trainer.test.count) test, batch \(c.batchSize), \(c.epochs) epochs, lr \(c.learningRate)"
        )
        signal(SIGINT) { _ in interruptRequested = 1 }
        defer { signal(SIGINT, SIG_DFL) }
        let terminal = isatty(STDOUT_FILENO) != 0
        let finished = try trainer.run(
            progress: { event in
                switch event {
                case .step(let epoch, let step, let of, let loss):
                    if terminal && (step % 5 == 0 || step == of) {
                        let width = 30
                        let filled = width * step / of
                        let bar =
                            String(repeating: "█", count: filled)
                            + String(repeating: "·", count: width - filled)
                        print(
                            "\r  epoch \(epoch) [\(bar)] \(step)/\(of) loss \(String(format: "%.4f", loss))",
                            terminator: "")
                        fflush(nil)
                    }
                case .epoch(let m):
                    if terminal { print("") }
                    print(
                        "epoch \(m.epoch): train loss \(String(format: "%.4f", m.trainLoss)), test loss \(String(format: "%.4f", m.testLoss)), "
                            + "test error \(String(format: "%.2f%%", 100 * m.testError)), \(String(format: "%.0f", m.examplesPerSecond)) examples/s"
                    )
                }
            }, shouldStop: { interruptRequested != 0 })
        try trainer.saveCheckpoint(to: checkpoint)
        if let metrics { try MetricsFile.write(trainer.history, to: metrics) }
        for slot in trainer.slots {
            if let w = slot.importanceWeights {
                let fmt: ([Double]) -> String = { v in
                    zip(w.components, v).map { "\($0) \(String(format: "%.2f", $1))" }.joined(
                        separator: " ")
                }
                print("\(slot.name): mean \(fmt(w.mean)); variance \(fmt(w.variance))")
            }
        }
        if !finished {
            print(
                "\ninterrupted: checkpoint written to \(checkpoint); continue with --resume \(checkpoint)"
            )
            throw ExitCode(130)
        }
        print("checkpoint written to \(checkpoint)")
    }
}

/// Per-epoch metrics as CSV or JSON.
enum MetricsFile {
    static func write(_ history: [EpochMetrics], to path: String) throws {
        let text: String
        if path.hasSuffix(".json") {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            text = String(decoding: try encoder.encode(history), as: UTF8.self)
        } else {
            text =
                "epoch,train_loss,test_loss,test_error,examples_per_second\n"
                + history.map {
                    "\($0.epoch),\($0.trainLoss),\($0.testLoss),\($0.testError),\($0.examplesPerSecond)"
                }
                .joined(separator: "\n") + "\n"
        }
        do { try text.write(toFile: path, atomically: true, encoding: .utf8) } catch {
            throw FileFormatError.io(path: path, reason: "it cannot be written")
        }
    }
}

/// `normkit demo`: the literature's headline results on shipped data, as a report.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract:
            "Batch-size robustness, learned normalizer choices and BN's optimisation effect, as a report."
    )

    @Flag(help: "A short version (well under a minute).") var quick = false
    @Flag(help: "Run only the weight-normalization study (WS + GN vs BN, spectral norm).")
    var weightNormOnly = false
    @Option(help: "Folder of the report (index.html, summary.md).") var output = "report"
    @Option(help: "Threads.") var threads: Int?
    @Option(help: "Seed.") var seed: UInt64 = 1

    func run() throws {
        if let threads {
            guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
            Parallelism.maximumThreads = threads
        }
        BLAS.setThreads(1)  // small GEMMs: OpenBLAS's threads cost more than they give here
        let plan: Experiments.Plan = quick ? .quick : .full
        let results = weightNormOnly ? nil : try Experiments.run(plan, seed: seed) { print($0) }
        let weights = try WeightNormStudy.run(quick ? .quick : .full, seed: seed) { print($0) }
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        let markdown =
            (results.map { Report.markdown($0) + "\n" } ?? "") + WeightNormStudy.markdown(weights)
        let page =
            results.map {
                Report.html($0).replacingOccurrences(
                    of: "</body></html>",
                    with: WeightNormStudy.htmlSection(weights) + "</body></html>")
            } ?? WeightNormStudy.html(weights)
        do {
            try page.write(toFile: output + "/index.html", atomically: true, encoding: .utf8)
            try markdown.write(toFile: output + "/summary.md", atomically: true, encoding: .utf8)
        } catch { throw FileFormatError.io(path: output, reason: "the report cannot be written") }
        print("\n" + markdown)
        print("report written to \(output)/index.html")
    }
}
