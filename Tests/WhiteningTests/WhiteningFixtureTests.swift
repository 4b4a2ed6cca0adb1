import NormKit
import NormTestSupport
import Testing

@testable import Whitening

/// DBN (ZCA through torch.linalg.eigh), IterNorm and Switchable Whitening against PyTorch
/// versions of their official forward passes, with autograd gradients.
@Suite("Whitening against PyTorch")
struct WhiteningFixtureTests {
    static let cases =
        RawFixture.names("dbn") + RawFixture.names("iternorm") + RawFixture.names("switchwhiten")

    static func run<T: NormScalar>(_ f: RawFixture, as _: T.Type) throws -> [(
        String, Tensor<T>, String
    )] {
        let x: Tensor<T> = f.tensor("x")
        let dy: Tensor<T> = f.tensor("dy")
        let c = x.shape[1]
        let group = Int(f.number("group") ?? Double(c))
        let weight: Tensor<T> = f.tensor("weight")
        let bias: Tensor<T> = f.tensor("bias")
        if f.name.hasPrefix("dbn") {
            let layer = try DecorrelatedBatchNorm<T>(channelCount: c, groupSize: group)
            layer.scale = weight
            layer.offset = bias
            let (y, cache) = try layer.forward(x, mode: .training)
            let g = try layer.backward(dy, cache: cache)
            return [
                ("y", y, "y"), ("dx", g.input, "dx"), ("dweight", g.scale!, "dweight"),
                ("dbias", g.offset!, "dbias"),
            ]
        }
        if f.name.hasPrefix("iternorm") {
            let layer = try IterNorm<T>(
                channelCount: c, groupSize: group, iterations: Int(f.number("T") ?? 5))
            layer.scale = weight
            layer.offset = bias
            let (y, cache) = try layer.forward(x, mode: .training)
            let g = try layer.backward(dy, cache: cache)
            return [
                ("y", y, "y"), ("dx", g.input, "dx"), ("dweight", g.scale!, "dweight"),
                ("dbias", g.offset!, "dbias"),
            ]
        }
        let layer = try SwitchableWhitening<T>(
            channelCount: c, groupSize: group, type: Int(f.number("type") ?? 5),
            iterations: Int(f.number("T") ?? 5))
        layer.scale = weight
        layer.offset = bias
        layer.meanLogits = f.tensor("sw_mean_weight")
        layer.varianceLogits = f.tensor("sw_var_weight")
        let (y, cache) = try layer.forward(x, mode: .training)
        let g = try layer.backward(dy, cache: cache)
        return [
            ("y", y, "y"), ("dx", g.input, "dx"), ("dweight", g.scale, "dweight"),
            ("dbias", g.offset, "dbias"),
            ("dsw_mean_weight", g.meanLogits, "dsw_mean_weight"),
            ("dsw_var_weight", g.varianceLogits, "dsw_var_weight"),
        ]
    }

    @Test(arguments: cases)
    func doubleMatchesPyTorch(_ name: String) throws {
        let f = try RawFixture.load(name)
        for (label, actual, key) in try Self.run(f, as: Double.self) {
            let c = Comparison(actual.scalars, (f.tensor(key) as Tensor<Double>).scalars)
            // Eigenvectors and Newton iterates accumulate more rounding than a standardization.
            #expect(c.relative < 1e-8, "\(name) \(label): \(c)")
        }
    }

    @Test(arguments: cases)
    func floatMatchesPyTorch(_ name: String) throws {
        let f = try RawFixture.load(name)
        for (label, actual, key) in try Self.run(f, as: Float.self) {
            let c = Comparison(actual.scalars, (f.tensor(key) as Tensor<Double>).scalars)
            #expect(c.relative < 1e-3, "\(name) \(label): \(c)")
        }
    }
}
