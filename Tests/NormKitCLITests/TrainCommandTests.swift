import Foundation
import NormKit
import Testing
import Training

@testable import NormKitCLI

/// `normkit train` and `normkit demo` end to end, in-process: flags, files and refusals (moved
/// here from TrainingTests so that the training tests depend on the libraries only).
@Suite("Train and demo commands", .serialized)
struct TrainCommandTests {
    @Test func badFlagsAreRefusedBeforeTraining() throws {
        let dir = NSTemporaryDirectory() + "flags-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for flags in [
            ["--momentum", "nan"], ["--momentum", "5"], ["--weight-decay=-1"],
            ["--weight-decay", "nan"], ["--lr", "nan"], ["--epochs", "300000000000000000"],
        ] {
            var command = try NormKitCommand.parseAsRoot(
                ["train", "--checkpoint", dir + "/c.safetensors"] + flags)
            #expect(throws: TrainingError.self, "\(flags)") { try command.run() }
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
    }

    @Test func resumingWithAnotherNormalizerIsRefused() throws {
        let path = NSTemporaryDirectory() + "mismatch-\(UUID().uuidString).safetensors"
        defer { try? FileManager.default.removeItem(atPath: path) }
        // One epoch with the default normalizer (bn) writes the checkpoint.
        var first = try NormKitCommand.parseAsRoot([
            "train", "--epochs", "1", "--batch-size", "128", "--checkpoint", path,
        ])
        try first.run()
        let written = FileManager.default.contents(atPath: path)
        var command = try NormKitCommand.parseAsRoot([
            "train", "--resume", path, "--normalizer", "gn", "--checkpoint", path,
        ])
        #expect(throws: TrainingError.self) { try command.run() }
        #expect(written != nil)
        #expect(FileManager.default.contents(atPath: path) == written)
    }

    @Test func quickDemoWritesAReport() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "demo-\(UUID().uuidString)"
        ).path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var command = try NormKitCommand.parseAsRoot(["demo", "--quick", "--output", dir])
        try command.run()
        let html = try String(contentsOfFile: dir + "/index.html", encoding: .utf8)
        #expect(html.contains("<svg") && html.contains("Test error by batch size"))
        let summary = try String(contentsOfFile: dir + "/summary.md", encoding: .utf8)
        #expect(summary.contains("| bn |"))
    }

    @Test func unwritableOutputsAreRefusedBeforeTheRun() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "outputs-\(UUID().uuidString)"
        ).path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let clock = ContinuousClock()
        // An epoch count that would take hours shows that the refusal comes first.
        var train = try NormKitCommand.parseAsRoot([
            "train", "--epochs", "100000", "--checkpoint", dir + "/missing/c.safetensors",
        ])
        let elapsed = clock.measure {
            #expect(throws: FileFormatError.self) { try train.run() }
        }
        #expect(elapsed < .seconds(5))
        var metrics = try NormKitCommand.parseAsRoot([
            "train", "--epochs", "100000", "--checkpoint", dir + "/c.safetensors", "--metrics",
            dir,
        ])
        #expect(throws: FileFormatError.self) { try metrics.run() }
        try Data([1]).write(to: URL(fileURLWithPath: dir + "/file"))
        var demo = try NormKitCommand.parseAsRoot(["demo", "--output", dir + "/file"])
        #expect(
            throws: FileFormatError.io(
                path: dir + "/file", reason: "it is a file; --output names the report's folder")
        ) { try demo.run() }
        var nested = try NormKitCommand.parseAsRoot(["demo", "--output", dir + "/file/report"])
        #expect(throws: FileFormatError.self) { try nested.run() }
        #expect(!FileManager.default.fileExists(atPath: dir + "/c.safetensors"))
    }

    @Test func trainCommandWritesMetricsAndCheckpoint() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "train-\(UUID().uuidString)"
        ).path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var command = try NormKitCommand.parseAsRoot([
            "train", "--epochs", "1", "--batch-size", "128", "--normalizer", "gn", "--metrics",
            dir + "/m.csv",
            "--checkpoint", dir + "/c.safetensors",
        ])
        try command.run()
        let csv = try String(contentsOfFile: dir + "/m.csv", encoding: .utf8)
        #expect(csv.hasPrefix("epoch,train_loss,test_loss,test_error,examples_per_second\n1,"))
        #expect(FileManager.default.fileExists(atPath: dir + "/c.safetensors"))
        var bad = try NormKitCommand.parseAsRoot([
            "train", "--normalizer", "xx", "--checkpoint", dir + "/d.safetensors",
        ])
        #expect(throws: TrainingError.self) { try bad.run() }
    }

    /// `normkit train` with GWNN layers refreshed every 2 steps at rank 4 and standardized
    /// gradients: one epoch on a tiny subset runs, its checkpoint keeps every layer's rank-4
    /// whitening, and bad whitening values are refused before training with errors naming them.
    @Test func whitenedTrainingRunsAndBadWhiteningValuesAreRefused() throws {
        let dir = NSTemporaryDirectory() + "whiten-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let whitened = [
            "--whiten-layers", "gwnn", "--whiten-every", "2", "--whiten-rank", "4", "--grad-norm",
            "standardize",
        ]
        let small = [
            "--epochs", "1", "--train-count", "64", "--test-count", "32", "--batch-size", "16",
            "--lr", "0.01",
        ]
        var command = try NormKitCommand.parseAsRoot(
            ["train"] + whitened + small + [
                "--metrics", dir + "/m.csv", "--checkpoint", dir + "/c.safetensors",
            ])
        try command.run()
        let csv = try String(contentsOfFile: dir + "/m.csv", encoding: .utf8)
        let epoch = csv.split(separator: "\n")[1].split(separator: ",")
        #expect(epoch.first == "1" && epoch.dropFirst().allSatisfy { Double($0)?.isFinite == true })
        let stored = try Safetensors.read(contentsOf: dir + "/c.safetensors").tensors
        let projections = stored.filter { $0.key.hasSuffix("whiten_projection") }
        #expect(projections.count >= 2, "\(stored.keys.sorted())")
        for (key, p) in projections { #expect(p.shape.first == 4, "\(key): \(p.shape)") }

        let refusals: [([String], TrainingError)] = [
            (
                ["--whiten-layers", "gwnn", "--whiten-rank", "0"],
                .invalidSetting(
                    name: "whitening rank", value: "0",
                    requirement: "must lie in 1…\(TrainingConfig.maximumWhiteningRank)")
            ),
            (
                ["--whiten-layers", "bogus"],
                .unknownName(
                    kind: "whitened layers", name: "bogus",
                    known: ["none", "wnn", "gwnn", "eigennet"])
            ),
            (
                ["--whiten-layers", "gwnn", "--whiten-every", "0"],
                .invalidSetting(
                    name: "whitening period", value: "0",
                    requirement: "must lie in 1…\(WhiteningSettings.maximumPeriod)")
            ),
            (
                ["--grad-norm", "bogus"],
                .unknownName(
                    kind: "gradient normalization", name: "bogus",
                    known: ["none", "scale", "standardize", "whiten"])
            ),
        ]
        for (flags, error) in refusals {
            var bad = try NormKitCommand.parseAsRoot(
                ["train"] + small + flags + ["--checkpoint", dir + "/bad.safetensors"])
            #expect(throws: error, "\(flags)") { try bad.run() }
        }
        #expect(!FileManager.default.fileExists(atPath: dir + "/bad.safetensors"))
    }
}
