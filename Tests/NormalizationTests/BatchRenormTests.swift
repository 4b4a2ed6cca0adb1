import NormKit
import NormTestSupport
import Testing

/// Batch Renormalization against the paper's algorithm in PyTorch (float64, r and d detached),
/// finite differences, and its reduction to BatchNorm.
@Suite("Batch Renormalization")
struct BatchRenormTests {
    static let cases = RawFixture.names("batchrenorm")

    static func check<T: NormScalar>(_ f: RawFixture, as _: T.Type, tolerance: Double) throws {
        let x: Tensor<T> = f.tensor("x")
        let layout: Layout = f.string("layout") == "nhwc" ? .channelsLast : .channelsFirst
        let layer = try BatchRenorm<T>(
            channelCount: x.shape[layout.channelAxis(rank: x.rank)],
            momentum: .exponential(weightOfNew: f.number("alpha") ?? 0.01),
            limits: .fixed(rMax: f.number("rmax") ?? 3, dMax: f.number("dmax") ?? 5), layout: layout
        )
        try layer.load([
            "weight": f.tensor("weight"), "bias": f.tensor("bias"),
            "running_mean": f.tensor("running_mean.in"),
            "running_std": f.tensor("running_std.in"),
        ])
        for k in 0..<Int(f.number("steps") ?? 0) {
            _ = try layer.forward(f.tensor("x.\(k)", as: T.self), mode: .training)
        }
        let (y, cache) = try layer.forward(
            x, mode: f.string("mode") == "eval" ? .inference : .training)
        let g = try layer.backward(f.tensor("dy"), cache: cache)
        for (label, actual, key) in [
            ("y", y, "y"), ("dx", g.input, "dx"), ("dweight", g.scale, "dweight"),
            ("dbias", g.offset, "dbias"),
            ("running_mean", layer.runningMean, "running_mean.out"),
            ("running_std", layer.runningStandardDeviation, "running_std.out"),
        ] {
            let c = Comparison(actual.scalars, (f.tensor(key) as Tensor<Double>).scalars)
            #expect(c.relative <= tolerance, "\(f) \(label): \(c)")
        }
    }

    @Test(arguments: cases)
    func doubleMatchesThePaper(_ name: String) throws {
        try Self.check(RawFixture.load(name), as: Double.self, tolerance: 1e-9)
    }

    @Test(arguments: cases)
    func floatMatchesThePaper(_ name: String) throws {
        let f = try RawFixture.load(name)
        try Self.check(f, as: Float.self, tolerance: (f.number("offset") ?? 0) > 0 ? 1e-3 : 1e-4)
    }

    @Test func gradientsMatchFiniteDifferencesWithRAndDConstant() throws {
        var g = SeededGenerator(seed: 3)
        let x = try Tensor<Double>.randomNormal(
            shape: [4, 3, 5], mean: 1, standardDeviation: 2, using: &g)
        let dy = try Tensor<Double>.randomNormal(shape: [4, 3, 5], using: &g)
        let layer = try BatchRenorm<Double>(channelCount: 3, limits: .fixed(rMax: 1.5, dMax: 0.5))
        try layer.load([
            "running_mean": Tensor([0.5, 1.5, 1]), "running_std": Tensor([1.5, 2.5, 2]),
        ])
        let saved = layer.state()
        let (_, cache) = try layer.forward(x, mode: .training)
        let analytic = try layer.backward(dy, cache: cache)
        // The loss with r and d frozen at this batch's values: run with the same running state.
        func loss(_ input: Tensor<Double>) throws -> Double {
            try layer.load(saved.tensors, step: 0)
            let y = try layer.forward(input, mode: .training).output
            return zip(y.scalars, dy.scalars).reduce(0) { $0 + $1.0 * $1.1 }
        }
        // r and d move with x, so compare against differences of the detached formula instead:
        // y = γ·((x − μ_B)/σ_B·r₀ + d₀) + β with r₀, d₀ from the unperturbed batch.
        let r0 = cache.r
        let d0 = cache.d
        func detachedLoss(_ input: Tensor<Double>) -> Double {
            var total = 0.0
            for c in 0..<3 {
                var values: [Double] = []
                for n in 0..<4 { for s in 0..<5 { values.append(input[n, c, s]) } }
                let mu = values.reduce(0, +) / 20
                let sigma = (values.map { ($0 - mu) * ($0 - mu) }.reduce(0, +) / 20 + 1e-5)
                    .squareRoot()
                for n in 0..<4 {
                    for s in 0..<5 {
                        total += ((input[n, c, s] - mu) / sigma * r0[c] + d0[c]) * dy[n, c, s]
                    }
                }
            }
            return total
        }
        _ = try loss(x)
        var probe = x
        var worst = 0.0
        for i in 0..<x.count {
            let v = probe[flat: i]
            probe[flat: i] = v + 1e-6
            let plus = detachedLoss(probe)
            probe[flat: i] = v - 1e-6
            let minus = detachedLoss(probe)
            probe[flat: i] = v
            worst = max(worst, abs((plus - minus) / 2e-6 - analytic.input[flat: i]))
        }
        #expect(worst < 1e-6)
    }

    @Test func unitLimitsAndZeroShiftAreBatchNorm() throws {
        var g = SeededGenerator(seed: 4)
        let x = try Tensor<Double>.randomNormal(shape: [5, 2, 3], mean: 2, using: &g)
        let brn = try BatchRenorm<Double>(channelCount: 2, limits: .fixed(rMax: 1, dMax: 0))
        let bn = try BatchNorm<Double>(featureCount: 2)
        let a = try brn.forward(x, mode: .training).output
        let b = try bn.forward(x, mode: .training).output
        #expect(Comparison(a.scalars, b.scalars).relative < 1e-12)
    }

    /// Synchronized Batch Renorm is the renormalized source over the all-reduced reduction: on
    /// one rank it equals the local layer to the last bit (outputs, gradients, moving statistics).
    @Test func oneRankSynchronizedEqualsLocal() throws {
        var g = SeededGenerator(seed: 5)
        let local = try BatchRenorm<Double>(channelCount: 3, limits: .fixed(rMax: 1.5, dMax: 0.5))
        let synced = try BatchRenorm<Double>(channelCount: 3, limits: .fixed(rMax: 1.5, dMax: 0.5))
        synced.communicator = LocalCommunicator()
        for step in 0..<3 {
            let x = try Tensor<Double>.randomNormal(
                shape: [4, 3, 5], mean: step == 1 ? 100 : 1, standardDeviation: 2, using: &g)
            let dy = try Tensor<Double>.randomNormal(shape: x.shape, using: &g)
            let (y0, c0) = try local.forward(x, mode: .training)
            let (y1, c1) = try synced.forward(x, mode: .training)
            let g0 = try local.backward(dy, cache: c0)
            let g1 = try synced.backward(dy, cache: c1)
            #expect(y0 == y1 && g0.input == g1.input, "step \(step)")
            #expect(g0.scale == g1.scale && g0.offset == g1.offset, "step \(step)")
            #expect(local.state() == synced.state(), "step \(step)")
        }
    }

    @Test func paperScheduleRampsLinearly() {
        let limits = BatchRenorm<Float>.Limits.paper
        #expect(limits.values(atStep: 0) == (1, 0))
        #expect(limits.values(atStep: 5000) == (1, 0))
        #expect(limits.values(atStep: 22500) == (2, 4.375))  // r: 17.5k of 35k; d: 17.5k of 20k
        #expect(limits.values(atStep: 40000) == (3, 5))
        #expect(limits.values(atStep: 90000) == (3, 5))
    }

    @Test func badInputIsRefused() throws {
        let brn = try BatchRenorm<Double>(channelCount: 2)
        let before = brn.state()
        #expect(throws: NormError.singleValuePerStatistic(layer: "BatchRenorm", shape: [1, 2])) {
            _ = try brn.forward(try Tensor(zeros: [1, 2]), mode: .training)
        }
        #expect(throws: NormError.self) {
            _ = try BatchRenorm<Double>(channelCount: 2, limits: .fixed(rMax: 0.5, dMax: 1))
        }
        #expect(brn.state() == before && brn.step == 0)
    }
}
