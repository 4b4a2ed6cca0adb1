extension FastNormKernel {
    /// Training forward: statistics of every set and the output.
    ///
    /// - Parameters:
    ///   - x: input, the geometry's element count.
    ///   - geometry: from ``geometry(for:parameters:)``.
    ///   - operation: centering, scaling, variance estimator and ε.
    ///   - scale, offset: γ and β (nil: 1 and 0), laid out as the geometry says.
    ///   - y: overwritten with the output.
    /// - Returns: per-set statistics, numbered as ``ReductionPlan`` numbers them.
    public static func forwardTraining(
        _ x: UnsafeBufferPointer<Float>, geometry: Geometry,
        operation: ReferenceNormKernel.Operation,
        scale: UnsafeBufferPointer<Float>?, offset: UnsafeBufferPointer<Float>?,
        into y: UnsafeMutableBufferPointer<Float>
    ) -> Statistics {
        var statistics = Statistics(mean: [], variance: [], biasedVariance: [], rstd: [])
        guard let xp = x.baseAddress, let yp = y.baseAddress else { return statistics }
        switch geometry {
        case .rows(let count, let length, let setCount, let gamma):
            rowsForward(
                xp, RowPlan(rows: count, length: length, setCount: setCount, gamma: gamma),
                operation: operation,
                gamma: scale?.baseAddress, beta: offset?.baseAddress, y: yp, statistics: &statistics
            )
        case .columns(let outer, let mid, let inner, let groupWidth, let reduceOuter, let gamma):
            columnsForward(
                xp,
                ColumnPlan(
                    outer: outer, mid: mid, inner: inner, groupWidth: groupWidth,
                    reduceOuter: reduceOuter, gamma: gamma),
                operation: operation, gamma: scale?.baseAddress, beta: offset?.baseAddress, y: yp,
                statistics: &statistics)
        }
        return statistics
    }

    /// Fused residual add and normalization, `h = x + residual; y = norm(h)`, in one pass over
    /// the inputs (PyTorch's CPU kernels need a separate add that writes and rereads h).
    ///
    /// Supported for row geometries whose sets are single rows (LayerNorm, RMSNorm and
    /// channels-last LayerNorm2d); returns nil, writing nothing, for any other geometry.
    /// - Parameters:
    ///   - sum: overwritten with h.
    ///   - y: overwritten with the output.
    public static func forwardTrainingAddingResidual(
        _ x: UnsafeBufferPointer<Float>, residual: UnsafeBufferPointer<Float>, geometry: Geometry,
        operation op: ReferenceNormKernel.Operation, scale: UnsafeBufferPointer<Float>?,
        offset: UnsafeBufferPointer<Float>?, sum: UnsafeMutableBufferPointer<Float>,
        into y: UnsafeMutableBufferPointer<Float>
    ) -> Statistics? {
        guard case .rows(let count, let length, let setCount, let gamma) = geometry,
            setCount == count,
            let xp = x.baseAddress, let rp = residual.baseAddress, let hp = sum.baseAddress,
            let yp = y.baseAddress
        else { return nil }
        let plan = RowPlan(rows: count, length: length, setCount: setCount, gamma: gamma)
        var statistics = Statistics(
            mean: [Double](repeating: 0, count: count),
            variance: [Double](repeating: 0, count: count),
            biasedVariance: [Double](repeating: 0, count: count),
            rstd: [Double](repeating: 1, count: count))
        let inverse = 1 / Double(length)
        statistics.mean.withUnsafeMutableBufferPointer { meanOut in
            statistics.variance.withUnsafeMutableBufferPointer { varOut in
                statistics.biasedVariance.withUnsafeMutableBufferPointer { biasedOut in
                    statistics.rstd.withUnsafeMutableBufferPointer { rstdOut in
                        Parallelism.forEachChunk(plan.chunkCount, work: count * length) { k in
                            for s in plan.chunk(k) {
                                let base = s * length
                                var shift: Float = op.centers ? xp[base] + rp[base] : 0
                                var (s1, s2) = Span.addingShiftedSums(
                                    xp + base, rp + base, hp + base, length, shift: shift)
                                if op.centers
                                    && shiftIsFar(n: length, inverseCount: inverse, s1: s1, s2: s2)
                                {
                                    shift = Float(Double(shift) + s1 * inverse)
                                    (s1, s2) = Span.shiftedSums(hp + base, length, shift: shift)
                                }
                                let r = finish(
                                    n: length, inverseCount: inverse, shift: shift, s1: s1, s2: s2,
                                    operation: op)
                                meanOut[s] = r.mean
                                varOut[s] = r.variance
                                biasedOut[s] = r.biased
                                rstdOut[s] = r.rstd
                                rowsApply(
                                    UnsafePointer(hp), plan, set: s, mean: r.mean, rstd: r.rstd,
                                    gamma: scale?.baseAddress, beta: offset?.baseAddress, y: yp)
                            }
                        }
                    }
                }
            }
        }
        return statistics
    }

    /// Forward with given per-set statistics (inference, frozen statistics).
    ///
    /// - Parameters:
    ///   - mean, rstd: μ and 1/√(σ² + ε) per set.
    ///   - y: overwritten.
    public static func forward(
        _ x: UnsafeBufferPointer<Float>, geometry: Geometry, mean: [Double], rstd: [Double],
        scale: UnsafeBufferPointer<Float>?, offset: UnsafeBufferPointer<Float>?,
        into y: UnsafeMutableBufferPointer<Float>
    ) {
        guard let xp = x.baseAddress, let yp = y.baseAddress else { return }
        switch geometry {
        case .rows(let count, let length, let setCount, let gamma):
            rowsForward(
                xp, RowPlan(rows: count, length: length, setCount: setCount, gamma: gamma),
                mean: mean, rstd: rstd,
                gamma: scale?.baseAddress, beta: offset?.baseAddress, y: yp)
        case .columns(let outer, let mid, let inner, let groupWidth, let reduceOuter, let gamma):
            columnsForward(
                xp,
                ColumnPlan(
                    outer: outer, mid: mid, inner: inner, groupWidth: groupWidth,
                    reduceOuter: reduceOuter, gamma: gamma),
                mean: mean, rstd: rstd, gamma: scale?.baseAddress, beta: offset?.baseAddress, y: yp)
        }
    }

    /// Backward: the input gradient and the affine parameters' gradients, with the same
    /// formulas as ``ReferenceNormKernel/backward(_:outputGradient:setIndex:setCount:mean:rstd:operation:statisticsAreConstant:scale:parameterIndexing:inputGradient:scaleGradient:offsetGradient:)``.
    ///
    /// - Parameters:
    ///   - dx: overwritten.
    ///   - scaleGradient, offsetGradient: resized to the parameter count and overwritten.
    public static func backward(
        _ x: UnsafeBufferPointer<Float>, outputGradient dy: UnsafeBufferPointer<Float>,
        geometry: Geometry,
        mean: [Double], rstd: [Double], operation: ReferenceNormKernel.Operation,
        statisticsAreConstant: Bool,
        scale: UnsafeBufferPointer<Float>?, parameterCount: Int,
        inputGradient dx: UnsafeMutableBufferPointer<Float>,
        scaleGradient: inout [Double], offsetGradient: inout [Double]
    ) {
        scaleGradient = [Double](repeating: 0, count: parameterCount)
        offsetGradient = [Double](repeating: 0, count: parameterCount)
        guard let xp = x.baseAddress, let dyp = dy.baseAddress, let dxp = dx.baseAddress else {
            return
        }
        switch geometry {
        case .rows(let count, let length, let setCount, let gamma):
            rowsBackward(
                xp, dyp, RowPlan(rows: count, length: length, setCount: setCount, gamma: gamma),
                mean: mean, rstd: rstd,
                operation: operation, statisticsAreConstant: statisticsAreConstant,
                gamma: scale?.baseAddress, dx: dxp,
                dgamma: &scaleGradient, dbeta: &offsetGradient)
        case .columns(let outer, let mid, let inner, let groupWidth, let reduceOuter, let gamma):
            columnsBackward(
                xp, dyp,
                ColumnPlan(
                    outer: outer, mid: mid, inner: inner, groupWidth: groupWidth,
                    reduceOuter: reduceOuter, gamma: gamma),
                mean: mean, rstd: rstd, operation: operation,
                statisticsAreConstant: statisticsAreConstant,
                gamma: scale?.baseAddress, dx: dxp, dgamma: &scaleGradient, dbeta: &offsetGradient)
        }
    }
}

extension FastNormKernel {
    /// Statistics of every set, without writing an output (statistics sources that mix or
    /// correct statistics before normalizing: Switchable Normalization, Batch Renormalization).
    public static func moments(
        _ x: UnsafeBufferPointer<Float>, geometry: Geometry,
        operation: ReferenceNormKernel.Operation
    ) -> Statistics {
        guard let xp = x.baseAddress else {
            return Statistics(mean: [], variance: [], biasedVariance: [], rstd: [])
        }
        switch geometry {
        case .rows(let count, let length, let setCount, let gamma):
            return rowsMoments(
                xp, RowPlan(rows: count, length: length, setCount: setCount, gamma: gamma),
                operation: operation)
        case .columns(let outer, let mid, let inner, let groupWidth, let reduceOuter, let gamma):
            return columnsMoments(
                xp,
                ColumnPlan(
                    outer: outer, mid: mid, inner: inner, groupWidth: groupWidth,
                    reduceOuter: reduceOuter, gamma: gamma), operation: operation)
        }
    }

    /// Per-set Σg and Σg·(x − μ) with g = dy·γ, and dγ = Σ dy·x̂, dβ = Σ dy with
    /// x̂ = (x − μ)·rstd, for μ and rstd given per set.
    public static func gradientSums(
        _ x: UnsafeBufferPointer<Float>, outputGradient dy: UnsafeBufferPointer<Float>,
        geometry: Geometry, mean: [Double], rstd: [Double], scale: UnsafeBufferPointer<Float>?,
        parameterCount: Int
    ) -> GradientSums {
        guard let xp = x.baseAddress, let dyp = dy.baseAddress else {
            return GradientSums(sumG: [], sumGD: [], scaleGradient: [], offsetGradient: [])
        }
        switch geometry {
        case .rows(let count, let length, let setCount, let gamma):
            return rowsGradientSums(
                xp, dyp, RowPlan(rows: count, length: length, setCount: setCount, gamma: gamma),
                mean: mean, rstd: rstd, gamma: scale?.baseAddress, parameterCount: parameterCount)
        case .columns(let outer, let mid, let inner, let groupWidth, let reduceOuter, let gamma):
            return columnsGradientSums(
                xp, dyp,
                ColumnPlan(
                    outer: outer, mid: mid, inner: inner, groupWidth: groupWidth,
                    reduceOuter: reduceOuter, gamma: gamma), mean: mean, rstd: rstd,
                gamma: scale?.baseAddress, parameterCount: parameterCount)
        }
    }

    /// dx = A·g + B·(x − μ) + C with A, B, C and μ given per set and g = dy·γ.
    ///
    /// - Parameter dx: overwritten.
    public static func applyGradient(
        _ x: UnsafeBufferPointer<Float>, outputGradient dy: UnsafeBufferPointer<Float>,
        geometry: Geometry, mean: [Double], a: [Double], b: [Double], c: [Double],
        scale: UnsafeBufferPointer<Float>?, into dx: UnsafeMutableBufferPointer<Float>
    ) {
        guard let xp = x.baseAddress, let dyp = dy.baseAddress, let dxp = dx.baseAddress else {
            return
        }
        switch geometry {
        case .rows(let count, let length, let setCount, let gamma):
            rowsApplyGradient(
                xp, dyp, RowPlan(rows: count, length: length, setCount: setCount, gamma: gamma),
                mean: mean, a: a, b: b, c: c, gamma: scale?.baseAddress, dx: dxp)
        case .columns(let outer, let mid, let inner, let groupWidth, let reduceOuter, let gamma):
            columnsApplyGradient(
                xp, dyp,
                ColumnPlan(
                    outer: outer, mid: mid, inner: inner, groupWidth: groupWidth,
                    reduceOuter: reduceOuter, gamma: gamma), mean: mean, a: a, b: b, c: c,
                gamma: scale?.baseAddress, dx: dxp)
        }
    }
}
