import Foundation
import NormKit
import Testing

@testable import Training

/// Bad settings and damaged checkpoints give typed errors before any training; nothing traps,
/// hangs or trains silently on garbage.
@Suite("Settings and checkpoint validation", .serialized)
struct CheckpointValidationTests {
    static func tinyConfig() -> TrainingConfig {
        var c = TrainingConfig()
        c.batchSize = 64
        c.epochs = 2
        c.width = 4
        c.groups = 2
        c.seed = 5
        return c
    }

    /// A checkpoint written after three steps, as bytes.
    static let checkpoint: [UInt8] = {
        let path = NSTemporaryDirectory() + "ckpt-\(UUID().uuidString).safetensors"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let trainer = try! Trainer(tinyConfig())
        var steps = 0
        _ = try! trainer.run(shouldStop: {
            steps += 1
            return steps > 3
        })
        try! trainer.saveCheckpoint(to: path)
        return [UInt8](FileManager.default.contents(atPath: path)!)
    }()

    /// Resumes from `bytes` written to a temporary file.
    static func resume(_ bytes: [UInt8]) throws -> Trainer {
        let path = NSTemporaryDirectory() + "resume-\(UUID().uuidString).safetensors"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return try Trainer.resume(from: path)
    }

    static func edited(_ edit: (inout Safetensors.File) throws -> Void) throws -> [UInt8] {
        var file = try Safetensors.decode(checkpoint)
        try edit(&file)
        return Safetensors.encode(file)
    }

    static func config(_ change: @escaping (inout TrainingConfig) -> Void) -> (
        inout Safetensors.File
    ) throws
        -> Void
    {
        { file in
            var c = try JSONDecoder().decode(
                TrainingConfig.self, from: Data(file.metadata["config"]!.utf8))
            change(&c)
            file.metadata["config"] = String(
                decoding: try JSONEncoder().encode(c), as: UTF8.self)
        }
    }

    @Test func badSettingsAreRefusedWithTheirName() throws {
        let cases: [(String, (inout TrainingConfig) -> Void)] = [
            ("epochs", { $0.epochs = 300_000_000_000_000_000 }),
            ("epochs", { $0.epochs = 0 }),
            ("momentum", { $0.momentum = .nan }),
            ("momentum", { $0.momentum = 5 }),
            ("weight decay", { $0.weightDecay = -1e-4 }),
            ("weight decay", { $0.weightDecay = .nan }),
            ("learning rate", { $0.learningRate = .nan }),
            ("width", { $0.width = 1_000_000_000 }),
            ("groups", { $0.groups = 0 }),
            ("test fraction", { $0.testFraction = 0 }),
            ("test fraction", { $0.testFraction = 1.5 }),
            ("test fraction", { $0.testFraction = .nan }),
            ("shapes size", { $0.shapesSize = 1 << 40 }),
            ("batch size", { $0.batchSize = -3 }),
        ]
        for (name, change) in cases {
            var c = Self.tinyConfig()
            change(&c)
            do {
                _ = try Trainer(c)
                Issue.record("\(name) must be refused")
            } catch let error as TrainingError {
                guard case .invalidSetting(let field, _, _) = error else {
                    Issue.record("\(error)")
                    continue
                }
                #expect(field == name)
            }
        }
    }

    @Test func damagedCheckpointsGiveTypedErrors() throws {
        // The undamaged checkpoint resumes.
        let good = try Self.resume(Self.checkpoint)
        #expect(good.optimizer.step == 3 && good.batchInEpoch == 3)
        let damages: [(String, (inout Safetensors.File) throws -> Void)] = [
            ("empty epoch_sums", { $0.tensors["state.epoch_sums"] = .float64(Tensor([])) }),
            (
                "negative position",
                { $0.tensors["state.position"] = .int64(shape: [4], values: [-1, 3, 3, 192]) }
            ),
            (
                "huge position",
                {
                    $0.tensors["state.position"] = .int64(
                        shape: [4], values: [0, .max, .max, .max])
                }
            ),
            (
                "step count that does not match",
                { $0.tensors["state.position"] = .int64(shape: [4], values: [0, 3, 1 << 40, 192]) }
            ),
            (
                "velocity of the wrong shape",
                { file in
                    let key = file.tensors.keys.first { $0.hasPrefix("optimizer.velocity.") }!
                    file.tensors[key] = .float32(Tensor([1, 2, 3]))
                }
            ),
            (
                "missing velocity after steps (would resume with zero momentum)",
                { file in
                    let key = file.tensors.keys.sorted().first {
                        $0.hasPrefix("optimizer.velocity.")
                    }!
                    file.tensors[key] = nil
                }
            ),
            (
                "velocity of no parameter",
                { $0.tensors["optimizer.velocity.nothing"] = .float32(Tensor([1])) }
            ),
            (
                "unknown parameter",
                { $0.tensors["model.extra.weight"] = .float32(Tensor([1])) }
            ),
            (
                "NaN weights",
                { file in
                    let key = file.tensors.keys.sorted().first { $0.hasPrefix("model.") }!
                    let shape = file.tensors[key]!.shape
                    file.tensors[key] = .float32(
                        try Tensor(repeating: .nan, shape: shape))
                }
            ),
            ("step losses missing", { $0.tensors["state.step_losses"] = .float64(Tensor([1])) }),
            ("test fraction 0", Self.config { $0.testFraction = 0 }),
            ("test fraction 7", Self.config { $0.testFraction = 7 }),
            ("absurd width", Self.config { $0.width = 1 << 40 }),
            ("absurd epochs", Self.config { $0.epochs = .max }),
            ("history", { $0.metadata["history"] = "[{}]" }),
        ]
        for (name, damage) in damages {
            let bytes = try Self.edited(damage)
            do {
                _ = try Self.resume(bytes)
                Issue.record("\(name): a damaged checkpoint must be refused")
            } catch let error as TrainingError {
                #expect(!error.description.isEmpty, "\(name)")
            } catch {
                Issue.record("\(name): not a TrainingError: \(error)")
            }
        }
    }

    /// Seeded, bounded: mutated checkpoints resume or give a typed error, never trap.
    @Test func fuzzedCheckpointsNeverTrap() throws {
        var g = SeededGenerator(seed: 1414)
        let bytes = Self.checkpoint
        let headerEnd = 8 + bytes.prefix(8).enumerated().reduce(0) { $0 | Int($1.1) << (8 * $1.0) }
        var refused = 0
        for round in 0..<150 {
            var mutated = bytes
            switch round % 3 {
            case 0:  // a digit in the header (shapes, offsets, the JSON configuration)
                let digits = (8..<headerEnd).filter {
                    (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(mutated[$0])
                }
                let at = digits.randomElement(using: &g)!
                mutated[at] = UInt8(ascii: "0") + UInt8(g.next() % 10)
            case 1:  // bytes of the data section
                for _ in 0..<4 {
                    let at = headerEnd + Int(g.next() % UInt64(mutated.count - headerEnd))
                    mutated[at] = UInt8(truncatingIfNeeded: g.next())
                }
            default:  // truncation
                mutated.removeLast(1 + Int(g.next() % UInt64(mutated.count - 1)))
            }
            do { _ = try Self.resume(mutated) } catch { refused += 1 }
        }
        #expect(refused > 0)
    }
}
