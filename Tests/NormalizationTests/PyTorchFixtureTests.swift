import NormKit
import NormTestSupport
import Testing

/// Golden values from PyTorch (float64), written by `Tools/generate_fixtures.py`.
///
/// Each case replays the generator's earlier training batches, then compares the final call's
/// output, input gradient, parameter gradients and running statistics with PyTorch's, in both
/// precisions.
@Suite("PyTorch golden fixtures")
struct PyTorchFixtureTests {
    /// Double computes everything in Double: only summation order differs from PyTorch.
    static let doubleTolerance = 1e-9
    /// Float on plain data: the output is rounded to Float (2⁻²⁴ ≈ 6e-8) after Double arithmetic.
    static let floatTolerance = 1e-4
    /// Float on 1000 + 0.05·noise: the issue's bound, relative to the output's scale.
    static let floatOffsetTolerance = 1e-3

    static let allCases: [String] = StandardLayer.allCases.flatMap(Fixtures.names)

    @Test func everyStandardLayerHasAtLeastEightCases() {
        for layer in StandardLayer.allCases {
            #expect(Fixtures.names(layer).count >= 8, "\(layer) has too few fixtures")
        }
        #expect(Self.allCases.count >= 100)
    }

    @Test(arguments: allCases)
    func doubleMatchesPyTorch(_ name: String) throws {
        try check(Fixtures.load(name), as: Double.self, tolerance: Self.doubleTolerance)
    }

    @Test(arguments: allCases)
    func floatMatchesPyTorch(_ name: String) throws {
        let fixture = try Fixtures.load(name)
        let tolerance = fixture.spec.offset >= 100 ? Self.floatOffsetTolerance : Self.floatTolerance
        try check(fixture, as: Float.self, tolerance: tolerance)
    }

    func check<T: NormScalar>(_ fixture: Fixture, as _: T.Type, tolerance: Double) throws {
        // RMSNorm's default ε is the machine epsilon of the dtype; the golden values were made
        // in float64, so the Float path uses float64's ε to compute the same function.
        let epsilon =
            fixture.layer == .rmsnorm && fixture.spec.epsilon == nil ? Double.ulpOfOne : nil
        let layer = try fixture.makeLayer(as: T.self, epsilon: epsilon)
        for step in 0..<fixture.spec.steps {
            _ = try layer.forward(fixture.tensor("x.\(step)", as: T.self), mode: .training)
        }
        let mode: Mode = fixture.spec.isEval ? .inference : .training
        let (y, cache) = try layer.forward(fixture.tensor("x", as: T.self), mode: mode)
        let grads = try layer.backward(fixture.tensor("dy", as: T.self), cache: cache)

        func expectClose(_ label: String, _ actual: Tensor<T>?, _ key: String) {
            guard let actual else {
                Issue.record("\(fixture): \(label) missing")
                return
            }
            let expected: Tensor<Double> = fixture.tensor(key)
            #expect(actual.shape == expected.shape, "\(fixture) \(label) shape")
            let c = Comparison(actual.scalars, expected.scalars)
            #expect(c.relative <= tolerance, "\(fixture) \(label): \(c)")
        }
        expectClose("y", y, "y")
        expectClose("dx", grads.input, "dx")
        if fixture.has("dweight") { expectClose("dweight", grads.scale, "dweight") }
        if fixture.has("dbias") { expectClose("dbias", grads.offset, "dbias") }
        #expect(fixture.has("dweight") == (grads.scale != nil), "\(fixture): weight presence")
        if fixture.has("running_mean.out") {
            expectClose("running_mean", layer.runningStatistics?.mean, "running_mean.out")
            expectClose("running_var", layer.runningStatistics?.variance, "running_var.out")
            #expect(
                layer.runningStatistics?.batchesTracked
                    == fixture.integer("num_batches_tracked.out"))
        } else {
            #expect(layer.runningStatistics == nil, "\(fixture): unexpected running statistics")
        }
    }
}
