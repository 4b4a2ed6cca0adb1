import NormKit
import NormTestSupport
import Testing

/// The learned normalizers on the fast Float kernels against the same layers on the reference
/// kernel: awkward sizes, both layouts where supported, forward and backward.
@Suite("Learned normalizers: fast kernels equal the reference")
struct LearnedKernelParityTests {
    static let tolerance = 2e-5

    static let shapes: [[Int]] = [
        [2, 3, 1, 1], [3, 7, 17], [2, 16, 3, 5], [5, 17, 63], [1, 65, 2, 3], [4, 3, 7, 7],
    ]

    static func expectClose(_ a: Tensor<Float>, _ b: Tensor<Float>, _ label: String) {
        let c = Comparison(a.scalars, b.scalars)
        #expect(c.relative < tolerance, "\(label): \(c)")
    }

    static func data(_ shape: [Int]) throws -> (Tensor<Float>, Tensor<Float>) {
        var g = SeededGenerator(seed: 31)
        return (
            try Tensor<Float>.randomNormal(shape: shape, mean: 2, standardDeviation: 3, using: &g),
            try Tensor<Float>.randomNormal(shape: shape, using: &g)
        )
    }

    @Test(arguments: shapes)
    func switchableNorm(_ shape: [Int]) throws {
        let (x, dy) = try Self.data(shape)
        for weighting in [SwitchableNorm<Float>.Weighting.softmax, .sparsestMax] {
            var results: [(Tensor<Float>, SwitchableNorm<Float>.Gradients)] = []
            for kernels in [KernelChoice.automatic, .reference] {
                let sn = try SwitchableNorm<Float>(channelCount: shape[1], weighting: weighting)
                sn.meanLogits = Tensor([0.3, -0.2, 0.5])
                sn.varianceLogits = Tensor([-0.1, 0.4, 0.2])
                sn.radius = 0.2
                sn.kernels = kernels
                let (y, cache) = try sn.forward(x, mode: .training)
                results.append((y, try sn.backward(dy, cache: cache)))
            }
            Self.expectClose(results[0].0, results[1].0, "\(weighting) y \(shape)")
            Self.expectClose(results[0].1.input, results[1].1.input, "\(weighting) dx \(shape)")
            Self.expectClose(
                results[0].1.meanLogits, results[1].1.meanLogits, "\(weighting) dlogits \(shape)")
            Self.expectClose(results[0].1.scale, results[1].1.scale, "\(weighting) dγ \(shape)")
        }
    }

    @Test(arguments: shapes)
    func metaNormAndBatchRenorm(_ shape: [Int]) throws {
        let (x, dy) = try Self.data(shape)
        var meta: [(Tensor<Float>, Tensor<Float>)] = []
        var brn: [(Tensor<Float>, Tensor<Float>)] = []
        for kernels in [KernelChoice.automatic, .reference] {
            let m = try MetaNorm<Float>(
                channelCount: shape[1], aggregations: [.instance, .batchNorm, .layer])
            m.kernels = kernels
            let (ym, cm) = try m.forward(x, mode: .training)
            meta.append((ym, try m.backward(dy, cache: cm).input))
            let b = try BatchRenorm<Float>(
                channelCount: shape[1], limits: .fixed(rMax: 1.5, dMax: 0.5))
            b.kernels = kernels
            let (yb, cb) = try b.forward(x, mode: .training)
            brn.append((yb, try b.backward(dy, cache: cb).input))
        }
        Self.expectClose(meta[0].0, meta[1].0, "MetaNorm y \(shape)")
        Self.expectClose(meta[0].1, meta[1].1, "MetaNorm dx \(shape)")
        Self.expectClose(brn[0].0, brn[1].0, "BatchRenorm y \(shape)")
        Self.expectClose(brn[0].1, brn[1].1, "BatchRenorm dx \(shape)")
    }

    @Test func switchableNormChannelsLast() throws {
        let (x, dy) = try Self.data([3, 5, 4, 16])
        var results: [(Tensor<Float>, Tensor<Float>)] = []
        for kernels in [KernelChoice.automatic, .reference] {
            let sn = try SwitchableNorm<Float>(channelCount: 16, layout: .channelsLast)
            sn.kernels = kernels
            let (y, cache) = try sn.forward(x, mode: .training)
            results.append((y, try sn.backward(dy, cache: cache).input))
        }
        Self.expectClose(results[0].0, results[1].0, "NHWC y")
        Self.expectClose(results[0].1, results[1].1, "NHWC dx")
    }
}
