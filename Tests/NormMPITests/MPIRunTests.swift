import Foundation
import NormIO
import TensorCore
import Testing

/// Runs `normkit` under `mpirun --oversubscribe --allow-run-as-root -np K` and checks that the
/// synchronized layers and data-parallel training give what one process gives on the whole
/// batch (the comparison runs inside `normkit sync-check`, which exits non-zero on a mismatch
/// and prints the worst difference), and that a failing rank ends the run.
///
/// The tests never initialize MPI in the test process itself: a process that is an MPI
/// singleton must not launch `mpirun`.
@Suite("Open MPI runs", .serialized)
struct MPIRunTests {
    /// A run that has not finished by then is killed and reported as hung.
    static let timeout: TimeInterval = 240

    /// The `normkit` binary next to the test bundle (SwiftPM builds every product).
    static var normkit: String {
        let products = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [products, products.deletingLastPathComponent()] {
            let path = candidate.appendingPathComponent("normkit").path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        let exe =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            .map { URL(fileURLWithPath: $0).deletingLastPathComponent() } ?? products
        return exe.appendingPathComponent("normkit").path
    }

    struct Outcome {
        var status: Int32
        var output: String
        var seconds: Double
        var timedOut: Bool
    }

    /// Runs a command with a wall-clock limit; output is stdout and stderr together.
    static func launch(_ arguments: [String]) throws -> Outcome {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        process.standardInput = FileHandle.nullDevice
        let start = Date()
        try process.run()
        // Read while it runs so that a full pipe never blocks the child.
        let reader = OutputReader(pipe.fileHandleForReading)
        var timedOut = false
        while process.isRunning {
            if Date().timeIntervalSince(start) > timeout {
                timedOut = true
                process.terminate()
                break
            }
            Thread.sleep(forTimeInterval: 0.05)
        }
        process.waitUntilExit()
        return Outcome(
            status: process.terminationStatus, output: reader.text(),
            seconds: Date().timeIntervalSince(start), timedOut: timedOut)
    }

    /// Reads a pipe to its end on a background queue.
    final class OutputReader: @unchecked Sendable {
        private var data = Data()
        private let done = DispatchSemaphore(value: 0)

        init(_ handle: FileHandle) {
            DispatchQueue.global().async {
                self.data = handle.readDataToEndOfFile()
                self.done.signal()
            }
        }

        func text() -> String {
            done.wait()
            return String(decoding: data, as: UTF8.self)
        }
    }

    static func mpirun(_ ranks: Int, _ arguments: [String]) throws -> Outcome {
        try launch(
            ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", "\(ranks)", normkit]
                + arguments)
    }

    @Test(
        arguments: [
            (2, "1,6", "float64", "nchw"), (2, "4,0", "float32", "nhwc"),
            (3, "3,0,5", "float64", "nhwc"), (3, "3,0,5", "float32", "nchw"),
        ])
    func unevenShardsWithAnEmptyRankEqualOneProcess(
        _ ranks: Int, _ shards: String, _ dtype: String, _ layout: String
    ) throws {
        let run = try Self.mpirun(
            ranks,
            [
                "sync-check", "--layer", "all", "--shard-sizes", shards, "--dtype", dtype,
                "--layout", layout, "--steps", "2",
            ])
        #expect(!run.timedOut && run.status == 0, "\(run.output)")
        // One line per layer (batchnorm, switchnorm, sparseswitchnorm, batchrenorm).
        #expect(run.output.contains("4 layer(s) on \(ranks) rank(s) match one process"))
        #expect(run.output.contains("sparseswitchnorm \(dtype) \(layout)"))
    }

    @Test(arguments: [2, 3])
    func dataParallelTrainingEqualsOneProcess(_ ranks: Int) throws {
        for normalizer in ["bn", "sn"] {
            let run = try Self.mpirun(
                ranks,
                ["sync-check", "--train-normalizer", normalizer, "--steps", "2", "--batch", "7"])
            #expect(!run.timedOut && run.status == 0, "\(normalizer): \(run.output)")
            #expect(run.output.contains("train \(normalizer) on \(ranks) rank(s)"))
        }
    }

    @Test func perRankStatisticsDifferFromOneProcess() throws {
        // The negative control: without --sync-bn each rank normalizes its own slice, which is
        // not what one process does on the whole batch, and the check must say so.
        let run = try Self.mpirun(
            3, ["sync-check", "--train-normalizer", "bn", "--no-sync-bn", "--steps", "2"])
        #expect(run.status != 0, "\(run.output)")
        #expect(run.output.contains("differs from one process"))
    }

    @Test func aFailingRankEndsEveryRankInBoundedTime() throws {
        let run = try Self.mpirun(3, ["sync-check", "--layer", "batchnorm", "--fail-rank", "1"])
        #expect(!run.timedOut, "the run hung: \(run.output)")
        #expect(run.status != 0)
        #expect(run.output.contains("rank 1 fails on purpose"), "\(run.output)")
        #expect(run.seconds < 60, "took \(run.seconds) s")
    }

    @Test func mismatchedConfigurationsAreReportedAtStartUp() throws {
        // MPMD launch: rank 0 and rank 1 disagree on the channel count.
        let run = try Self.launch(
            [
                "mpirun", "--oversubscribe", "--allow-run-as-root", "-np", "1", Self.normkit,
                "sync-check", "--channels", "3", ":", "-np", "1", Self.normkit, "sync-check",
                "--channels", "4",
            ])
        #expect(!run.timedOut && run.status != 0, "\(run.output)")
        #expect(run.output.contains("sync-check options differs between ranks"), "\(run.output)")
    }

    @Test(arguments: ["batchnorm", "switchnorm", "batchrenorm"])
    func applyWithSyncWritesWhatOneProcessWrites(_ layer: String) throws {
        let dir = NSTemporaryDirectory() + "normkit-mpi-apply-\(layer)-\(getpid())/"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var g = SeededGenerator(seed: 9)
        try Numpy.write(
            try Tensor<Double>.randomNormal(shape: [8, 3, 2, 2], mean: 5, using: &g),
            to: dir + "x.npy")
        try Numpy.write(
            try Tensor<Double>.randomNormal(shape: [8, 3, 2, 2], using: &g), to: dir + "dy.npy")
        func arguments(_ tag: String) -> [String] {
            [
                "apply", layer, "--input", dir + "x.npy", "--output", dir + "y\(tag).npy",
                "--grad-output", dir + "dy.npy", "--grad-input", dir + "dx\(tag).npy",
                "--grad-params", dir + "g\(tag).safetensors", "--updated-params",
                dir + "u\(tag).safetensors",
            ]
        }
        let single = try Self.launch([Self.normkit] + arguments("1"))
        #expect(single.status == 0, "\(single.output)")
        let sharded = try Self.mpirun(3, arguments("3") + ["--sync", "--shard-sizes", "3,0,5"])
        #expect(!sharded.timedOut && sharded.status == 0, "\(sharded.output)")
        func maxDifference(_ a: [Double], _ b: [Double]) -> Double {
            a.count == b.count ? zip(a, b).map { abs($0 - $1) }.max() ?? 0 : .infinity
        }
        for name in ["y", "dx"] {
            let a = try Numpy.read(contentsOf: dir + "\(name)1.npy").tensor(as: Double.self)
            let b = try Numpy.read(contentsOf: dir + "\(name)3.npy").tensor(as: Double.self)
            #expect(maxDifference(a.scalars, b.scalars) < 1e-10, "\(layer) \(name)")
        }
        for name in ["g", "u"] {
            let a = try Safetensors.read(contentsOf: dir + "\(name)1.safetensors")
            let b = try Safetensors.read(contentsOf: dir + "\(name)3.safetensors")
            #expect(a.tensors.keys.sorted() == b.tensors.keys.sorted(), "\(layer) \(name) keys")
            for (key, value) in a.tensors {
                guard let other = b.tensors[key] else { continue }
                #expect(value.shape == other.shape, "\(layer) \(name) \(key) shape")
                let d = maxDifference(
                    value.tensor(as: Double.self).scalars, other.tensor(as: Double.self).scalars)
                #expect(d < 1e-10, "\(layer) \(name) \(key): \(d)")
            }
        }
    }

    @Test func withoutMPIRunItIsOneProcess() throws {
        let run = try Self.launch([Self.normkit, "sync-check", "--shard-sizes", "5"])
        #expect(run.status == 0, "\(run.output)")
        #expect(run.output.contains("on 1 rank(s) match one process"))
    }
}
