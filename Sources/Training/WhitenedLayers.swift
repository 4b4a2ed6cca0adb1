import NormKit

/// A fully connected layer with a whitened reparametrization (WNN, GWNN or EigenNet; see
/// ``WhitenedAffine`` for the equations and the function-preserving refresh).
///
/// The initial weight and bias are drawn as ``Linear`` draws them (same generator sequence), so
/// a whitened network without truncation starts as the same function as the plain one.
///
/// ## Shape
/// `[N, in]` → `[N, out]`.
public final class WhitenedLinear<Scalar: NormScalar>: Module {
    /// The whitened affine map.
    public let core: WhitenedAffine<Scalar>

    /// Creates the layer.
    /// - Throws: ``TrainingError`` for bad settings or sizes.
    public init(
        _ inputs: Int, _ outputs: Int, settings: WhiteningSettings, name: String = "linear",
        generator: inout SeededGenerator
    ) throws {
        let plain = try Linear<Scalar>(inputs, outputs, name: name, generator: &generator)
        core = try WhitenedAffine(
            inputs: inputs, outputs: outputs, initialWeight: plain.weight.current.scalars,
            initialBias: plain.bias.value.scalars, settings: settings, name: name)
    }

    /// V (or W, A) and b.
    public var parameters: [Parameter<Scalar>] { core.parameters }
    /// μ, P, S, the input statistics and the update step.
    public var buffers: [String: Tensor<Scalar>] { core.buffers }
    /// Restores ``buffers``.
    public func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws {
        try core.loadBuffers(buffers)
    }

    /// Computes the output (a training call on a refresh step re-estimates the whitening first).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank == 2, x.shape[1] == core.inputs else {
            throw TrainingError.shape(
                layer: "WhitenedLinear", expected: "[N, \(core.inputs)]", actual: x.shape)
        }
        return try core.forward(rows: x, mode: mode)
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        try core.backward(rows: dy)
    }
}

/// A 2-D convolution whose affine map is whitened over the im2col patch vectors.
///
/// Each output position sees one patch vector of d = C_in·k·k values (zero padding included);
/// the patches of all N·H′·W′ positions of the batch are the rows ``WhitenedAffine`` whitens
/// (WNN, EigenNet) or whose outputs it whitens (GWNN). Whitening the whole patch, rather than
/// per channel group, keeps the spatial correlations between neighbouring pixels, which are the
/// largest in images; the harness's convolutions have d ≤ 2·width·9 (288 at width 16), so one
/// d×d eigendecomposition every T steps is cheap. Patches larger than
/// ``maximumPatchDimension`` are refused rather than grouped (per-group whitening is not
/// implemented).
///
/// ## Shape
/// `[N, C_in, H, W]` → `[N, C_out, H′, W′]`, H′ = (H + 2p − k)/s + 1.
public final class WhitenedConv2d<Scalar: NormScalar>: Module {
    /// The largest patch dimension C_in·k·k accepted.
    public static var maximumPatchDimension: Int { 2048 }
    /// The whitened affine map on patch rows.
    public let core: WhitenedAffine<Scalar>
    let geometry: Conv2d<Scalar>
    var inputShape: [Int] = []

    /// Creates the layer; the initial weight is drawn as ``Conv2d`` draws it, and the layer
    /// always has a bias (the refresh moves μ's contribution into it).
    /// - Throws: ``TrainingError`` for bad settings or sizes.
    public init(
        _ inChannels: Int, _ outChannels: Int, kernel: Int, stride: Int = 1, padding: Int = 0,
        settings: WhiteningSettings, name: String = "conv", generator: inout SeededGenerator
    ) throws {
        geometry = try Conv2d<Scalar>(
            inChannels, outChannels, kernel: kernel, stride: stride, padding: padding,
            bias: false, name: name, generator: &generator)
        let (d, overflow) = inChannels.multipliedReportingOverflow(by: kernel * kernel)
        guard !overflow, kernel <= 1 << 15, d <= Self.maximumPatchDimension else {
            throw TrainingError.invalidSetting(
                name: "\(name) patch dimension", value: "\(inChannels)·\(kernel)²",
                requirement: "at most \(Self.maximumPatchDimension) for patch whitening")
        }
        core = try WhitenedAffine(
            inputs: d, outputs: outChannels, initialWeight: geometry.weight.current.scalars,
            initialBias: [Scalar](repeating: 0, count: outChannels), settings: settings,
            name: name)
    }

    /// V (or W, A) and b.
    public var parameters: [Parameter<Scalar>] { core.parameters }
    /// μ, P, S, the input statistics and the update step.
    public var buffers: [String: Tensor<Scalar>] { core.buffers }
    /// Restores ``buffers``.
    public func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws {
        try core.loadBuffers(buffers)
    }

    /// Computes the output (a training call on a refresh step re-estimates the whitening first).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank == 4, x.shape[1] == geometry.inChannels,
            x.shape[2] + 2 * geometry.padding >= geometry.kernel,
            x.shape[3] + 2 * geometry.padding >= geometry.kernel
        else {
            throw TrainingError.shape(
                layer: "WhitenedConv2d", expected: "[N, \(geometry.inChannels), H, W] ≥ kernel",
                actual: x.shape)
        }
        let (n, h, w) = (x.shape[0], x.shape[2], x.shape[3])
        let (ho, wo) = (geometry.outputSize(h), geometry.outputSize(w))
        let plane = ho * wo
        let d = core.inputs
        let out = core.outputs
        var rows = try Tensor<Scalar>(zeros: [n * plane, d])
        var cols = [Scalar](repeating: 0, count: d * plane)
        let c = geometry.inChannels
        x.withUnsafeBufferPointer { xp in
            rows.withUnsafeMutableBufferPointer { rp in
                cols.withUnsafeMutableBufferPointer { cp in
                    for s in 0..<n {
                        geometry.im2col(
                            xp.baseAddress! + s * c * h * w, h: h, w: w, into: cp.baseAddress!,
                            ld: plane)
                        for r in 0..<d {
                            for q in 0..<plane { rp[(s * plane + q) * d + r] = cp[r * plane + q] }
                        }
                    }
                }
            }
        }
        let yRows = try core.forward(rows: rows, mode: mode)
        let y = try Self.channelsFirst(yRows, samples: n, channels: out, ho: ho, wo: wo)
        inputShape = x.shape
        return y
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard inputShape.count == 4 else { throw TrainingError.noForward(layer: "WhitenedConv2d") }
        let (n, h, w) = (inputShape[0], inputShape[2], inputShape[3])
        let (ho, wo) = (geometry.outputSize(h), geometry.outputSize(w))
        let plane = ho * wo
        let (d, out, c) = (core.inputs, core.outputs, geometry.inChannels)
        guard dy.shape == [n, out, ho, wo] else {
            throw TrainingError.shape(
                layer: "WhitenedConv2d", expected: "dy [\(n), \(out), \(ho), \(wo)]",
                actual: dy.shape)
        }
        let g = try Self.positionRows(dy, samples: n, channels: out, plane: plane)
        let dRows = try core.backward(rows: g)
        var dx = try Tensor<Scalar>(zeros: inputShape)
        var cols = [Scalar](repeating: 0, count: d * plane)
        dRows.withUnsafeBufferPointer { rp in
            dx.withUnsafeMutableBufferPointer { dp in
                cols.withUnsafeMutableBufferPointer { cp in
                    for s in 0..<n {
                        for r in 0..<d {
                            for q in 0..<plane { cp[r * plane + q] = rp[(s * plane + q) * d + r] }
                        }
                        geometry.col2im(
                            cp.baseAddress!, ld: plane, h: h, w: w,
                            into: dp.baseAddress! + s * c * h * w)
                    }
                }
            }
        }
        return dx
    }
}

extension WhitenedConv2d {
    /// `[N, C, H′, W′]` → rows `[N·H′·W′, C]` (one row per output position).
    static func positionRows(
        _ t: Tensor<Scalar>, samples n: Int, channels: Int, plane: Int
    ) throws -> Tensor<Scalar> {
        try reorder(t, to: [n * plane, channels], samples: n, channels: channels, plane: plane) {
            s, o, q in ((s * channels + o) * plane + q, (s * plane + q) * channels + o)
        }
    }

    /// Rows `[N·H′·W′, C]` → `[N, C, H′, W′]`.
    static func channelsFirst(
        _ rows: Tensor<Scalar>, samples n: Int, channels: Int, ho: Int, wo: Int
    ) throws -> Tensor<Scalar> {
        let plane = ho * wo
        return try reorder(
            rows, to: [n, channels, ho, wo], samples: n, channels: channels, plane: plane
        ) { s, o, q in ((s * plane + q) * channels + o, (s * channels + o) * plane + q) }
    }

    /// Copies every (sample, channel, position) entry from one layout to the other; `index`
    /// gives (source, destination) offsets.
    static func reorder(
        _ t: Tensor<Scalar>, to shape: [Int], samples n: Int, channels: Int, plane: Int,
        index: (Int, Int, Int) -> (Int, Int)
    ) throws -> Tensor<Scalar> {
        var out = try Tensor<Scalar>(zeros: shape)
        t.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for s in 0..<n {
                    for o in 0..<channels {
                        for q in 0..<plane {
                            let (from, to) = index(s, o, q)
                            dst[to] = src[from]
                        }
                    }
                }
            }
        }
        return out
    }
}

/// Finds the whitened layers of a network.
public enum WhitenedLayers {
    /// The whitened affine maps of `module`, in order.
    public static func cores<Scalar: NormScalar>(in module: any Module) -> [WhitenedAffine<Scalar>]
    {
        switch module {
        case let l as WhitenedLinear<Scalar>: return [l.core]
        case let l as WhitenedConv2d<Scalar>: return [l.core]
        case let s as Sequential<Scalar>:
            return s.layers.flatMap { cores(in: $0) as [WhitenedAffine<Scalar>] }
        case let a as AnyModule<Scalar>: return cores(in: a.base)
        case let r as ResidualBlock<Scalar>:
            return cores(in: r.body)
                + (r.shortcut.map { cores(in: $0) as [WhitenedAffine<Scalar>] } ?? [])
        default: return []
        }
    }
}
