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
/// Float kernels use SIMD16 and ``Parallelism``, with tanh from an odd Taylor polynomial for
/// |z| < 0.55 (error below 3e-9) and (1 − e)/(1 + e), e = exp(−2|z|) by range reduction and a
/// degree-7 polynomial, above (no cancellation there since e < 0.34). Both are within a few
/// Float ulps of tanh; NaN propagates.
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
    typealias U = SIMD16<UInt32>

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

    /// tanh on 16 lanes: odd Taylor series below |z| = 0.55, (1 − e)/(1 + e) with e = exp(−2|z|)
    /// above, |z| clamped at 9 (tanh(9) rounds to 1 in Float).
    @inline(__always)
    static func tanh16(_ z: V) -> V {
        let bits = unsafeBitCast(z, to: U.self)
        let sign = bits & U(repeating: 0x8000_0000)
        let a = unsafeBitCast(bits & U(repeating: 0x7fff_ffff), to: V.self)
        // Small |z|: z + z³·P(z²), the Taylor series of tanh to z¹⁷.
        let s = a * a
        var p = V(repeating: 6_404_582.0 / 10_854_718_875.0)
        p = p * s + V(repeating: -929_569.0 / 638_512_875.0)
        p = p * s + V(repeating: 21_844.0 / 6_081_075.0)
        p = p * s + V(repeating: -1_382.0 / 155_925.0)
        p = p * s + V(repeating: 62.0 / 2_835.0)
        p = p * s + V(repeating: -17.0 / 315.0)
        p = p * s + V(repeating: 2.0 / 15.0)
        p = p * s + V(repeating: -1.0 / 3.0)
        let small = a + a * s * p
        // Large |z|: e = exp(y), y = −2|z| in [−18, −1.1], by y = n·ln2 + r, |r| ≤ ln2/2.
        let y = -2 * a.replacing(with: V(repeating: 9), where: a .> 9)
        let magic = V(repeating: 12_582_912)  // 1.5·2²³: adding it rounds to an integer
        let kf = y * V(repeating: 1.442_695_04) + magic
        let n = kf - magic
        let r = (y - n * V(repeating: 0.693_145_751_953_125)) - n * V(repeating: 1.428_606_765e-6)
        var e = V(repeating: 1.0 / 5040)
        e = e * r + V(repeating: 1.0 / 720)
        e = e * r + V(repeating: 1.0 / 120)
        e = e * r + V(repeating: 1.0 / 24)
        e = e * r + V(repeating: 1.0 / 6)
        e = e * r + V(repeating: 0.5)
        e = e * r + V(repeating: 1)
        e = e * r + V(repeating: 1)
        let exponent =
            (unsafeBitCast(kf, to: U.self) &- U(repeating: 0x4B40_0000)
                &+ U(repeating: 127)) &<< U(repeating: 23)
        e = e * unsafeBitCast(exponent, to: V.self)
        let large = (V(repeating: 1) - e) / (V(repeating: 1) + e)
        let t = large.replacing(with: small, where: a .< 0.55)
        let signed = unsafeBitCast(unsafeBitCast(t, to: U.self) | sign, to: V.self)
        return signed.replacing(with: z, where: z .!= z)  // NaN stays NaN
    }
}
