import NormKit

/// A fully connected layer, `y = x·Wᵀ + b`, with W of shape `[out, in]` (PyTorch's layout).
///
/// W is a plain parameter or, with `weightNorm`, computed by a ``WeightParametrization`` from
/// its raw parameters (which are then the trainable ones; see ``WeightSource``).
///
/// ## Shape
/// `[N, in]` → `[N, out]`.
public final class Linear<Scalar: NormScalar>: Module {
    /// W, `[out, in]`, Kaiming-uniform initialised like `nn.Linear`: a plain parameter or a
    /// parametrization's output.
    public let weight: WeightSource<Scalar>
    /// b, `[out]`.
    public let bias: Parameter<Scalar>
    let inputs: Int
    let outputs: Int
    var lastInput: Tensor<Scalar>?

    /// Creates a layer with weights drawn from U(−1/√in, 1/√in) (PyTorch's default) from
    /// `generator`, parametrized by `weightNorm` as PyTorch's registration does (W unchanged).
    public init(
        _ inputs: Int, _ outputs: Int, name: String = "linear",
        weightNorm: WeightNormMethod = .none,
        weightNormOptions: WeightNormMethod.Options = .init(),
        generator: inout SeededGenerator
    ) throws {
        self.inputs = inputs
        self.outputs = outputs
        let bound = 1 / Double(inputs).squareRoot()
        let w = (0..<(inputs * outputs)).map { _ in
            Scalar((2 * generator.nextUniform() - 1) * bound)
        }
        let b = (0..<outputs).map { _ in Scalar((2 * generator.nextUniform() - 1) * bound) }
        weight = try WeightSource(
            name: name, initial: try Tensor(shape: [outputs, inputs], scalars: w),
            method: weightNorm, options: weightNormOptions)
        bias = Parameter(name: name + ".bias", value: try Tensor(shape: [outputs], scalars: b))
    }

    /// The trainable parameters (W's raw parameters, then b).
    public var parameters: [Parameter<Scalar>] { weight.parameters + [bias] }
    /// Spectral Norm's u and v.
    public var buffers: [String: Tensor<Scalar>] { weight.buffers }
    /// Restores u and v.
    public func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws {
        try weight.loadBuffers(buffers)
    }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank == 2, x.shape[1] == inputs else {
            throw TrainingError.shape(layer: "Linear", expected: "[N, \(inputs)]", actual: x.shape)
        }
        let n = x.shape[0]
        let w = try weight.weight(mode: mode)
        var y = try Tensor<Scalar>(zeros: [n, outputs])
        x.withUnsafeBufferPointer { xp in
            w.withUnsafeBufferPointer { wp in
                y.withUnsafeMutableBufferPointer { yp in
                    BLAS.gemm(
                        transposeA: false, transposeB: true, m: n, n: outputs, k: inputs,
                        xp.baseAddress!, lda: inputs,
                        wp.baseAddress!, ldb: inputs, yp.baseAddress!, ldc: outputs)
                    for i in 0..<n {
                        for j in 0..<outputs { yp[i * outputs + j] += bias.value.scalars[j] }
                    }
                }
            }
        }
        lastInput = x
        return y
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let x = lastInput else { throw TrainingError.noForward(layer: "Linear") }
        let n = x.shape[0]
        var dx = try Tensor<Scalar>(zeros: x.shape)
        var dw = try Tensor<Scalar>(zeros: [outputs, inputs])
        dy.withUnsafeBufferPointer { dyp in
            x.withUnsafeBufferPointer { xp in
                dw.withUnsafeMutableBufferPointer { dwp in
                    // dW = dyᵀ·x
                    BLAS.gemm(
                        transposeA: true, transposeB: false, m: outputs, n: inputs, k: n,
                        dyp.baseAddress!,
                        lda: outputs, xp.baseAddress!, ldb: inputs, dwp.baseAddress!,
                        ldc: inputs)
                }
            }
            weight.current.withUnsafeBufferPointer { wp in
                dx.withUnsafeMutableBufferPointer { dxp in
                    // dx = dy·W
                    BLAS.gemm(
                        transposeA: false, transposeB: false, m: n, n: inputs, k: outputs,
                        dyp.baseAddress!,
                        lda: outputs, wp.baseAddress!, ldb: inputs, dxp.baseAddress!, ldc: inputs)
                }
            }
            bias.gradient.withUnsafeMutableBufferPointer { db in
                for i in 0..<n { for j in 0..<outputs { db[j] += dyp[i * outputs + j] } }
            }
        }
        try weight.accumulate(dw)
        return dx
    }
}

/// A 2-D convolution (cross-correlation, as PyTorch) through im2col and one GEMM per sample.
///
/// ```
/// cols[(c, i, j), (h, w)] = x[c, h·s + i − p, w·s + j − p]   (0 outside the image)
/// y[n] = W[out, c·k·k] · cols + b
/// ```
/// W is a plain parameter or, with `weightNorm`, computed by a ``WeightParametrization``
/// (see ``WeightSource``).
///
/// ## Shape
/// `[N, C_in, H, W]` → `[N, C_out, H′, W′]`, H′ = (H + 2p − k)/s + 1.
public final class Conv2d<Scalar: NormScalar>: Module {
    /// W, `[out, in, k, k]`, Kaiming-normal (fan-in, ReLU gain): a plain parameter or a
    /// parametrization's output.
    public let weight: WeightSource<Scalar>
    /// b, `[out]` (nil when a normalizer follows: its β does the job).
    public let bias: Parameter<Scalar>?
    let inChannels: Int
    let outChannels: Int
    let kernel: Int
    let stride: Int
    let padding: Int
    var lastInput: Tensor<Scalar>?

    /// Creates a convolution with Kaiming-normal weights N(0, 2/fan_in) from `generator`,
    /// parametrized by `weightNorm` as PyTorch's registration does (W unchanged).
    public init(
        _ inChannels: Int, _ outChannels: Int, kernel: Int, stride: Int = 1, padding: Int = 0,
        bias: Bool = true,
        name: String = "conv", weightNorm: WeightNormMethod = .none,
        weightNormOptions: WeightNormMethod.Options = .init(),
        generator: inout SeededGenerator
    ) throws {
        guard inChannels >= 1, outChannels >= 1, kernel >= 1, stride >= 1, padding >= 0 else {
            throw TrainingError.invalidSetting(
                name: "Conv2d",
                value: "\(inChannels)→\(outChannels) k\(kernel) s\(stride) p\(padding)",
                requirement: "positive sizes")
        }
        guard kernel <= Self.sizeLimit, stride <= Self.sizeLimit, padding <= Self.sizeLimit else {
            throw TrainingError.invalidSetting(
                name: "Conv2d", value: "k\(kernel) s\(stride) p\(padding)",
                requirement: "kernel, stride and padding must be at most \(Self.sizeLimit)")
        }
        try Self.checkSize([outChannels, inChannels, kernel, kernel], name: "Conv2d weight")
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.kernel = kernel
        self.stride = stride
        self.padding = padding
        let fanIn = inChannels * kernel * kernel
        let std = (2 / Double(fanIn)).squareRoot()
        let w = (0..<(outChannels * fanIn)).map { _ in Scalar(std * generator.nextNormal()) }
        weight = try WeightSource(
            name: name,
            initial: try Tensor(shape: [outChannels, inChannels, kernel, kernel], scalars: w),
            method: weightNorm, options: weightNormOptions)
        self.bias =
            bias ? Parameter(name: name + ".bias", value: try Tensor(zeros: [outChannels])) : nil
    }

    /// The trainable parameters (W's raw parameters, then b).
    public var parameters: [Parameter<Scalar>] { weight.parameters + (bias.map { [$0] } ?? []) }
    /// Spectral Norm's u and v.
    public var buffers: [String: Tensor<Scalar>] { weight.buffers }
    /// Restores u and v.
    public func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws {
        try weight.loadBuffers(buffers)
    }

    func outputSize(_ h: Int) -> Int { (h + 2 * padding - kernel) / stride + 1 }

    /// The largest kernel side, stride and padding a Conv2d accepts (sizes from files and flags
    /// stay far from overflow in ``outputSize(_:)``).
    public static var sizeLimit: Int { 1 << 16 }

    /// ``SizeLimits/checkElements(_:maximumElements:name:text:)`` as a ``TrainingError``.
    static func checkSize(_ shape: [Int], name: String) throws(TrainingError) {
        do { try SizeLimits.checkElements(shape, name: name) } catch {
            throw .invalidSetting(
                name: error.name, value: error.value, requirement: error.requirement)
        }
    }

    /// Samples per im2col chunk: the chunk's columns stay under 2²² elements (16 MB of Float),
    /// so a training batch of the harness is one chunk and a 256-image evaluation batch a few.
    func chunkSize(n: Int, columnsPerSample: Int) -> Int {
        max(1, min(n, (1 << 22) / max(columnsPerSample, 1)))
    }

    /// The valid output columns `ow` of kernel column `j`: those with 0 ≤ ow·s + j − p < w.
    @inline(__always)
    func validRange(_ j: Int, w: Int, wo: Int) -> Range<Int> {
        let shift = padding - j
        let lo = shift > 0 ? (shift + stride - 1) / stride : 0
        let last = w - 1 + padding - j  // ow·s ≤ last
        let hi = last < 0 ? 0 : min(wo, last / stride + 1)
        return lo..<max(lo, hi)
    }

    /// Writes one sample's columns (C·k·k rows of H′·W′) into `cols`, whose rows are `ld`
    /// apart (so that several samples sit side by side for one GEMM).
    func im2col(
        _ x: UnsafePointer<Scalar>, h: Int, w: Int, into cols: UnsafeMutablePointer<Scalar>,
        ld: Int
    ) {
        let ho = outputSize(h)
        let wo = outputSize(w)
        var row = 0
        for c in 0..<inChannels {
            for i in 0..<kernel {
                for j in 0..<kernel {
                    let out = cols + row * ld
                    let valid = validRange(j, w: w, wo: wo)
                    for oh in 0..<ho {
                        let dst = out + oh * wo
                        let ih = oh * stride + i - padding
                        guard ih >= 0 && ih < h, !valid.isEmpty else {
                            dst.update(repeating: 0, count: wo)
                            continue
                        }
                        dst.update(repeating: 0, count: valid.lowerBound)
                        let src = x + (c * h + ih) * w + j - padding
                        if stride == 1 {
                            (dst + valid.lowerBound).update(
                                from: src + valid.lowerBound, count: valid.count)
                        } else {
                            for ow in valid { dst[ow] = src[ow * stride] }
                        }
                        (dst + valid.upperBound).update(
                            repeating: 0, count: wo - valid.upperBound)
                    }
                    row += 1
                }
            }
        }
    }

    /// Adds one sample's columns back into its image gradient (the adjoint of im2col).
    func col2im(
        _ cols: UnsafePointer<Scalar>, ld: Int, h: Int, w: Int,
        into dx: UnsafeMutablePointer<Scalar>
    ) {
        let ho = outputSize(h)
        let wo = outputSize(w)
        var row = 0
        for c in 0..<inChannels {
            for i in 0..<kernel {
                for j in 0..<kernel {
                    let input = cols + row * ld
                    let valid = validRange(j, w: w, wo: wo)
                    for oh in 0..<ho {
                        let ih = oh * stride + i - padding
                        guard ih >= 0 && ih < h else { continue }
                        let src = input + oh * wo
                        let dst = dx + (c * h + ih) * w + j - padding
                        if stride == 1 {
                            for ow in valid { dst[ow] += src[ow] }
                        } else {
                            for ow in valid { dst[ow * stride] += src[ow] }
                        }
                    }
                    row += 1
                }
            }
        }
    }

    /// Reused between steps: the columns of the last chunk, a GEMM output in `[out, m·H′·W′]`
    /// order, and the column gradient.
    var cols: [Scalar] = []
    var product: [Scalar] = []
    var columnGradient: [Scalar] = []
    /// Whether ``cols`` holds the whole last forward batch (backward then skips im2col).
    var colsHoldLastInput = false

    static func reserve(_ buffer: inout [Scalar], _ count: Int) {
        if buffer.count < count { buffer = [Scalar](repeating: 0, count: count) }
    }

    /// Computes the output (see the type's documentation).
    ///
    /// The samples of a chunk share one GEMM, `W [out, C·k·k] · cols [C·k·k, m·H′·W′]`, whose
    /// output is then scattered to `[N, out, H′, W′]` with the bias.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank == 4, x.shape[1] == inChannels else {
            throw TrainingError.shape(
                layer: "Conv2d", expected: "[N, \(inChannels), H, W]", actual: x.shape)
        }
        let (n, h, w) = (x.shape[0], x.shape[2], x.shape[3])
        let (ho, wo) = (outputSize(h), outputSize(w))
        guard ho >= 1, wo >= 1 else {
            throw TrainingError.shape(
                layer: "Conv2d", expected: "an image at least the kernel's size", actual: x.shape)
        }
        // The output and one sample's patch matrix must fit the size limit (checked products).
        try Self.checkSize([n, outChannels, ho, wo], name: "Conv2d output")
        try Self.checkSize([inChannels * kernel * kernel, ho, wo], name: "Conv2d patches")
        let k = inChannels * kernel * kernel
        let plane = ho * wo
        let chunk = chunkSize(n: n, columnsPerSample: k * plane)
        Self.reserve(&cols, k * chunk * plane)
        Self.reserve(&product, outChannels * chunk * plane)
        let weightValue = try weight.weight(mode: mode)
        var y = try Tensor<Scalar>(zeros: [n, outChannels, ho, wo])
        let biasValues = bias?.value.scalars
        x.withUnsafeBufferPointer { xp in
            weightValue.withUnsafeBufferPointer { wp in
                y.withUnsafeMutableBufferPointer { yp in
                    cols.withUnsafeMutableBufferPointer { cp in
                        product.withUnsafeMutableBufferPointer { pp in
                            var start = 0
                            while start < n {
                                let m = min(chunk, n - start)
                                let ld = m * plane
                                for s in 0..<m {
                                    im2col(
                                        xp.baseAddress! + (start + s) * inChannels * h * w, h: h,
                                        w: w, into: cp.baseAddress! + s * plane, ld: ld)
                                }
                                BLAS.gemm(
                                    transposeA: false, transposeB: false, m: outChannels, n: ld,
                                    k: k, wp.baseAddress!, lda: k, cp.baseAddress!, ldb: ld,
                                    pp.baseAddress!, ldc: ld)
                                for s in 0..<m {
                                    for o in 0..<outChannels {
                                        let src = pp.baseAddress! + o * ld + s * plane
                                        let dst =
                                            yp.baseAddress! + ((start + s) * outChannels + o)
                                            * plane
                                        if let b = biasValues?[o] {
                                            for q in 0..<plane { dst[q] = src[q] + b }
                                        } else {
                                            dst.update(from: src, count: plane)
                                        }
                                    }
                                }
                                start += m
                            }
                        }
                    }
                }
            }
        }
        colsHoldLastInput = chunk >= n
        lastInput = x
        return y
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    ///
    /// Per chunk: dy gathered to `[out, m·H′·W′]`; `dW += dy · colsᵀ`, `dcols = Wᵀ · dy`, and
    /// col2im of dcols into dx.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let x = lastInput else { throw TrainingError.noForward(layer: "Conv2d") }
        let (n, h, w) = (x.shape[0], x.shape[2], x.shape[3])
        let (ho, wo) = (outputSize(h), outputSize(w))
        guard dy.shape == [n, outChannels, ho, wo] else {
            throw TrainingError.shape(
                layer: "Conv2d", expected: "dy [\(n), \(outChannels), \(ho), \(wo)]",
                actual: dy.shape)
        }
        let k = inChannels * kernel * kernel
        let plane = ho * wo
        let chunk = chunkSize(n: n, columnsPerSample: k * plane)
        Self.reserve(&cols, k * chunk * plane)
        Self.reserve(&product, outChannels * chunk * plane)
        Self.reserve(&columnGradient, k * chunk * plane)
        var dx = try Tensor<Scalar>(zeros: x.shape)
        var dw = try Tensor<Scalar>(zeros: weight.current.shape)
        var db = [Scalar](repeating: 0, count: outChannels)
        let reuse = colsHoldLastInput && chunk >= n
        x.withUnsafeBufferPointer { xp in
            dy.withUnsafeBufferPointer { dyp in
                weight.current.withUnsafeBufferPointer { wp in
                    dw.withUnsafeMutableBufferPointer { dwp in
                        dx.withUnsafeMutableBufferPointer { dxp in
                            cols.withUnsafeMutableBufferPointer { cp in
                                product.withUnsafeMutableBufferPointer { gp in
                                    columnGradient.withUnsafeMutableBufferPointer { dcp in
                                        var start = 0
                                        while start < n {
                                            let m = min(chunk, n - start)
                                            let ld = m * plane
                                            for s in 0..<m {
                                                if !reuse {
                                                    im2col(
                                                        xp.baseAddress! + (start + s) * inChannels
                                                            * h * w,
                                                        h: h, w: w,
                                                        into: cp.baseAddress! + s * plane,
                                                        ld: ld)
                                                }
                                                for o in 0..<outChannels {
                                                    let src =
                                                        dyp.baseAddress!
                                                        + ((start + s) * outChannels + o) * plane
                                                    let dst = gp.baseAddress! + o * ld + s * plane
                                                    dst.update(from: src, count: plane)
                                                    db[o] += Elementwise.sum(src, count: plane)
                                                }
                                            }
                                            // dW += dy · colsᵀ
                                            BLAS.gemm(
                                                transposeA: false, transposeB: true, m: outChannels,
                                                n: k, k: ld, gp.baseAddress!, lda: ld,
                                                cp.baseAddress!, ldb: ld, beta: 1, dwp.baseAddress!,
                                                ldc: k)
                                            // dcols = Wᵀ · dy
                                            BLAS.gemm(
                                                transposeA: true, transposeB: false, m: k, n: ld,
                                                k: outChannels, wp.baseAddress!, lda: k,
                                                gp.baseAddress!, ldb: ld, dcp.baseAddress!, ldc: ld)
                                            for s in 0..<m {
                                                col2im(
                                                    dcp.baseAddress! + s * plane, ld: ld, h: h,
                                                    w: w,
                                                    into: dxp.baseAddress! + (start + s)
                                                        * inChannels * h * w)
                                            }
                                            start += m
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if let bias { bias.gradient = try bias.gradient + Tensor(db) }
        try weight.accumulate(dw)
        return dx
    }
}

/// max(x, 0).
public final class ReLU<Scalar: NormScalar>: Module {
    /// The last output: its positive entries are where the gradient passes.
    var output: Tensor<Scalar>?

    /// Creates the activation.
    public init() {}

    /// The trainable parameters.
    public var parameters: [Parameter<Scalar>] { [] }

    /// Computes the output (see the type's documentation).
    ///
    /// One pass from x into a new buffer (no copy of x first); NaN becomes 0.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let n = x.count
        let scalars = x.withUnsafeBufferPointer { xp in
            [Scalar](unsafeUninitializedCapacity: n) { yp, initialized in
                Elementwise.rectify(xp.baseAddress!, into: yp.baseAddress!, count: n)
                initialized = n
            }
        }
        let y = try Tensor(shape: x.shape, scalars: scalars)
        output = y
        return y
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let y = output, dy.shape == y.shape else {
            throw TrainingError.noForward(layer: "ReLU")
        }
        let n = dy.count
        let scalars = y.withUnsafeBufferPointer { yp in
            dy.withUnsafeBufferPointer { dp in
                [Scalar](unsafeUninitializedCapacity: n) { dx, initialized in
                    Elementwise.pass(
                        dp.baseAddress!, where: yp.baseAddress!, into: dx.baseAddress!, count: n)
                    initialized = n
                }
            }
        }
        return try Tensor(shape: dy.shape, scalars: scalars)
    }
}

/// The harness's elementwise loops, eight Float lanes at a time (the generic loops compile to
/// one scalar compare-and-branch per element).
enum Elementwise {
    typealias Lanes = SIMD8<Float>

    /// y = x > 0 ? x : 0 (NaN → 0): ``pass(_:where:into:count:)`` with x as both inputs.
    static func rectify<Scalar: NormScalar>(
        _ x: UnsafePointer<Scalar>, into y: UnsafeMutablePointer<Scalar>, count n: Int
    ) {
        pass(x, where: x, into: y, count: n)
    }

    /// dx = y > 0 ? dy : 0 (ReLU's backward from its output y).
    static func pass<Scalar: NormScalar>(
        _ dy: UnsafePointer<Scalar>, where y: UnsafePointer<Scalar>,
        into dx: UnsafeMutablePointer<Scalar>, count n: Int
    ) {
        guard Scalar.self == Float.self else {
            for i in 0..<n { dx[i] = y[i] > 0 ? dy[i] : 0 }
            return
        }
        let (g, out, dst) = (UnsafeRawPointer(dy), UnsafeRawPointer(y), UnsafeMutableRawPointer(dx))
        var i = 0
        while i + 8 <= n {
            let v = g.loadUnaligned(fromByteOffset: i * 4, as: Lanes.self)
            let o = out.loadUnaligned(fromByteOffset: i * 4, as: Lanes.self)
            dst.storeBytes(
                of: v.replacing(with: 0, where: .!(o .> 0)), toByteOffset: i * 4, as: Lanes.self)
            i += 8
        }
        while i < n {
            dx[i] = y[i] > 0 ? dy[i] : 0
            i += 1
        }
    }

    /// The sum of `n` values, in eight partial sums for Float.
    static func sum<Scalar: NormScalar>(_ x: UnsafePointer<Scalar>, count n: Int) -> Scalar {
        guard Scalar.self == Float.self else {
            var total = Scalar(0)
            for i in 0..<n { total += x[i] }
            return total
        }
        let src = UnsafeRawPointer(x)
        var partial = Lanes()
        var i = 0
        while i + 8 <= n {
            partial += src.loadUnaligned(fromByteOffset: i * 4, as: Lanes.self)
            i += 8
        }
        var total = partial.sum()
        while i < n {
            total += src.load(fromByteOffset: i * 4, as: Float.self)
            i += 1
        }
        return unsafeBitCast(total, to: Scalar.self)
    }
}

/// Max or average pooling over k×k windows with stride k (no padding).
public final class Pool2d<Scalar: NormScalar>: Module {
    /// The reduction.
    public enum Kind: Sendable { case max, average }
    let kind: Kind
    let size: Int
    var argmax: [Int] = []
    var inputShape: [Int] = []

    /// Creates a pooling layer.
    public init(_ kind: Kind, size: Int = 2) {
        self.kind = kind
        self.size = size
    }

    /// The trainable parameters.
    public var parameters: [Parameter<Scalar>] { [] }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank == 4, x.shape[2] >= size, x.shape[3] >= size else {
            throw TrainingError.shape(
                layer: "Pool2d", expected: "[N, C, H ≥ \(size), W ≥ \(size)]", actual: x.shape)
        }
        let (nc, h, w) = (x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
        let (ho, wo) = (h / size, w / size)
        var y = try Tensor<Scalar>(zeros: [x.shape[0], x.shape[1], ho, wo])
        if argmax.count != y.count { argmax = [Int](repeating: 0, count: y.count) }
        let isMax = kind == .max
        let area = Scalar(size * size)
        let size = size
        x.withUnsafeBufferPointer { xp in
            y.withUnsafeMutableBufferPointer { out in
                argmax.withUnsafeMutableBufferPointer { am in
                    for p in 0..<nc {
                        for oh in 0..<ho {
                            for ow in 0..<wo {
                                let first = (p * h + oh * size) * w + ow * size
                                var best = xp[first]
                                var bestIndex = first
                                var total = Scalar(0)
                                for i in 0..<size {
                                    for j in 0..<size {
                                        let index = first + i * w + j
                                        let v = xp[index]
                                        total += v
                                        if v > best {
                                            best = v
                                            bestIndex = index
                                        }
                                    }
                                }
                                let o = (p * ho + oh) * wo + ow
                                out[o] = isMax ? best : total / area
                                am[o] = bestIndex
                            }
                        }
                    }
                }
            }
        }
        inputShape = x.shape
        return y
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard !inputShape.isEmpty, dy.count == argmax.count else {
            throw TrainingError.noForward(layer: "Pool2d")
        }
        var dx = try Tensor<Scalar>(zeros: inputShape)
        let (h, w) = (inputShape[2], inputShape[3])
        let (ho, wo) = (dy.shape[2], dy.shape[3])
        let isMax = kind == .max
        let size = size
        let area = Scalar(size * size)
        dy.withUnsafeBufferPointer { g in
            dx.withUnsafeMutableBufferPointer { d in
                argmax.withUnsafeBufferPointer { am in
                    for o in 0..<g.count {
                        if isMax {
                            d[am[o]] += g[o]
                        } else {
                            let p = o / (ho * wo)
                            let oh = (o / wo) % ho
                            let ow = o % wo
                            let share = g[o] / area
                            for i in 0..<size {
                                for j in 0..<size {
                                    d[(p * h + oh * size + i) * w + ow * size + j] += share
                                }
                            }
                        }
                    }
                }
            }
        }
        return dx
    }
}

/// Global average pooling `[N, C, H, W]` → `[N, C]`.
public final class GlobalAveragePool<Scalar: NormScalar>: Module {
    var inputShape: [Int] = []

    /// Creates the layer.
    public init() {}

    /// The trainable parameters.
    public var parameters: [Parameter<Scalar>] { [] }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank == 4 else {
            throw TrainingError.shape(
                layer: "GlobalAveragePool", expected: "[N, C, H, W]", actual: x.shape)
        }
        inputShape = x.shape
        let l = x.shape[2] * x.shape[3]
        let nc = x.shape[0] * x.shape[1]
        let out = (0..<nc).map { p in x.scalars[(p * l)..<((p + 1) * l)].reduce(0, +) / Scalar(l) }
        return try Tensor(shape: [x.shape[0], x.shape[1]], scalars: out)
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard !inputShape.isEmpty else { throw TrainingError.noForward(layer: "GlobalAveragePool") }
        let l = inputShape[2] * inputShape[3]
        var out: [Scalar] = []
        out.reserveCapacity(dy.count * l)
        for v in dy.scalars { out.append(contentsOf: repeatElement(v / Scalar(l), count: l)) }
        return try Tensor(shape: inputShape, scalars: out)
    }
}

/// `[N, …]` → `[N, ∏…]`.
public final class Flatten<Scalar: NormScalar>: Module {
    var inputShape: [Int] = []

    /// Creates the layer.
    public init() {}

    /// The trainable parameters.
    public var parameters: [Parameter<Scalar>] { [] }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        inputShape = x.shape
        return try x.reshaped([x.shape[0], x.count / max(x.shape[0], 1)])
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        try dy.reshaped(inputShape)
    }
}
