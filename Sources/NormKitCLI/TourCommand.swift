import ArgumentParser
import Foundation
import NormKit

/// `normkit tour`: every normalizer on one seeded tensor, with the statistics of its output and
/// a finite-difference check of its gradients.
struct TourCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tour",
        abstract: "Normalize a seeded sample tensor with every normalizer and check every gradient."
    )

    @Option(help: "Seed of the sample tensor and the output gradient.")
    var seed: UInt64 = 42

    @Option(help: "Shape N,C,H,W of the sample tensor.")
    var shape: String = "4,6,3,3"

    func run() throws {
        // The tour keeps a few dozen tensors of this shape and checks gradients by finite
        // differences, so its limit is far below the general one.
        let dims: [Int]
        do {
            dims = try SizeLimits.parseShape(
                shape, ranks: 4...4, maximumElements: Tour.maximumElements)
        } catch { throw ValidationError(error.description) }
        print(try Tour.run(shape: dims, seed: seed))
    }
}

/// The tour's computation, as a library function that tests can call.
public enum Tour {
    /// The largest sample tensor the tour takes: the finite-difference check perturbs every
    /// element and reruns the layer, so its cost grows with the square of the element count.
    public static let maximumElements = 4096

    /// One row of the tour's table.
    public struct Row: Sendable {
        /// Layer description.
        public var name: String
        /// Statistics shape.
        public var statistics: String
        /// Mean and standard deviation of the output over each reduction set, worst case.
        public var worstMean: Double
        /// Worst |std − 1| of the output within a reduction set.
        public var worstStdError: Double
        /// Worst relative gradient error over x, γ, β.
        public var gradientError: Double
    }

    /// Runs every normalizer on a seeded `[N, C, H, W]` tensor (data ~ 3 + 2·z) and returns the
    /// printed report.
    /// - Throws: ``SizeLimits/Violation`` for a shape that is not 4 positive dimensions or
    ///   exceeds ``maximumElements``, and whatever a layer throws.
    public static func run(shape: [Int], seed: UInt64) throws -> String {
        guard shape.count == 4, shape.allSatisfy({ $0 >= 1 }) else {
            throw SizeLimits.Violation(
                name: "shape", value: "\(shape)", requirement: "needs 4 positive dimensions")
        }
        try SizeLimits.checkElements(shape, maximumElements: maximumElements)
        let rows = try rowsFor(shape: shape, seed: seed)
        var text =
            "NormKit tour: x ~ 3 + 2·N(0, 1), shape \(shape), seed \(seed), Double precision\n"
        text +=
            "Output statistics are over each layer's own reduction sets (before the affine, γ = 1, β = 0).\n"
        text += "Gradient check: central differences (h = 1e-5) of L = Σ y·dy for x, γ and β.\n\n"
        let header = [
            "normalizer", "statistics", "max |mean|", "max |std − 1|", "grad rel. error", "check",
        ]
        var table = [header]
        for row in rows {
            table.append([
                row.name, row.statistics, format(row.worstMean), format(row.worstStdError),
                format(row.gradientError), row.gradientError < 1e-6 ? "ok" : "FAIL",
            ])
        }
        let widths = (0..<header.count).map { c in table.map { $0[c].count }.max() ?? 0 }
        for (i, line) in table.enumerated() {
            text +=
                zip(line, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }
                .joined(separator: "  ") + "\n"
            if i == 0 {
                text +=
                    widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ") + "\n"
            }
        }
        return text
    }

    /// The table's rows.
    public static func rowsFor(shape: [Int], seed: UInt64) throws -> [Row] {
        var generator = SeededGenerator(seed: seed)
        let x = try Tensor<Double>.randomNormal(
            shape: shape, mean: 3, standardDeviation: 2, using: &generator)
        let dy = try Tensor<Double>.randomNormal(shape: shape, using: &generator)
        let c = shape[1]
        let groups = c % 3 == 0 ? 3 : (c % 2 == 0 ? 2 : 1)
        let layers: [(String, NormLayer<Double>)] = [
            ("BatchNorm", try BatchNorm<Double>(featureCount: c)),
            ("LayerNorm(C,H,W)", try LayerNorm<Double>(normalizedShape: Array(shape.dropFirst()))),
            ("LayerNorm2d (channels)", try LayerNorm<Double>(channelCount: c)),
            ("InstanceNorm(affine)", try InstanceNorm<Double>(featureCount: c, affine: true)),
            ("GroupNorm(\(groups))", try GroupNorm<Double>(groupCount: groups, channelCount: c)),
            ("RMSNorm(W)", try RMSNorm<Double>(normalizedShape: [shape[3]])),
            (
                "custom: std over (N,H) per (C,W)",
                try NormLayer<Double>(
                    normalizer: Normalizer(partition: .axes([0, 2])), name: "custom")
            ),
        ]
        var rows: [Row] = []
        for (name, layer) in layers {
            let (y, cache) = try layer.forward(x, mode: .training)
            let (meanError, stdError) = setStatistics(
                y, plan: cache.plan, centered: layer.normalizer.operation != .scale)
            let checks = try GradientCheck.run(layer, input: x, outputGradient: dy, mode: .training)
            rows.append(
                Row(
                    name: name, statistics: "\(cache.plan.statisticShape)", worstMean: meanError,
                    worstStdError: stdError, gradientError: checks.map(\.relativeError).max() ?? 0))
        }
        return rows
    }

    /// Worst |mean| and worst |std − 1| (RMS − 1 for uncentered) over the reduction sets.
    static func setStatistics(_ y: Tensor<Double>, plan: ReductionPlan, centered: Bool) -> (
        Double, Double
    ) {
        let index = plan.setIndices()
        var sum = [Double](repeating: 0, count: plan.setCount)
        var squares = [Double](repeating: 0, count: plan.setCount)
        for (i, v) in y.scalars.enumerated() {
            sum[index[i]] += v
            squares[index[i]] += v * v
        }
        let m = Double(plan.setSize)
        var worstMean = 0.0
        var worstStd = 0.0
        for s in 0..<plan.setCount {
            let mean = sum[s] / m
            let spread = centered ? (squares[s] / m - mean * mean) : squares[s] / m
            worstMean = max(worstMean, centered ? abs(mean) : 0)
            worstStd = max(worstStd, abs(spread.squareRoot() - 1))
        }
        return (worstMean, worstStd)
    }

    static func format(_ value: Double) -> String { String(format: "%.2e", value) }
}
