import Foundation
import NormKit
import Training

/// The studies of `normkit study`, each reproducing a claim of the normalization
/// literature on real data, with several seeds.
public enum StudyName: String, CaseIterable, Sendable, Codable {
    /// BN against batch-independent normalizers as the batch shrinks (Wu & He 2018).
    case batchSize = "batch-size"
    /// What Switchable and Sparse Switchable Normalization learn (Luo et al. 2019).
    case switchable
    /// Loss-landscape smoothness with and without BN (Santurkar et al. 2018).
    case landscape
    /// Test accuracy as channels are zeroed (Morcos et al. 2018).
    case ablation
    /// BN against population normalization with and without γ decay (Luo et al. 2019).
    case regularization
    /// Whitened layers (WNN, GWNN, EigenNet) against the exact natural gradient (Luo 2017).
    case ngd
}

/// How big a study run is, and on what.
public struct StudyOptions: Sendable, Hashable, Codable {
    /// `quick` (minutes, for CI and the demo) or `full` (the paper-shaped run).
    public enum Scale: String, Sendable, Hashable, Codable { case quick, full }
    /// The scale.
    public var scale: Scale = .quick
    /// Seeds per configuration (at least 3 for a spread).
    public var seeds = 3
    /// Data set: `fashion-mnist`, `digits` or `shapes`.
    public var dataset = "fashion-mnist"
    /// Training examples used (nil: the scale's default; all of them for `full`).
    public var trainCount: Int?
    /// Test examples used (nil: the scale's default).
    public var testCount: Int?
    /// Epochs (nil: the scale's default).
    public var epochs: Int?
    /// Channels of the network's first layer (nil: the scale's default).
    public var width: Int?
    /// Whether the regularization study also trains PN + ζ(h) with ζ estimated per channel
    /// (normalizers-spec section 9) beside ζ = 1/(2M).
    public var estimatedZeta = false

    /// Defaults: quick, 3 seeds, Fashion-MNIST.
    public init() {}

    var isQuick: Bool { scale == .quick }

    /// A training configuration with this scale's data and length.
    func config(normalizer: String, batchSize: Int, learningRate: Double, seed: Int)
        -> TrainingConfig
    {
        var c = TrainingConfig()
        c.dataset = dataset
        c.normalizer = normalizer
        c.batchSize = batchSize
        c.learningRate = learningRate
        c.seed = UInt64(seed)
        // Both scales train the same network for the same length (measured on this 2-core
        // machine: about 1,200 images per second at width 8, so a run is some 8 s and every
        // `--quick` study stays well under 15 minutes); `full` differs by the paper's whole grid
        // of batch sizes, fractions and learning rates and by a larger test set, and its five
        // studies together take under an hour (README, "Studies").
        c.epochs = epochs ?? 3
        c.width = width ?? 8
        c.shapesCount = isQuick ? 1000 : 3000
        if dataset == "fashion-mnist" {
            c.trainCount = trainCount ?? 3000
            c.testCount = testCount ?? (isQuick ? 1000 : 2000)
        } else {
            c.trainCount = trainCount
            c.testCount = testCount
        }
        return c
    }

    /// A one-line description of the data and length, for the report.
    func describe(_ c: TrainingConfig, train: Int, test: Int) -> String {
        "\(dataset), \(train) training / \(test) test images, convnet of width \(c.width), "
            + "\(c.epochs) epoch\(c.epochs == 1 ? "" : "s"), SGD momentum 0.9, cosine schedule, "
            + "\(seeds) seeds (\(scale.rawValue) scale)"
    }
}

/// Mean and spread of a few measurements (one per seed or draw).
public struct Summary: Sendable, Hashable, Codable {
    /// Arithmetic mean.
    public var mean: Double
    /// Sample standard deviation (0 for one value).
    public var std: Double
    /// Smallest value.
    public var min: Double
    /// Largest value.
    public var max: Double
    /// Number of values.
    public var count: Int

    /// Summarises `values` (non-finite values are dropped; NaN mean when none remain).
    public init(_ values: [Double]) {
        let v = values.filter(\.isFinite)
        count = v.count
        mean = v.isEmpty ? .nan : v.reduce(0, +) / Double(v.count)
        let m = mean
        std =
            v.count > 1
            ? (v.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(v.count - 1)).squareRoot() : 0
        min = v.min() ?? .nan
        max = v.max() ?? .nan
    }

    /// `12.3 ± 0.4` with `digits` decimals, scaled by `scale` (100 for percentages).
    public func text(scale: Double = 1, digits: Int = 1, unit: String = "") -> String {
        guard mean.isFinite else { return "—" }
        return String(format: "%.\(digits)f ± %.\(digits)f", mean * scale, std * scale) + unit
    }

    /// Whether `other` differs from this by more than the seeds' spread (the difference of the
    /// means exceeds twice the standard error of that difference, and a floor `floor`).
    public func differs(from other: Summary, floor: Double = 0) -> Bool {
        let se =
            (std * std / Double(Swift.max(count, 1)) + other.std * other.std
            / Double(Swift.max(other.count, 1))).squareRoot()
        return abs(mean - other.mean) > Swift.max(2 * se, floor)
    }
}

/// Plain words for a change between two measurements, with its size.
enum Wording {
    /// "rises from 0.3% to 2.2% (7.3×)", "falls from …", or "stays at … (within the seed spread)".
    static func change(
        from a: Summary, to b: Summary, scale: Double = 100, unit: String = "%", floor: Double = 0
    ) -> String {
        let fa = String(format: "%.1f", a.mean * scale) + unit
        let fb = String(format: "%.1f", b.mean * scale) + unit
        guard a.mean.isFinite, b.mean.isFinite else { return "cannot be compared (a run diverged)" }
        if !a.differs(from: b, floor: floor) {
            return "stays within the seed spread (\(fa) → \(fb))"
        }
        let ratio = a.mean > 0 ? b.mean / a.mean : .infinity
        let factor =
            ratio >= 1.5 || ratio <= 0.67
            ? String(format: ", %.1f×", ratio)
            : String(format: ", %+.1f points", (b.mean - a.mean) * scale)
        return (b.mean > a.mean ? "rises" : "falls") + " from \(fa) to \(fb)\(factor)"
    }
}

/// A table of the report.
public struct Table: Sendable, Codable, Hashable {
    /// Caption.
    public var title: String
    /// Column headers.
    public var columns: [String]
    /// Cells, row by row.
    public var rows: [[String]]
}

/// What one study measured and concluded, as data: the report renders it, and it is written
/// to `DIR/NAME.json` so that a report can be rebuilt from several runs.
public struct StudyResult: Sendable, Codable {
    /// Which study.
    public var name: StudyName
    /// Section title.
    public var title: String
    /// The paper's claim and its numbers.
    public var claim: String
    /// One sentence computed from the measurements, saying whether they match the claim.
    public var headline: String
    /// Whether the measurements agree with the paper's claim.
    public var matchesPaper: Bool
    /// Data, model and length.
    public var setup: String
    /// The command that reproduces it.
    public var command: String
    /// Wall-clock seconds.
    public var seconds: Double
    /// Tables.
    public var tables: [Table]
    /// Charts.
    public var charts: [Chart]
    /// Further observations computed from the data, and caveats.
    public var notes: [String]
    /// One row per run (the CSV file), with a header row first.
    public var runs: [[String]]
}

/// Runs a study by name.
public enum Studies {
    /// Runs `name` with `options`; `log` receives one line per finished run.
    public static func run(
        _ name: StudyName, options: StudyOptions, log: @escaping (String) -> Void = { _ in }
    ) throws -> StudyResult {
        let start = Date()
        var result: StudyResult
        switch name {
        case .batchSize: result = try BatchSizeStudy.run(options, log: log)
        case .switchable: result = try SwitchableStudy.run(options, log: log)
        case .landscape: result = try LandscapeStudy.run(options, log: log)
        case .ablation: result = try AblationStudy.run(options, log: log)
        case .regularization: result = try RegularizationStudy.run(options, log: log)
        case .ngd: result = try NGDStudy.run(options, log: log)
        }
        result.seconds = Date().timeIntervalSince(start)
        var command = "normkit study \(name.rawValue) --\(options.scale.rawValue)"
        command += " --seeds \(options.seeds) --dataset \(options.dataset)"
        if let t = options.trainCount { command += " --train-count \(t)" }
        if let t = options.testCount { command += " --test-count \(t)" }
        if let e = options.epochs { command += " --epochs \(e)" }
        if let w = options.width { command += " --width \(w)" }
        if options.estimatedZeta && name == .regularization { command += " --estimated-zeta" }
        result.command = command
        return result
    }

    /// Trains one configuration; a diverged run (non-finite loss) returns nil metrics instead
    /// of throwing.
    static func train(_ config: TrainingConfig, onEpoch: (Trainer) -> Void = { _ in }) throws
        -> (trainer: Trainer, diverged: Bool)
    {
        let trainer = try Trainer(config)
        do {
            try trainer.run(progress: { event in
                if case .epoch = event { onEpoch(trainer) }
            })
            return (trainer, false)
        } catch TrainingError.invalidSetting(let name, _, _) where name == "learning rate" {
            return (trainer, true)
        }
    }

    static func percent(_ x: Double) -> String { String(format: "%.1f%%", 100 * x) }
}
