import NormKit
import NormTestSupport
import Testing

/// The worked example of CONTRIBUTING.md ("Adding a normalizer"), compiled and checked, so that
/// the guide stays true.
struct CenterNormBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws
        -> any Normalizing<T>
    {
        guard let features = request.inputShape.last else {
            throw NormError.invalidRank(
                layer: "CenterNorm", expected: "rank ≥ 1", shape: request.inputShape)
        }
        return try NormLayer<T>(
            normalizer: Normalizer(
                partition: .layer(trailing: 1), operation: .center,
                recovery: .elementwiseAffine(shape: [features])),
            trailingShape: [features], name: "CenterNorm")
    }
}

@Suite("CONTRIBUTING.md's worked example")
struct ContributingExampleTests {
    static let registry = NormalizerRegistry(
        NormalizerRegistry.all.entries + [
            NormalizerEntry(
                "centernorm", summary: "Mean subtraction over the last dimension",
                builder: CenterNormBuilder())
        ])

    @Test func theNewEntryBuildsAndPassesTheConformanceChecks() throws {
        var g = SeededGenerator(seed: 2)
        let x = try Tensor<Double>.randomNormal(shape: [4, 5], mean: 3, using: &g)
        let layer = try Self.registry.make(
            "centernorm", NormalizerRequest(inputShape: x.shape), as: Double.self)
        let y = try layer.normalize(x, mode: .training)
        for row in 0..<4 {
            let mean = (0..<5).map { y[row, $0] }.reduce(0, +) / 5
            #expect(abs(mean) < 1e-12)
        }
        try Conformance.checkGradients(layer, input: x, mode: .training)
        try Conformance.checkFastMatchesReference(
            {
                try Self.registry.make(
                    "centernorm", NormalizerRequest(inputShape: [4, 5]), as: Float.self)
            }, input: x.converted(to: Float.self))
    }
}
