import NormKit
import Testing

@testable import Training

/// Shared inputs and checks of the whitened-layer tests.
enum WhitenedFixtures {
    /// Correlated rows with an offset, `x = z·Bᵀ + offset`, z standard normal.
    ///
    /// With `subspace` < d, every row lies in one `subspace`-dimensional affine subspace.
    static func rows(
        _ m: Int, _ d: Int, subspace: Int? = nil, seed: UInt64, offset: Double = 3
    ) throws -> Tensor<Double> {
        var g = SeededGenerator(seed: seed)
        let r = subspace ?? d
        // B is fixed (seed 1000 + d) so that every batch of a test shares the subspace.
        var gb = SeededGenerator(seed: 1000 + UInt64(d))
        let b = (0..<(d * r)).map { i in (i % (r + 1) == 0 ? 1.0 : 0) + 0.5 * gb.nextNormal() }
        var values = [Double](repeating: 0, count: m * d)
        for i in 0..<m {
            let z = (0..<r).map { _ in g.nextNormal() }
            for j in 0..<d {
                var v = offset + Double(j) * 0.1
                for c in 0..<r { v += b[j * r + c] * z[c] }
                values[i * d + j] = v
            }
        }
        return try Tensor(shape: [m, d], scalars: values)
    }

    /// Central differences (step 1e-6) of `f(i, ±h)`, the loss with entry i moved by ±h.
    static func slopes(_ count: Int, _ f: (Int, Double) throws -> Double) throws -> [Double] {
        let h = 1e-6
        return try (0..<count).map { i in (try f(i, h) - f(i, -h)) / (2 * h) }
    }

    static func normal(_ shape: [Int], seed: UInt64) throws -> Tensor<Double> {
        var g = SeededGenerator(seed: seed)
        return try Tensor.randomNormal(shape: shape, using: &g)
    }

    /// The largest |a − b| relative to 1 + max |a|.
    static func difference<S: NormScalar>(_ a: Tensor<S>, _ b: Tensor<S>) -> Double {
        let scale = 1 + a.scalars.map { abs(Double($0)) }.max()!
        return zip(a.scalars, b.scalars).map { abs(Double($0) - Double($1)) }.max()! / scale
    }

    /// A plain SGD step on the gradients (so that the next refresh has something to re-express).
    static func step<S: NormScalar>(_ parameters: [Parameter<S>], rate: Double = 0.05) throws {
        for p in parameters {
            p.value = try Tensor(
                shape: p.value.shape,
                rounding: zip(p.value.scalars, p.gradient.scalars).map {
                    Double($0) - rate * Double($1)
                })
            p.zeroGradient()
        }
    }

    /// Central differences of L = Σ y·dy against dx and every parameter gradient, in inference
    /// mode (the whitening held fixed); returns the worst absolute error.
    static func gradientError<M: Module>(_ module: M, _ x: Tensor<Double>, seed: UInt64) throws
        -> Double where M.Scalar == Double
    {
        let y0 = try module.forward(x, mode: .inference)
        let dy = try normal(y0.shape, seed: seed)
        for p in module.parameters { p.zeroGradient() }
        let dx = try module.backward(dy)
        let analytic = module.parameters.map(\.gradient)
        func loss(_ input: Tensor<Double>) throws -> Double {
            zip(try module.forward(input, mode: .inference).scalars, dy.scalars).reduce(0) {
                $0 + $1.0 * $1.1
            }
        }
        var worst = 0.0
        var probe = x
        let inputSlope = try slopes(x.count) { i, v in
            let saved = probe[flat: i]
            probe[flat: i] = saved + v
            defer { probe[flat: i] = saved }
            return try loss(probe)
        }
        worst = zip(inputSlope, dx.scalars).map { abs($0 - $1) }.max() ?? 0
        for (p, a) in zip(module.parameters, analytic) {
            #expect(a.scalars.contains { $0 != 0 }, "\(p.name) got no gradient")
            let slope = try slopes(p.value.count) { i, v in
                let saved = p.value[flat: i]
                p.value[flat: i] = saved + v
                defer { p.value[flat: i] = saved }
                return try loss(x)
            }
            worst = max(worst, zip(slope, a.scalars).map { abs($0 - $1) }.max() ?? 0)
        }
        return worst
    }
}

@Suite("Whitened layers: WNN, GWNN, EigenNet")
struct WhitenedLayerTests {
    static func settings(
        _ kind: WhitenedLayerKind, period: Int = 1, rank: Int? = nil
    ) -> WhiteningSettings {
        WhiteningSettings(
            kind: kind, period: period, rank: rank, dataPeriod: kind == .gwnn ? 2 * period : nil)
    }

    /// Every refresh (every step with T = 1) leaves the outputs unchanged: inference output on
    /// the step's batch before the refresh against the training output after it; EigenNet's
    /// backward refresh of S likewise.
    @Test(arguments: WhitenedLayerKind.allCases)
    func linearRefreshPreservesTheFunction(_ kind: WhitenedLayerKind) throws {
        var g = SeededGenerator(seed: 3)
        let layer = try WhitenedLinear<Double>(6, 4, settings: Self.settings(kind), generator: &g)
        for t in 0..<6 {
            let x = try WhitenedFixtures.rows(24, 6, seed: 10 + UInt64(t))
            let before = try layer.forward(x, mode: .inference)
            let y = try layer.forward(x, mode: .training)
            #expect(WhitenedFixtures.difference(before, y) < 1e-5, "\(kind) step \(t) forward")
            _ = try layer.backward(try WhitenedFixtures.normal([24, 4], seed: 50 + UInt64(t)))
            let after = try layer.forward(x, mode: .inference)
            #expect(WhitenedFixtures.difference(y, after) < 1e-5, "\(kind) step \(t) backward")
            try WhitenedFixtures.step(layer.parameters)
        }
        #expect(layer.core.step == 6)
    }

    /// With k below the dimension the refresh preserves the function on the kept subspace:
    /// exactly for inputs that lie in a k-dimensional affine subspace.
    @Test(arguments: WhitenedLayerKind.allCases)
    func truncatedRefreshPreservesTheFunctionOnTheSubspace(_ kind: WhitenedLayerKind) throws {
        var g = SeededGenerator(seed: 4)
        let layer = try WhitenedLinear<Double>(
            6, 4, settings: Self.settings(kind, rank: 3), generator: &g)
        #expect(layer.core.rank == 3)
        // The first refresh moves from W₀'s singular directions to the data's; from then on the
        // kept subspace is the data's.
        _ = try layer.forward(
            try WhitenedFixtures.rows(24, 6, subspace: 3, seed: 9), mode: .training)
        for t in 0..<4 {
            let x = try WhitenedFixtures.rows(24, 6, subspace: 3, seed: 20 + UInt64(t))
            let before = try layer.forward(x, mode: .inference)
            let y = try layer.forward(x, mode: .training)
            #expect(WhitenedFixtures.difference(before, y) < 1e-5, "\(kind) k=3 step \(t)")
            _ = try layer.backward(try WhitenedFixtures.normal([24, 4], seed: 60 + UInt64(t)))
            try WhitenedFixtures.step(layer.parameters)
        }
    }

    @Test(arguments: WhitenedLayerKind.allCases)
    func convRefreshPreservesTheFunction(_ kind: WhitenedLayerKind) throws {
        var g = SeededGenerator(seed: 5)
        let conv = try WhitenedConv2d<Double>(
            2, 3, kernel: 3, padding: 1, settings: Self.settings(kind), generator: &g)
        for t in 0..<4 {
            var x = try WhitenedFixtures.normal([3, 2, 5, 5], seed: 30 + UInt64(t))
            for i in 0..<x.count { x[flat: i] += 2 }
            let before = try conv.forward(x, mode: .inference)
            let y = try conv.forward(x, mode: .training)
            #expect(WhitenedFixtures.difference(before, y) < 1e-5, "\(kind) conv step \(t)")
            _ = try conv.backward(try WhitenedFixtures.normal(y.shape, seed: 70 + UInt64(t)))
            try WhitenedFixtures.step(conv.parameters)
        }
    }

    /// Float keeps the function to 1e-4 relative (P and V are rounded to Float at each refresh).
    @Test func floatRefreshPreservesTheFunction() throws {
        var g = SeededGenerator(seed: 6)
        let layer = try WhitenedLinear<Float>(
            6, 4, settings: Self.settings(.eigennet), generator: &g)
        for t in 0..<4 {
            let xd = try WhitenedFixtures.rows(24, 6, seed: 40 + UInt64(t))
            let x = try Tensor<Float>(shape: xd.shape, scalars: xd.scalars.map(Float.init))
            let before = try layer.forward(x, mode: .inference)
            let y = try layer.forward(x, mode: .training)
            #expect(WhitenedFixtures.difference(before, y) < 1e-4, "float step \(t)")
            var dy = try Tensor<Float>(zeros: [24, 4])
            for i in 0..<dy.count { dy[flat: i] = Float(i % 7) * 0.1 - 0.3 }
            _ = try layer.backward(dy)
            try WhitenedFixtures.step(layer.parameters)
        }
    }

    /// Finite differences through the layers (whitening fixed, as between refreshes), after a
    /// few refreshed steps so that P, S, Q and A are not identities.
    @Test(arguments: WhitenedLayerKind.allCases, [nil, 4])
    func finiteDifferences(_ kind: WhitenedLayerKind, _ rank: Int?) throws {
        var g = SeededGenerator(seed: 7)
        let gwnnRank = rank.map { _ in 2 }  // GWNN whitens the 3 outputs
        let settings = Self.settings(kind, rank: kind == .gwnn ? gwnnRank : rank)
        let layer = try WhitenedLinear<Double>(5, 3, settings: settings, generator: &g)
        let conv = try WhitenedConv2d<Double>(
            1, 3, kernel: 3, stride: 2, padding: 1, settings: settings, generator: &g)
        for t in 0..<2 {
            let x = try WhitenedFixtures.rows(8, 5, seed: 80 + UInt64(t))
            _ = try layer.forward(x, mode: .training)
            _ = try layer.backward(try WhitenedFixtures.normal([8, 3], seed: 90 + UInt64(t)))
            try WhitenedFixtures.step(layer.parameters)
            let image = try WhitenedFixtures.normal([2, 1, 5, 4], seed: 95 + UInt64(t))
            let y = try conv.forward(image, mode: .training)
            _ = try conv.backward(try WhitenedFixtures.normal(y.shape, seed: 97))
            try WhitenedFixtures.step(conv.parameters)
        }
        let x = try WhitenedFixtures.rows(4, 5, seed: 99)
        #expect(try WhitenedFixtures.gradientError(layer, x, seed: 11) < 1e-6)
        let image = try WhitenedFixtures.normal([2, 1, 5, 4], seed: 98)
        #expect(try WhitenedFixtures.gradientError(conv, image, seed: 12) < 1e-6)
    }

    /// With T = 1 and no truncation the whitened input of the step's batch has covariance I
    /// (WNN, EigenNet: P·(x − μ); GWNN: Q·(W·x − ν) on a data step).
    @Test(arguments: WhitenedLayerKind.allCases)
    func whitenedCovarianceIsIdentity(_ kind: WhitenedLayerKind) throws {
        var g = SeededGenerator(seed: 8)
        // ε shrinks each eigenvalue λ to λ/(λ + ε): a tiny ε shows the identity exactly.
        let settings = WhiteningSettings(kind: kind, period: 1, dataPeriod: 1, epsilon: 1e-10)
        let layer = try WhitenedLinear<Double>(6, 4, settings: settings, generator: &g)
        let m = 64
        for t in 0..<2 {
            let x = try WhitenedFixtures.rows(m, 6, seed: 100 + UInt64(t), offset: 1000)
            _ = try layer.forward(x, mode: .training)
            _ = try layer.backward(try WhitenedFixtures.normal([m, 4], seed: 110))
            let core = layer.core
            var rows = WhiteningAlgebra.matrix(x, rows: m, cols: 6)
            if kind == .gwnn {
                rows = Matrix.product(
                    rows, WhiteningAlgebra.matrix(core.weight.value, rows: 4, cols: 6),
                    transposeB: true)
            }
            let width = rows.cols
            for i in 0..<m { for j in 0..<width { rows[i, j] -= core.mean[flat: j] } }
            let p = WhiteningAlgebra.matrix(core.projection, rows: core.rank, cols: width)
            let white = Matrix.product(rows, p, transposeB: true)
            let covariance = (1 / Double(m)) * Matrix.product(white, white, transposeA: true)
            let error = zip(covariance.values, Matrix.identity(core.rank).values).map {
                abs($0 - $1)
            }.max()!
            #expect(error < 1e-6, "\(kind) step \(t): |cov − I| = \(error)")
            // A small step: the offset inputs give large gradients, and a large step would
            // leave W·Σₓ·Wᵀ so ill-conditioned that ε·mean(λ) shows against its least λ.
            try WhitenedFixtures.step(layer.parameters, rate: 1e-6)
        }
    }

    /// EigenNet: on the batch of a refresh step, the gradient that reaches V (per example,
    /// m·Sᵀ·gᵢ) has covariance I.
    @Test func eigenNetGradientCovarianceIsIdentity() throws {
        var g = SeededGenerator(seed: 9)
        let settings = WhiteningSettings(kind: .eigennet, period: 1, gradientDamping: 1e-12)
        let layer = try WhitenedLinear<Double>(6, 4, settings: settings, generator: &g)
        let m = 48
        let x = try WhitenedFixtures.rows(m, 6, seed: 120)
        _ = try layer.forward(x, mode: .training)
        var dy = try WhitenedFixtures.normal([m, 4], seed: 121)
        // Correlated, small gradients as a mean loss gives them.
        for i in 0..<m {
            dy[flat: i * 4 + 1] += 0.8 * dy[flat: i * 4]
            for j in 0..<4 { dy[flat: i * 4 + j] /= Double(m) }
        }
        _ = try layer.backward(dy)
        let s = WhiteningAlgebra.matrix(layer.core.gradientWhitening!, rows: 4, cols: 4)
        let scaled = Matrix(rows: m, cols: 4, values: dy.scalars.map { $0 * Double(m) })
        let white = Matrix.product(scaled, s)  // rows m·gᵢᵀ·S = (m·Sᵀ·gᵢ)ᵀ
        let covariance = (1 / Double(m)) * Matrix.product(white, white, transposeA: true)
        let error = zip(covariance.values, Matrix.identity(4).values).map { abs($0 - $1) }.max()!
        #expect(error < 1e-6, "|cov − I| = \(error)")

        // Scale-preserving S: the same decorrelation, covariance c·I with c the raw gradient's
        // mean variance.
        var scaledSettings = settings
        scaledSettings.preservesGradientScale = true
        var g2 = SeededGenerator(seed: 9)
        let kept = try WhitenedLinear<Double>(6, 4, settings: scaledSettings, generator: &g2)
        _ = try kept.forward(x, mode: .training)
        _ = try kept.backward(dy)
        let s2 = WhiteningAlgebra.matrix(kept.core.gradientWhitening!, rows: 4, cols: 4)
        let white2 = Matrix.product(scaled, s2)
        let covariance2 = (1 / Double(m)) * Matrix.product(white2, white2, transposeA: true)
        let raw = (1 / Double(m)) * Matrix.product(scaled, scaled, transposeA: true)
        let c = raw.trace / 4
        let error2 = zip(covariance2.values, (c * Matrix.identity(4)).values).map {
            abs($0 - $1)
        }.max()!
        #expect(error2 < 1e-6 * c, "|cov − c·I| = \(error2), c = \(c)")
    }

    /// A refresh maps SGD's velocity so that a momentum step moves W_eff as before it:
    /// S·v·P (WNN, EigenNet; S = I for WNN) and v_A·Q (GWNN) are unchanged.
    @Test(arguments: WhitenedLayerKind.allCases)
    func refreshCarriesTheMomentum(_ kind: WhitenedLayerKind) throws {
        var g = SeededGenerator(seed: 12)
        let layer = try WhitenedLinear<Double>(6, 4, settings: Self.settings(kind), generator: &g)
        let sgd = SGD<Double>(learningRate: 0.01, momentum: 0.9, weightDecay: 0)
        let moving = kind == .gwnn ? layer.core.mix! : layer.core.weight
        func direction() -> Matrix {
            let core = layer.core
            let v = WhiteningAlgebra.matrix(
                sgd.velocity[moving.name]!, rows: 4, cols: moving.value.shape[1])
            var m =
                v
                * WhiteningAlgebra.matrix(
                    core.projection, rows: core.rank, cols: 6 - (kind == .gwnn ? 2 : 0))
            if let s = core.gradientWhitening {
                m = WhiteningAlgebra.matrix(s, rows: 4, cols: 4) * m
            }
            return m
        }
        for t in 0..<3 {
            let x = try WhitenedFixtures.rows(24, 6, seed: 130 + UInt64(t))
            let before = t == 0 ? nil : direction()
            _ = try layer.forward(x, mode: .training)
            _ = try layer.backward(try WhitenedFixtures.normal([24, 4], seed: 140 + UInt64(t)))
            try layer.core.carryOptimizerState(&sgd.velocity)
            if let before {
                let after = direction()
                let error = zip(before.values, after.values).map { abs($0 - $1) }.max()!
                #expect(error < 1e-9, "\(kind) step \(t): \(error)")
            }
            try sgd.update(layer.parameters)
        }
    }

    /// Bad settings give typed errors naming the setting.
    @Test func badSettingsAreTypedErrors() throws {
        var g = SeededGenerator(seed: 10)
        func name(_ body: () throws -> Void) -> String? {
            do {
                try body()
                return nil
            } catch let TrainingError.invalidSetting(name, _, _) {
                return name
            } catch { return "\(error)" }
        }
        #expect(
            name { try WhiteningSettings(kind: .wnn, period: 0).validate() } == "whitening period")
        #expect(
            name { try WhiteningSettings(kind: .wnn, period: 1 << 30).validate() }
                == "whitening period")
        #expect(name { try WhiteningSettings(kind: .wnn, rank: 0).validate() } == "whitening rank")
        #expect(
            name { try WhiteningSettings(kind: .gwnn, period: 4, dataPeriod: 6).validate() }
                == "whitening data period")
        #expect(
            name { try WhiteningSettings(kind: .wnn, epsilon: .nan).validate() }
                == "whitening epsilon")
        #expect(
            name {
                _ = try WhitenedLinear<Double>(
                    6, 4, settings: WhiteningSettings(kind: .wnn, rank: 7), generator: &g)
            } == "whitening rank")
        #expect(
            name {
                _ = try WhitenedLinear<Double>(
                    6, 4, settings: WhiteningSettings(kind: .gwnn, rank: 5), generator: &g)
            } == "whitening rank")
        #expect(
            name {
                _ = try WhitenedLinear<Double>(
                    6, 4, settings: WhiteningSettings(kind: .eigennet, gradientRank: 5),
                    generator: &g)
            } == "gradient whitening rank")
        #expect(
            name {
                _ = try WhitenedConv2d<Double>(
                    300, 2, kernel: 3, settings: WhiteningSettings(kind: .wnn), generator: &g)
            } == "conv patch dimension")
        let layer = try WhitenedLinear<Double>(
            6, 4, settings: WhiteningSettings(kind: .wnn), generator: &g)
        #expect(throws: TrainingError.self) {
            _ = try layer.forward(try WhitenedFixtures.normal([3, 5], seed: 1), mode: .training)
        }
        #expect(throws: TrainingError.self) {
            try layer.loadBuffers(["linear.whiten_mean": try Tensor<Double>(zeros: [5])])
        }
    }
}
