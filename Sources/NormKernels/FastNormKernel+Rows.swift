import CNormSIMD

extension FastNormKernel {
    /// The sets of a row geometry, processed whole by one chunk each.
    struct RowPlan {
        let rows: Int
        let length: Int
        let setCount: Int
        let gamma: RowGamma
        // Derived sizes, stored: integer division costs more than a short row's arithmetic.
        let rowsPerSet: Int
        let setSize: Int
        /// Elements per γ segment and segments per row.
        let segment: Int
        let segmentsPerRow: Int
        let cycle: Int
        /// Sets per chunk: about 64K elements.
        ///
        /// With 16K, in-cache passes on two threads ran
        /// 5-40% slower (LayerNorm (512, 768), GroupNorm and InstanceNorm forward; benchmarked):
        /// every chunk change costs a shared-counter update and a cold start of the prefetcher.
        let setsPerChunk: Int
        let chunkCount: Int
        /// Whether outputs are written with non-temporal stores (``Span/streams(_:)``).
        let stream: Bool

        init(rows: Int, length: Int, setCount: Int, gamma: RowGamma) {
            self.rows = rows
            self.length = length
            self.setCount = setCount
            self.gamma = gamma
            rowsPerSet = rows / setCount
            setSize = rowsPerSet * length
            switch gamma {
            case .segments(let cycle, let segment):
                self.segment = segment
                self.cycle = cycle
            case .elementwise(let cycle):
                self.segment = length
                self.cycle = cycle
            case .none:
                self.segment = length
                self.cycle = 1
            }
            segmentsPerRow = length / segment
            setsPerChunk = max(1, min(setCount, (1 << 16) / max(setSize, 1)))
            chunkCount = (setCount + setsPerChunk - 1) / setsPerChunk
            stream = Span.streams(rows * length)
        }

        /// Groups of consecutive sets for the passes that keep partial parameter gradients: one
        /// per 32K elements, at most 64, and at most max(16, 64K / parameters) so that the
        /// Double partials (zeroed, then merged serially) stay small: with 64 groups of 4096
        /// parameters, LayerNorm (4096, 4096) backward spent a fifth of its time on them.
        /// (Parenthesised: `>>` binds tighter than `*` in Swift, and `rows * length >> 15` once
        /// put every row backward on one thread.)
        func gradientGroups(parameters: Int) -> Int {
            let byParameters = max(16, (1 << 16) / max(parameters, 1))
            return max(1, min(setCount, 64, byParameters, (rows * length) >> 15))
        }

        /// Sets of group k when the sets are cut into `groups` groups of consecutive sets.
        func group(_ k: Int, of groups: Int) -> Range<Int> {
            let lower = k * setCount / groups
            return lower..<((k + 1) * setCount / groups)
        }

        func chunk(_ k: Int) -> Range<Int> {
            (k * setsPerChunk)..<min(setCount, (k + 1) * setsPerChunk)
        }
        /// Row k of set s.
        @inline(__always) func row(_ s: Int, _ k: Int) -> Int { s + k * setCount }
        /// γ index of segment j of row r.
        @inline(__always) func gammaIndex(row r: Int, segment j: Int) -> Int {
            let phase = cycle == 1 ? 0 : r % cycle
            if case .elementwise = gamma { return phase * length }
            return phase * segmentsPerRow + j
        }
    }

    /// Training forward on a row geometry: statistics per set, then y (fused per set, while the
    /// set is in cache); with y nil, the statistics alone.
    static func rowsForward(
        _ x: UnsafePointer<Float>, _ plan: RowPlan, operation op: ReferenceNormKernel.Operation,
        gamma: UnsafePointer<Float>?, beta: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>?,
        statistics: inout Statistics
    ) {
        let sets = plan.setCount
        statistics = Statistics(setCount: sets)
        statistics.mean.withUnsafeMutableBufferPointer { meanOut in
            statistics.variance.withUnsafeMutableBufferPointer { varOut in
                statistics.biasedVariance.withUnsafeMutableBufferPointer { biasedOut in
                    statistics.rstd.withUnsafeMutableBufferPointer { rstdOut in
                        Parallelism.forEachChunk(plan.chunkCount, work: plan.rows * plan.length) {
                            k in
                            let inverse = 1 / Double(plan.setSize)
                            for s in plan.chunk(k) {
                                var shift: Float =
                                    op.centers
                                    ? rowShift(x + plan.row(s, 0) * plan.length, plan.length) : 0
                                var (s1, s2) = rowSetSums(x, plan, s, shift: shift)
                                if op.centers
                                    && shiftIsFar(
                                        n: plan.setSize, inverseCount: inverse, s1: s1, s2: s2)
                                {
                                    shift = Float(Double(shift) + s1 * inverse)
                                    (s1, s2) = rowSetSums(x, plan, s, shift: shift)
                                }
                                let r = finish(
                                    n: plan.setSize, inverseCount: inverse, shift: shift, s1: s1,
                                    s2: s2,
                                    operation: op)
                                meanOut[s] = r.mean
                                varOut[s] = r.variance
                                biasedOut[s] = r.biased
                                rstdOut[s] = r.rstd
                                if let y {
                                    rowsApply(
                                        x, plan, set: s, mean: r.mean, rstd: r.rstd, gamma: gamma,
                                        beta: beta, y: y)
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A set's shift: the mean of 4 elements spread evenly over its first row.
    ///
    /// Near the
    /// mean far more often than the first element alone (which lies two standard deviations out
    /// for one set in twenty of normal data, and costs that set a second summation).
    @inline(__always)
    static func rowShift(_ row: UnsafePointer<Float>, _ length: Int) -> Float {
        guard length >= 4 else { return row[0] }
        let step = length >> 2
        let total =
            (Double(row[0]) + Double(row[step])) + (Double(row[2 * step]) + Double(row[3 * step]))
        return Float(total * 0.25)
    }

    @inline(__always)
    static func rowSetSums(_ x: UnsafePointer<Float>, _ plan: RowPlan, _ s: Int, shift: Float) -> (
        Double, Double
    ) {
        var s1 = 0.0
        var s2 = 0.0
        for k in 0..<plan.rowsPerSet {
            let (a, b) = Span.shiftedSums(
                x + plan.row(s, k) * plan.length, plan.length, shift: shift)
            s1 += a
            s2 += b
        }
        return (s1, s2)
    }

    /// Writes y for every row of set `s` from its statistics.
    @inline(__always)
    static func rowsApply(
        _ x: UnsafePointer<Float>, _ plan: RowPlan, set s: Int, mean: Double, rstd: Double,
        gamma: UnsafePointer<Float>?, beta: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>
    ) {
        let shift = Float(mean)
        let t = (Double(shift) - mean) * rstd
        for k in 0..<plan.rowsPerSet {
            let r = plan.row(s, k)
            let base = r * plan.length
            switch plan.gamma {
            case .elementwise:
                let g = plan.gammaIndex(row: r, segment: 0)
                Span.elementwise(
                    x + base, y + base, plan.length, shift: shift, rstd: Float(rstd),
                    term: Float(t),
                    gamma: gamma.map { $0 + g }, beta: beta.map { $0 + g }, stream: plan.stream)
            case .none, .segments:
                let segment = plan.segment
                for j in 0..<plan.segmentsPerRow {
                    let p = plan.gammaIndex(row: r, segment: j)
                    let g = gamma.map { Double($0[p]) } ?? 1
                    let b = beta.map { Double($0[p]) } ?? 0
                    Span.affine(
                        x + base + j * segment, y + base + j * segment, segment, shift: shift,
                        scale: Float(g * rstd), offset: Float(b + g * t), stream: plan.stream)
                }
            }
        }
    }

    /// Forward with given statistics (inference, frozen) on a row geometry.
    static func rowsForward(
        _ x: UnsafePointer<Float>, _ plan: RowPlan, mean: [Double], rstd: [Double],
        gamma: UnsafePointer<Float>?, beta: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>
    ) {
        // Storage order (consecutive rows per chunk, not the rows of one set, which lie
        // setCount rows apart), with the per-set shift, rstd and t = (s − μ)·rstd as Float
        // tables computed once: short rows (7×7 BatchNorm) are bound by memory order and
        // per-row overhead, not arithmetic.
        let sets = plan.setCount
        var table = [Float](repeating: 0, count: 3 * sets)
        for s in 0..<sets {
            let shift = Float(mean[s])
            table[s] = shift
            table[sets + s] = Float(rstd[s])
            table[2 * sets + s] = Float((Double(shift) - mean[s]) * rstd[s])
        }
        // Chunks of about 64K elements, as in ``RowPlan/setsPerChunk`` (with 16K, inference
        // on (8, 256, 28, 28) ran about 1.4× slower on two threads).
        let rowsPerChunk = max(1, (1 << 16) / max(plan.length, 1))
        let chunks = (plan.rows + rowsPerChunk - 1) / rowsPerChunk
        table.withUnsafeBufferPointer { tp in
            let shifts = tp.baseAddress!
            let rs = shifts + sets
            let ts = shifts + 2 * sets
            Parallelism.forEachChunk(chunks, work: plan.rows * plan.length) { k in
                let first = k * rowsPerChunk
                let last = min(plan.rows, first + rowsPerChunk)
                var s = first % sets
                for r in first..<last {
                    let base = r * plan.length
                    let (shift, rv, t) = (shifts[s], rs[s], ts[s])
                    switch plan.gamma {
                    case .elementwise:
                        let g = plan.gammaIndex(row: r, segment: 0)
                        Span.elementwise(
                            x + base, y + base, plan.length, shift: shift, rstd: rv, term: t,
                            gamma: gamma.map { $0 + g }, beta: beta.map { $0 + g },
                            stream: plan.stream)
                    case .none, .segments:
                        let segment = plan.segment
                        for j in 0..<plan.segmentsPerRow {
                            let p = plan.gammaIndex(row: r, segment: j)
                            let g = gamma?[p] ?? 1
                            let b = beta?[p] ?? 0
                            Span.affine(
                                x + base + j * segment, y + base + j * segment, segment,
                                shift: shift, scale: g * rv, offset: b + g * t,
                                stream: plan.stream)
                        }
                    }
                    s += 1
                    if s == sets { s = 0 }
                }
            }
        }
    }

    /// Backward on a row geometry.
    ///
    /// Overwrites dx, dgamma and dbeta.
    static func rowsBackward(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: RowPlan, mean: [Double],
        rstd: [Double],
        operation op: ReferenceNormKernel.Operation, statisticsAreConstant: Bool,
        gamma: UnsafePointer<Float>?,
        dx: UnsafeMutablePointer<Float>, dgamma: inout [Double], dbeta: inout [Double]
    ) {
        let perSetGamma: Bool
        if case .segments = plan.gamma {
            perSetGamma = plan.segmentsPerRow == 1 && plan.cycle == plan.setCount
        } else {
            perSetGamma = gamma == nil
        }
        if plan.rowsPerSet > 1 && plan.length < 1024 && perSetGamma {
            rowsBackwardInStorageOrder(
                x, dy, plan, mean: mean, rstd: rstd, operation: op,
                statisticsAreConstant: statisticsAreConstant, gamma: gamma, dx: dx,
                dgamma: &dgamma, dbeta: &dbeta)
            return
        }
        // Groups of consecutive sets, fixed by the sizes alone: each keeps partial parameter
        // gradients, merged in group order afterwards.
        let parameterCount = dgamma.count
        let chunks = plan.gradientGroups(parameters: parameterCount)
        let hasGamma = gamma != nil
        var partialGamma = [Double](repeating: 0, count: hasGamma ? chunks * parameterCount : 0)
        var partialBeta = [Double](repeating: 0, count: hasGamma ? chunks * parameterCount : 0)
        let elementwise: Bool
        if case .elementwise = plan.gamma { elementwise = true } else { elementwise = false }
        // One row per set sharing one γ (LayerNorm, RMSNorm): blocks of four rows.
        let rowBlocks =
            Span.wide && elementwise && hasGamma && plan.rowsPerSet == 1 && plan.cycle == 1
        partialGamma.withUnsafeMutableBufferPointer { pg in
            partialBeta.withUnsafeMutableBufferPointer { pb in
                Parallelism.forEachChunk(chunks, work: plan.rows * plan.length) { k in
                    let dgOut = hasGamma ? pg.baseAddress! + k * parameterCount : nil
                    let dbOut = hasGamma ? pb.baseAddress! + k * parameterCount : nil
                    // Float partials for elementwise γ, flushed to the chunk's Double partials.
                    var scratch = [Float](
                        repeating: 0, count: elementwise && hasGamma ? 2 * parameterCount : 0)
                    scratch.withUnsafeMutableBufferPointer { sp in
                        let sets = plan.group(k, of: chunks)
                        #if arch(x86_64)
                            if rowBlocks, let gamma, let base = sp.baseAddress, let dgOut,
                                let dbOut
                            {
                                rowsBackwardInBlocks(
                                    x, dy, plan, sets: sets, mean: mean, rstd: rstd,
                                    operation: op, constant: statisticsAreConstant, gamma: gamma,
                                    dx: dx, dgamma: dgOut, dbeta: dbOut, scratch: base,
                                    parameterCount: parameterCount)
                                return
                            }
                        #endif
                        for (done, s) in sets.enumerated() {
                            if done % 64 == 63, elementwise, hasGamma, let base = sp.baseAddress,
                                let dgOut, let dbOut
                            {
                                Span.flush(base, into: dgOut, parameterCount)
                                Span.flush(base + parameterCount, into: dbOut, parameterCount)
                            }
                            rowsBackwardSet(
                                x, dy, plan, set: s, mean: mean[s], rstd: rstd[s], operation: op,
                                constant: statisticsAreConstant, gamma: gamma, dx: dx,
                                dgamma: dgOut, dbeta: dbOut,
                                scratch: sp.baseAddress, parameterCount: parameterCount)
                        }
                        if elementwise, hasGamma, let base = sp.baseAddress, let dgOut, let dbOut {
                            Span.flush(base, into: dgOut, parameterCount)
                            Span.flush(base + parameterCount, into: dbOut, parameterCount)
                        }
                    }
                }
            }
        }
        for i in 0..<parameterCount {
            dgamma[i] = 0
            dbeta[i] = 0
        }
        for k in 0..<(hasGamma ? chunks : 0) {
            for i in 0..<parameterCount {
                dgamma[i] += partialGamma[k * parameterCount + i]
                dbeta[i] += partialBeta[k * parameterCount + i]
            }
        }
    }

    /// Backward of short rows spaced `setCount` apart with γ per set (BatchNorm NCHW, 7×7).
    ///
    /// Both passes stream rows in storage order instead of set by set (whose rows lie a whole
    /// sample apart). Pass 1 adds each row's Σdy and Σdy·(x − s) to its chunk's
    /// per-set partials (chunks fixed by the sizes, merged in chunk order); the per-set
    /// coefficients then go into Float tables once, and pass 2 writes dx row by row.
    static func rowsBackwardInStorageOrder(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: RowPlan, mean: [Double],
        rstd: [Double], operation op: ReferenceNormKernel.Operation, statisticsAreConstant: Bool,
        gamma: UnsafePointer<Float>?, dx: UnsafeMutablePointer<Float>, dgamma: inout [Double],
        dbeta: inout [Double]
    ) {
        let sets = plan.setCount
        let length = plan.length
        let rows = plan.rows
        let rowsPerChunk = max(1, (1 << 16) / max(length, 1))
        let chunks = (rows + rowsPerChunk - 1) / rowsPerChunk
        // Per set: Float shift, then (pass 2) a·γ, b, c.
        var table = [Float](repeating: 0, count: 4 * sets)
        for s in 0..<sets { table[s] = Float(mean[s]) }
        // Pass 1 partials, chunk by chunk, written by one chunk each.
        let partialChunks = min(chunks, 16)
        let chunksPerPartial = (chunks + partialChunks - 1) / partialChunks
        var partials = [Double](repeating: 0, count: partialChunks * 2 * sets)
        table.withUnsafeBufferPointer { tp in
            partials.withUnsafeMutableBufferPointer { pp in
                let shifts = tp.baseAddress!
                Parallelism.forEachChunk(partialChunks, work: rows * length) { p in
                    let sumDy = pp.baseAddress! + p * 2 * sets
                    let sumDyD = sumDy + sets
                    let first = p * chunksPerPartial * rowsPerChunk
                    let last = min(rows, (p + 1) * chunksPerPartial * rowsPerChunk)
                    guard first < last else { return }
                    var s = first % sets
                    for r in first..<last {
                        let base = r * length
                        let (a, b) = Span.gradientSums(
                            x + base, dy + base, length, shift: shifts[s])
                        sumDy[s] += a
                        sumDyD[s] += b
                        s += 1
                        if s == sets { s = 0 }
                    }
                }
            }
        }
        for i in 0..<dgamma.count {
            dgamma[i] = 0
            dbeta[i] = 0
        }
        for s in 0..<sets {
            var sdy = 0.0
            var sdyd = 0.0
            for p in 0..<partialChunks {
                sdy += partials[p * 2 * sets + s]
                sdyd += partials[p * 2 * sets + sets + s]
            }
            let shift = table[s]
            let t = (Double(shift) - mean[s]) * rstd[s]
            let g = gamma.map { Double($0[s]) } ?? 1
            if gamma != nil {
                dgamma[s] = rstd[s] * sdyd + t * sdy
                dbeta[s] = sdy
            }
            let (a, b, c) = gradientCoefficients(
                n: plan.setSize, rstd: rstd[s], term: t, sumG: g * sdy, sumGD: g * sdyd,
                operation: op, constant: statisticsAreConstant)
            table[sets + s] = Float(a * g)
            table[2 * sets + s] = Float(b)
            table[3 * sets + s] = Float(c)
        }
        table.withUnsafeBufferPointer { tp in
            let shifts = tp.baseAddress!
            let aTable = shifts + sets
            let bTable = shifts + 2 * sets
            let cTable = shifts + 3 * sets
            // Last chunk first: pass 1 ended there, so the cache still holds it.
            Parallelism.forEachChunk(chunks, work: rows * length) { j in
                let k = chunks - 1 - j
                let first = k * rowsPerChunk
                let last = min(rows, first + rowsPerChunk)
                var s = first % sets
                for r in first..<last {
                    let base = r * length
                    Span.gradient(
                        x + base, dy + base, dx + base, length, shift: shifts[s], a: aTable[s],
                        b: bTable[s], c: cTable[s], gamma: nil, stream: plan.stream)
                    s += 1
                    if s == sets { s = 0 }
                }
            }
        }
    }

    #if arch(x86_64)
        /// The backward of `sets` when every set is one row and all rows share one γ.
        ///
        /// LayerNorm and RMSNorm, AVX2 only: four rows at a time go through
        /// `nk_rows_elementwise_gradient_sums`, which adds their dγ and dβ to the Float
        /// `scratch` partials once per column instead of once per row, then each row's dx is
        /// written while the rows are still in cache. The partials are flushed to `dgamma`,
        /// `dbeta` every 64 rows, as on the row-by-row path.
        static func rowsBackwardInBlocks(
            _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: RowPlan,
            sets: Range<Int>, mean: [Double], rstd: [Double],
            operation op: ReferenceNormKernel.Operation, constant: Bool,
            gamma: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>,
            dgamma: UnsafeMutablePointer<Double>, dbeta: UnsafeMutablePointer<Double>,
            scratch: UnsafeMutablePointer<Float>, parameterCount: Int
        ) {
            let length = plan.length
            // Per block: shift, rstd and term of each row (Float), its term in Double and its
            // two sums (Double).
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 12) { table in
                withUnsafeTemporaryAllocation(of: Double.self, capacity: 12) { results in
                    let (sp, rp, tp) = (
                        table.baseAddress!, table.baseAddress! + 4, table.baseAddress! + 8
                    )
                    let (up, pp, terms) = (
                        results.baseAddress!, results.baseAddress! + 4, results.baseAddress! + 8
                    )
                    var first = sets.lowerBound
                    var sinceFlush = 0
                    while first < sets.upperBound {
                        let count = min(4, sets.upperBound - first)
                        if sinceFlush >= 64 {
                            Span.flush(scratch, into: dgamma, parameterCount)
                            Span.flush(scratch + parameterCount, into: dbeta, parameterCount)
                            sinceFlush = 0
                        }
                        for q in 0..<count {
                            let m = mean[first + q]
                            sp[q] = Float(m)
                            rp[q] = Float(rstd[first + q])
                            terms[q] = (Double(sp[q]) - m) * rstd[first + q]
                            tp[q] = Float(terms[q])
                        }
                        let base = first * length
                        nk_rows_elementwise_gradient_sums(
                            count, x + base, dy + base, length, length, sp, rp, tp, gamma,
                            scratch, scratch + parameterCount, up, pp)
                        for q in 0..<count {
                            let s = first + q
                            let (a, b, c) = gradientCoefficients(
                                n: plan.setSize, rstd: rstd[s], term: terms[q], sumG: up[q],
                                sumGD: pp[q], operation: op, constant: constant)
                            let row = base + q * length
                            Span.gradient(
                                x + row, dy + row, dx + row, length, shift: sp[q], a: Float(a),
                                b: Float(b), c: Float(c), gamma: gamma, stream: plan.stream)
                        }
                        first += count
                        sinceFlush += count
                    }
                }
            }
            Span.flush(scratch, into: dgamma, parameterCount)
            Span.flush(scratch + parameterCount, into: dbeta, parameterCount)
        }
    #endif

    @inline(__always)
    static func rowsBackwardSet(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: RowPlan, set s: Int,
        mean: Double, rstd: Double, operation op: ReferenceNormKernel.Operation, constant: Bool,
        gamma: UnsafePointer<Float>?, dx: UnsafeMutablePointer<Float>,
        dgamma: UnsafeMutablePointer<Double>?, dbeta: UnsafeMutablePointer<Double>?,
        scratch: UnsafeMutablePointer<Float>?, parameterCount: Int
    ) {
        let shift = Float(mean)
        let t = (Double(shift) - mean) * rstd
        let (sumG, sumGD) = rowsSetGradientSums(
            x, dy, plan, set: s, shift: shift, rstd: rstd, term: t, gamma: gamma, dgamma: dgamma,
            dbeta: dbeta, scratch: scratch, parameterCount: parameterCount)
        // dx = A·g + B·(x − s) + C, from the set's sums (see ReferenceNormKernel.backward).
        let (a, b, c) = gradientCoefficients(
            n: plan.setSize, rstd: rstd, term: t, sumG: sumG, sumGD: sumGD, operation: op,
            constant: constant)
        rowsSetApplyGradient(
            x, dy, plan, set: s, shift: shift, a: a, b: b, c: c, gamma: gamma, dx: dx)
    }

    /// Σg and Σg·(x − s) over set `s` (g = dy·γ), adding dγ = Σ dy·x̂ and dβ = Σ dy into
    /// `dgamma`, `dbeta` (elementwise γ: into the Float `scratch` partials).
    @inline(__always)
    static func rowsSetGradientSums(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: RowPlan, set s: Int,
        shift: Float, rstd: Double, term t: Double, gamma: UnsafePointer<Float>?,
        dgamma: UnsafeMutablePointer<Double>?, dbeta: UnsafeMutablePointer<Double>?,
        scratch: UnsafeMutablePointer<Float>?, parameterCount: Int
    ) -> (Double, Double) {
        let segment = plan.segment
        var sumG = 0.0
        var sumGD = 0.0
        for k in 0..<plan.rowsPerSet {
            let r = plan.row(s, k)
            let base = r * plan.length
            switch plan.gamma {
            case .elementwise:
                let p = plan.gammaIndex(row: r, segment: 0)
                let (a, b): (Double, Double)
                if let gamma, let scratch {
                    (a, b) = Span.elementwiseGradientSums(
                        x + base, dy + base, plan.length, shift: shift, rstd: Float(rstd),
                        term: Float(t), gamma: gamma + p, dgamma: scratch + p,
                        dbeta: scratch + parameterCount + p)
                } else {
                    (a, b) = Span.gradientSums(x + base, dy + base, plan.length, shift: shift)
                }
                sumG += a
                sumGD += b
                if (k + 1) % 64 == 0, let scratch, let dgamma, let dbeta {
                    // Keep the Float partials short: flush this row's γ slice every 64 rows.
                    Span.flush(scratch + p, into: dgamma + p, plan.length)
                    Span.flush(scratch + parameterCount + p, into: dbeta + p, plan.length)
                }
            case .none, .segments:
                for j in 0..<plan.segmentsPerRow {
                    let (sdy, sdyd) = Span.gradientSums(
                        x + base + j * segment, dy + base + j * segment, segment, shift: shift)
                    let p = plan.gammaIndex(row: r, segment: j)
                    let g = gamma.map { Double($0[p]) } ?? 1
                    sumG += g * sdy
                    sumGD += g * sdyd
                    if let dgamma, let dbeta {
                        dgamma[p] += rstd * sdyd + t * sdy
                        dbeta[p] += sdy
                    }
                }
            }
        }
        return (sumG, sumGD)
    }

    /// dx = a·g + b·(x − s) + c over set `s` (g = dy·γ).
    @inline(__always)
    static func rowsSetApplyGradient(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: RowPlan, set s: Int,
        shift: Float, a: Double, b: Double, c: Double, gamma: UnsafePointer<Float>?,
        dx: UnsafeMutablePointer<Float>
    ) {
        let segment = plan.segment
        for k in 0..<plan.rowsPerSet {
            let r = plan.row(s, k)
            let base = r * plan.length
            switch plan.gamma {
            case .elementwise:
                let p = plan.gammaIndex(row: r, segment: 0)
                Span.gradient(
                    x + base, dy + base, dx + base, plan.length, shift: shift, a: Float(a),
                    b: Float(b), c: Float(c), gamma: gamma.map { $0 + p }, stream: plan.stream)
            case .none, .segments:
                for j in 0..<plan.segmentsPerRow {
                    let p = plan.gammaIndex(row: r, segment: j)
                    let g = gamma.map { Double($0[p]) } ?? 1
                    Span.gradient(
                        x + base + j * segment, dy + base + j * segment, dx + base + j * segment,
                        segment, shift: shift, a: Float(a * g), b: Float(b), c: Float(c),
                        gamma: nil,
                        stream: plan.stream)
                }
            }
        }
    }

    /// Per-set gradient sums over a row geometry, relative to the exact means.
    static func rowsGradientSums(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: RowPlan, mean: [Double],
        rstd: [Double], gamma: UnsafePointer<Float>?, parameterCount: Int
    ) -> GradientSums {
        let chunks = plan.gradientGroups(parameters: parameterCount)
        let hasGamma = gamma != nil
        var result = GradientSums(
            sumG: [Double](repeating: 0, count: plan.setCount),
            sumGD: [Double](repeating: 0, count: plan.setCount),
            scaleGradient: [Double](repeating: 0, count: parameterCount),
            offsetGradient: [Double](repeating: 0, count: parameterCount))
        var partialGamma = [Double](repeating: 0, count: hasGamma ? chunks * parameterCount : 0)
        var partialBeta = [Double](repeating: 0, count: hasGamma ? chunks * parameterCount : 0)
        let elementwise: Bool
        if case .elementwise = plan.gamma { elementwise = true } else { elementwise = false }
        result.sumG.withUnsafeMutableBufferPointer { sg in
            result.sumGD.withUnsafeMutableBufferPointer { sgd in
                partialGamma.withUnsafeMutableBufferPointer { pg in
                    partialBeta.withUnsafeMutableBufferPointer { pb in
                        Parallelism.forEachChunk(chunks, work: plan.rows * plan.length) { k in
                            let dgOut = hasGamma ? pg.baseAddress! + k * parameterCount : nil
                            let dbOut = hasGamma ? pb.baseAddress! + k * parameterCount : nil
                            var scratch = [Float](
                                repeating: 0,
                                count: elementwise && hasGamma ? 2 * parameterCount : 0)
                            scratch.withUnsafeMutableBufferPointer { sp in
                                let sets = plan.group(k, of: chunks)
                                for (done, s) in sets.enumerated() {
                                    if done % 64 == 63, elementwise, hasGamma,
                                        let base = sp.baseAddress,
                                        let dgOut, let dbOut
                                    {
                                        Span.flush(base, into: dgOut, parameterCount)
                                        Span.flush(
                                            base + parameterCount, into: dbOut, parameterCount)
                                    }
                                    let shift = Float(mean[s])
                                    let t = (Double(shift) - mean[s]) * rstd[s]
                                    let (g, gd) = rowsSetGradientSums(
                                        x, dy, plan, set: s, shift: shift, rstd: rstd[s], term: t,
                                        gamma: gamma,
                                        dgamma: dgOut, dbeta: dbOut, scratch: sp.baseAddress,
                                        parameterCount: parameterCount)
                                    sg[s] = g
                                    // Σg·(x − μ) = Σg·(x − s) + (s − μ)·Σg.
                                    sgd[s] = gd + (Double(shift) - mean[s]) * g
                                }
                                if elementwise, hasGamma, let base = sp.baseAddress, let dgOut,
                                    let dbOut
                                {
                                    Span.flush(base, into: dgOut, parameterCount)
                                    Span.flush(base + parameterCount, into: dbOut, parameterCount)
                                }
                            }
                        }
                    }
                }
            }
        }
        for k in 0..<(hasGamma ? chunks : 0) {
            for i in 0..<parameterCount {
                result.scaleGradient[i] += partialGamma[k * parameterCount + i]
                result.offsetGradient[i] += partialBeta[k * parameterCount + i]
            }
        }
        return result
    }

    /// dx = A·g + B·(x − μ) + C per set over a row geometry.
    static func rowsApplyGradient(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ plan: RowPlan, mean: [Double],
        a: [Double], b: [Double], c: [Double], gamma: UnsafePointer<Float>?,
        dx: UnsafeMutablePointer<Float>
    ) {
        Parallelism.forEachChunk(plan.chunkCount, work: plan.rows * plan.length) { k in
            for s in plan.chunk(k) {
                let shift = Float(mean[s])
                // B·(x − μ) = B·(x − s) + B·(s − μ).
                let cs = c[s] + b[s] * (Double(shift) - mean[s])
                rowsSetApplyGradient(
                    x, dy, plan, set: s, shift: shift, a: a[s], b: b[s], c: cs, gamma: gamma, dx: dx
                )
            }
        }
    }

    /// Statistics of every set of a row geometry, without writing an output.
    static func rowsMoments(
        _ x: UnsafePointer<Float>, _ plan: RowPlan, operation op: ReferenceNormKernel.Operation
    ) -> Statistics {
        var statistics = Statistics(mean: [], variance: [], biasedVariance: [], rstd: [])
        rowsForward(
            x, plan, operation: op, gamma: nil, beta: nil, y: nil, statistics: &statistics)
        return statistics
    }

    /// A, B, C of dx = A·g + B·(x − s) + C for one set of n elements, where
    /// x̂ = rstd·(x − s) + t, Σg and Σg·(x − s) are the set's sums, and g = dy·γ.
    @inline(__always)
    static func gradientCoefficients(
        n: Int, rstd r: Double, term t: Double, sumG: Double, sumGD: Double,
        operation op: ReferenceNormKernel.Operation, constant: Bool
    ) -> (Double, Double, Double) {
        if constant || (!op.centers && !op.scales) { return (r, 0, 0) }
        let m = Double(n)
        let sumGXhat = r * sumGD + t * sumG
        if op.centers && op.scales {
            let d = op.unbiased ? m - 1 : m
            return (r, -r * r * sumGXhat / d, -r * sumG / m - r * t * sumGXhat / d)
        }
        if op.scales {  // RMS: μ = 0, s = 0, t = 0.
            return (r, -r * r * sumGXhat / m, 0)
        }
        return (1, 0, -sumG / m)  // centering only
    }
}
