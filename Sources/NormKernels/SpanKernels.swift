import CNormSIMD

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// SIMD loops over one contiguous span of `Float`s: the inner loops of every fast kernel.
///
/// They use `SIMD16<Float>` with two accumulators and separate multiply and add (never
/// `addingProduct`, which the default x86-64 target lowers to per-lane `fmaf` calls). Sums are
/// accumulated in Float over blocks of at most ``block`` elements and flushed to Double, so a
/// long reduction keeps Double accuracy at Float speed. Every function centres its input on a
/// shift `s` close to the set mean: `x − s` is exact for data near `s` (Sterbenz), which keeps
/// 1000 + 0.05·noise as accurate as data near zero.
@usableFromInline
enum Span {
    @usableFromInline typealias V = SIMD16<Float>

    /// Whether the loops below hand their work to the AVX2 + FMA versions in `CNormSIMD`: on an
    /// x86-64 CPU that has both, unless the environment sets `NORMKIT_SIMD=baseline` (which CI
    /// uses to run the fast-kernel tests a second time on the portable loops).
    @usableFromInline static let wide: Bool = {
        #if arch(x86_64)
            return nk_simd_enabled() == 1
        #else
            return false
        #endif
    }()
    /// The output size, in elements, from which outputs are written with non-temporal stores.
    ///
    /// AVX2 loops only: the last-level cache's size in Floats (32 MiB when the system does not
    /// say). An output that large cannot stay in cache for the next layer anyway, and streaming it skips
    /// the read-for-ownership of every output line, a third of a large pass's memory traffic.
    @usableFromInline static let streamingElements: Int = {
        var bytes = 32 << 20
        #if os(Linux)
            let reported = sysconf(Int32(_SC_LEVEL3_CACHE_SIZE))
            if reported > 0 { bytes = reported }
        #endif
        return bytes / MemoryLayout<Float>.size
    }()

    /// Whether an output of `count` elements is written with non-temporal stores.
    @inline(__always) @usableFromInline
    static func streams(_ count: Int) -> Bool { wide && count >= streamingElements }

    /// Elements summed in Float before a flush to Double.
    @usableFromInline static let block = 2048

    @inline(__always) @usableFromInline
    static func load(_ p: UnsafePointer<Float>) -> V {
        UnsafeRawPointer(p).loadUnaligned(as: V.self)
    }

    @inline(__always) @usableFromInline
    static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self)
    }

    /// The sum of the lanes by halving (4 dependent adds, not the 15 of `SIMD.sum()`): short rows
    /// pay for the horizontal sum on every row.
    @inline(__always) @usableFromInline
    static func hsum(_ v: V) -> Float {
        let a = v.lowHalf + v.highHalf
        let b = a.lowHalf + a.highHalf
        let c = b.lowHalf + b.highHalf
        return c[0] + c[1]
    }

    /// (Σ (x − s), Σ (x − s)²) over `n` elements.
    @inline(__always) @usableFromInline
    static func shiftedSums(_ x: UnsafePointer<Float>, _ n: Int, shift s: Float) -> (Double, Double)
    {
        #if arch(x86_64)
            if wide {
                var sums = (0.0, 0.0)
                nk_shifted_sums(x, n, s, &sums.0, &sums.1)
                return sums
            }
        #endif
        let sv = V(repeating: s)
        var total1 = 0.0
        var total2 = 0.0
        var i = 0
        while i < n {
            let end = min(n, i + block)
            var a0 = V()
            var a1 = V()
            var q0 = V()
            var q1 = V()
            while i + 32 <= end {
                let d0 = load(x + i) - sv
                let d1 = load(x + i + 16) - sv
                a0 += d0
                a1 += d1
                q0 += d0 * d0
                q1 += d1 * d1
                i += 32
            }
            if i + 16 <= end {
                let d0 = load(x + i) - sv
                a0 += d0
                q0 += d0 * d0
                i += 16
            }
            var t1: Float = 0
            var t2: Float = 0
            while i < end {
                let d = x[i] - s
                t1 += d
                t2 += d * d
                i += 1
            }
            total1 += Double(hsum(a0 + a1)) + Double(t1)
            total2 += Double(hsum(q0 + q1)) + Double(t2)
        }
        return (total1, total2)
    }

    /// h = x + r written out, and (Σ (h − s), Σ (h − s)²) over `n` elements (the fused residual
    /// add of a pre-norm transformer block).
    @inline(__always) @usableFromInline
    static func addingShiftedSums(
        _ x: UnsafePointer<Float>, _ r: UnsafePointer<Float>, _ h: UnsafeMutablePointer<Float>,
        _ n: Int,
        shift s: Float
    ) -> (Double, Double) {
        let sv = V(repeating: s)
        var total1 = 0.0
        var total2 = 0.0
        var i = 0
        while i < n {
            let end = min(n, i + block)
            var a0 = V()
            var q0 = V()
            while i + 16 <= end {
                let hv = load(x + i) + load(r + i)
                store(hv, h + i)
                let d = hv - sv
                a0 += d
                q0 += d * d
                i += 16
            }
            var t1: Float = 0
            var t2: Float = 0
            while i < end {
                let hv = x[i] + r[i]
                h[i] = hv
                let d = hv - s
                t1 += d
                t2 += d * d
                i += 1
            }
            total1 += Double(hsum(a0)) + Double(t1)
            total2 += Double(hsum(q0)) + Double(t2)
        }
        return (total1, total2)
    }

    /// y = a·(x − s) + b.
    @inline(__always) @usableFromInline
    static func affine(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int, shift s: Float,
        scale a: Float, offset b: Float, stream: Bool = false
    ) {
        #if arch(x86_64)
            if wide { return nk_affine(x, y, n, s, a, b, stream ? 1 : 0) }
        #endif
        let sv = V(repeating: s)
        let av = V(repeating: a)
        let bv = V(repeating: b)
        var i = 0
        while i + 16 <= n {
            store((load(x + i) - sv) * av + bv, y + i)
            i += 16
        }
        while i < n {
            y[i] = (x[i] - s) * a + b
            i += 1
        }
    }

    /// y = (r·(x − s) + t)·γ + β with γ, β per element (nil: 1 and 0).
    @inline(__always) @usableFromInline
    static func elementwise(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int, shift s: Float,
        rstd r: Float, term t: Float, gamma: UnsafePointer<Float>?, beta: UnsafePointer<Float>?,
        stream: Bool = false
    ) {
        #if arch(x86_64)
            if wide { return nk_elementwise(x, y, n, s, r, t, gamma, beta, stream ? 1 : 0) }
        #endif
        let sv = V(repeating: s)
        let rv = V(repeating: r)
        let tv = V(repeating: t)
        var i = 0
        while i + 16 <= n {
            var v = (load(x + i) - sv) * rv + tv
            if let gamma { v *= load(gamma + i) }
            if let beta { v += load(beta + i) }
            store(v, y + i)
            i += 16
        }
        while i < n {
            var v = (x[i] - s) * r + t
            if let gamma { v *= gamma[i] }
            if let beta { v += beta[i] }
            y[i] = v
            i += 1
        }
    }

    /// (Σ dy, Σ dy·(x − s)).
    @inline(__always) @usableFromInline
    static func gradientSums(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ n: Int, shift s: Float
    ) -> (Double, Double) {
        #if arch(x86_64)
            if wide {
                var sums = (0.0, 0.0)
                nk_gradient_sums(x, dy, n, s, &sums.0, &sums.1)
                return sums
            }
        #endif
        let sv = V(repeating: s)
        var total1 = 0.0
        var total2 = 0.0
        var i = 0
        while i < n {
            let end = min(n, i + block)
            var a0 = V()
            var a1 = V()
            var q0 = V()
            var q1 = V()
            while i + 32 <= end {
                let g0 = load(dy + i)
                let g1 = load(dy + i + 16)
                a0 += g0
                a1 += g1
                q0 += g0 * (load(x + i) - sv)
                q1 += g1 * (load(x + i + 16) - sv)
                i += 32
            }
            if i + 16 <= end {
                let g0 = load(dy + i)
                a0 += g0
                q0 += g0 * (load(x + i) - sv)
                i += 16
            }
            var t1: Float = 0
            var t2: Float = 0
            while i < end {
                t1 += dy[i]
                t2 += dy[i] * (x[i] - s)
                i += 1
            }
            total1 += Double(hsum(a0 + a1)) + Double(t1)
            total2 += Double(hsum(q0 + q1)) + Double(t2)
        }
        return (total1, total2)
    }

    /// With g = dy·γ: returns (Σ g, Σ g·(x − s)) and adds dy·x̂ (x̂ = r·(x − s) + t) to
    /// `dgamma` and dy to `dbeta`, elementwise (Float partials; the caller flushes them).
    @inline(__always) @usableFromInline
    static func elementwiseGradientSums(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ n: Int, shift s: Float,
        rstd r: Float, term t: Float, gamma: UnsafePointer<Float>,
        dgamma: UnsafeMutablePointer<Float>, dbeta: UnsafeMutablePointer<Float>
    ) -> (Double, Double) {
        #if arch(x86_64)
            if wide {
                var sums = (0.0, 0.0)
                nk_elementwise_gradient_sums(
                    x, dy, n, s, r, t, gamma, dgamma, dbeta, &sums.0, &sums.1)
                return sums
            }
        #endif
        let sv = V(repeating: s)
        let rv = V(repeating: r)
        let tv = V(repeating: t)
        var total1 = 0.0
        var total2 = 0.0
        var i = 0
        while i < n {
            let end = min(n, i + block)
            var a0 = V()
            var q0 = V()
            while i + 16 <= end {
                let d = load(x + i) - sv
                let dyv = load(dy + i)
                let g = dyv * load(gamma + i)
                a0 += g
                q0 += g * d
                store(load(dgamma + i) + dyv * (d * rv + tv), dgamma + i)
                store(load(dbeta + i) + dyv, dbeta + i)
                i += 16
            }
            var t1: Float = 0
            var t2: Float = 0
            while i < end {
                let d = x[i] - s
                let g = dy[i] * gamma[i]
                t1 += g
                t2 += g * d
                dgamma[i] += dy[i] * (d * r + t)
                dbeta[i] += dy[i]
                i += 1
            }
            total1 += Double(hsum(a0)) + Double(t1)
            total2 += Double(hsum(q0)) + Double(t2)
        }
        return (total1, total2)
    }

    /// dx = A·dy·γ + B·(x − s) + C (γ per element, or nil for 1).
    @inline(__always) @usableFromInline
    static func gradient(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>,
        _ n: Int, shift s: Float, a: Float, b: Float, c: Float, gamma: UnsafePointer<Float>?,
        stream: Bool = false
    ) {
        #if arch(x86_64)
            if wide { return nk_gradient(x, dy, dx, n, s, a, b, c, gamma, stream ? 1 : 0) }
        #endif
        let sv = V(repeating: s)
        let av = V(repeating: a)
        let bv = V(repeating: b)
        let cv = V(repeating: c)
        var i = 0
        while i + 16 <= n {
            var g = load(dy + i)
            if let gamma { g *= load(gamma + i) }
            store(g * av + (load(x + i) - sv) * bv + cv, dx + i)
            i += 16
        }
        while i < n {
            var g = dy[i]
            if let gamma { g *= gamma[i] }
            dx[i] = g * a + (x[i] - s) * b + c
            i += 1
        }
    }

    /// One row of a column reduction: with g = dy·γ (γ a scalar for the row), adds g to
    /// `sums[i]` and g·(x − s[i]) to `products[i]`; with `rowSums`, also returns Σ dy·x̂
    /// (x̂ = r[i]·(x − s[i]) + t[i]) and Σ dy over the row.
    @inline(__always) @usableFromInline
    static func columnAccumulate(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ n: Int,
        shift: UnsafePointer<Float>,
        rstd: UnsafePointer<Float>, term: UnsafePointer<Float>, gamma: Float,
        sums: UnsafeMutablePointer<Float>, products: UnsafeMutablePointer<Float>, rowSums: Bool
    ) -> (Float, Float) {
        #if arch(x86_64)
            if wide {
                var totals: (Float, Float) = (0, 0)
                nk_column_accumulate(
                    x, dy, n, shift, rstd, term, gamma, sums, products, rowSums ? 1 : 0,
                    &totals.0, &totals.1)
                return totals
            }
        #endif
        let gv = V(repeating: gamma)
        var rowX = V()
        var rowD = V()
        var i = 0
        while i + 16 <= n {
            let d = load(x + i) - load(shift + i)
            let dyv = load(dy + i)
            let g = dyv * gv
            store(load(sums + i) + g, sums + i)
            store(load(products + i) + g * d, products + i)
            if rowSums {
                rowX += dyv * (d * load(rstd + i) + load(term + i))
                rowD += dyv
            }
            i += 16
        }
        var tailX: Float = 0
        var tailD: Float = 0
        while i < n {
            let d = x[i] - shift[i]
            let g = dy[i] * gamma
            sums[i] += g
            products[i] += g * d
            if rowSums {
                tailX += dy[i] * (d * rstd[i] + term[i])
                tailD += dy[i]
            }
            i += 1
        }
        return (hsum(rowX) + tailX, hsum(rowD) + tailD)
    }

    /// Adds `n` Float partials to Double totals and zeroes the partials.
    @inline(__always) @usableFromInline
    static func flush(
        _ partial: UnsafeMutablePointer<Float>, into total: UnsafeMutablePointer<Double>, _ n: Int
    ) {
        for i in 0..<n {
            total[i] += Double(partial[i])
            partial[i] = 0
        }
    }
}
