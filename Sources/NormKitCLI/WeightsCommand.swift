import ArgumentParser
import Foundation
import NormKit

/// `normkit weights`: what a learned normalizer chose, read from its parameters.
struct WeightsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weights",
        abstract:
            "Print the importance weights of a Switchable, Sparse Switchable or Meta normalizer.",
        discussion: """
            Reads mean_weight and var_weight from a parameter file (any prefix: every pair \
            <prefix>mean_weight / <prefix>var_weight is one layer) and prints the mixture weights: \
            softmax for switchnorm and metanorm, SparsestMax with the file's radius (or --radius) for \
            sparseswitchnorm.
            """)

    @Argument(help: "switchnorm, sparseswitchnorm or metanorm.")
    var layer: String

    @Option(help: "Parameter file (.safetensors).")
    var params: String

    @Option(help: "sparseswitchnorm: the radius (default: the file's radius, else 0).")
    var radius: Double?

    @Option(help: "metanorm: the aggregation names, e.g. in,bn,ln,gn2.")
    var aggregations: String = "in,bn,ln,gn2"

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let file = try Safetensors.read(contentsOf: params)
        let report = try ImportanceReport.read(
            file, layer: layer, radius: radius, aggregations: aggregations)
        print(json ? report.json : report.text)
    }
}

/// The importance weights of every learned layer in a parameter file.
public struct ImportanceReport: Sendable {
    /// One layer's weights.
    public struct Entry: Sendable {
        /// The key prefix (empty for a single layer).
        public var prefix: String
        /// Component names.
        public var components: [String]
        /// Mean-mixture weights.
        public var mean: [Double]
        /// Variance-mixture weights.
        public var variance: [Double]
    }

    /// The layers, sorted by prefix.
    public var entries: [Entry]

    /// Reads every `<prefix>mean_weight` / `<prefix>var_weight` pair.
    public static func read(
        _ file: Safetensors.File, layer: String, radius: Double?, aggregations: String
    ) throws -> ImportanceReport {
        guard ["switchnorm", "sparseswitchnorm", "metanorm"].contains(layer) else {
            throw ValidationError(
                "weights reads switchnorm, sparseswitchnorm or metanorm parameters, not '\(layer)'")
        }
        if let radius {
            try HyperparameterCheck.finite(radius, in: 0...1, name: "--radius")
        }
        let prefixes = file.tensors.keys.filter { $0.hasSuffix("mean_weight") }.map {
            String($0.dropLast("mean_weight".count))
        }
        guard !prefixes.isEmpty else {
            throw FileFormatError.missingTensor(
                name: "mean_weight", available: Array(file.tensors.keys))
        }
        var entries: [Entry] = []
        for prefix in prefixes.sorted() {
            let mean: Tensor<Double> = try file.tensor(prefix + "mean_weight")
            let variance: Tensor<Double> = try file.tensor(prefix + "var_weight")
            for (name, t) in [("mean_weight", mean), ("var_weight", variance)]
            where !t.scalars.allSatisfy({ $0.isFinite }) {
                throw ValidationError("\(prefix)\(name) holds NaN or infinite logits")
            }
            let k = mean.count
            let names: [String]
            let weights: (Tensor<Double>) -> [Double]
            if layer == "metanorm" {
                names = aggregations.split(separator: ",").map { String($0).uppercased() }
                weights = { MixtureWeights.softmax($0.scalars) }
            } else {
                names = k == 2 ? ["IN", "LN"] : ["IN", "LN", "BN"]
                let fileRadius = (try? file.tensor(prefix + "radius", as: Double.self))?.scalars
                    .first
                let r = radius ?? fileRadius ?? 0
                guard r.isFinite, r >= 0, r <= 1 else {
                    throw ValidationError(
                        "\(prefix)radius is \(r); a SparsestMax radius must lie in [0, 1]")
                }
                weights = { t in
                    if layer == "sparseswitchnorm" {
                        return SparsestMax.evaluate(t.scalars, radius: r).p
                    }
                    return MixtureWeights.softmax(t.scalars)
                }
            }
            guard names.count == k else {
                throw ValidationError(
                    "\(prefix)mean_weight has \(k) logits but \(names.count) component names")
            }
            entries.append(
                Entry(
                    prefix: prefix, components: names, mean: weights(mean),
                    variance: weights(variance)))
        }
        return ImportanceReport(entries: entries)
    }

    /// A table: one row per layer and mixture.
    public var text: String {
        var lines: [String] = []
        for e in entries {
            let label =
                e.prefix.isEmpty
                ? "layer" : String(e.prefix.dropLast(e.prefix.hasSuffix(".") ? 1 : 0))
            for (kind, w) in [("mean", e.mean), ("variance", e.variance)] {
                let parts = zip(e.components, w).map { "\($0) " + String(format: "%.3f", $1) }
                lines.append("\(label) \(kind): " + parts.joined(separator: "  "))
            }
        }
        return lines.joined(separator: "\n")
    }

    /// JSON: a list of {"layer", "components", "mean", "variance"}.
    ///
    /// Strings are escaped and a weight that is not finite (which ``read(_:layer:radius:aggregations:)``
    /// refuses for finite logits) is written as `null`, so the text is always valid JSON.
    public var json: String {
        func string(_ text: String) -> String {
            var out = "\""
            for scalar in text.unicodeScalars {
                switch scalar {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case "\r": out += "\\r"
                case "\t": out += "\\t"
                default:
                    if scalar.value < 0x20 {
                        out += "\\u00" + String(scalar.value, radix: 16).leftPadded(to: 2)
                    } else {
                        out.unicodeScalars.append(scalar)
                    }
                }
            }
            return out + "\""
        }
        func numbers(_ values: [Double]) -> String {
            values.map { $0.isFinite ? String($0) : "null" }.joined(separator: ",")
        }
        let items = entries.map { e in
            "{\"layer\":\(string(e.prefix)),\"components\":["
                + e.components.map(string).joined(separator: ",") + "],"
                + "\"mean\":[\(numbers(e.mean))],\"variance\":[\(numbers(e.variance))]}"
        }
        return "[" + items.joined(separator: ",") + "]"
    }
}

extension String {
    /// The string with leading zeros up to `width` characters.
    fileprivate func leftPadded(to width: Int) -> String {
        String(repeating: "0", count: max(0, width - count)) + self
    }
}
