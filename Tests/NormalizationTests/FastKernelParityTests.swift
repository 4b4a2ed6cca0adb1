import NormKit
import NormTestSupport
import Testing

/// The fast Float kernels against the reference kernel, on awkward sizes, both layouts, one and
/// two threads, plain and offset data, forward (training and inference) and backward.
@Suite("Fast kernels equal the reference")
struct FastKernelParityTests {
    /// Both paths round the same Double-accurate statistics to Float; they differ by Float
    /// accumulation order inside a block and by the final roundings.
    static let tolerance = 2e-5

    struct Case: CustomStringConvertible, Sendable {
        var layer: StandardLayer
        var shape: [Int]
        var layout: Layout = .channelsFirst
        var groups: Int? = nil
        var dims = 1
        var offset = 0.0
        var affine = true
        var description: String {
            "\(layer) \(shape) \(layout)\(groups.map { " G=\($0)" } ?? "")\(offset != 0 ? " offset" : "")"
                + (affine ? "" : " no affine")
        }
    }

    static let cases: [Case] = {
        var cases: [Case] = []
        let sizes = [1, 3, 7, 15, 16, 17, 63, 65]
        for (i, c) in sizes.enumerated() {
            let l = sizes[(i + 3) % sizes.count]
            let n = [2, 3, 1, 5][i % 4] + (c == 1 && l == 1 ? 1 : 0)
            for layout in Layout.allCases {
                let shape = layout == .channelsFirst ? [n, c, l] : [n, l, c]
                cases.append(Case(layer: .batchnorm, shape: shape, layout: layout))
                if l > 1 { cases.append(Case(layer: .instancenorm, shape: shape, layout: layout)) }
                cases.append(Case(layer: .layernorm2d, shape: shape, layout: layout))
                cases.append(Case(layer: .groupnorm, shape: shape, layout: layout, groups: c))
                cases.append(Case(layer: .groupnorm, shape: shape, layout: layout, groups: 1))
            }
            cases.append(Case(layer: .layernorm, shape: [n, c * l]))
            cases.append(Case(layer: .rmsnorm, shape: [n, c * l]))
            cases.append(Case(layer: .layernorm, shape: [n, c, l], dims: 2))
        }
        // Large enough to run threaded, with groups of several channels and offset data.
        for layout in Layout.allCases {
            let shape = layout == .channelsFirst ? [4, 64, 17, 17] : [4, 17, 17, 64]
            cases.append(Case(layer: .batchnorm, shape: shape, layout: layout, offset: 1000))
            cases.append(Case(layer: .instancenorm, shape: shape, layout: layout, offset: 1000))
            cases.append(Case(layer: .groupnorm, shape: shape, layout: layout, groups: 32))
            cases.append(
                Case(layer: .groupnorm, shape: shape, layout: layout, groups: 4, offset: 1000))
            cases.append(Case(layer: .layernorm2d, shape: shape, layout: layout, offset: 1000))
            cases.append(Case(layer: .batchnorm, shape: shape, layout: layout, affine: false))
        }
        cases.append(Case(layer: .layernorm, shape: [65, 1000], offset: 1000))
        cases.append(Case(layer: .rmsnorm, shape: [65, 1000]))
        // Row blocks of four in the LayerNorm backward: 131 rows end in a block of 3, and the
        // dγ partials are flushed twice on the way.
        cases.append(Case(layer: .layernorm, shape: [131, 17], offset: 1000))
        cases.append(Case(layer: .batchnorm, shape: [1000, 65], offset: 1000))
        cases.append(Case(layer: .layernorm, shape: [9, 5, 7, 3], dims: 3))
        return cases
    }()

    static func make(_ c: Case, kernels: KernelChoice) throws -> NormLayer<Float> {
        var options = LayerOptions()
        options.layout = c.layout
        options.groups = c.groups
        options.normalizedDims = c.dims
        options.affine = c.affine
        options.trackRunningStatistics = c.layer == .instancenorm ? true : nil
        let layer: NormLayer<Float> = try c.layer.make(inputShape: c.shape, options: options)
        var g = SeededGenerator(seed: 99)
        if let s = layer.scale { layer.scale = s.map { _ in Float(1 + 0.5 * g.nextNormal()) } }
        if let o = layer.offset { layer.offset = o.map { _ in Float(0.5 * g.nextNormal()) } }
        layer.kernels = kernels
        return layer
    }

    static func expectClose(_ a: Tensor<Float>?, _ b: Tensor<Float>?, _ label: String, _ c: Case) {
        guard let a, let b else {
            #expect(a == nil && b == nil, "\(c) \(label): presence differs")
            return
        }
        let comparison = Comparison(a.scalars, b.scalars)
        #expect(comparison.relative < tolerance, "\(c) \(label): \(comparison)")
    }

    @Test(arguments: cases)
    func fastKernelEqualsReference(_ c: Case) throws {
        var g = SeededGenerator(seed: 5)
        let std = c.offset == 0 ? 1.0 : 0.05
        let x = try Tensor<Float>.randomNormal(
            shape: c.shape, mean: c.offset, standardDeviation: std, using: &g)
        let dy = try Tensor<Float>.randomNormal(shape: c.shape, using: &g)
        let reference = try Self.make(c, kernels: .reference)
        let (yr, cr) = try reference.forward(x, mode: .training)
        let gr = try reference.backward(dy, cache: cr)
        for threads in [1, 2] {
            // Threaded runs also lower the serial cutoff so that these sizes really split.
            try Parallelism.$serialCutoffOverride.withValue(threads == 1 ? nil : 0) {
                try Parallelism.$threadLimit.withValue(threads) {
                    let fast = try Self.make(c, kernels: .automatic)
                    let (yf, cf) = try fast.forward(x, mode: .training)
                    let gf = try fast.backward(dy, cache: cf)
                    Self.expectClose(yf, yr, "y (\(threads) threads)", c)
                    Self.expectClose(gf.input, gr.input, "dx", c)
                    Self.expectClose(gf.scale, gr.scale, "dweight", c)
                    Self.expectClose(gf.offset, gr.offset, "dbias", c)
                    // Means agree to a tiny fraction of the standard deviation (Float block sums).
                    let meanError =
                        zip(zip(cf.mean, cr.mean), cr.rstd).map { abs($0.0 - $0.1) * $1 }.max() ?? 0
                    #expect(
                        meanError < 1e-5, "\(c) mean differs by \(meanError) standard deviations")
                    let rstdDiff = Comparison(cf.rstd.map { 1 / $0 }, cr.rstd.map { 1 / $0 })
                    #expect(rstdDiff.relative < 1e-6, "\(c) std: \(rstdDiff)")
                    Self.expectClose(
                        fast.runningStatistics?.variance, reference.runningStatistics?.variance,
                        "running_var", c)
                    // Inference through the running statistics (BatchNorm, InstanceNorm).
                    let (yfi, cfi) = try fast.forward(x, mode: .inference)
                    let (yri, cri) = try reference.forward(x, mode: .inference)
                    Self.expectClose(yfi, yri, "y inference", c)
                    Self.expectClose(
                        try fast.backward(dy, cache: cfi).input,
                        try reference.backward(dy, cache: cri).input,
                        "dx inference", c)
                }
            }
        }
    }

    @Test func resultsDoNotDependOnTheThreadCount() throws {
        let c = Case(layer: .layernorm, shape: [256, 300])
        var g = SeededGenerator(seed: 8)
        let x = try Tensor<Float>.randomNormal(shape: c.shape, using: &g)
        let dy = try Tensor<Float>.randomNormal(shape: c.shape, using: &g)
        var results: [[Float]] = []
        for threads in [1, 2, 3] {
            try Parallelism.$serialCutoffOverride.withValue(0) {
                try Parallelism.$threadLimit.withValue(threads) {
                    let layer = try Self.make(c, kernels: .automatic)
                    let (y, cache) = try layer.forward(x, mode: .training)
                    let grads = try layer.backward(dy, cache: cache)
                    results.append(
                        y.scalars + grads.input.scalars + grads.scale!.scalars
                            + grads.offset!.scalars)
                }
            }
        }
        #expect(results[0] == results[1] && results[1] == results[2])
    }

    /// Catches a work split that silently collapses to one chunk (as `rows * length >> 16` once
    /// did: `>>` binds tighter than `*`): a backward of a few hundred thousand elements must be
    /// cut into at least two chunks and be allowed two threads, in every geometry.
    @Test(arguments: [
        Case(layer: .layernorm, shape: [512, 768]),
        Case(layer: .rmsnorm, shape: [512, 768]),
        Case(layer: .batchnorm, shape: [8, 64, 28, 28]),
        Case(layer: .batchnorm, shape: [8, 28, 28, 64], layout: .channelsLast),
        Case(layer: .groupnorm, shape: [8, 64, 28, 28], groups: 32),
        Case(layer: .groupnorm, shape: [8, 28, 28, 64], layout: .channelsLast, groups: 32),
        Case(layer: .instancenorm, shape: [8, 64, 28, 28]),
    ])
    func largeBackwardSplitsItsWork(_ c: Case) throws {
        var g = SeededGenerator(seed: 3)
        let x = try Tensor<Float>.randomNormal(shape: c.shape, using: &g)
        let dy = try Tensor<Float>.randomNormal(shape: c.shape, using: &g)
        try Parallelism.$threadLimit.withValue(2) {
            let layer = try Self.make(c, kernels: .automatic)
            let (_, cache) = try layer.forward(x, mode: .training)
            let observer = SplitObserver()
            _ = try Parallelism.$observer.withValue(observer) {
                try layer.backward(dy, cache: cache)
            }
            #expect(observer.calls >= 1, "\(c): backward never reached the fast kernels")
            #expect(observer.maximumChunks >= 2, "\(c): \(observer.maximumChunks) chunks")
            #expect(observer.maximumThreads == 2, "\(c): \(observer.maximumThreads) threads")
        }
    }

    @Test(arguments: [
        StandardLayer.batchnorm, .layernorm, .instancenorm, .groupnorm, .rmsnorm, .layernorm2d,
    ])
    func everyStandardLayerTakesTheFastPath(_ name: StandardLayer) throws {
        for layout in Layout.allCases {
            var options = LayerOptions()
            options.layout = layout
            options.groups = 2
            let shape = [2, 4, 3, 4]
            let layer: NormLayer<Float> = try name.make(inputShape: shape, options: options)
            let plan = try layer.normalizer.partition.plan(for: shape, layout: layout)
            let channelAxis = layout.channelAxis(rank: 4)
            let indexing: ParameterIndexing? =
                switch layer.normalizer.recovery {
                case .channelAffine:
                    ParameterIndexing(divisor: Shape.strides(shape)[channelAxis], modulus: 4)
                case .elementwiseAffine(let s, _):
                    ParameterIndexing(divisor: 1, modulus: s.reduce(1, *))
                case .none: nil
                }
            #expect(
                FastNormKernel.geometry(for: plan, parameters: indexing) != nil, "\(name) \(layout)"
            )
        }
    }
}

/// The fused residual add + normalization against an explicit add followed by the layer.
@Suite("Fused residual add")
struct FusedResidualTests {
    @Test(arguments: [
        (StandardLayer.layernorm, [7, 65], Layout.channelsFirst),
        (.rmsnorm, [65, 1000], .channelsFirst),
        (.layernorm, [3, 17], .channelsFirst),
        (.layernorm2d, [2, 3, 5, 16], .channelsLast),
        (.layernorm2d, [2, 16, 3, 5], .channelsFirst),  // not fusable: falls back
        (.groupnorm, [2, 4, 3, 3], .channelsFirst),  // not fusable: falls back
    ])
    func fusedEqualsAddThenNormalize(_ name: StandardLayer, _ shape: [Int], _ layout: Layout) throws
    {
        var options = LayerOptions()
        options.layout = layout
        options.groups = 2
        var g = SeededGenerator(seed: 21)
        let x = try Tensor<Float>.randomNormal(shape: shape, mean: 3, using: &g)
        let r = try Tensor<Float>.randomNormal(
            shape: shape, mean: -1, standardDeviation: 2, using: &g)
        let dy = try Tensor<Float>.randomNormal(shape: shape, using: &g)
        let fused: NormLayer<Float> = try name.make(inputShape: shape, options: options)
        let plain: NormLayer<Float> = try name.make(inputShape: shape, options: options)
        plain.kernels = .reference
        let (y, h, cache) = try fused.forward(x, adding: r, mode: .training)
        let hExpected = try Tensor(shape: shape, scalars: zip(x.scalars, r.scalars).map { $0 + $1 })
        #expect(h == hExpected)
        let (yExpected, cacheExpected) = try plain.forward(hExpected, mode: .training)
        let c = Comparison(y.scalars, yExpected.scalars)
        #expect(c.relative < 2e-5, "\(name): \(c)")
        let dx = try fused.backward(dy, cache: cache).input
        let dxExpected = try plain.backward(dy, cache: cacheExpected).input
        #expect(Comparison(dx.scalars, dxExpected.scalars).relative < 2e-5)
    }

    @Test func residualOfAnotherShapeIsRefused() throws {
        let ln = try LayerNorm<Float>(normalizedShape: [4])
        #expect(
            throws: NormError.shapeMismatch(name: "residual", expected: [2, 4], actual: [4, 2])
        ) {
            _ = try ln.forward(
                try Tensor(zeros: [2, 4]), adding: try Tensor(zeros: [4, 2]), mode: .training)
        }
    }
}
