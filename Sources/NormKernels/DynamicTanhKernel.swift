#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Dynamic Tanh, `y = w_c · tanh(α·x) + b_c`, forward and backward over raw buffers.
///
/// The channel of flat element i is `(i / inner) % channels`: `inner` = 1 for channels-last
/// `[*, C]` (the DyT reference code's default), the spatial size for channels-first
/// `[N, C, spatial…]`. ``reference`` computes in Double with the C library's `tanh`; the fast
/// Float kernels use SIMD16 and ``Parallelism``, with tanh from an odd rational approximation
/// within 6 Float ulps of tanh (``tanh16(_:)``); NaN propagates.
///
/// Backward (t = tanh(α·x), u = 1 − t²):
/// ```
/// dx = dy · w_c · α · u,   dα = Σ dy · w_c · x · u,   dw_c = Σ dy · t,   db_c = Σ dy
/// ```
/// Parameter gradients are summed per fixed chunk of rows (Float within at most 64 rows,
/// Double across) and merged in chunk order, so results do not depend on the thread count.
public enum DynamicTanhKernel {
    // MARK: - Reference

    /// Plain Double forward.
    ///
    /// `y` is overwritten; `bias` nil means 0.
    public static func reference<T: BinaryFloatingPoint>(
        _ x: UnsafeBufferPointer<T>, alpha: Double, weight: UnsafeBufferPointer<T>,
        bias: UnsafeBufferPointer<T>?, channels: Int, inner: Int,
        into y: UnsafeMutableBufferPointer<T>
    ) {
        for i in 0..<x.count {
            let c = (i / inner) % channels
            let t = tanh(alpha * Double(x[i]))
            y[i] = T(Double(weight[c]) * t + (bias.map { Double($0[c]) } ?? 0))
        }
    }

    /// Plain Double backward.
    ///
    /// `dx` is overwritten; the parameter gradients are overwritten
    /// (`weightGradient` and `biasGradient` resized to `channels`).
    public static func referenceBackward<T: BinaryFloatingPoint>(
        _ x: UnsafeBufferPointer<T>, outputGradient dy: UnsafeBufferPointer<T>, alpha: Double,
        weight: UnsafeBufferPointer<T>, channels: Int, inner: Int,
        inputGradient dx: UnsafeMutableBufferPointer<T>, alphaGradient: inout Double,
        weightGradient: inout [Double], biasGradient: inout [Double]
    ) {
        alphaGradient = 0
        weightGradient = [Double](repeating: 0, count: channels)
        biasGradient = [Double](repeating: 0, count: channels)
        for i in 0..<x.count {
            let c = (i / inner) % channels
            let xv = Double(x[i])
            let t = tanh(alpha * xv)
            let u = 1 - t * t
            let g = Double(dy[i])
            let w = Double(weight[c])
            dx[i] = T(g * w * alpha * u)
            alphaGradient += g * w * xv * u
            weightGradient[c] += g * t
            biasGradient[c] += g
        }
    }

    // MARK: - Fast Float

    typealias V = SIMD16<Float>

    /// Rows per chunk of the fixed work split.
    static let rowsPerChunk = 64

    /// Fast Float forward; the same contract as ``reference(_:alpha:weight:bias:channels:inner:into:)``.
    public static func forward(
        _ x: UnsafeBufferPointer<Float>, alpha: Float, weight: UnsafeBufferPointer<Float>,
        bias: UnsafeBufferPointer<Float>?, channels: Int, inner: Int,
        into y: UnsafeMutableBufferPointer<Float>
    ) {
        guard let xp = x.baseAddress, let yp = y.baseAddress, let wp = weight.baseAddress,
            channels > 0, inner > 0
        else { return }
        let bp = bias?.baseAddress
        // A "row" is one run of constant parameters (channels-first) or one vector of C
        // (channels-last).
        let length = inner == 1 ? channels : inner
        let rows = x.count / length
        let chunks = (rows + rowsPerChunk - 1) / rowsPerChunk
        Parallelism.forEachChunk(chunks, work: x.count) { k in
            for r in k * rowsPerChunk..<min(rows, (k + 1) * rowsPerChunk) {
                let base = r * length
                if inner == 1 {
                    rowForwardChannelsLast(
                        xp + base, yp + base, length, alpha: alpha, weight: wp, bias: bp)
                } else {
                    let c = r % channels
                    rowForwardConstant(
                        xp + base, yp + base, length, alpha: alpha, weight: wp[c],
                        bias: bp?[c] ?? 0)
                }
            }
        }
    }

    /// Fast Float backward; the same contract as ``referenceBackward(_:outputGradient:alpha:weight:channels:inner:inputGradient:alphaGradient:weightGradient:biasGradient:)``.
    public static func backward(
        _ x: UnsafeBufferPointer<Float>, outputGradient dy: UnsafeBufferPointer<Float>,
        alpha: Float, weight: UnsafeBufferPointer<Float>, channels: Int, inner: Int,
        inputGradient dx: UnsafeMutableBufferPointer<Float>, alphaGradient: inout Double,
        weightGradient: inout [Double], biasGradient: inout [Double]
    ) {
        alphaGradient = 0
        weightGradient = [Double](repeating: 0, count: channels)
        biasGradient = [Double](repeating: 0, count: channels)
        guard let xp = x.baseAddress, let dyp = dy.baseAddress, let dxp = dx.baseAddress,
            let wp = weight.baseAddress, channels > 0, inner > 0
        else { return }
        let length = inner == 1 ? channels : inner
        let rows = x.count / length
        let chunks = (rows + rowsPerChunk - 1) / rowsPerChunk
        // Per-chunk partials: dα, then dw and db per channel.
        var partials = [Double](repeating: 0, count: chunks * (1 + 2 * channels))
        let stride = 1 + 2 * channels
        partials.withUnsafeMutableBufferPointer { pb in
            let pp = pb.baseAddress!
            Parallelism.forEachChunk(chunks, work: x.count) { k in
                let out = pp + k * stride
                if inner == 1 {
                    var dw = [Float](repeating: 0, count: channels)
                    var db = [Float](repeating: 0, count: channels)
                    dw.withUnsafeMutableBufferPointer { dwb in
                        db.withUnsafeMutableBufferPointer { dbb in
                            for r in k * rowsPerChunk..<min(rows, (k + 1) * rowsPerChunk) {
                                let base = r * length
                                out[0] += rowBackwardChannelsLast(
                                    xp + base, dyp + base, dxp + base, length, alpha: alpha,
                                    weight: wp, dWeight: dwb.baseAddress!, dBias: dbb.baseAddress!)
                            }
                        }
                    }
                    for c in 0..<channels {
                        out[1 + c] = Double(dw[c])
                        out[1 + channels + c] = Double(db[c])
                    }
                } else {
                    for r in k * rowsPerChunk..<min(rows, (k + 1) * rowsPerChunk) {
                        let base = r * length
                        let c = r % channels
                        let (da, dw, db) = rowBackwardConstant(
                            xp + base, dyp + base, dxp + base, length, alpha: alpha,
                            weight: wp[c])
                        out[0] += da
                        out[1 + c] += dw
                        out[1 + channels + c] += db
                    }
                }
            }
        }
        for k in 0..<chunks {
            alphaGradient += partials[k * stride]
            for c in 0..<channels {
                weightGradient[c] += partials[k * stride + 1 + c]
                biasGradient[c] += partials[k * stride + 1 + channels + c]
            }
        }
    }

    // MARK: - Row loops

    @inline(__always)
    static func load(_ p: UnsafePointer<Float>) -> V {
        UnsafeRawPointer(p).loadUnaligned(as: V.self)
    }

    @inline(__always)
    static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self)
    }

    static func rowForwardChannelsLast(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int, alpha: Float,
        weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?
    ) {
        let av = V(repeating: alpha)
        var j = 0
        while j + 16 <= n {
            var v = tanh16(load(x + j) * av) * load(weight + j)
            if let bias { v += load(bias + j) }
            store(v, y + j)
            j += 16
        }
        while j < n {
            y[j] = weight[j] * tanhScalar(alpha * x[j]) + (bias?[j] ?? 0)
            j += 1
        }
    }

    static func rowForwardConstant(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int, alpha: Float,
        weight: Float, bias: Float
    ) {
        let av = V(repeating: alpha)
        let wv = V(repeating: weight)
        let bv = V(repeating: bias)
        var j = 0
        while j + 16 <= n {
            store(tanh16(load(x + j) * av) * wv + bv, y + j)
            j += 16
        }
        while j < n {
            y[j] = weight * tanhScalar(alpha * x[j]) + bias
            j += 1
        }
    }

    /// dx for one row; adds dy·t and dy into dWeight, dBias; returns this row's dα.
    static func rowBackwardChannelsLast(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>,
        _ n: Int, alpha: Float, weight: UnsafePointer<Float>,
        dWeight: UnsafeMutablePointer<Float>, dBias: UnsafeMutablePointer<Float>
    ) -> Double {
        let av = V(repeating: alpha)
        let one = V(repeating: 1)
        var da = V()
        var j = 0
        while j + 16 <= n {
            let xv = load(x + j)
            let t = tanh16(xv * av)
            let u = one - t * t
            let g = load(dy + j)
            let gw = g * load(weight + j) * u
            store(gw * av, dx + j)
            da += gw * xv
            store(load(dWeight + j) + g * t, dWeight + j)
            store(load(dBias + j) + g, dBias + j)
            j += 16
        }
        var tail: Float = 0
        while j < n {
            let t = tanhScalar(alpha * x[j])
            let gw = dy[j] * weight[j] * (1 - t * t)
            dx[j] = gw * alpha
            tail += gw * x[j]
            dWeight[j] += dy[j] * t
            dBias[j] += dy[j]
            j += 1
        }
        return Double(da.sum()) + Double(tail)
    }

    /// dx for one row of constant w; returns (dα, dw, db) of the row.
    static func rowBackwardConstant(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>,
        _ n: Int, alpha: Float, weight: Float
    ) -> (Double, Double, Double) {
        let av = V(repeating: alpha)
        let wv = V(repeating: weight)
        let one = V(repeating: 1)
        var da = V()
        var dw = V()
        var db = V()
        var j = 0
        while j + 16 <= n {
            let xv = load(x + j)
            let t = tanh16(xv * av)
            let g = load(dy + j)
            let gw = g * wv * (one - t * t)
            store(gw * av, dx + j)
            da += gw * xv
            dw += g * t
            db += g
            j += 16
        }
        var (ta, tw, tb): (Float, Float, Float) = (0, 0, 0)
        while j < n {
            let t = tanhScalar(alpha * x[j])
            let gw = dy[j] * weight * (1 - t * t)
            dx[j] = gw * alpha
            ta += gw * x[j]
            tw += dy[j] * t
            tb += dy[j]
            j += 1
        }
        return (
            Double(da.sum()) + Double(ta), Double(dw.sum()) + Double(tw),
            Double(db.sum()) + Double(tb)
        )
    }

    // MARK: - tanh

    /// tanh of one Float through the kernels' approximation (row tails, and accuracy checks).
    @inline(__always)
    public static func tanhScalar(_ z: Float) -> Float {
        tanh16(V(repeating: z))[0]
    }

    /// tanh on 16 lanes: z clamped to [−9, 9] (tanh(9) rounds to 1 in Float), then the odd
    /// rational approximation z·P(z²)/Q(z²) of degrees 9/8, clamped to [−1, 1].
    ///
    /// The coefficients are a weighted least-squares fit of the relative error on [0, 9.5]
    /// (iterated linearisation, made for this kernel); evaluated in Float the result is within
    /// 6 ulps of tanh everywhere (checked on 4·10⁶ points in [−12, 12] and down to 1e-30).
    @inline(__always)
    static func tanh16(_ z: V) -> V {
        let limit = V(repeating: 9)
        let x = z.replacing(with: limit, where: z .> limit).replacing(
            with: -limit, where: z .< -limit)
        let s = x * x
        var p = V(repeating: 1.290_328_9e-8)
        p = p * s + V(repeating: 2.029_307_5e-5)
        p = p * s + V(repeating: 3.476_835_3e-3)
        p = p * s + V(repeating: 0.133_653_97)
        p = p * s + V(repeating: 1)
        var q = V(repeating: 7.594_647_4e-7)
        q = q * s + V(repeating: 3.254_643_8e-4)
        q = q * s + V(repeating: 2.580_612_9e-2)
        q = q * s + V(repeating: 0.466_987_16)
        q = q * s + V(repeating: 1)
        let one = V(repeating: 1)
        let t = x * p / q
        let clamped = t.replacing(with: one, where: t .> one).replacing(
            with: -one, where: t .< -one)
        return clamped.replacing(with: z, where: z .!= z)  // NaN stays NaN
    }
}
