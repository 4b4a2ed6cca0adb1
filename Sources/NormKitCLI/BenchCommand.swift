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

    @Argument(help: "The layer: any name `normkit train --list-normalizers` prints.")
    var layer: String

    @Option(help: "Input shape, e.g. 32,64,56,56 (channels-first order of N,C,H,W; see --layout).")
    var shape: String

    @Option(help: "nchw (default) or nhwc; with nhwc the tensor is [N, H, W, C].")
    var layout: String = "nchw"

    @Option(
        help: "Number of groups (groupnorm; default 32, or the largest divisor of C below 32).")
    var groups: Int?

    @Option(help: "Trailing dimensions to normalize (layernorm, rmsnorm).")
    var normalizedDims: Int = 1

    @Option(help: "dbn, iternorm, switchwhiten: channels per group (default: the layer's).")
    var groupSize: Int?

    @Option(
        help:
            "forward (training; the default), inference, backward (given one forward), step (forward + backward), or residual (fused h = x + r; y = norm(h); standard layers)."
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
        // Sizes are checked (overflow-safe, against the documented SizeLimits) before anything
        // is allocated; the benchmark keeps a few tensors of this shape.
        let dims: [Int]
        do {
            dims = try SizeLimits.parseShape(shape, maximumElements: SizeLimits.maximumElements / 4)
        } catch { throw ValidationError(error.description) }
        guard `repeat` <= SizeLimits.maximumRepeats else {
            throw ValidationError(
                "--repeat \(`repeat`) is refused: at most \(SizeLimits.maximumRepeats) (SizeLimits)"
            )
        }
        let entry: NormalizerEntry
        do { entry = try NormalizerRegistry.all.entry(named: layer) } catch {
            throw ValidationError("\(error)")
        }
        guard let layoutValue = Layout(rawValue: layout.lowercased()) else {
            throw ValidationError("unknown layout '\(layout)'; expected nchw or nhwc")
        }
        guard let passValue = BenchmarkPass(rawValue: pass) else {
            throw ValidationError("--pass must be forward, inference, backward, residual or step")
        }
        guard `repeat` >= 1 else { throw ValidationError("--repeat must be at least 1") }
        try checkThreads(threads)
        // Channels-last: the user gives N,C,H,W order; the tensor is [N, H, W, C].
        var tensorShape = dims
        if layoutValue == .channelsLast && dims.count >= 3 {
            tensorShape = [dims[0]] + Array(dims[2...]) + [dims[1]]
        }
        var options = NormalizerOptions()
        options.layout = layoutValue
        options.groups = groups
        options.normalizedDims = normalizedDims
        if let groupSize { options.values["group-size"] = "\(groupSize)" }
        let result = try Benchmark.run(
            entry.name, shape: tensorShape, options: options, pass: passValue,
            threads: threads ?? Parallelism.maximumThreads, repeats: `repeat`,
            kernels: reference ? .reference : .automatic)
        print(json ? result.json : result.text)
    }
}
