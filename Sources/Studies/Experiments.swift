import Foundation
import NormKit
import Training

/// The studies `normkit demo` runs, as data (the report renders them).
public enum Experiments {
    /// Sizes and lengths of the studies.
    public struct Plan: Sendable {
        /// Normalizers compared over batch sizes.
        public var normalizers: [String]
        /// Batch sizes (learning rate scaled linearly from 0.1 at 32, as Wu & He 2018).
        public var batchSizes: [Int]
        /// Epochs of each batch-size run.
        public var epochs: Int
        /// Epochs of each optimisation-study run.
        public var optimisationEpochs: Int
        /// Learning rates of the optimisation study (normal, high).
        public var learningRates: [Double]
        /// Shapes images for the optimisation study.
        public var shapesCount: Int

        /// The full demo (a few minutes on 2 cores).
        public static let full = Plan(
            normalizers: ["bn", "gn", "ln", "in", "none", "sn", "ssn", "kn"],
            batchSizes: [2, 4, 8, 16, 32], epochs: 4,
            optimisationEpochs: 4, learningRates: [0.02, 0.2], shapesCount: 2000)
        /// A quick version for tests (well under a minute).
        public static let quick = Plan(
            normalizers: ["bn", "gn", "none", "sn", "kn"], batchSizes: [4, 32], epochs: 1,
            optimisationEpochs: 1,
            learningRates: [0.02, 0.2], shapesCount: 400)
    }

    /// One run of the batch-size study.
    public struct BatchSizeRun: Sendable {
        /// Normalizer name.
        public var normalizer: String
        /// Batch size.
        public var batchSize: Int
        /// Final test error.
        public var testError: Double
        /// Whether training diverged (loss not finite).
        public var diverged: Bool
        /// Importance weights per normalizer slot at the end (SN, SSN), and per epoch.
        public var weights: [SlotWeights]
        /// The same, after every epoch: `weightHistory[e][slot]`.
        public var weightHistory: [[SlotWeights]]
    }

    /// What one SN/SSN slot chose.
    public struct SlotWeights: Sendable {
        /// The slot's name.
        public var slot: String
        /// Component names.
        public var components: [String]
        /// Mean weights.
        public var mean: [Double]
        /// Variance weights.
        public var variance: [Double]
    }

    /// One loss curve of the optimisation study.
    public struct LossCurve: Sendable {
        /// `bn` or `none`.
        public var normalizer: String
        /// Learning rate.
        public var learningRate: Double
        /// Training loss per step (NaN after divergence).
        public var losses: [Double]
        /// Final test error (1 when diverged).
        public var testError: Double
    }

    /// Everything the demo measured.
    public struct Results: Sendable {
        /// Batch-size study runs.
        public var batchSize: [BatchSizeRun]
        /// Optimisation study curves.
        public var curves: [LossCurve]
        /// Seconds the studies took.
        public var seconds: Double
        /// The plan.
        public var plan: Plan
    }

    static func slotWeights(_ trainer: Trainer) -> [SlotWeights] {
        trainer.slots.compactMap { slot in
            slot.importanceWeights.map {
                SlotWeights(
                    slot: slot.name, components: $0.components, mean: $0.mean, variance: $0.variance
                )
            }
        }
    }

    /// Runs the studies; `log` receives one line per finished run.
    public static func run(_ plan: Plan, seed: UInt64 = 1, log: (String) -> Void = { _ in }) throws
        -> Results
    {
        let start = Date()
        var runs: [BatchSizeRun] = []
        for normalizer in plan.normalizers {
            for batchSize in plan.batchSizes {
                var config = TrainingConfig()
                config.dataset = "digits"
                config.normalizer = normalizer
                config.batchSize = batchSize
                config.epochs = plan.epochs
                config.learningRate = 0.1 * Double(batchSize) / 32
                config.seed = seed
                let trainer = try Trainer(config)
                var history: [[SlotWeights]] = []
                var diverged = false
                do {
                    try trainer.run(progress: { event in
                        if case .epoch = event { history.append(slotWeights(trainer)) }
                    })
                } catch TrainingError.invalidSetting {
                    diverged = true
                }
                let error = diverged ? 1 : (trainer.history.last?.testError ?? 1)
                runs.append(
                    BatchSizeRun(
                        normalizer: normalizer, batchSize: batchSize, testError: error,
                        diverged: diverged,
                        weights: slotWeights(trainer), weightHistory: history))
                log(
                    "batch-size study: \(normalizer) at batch \(batchSize): test error \(String(format: "%.3f", error))"
                )
            }
        }
        var curves: [LossCurve] = []
        for normalizer in ["bn", "none"] {
            for lr in plan.learningRates {
                var config = TrainingConfig()
                config.dataset = "shapes"
                config.shapesCount = plan.shapesCount
                config.normalizer = normalizer
                config.batchSize = 32
                config.epochs = plan.optimisationEpochs
                config.learningRate = lr
                config.schedule = "constant"
                config.seed = seed
                let trainer = try Trainer(config)
                var error = 1.0
                do {
                    try trainer.run()
                    error = trainer.history.last?.testError ?? 1
                } catch TrainingError.invalidSetting {
                    error = 1
                }
                var losses = trainer.stepLosses
                let total = trainer.stepsPerEpoch * plan.optimisationEpochs
                if losses.count < total {
                    losses += [Double](repeating: .nan, count: total - losses.count)
                }
                curves.append(
                    LossCurve(
                        normalizer: normalizer, learningRate: lr, losses: losses, testError: error))
                log(
                    "optimisation study: \(normalizer) at lr \(lr): test error \(String(format: "%.3f", error))"
                )
            }
        }
        return Results(
            batchSize: runs, curves: curves, seconds: Date().timeIntervalSince(start), plan: plan)
    }
}
