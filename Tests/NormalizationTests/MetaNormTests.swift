import NormKit
import NormTestSupport
import Testing

/// MetaNorm against the spec's matrix form in PyTorch (Ū M V̄ with autograd), its special cases
/// against the standard layers, and finite differences.
@Suite("MetaNorm")
struct MetaNormTests {
    static let cases = RawFixture.names("metanorm")

    static func aggregation(_ kind: String) -> StatisticsAggregation {
        let parts = kind.split(separator: "/").map(String.init)
        let batch: StatisticsAggregation.BatchAggregation = parts[0] == "I" ? .identity : .all
        let channel: StatisticsAggregation.ChannelAggregation =
            parts[1] == "I"
            ? .identity : parts[1] == "all" ? .all : .groups(Int(parts[1].dropFirst())!)
        return StatisticsAggregation(batch: batch, channel: channel)
    }

    static func kinds(_ name: String) -> [String] {
        // The fixture's spec lists the kinds; the file's metadata holds it as JSON text.
        let f = try? RawFixture.load(name)
        guard let text = f?.file.metadata["spec"], let start = text.range(of: "\"kinds\": [") else {
            return []
        }
        let rest = text[start.upperBound...]
        let list = rest[..<rest.firstIndex(of: "]")!]
        return list.split(separator: ",").map {
            $0.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "\"", with: "")
        }
    }

    static func check<T: NormScalar>(_ name: String, as _: T.Type, tolerance: Double) throws {
        let f = try RawFixture.load(name)
        let x: Tensor<T> = f.tensor("x")
        let layer = try MetaNorm<T>(
            channelCount: x.shape[1], aggregations: kinds(name).map(aggregation))
        try layer.load([
            "weight": f.tensor("weight"), "bias": f.tensor("bias"),
            "mean_weight": f.tensor("mean_weight"),
            "var_weight": f.tensor("var_weight"),
        ])
        let (y, cache) = try layer.forward(x, mode: .training)
        let g = try layer.backward(f.tensor("dy"), cache: cache)
        for (label, actual, key) in [
            ("y", y, "y"), ("dx", g.input, "dx"), ("dweight", g.scale, "dweight"),
            ("dbias", g.offset, "dbias"),
            ("dmean_weight", g.meanLogits, "dmean_weight"),
            ("dvar_weight", g.varianceLogits, "dvar_weight"),
        ] {
            let c = Comparison(actual.scalars, (f.tensor(key) as Tensor<Double>).scalars)
            #expect(c.relative <= tolerance, "\(name) \(label): \(c)")
        }
    }

    @Test(arguments: cases)
    func doubleMatchesTheMatrixForm(_ name: String) throws {
        // The matrix form's Ū Q V̄ − μ² loses digits at an offset of 1000 (see SwitchableNormTests).
        try Self.check(name, as: Double.self, tolerance: name.contains("offset") ? 1e-6 : 1e-9)
    }

    @Test(arguments: cases)
    func floatMatchesTheMatrixForm(_ name: String) throws {
        try Self.check(name, as: Float.self, tolerance: name.contains("offset") ? 1e-3 : 2e-4)
    }

    @Test func specialCasesEqualTheStandardLayers() throws {
        var g = SeededGenerator(seed: 5)
        let x = try Tensor<Double>.randomNormal(
            shape: [3, 4, 2, 3], mean: 2, standardDeviation: 3, using: &g)
        let pairs: [(StatisticsAggregation, NormLayer<Double>)] = [
            (.instance, try InstanceNorm<Double>(featureCount: 4)),
            (.batchNorm, try BatchNorm<Double>(featureCount: 4, affine: false)),
            (.layer, try GroupNorm<Double>(groupCount: 1, channelCount: 4, affine: false)),
            (.group(2), try GroupNorm<Double>(groupCount: 2, channelCount: 4, affine: false)),
        ]
        for (aggregation, layer) in pairs {
            let meta = try MetaNorm<Double>(channelCount: 4, aggregations: [aggregation])
            let c = Comparison(
                try meta.forward(x, mode: .training).output.scalars,
                try layer.forward(x, mode: .training).output.scalars)
            #expect(c.relative < 1e-12, "\(aggregation): \(c)")
        }
    }

    @Test func gradientsMatchFiniteDifferences() throws {
        var g = SeededGenerator(seed: 6)
        let x = try Tensor<Double>.randomNormal(shape: [2, 4, 3], mean: 1, using: &g)
        let layer = try MetaNorm<Double>(
            channelCount: 4, aggregations: [.instance, .batchNorm, .layer, .group(2)])
        layer.meanLogits = Tensor([0.3, -0.2, 0.5, 0.1])
        layer.varianceLogits = Tensor([-0.4, 0.2, 0.0, 0.3])
        layer.scale = Tensor([1.5, 0.5, -1, 2])
        try Conformance.checkGradients(layer, input: x, mode: .training, tolerance: 1e-6)
    }

    @Test func groupsThatDoNotDivideAreRefused() {
        #expect(throws: NormError.groupsDoNotDivideChannels(groups: 3, channels: 4)) {
            _ = try MetaNorm<Float>(channelCount: 4, aggregations: [.group(3)])
        }
    }
}
