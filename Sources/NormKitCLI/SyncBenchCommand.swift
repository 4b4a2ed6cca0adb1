import ArgumentParser
import Foundation
import NormKit

/// `normkit sync-bench`: under `mpirun`, the all-reduce latency and the cost of synchronized
/// BatchNorm over local BatchNorm in one training step.
struct SyncBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sync-bench",
        abstract: "Time all-reduce and SyncBatchNorm against BatchNorm across MPI ranks.",
        discussion: """
            Run as `mpirun --oversubscribe --allow-run-as-root -np K normkit sync-bench` from a \
            release build. Rank 0 prints the median all-reduce latency for several buffer sizes \
            and the median training step (forward + backward) of BatchNorm and SyncBatchNorm on \
            each rank's slice of the --shape batch, with the overhead ratio.
            """)

    @Option(help: "The global batch N,C,H,W (each rank takes N/K samples).")
    var shape = "32,64,56,56"
    @Option(help: "Timed repetitions (after 3 warm-up runs).") var repeats = 30
    @Option(help: "Kernel threads per rank.") var threads = 1

    func run() throws {
        let dims = shape.split(separator: ",").compactMap { Int($0) }
        guard dims.count == 4, dims.allSatisfy({ $0 >= 1 }), repeats >= 1 else {
            throw ValidationError("--shape needs N,C,H,W ≥ 1; --repeats ≥ 1")
        }
        try checkThreads(threads)
        Parallelism.maximumThreads = threads
        try Distributed.run { world in
            try world.requireSameValue("\(dims) \(repeats)", of: "sync-bench options")
            func median(_ body: () throws -> Void) throws -> Double {
                for _ in 0..<3 { try body() }
                var times: [Double] = []
                for _ in 0..<repeats {
                    try world.barrier()
                    let start = DispatchTime.now().uptimeNanoseconds
                    try body()
                    times.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6)
                }
                // Every rank's median; the slowest rank sets the step time.
                var all = [times.sorted()[times.count / 2]]
                all = try world.allGather(all).map { $0[0] }
                return all.max() ?? 0
            }
            func say(_ text: String) { if world.isRoot { print(text) } }
            say("ranks \(world.size), kernel threads per rank \(threads), median of \(repeats)")
            for count in [1, 2 * dims[1] + 1, 16_384, 262_144] {
                var buffer = [Double](repeating: 1, count: count)
                let ms = try median { try world.allReduceSum(&buffer) }
                say(
                    "all-reduce \(count) doubles (\(count * 8) bytes): "
                        + String(format: "%.3f ms", ms))
            }
            let sizes = try ShardedApply.shardSizes(batch: dims[0], ranks: world.size, spec: nil)
            var g = SeededGenerator(seed: 1)
            let local = [sizes[world.rank]] + dims.dropFirst()
            let x = try Tensor<Float>.randomNormal(shape: local, using: &g)
            let dy = try Tensor<Float>.randomNormal(shape: local, using: &g)
            let plain = try BatchNorm<Float>(featureCount: dims[1])
            let synced = try SyncBatchNorm<Float>(featureCount: dims[1], communicator: world)
            var y = try Tensor<Float>(zeros: local)
            var grads = try plain.backward(dy, cache: try plain.forward(x, mode: .training).cache)
            func step(_ layer: NormLayer<Float>) throws {
                let cache = try layer.forward(x, mode: .training, into: &y)
                try layer.backward(dy, cache: cache, into: &grads)
            }
            let bn = try median { try step(plain) }
            let sync = try median { try step(synced) }
            say(
                "BatchNorm step on \(local) per rank: " + String(format: "%.3f ms", bn)
                    + "; SyncBatchNorm: " + String(format: "%.3f ms", sync)
                    + String(format: " (×%.2f, +%.3f ms)", sync / bn, sync - bn))
        }
    }
}
