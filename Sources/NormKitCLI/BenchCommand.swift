import ArgumentParser
import Foundation
import NormKit

/// `normkit bench`: times one layer pass in-process and relates it to the machine's memory
/// bandwidth, measured in the same process.
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Time a normalization layer (release builds only give meaningful numbers).",
        discussion: """
            Warm-up, then R timed repeats of the pass; prints the median and minimum time, the \
            effective bandwidth under the minimum traffic model (forward and inference read x and \
            write y: 8 bytes per element; backward reads x and dy and writes dx: 12), the machine's \
            copy bandwidth measured in the same process with the same threads, and their ratio.
            """)

    @Argument(help: "The layer: \(StandardLayer.allCases.map(\.rawValue).joined(separator: ", ")).")
    var layer: String

    @Option(help: "Input shape, e.g. 32,64,56,56 (channels-first order of N,C,H,W; see --layout).")
    var shape: String

    @Option(help: "nchw (default) or nhwc; with nhwc the tensor is [N, H, W, C].")
    var layout: String = "nchw"

    @Option(help: "Number of groups (groupnorm; default 32).")
    var groups: Int = 32

    @Option(help: "Trailing dimensions to normalize (layernorm, rmsnorm).")
    var normalizedDims: Int = 1

    @Option(
        help:
            "forward (training), inference, backward (given one forward), or residual (fused h = x + r; y = norm(h))."
    )
    var pass: String = "forward"

    @Option(help: "Threads (default: all online processors).")
    var threads: Int?

    @Option(help: "Timed repeats.")
    var `repeat`: Int = 20

    @Flag(help: "Use the reference kernel instead of the fast one.")
    var reference = false

    @Flag(help: "Print one JSON object.")
    var json = false

    func run() throws {
        let dims = shape.split(separator: ",").compactMap {
            Int($0.trimmingCharacters(in: .whitespaces))
        }
        guard !dims.isEmpty, dims.count == shape.split(separator: ",").count,
            dims.allSatisfy({ $0 >= 1 })
        else {
            throw ValidationError(
                "--shape must be positive integers separated by commas, got '\(shape)'")
        }
        let learned = [
            "switchnorm", "sparseswitchnorm", "batchrenorm", "metanorm", "dbn", "iternorm",
            "switchwhiten",
        ]
        .contains(layer)
        guard learned || StandardLayer(rawValue: layer) != nil else {
            throw ValidationError("unknown layer '\(layer)'")
        }
        guard let layoutValue = Layout(rawValue: layout.lowercased()) else {
            throw ValidationError("unknown layout '\(layout)'; expected nchw or nhwc")
        }
        guard let passValue = BenchmarkPass(rawValue: pass) else {
            throw ValidationError("--pass must be forward, inference, backward, residual or step")
        }
        guard `repeat` >= 1 else { throw ValidationError("--repeat must be at least 1") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        // Channels-last: the user gives N,C,H,W order; the tensor is [N, H, W, C].
        var tensorShape = dims
        if layoutValue == .channelsLast && dims.count >= 3 {
            tensorShape = [dims[0]] + Array(dims[2...]) + [dims[1]]
        }
        var options = LayerOptions()
        options.layout = layoutValue
        options.groups = groups
        options.normalizedDims = normalizedDims
        if learned {
            guard passValue == .step else {
                throw ValidationError(
                    "\(layer) is benchmarked with --pass step (forward + backward)")
            }
            let result = try Benchmark.learnedStep(
                layer, shape: tensorShape, layout: layoutValue,
                threads: threads ?? Parallelism.maximumThreads,
                repeats: `repeat`)
            print(json ? result.json : result.text)
            return
        }
        let name = StandardLayer(rawValue: layer)!
        let result = try Benchmark.run(
            name, shape: tensorShape, options: options, pass: passValue,
            threads: threads ?? Parallelism.maximumThreads, repeats: `repeat`,
            kernels: reference ? .reference : .automatic)
        print(json ? result.json : result.text)
    }
}

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
                + "\"bandwidth_fraction\":\(format(bandwidthFraction))}"
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

    /// Times `repeats` calls of the pass after three warm-up calls.
    public static func run(
        _ name: StandardLayer, shape: [Int], options: LayerOptions, pass: BenchmarkPass,
        threads: Int,
        repeats: Int, kernels: KernelChoice = .automatic
    ) throws -> Result {
        let previous = Parallelism.maximumThreads
        Parallelism.maximumThreads = threads
        defer { Parallelism.maximumThreads = previous }
        var g = SeededGenerator(seed: 1)
        let x = try Tensor<Float>.randomNormal(shape: shape, mean: 0.5, using: &g)
        let dy = try Tensor<Float>.randomNormal(shape: shape, using: &g)
        let layer: NormLayer<Float> = try name.make(inputShape: shape, options: options)
        layer.kernels = kernels
        var y = try Tensor<Float>(zeros: shape)
        let cache = try layer.forward(x, mode: .training, into: &y)
        var grads = try layer.backward(dy, cache: cache)
        var h = try Tensor<Float>(zeros: shape)
        var times: [Double] = []
        let clock = ContinuousClock()
        for i in 0..<(repeats + 3) {
            let elapsed = try clock.measure {
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
            }
            if i >= 3 { times.append(seconds(elapsed)) }
        }
        blackHole(y.scalars.first ?? 0)
        blackHole(grads.input.scalars.first ?? 0)
        times.sort()
        let median = times[times.count / 2]
        let bytes = Double(x.count * pass.bytesPerElement)
        return Result(
            layer: name.rawValue, shape: shape, layout: options.layout, pass: pass,
            threads: threads,
            repeats: repeats, medianMilliseconds: median * 1e3, minimumMilliseconds: times[0] * 1e3,
            effectiveGBps: bytes / median / 1e9, bandwidthGBps: copyBandwidth(threads: threads),
            kernels: kernels)
    }

    /// Times one training step (forward + backward) of a learned normalizer.
    public static func learnedStep(
        _ layer: String, shape: [Int], layout: Layout, threads: Int, repeats: Int,
        groupSize: Int = 16
    ) throws -> Result {
        let previous = Parallelism.maximumThreads
        Parallelism.maximumThreads = threads
        defer { Parallelism.maximumThreads = previous }
        var g = SeededGenerator(seed: 1)
        let x = try Tensor<Float>.randomNormal(shape: shape, mean: 0.5, using: &g)
        let dy = try Tensor<Float>.randomNormal(shape: shape, using: &g)
        let channels = shape[layout.channelAxis(rank: shape.count)]
        let step: () throws -> Float
        switch layer {
        case "switchnorm", "sparseswitchnorm":
            let sn = try SwitchableNorm<Float>(
                channelCount: channels, weighting: layer == "switchnorm" ? .softmax : .sparsestMax,
                layout: layout)
            sn.radius = 0.5
            step = {
                let (_, c) = try sn.forward(x, mode: .training)
                return try sn.backward(dy, cache: c).input[flat: 0]
            }
        case "dbn":
            let dbn = try DecorrelatedBatchNorm<Float>(channelCount: channels, groupSize: groupSize)
            step = {
                let (_, c) = try dbn.forward(x, mode: .training)
                return try dbn.backward(dy, cache: c).input[flat: 0]
            }
        case "iternorm":
            let it = try IterNorm<Float>(channelCount: channels, groupSize: groupSize)
            step = {
                let (_, c) = try it.forward(x, mode: .training)
                return try it.backward(dy, cache: c).input[flat: 0]
            }
        case "switchwhiten":
            let sw = try SwitchableWhitening<Float>(channelCount: channels, groupSize: groupSize)
            step = {
                let (_, c) = try sw.forward(x, mode: .training)
                return try sw.backward(dy, cache: c).input[flat: 0]
            }
        case "batchrenorm":
            let brn = try BatchRenorm<Float>(channelCount: channels, layout: layout)
            step = {
                let (_, c) = try brn.forward(x, mode: .training)
                return try brn.backward(dy, cache: c).input[flat: 0]
            }
        default:
            let meta = try MetaNorm<Float>(channelCount: channels, layout: layout)
            step = {
                let (_, c) = try meta.forward(x, mode: .training)
                return try meta.backward(dy, cache: c).input[flat: 0]
            }
        }
        var times: [Double] = []
        let clock = ContinuousClock()
        for i in 0..<(repeats + 3) {
            var sink: Float = 0
            let elapsed = try clock.measure { sink = try step() }
            blackHole(sink)
            if i >= 3 { times.append(seconds(elapsed)) }
        }
        times.sort()
        let median = times[times.count / 2]
        return Result(
            layer: layer, shape: shape, layout: layout, pass: .step, threads: threads,
            repeats: repeats,
            medianMilliseconds: median * 1e3, minimumMilliseconds: times[0] * 1e3,
            effectiveGBps: Double(x.count * BenchmarkPass.step.bytesPerElement) / median / 1e9,
            bandwidthGBps: copyBandwidth(threads: threads), kernels: .automatic)
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
