import Foundation

/// Which pass a benchmark times.
public enum BenchmarkPass: String, Sendable, CaseIterable {
    /// Training forward (batch statistics; running statistics updated).
    case forward
    /// Inference forward (running statistics where the layer tracks them).
    case inference
    /// Backward alone, given one training forward.
    case backward
    /// Fused residual add and training forward: reads x and r, writes h and y.
    case residual
    /// One training step: forward then backward (reads x twice and dy, writes y and dx).
    case step

    /// Bytes per element of the minimum traffic model.
    public var bytesPerElement: Int {
        switch self {
        case .forward, .inference: return 8
        case .backward: return 12
        case .residual: return 16
        case .step: return 20
        }
    }
}

/// In-process timing of one layer pass.
public enum Benchmark {
    /// One measurement.
    public struct Result: Sendable {
        /// What was measured.
        public var layer: String
        /// Tensor shape.
        public var shape: [Int]
        /// Layout.
        public var layout: Layout
        /// The pass.
        public var pass: BenchmarkPass
        /// Threads.
        public var threads: Int
        /// Timed repeats.
        public var repeats: Int
        /// Median time in milliseconds.
        public var medianMilliseconds: Double
        /// Minimum time in milliseconds.
        public var minimumMilliseconds: Double
        /// Bytes of the minimum traffic model divided by the median time, GB/s.
        public var effectiveGBps: Double
        /// Copy bandwidth measured in the same process, GB/s.
        public var bandwidthGBps: Double
        /// The kernels used.
        public var kernels: KernelChoice
        /// Every timed call in call order, milliseconds (to see warm-up drift or a bimodal
        /// machine that a median and a minimum hide).
        public var timesMilliseconds: [Double] = []

        /// effective / bandwidth.
        public var bandwidthFraction: Double { effectiveGBps / bandwidthGBps }

        /// One JSON object.
        public var json: String {
            let shapeText = shape.map(String.init).joined(separator: ",")
            return
                "{\"layer\":\"\(layer)\",\"shape\":[\(shapeText)],\"layout\":\"\(layout.rawValue)\","
                + "\"pass\":\"\(pass.rawValue)\",\"threads\":\(threads),\"repeat\":\(repeats),"
                + "\"kernels\":\"\(kernels.rawValue)\","
                + "\"median_ms\":\(format(medianMilliseconds)),\"min_ms\":\(format(minimumMilliseconds)),"
                + "\"effective_gbps\":\(format(effectiveGBps)),\"bandwidth_gbps\":\(format(bandwidthGBps)),"
                + "\"bandwidth_fraction\":\(format(bandwidthFraction)),"
                + "\"times_ms\":[\(timesMilliseconds.map(format).joined(separator: ","))]}"
        }

        /// A readable summary.
        public var text: String {
            """
            \(layer) \(pass.rawValue), shape \(shape) \(layout), Float, \(threads) thread(s), \(kernels.rawValue) kernels
              median \(format(medianMilliseconds)) ms, min \(format(minimumMilliseconds)) ms over \(repeats) repeats
              effective \(format(effectiveGBps)) GB/s (\(pass.bytesPerElement) B/element), copy bandwidth \(format(bandwidthGBps)) GB/s, fraction \(format(bandwidthFraction))
            """
        }

        func format(_ v: Double) -> String { String(format: "%.4g", v) }
    }

    /// Times `repeats` calls of the pass after three warm-up calls, for any registry name.
    ///
    /// The standard layers run through their reusable-output entry points (no allocation per
    /// call); every other layer through ``Normalizing``.
    public static func run(
        _ name: String, shape: [Int], options: NormalizerOptions, pass: BenchmarkPass,
        threads: Int, repeats: Int, kernels: KernelChoice = .automatic
    ) throws -> Result {
        let previous = Parallelism.maximumThreads
        Parallelism.maximumThreads = threads
        defer { Parallelism.maximumThreads = previous }
        var g = SeededGenerator(seed: 1)
        let x = try Tensor<Float>.randomNormal(shape: shape, mean: 0.5, using: &g)
        let dy = try Tensor<Float>.randomNormal(shape: shape, using: &g)
        let entry = try NormalizerRegistry.all.entry(named: name)
        let layer = try entry.builder.make(
            NormalizerRequest(inputShape: shape, options: options), as: Float.self)
        if let conditional = layer as? any ConditionalNormalizing<Float> {
            try conditional.setConditions(syntheticConditions(conditional, shape: shape, using: &g))
        }
        let call: () throws -> Float
        if let standard = layer as? NormLayer<Float> {
            call = try standardPass(standard, x: x, dy: dy, pass: pass, kernels: kernels)
        } else {
            guard kernels == .automatic else {
                throw NormError.invalidHyperparameter(
                    name: "--reference", value: entry.name,
                    requirement: "only the standard layers have a selectable reference kernel")
            }
            if let sn = layer as? SwitchableNorm<Float>, sn.weighting == .sparsestMax {
                sn.radius = 0.5  // between softmax-like and one-hot: the general SparsestMax path
            }
            call = try genericPass(layer, x: x, dy: dy, pass: pass)
        }
        var times: [Double] = []
        let clock = ContinuousClock()
        for i in 0..<(repeats + 3) {
            var sink: Float = 0
            let elapsed = try clock.measure { sink = try call() }
            blackHole(sink)
            if i >= 3 { times.append(seconds(elapsed)) }
        }
        let inOrder = times.map { $0 * 1e3 }
        times.sort()
        let median = times[times.count / 2]
        let bytes = Double(x.count * pass.bytesPerElement)
        var result = Result(
            layer: entry.name, shape: shape, layout: options.layout, pass: pass,
            threads: threads,
            repeats: repeats, medianMilliseconds: median * 1e3, minimumMilliseconds: times[0] * 1e3,
            effectiveGBps: bytes / median / 1e9, bandwidthGBps: copyBandwidth(threads: threads),
            kernels: kernels)
        result.timesMilliseconds = inOrder
        return result
    }

    /// Random conditioning inputs of the shapes a conditional layer reads, for timing it.
    static func syntheticConditions(
        _ layer: any ConditionalNormalizing<Float>, shape: [Int], using g: inout SeededGenerator
    ) throws -> [String: Tensor<Float>] {
        let n = shape.first ?? 1
        switch layer {
        case is AdaIN<Float>:
            return ["style": try .randomNormal(shape: shape, using: &g)]
        case let cbn as ConditionalBatchNorm<Float>:
            switch cbn.source {
            case .embedding(let classes):
                return ["labels": Tensor((0..<n).map { Float($0 % classes) })]
            case .linear(let d, _):
                return ["condition": try .randomNormal(shape: [n, d], using: &g)]
            }
        case let spade as SPADE<Float>:
            var segmap = shape
            segmap[1] = spade.labelCount
            return ["segmap": try .randomNormal(shape: segmap, using: &g)]
        case let adaln as AdaLN<Float>:
            return [
                "condition": try .randomNormal(shape: [n, adaln.conditionDimension], using: &g)
            ]
        default:
            // Fused add + RMSNorm and any other layer whose conditions have the input's shape.
            var out: [String: Tensor<Float>] = [:]
            for name in layer.conditionNames {
                out[name] = try .randomNormal(shape: shape, using: &g)
            }
            return out
        }
    }

    /// One pass of a standard layer into reused buffers.
    static func standardPass(
        _ layer: NormLayer<Float>, x: Tensor<Float>, dy: Tensor<Float>, pass: BenchmarkPass,
        kernels: KernelChoice
    ) throws -> () throws -> Float {
        layer.kernels = kernels
        var y = try Tensor<Float>(zeros: x.shape)
        let cache = try layer.forward(x, mode: .training, into: &y)
        var grads = try layer.backward(dy, cache: cache)
        var h = try Tensor<Float>(zeros: x.shape)
        return {
            switch pass {
            case .forward: _ = try layer.forward(x, mode: .training, into: &y)
            case .inference: _ = try layer.forward(x, mode: .inference, into: &y)
            case .backward: try layer.backward(dy, cache: cache, into: &grads)
            case .residual:
                _ = try layer.forward(x, adding: dy, mode: .training, sum: &h, into: &y)
            case .step:
                let c = try layer.forward(x, mode: .training, into: &y)
                try layer.backward(dy, cache: c, into: &grads)
            }
            return y[flat: 0] + grads.input[flat: 0]
        }
    }

    /// One pass of any normalizer through the protocol.
    static func genericPass(
        _ layer: any Normalizing<Float>, x: Tensor<Float>, dy: Tensor<Float>, pass: BenchmarkPass
    ) throws -> () throws -> Float {
        _ = try layer.normalize(x, mode: .training)
        switch pass {
        case .forward: return { try layer.normalize(x, mode: .training)[flat: 0] }
        case .inference: return { try layer.normalize(x, mode: .inference)[flat: 0] }
        case .backward: return { try layer.backward(dy).input[flat: 0] }
        case .step:
            return {
                _ = try layer.normalize(x, mode: .training)
                return try layer.backward(dy).input[flat: 0]
            }
        case .residual:
            throw NormError.invalidHyperparameter(
                name: "--pass", value: "residual",
                requirement: "the fused residual pass exists for the standard layers only")
        }
    }

    /// Copy bandwidth (bytes read + bytes written per second, GB/s) of 2 × 128 MiB buffers,
    /// best of five, split over `threads` threads like the kernels.
    public static func copyBandwidth(threads: Int) -> Double {
        let count = 32 << 20  // floats: 128 MiB
        let source = UnsafeMutablePointer<Float>.allocate(capacity: count)
        let target = UnsafeMutablePointer<Float>.allocate(capacity: count)
        defer {
            source.deallocate()
            target.deallocate()
        }
        source.initialize(repeating: 1, count: count)
        target.initialize(repeating: 0, count: count)
        let chunks = 64
        let per = count / chunks
        var best = Double.infinity
        let clock = ContinuousClock()
        let previous = Parallelism.maximumThreads
        Parallelism.maximumThreads = threads
        defer { Parallelism.maximumThreads = previous }
        let src = UncheckedPointer(value: source)
        let dst = UncheckedPointer(value: target)
        for _ in 0..<5 {
            let elapsed = clock.measure {
                Parallelism.forEachChunk(chunks, work: count) { k in
                    (dst.value + k * per).update(from: src.value + k * per, count: per)
                }
            }
            best = min(best, seconds(elapsed))
        }
        blackHole(target[count / 2])
        return Double(2 * count * MemoryLayout<Float>.size) / best / 1e9
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
    }

    @inline(never)
    static func blackHole<T>(_ value: T) {
        withExtendedLifetime(value) {}
    }
}

/// A pointer shared with worker threads that write disjoint parts of it.
struct UncheckedPointer: @unchecked Sendable {
    let value: UnsafeMutablePointer<Float>
}
