import NormKit
import NormTestSupport
import Testing

/// IBN-a against the official composition of PyTorch's InstanceNorm (affine) and BatchNorm.
@Suite("IBN-Net")
struct IBNTests {
    static let cases = RawFixture.names("ibn")

    static func check<T: NormScalar>(_ f: RawFixture, as _: T.Type, tolerance: Double) throws {
        let x: Tensor<T> = f.tensor("x")
        let layout: Layout = f.string("layout") == "nhwc" ? .channelsLast : .channelsFirst
        let ibn = try IBN<T>(
            channelCount: x.shape[layout.channelAxis(rank: x.rank)],
            ratio: f.number("ratio") ?? 0.5, layout: layout)
        try ibn.load([
            "IN.weight": f.tensor("IN.weight"), "IN.bias": f.tensor("IN.bias"),
            "BN.weight": f.tensor("BN.weight"),
            "BN.bias": f.tensor("BN.bias"), "BN.running_mean": f.tensor("BN.running_mean.in"),
            "BN.running_var": f.tensor("BN.running_var.in"),
        ])
        for k in 0..<Int(f.number("steps") ?? 0) {
            _ = try ibn.forward(f.tensor("x.\(k)", as: T.self), mode: .training)
        }
        let (y, cache) = try ibn.forward(
            x, mode: f.string("mode") == "eval" ? .inference : .training)
        let g = try ibn.backward(f.tensor("dy"), cache: cache)
        let state = ibn.state().tensors
        for (label, actual, key) in [
            ("y", y, "y"), ("dx", g.input, "dx"), ("dIN.weight", g.instance.scale!, "dIN.weight"),
            ("dIN.bias", g.instance.offset!, "dIN.bias"),
            ("dBN.weight", g.batch.scale!, "dBN.weight"),
            ("dBN.bias", g.batch.offset!, "dBN.bias"),
            ("running_mean", state["BN.running_mean"]!, "BN.running_mean.out"),
            ("running_var", state["BN.running_var"]!, "BN.running_var.out"),
        ] {
            let c = Comparison(actual.scalars, (f.tensor(key) as Tensor<Double>).scalars)
            #expect(c.relative <= tolerance, "\(f) \(label): \(c)")
        }
    }

    @Test(arguments: cases)
    func doubleMatchesTheOfficialModule(_ name: String) throws {
        try Self.check(RawFixture.load(name), as: Double.self, tolerance: 1e-9)
    }

    @Test(arguments: cases)
    func floatMatchesTheOfficialModule(_ name: String) throws {
        let f = try RawFixture.load(name)
        try Self.check(f, as: Float.self, tolerance: (f.number("offset") ?? 0) > 0 ? 1e-3 : 1e-4)
    }

    @Test func ratiosThatLeaveAPartEmptyAreRefused() {
        #expect(throws: NormError.self) { _ = try IBN<Float>(channelCount: 1) }
        #expect(throws: NormError.self) { _ = try IBN<Float>(channelCount: 4, ratio: 1) }
        #expect(throws: NormError.self) { _ = try IBN<Float>(channelCount: 4, ratio: 0.1) }
    }

    @Test func aBatchNormFailureChangesNothing() throws {
        let ibn = try IBN<Double>(channelCount: 4)
        let before = ibn.state().tensors
        // One sample with one position: BatchNorm's half throws; the running stats stay.
        #expect(throws: NormError.self) {
            _ = try ibn.forward(try Tensor(zeros: [1, 4, 1]), mode: .training)
        }
        #expect(ibn.state().tensors == before)
        #expect(throws: NormError.self) {
            try ibn.load(["IN.weight": Tensor([1, 1]), "BN.weight": Tensor([1])])
        }
        #expect(ibn.state().tensors == before)
    }
}
