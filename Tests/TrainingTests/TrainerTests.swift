import Foundation
import NormKit
import Studies
import Testing

@testable import Training

@Suite("Training")
struct TrainerTests {
    static func tinyConfig() -> TrainingConfig {
        var c = TrainingConfig()
        c.dataset = "digits"
        c.normalizer = "bn"
        c.batchSize = 32
        c.epochs = 2
        c.learningRate = 0.1
        c.width = 8
        c.seed = 3
        return c
    }

    @Test func digitsShipWithTheRightShapeAndLabels() throws {
        let digits: Dataset<Float> = try Datasets.digits()
        #expect(digits.images.shape == [1797, 1, 8, 8])
        let counts = (0..<10).map { c in digits.labels.filter { $0 == c }.count }
        #expect(counts == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
        #expect(digits.images.scalars.allSatisfy { $0 >= 0 && $0 <= 1 })
        let (train, test) = try digits.split(testFraction: 0.2, seed: 1)
        #expect(train.count + test.count == 1797 && abs(test.count - 359) <= 5)
    }

    @Test func shapesAreSeededAndBalanced() throws {
        let a: Dataset<Float> = try Datasets.shapes(count: 40, size: 12, seed: 9)
        let b: Dataset<Float> = try Datasets.shapes(count: 40, size: 12, seed: 9)
        #expect(a.images == b.images && a.labels == b.labels)
        #expect((0..<10).allSatisfy { c in a.labels.filter { $0 == c }.count == 4 })
        #expect(a.images.shape == [40, 3, 12, 12])
    }

    /// The loss falls, and the first losses match values recorded from this configuration (a
    /// change in initialisation, shuffling, kernels or the optimiser shows up here).
    @Test func tinyRunLearnsAndMatchesRecordedLosses() throws {
        let trainer = try Trainer(Self.tinyConfig())
        try trainer.run()
        let losses = trainer.stepLosses
        let first = losses.prefix(5).reduce(0, +) / 5
        let last = losses.suffix(5).reduce(0, +) / 5
        #expect(last < 0.6 * first, "loss \(first) → \(last)")
        let recorded: [Double] = Self.recordedLosses
        #expect(recorded.count == 4, "record these: \(Array(losses.prefix(4)))")
        for (a, b) in zip(losses.prefix(recorded.count), recorded) {
            #expect(abs(a - b) < 1e-4, "losses \(Array(losses.prefix(4))) vs recorded \(recorded)")
        }
        #expect(trainer.history.count == 2)
    }

    /// The first four losses of `tinyConfig()`, recorded from this implementation (2026-11-22).
    static let recordedLosses: [Double] = [
        2.284283653242321, 2.2615707969122973, 2.3111915729415093, 2.2457713279084235,
    ]

    @Test func sameSeedSameLosses() throws {
        let a = try Trainer(Self.tinyConfig())
        let b = try Trainer(Self.tinyConfig())
        try a.run()
        try b.run()
        #expect(a.stepLosses == b.stepLosses)
    }

    @Test func resumingEqualsAnUninterruptedRun() throws {
        let full = try Trainer(Self.tinyConfig())
        try full.run()
        let partial = try Trainer(Self.tinyConfig())
        var steps = 0
        let finished = try partial.run(shouldStop: {
            steps += 1
            return steps > 60  // stop mid-epoch 2 (44 steps per epoch)
        })
        #expect(!finished)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(
            "ckpt-\(UUID().uuidString).safetensors"
        ).path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try partial.saveCheckpoint(to: path)
        let resumed = try Trainer.resume(from: path)
        try resumed.run()
        #expect(resumed.stepLosses == full.stepLosses)
        #expect(resumed.history.map(\.testLoss) == full.history.map(\.testLoss))
    }

    @Test func badSettingsGiveClearErrors() throws {
        var c = Self.tinyConfig()
        c.normalizer = "fancynorm"
        #expect(throws: TrainingError.self) { _ = try Trainer(c) }
        c = Self.tinyConfig()
        c.model = "transformer"
        #expect(throws: TrainingError.self) { _ = try Trainer(c) }
        c = Self.tinyConfig()
        c.batchSize = 5000
        do {
            _ = try Trainer(c)
            Issue.record("a batch larger than the data set must be refused")
        } catch {
            #expect("\(error)".contains("batch size"))
        }
        // A corrupted checkpoint.
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(
            "bad-\(UUID().uuidString)"
        ).path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data([1, 2, 3, 4, 5, 6, 7, 8, 9]).write(to: URL(fileURLWithPath: path))
        #expect(throws: (any Error).self) { _ = try Trainer.resume(from: path) }
        try Safetensors.write(Safetensors.File(tensors: ["x": .float32(Tensor([1]))]), to: path)
        #expect(throws: TrainingError.self) { _ = try Trainer.resume(from: path) }
    }
}
