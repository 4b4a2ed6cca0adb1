import LinearAlgebra
import NormKernels
import Normalization
import TensorCore

/// What the Float32 path of DBN and IterNorm keeps for backward, per group.
struct FloatWhiteningCache: Sendable {
    /// X_c and W per group.
    var groups: [FloatWhitening.Group]
    /// DBN: eigenvalues and eigenvectors; IterNorm: Σ and the Newton iterates (empty in
    /// inference).
    var eigenvalues: [[Double]] = []
    var eigenvectors: [Matrix] = []
    var sigma: [Matrix] = []
    var iterates: [[Matrix]] = []
}

extension FloatWhitening {
    /// The layer-specific part of a forward: W for the group from its Σ (training) or the
    /// running matrix (inference), plus whatever backward needs.
    typealias Whitener = (_ group: Int, _ sigma: Matrix?) throws -> (w: Matrix, extra: Extra)

    /// DBN's eigendecomposition or IterNorm's iterates.
    enum Extra: Sendable {
        case none
        case eigen(values: [Double], vectors: Matrix)
        case newton(sigma: Matrix, iterates: [Matrix])
    }

    /// The shared forward: per group mean, X_c, Σ (training), W, y.
    ///
    /// - Returns: y, the batch means per group (training), W and the extras per group.
    static func forward<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, groups: [Range<Int>], training: Bool, runningMean: [Double],
        epsilon: Double, scale: Tensor<Scalar>?, offset: Tensor<Scalar>?, whitener: Whitener
    ) throws -> (y: Tensor<Scalar>, means: [[Double]], groups: [Group], extras: [Extra]) {
        let xf = x as! Tensor<Float>
        let shape = Shape(x.shape)
        let scaleF = scale.map { ($0 as! Tensor<Float>).scalars }
        let offsetF = offset.map { ($0 as! Tensor<Float>).scalars }
        var y = [Float](repeating: 0, count: x.count)
        let work = x.count * max(1, groups.first?.count ?? 1)
        let results = try xf.withUnsafeBufferPointer { xp in
            try y.withUnsafeMutableBufferPointer { yp in
                let xb = xp.baseAddress!
                let yb = yp.baseAddress!
                return try forEachGroup(groups.count, work: work) { k in
                    let group = groups[k]
                    let mean =
                        training ? means(xb, shape, group) : group.map { runningMean[$0] }
                    var centred = [Float](repeating: 0, count: group.count * shape.m)
                    let sigma = centred.withUnsafeMutableBufferPointer { cp in
                        centre(xb, shape, group, mean: mean, into: cp.baseAddress!)
                        return training
                            ? covariance(
                                cp.baseAddress!, d: group.count, m: shape.m, epsilon: epsilon)
                            : nil
                    }
                    let (w, extra) = try whitener(k, sigma)
                    guard w.values.allSatisfy(\.isFinite) else {
                        throw NormError.nonFiniteStatistics(layer: "whitening")
                    }
                    centred.withUnsafeBufferPointer { cp in
                        apply(
                            w, centred: cp.baseAddress!, shape, group, scale: scaleF,
                            offset: offsetF, into: yb)
                    }
                    return (mean, Group(centred: centred, whitening: w), extra)
                }
            }
        }
        let output = try Tensor<Float>(shape: x.shape, scalars: y) as! Tensor<Scalar>
        return (output, results.map(\.0), results.map(\.1), results.map(\.2))
    }

    /// The layer-specific part of a backward: A, B, c for a group from dy·X_cᵀ, the row sums
    /// of dy, and γ over the group.
    typealias GradientTerms = (
        _ group: Int, _ dyX: Matrix, _ rowSums: [Double], _ gamma: [Double]
    ) -> (a: Matrix?, b: Matrix, c: [Double])

    /// The shared backward: dγ, dβ, and dx = A X_c + B dy − c per group.
    static func backward<Scalar: NormScalar>(
        _ dy: Tensor<Scalar>, groups: [Range<Int>], cache: FloatWhiteningCache,
        scale: Tensor<Scalar>?, terms: GradientTerms
    ) throws -> (input: Tensor<Scalar>, scale: Tensor<Scalar>?, offset: Tensor<Scalar>?) {
        let dyf = dy as! Tensor<Float>
        let shape = Shape(dy.shape)
        let scaleD = scale.map { $0.scalars.map { Double($0) } }
        var dx = [Float](repeating: 0, count: dy.count)
        let work = dy.count * max(1, groups.first?.count ?? 1)
        let sums = try dyf.withUnsafeBufferPointer { dyp in
            try dx.withUnsafeMutableBufferPointer { dxp in
                let dyb = dyp.baseAddress!
                let dxb = dxp.baseAddress!
                return try forEachGroup(groups.count, work: work) { k in
                    let group = groups[k]
                    let d = group.count
                    let stored = cache.groups[k]
                    return stored.centred.withUnsafeBufferPointer { cp in
                        let (dyX, rowSums) = gradientProducts(
                            dyb, centred: cp.baseAddress!, shape, group)
                        // dγ_i = Σ dy_i ŷ_i = Σ_j W[i, j]·(dy X_cᵀ)[i, j]; dβ_i = Σ dy_i.
                        var dg = [Double](repeating: 0, count: d)
                        for i in 0..<d {
                            for j in 0..<d { dg[i] += stored.whitening[i, j] * dyX[i, j] }
                        }
                        let gamma = group.map { scaleD?[$0] ?? 1 }
                        let (a, b, c) = terms(k, dyX, rowSums, gamma)
                        applyGradient(
                            a: a, b: b, c: c, centred: cp.baseAddress!, dy: dyb, shape, group,
                            into: dxb)
                        return (dg, rowSums)
                    }
                }
            }
        }
        let input = try Tensor<Float>(shape: dy.shape, scalars: dx) as! Tensor<Scalar>
        guard scale != nil else { return (input, nil, nil) }
        let dScale = sums.flatMap(\.0)
        let dOffset = sums.flatMap(\.1)
        return (
            input, try Tensor(shape: [shape.c], rounding: dScale),
            try Tensor(shape: [shape.c], rounding: dOffset)
        )
    }

    /// Wᵀ·diag(γ): the B of every inference backward (and of IterNorm's).
    static func transposedTimesGamma(_ w: Matrix, _ gamma: [Double]) -> Matrix {
        let d = w.rows
        var b = Matrix(rows: d, cols: d)
        for i in 0..<d { for j in 0..<d { b[i, j] = w[j, i] * gamma[j] } }
        return b
    }
}

extension DecorrelatedBatchNorm {
    /// The Float32 forward (see ``FloatWhitening``); same results as the Double path up to
    /// Float rounding.
    func forwardFloat(_ x: Tensor<Scalar>, training: Bool) throws -> (Tensor<Scalar>, Cache) {
        let floor = epsilon * 1e-6
        let running = runningProjections
        let result = try FloatWhitening.forward(
            x, groups: groups, training: training,
            runningMean: runningMean.scalars.map { Double($0) }, epsilon: epsilon, scale: scale,
            offset: offset
        ) { k, sigma in
            guard let sigma else { return (running[k], .none) }
            let (lambda, d) = try sigma.symmetricEigen()
            let inverseRoot = lambda.map { 1 / max($0, floor).squareRoot() }
            var dScaled = d
            for i in 0..<d.rows { for j in 0..<d.cols { dScaled[i, j] *= inverseRoot[j] } }
            return (
                Matrix.product(dScaled, d, transposeB: true), .eigen(values: lambda, vectors: d)
            )
        }
        var cache = FloatWhiteningCache(groups: result.groups)
        if training {
            let f = momentum.weightOfNew(batchesTracked: 1)
            var newMean = runningMean.scalars.map { Double($0) }
            var newProjections = runningProjections
            for (k, group) in groups.enumerated() {
                for (i, ch) in group.enumerated() {
                    newMean[ch] = (1 - f) * newMean[ch] + f * result.means[k][i]
                }
                newProjections[k] = (1 - f) * runningProjections[k] + f * result.groups[k].whitening
                if case .eigen(let values, let vectors) = result.extras[k] {
                    cache.eigenvalues.append(values)
                    cache.eigenvectors.append(vectors)
                }
            }
            guard newMean.allSatisfy(\.isFinite) else {
                throw NormError.nonFiniteStatistics(layer: "DecorrelatedBatchNorm")
            }
            runningMean = try Tensor(shape: [channelCount], rounding: newMean)
            runningProjections = newProjections
        }
        return (
            result.y,
            Cache(
                input: x, whitened: [], centred: [], eigenvalues: cache.eigenvalues,
                eigenvectors: cache.eigenvectors, projections: result.groups.map(\.whitening),
                training: training, fast: cache)
        )
    }

    /// The Float32 backward: DBN's closed form as dx = A X_c + B dy − c per group.
    func backwardFloat(_ dy: Tensor<Scalar>, cache: Cache, fast: FloatWhiteningCache) throws
        -> Gradients
    {
        let floor = epsilon * 1e-6
        let training = cache.training
        let m = Double(FloatWhitening.Shape(dy.shape).m)
        let result = try FloatWhitening.backward(
            dy, groups: groups, cache: fast, scale: scale
        ) { k, dyX, rowSums, gamma in
            let w = fast.groups[k].whitening
            guard training else {
                return (nil, FloatWhitening.transposedTimesGamma(w, gamma), gamma.map { _ in 0 })
            }
            let lambda = fast.eigenvalues[k]
            let d = fast.eigenvectors[k]
            let n = d.rows
            var u = d
            for i in 0..<n { for j in 0..<n { u[i, j] /= max(lambda[j], floor).squareRoot() } }
            // G = diag(γ)·dy: G X_cᵀ and the row sums of G.
            var gx = dyX
            for i in 0..<n { for j in 0..<n { gx[i, j] *= gamma[i] } }
            let gSums = zip(rowSums, gamma).map { $0 * $1 }
            // F = Dᵀ (G X_cᵀ) U / m, f = Dᵀ ΣG / m (the rows form's dZᵀẐ/m and mean rows of dZ).
            let f = (1 / m) * Matrix.product(Matrix.product(d, gx, transposeA: true), u)
            var colMeans = [Double](repeating: 0, count: n)
            for j in 0..<n { for i in 0..<n { colMeans[j] += d[i, j] * gSums[i] / m } }
            let top = lambda.max() ?? 1
            var s0 = Matrix(rows: n, cols: n)
            for i in 0..<n {
                for j in 0..<n where i != j {
                    var gap = lambda[j] - lambda[i]
                    if abs(gap) < 1e-10 * top { gap = gap < 0 ? -1e-10 * top : 1e-10 * top }
                    s0[i, j] =
                        (lambda[i] * f[j, i] + (lambda[i] * lambda[j]).squareRoot() * f[i, j]) / gap
                }
            }
            var s = s0 + s0.transposed
            for i in 0..<n { s[i, i] -= f[i, i] }
            // dX = U Sᵀ Uᵀ X_c + U Dᵀ G − (U f) 1ᵀ.
            let a = Matrix.product(Matrix.product(u, s, transposeB: true), u, transposeB: true)
            var b = Matrix.product(u, d, transposeB: true)
            for i in 0..<n { for j in 0..<n { b[i, j] *= gamma[j] } }
            var c = [Double](repeating: 0, count: n)
            for i in 0..<n { for j in 0..<n { c[i] += u[i, j] * colMeans[j] } }
            return (a, b, c)
        }
        return Gradients(input: result.input, scale: result.scale, offset: result.offset)
    }
}

extension IterNorm {
    /// The Float32 forward (see ``FloatWhitening``).
    func forwardFloat(_ x: Tensor<Scalar>, training: Bool) throws -> (Tensor<Scalar>, Cache) {
        let running = runningWhitening
        let iterations = self.iterations
        let result = try FloatWhitening.forward(
            x, groups: groups, training: training,
            runningMean: runningMean.scalars.map { Double($0) }, epsilon: epsilon, scale: scale,
            offset: offset
        ) { k, sigma in
            guard let sigma else { return (running[k], .none) }
            let (w, ps) = NewtonWhitening.forward(sigma, iterations: iterations)
            return (w, .newton(sigma: sigma, iterates: ps))
        }
        var cache = FloatWhiteningCache(groups: result.groups)
        if training {
            let f = momentum.weightOfNew(batchesTracked: 1)
            var newMean = runningMean.scalars.map { Double($0) }
            var newWhitening = runningWhitening
            for (k, group) in groups.enumerated() {
                for (i, ch) in group.enumerated() {
                    newMean[ch] = (1 - f) * newMean[ch] + f * result.means[k][i]
                }
                newWhitening[k] = (1 - f) * runningWhitening[k] + f * result.groups[k].whitening
                if case .newton(let sigma, let iterates) = result.extras[k] {
                    cache.sigma.append(sigma)
                    cache.iterates.append(iterates)
                }
            }
            guard newMean.allSatisfy(\.isFinite) else {
                throw NormError.nonFiniteStatistics(layer: "IterNorm")
            }
            runningMean = try Tensor(shape: [channelCount], rounding: newMean)
            runningWhitening = newWhitening
        }
        return (
            result.y,
            Cache(
                input: x, whitened: [], centred: [], sigma: cache.sigma, iterates: cache.iterates,
                whitening: result.groups.map(\.whitening), training: training, fast: cache)
        )
    }

    /// The Float32 backward: dx = (2/m)·dΣ_sym X_c + Wᵀ diag(γ) dy − Wᵀ ḡ per group.
    func backwardFloat(_ dy: Tensor<Scalar>, cache: Cache, fast: FloatWhiteningCache) throws
        -> Gradients
    {
        let training = cache.training
        let m = Double(FloatWhitening.Shape(dy.shape).m)
        let result = try FloatWhitening.backward(
            dy, groups: groups, cache: fast, scale: scale
        ) { k, dyX, rowSums, gamma in
            let w = fast.groups[k].whitening
            let b = FloatWhitening.transposedTimesGamma(w, gamma)
            guard training else { return (nil, b, gamma.map { _ in 0 }) }
            let n = w.rows
            // dW = G X_cᵀ with G = diag(γ)·dy.
            var dW = dyX
            for i in 0..<n { for j in 0..<n { dW[i, j] *= gamma[i] } }
            let dSym = NewtonWhitening.backward(
                dW, sigma: fast.sigma[k], iterates: fast.iterates[k])
            let gMean = zip(rowSums, gamma).map { $0 * $1 / m }
            var c = [Double](repeating: 0, count: n)
            for i in 0..<n { for j in 0..<n { c[i] += w[j, i] * gMean[j] } }
            return ((2 / m) * dSym, b, c)
        }
        return Gradients(input: result.input, scale: result.scale, offset: result.offset)
    }
}
