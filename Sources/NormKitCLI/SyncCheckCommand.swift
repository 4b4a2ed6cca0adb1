import ArgumentParser
import Foundation
import NormKit
import Training

/// `normkit sync-check`: under `mpirun`, runs the synchronized layers on shards of a batch and
/// checks every rank's result against one process on the whole batch.
struct SyncCheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sync-check",
        abstract: "Check synchronized statistics across MPI ranks against one process.",
        discussion: """
            Run as `mpirun --oversubscribe --allow-run-as-root -np K normkit sync-check …`. Every \
            rank builds the same seeded batch; rank r runs the synchronized layer on the r-th \
            slice (--shard-sizes, default as even as possible) for --steps training steps, and \
            rank 0 compares the gathered output, input gradient, summed parameter gradients, \
            running statistics (which must be identical on every rank) and a final inference \
            call with one process on the whole batch. Exits non-zero when a difference exceeds \
            the tolerance (1e-5 relative for float32, 1e-10 for float64).
            """)

    @Option(help: "batchnorm, switchnorm, sparseswitchnorm, batchrenorm or all.")
    var layer = "all"
    @Option(help: "Samples per rank, e.g. 3,0,5 (default: the batch split as evenly as possible).")
    var shardSizes: String?
    @Option(help: "The whole batch (default: the sum of --shard-sizes, else 2·ranks + 1).")
    var batch: Int?
    @Option(help: "Channels.") var channels = 3
    @Option(help: "float32 or float64.") var dtype = "float64"
    @Option(help: "nchw or nhwc.") var layout = "nchw"
    @Option(help: "Training steps.") var steps = 2
    @Option(help: "Seed of the data.") var seed: UInt64 = 1
    @Option(help: "Make this rank fail before the second step (tests that every rank stops).")
    var failRank: Int?
    @Option(
        help: """
            Instead of single layers, train the digits convnet with this normalizer for --steps \
            steps, data parallel with --sync-bn (resuming from a checkpoint before the last \
            step), and compare its parameters and buffers with one process on the whole batch \
            (bn, sn, ssn, brn, …).
            """)
    var trainNormalizer: String?
    @Flag(
        inversion: .prefixedNo,
        help: "With --train-normalizer: synchronized BatchNorm statistics (--no-sync-bn: per rank)."
    )
    var syncBn = true

    static let layerNames = ["batchnorm", "switchnorm", "sparseswitchnorm", "batchrenorm"]

    func run() throws {
        let names = layer == "all" ? Self.layerNames : [layer]
        for name in names where !Self.layerNames.contains(name) {
            throw ValidationError(
                "unknown layer '\(name)'; known: \(Self.layerNames.joined(separator: ", ")), all")
        }
        guard ["nchw", "nhwc"].contains(layout) else {
            throw ValidationError("--layout must be nchw or nhwc")
        }
        guard channels >= 1, steps >= 1 else {
            throw ValidationError("--channels and --steps must be at least 1")
        }
        if let trainNormalizer {
            try Distributed.run { world in try checkTraining(trainNormalizer, world: world) }
            return
        }
        try Distributed.run { world in
            try world.requireSameValue(
                "\(names) \(shardSizes ?? "-") \(batch ?? -1) \(channels) \(dtype) \(layout) "
                    + "\(steps) \(seed)", of: "sync-check options")
            let whole =
                batch ?? shardSizes.map { spec in
                    spec.split(separator: ",").compactMap { Int($0) }.reduce(0, +)
                } ?? (2 * world.size + 1)
            let sizes = try ShardedApply.shardSizes(
                batch: whole, ranks: world.size, spec: shardSizes)
            var failures: [String] = []
            for name in names {
                switch dtype {
                case "float32":
                    failures += try check(name, sizes: sizes, world: world, as: Float.self)
                case "float64":
                    failures += try check(name, sizes: sizes, world: world, as: Double.self)
                default:
                    throw ValidationError("--dtype must be float32 or float64")
                }
            }
            if world.isRoot {
                guard failures.isEmpty else {
                    throw ValidationError(
                        "synchronized results differ from one process:\n"
                            + failures.joined(separator: "\n"))
                }
                print(
                    "sync-check: \(names.count) layer(s) on \(world.size) rank(s) match one process"
                )
            }
        }
    }

    /// Data-parallel training against one process: parameters and buffers after `steps` steps.
    func checkTraining(_ normalizer: String, world: any Communicator) throws {
        var config = TrainingConfig()
        config.normalizer = normalizer
        config.batchSize = batch ?? 10
        config.width = 4
        config.epochs = 1
        config.seed = seed
        var distributed = try Trainer(
            config, communicator: world, synchronizeBatchStatistics: syncBn)
        if steps >= 2 {
            // Resume under MPI: stop after steps − 1, rank 0 writes a checkpoint, every rank
            // resumes from it and takes the last step.
            try distributed.run(maximumSteps: steps - 1)
            var id = [Int64(ProcessInfo.processInfo.processIdentifier)]
            try world.broadcast(&id, from: 0)
            let path = NSTemporaryDirectory() + "normkit-sync-check-\(id[0]).safetensors"
            if world.isRoot { try distributed.saveCheckpoint(to: path) }
            try world.barrier()
            distributed = try Trainer.resume(
                from: path, communicator: world, synchronizeBatchStatistics: syncBn)
            try world.barrier()
            if world.isRoot { try? FileManager.default.removeItem(atPath: path) }
            try distributed.run(maximumSteps: 1)
        } else {
            try distributed.run(maximumSteps: steps)
        }
        guard world.isRoot else { return }
        let single = try Trainer(config, synchronizeBatchStatistics: false)
        try single.run(maximumSteps: steps)
        var worst: (Double, String) = (0, "")
        let expected = Dictionary(
            uniqueKeysWithValues: single.model.parameters.map { ($0.name, $0.value) }
        )
        .merging(single.model.buffers) { a, _ in a }
        let actual = Dictionary(
            uniqueKeysWithValues: distributed.model.parameters.map { ($0.name, $0.value) }
        )
        .merging(distributed.model.buffers) { a, _ in a }
        for (key, e) in expected {
            guard let a = actual[key], a.shape == e.shape else {
                throw ValidationError("\(key) is missing or has another shape")
            }
            let scale = max(e.scalars.map { abs(Double($0)) }.max() ?? 0, 1e-3)
            let diff = zip(a.scalars, e.scalars).map { abs(Double($0) - Double($1)) }.max() ?? 0
            if diff / scale > worst.0 { worst = (diff / scale, key) }
        }
        let losses = zip(distributed.stepLosses, single.stepLosses).map { abs($0 - $1) }
        print(
            "train \(normalizer) on \(world.size) rank(s), batch \(config.batchSize), "
                + "\(steps) step(s): worst relative parameter difference \(worst.0) (\(worst.1)), "
                + "loss difference \(losses.max() ?? 0)")
        // Float training, gradients summed in another order: agreement to ~1e-6 is expected.
        guard worst.0 <= 1e-4, distributed.stepLosses.count == steps else {
            throw ValidationError("data-parallel training differs from one process")
        }
    }

    /// One layer, sharded and whole; the failure lines (rank 0 only).
    func check<T: NormScalar & CommunicatorScalar>(
        _ name: String, sizes: [Int], world: any Communicator, as _: T.Type
    ) throws -> [String] {
        let tolerance = T.self == Float.self ? 1e-5 : 1e-10
        let layout: Layout = self.layout == "nhwc" ? .channelsLast : .channelsFirst
        let sharded = try Probe<T>(name, channels: channels, layout: layout)
        let whole = try Probe<T>(name, channels: channels, layout: layout)
        sharded.synchronizable.communicator = world
        let n = sizes.reduce(0, +)
        let shape = layout == .channelsLast ? [n, 3, 2, channels] : [n, channels, 3, 2]
        var g = SeededGenerator(seed: seed)
        var failures: [String] = []
        var worst = 0.0
        func compare(_ label: String, _ a: Tensor<T>?, _ e: Tensor<T>?) {
            guard let a, let e, a.shape == e.shape else {
                failures.append("\(name) \(label): missing or shapes differ")
                return
            }
            let scale = max(e.scalars.map { abs(Double($0)) }.max() ?? 0, 1)
            let diff = zip(a.scalars, e.scalars).map { abs(Double($0) - Double($1)) }.max() ?? 0
            worst = max(worst, diff / scale)
            if !(diff / scale <= tolerance) {
                failures.append("\(name) \(label): relative difference \(diff / scale)")
            }
        }
        for step in 0..<steps {
            if let failRank, failRank == world.rank, step == 1 {
                throw ValidationError("rank \(world.rank) fails on purpose (--fail-rank)")
            }
            let x = try Tensor<T>.randomNormal(
                shape: shape, mean: step % 2 == 0 ? 3 : 50, standardDeviation: 2, using: &g)
            let dy = try Tensor<T>.randomNormal(shape: shape, using: &g)
            let result = try ShardedApply.run(
                input: x, outputGradient: dy, shardSizes: sizes, communicator: world,
                forward: { try sharded.forward($0, .training) }, backward: sharded.backward)
            let y = try whole.forward(x, .training)
            let reference = try whole.backward(dy)
            // Running statistics must be identical, bit for bit, on every rank.
            let state = sharded.buffers()
            let mine = state.keys.sorted().flatMap { state[$0]!.scalars }
            let all = try world.allGather(mine)
            if all.contains(where: { $0 != all[0] }) {
                failures.append("\(name) step \(step): running statistics differ between ranks")
            }
            guard let result else { continue }
            compare("step \(step) y", result.output, y)
            compare("step \(step) dx", result.inputGradient, reference.input)
            for key in reference.parameters.keys.sorted() {
                compare(
                    "step \(step) d\(key)", result.parameterGradients[key],
                    reference.parameters[key])
            }
            let expected = whole.buffers()
            for key in expected.keys.sorted() {
                compare("step \(step) \(key)", state[key], expected[key])
            }
        }
        let x = try Tensor<T>.randomNormal(shape: shape, mean: 3, using: &g)
        compare("inference y", try sharded.forward(x, .inference), try whole.forward(x, .inference))
        if world.isRoot {
            print(
                "\(name) \(dtype) \(self.layout) shards \(sizes): worst relative difference "
                    + "\(worst) over \(steps) step(s) (tolerance \(tolerance))")
        }
        return failures
    }
}

/// A synchronizable layer behind closures: forward, backward, buffers.
final class Probe<T: NormScalar> {
    let synchronizable: any SynchronizableStatistics
    let forward: (Tensor<T>, Mode) throws -> Tensor<T>
    let backward: (Tensor<T>) throws -> (input: Tensor<T>, parameters: [String: Tensor<T>])
    let buffers: () -> [String: Tensor<T>]

    init(_ name: String, channels: Int, layout: Layout) throws {
        switch name {
        case "batchnorm":
            let l = try BatchNorm<T>(featureCount: channels, layout: layout)
            try l.load([
                "weight": Tensor((0..<channels).map { T(1 + 0.25 * Double($0)) }),
                "bias": Tensor((0..<channels).map { T(0.5 - 0.1 * Double($0)) }),
            ])
            var cache: NormLayer<T>.Cache?
            synchronizable = l
            forward = { x, mode in
                let (y, c) = try l.forward(x, mode: mode)
                cache = c
                return y
            }
            backward = { dy in
                guard let c = cache else { throw NormError.noForwardCall(layer: name) }
                let g = try l.backward(dy, cache: c)
                return (g.input, ["weight": g.scale!, "bias": g.offset!])
            }
            buffers = {
                [
                    "running_mean": l.runningStatistics!.mean,
                    "running_var": l.runningStatistics!.variance,
                ]
            }
        case "switchnorm", "sparseswitchnorm":
            let l = try SwitchableNorm<T>(
                channelCount: channels, weighting: name == "switchnorm" ? .softmax : .sparsestMax,
                layout: layout)
            l.meanLogits = Tensor([0.3, -0.2, 0.5])
            l.varianceLogits = Tensor([-0.1, 0.4, 0.2])
            l.radius = 0.3
            var cache: SwitchableNorm<T>.Cache?
            synchronizable = l
            forward = { x, mode in
                let (y, c) = try l.forward(x, mode: mode)
                cache = c
                return y
            }
            backward = { dy in
                guard let c = cache else { throw NormError.noForwardCall(layer: name) }
                let g = try l.backward(dy, cache: c)
                return (
                    g.input,
                    [
                        "weight": g.scale, "bias": g.offset, "mean_weight": g.meanLogits,
                        "var_weight": g.varianceLogits,
                    ]
                )
            }
            buffers = { ["running_mean": l.runningMean, "running_var": l.runningVariance] }
        default:
            let l = try BatchRenorm<T>(
                channelCount: channels, momentum: .exponential(weightOfNew: 0.1),
                limits: .fixed(rMax: 1.5, dMax: 0.5), layout: layout)
            var cache: BatchRenorm<T>.Cache?
            synchronizable = l
            forward = { x, mode in
                let (y, c) = try l.forward(x, mode: mode)
                cache = c
                return y
            }
            backward = { dy in
                guard let c = cache else { throw NormError.noForwardCall(layer: name) }
                let g = try l.backward(dy, cache: c)
                return (g.input, ["weight": g.scale, "bias": g.offset])
            }
            buffers = {
                ["running_mean": l.runningMean, "running_std": l.runningStandardDeviation]
            }
        }
    }
}
