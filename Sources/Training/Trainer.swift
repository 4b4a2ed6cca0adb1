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

    /// Defaults.
    public init() {}
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
    var epochLossSum = 0.0
    var epochExamples = 0
    var epochSeconds = 0.0

    /// Builds data, network and optimiser.
    /// - Throws: ``TrainingError`` for an unknown name, a batch larger than the training set, or
    ///   another invalid setting.
    public init(_ config: TrainingConfig) throws {
        self.config = config
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
        guard config.epochs >= 1, config.learningRate > 0, config.learningRate.isFinite,
            config.batchSize >= 1
        else {
            throw TrainingError.invalidSetting(
                name: "training",
                value:
                    "epochs \(config.epochs), lr \(config.learningRate), batch \(config.batchSize)",
                requirement: "epochs ≥ 1, a positive finite learning rate, batch size ≥ 1")
        }
        (train, test) = try Datasets.split(for: config)
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
            weightNorm: weightNorm, as: Float.self)
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

    /// One training step on the batch `indices`; returns the loss.
    func step(_ indices: ArraySlice<Int>) throws -> Double {
        let (x, labels) = try train.batch(indices)
        return try step(x, labels: labels)
    }

    /// One training step on a batch (`x` `[N, C, H, W]`, N labels); returns the loss.
    public func step(_ x: Tensor<Float>, labels: [Int]) throws -> Double {
        for slot in slots { slot.advanceRadius() }
        let logits = try model.forward(x, mode: .training)
        let (loss, gradient, _) = try SoftmaxCrossEntropy.evaluate(logits, labels: labels)
        _ = try model.backward(gradient)
        try optimizer.update(model.parameters)
        return loss
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

    /// Trains until all epochs are done or `shouldStop` returns true (checked between steps).
    /// - Returns: true when training finished, false when it was stopped.
    @discardableResult
    public func run(progress: (Event) -> Void = { _ in }, shouldStop: () -> Bool = { false }) throws
        -> Bool
    {
        let clock = ContinuousClock()
        while epoch < config.epochs {
            let indices = order(epoch: epoch)
            while batchInEpoch < stepsPerEpoch {
                if shouldStop() { return false }
                let start = batchInEpoch * config.batchSize
                var loss = 0.0
                let elapsed = try clock.measure {
                    loss = try step(indices[start..<(start + config.batchSize)])
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
            }
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
    public static func resume(from path: String) throws -> Trainer {
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
        let trainer = try Trainer(config)
        for p in trainer.model.parameters {
            guard let stored = file.tensors["model." + p.name], stored.shape == p.value.shape else {
                throw TrainingError.checkpoint(
                    "parameter \(p.name) is missing or has the wrong shape")
            }
            p.value = stored.tensor(as: Float.self)
        }
        var buffers: [String: Tensor<Float>] = [:]
        for (k, v) in file.tensors where k.hasPrefix("buffer.") {
            buffers[String(k.dropFirst(7))] = v.tensor(as: Float.self)
        }
        try trainer.model.loadBuffers(buffers)
        for (k, v) in file.tensors where k.hasPrefix("optimizer.velocity.") {
            trainer.optimizer.velocity[String(k.dropFirst("optimizer.velocity.".count))] = v.tensor(
                as: Float.self)
        }
        guard case .int64(_, let position)? = file.tensors["state.position"], position.count == 4,
            let losses = file.tensors["state.step_losses"],
            let sums = file.tensors["state.epoch_sums"]
        else { throw TrainingError.checkpoint("missing training position") }
        trainer.epoch = Int(position[0])
        trainer.batchInEpoch = Int(position[1])
        trainer.optimizer.step = Int(position[2])
        trainer.epochExamples = Int(position[3])
        trainer.stepLosses = losses.tensor(as: Double.self).scalars
        let s = sums.tensor(as: Double.self).scalars
        trainer.epochLossSum = s[0]
        trainer.epochSeconds = s[1]
        trainer.history = history
        // Sparse SN's radius follows the step count.
        for slot in trainer.slots { for _ in 0..<trainer.optimizer.step { slot.advanceRadius() } }
        return trainer
    }
}
