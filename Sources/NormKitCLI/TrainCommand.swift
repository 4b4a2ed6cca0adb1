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

    @Option(
        help:
            "digits (shipped UCI digits), shapes (procedural) or fashion-mnist (Debian's dataset-fashion-mnist); default digits."
    ) var dataset: String?
    @Option(help: "Use only the first N training examples.") var trainCount: Int?
    @Option(help: "Use only the first N test examples.") var testCount: Int?
    @Option(help: "convnet or resnet; default convnet.") var model: String?
    @Option(
        help:
            "Any name --list-normalizers prints, a short preset (bn, gn, ln, in, sn, ssn, brn, ibn, meta, kn), or none; default bn."
    ) var normalizer: String?
    @Flag(help: "Print the registry's activation-normalizer names, one per line, and exit.")
    var listNormalizers = false
    @Option(help: "Weight normalization of the convolutions: none, wn, cwn, ws, ws-bit or sn.")
    var weightNorm = "none"
    @Option(
        help:
            "Whitened convolutions and classifier: none (default), wnn, gwnn or eigennet (convnet only)."
    ) var whitenLayers: String?
    @Option(help: "Steps between whitening refreshes T (default 100).") var whitenEvery: Int?
    @Option(help: "Whitened dimension k of each layer, capped at the layer's (default: all).")
    var whitenRank: Int?
    @Option(help: "gwnn: steps between data passes for the input statistics (default 10·T).")
    var whitenDataEvery: Int?
    @Option(
        help:
            "Gradient normalization of every weight: none (default), scale, standardize or whiten.")
    var gradNorm: String?
    @Option(help: "Ψ, the factor applied after gradient normalization (default 1).")
    var gradNormScale: Double?
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
    @Option(
        help:
            "Time N SGD steps on one fixed batch after 5 warm-up steps, print one JSON line (examples_per_s) and exit."
    ) var benchmarkSteps: Int?
    @Flag(
        inversion: .prefixedNo,
        help: """
            Under mpirun: BatchNorm statistics (bn, sn, ssn, brn, ibn) over the global batch \
            of every rank (SyncBN), or over each rank's slice (the default).
            """)
    var syncBn = false

    func run() throws {
        if listNormalizers {
            for entry in NormalizerRegistry.all.entries where entry.trainable {
                print(entry.name)
            }
            return
        }
        if let threads {
            try checkThreads(threads)
            Parallelism.maximumThreads = threads
            BLAS.setThreads(threads)
        }
        if let benchmarkSteps {
            do { try SizeLimits.checkRepeats(benchmarkSteps, name: "--benchmark-steps") } catch {
                throw ValidationError(error.description)
            }
        }
        // The outputs are checked before training: a run must not end in an unwritable path.
        _ = try OutputSet([checkpoint] + (metrics.map { [$0] } ?? []))
        try Distributed.run { world in try train(world) }
    }

    /// Trains with the processes of this run: rank 0 prints and writes files; every rank takes
    /// the same steps (data parallel, one fused gradient all-reduce per step).
    func train(_ world: any Communicator) throws {
        func print(_ items: Any..., terminator: String = "\n") {
            guard world.isRoot else { return }
            Swift.print(items.map { "\($0)" }.joined(separator: " "), terminator: terminator)
        }
        let trainer: Trainer
        if let resume {
            trainer = try Trainer.resume(
                from: resume, communicator: world, synchronizeBatchStatistics: syncBn)
            // The checkpoint's configuration wins, but a contradiction is an error, not a
            // silent switch to another network.
            let stored = trainer.config
            for (flag, requested, actual) in [
                ("--normalizer", normalizer, stored.normalizer), ("--model", model, stored.model),
                ("--dataset", dataset, stored.dataset),
                ("--whiten-layers", whitenLayers, stored.whitenLayers ?? "none"),
                ("--grad-norm", gradNorm, stored.gradNorm ?? "none"),
            ] {
                if let requested, requested != actual {
                    throw TrainingError.checkpoint(
                        "\(resume) trains \(actual), but \(flag) \(requested) was requested")
                }
            }
        } else {
            var c = TrainingConfig()
            c.dataset = dataset ?? c.dataset
            c.model = model ?? c.model
            c.normalizer = normalizer ?? c.normalizer
            c.weightNorm = weightNorm == "none" ? nil : weightNorm
            c.batchSize = batchSize
            c.epochs = epochs
            c.learningRate = learningRate
            c.momentum = momentum
            c.weightDecay = weightDecay
            c.schedule = schedule
            c.seed = seed
            c.trainCount = trainCount
            c.testCount = testCount
            c.whitenLayers = whitenLayers == "none" ? nil : whitenLayers
            c.whitenEvery = whitenEvery
            c.whitenRank = whitenRank
            c.whitenDataEvery = whitenDataEvery
            c.gradNorm = gradNorm == "none" ? nil : gradNorm
            c.gradNormScale = gradNormScale
            trainer = try Trainer(c, communicator: world, synchronizeBatchStatistics: syncBn)
        }
        let c = trainer.config
        if let benchmarkSteps {
            try printBenchmark(trainer, steps: benchmarkSteps, threads: threads)
            return
        }
        print(
            "training \(c.model) with \(c.normalizer) on \(c.dataset): \(trainer.train.count) train / \(trainer.test.count) test, batch \(c.batchSize), \(c.epochs) epochs, lr \(c.learningRate)"
        )
        if world.size > 1 {
            let slices = try ShardedApply.shardSizes(
                batch: c.batchSize, ranks: world.size, spec: nil)
            let statistics = syncBn ? "synchronized" : "per-rank"
            print(
                "data parallel on \(world.size) ranks (batch slices \(slices)), \(statistics) "
                    + "BatchNorm statistics")
        }
        signal(SIGINT) { _ in interruptRequested = 1 }
        defer { signal(SIGINT, SIG_DFL) }
        let terminal = isatty(STDOUT_FILENO) != 0 && world.isRoot
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
        if world.isRoot {
            try trainer.saveCheckpoint(to: checkpoint)
            if let metrics { try MetricsFile.write(trainer.history, to: metrics) }
        }
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

extension TrainCommand {
    /// `--benchmark-steps`: one JSON line, keys as `bench/train_torch.py` prints them.
    func printBenchmark(_ trainer: Trainer, steps: Int, threads: Int?) throws {
        let (rate, perStep) = try trainer.benchmark(steps: steps)
        let c = trainer.config
        let fields: [(String, String)] = [
            ("framework", "\"normkit\""), ("model", "\"\(c.model)\""),
            ("dataset", "\"\(c.dataset)\""), ("normalizer", "\"\(c.normalizer)\""),
            ("input_shape", "\(trainer.train.imageShape)"), ("batch_size", "\(c.batchSize)"),
            ("threads", "\(threads ?? Parallelism.maximumThreads)"), ("steps", "\(steps)"),
            ("ms_per_step", String(format: "%.3f", perStep * 1000)),
            ("examples_per_s", String(format: "%.1f", rate)),
        ]
        print("{" + fields.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}")
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
        try OutputFile.write(text, to: path)
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
            try checkThreads(threads)
            Parallelism.maximumThreads = threads
        }
        BLAS.setThreads(1)  // small GEMMs: OpenBLAS's threads cost more than they give here
        // The report folder is checked before the run, which takes minutes.
        try Self.checkReportFolder(output)
        let plan: Experiments.Plan = quick ? .quick : .full
        let results = weightNormOnly ? nil : try Experiments.run(plan, seed: seed) { print($0) }
        let weights = try WeightNormStudy.run(quick ? .quick : .full, seed: seed) { print($0) }
        do {
            try FileManager.default.createDirectory(
                atPath: output, withIntermediateDirectories: true)
        } catch { throw FileFormatError.io(path: output, reason: "the folder cannot be created") }
        let markdown =
            (results.map { Report.markdown($0) + "\n" } ?? "") + WeightNormStudy.markdown(weights)
        var page =
            results.map {
                Report.html($0).replacingOccurrences(
                    of: "</body></html>",
                    with: WeightNormStudy.htmlSection(weights) + "</body></html>")
            } ?? WeightNormStudy.html(weights)
        // The page announces how many charts it holds (the CI page check compares): count them
        // after the weight-normalization section is added.
        let charts = page.components(separatedBy: "<svg class=\"chart\"").count - 1
        page = page.replacingOccurrences(
            of: #"<meta name="normkit-charts" content="\d+">"#,
            with: "<meta name=\"normkit-charts\" content=\"\(charts)\">",
            options: .regularExpression)
        var files = try OutputSet([output + "/index.html", output + "/summary.md"])
        files.stage(page, to: output + "/index.html")
        files.stage(markdown, to: output + "/summary.md")
        try files.commit()
        print("\n" + markdown)
        print("report written to \(output)/index.html")
    }

    /// Refuses a report folder that is an existing file or cannot be created.
    static func checkReportFolder(_ output: String) throws {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: output, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else {
                throw FileFormatError.io(
                    path: output, reason: "it is a file; --output names the report's folder")
            }
            try OutputFile.checkWritable(output + "/index.html")
        } else {
            // The folder is created with its parents; the nearest existing one must be writable.
            var parent = output
            repeat {
                parent = parent.contains("/") ? String(parent[..<parent.lastIndex(of: "/")!]) : "."
                if parent.isEmpty { parent = "/" }
            } while !FileManager.default.fileExists(atPath: parent, isDirectory: &isDirectory)
            guard isDirectory.boolValue, FileManager.default.isWritableFile(atPath: parent) else {
                throw FileFormatError.io(
                    path: output, reason: "its folder cannot be created under '\(parent)'")
            }
        }
    }
}
