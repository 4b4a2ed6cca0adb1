import Foundation
import NormKit

/// Everything that defines a training run; the same configuration and thread count give the
/// same losses.
public struct TrainingConfig: Sendable, Hashable, Codable {
    /// `digits`, `shapes` or `fashion-mnist`.
    public var dataset = "digits"
    /// `convnet` or `resnet`.
    public var model = "convnet"
    /// The normalizer in every slot (`bn`, `gn`, `ln`, `in`, `none`, `sn`, `ssn`, `brn`, `ibn`, `meta`).
    public var normalizer = "bn"
    /// The weight method of every convolution, by its command-line name.
    ///
    /// `none`, `wn`, `cwn`, `ws`, `ws-bit` or `sn`; nil means `none` and keeps older
    /// checkpoints readable. The classifier takes only `wn` and `sn` (see ``Models``).
    public var weightNorm: String?
    /// Examples per step.
    public var batchSize = 32
    /// Passes over the training set.
    public var epochs = 3
    /// Base learning rate.
    public var learningRate = 0.05
    /// SGD momentum.
    public var momentum = 0.9
    /// Weight decay of weights and normalizer affine parameters.
    public var weightDecay = 5e-4
    /// `constant`, `cosine` or `step` (×0.1 at 50% and 75% of the steps).
    public var schedule = "cosine"
    /// Seed of the weights, the split and the shuffling.
    public var seed: UInt64 = 1
    /// Channels of the first layer.
    public var width = 16
    /// GroupNorm's group count.
    public var groups = 8
    /// Images of the shapes data set (train + test).
    public var shapesCount = 3000
    /// Side of the shapes images.
    public var shapesSize = 16
    /// Share of the data held out for testing (digits, shapes; Fashion-MNIST has its own split).
    public var testFraction = 0.2
    /// Use only the first this many training examples (all when nil).
    public var trainCount: Int?
    /// Use only the first this many test examples (all when nil).
    public var testCount: Int?
    /// Whitened layers (`wnn`, `gwnn`, `eigennet`; nil or `none`: plain layers), see
    /// ``WhitenedAffine``; the whitening settings below apply only with them.
    public var whitenLayers: String?
    /// T: steps between whitening refreshes (nil: 100).
    public var whitenEvery: Int?
    /// k: the whitened dimension of each layer, capped at the layer's (nil: all).
    public var whitenRank: Int?
    /// GWNN: steps between data passes for the input statistics (nil: 10·T).
    public var whitenDataEvery: Int?
    /// The gradient normalizer (`none`, `scale`, `standardize`, `whiten`; nil: none).
    public var gradNorm: String?
    /// Ψ of the gradient normalizer (nil: 1).
    public var gradNormScale: Double?

    /// Defaults.
    public init() {}

    /// The largest values ``validate()`` accepts; larger ones are refused, not capped.
    public enum Limits {
        /// Epochs.
        public static let epochs = 1_000_000
        /// Examples per step.
        public static let batchSize = 1 << 20
        /// Channels of the first layer.
        public static let width = 1024
        /// Images of the shapes data set.
        public static let shapesCount = 1_000_000
        /// Side of the shapes images.
        public static let shapesSize = 256
    }

    /// Checks every numeric field, so that a bad flag or a damaged checkpoint gives a typed
    /// error rather than a trap, a hang or a silently diverging run.
    ///
    /// - Throws: ``TrainingError/invalidSetting(name:value:requirement:)`` naming the field.
    public func validate() throws(TrainingError) {
        func check(_ ok: Bool, _ name: String, _ value: Any, _ requirement: String)
            throws(TrainingError)
        {
            guard ok else {
                throw .invalidSetting(name: name, value: "\(value)", requirement: requirement)
            }
        }
        try check(
            (1...Limits.epochs).contains(epochs), "epochs", epochs,
            "must lie in 1…\(Limits.epochs)")
        try check(
            (1...Limits.batchSize).contains(batchSize), "batch size", batchSize,
            "must lie in 1…\(Limits.batchSize)")
        try check(
            learningRate.isFinite && learningRate > 0, "learning rate", learningRate,
            "must be finite and > 0")
        try check(
            momentum.isFinite && momentum >= 0 && momentum < 1, "momentum", momentum,
            "must be finite and in [0, 1)")
        try check(
            weightDecay.isFinite && weightDecay >= 0, "weight decay", weightDecay,
            "must be finite and ≥ 0")
        try check(
            (1...Limits.width).contains(width), "width", width, "must lie in 1…\(Limits.width)")
        // Each slot reduces G to the largest divisor of its channel count not above it.
        try check(
            (1...Limits.width).contains(groups), "groups", groups,
            "must lie in 1…\(Limits.width) (each slot uses the largest divisor of its channels ≤ G)"
        )
        try check(
            (10...Limits.shapesCount).contains(shapesCount), "shapes count", shapesCount,
            "must lie in 10…\(Limits.shapesCount)")
        try check(
            (4...Limits.shapesSize).contains(shapesSize), "shapes size", shapesSize,
            "must lie in 4…\(Limits.shapesSize)")
        try check(
            testFraction.isFinite && testFraction > 0 && testFraction < 1, "test fraction",
            testFraction, "must be finite and strictly between 0 and 1")
    }
}

/// What one epoch measured.
public struct EpochMetrics: Sendable, Codable, Hashable {
    /// 1-based epoch.
    public var epoch: Int
    /// Mean training loss over the epoch's steps.
    public var trainLoss: Double
    /// Test loss (inference mode).
    public var testLoss: Double
    /// Test error rate in [0, 1].
    public var testError: Double
    /// Training examples per second.
    public var examplesPerSecond: Double
}

/// Trains one network on one data set, with checkpoints that resume exactly.
public final class Trainer {
    /// The configuration.
    public let config: TrainingConfig
    /// The network.
    public let model: Sequential<Float>
    /// The optimiser.
    public let optimizer: SGD<Float>
    /// The training split.
    public let train: Dataset<Float>
    /// The test split.
    public let test: Dataset<Float>
    /// Completed epochs.
    public private(set) var epoch = 0
    /// Batches done in the current epoch (for resuming mid-epoch).
    public private(set) var batchInEpoch = 0
    /// The loss of every training step so far.
    public private(set) var stepLosses: [Double] = []
    /// Per-epoch metrics so far.
    public private(set) var history: [EpochMetrics] = []
    /// The normalizer slots of the network.
    public let slots: [NormSlot<Float>]
    /// The processes that train together (data parallel); a ``LocalCommunicator`` for one.
    public let communicator: any Communicator
    /// Whether BatchNorm-type statistics (BN, SN's BN branch, Batch Renorm, IBN's BN half) span
    /// the global batch over every rank (`--sync-bn`) or each rank's slice (`--no-sync-bn`).
    public let synchronizesBatchStatistics: Bool
    /// The whitened layers' maps (empty without `whitenLayers`).
    public let whitened: [WhitenedAffine<Float>]
    /// The backward-pass normalizer applied to every weight gradient before each update.
    public let gradientNormalization: GradientNormalization
    var epochLossSum = 0.0
    var epochExamples = 0
    var epochSeconds = 0.0

    /// Builds data, network and optimiser.
    ///
    /// With a communicator of K processes (data-parallel training, `mpirun -np K normkit
    /// train`), every global batch is split into K contiguous slices (as evenly as possible),
    /// rank 0's initial weights are broadcast, and each step all-reduces every parameter
    /// gradient and the loss in one fused buffer, so all ranks take the same SGD step: the one a
    /// single process takes on the whole batch, up to floating-point reordering, when
    /// `synchronizeBatchStatistics` is true.
    /// - Throws: ``TrainingError`` for an unknown name, a batch larger than the training set or
    ///   smaller than the number of ranks, or another invalid setting;
    ///   ``CommunicatorError/mismatchedConfiguration(name:values:)`` when ranks were started
    ///   with different configurations.
    public init(
        _ config: TrainingConfig, communicator: any Communicator = LocalCommunicator(),
        synchronizeBatchStatistics: Bool = false
    ) throws {
        self.config = config
        self.communicator = communicator
        self.synchronizesBatchStatistics = synchronizeBatchStatistics
        guard let kind = ModelKind(rawValue: config.model) else {
            throw TrainingError.unknownName(
                kind: "model", name: config.model, known: ModelKind.allCases.map(\.rawValue))
        }
        guard let normalizer = NormalizerChoice(rawValue: config.normalizer) else {
            throw TrainingError.unknownName(
                kind: "normalizer", name: config.normalizer,
                known: NormalizerChoice.allCases.map(\.rawValue))
        }
        guard let weightNorm = WeightNormMethod(rawValue: config.weightNorm ?? "none") else {
            throw TrainingError.unknownName(
                kind: "weight normalization", name: config.weightNorm ?? "",
                known: WeightNormMethod.allCases.map(\.rawValue))
        }
        try config.validate()
        let whitening = try config.whiteningSettings()
        gradientNormalization = try config.gradientNormalization()
        (train, test) = try Datasets.split(for: config)
        guard train.count >= 1, test.count >= 1 else {
            throw TrainingError.invalidSetting(
                name: "test fraction", value: "\(config.testFraction)",
                requirement: "must leave examples in both the training and the test split")
        }
        guard config.batchSize <= train.count else {
            throw TrainingError.invalidSetting(
                name: "batch size", value: "\(config.batchSize)",
                requirement: "at most the \(train.count) training examples of \(config.dataset)")
        }
        let stepsPerEpoch = train.count / config.batchSize
        let totalSteps = stepsPerEpoch * config.epochs
        model = try Models.make(
            kind, normalizer: normalizer, inputShape: train.imageShape, classes: train.classCount,
            width: config.width,
            groups: config.groups, seed: config.seed, radiusSteps: max(totalSteps, 1),
            weightNorm: weightNorm, whitening: whitening, as: Float.self)
        let schedule: LearningRateSchedule
        switch config.schedule {
        case "constant": schedule = .constant
        case "cosine": schedule = .cosine(totalSteps: totalSteps)
        case "step":
            schedule = .step(milestones: [totalSteps / 2, totalSteps * 3 / 4], factor: 0.1)
        default:
            throw TrainingError.unknownName(
                kind: "schedule", name: config.schedule, known: ["constant", "cosine", "step"])
        }
        // The mixture logits: the official SN setup trains them like other weights; SSN's use a
        // tenth of the rate and no weight decay.
        let mixture =
            normalizer == .ssn
            ? SGD<Float>.Group(learningRateScale: 0.1, weightDecay: 0)
            : SGD<Float>.Group(learningRateScale: 1, weightDecay: 1e-4)
        optimizer = SGD(
            learningRate: config.learningRate, momentum: config.momentum,
            weightDecay: config.weightDecay,
            groups: ["mixture": mixture, "norm": SGD.Group(weightDecay: config.weightDecay)],
            schedule: schedule)
        slots = Models.normSlots(model)
        whitened = WhitenedLayers.cores(in: model)
        if whitening != nil && communicator.size > 1 {
            throw TrainingError.invalidSetting(
                name: "whitened layers", value: config.whitenLayers ?? "",
                requirement: "each rank would estimate its own whitening: train on one process")
        }
        try setUpDataParallel()
    }

    // MARK: - Data parallel

    /// Checks that every rank has the same configuration, gives BatchNorm-type slots the
    /// communicator (with `--sync-bn`) and broadcasts rank 0's initial weights.
    func setUpDataParallel() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let description = String(decoding: try encoder.encode(config), as: UTF8.self)
        try communicator.requireSameValue(
            description + " sync-bn=\(synchronizesBatchStatistics)",
            of: "training configuration (data set, model, normalizer, channels, seed, batch)")
        guard config.batchSize >= communicator.size else {
            throw TrainingError.invalidSetting(
                name: "batch size", value: "\(config.batchSize)",
                requirement: "at least the number of ranks (\(communicator.size)), one sample each")
        }
        if synchronizesBatchStatistics {
            for slot in slots {
                switch slot.layer {
                case let l as SynchronizableStatistics: l.communicator = communicator
                case let l as IBN<Float>: l.batch.communicator = communicator
                default: break
                }
            }
        }
        try broadcastParameters()
    }

    /// Replaces every rank's parameters by rank 0's.
    func broadcastParameters() throws {
        guard communicator.size > 1 else { return }
        var values = model.parameters.flatMap { $0.value.scalars }
        try communicator.broadcast(&values, from: 0)
        var offset = 0
        for p in model.parameters {
            p.value = try Tensor(
                shape: p.value.shape, scalars: Array(values[offset..<(offset + p.value.count)]))
            offset += p.value.count
        }
    }

    /// This rank's slice of a global batch: contiguous, the first `B mod K` ranks one larger.
    func shard(_ indices: ArraySlice<Int>) -> ArraySlice<Int> {
        let (k, r) = (communicator.size, communicator.rank)
        let base = indices.count / k
        let extra = indices.count % k
        let start = indices.startIndex + r * base + min(r, extra)
        return indices[start..<(start + base + (r < extra ? 1 : 0))]
    }

    /// Replaces every rank's buffers (running statistics) by rank 0's, as PyTorch's
    /// DistributedDataParallel broadcasts them; with synchronized statistics they are already
    /// equal.
    func broadcastBuffers() throws {
        guard communicator.size > 1 else { return }
        let buffers = model.buffers
        let keys = buffers.keys.sorted()
        var values = keys.flatMap { buffers[$0]!.scalars }
        try communicator.broadcast(&values, from: 0)
        var offset = 0
        var restored: [String: Tensor<Float>] = [:]
        for key in keys {
            let t = buffers[key]!
            restored[key] = try Tensor(
                shape: t.shape, scalars: Array(values[offset..<(offset + t.count)]))
            offset += t.count
        }
        try model.loadBuffers(restored)
    }

    /// Steps per epoch (the last partial batch is dropped).
    public var stepsPerEpoch: Int { train.count / config.batchSize }

    /// The order of the training examples in an epoch: a shuffle seeded by (seed, epoch).
    func order(epoch: Int) -> [Int] {
        var g = SeededGenerator(seed: config.seed &* 0x9E37_79B9 &+ UInt64(epoch))
        var indices = Array(0..<train.count)
        indices.shuffle(using: &g)
        return indices
    }

    /// One training step on the global batch `indices`; returns the loss of the whole batch
    /// and whether any rank asked to stop (so that every rank stops after the same step).
    func step(_ indices: ArraySlice<Int>, requestStop: Bool = false) throws -> (
        loss: Double, stop: Bool
    ) {
        let (x, labels) = try train.batch(shard(indices))
        return try step(x, labels: labels, globalCount: indices.count, requestStop: requestStop)
    }

    /// One training step on this rank's part of a batch (`x` `[n, C, H, W]`, n labels).
    ///
    /// Under several processes each rank runs its slice; the loss gradient is scaled by n_r/B
    /// (B = `globalCount`) so that the gradients summed over the ranks are those of the mean
    /// loss over the whole batch, and ONE all-reduce carries every parameter gradient, the loss
    /// and the stop flag.
    /// - Returns: the loss of the whole batch and whether any rank asked to stop.
    @discardableResult
    public func step(
        _ x: Tensor<Float>, labels: [Int], globalCount: Int? = nil, requestStop: Bool = false
    ) throws -> (loss: Double, stop: Bool) {
        for slot in slots { slot.advanceRadius() }
        let mine = labels
        let indices = 0..<(globalCount ?? labels.count)
        let logits = try model.forward(x, mode: .training)
        var (loss, gradient, _) = try SoftmaxCrossEntropy.evaluate(logits, labels: labels)
        var stop = requestStop
        if communicator.size > 1 {
            let share = Double(mine.count) / Double(indices.count)
            gradient = gradient.map { $0 * Float(share) }
            _ = try model.backward(gradient)
            let parameters = model.parameters
            var fused = parameters.flatMap { $0.gradient.scalars.map(Double.init) }
            fused.append(loss * share)
            fused.append(requestStop ? 1 : 0)
            try communicator.allReduceSum(&fused)
            var offset = 0
            for p in parameters {
                p.gradient = try Tensor(
                    shape: p.gradient.shape,
                    rounding: Array(fused[offset..<(offset + p.gradient.count)]))
                offset += p.gradient.count
            }
            loss = fused[offset]
            stop = fused[offset + 1] > 0
        } else {
            _ = try model.backward(gradient)
        }
        try prepareUpdate()
        try optimizer.update(model.parameters)
        return (loss, stop)
    }

    /// Training throughput on one fixed batch.
    ///
    /// After `warmup` steps, times `steps` SGD steps on the first `batchSize` training
    /// examples, as `bench/train_torch.py` does for PyTorch.
    /// The model and optimiser state move on; use a fresh trainer for training.
    /// - Returns: examples per second and seconds per step.
    public func benchmark(steps: Int, warmup: Int = 5) throws -> (
        examplesPerSecond: Double, secondsPerStep: Double
    ) {
        guard steps >= 1, warmup >= 0 else {
            throw TrainingError.invalidSetting(
                name: "benchmark steps", value: "\(steps)", requirement: "at least 1")
        }
        let (x, labels) = try train.batch(Array(0..<config.batchSize)[...])
        for _ in 0..<warmup { _ = try step(x, labels: labels) }
        let clock = ContinuousClock()
        let elapsed = try clock.measure {
            for _ in 0..<steps { _ = try step(x, labels: labels) }
        }
        let seconds =
            Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18
        return (Double(steps * config.batchSize) / seconds, seconds / Double(steps))
    }

    /// Loss and error rate on a data set, in inference mode.
    public func evaluate(_ data: Dataset<Float>, batchSize: Int = 256) throws -> (
        loss: Double, error: Double
    ) {
        var total = 0.0
        var correct = 0
        var start = 0
        while start < data.count {
            let end = min(data.count, start + batchSize)
            let (x, labels) = try data.batch(Array(start..<end)[...])
            let (loss, _, right) = try SoftmaxCrossEntropy.evaluate(
                try model.forward(x, mode: .inference), labels: labels)
            total += loss * Double(end - start)
            correct += right
            start = end
        }
        return (total / Double(data.count), 1 - Double(correct) / Double(data.count))
    }

    /// Progress reported while training.
    public enum Event {
        /// A step finished: epoch (1-based), step in epoch, steps per epoch, loss.
        case step(epoch: Int, step: Int, of: Int, loss: Double)
        /// An epoch finished.
        case epoch(EpochMetrics)
    }

    /// Trains until all epochs are done, `shouldStop` returns true (checked between steps; with
    /// several ranks, every rank stops after the step in which one asked), or `maximumSteps`
    /// steps of this call are done.
    /// - Returns: true when training finished, false when it was stopped.
    @discardableResult
    public func run(
        progress: (Event) -> Void = { _ in }, shouldStop: () -> Bool = { false },
        maximumSteps: Int? = nil
    ) throws
        -> Bool
    {
        let clock = ContinuousClock()
        var stepsTaken = 0
        while epoch < config.epochs {
            let indices = order(epoch: epoch)
            while batchInEpoch < stepsPerEpoch {
                // One process stops before the step; several agree on it through the step's
                // all-reduce and stop after it, all at the same step.
                let stopRequested = shouldStop()
                if stopRequested && communicator.size == 1 { return false }
                if let maximumSteps, stepsTaken >= maximumSteps { return false }
                stepsTaken += 1
                let start = batchInEpoch * config.batchSize
                var loss = 0.0
                var stopAgreed = false
                let elapsed = try clock.measure {
                    (loss, stopAgreed) = try step(
                        indices[start..<(start + config.batchSize)], requestStop: stopRequested)
                }
                guard loss.isFinite else {
                    throw TrainingError.invalidSetting(
                        name: "learning rate", value: "\(config.learningRate)",
                        requirement: "training diverged (loss \(loss))")
                }
                epochSeconds +=
                    Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds)
                    * 1e-18
                stepLosses.append(loss)
                epochLossSum += loss
                epochExamples += config.batchSize
                batchInEpoch += 1
                progress(.step(epoch: epoch + 1, step: batchInEpoch, of: stepsPerEpoch, loss: loss))
                if stopAgreed { return false }
            }
            try broadcastBuffers()
            let (testLoss, testError) = try evaluate(test)
            let metrics = EpochMetrics(
                epoch: epoch + 1, trainLoss: epochLossSum / Double(stepsPerEpoch),
                testLoss: testLoss,
                testError: testError,
                examplesPerSecond: Double(epochExamples) / max(epochSeconds, 1e-9))
            history.append(metrics)
            progress(.epoch(metrics))
            epoch += 1
            batchInEpoch = 0
            epochLossSum = 0
            epochExamples = 0
            epochSeconds = 0
        }
        return true
    }

    // MARK: - Checkpoints

    /// Writes parameters, buffers, optimiser state, position and history to a safetensors file.
    public func saveCheckpoint(to path: String) throws {
        var file = Safetensors.File()
        for p in model.parameters { file.tensors["model." + p.name] = .float32(p.value) }
        for (k, v) in model.buffers { file.tensors["buffer." + k] = .float32(v) }
        for (k, v) in optimizer.velocity { file.tensors["optimizer.velocity." + k] = .float32(v) }
        file.tensors["state.position"] = .int64(
            shape: [4],
            values: [
                Int64(epoch), Int64(batchInEpoch), Int64(optimizer.step), Int64(epochExamples),
            ])
        file.tensors["state.step_losses"] = .float64(Tensor(stepLosses))
        file.tensors["state.epoch_sums"] = .float64(Tensor([epochLossSum, epochSeconds]))
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        file.metadata["config"] = String(decoding: try encoder.encode(config), as: UTF8.self)
        file.metadata["history"] = String(decoding: try encoder.encode(history), as: UTF8.self)
        file.metadata["format"] = "normkit-checkpoint-1"
        try Safetensors.write(file, to: path)
    }

    /// Restores a trainer from a checkpoint written by ``saveCheckpoint(to:)``.
    /// - Throws: ``TrainingError/checkpoint(_:)`` or ``FileFormatError`` for a damaged file or
    ///   one that does not fit.
    public static func resume(
        from path: String, communicator: any Communicator = LocalCommunicator(),
        synchronizeBatchStatistics: Bool = false
    ) throws -> Trainer {
        let file = try Safetensors.read(contentsOf: path)
        guard file.metadata["format"] == "normkit-checkpoint-1",
            let configText = file.metadata["config"],
            let historyText = file.metadata["history"]
        else { throw TrainingError.checkpoint("\(path) is not a NormKit training checkpoint") }
        let decoder = JSONDecoder()
        let config: TrainingConfig
        let history: [EpochMetrics]
        do {
            config = try decoder.decode(TrainingConfig.self, from: Data(configText.utf8))
            history = try decoder.decode([EpochMetrics].self, from: Data(historyText.utf8))
        } catch { throw TrainingError.checkpoint("unreadable configuration or history") }
        let trainer = try Trainer(
            config, communicator: communicator,
            synchronizeBatchStatistics: synchronizeBatchStatistics)
        func damaged(_ reason: String) -> TrainingError { .checkpoint("\(path): \(reason)") }
        let names = Set(trainer.model.parameters.map(\.name))
        for key in file.tensors.keys where key.hasPrefix("model.") {
            guard names.contains(String(key.dropFirst(6))) else {
                throw damaged("'\(key)' is not a parameter of this \(config.model)")
            }
        }
        for p in trainer.model.parameters {
            guard let stored = file.tensors["model." + p.name], stored.shape == p.value.shape else {
                throw TrainingError.checkpoint(
                    "parameter \(p.name) is missing or has the wrong shape")
            }
            let value = stored.tensor(as: Float.self)
            guard value.scalars.allSatisfy({ $0.isFinite }) else {
                throw damaged("parameter \(p.name) holds NaN or infinite values")
            }
            p.value = value
        }
        var buffers: [String: Tensor<Float>] = [:]
        for (k, v) in file.tensors where k.hasPrefix("buffer.") {
            buffers[String(k.dropFirst(7))] = v.tensor(as: Float.self)
        }
        try trainer.model.loadBuffers(buffers)
        let shapes = Dictionary(
            uniqueKeysWithValues: trainer.model.parameters.map { ($0.name, $0.value.shape) })
        for (k, v) in file.tensors where k.hasPrefix("optimizer.velocity.") {
            let name = String(k.dropFirst("optimizer.velocity.".count))
            guard let shape = shapes[name] else {
                throw damaged("optimizer velocity '\(name)' belongs to no parameter")
            }
            guard v.shape == shape else {
                throw damaged(
                    "optimizer velocity '\(name)' has shape \(v.shape), its parameter \(shape)")
            }
            let velocity = v.tensor(as: Float.self)
            guard velocity.scalars.allSatisfy({ $0.isFinite }) else {
                throw damaged("optimizer velocity '\(name)' holds NaN or infinite values")
            }
            trainer.optimizer.velocity[name] = velocity
        }
        guard case .int64(let positionShape, let position)? = file.tensors["state.position"],
            positionShape == [4], position.count == 4,
            let losses = file.tensors["state.step_losses"],
            let sums = file.tensors["state.epoch_sums"]
        else { throw TrainingError.checkpoint("missing training position") }
        // The position must be one this configuration can reach: epoch ≤ epochs, a batch inside
        // the epoch, and a step count equal to the steps taken so far (each step is one update).
        let perEpoch = Int64(trainer.stepsPerEpoch)
        let (epoch, batch, step, examples) = (position[0], position[1], position[2], position[3])
        guard epoch >= 0, epoch <= Int64(config.epochs), batch >= 0,
            batch < perEpoch || (batch == 0 && epoch == Int64(config.epochs))
        else {
            throw damaged(
                "position epoch \(epoch), batch \(batch) is outside \(config.epochs) epochs of "
                    + "\(perEpoch) batches")
        }
        guard step == epoch * perEpoch + batch, examples == batch * Int64(config.batchSize) else {
            throw damaged(
                "step \(step) and \(examples) examples do not match epoch \(epoch), batch \(batch)")
        }
        // Every step gives each parameter a velocity, except parameters a layer has frozen
        // (Sparse SN's one-hot logits): a missing one would resume with zero momentum.
        if step > 0 {
            var frozen: Set<String> = []
            for slot in trainer.slots {
                guard let scheduled = slot.layer as? any ScheduledNormalizing else { continue }
                for (key, p) in zip(slot.keys, slot.parameters)
                where scheduled.frozenParameterKeys.contains(key) {
                    frozen.insert(p.name)
                }
            }
            for p in trainer.model.parameters
            where trainer.optimizer.velocity[p.name] == nil && !frozen.contains(p.name) {
                throw damaged(
                    "the optimizer velocity of '\(p.name)' is missing after \(step) steps")
            }
        }
        let stepLosses = losses.tensor(as: Double.self).scalars
        guard losses.shape == [Int(step)], stepLosses.allSatisfy({ $0.isFinite }) else {
            throw damaged("state.step_losses must hold \(step) finite losses")
        }
        let s = sums.tensor(as: Double.self).scalars
        guard sums.shape == [2], s.allSatisfy({ $0.isFinite && $0 >= 0 }) else {
            throw damaged("state.epoch_sums must hold two finite values ≥ 0")
        }
        guard history.count == Int(epoch),
            history.allSatisfy({
                $0.trainLoss.isFinite && $0.testLoss.isFinite && $0.testError.isFinite
                    && $0.examplesPerSecond.isFinite
            })
        else { throw damaged("the history must hold \(epoch) epochs of finite metrics") }
        trainer.epoch = Int(epoch)
        trainer.batchInEpoch = Int(batch)
        trainer.optimizer.step = Int(step)
        trainer.epochExamples = Int(examples)
        trainer.stepLosses = stepLosses
        trainer.epochLossSum = s[0]
        trainer.epochSeconds = s[1]
        trainer.history = history
        // Sparse SN's radius follows the step count.
        for slot in trainer.slots { for _ in 0..<trainer.optimizer.step { slot.advanceRadius() } }
        // Every rank read the file; rank 0's copy wins should they differ.
        try trainer.broadcastParameters()
        try trainer.broadcastBuffers()
        return trainer
    }
}
