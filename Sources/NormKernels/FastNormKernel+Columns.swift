import CNormSIMD

extension FastNormKernel {
    /// A column geometry `[outer, mid, inner]`.
    struct ColumnPlan {
        let outer: Int
        let mid: Int
        let inner: Int
        let groupWidth: Int
        let reduceOuter: Bool
        let gamma: ColumnGamma
        let groups: Int
        let setCount: Int
        let setSize: Int
        /// Mid rows per chunk, fixed by the sizes only: all of them when each outer index is its
        /// own unit of work (its sets end there); otherwise about 256K elements per chunk.
        let midChunk: Int
        let chunksPerOuter: Int
        /// The group of every inner column (a table: integer division per element is slow).
        let columnGroup: [Int]
        /// Whether outputs are written with non-temporal stores (``Span/streams(_:)``).
        let stream: Bool

        init(
            outer: Int, mid: Int, inner: Int, groupWidth: Int, reduceOuter: Bool, gamma: ColumnGamma
        ) {
            self.outer = outer
            self.mid = mid
            self.inner = inner
            self.groupWidth = groupWidth
            self.reduceOuter = reduceOuter
            self.gamma = gamma
            groups = inner / groupWidth
            setCount = (reduceOuter ? 1 : outer) * groups
            setSize = mid * groupWidth * (reduceOuter ? outer : 1)
            midChunk = reduceOuter ? max(1, (1 << 18) / max(inner, 1)) : max(mid, 1)
            chunksPerOuter = (mid + midChunk - 1) / midChunk
            columnGroup = (0..<inner).map { $0 / groupWidth }
            stream = Span.streams(outer * mid * inner)
        }

        /// The mid rows of chunk c.
        func midRows(chunk c: Int) -> Range<Int> { (c * midChunk)..<min(mid, (c + 1) * midChunk) }
        @inline(__always) func set(outer o: Int, column i: Int) -> Int {
            (reduceOuter ? 0 : o * groups) + columnGroup[i]
        }
    }

    /// Column sums Σ(x − s[i]) and Σ(x − s[i])² over mid rows `rows` of outer index `o`, added to
    /// `s1`, `s2` (Double, one per column).
    static func columnSums(
        _ x: UnsafePointer<Float>, _ plan: ColumnPlan, outer o: Int, rows: Range<Int>,
        shift: UnsafePointer<Float>,
        s1: UnsafeMutablePointer<Double>, s2: UnsafeMutablePointer<Double>,
        scratch: UnsafeMutablePointer<Float>
    ) {
        let inner = plan.inner
        let a = scratch
        let q = scratch + inner
        for i in 0..<(2 * inner) { scratch[i] = 0 }
        #if arch(x86_64)
            if Span.wide {
                // Blocks of 128 rows summed in Float, then flushed to Double, as below.
                var m = rows.lowerBound
                while m < rows.upperBound {
                    let count = min(128, rows.upperBound - m)
                    nk_column_sums(x + (o * plan.mid + m) * inner, count, inner, shift, a, q)
                    Span.flush(a, into: s1, inner)
                    Span.flush(q, into: s2, inner)
                    m += count
                }
                return
            }
        #endif
        var pending = 0
        var m = rows.lowerBound
        while m < rows.upperBound {
            // Four rows per sweep: the accumulators are loaded and stored once per four rows.
            let rowCount = min(4, rows.upperBound - m)
            let row = x + (o * plan.mid + m) * inner
            var i = 0
            if rowCount == 4 {
                while i + 16 <= inner {
                    let sv = Span.load(shift + i)
                    let d0 = Span.load(row + i) - sv
                    let d1 = Span.load(row + inner + i) - sv
                    let d2 = Span.load(row + 2 * inner + i) - sv
                    let d3 = Span.load(row + 3 * inner + i) - sv
                    Span.store(Span.load(a + i) + ((d0 + d1) + (d2 + d3)), a + i)
                    Span.store(
                        Span.load(q + i) + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)), q + i)
                    i += 16
                }
            }
            for k in 0..<rowCount {
                let r = row + k * inner
                var j = i
                while j + 16 <= inner {
                    let d = Span.load(r + j) - Span.load(shift + j)
                    Span.store(Span.load(a + j) + d, a + j)
                    Span.store(Span.load(q + j) + d * d, q + j)
                    j += 16
                }
                while j < inner {
                    let d = r[j] - shift[j]
                    a[j] += d
                    q[j] += d * d
                    j += 1
                }
            }
            m += rowCount
            pending += rowCount
            if pending >= 128 {
                Span.flush(a, into: s1, inner)
                Span.flush(q, into: s2, inner)
                pending = 0
            }
        }
        Span.flush(a, into: s1, inner)
        Span.flush(q, into: s2, inner)
    }

    /// Statistics of every set of a column geometry, without writing an output.
    static func columnsMoments(
        _ x: UnsafePointer<Float>, _ plan: ColumnPlan, operation op: ReferenceNormKernel.Operation
    ) -> Statistics {
        var statistics = Statistics(mean: [], variance: [], biasedVariance: [], rstd: [])
        let sets = plan.setCount
        var shifts = [Float](repeating: 0, count: sets)
        if op.centers {
            var columnTotals = [Double](repeating: 0, count: plan.inner)
            shifts.withUnsafeMutableBufferPointer { sh in
                columnTotals.withUnsafeMutableBufferPointer { ct in
                    for o in 0..<(plan.reduceOuter ? 1 : plan.outer) {
                        columnShifts(
                            x, plan, outer: o, into: sh.baseAddress! + o * plan.groups,
                            scratch: ct.baseAddress!)
                    }
                }
            }
        }
        var (s1, s2) = columnSetSums(x, plan, shifts: shifts)
        if op.centers {
            var redo = false
            for s in 0..<sets
            where shiftIsFar(
                n: plan.setSize, inverseCount: 1 / Double(plan.setSize), s1: s1[s], s2: s2[s])
            {
                shifts[s] = Float(Double(shifts[s]) + s1[s] / Double(plan.setSize))
                redo = true
            }
            if redo { (s1, s2) = columnSetSums(x, plan, shifts: shifts) }
        }
        statistics = Statistics(setCount: sets)
        for s in 0..<sets {
            let r = finish(
                n: plan.setSize, inverseCount: 1 / Double(plan.setSize), shift: shifts[s],
                s1: s1[s], s2: s2[s], operation: op)
            statistics.mean[s] = r.mean
            statistics.variance[s] = r.variance
            statistics.biasedVariance[s] = r.biased
            statistics.rstd[s] = r.rstd
        }
        return statistics
    }

    /// The shift of every set of outer index `o` (sets `0..<groups` of that index).
    ///
    /// The mean of the set's elements in up to 16 mid rows spread evenly over the set. A shift
    /// near the mean
    /// spares the second summation pass that a first element two standard deviations out would
    /// cost (with 64 channels of normal data some channel almost always has one, and a column
    /// set cannot be summed again without streaming the whole tensor again).
    static func columnShifts(
        _ x: UnsafePointer<Float>, _ plan: ColumnPlan, outer o: Int,
        into shift: UnsafeMutablePointer<Float>, scratch: UnsafeMutablePointer<Double>
    ) {
        let inner = plan.inner
        let samples = min(plan.mid, 16)
        for i in 0..<inner { scratch[i] = 0 }
        for k in 0..<samples {
            let row = x + (o * plan.mid + k * plan.mid / samples) * inner
            for i in 0..<inner { scratch[i] += Double(row[i]) }
        }
        let count = Double(samples * plan.groupWidth)
        for g in 0..<plan.groups {
            var total = 0.0
            for j in 0..<plan.groupWidth { total += scratch[g * plan.groupWidth + j] }
            shift[g] = Float(total / count)
        }
    }

    /// Training forward on a column geometry whose sets end with their outer index (GroupNorm,
    /// InstanceNorm and LayerNorm2d channels-last): one chunk per outer index computes that
    /// sample's statistics and writes its output while the sample's slice is still in cache, with
    /// per-column Float tables on the chunk's stack (no allocation besides the statistics).
    static func columnsForwardPerOuter(
        _ x: UnsafePointer<Float>, _ plan: ColumnPlan, operation op: ReferenceNormKernel.Operation,
        gamma: UnsafePointer<Float>?, beta: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>,
        statistics: inout Statistics
    ) {
        let sets = plan.setCount
        let inner = plan.inner
        let groups = plan.groups
        statistics = Statistics(setCount: sets)
        let inverse = 1 / Double(plan.setSize)
        statistics.mean.withUnsafeMutableBufferPointer { meanOut in
            statistics.variance.withUnsafeMutableBufferPointer { varOut in
                statistics.biasedVariance.withUnsafeMutableBufferPointer { biasedOut in
                    statistics.rstd.withUnsafeMutableBufferPointer { rstdOut in
                        Parallelism.forEachChunk(plan.outer, work: plan.outer * plan.mid * inner) {
                            o in
                            // Doubles: column sums s1, s2, then per-set sums; Floats: per-set
                            // shift, per-column shift, a, b, and columnSums' accumulators.
                            withUnsafeTemporaryAllocation(
                                of: Double.self, capacity: 2 * inner + 2 * groups
                            ) { doubles in
                                withUnsafeTemporaryAllocation(
                                    of: Float.self, capacity: groups + 5 * inner
                                ) { floats in
                                    let d = doubles.baseAddress!
                                    let f = floats.baseAddress!
                                    let setShift = f
                                    let columnShift = f + groups
                                    let aTable = columnShift + inner
                                    let bTable = aTable + inner
                                    let scratch = bTable + inner
                                    let c1 = d
                                    let c2 = d + inner
                                    let t1 = c2 + inner
                                    let t2 = t1 + groups
                                    if op.centers {
                                        columnShifts(x, plan, outer: o, into: setShift, scratch: c1)
                                    } else {
                                        for g in 0..<groups { setShift[g] = 0 }
                                    }
                                    var again = true
                                    var passes = 0
                                    while again {
                                        passes += 1
                                        for i in 0..<inner {
                                            columnShift[i] = setShift[plan.columnGroup[i]]
                                            c1[i] = 0
                                            c2[i] = 0
                                        }
                                        columnSums(
                                            x, plan, outer: o, rows: 0..<plan.mid,
                                            shift: columnShift, s1: c1, s2: c2, scratch: scratch)
                                        for g in 0..<groups {
                                            t1[g] = 0
                                            t2[g] = 0
                                        }
                                        for i in 0..<inner {
                                            t1[plan.columnGroup[i]] += c1[i]
                                            t2[plan.columnGroup[i]] += c2[i]
                                        }
                                        again = false
                                        if op.centers && passes == 1 {
                                            for g in 0..<groups
                                            where shiftIsFar(
                                                n: plan.setSize, inverseCount: inverse, s1: t1[g],
                                                s2: t2[g])
                                            {
                                                setShift[g] = Float(
                                                    Double(setShift[g]) + t1[g] * inverse)
                                                again = true
                                            }
                                        }
                                    }
                                    for g in 0..<groups {
                                        let s = o * groups + g
                                        let r = finish(
                                            n: plan.setSize, inverseCount: inverse,
                                            shift: setShift[g], s1: t1[g], s2: t2[g], operation: op)
                                        meanOut[s] = r.mean
                                        varOut[s] = r.variance
                                        biasedOut[s] = r.biased
                                        rstdOut[s] = r.rstd
                                    }
                                    for i in 0..<inner {
                                        let s = o * groups + plan.columnGroup[i]
                                        let mean = meanOut[s]
                                        let rstd = rstdOut[s]
                                        let shift = Float(mean)
                                        let t = (Double(shift) - mean) * rstd
                                        var a = rstd
                                        var b = t
                                        if plan.gamma == .alongInner {
                                            let g = gamma.map { Double($0[i]) } ?? 1
                                            a = g * rstd
                                            b = (beta.map { Double($0[i]) } ?? 0) + g * t
                                        }
                                        columnShift[i] = shift
                                        aTable[i] = Float(a)
                                        bTable[i] = Float(b)
                                    }
                                    let alongMid = plan.gamma == .alongMid
                                    for m in 0..<plan.mid {
                                        let offset = (o * plan.mid + m) * inner
                                        columnRow(
                                            x + offset, y + offset, inner, shift: columnShift,
                                            a: aTable, b: bTable,
                                            gamma: alongMid ? (gamma?[m] ?? 1) : 1,
                                            beta: alongMid ? (beta?[m] ?? 0) : 0,
                                            stream: plan.stream)
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Training forward on a column geometry.
    static func columnsForward(
        _ x: UnsafePointer<Float>, _ plan: ColumnPlan, operation op: ReferenceNormKernel.Operation,
        gamma: UnsafePointer<Float>?, beta: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>,
        statistics: inout Statistics
    ) {
        if !plan.reduceOuter {
            columnsForwardPerOuter(
                x, plan, operation: op, gamma: gamma, beta: beta, y: y, statistics: &statistics)
            return
        }
        statistics = columnsMoments(x, plan, operation: op)
        columnsForward(
            x, plan, mean: statistics.mean, rstd: statistics.rstd, gamma: gamma, beta: beta, y: y)
    }

    /// Per-set (Σ(x − s), Σ(x − s)²), chunked over (outer, mid rows) and merged in order.
    static func columnSetSums(_ x: UnsafePointer<Float>, _ plan: ColumnPlan, shifts: [Float]) -> (
        [Double], [Double]
    ) {
        let inner = plan.inner
        let chunksPerOuter = plan.chunksPerOuter
        let units = plan.outer * chunksPerOuter
        var partial1 = [Double](repeating: 0, count: units * inner)
        var partial2 = [Double](repeating: 0, count: units * inner)
        // Per (outer, column) shifts, once per call. The Float accumulators live on each chunk's
        // own stack: in one shared array, neighbouring chunks (run by different threads) shared
        // a cache line at every boundary and stored to it on every row sweep.
        var shiftTable = [Float](repeating: 0, count: plan.outer * inner)
        for o in 0..<plan.outer {
            for i in 0..<inner { shiftTable[o * inner + i] = shifts[plan.set(outer: o, column: i)] }
        }
        partial1.withUnsafeMutableBufferPointer { p1 in
            partial2.withUnsafeMutableBufferPointer { p2 in
                shiftTable.withUnsafeBufferPointer { sh in
                    Parallelism.forEachChunk(units, work: plan.outer * plan.mid * inner) { u in
                        let o = u / chunksPerOuter
                        withUnsafeTemporaryAllocation(of: Float.self, capacity: 2 * inner) { sc in
                            columnSums(
                                x, plan, outer: o, rows: plan.midRows(chunk: u % chunksPerOuter),
                                shift: sh.baseAddress! + o * inner, s1: p1.baseAddress! + u * inner,
                                s2: p2.baseAddress! + u * inner, scratch: sc.baseAddress!)
                        }
                    }
                }
            }
        }
        var s1 = [Double](repeating: 0, count: plan.setCount)
        var s2 = [Double](repeating: 0, count: plan.setCount)
        for u in 0..<units {
            let o = u / chunksPerOuter
            for i in 0..<inner {
                let s = plan.set(outer: o, column: i)
                s1[s] += partial1[u * inner + i]
                s2[s] += partial2[u * inner + i]
            }
        }
        return (s1, s2)
    }

    /// Forward with given statistics on a column geometry: y = a·(x − s) + b per column, or
    /// γ[m]·(r·(x − s) + t) + β[m] when γ runs along the reduced axis.
    static func columnsForward(
        _ x: UnsafePointer<Float>, _ plan: ColumnPlan, mean: [Double], rstd: [Double],
        gamma: UnsafePointer<Float>?, beta: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>
    ) {
        let inner = plan.inner
        let chunksPerOuter = plan.chunksPerOuter
        // Per (outer, column) shift s, scale a and offset b, computed once per call.
        var shiftTable = [Float](repeating: 0, count: plan.outer * inner)
        var aTable = [Float](repeating: 0, count: plan.outer * inner)
        var bTable = [Float](repeating: 0, count: plan.outer * inner)
        for o in 0..<plan.outer {
            for i in 0..<inner {
                let s = plan.set(outer: o, column: i)
                let shift = Float(mean[s])
                let t = (Double(shift) - mean[s]) * rstd[s]
                var a = rstd[s]
                var b = t
                if plan.gamma == .alongInner {
                    let g = gamma.map { Double($0[i]) } ?? 1
                    a = g * rstd[s]
                    b = (beta.map { Double($0[i]) } ?? 0) + g * t
                }
                shiftTable[o * inner + i] = shift
                aTable[o * inner + i] = Float(a)
                bTable[o * inner + i] = Float(b)
            }
        }
        shiftTable.withUnsafeBufferPointer { sh in
            aTable.withUnsafeBufferPointer { av in
                bTable.withUnsafeBufferPointer { bv in
                    // Last chunk first: the statistics pass just read x front to back, so its
                    // end is what the last-level cache still holds.
                    let units = plan.outer * chunksPerOuter
                    Parallelism.forEachChunk(units, work: plan.outer * plan.mid * inner) { k in
                        let u = units - 1 - k
                        let o = u / chunksPerOuter
                        for m in plan.midRows(chunk: u % chunksPerOuter) {
                            let offset = (o * plan.mid + m) * inner
                            let gm: Float = plan.gamma == .alongMid ? (gamma?[m] ?? 1) : 1
                            let bm: Float = plan.gamma == .alongMid ? (beta?[m] ?? 0) : 0
                            columnRow(
                                x + offset, y + offset, inner, shift: sh.baseAddress! + o * inner,
                                a: av.baseAddress! + o * inner, b: bv.baseAddress! + o * inner,
                                gamma: gm, beta: bm, stream: plan.stream)
                        }
                    }
                }
            }
        }
    }

    /// y = (a·(x − s) + b)·γ + β with a, b, s per column and γ, β scalars.
    @inline(__always)
    static func columnRow(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int,
        shift: UnsafePointer<Float>,
        a: UnsafePointer<Float>, b: UnsafePointer<Float>, gamma: Float, beta: Float,
        stream: Bool = false
    ) {
        #if arch(x86_64)
            if Span.wide { return nk_column_row(x, y, n, shift, a, b, gamma, beta, stream ? 1 : 0) }
        #endif
        let gv = Span.V(repeating: gamma)
        let bv = Span.V(repeating: beta)
        var i = 0
        while i + 16 <= n {
            let v = (Span.load(x + i) - Span.load(shift + i)) * Span.load(a + i) + Span.load(b + i)
            Span.store(v * gv + bv, y + i)
            i += 16
        }
        while i < n {
            y[i] = ((x[i] - shift[i]) * a[i] + b[i]) * gamma + beta
            i += 1
        }
    }

    /// Backward on a column geometry.
    ///
    /// Overwrites dx, dgamma and dbeta.
    static func columnsBackward(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: ColumnPlan, mean: [Double],
        rstd: [Double], operation op: ReferenceNormKernel.Operation, statisticsAreConstant: Bool,
        gamma: UnsafePointer<Float>?, dx: UnsafeMutablePointer<Float>, dgamma: inout [Double],
        dbeta: inout [Double]
    ) {
        let sums = columnsGradientSums(
            x, dy, plan, mean: mean, rstd: rstd, gamma: gamma, parameterCount: dgamma.count)
        dgamma = sums.scaleGradient
        dbeta = sums.offsetGradient
        var a = [Double](repeating: 0, count: plan.setCount)
        var b = a
        var c = a
        for s in 0..<plan.setCount {
            (a[s], b[s], c[s]) = gradientCoefficients(
                n: plan.setSize, rstd: rstd[s], term: 0, sumG: sums.sumG[s], sumGD: sums.sumGD[s],
                operation: op, constant: statisticsAreConstant)
        }
        columnsApplyGradient(x, dy, plan, mean: mean, a: a, b: b, c: c, gamma: gamma, dx: dx)
    }

    /// Per-set gradient sums over a column geometry, relative to the exact means.
    static func columnsGradientSums(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: ColumnPlan, mean: [Double],
        rstd: [Double], gamma: UnsafePointer<Float>?, parameterCount: Int
    ) -> GradientSums {
        let inner = plan.inner
        let chunksPerOuter = plan.chunksPerOuter
        let units = plan.outer * chunksPerOuter
        let alongMid = plan.gamma == .alongMid
        let work = plan.outer * plan.mid * inner
        // Per (outer, column): shift s, rstd r and t = (s − μ)·r, as Float tables.
        var shift = [Float](repeating: 0, count: plan.outer * inner)
        var rTable = [Float](repeating: 0, count: plan.outer * inner)
        var tTable = [Float](repeating: 0, count: plan.outer * inner)
        for o in 0..<plan.outer {
            for i in 0..<inner {
                let s = plan.set(outer: o, column: i)
                let sh = Float(mean[s])
                shift[o * inner + i] = sh
                rTable[o * inner + i] = Float(rstd[s])
                tTable[o * inner + i] = Float((Double(sh) - mean[s]) * rstd[s])
            }
        }
        // Pass 1 per unit: column sums of g and g·(x − s) (g = dy·γ[m] along mid, dy
        // otherwise), and for γ along mid the per-row sums Σ dy·x̂ and Σ dy.
        var colG = [Double](repeating: 0, count: units * inner)
        var colGD = [Double](repeating: 0, count: units * inner)
        var rowDG = [Double](repeating: 0, count: alongMid ? plan.outer * plan.mid : 0)
        var rowDB = [Double](repeating: 0, count: alongMid ? plan.outer * plan.mid : 0)
        // Float accumulators on each chunk's stack (a shared array put neighbouring chunks, run
        // by different threads, on one cache line).
        shift.withUnsafeBufferPointer { sh in
            rTable.withUnsafeBufferPointer { rt in
                tTable.withUnsafeBufferPointer { tt in
                    colG.withUnsafeMutableBufferPointer { cg in
                        colGD.withUnsafeMutableBufferPointer { cgd in
                            rowDG.withUnsafeMutableBufferPointer { rdg in
                                rowDB.withUnsafeMutableBufferPointer { rdb in
                                    Parallelism.forEachChunk(units, work: work) { u in
                                        withUnsafeTemporaryAllocation(
                                            of: Float.self, capacity: 2 * inner
                                        ) { acc in
                                            acc.initialize(repeating: 0)
                                            let o = u / chunksPerOuter
                                            let a = acc.baseAddress!
                                            let q = a + inner
                                            let g1 = cg.baseAddress! + u * inner
                                            let g2 = cgd.baseAddress! + u * inner
                                            var pending = 0
                                            for m in plan.midRows(chunk: u % chunksPerOuter) {
                                                let offset = (o * plan.mid + m) * inner
                                                let gm: Float = alongMid ? (gamma?[m] ?? 1) : 1
                                                let (rowXhat, rowDy) = Span.columnAccumulate(
                                                    x + offset, dy + offset, inner,
                                                    shift: sh.baseAddress! + o * inner,
                                                    rstd: rt.baseAddress! + o * inner,
                                                    term: tt.baseAddress! + o * inner, gamma: gm,
                                                    sums: a, products: q, rowSums: alongMid)
                                                if alongMid {
                                                    rdg[o * plan.mid + m] = Double(rowXhat)
                                                    rdb[o * plan.mid + m] = Double(rowDy)
                                                }
                                                pending += 1
                                                if pending == 128 {
                                                    Span.flush(a, into: g1, inner)
                                                    Span.flush(q, into: g2, inner)
                                                    pending = 0
                                                }
                                            }
                                            Span.flush(a, into: g1, inner)
                                            Span.flush(q, into: g2, inner)
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Merge in unit order: per-set sums of g, g·(x − s), and the parameter gradients.
        let sets = plan.setCount
        var sumG = [Double](repeating: 0, count: sets)
        var sumGD = [Double](repeating: 0, count: sets)
        var dgamma = [Double](repeating: 0, count: parameterCount)
        var dbeta = [Double](repeating: 0, count: parameterCount)
        for u in 0..<units {
            let o = u / chunksPerOuter
            for i in 0..<inner {
                let s = plan.set(outer: o, column: i)
                let sdy = colG[u * inner + i]
                let sdyd = colGD[u * inner + i]
                if plan.gamma == .alongInner, let gamma {
                    let g = Double(gamma[i])
                    sumG[s] += g * sdy
                    sumGD[s] += g * sdyd
                    dgamma[i] += rstd[s] * sdyd + Double(tTable[o * inner + i]) * sdy
                    dbeta[i] += sdy
                } else {
                    sumG[s] += sdy
                    sumGD[s] += sdyd
                }
            }
        }
        if alongMid {
            for o in 0..<plan.outer {
                for m in 0..<plan.mid {
                    dgamma[m] += rowDG[o * plan.mid + m]
                    dbeta[m] += rowDB[o * plan.mid + m]
                }
            }
        }
        // Σg·(x − μ) = Σg·(x − s) + (s − μ)·Σg, with s = Float(μ) for every column of a set.
        for s in 0..<sets { sumGD[s] += (Double(Float(mean[s])) - mean[s]) * sumG[s] }
        return GradientSums(sumG: sumG, sumGD: sumGD, scaleGradient: dgamma, offsetGradient: dbeta)
    }

    /// dx = A·g + B·(x − μ) + C per set over a column geometry (g = dy·γ).
    static func columnsApplyGradient(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: ColumnPlan, mean: [Double],
        a: [Double], b: [Double], c: [Double], gamma: UnsafePointer<Float>?,
        dx: UnsafeMutablePointer<Float>
    ) {
        let inner = plan.inner
        let chunksPerOuter = plan.chunksPerOuter
        let units = plan.outer * chunksPerOuter
        let alongMid = plan.gamma == .alongMid
        let work = plan.outer * plan.mid * inner
        var shift = [Float](repeating: 0, count: plan.outer * inner)
        // dx = A·g + B·(x − s) + C per column, from per-(outer, column) tables.
        var aTable = [Float](repeating: 0, count: plan.outer * inner)
        var bTable = [Float](repeating: 0, count: plan.outer * inner)
        var cTable = [Float](repeating: 0, count: plan.outer * inner)
        for o in 0..<plan.outer {
            for i in 0..<inner {
                let s = plan.set(outer: o, column: i)
                let sh = Float(mean[s])
                shift[o * inner + i] = sh
                let g = plan.gamma == .alongInner ? (gamma.map { Double($0[i]) } ?? 1) : 1
                aTable[o * inner + i] = Float(a[s] * g)
                bTable[o * inner + i] = Float(b[s])
                // B·(x − μ) = B·(x − s) + B·(s − μ).
                cTable[o * inner + i] = Float(c[s] + b[s] * (Double(sh) - mean[s]))
            }
        }
        shift.withUnsafeBufferPointer { sh in
            aTable.withUnsafeBufferPointer { at in
                bTable.withUnsafeBufferPointer { bt in
                    cTable.withUnsafeBufferPointer { ct in
                        // Last chunk first, where the sums pass ended (still in cache).
                        Parallelism.forEachChunk(units, work: work) { k in
                            let u = units - 1 - k
                            let o = u / chunksPerOuter
                            for m in plan.midRows(chunk: u % chunksPerOuter) {
                                let offset = (o * plan.mid + m) * inner
                                let gm: Float = alongMid ? (gamma?[m] ?? 1) : 1
                                columnGradientRow(
                                    x + offset, dy + offset, dx + offset, inner,
                                    shift: sh.baseAddress! + o * inner,
                                    a: at.baseAddress! + o * inner,
                                    b: bt.baseAddress! + o * inner, c: ct.baseAddress! + o * inner,
                                    gamma: gm, stream: plan.stream)
                            }
                        }
                    }
                }
            }
        }
    }

    /// dx = a·(dy·γ) + b·(x − s) + c with a, b, c, s per column.
    @inline(__always)
    static func columnGradientRow(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>,
        _ n: Int,
        shift: UnsafePointer<Float>, a: UnsafePointer<Float>, b: UnsafePointer<Float>,
        c: UnsafePointer<Float>,
        gamma: Float, stream: Bool = false
    ) {
        #if arch(x86_64)
            if Span.wide {
                return nk_column_gradient_row(x, dy, dx, n, shift, a, b, c, gamma, stream ? 1 : 0)
            }
        #endif
        let gv = Span.V(repeating: gamma)
        var i = 0
        while i + 16 <= n {
            let g = Span.load(dy + i) * gv
            let v =
                g * Span.load(a + i) + (Span.load(x + i) - Span.load(shift + i)) * Span.load(b + i)
                + Span.load(c + i)
            Span.store(v, dx + i)
            i += 16
        }
        while i < n {
            dx[i] = dy[i] * gamma * a[i] + (x[i] - shift[i]) * b[i] + c[i]
            i += 1
        }
    }
}
