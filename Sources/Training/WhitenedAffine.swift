import NormKit

/// Which reparametrization a whitened layer uses (see ``WhitenedAffine`` for the equations).
public enum WhitenedLayerKind: String, Sendable, Hashable, CaseIterable, Codable {
    /// Pre-whitening (Desjardins et al. 2015): `y = V·P·(x − μ) + b`.
    case wnn
    /// Post-whitening with a compact representation and a data-free covariance (after Luo 2017):
    /// `y = A·Q·(W·x − ν) + c`.
    case gwnn
    /// Pre-whitening plus whitening of the back-propagated output gradient (after Luo 2017):
    /// `y = S·V·P·(x − μ) + b`.
    case eigennet
}

/// Settings of a whitened layer.
public struct WhiteningSettings: Sendable, Hashable {
    /// The reparametrization.
    public var kind: WhitenedLayerKind
    /// T: the whitening is re-estimated on training steps 0, T, 2T, … and held fixed in between.
    public var period: Int
    /// k: the whitened (compact) dimension; nil keeps every direction.
    public var rank: Int?
    /// EigenNet: the number r of output-gradient directions whitened individually; the others
    /// share the r-th eigenvalue (nil: all).
    public var gradientRank: Int?
    /// GWNN: the input statistics are measured on the data every this many steps (a multiple
    /// of T; nil: 10·T); the refreshes in between use W·Σₓ·Wᵀ, no data.
    public var dataPeriod: Int?
    /// ε, relative to the mean eigenvalue, added to the covariance's eigenvalues.
    public var epsilon: Double
    /// EigenNet: damping of the gradient covariance, relative to its mean eigenvalue.
    public var gradientDamping: Double
    /// EigenNet: scale S by √(mean λ + δ), keeping the raw gradient's mean variance.
    ///
    /// The whitened gradient's covariance is then ∝ I rather than = I. The unscaled S turns SGD
    /// into an empirical-Fisher natural-gradient step, whose size is 1/|g|: with S held for T
    /// steps it diverged in the harness (see the docs section).
    public var preservesGradientScale: Bool

    /// The largest period (steps are kept exactly in checkpoints of Float buffers up to 2⁴⁸).
    public static let maximumPeriod = 1 << 24

    /// Creates settings.
    public init(
        kind: WhitenedLayerKind, period: Int = 100, rank: Int? = nil, gradientRank: Int? = nil,
        dataPeriod: Int? = nil, epsilon: Double = 1e-3, gradientDamping: Double = 0.1,
        preservesGradientScale: Bool = false
    ) {
        self.preservesGradientScale = preservesGradientScale
        self.kind = kind
        self.period = period
        self.rank = rank
        self.gradientRank = gradientRank
        self.dataPeriod = dataPeriod
        self.epsilon = epsilon
        self.gradientDamping = gradientDamping
    }

    /// The data period GWNN uses.
    public var effectiveDataPeriod: Int {
        dataPeriod ?? period.multipliedReportingOverflow(by: 10).partialValue
    }

    /// Checks the settings that do not depend on a layer's sizes.
    /// - Throws: ``TrainingError/invalidSetting(name:value:requirement:)`` naming the setting.
    public func validate() throws(TrainingError) {
        guard (1...Self.maximumPeriod).contains(period) else {
            throw .invalidSetting(
                name: "whitening period", value: "\(period)",
                requirement: "must lie in 1…\(Self.maximumPeriod)")
        }
        if let rank, rank < 1 {
            throw .invalidSetting(
                name: "whitening rank", value: "\(rank)", requirement: "must be at least 1")
        }
        if let gradientRank, gradientRank < 1 {
            throw .invalidSetting(
                name: "gradient whitening rank", value: "\(gradientRank)",
                requirement: "must be at least 1")
        }
        if let dataPeriod {
            guard (1...Self.maximumPeriod).contains(dataPeriod), dataPeriod % period == 0 else {
                throw .invalidSetting(
                    name: "whitening data period", value: "\(dataPeriod)",
                    requirement:
                        "must lie in 1…\(Self.maximumPeriod) and be a multiple of the period \(period)"
                )
            }
        }
        guard epsilon.isFinite, epsilon > 0 else {
            throw .invalidSetting(
                name: "whitening epsilon", value: "\(epsilon)",
                requirement: "must be finite and > 0")
        }
        guard gradientDamping.isFinite, gradientDamping > 0 else {
            throw .invalidSetting(
                name: "gradient whitening damping", value: "\(gradientDamping)",
                requirement: "must be finite and > 0")
        }
    }
}

/// The affine map of a whitened Linear or Conv2d layer, on rows: x `[m, d]` → y `[m, out]`.
///
/// Three reparametrizations of one affine map `y = W_eff·x + b_eff`; each keeps its whitening
/// fixed between refreshes (training steps 0, T, 2T, …) and, at a refresh, re-expresses its
/// trainable matrices so that `W_eff` and `b_eff` do not change (function preservation):
///
/// **WNN** (pre-whitening), V `[out, k]`, b, buffers μ `[d]`, P `[k, d]`:
/// ```
/// y = V·P·(x − μ) + b
/// refresh on the step's input: μ′, Σ = cov(x);  Σ + ε·mean(λ)·I = U Λ Uᵀ;
///   P′ = Λ_k^{-1/2} U_kᵀ,  P′⁺ = U_k Λ_k^{1/2}     (k leading eigenpairs)
///   V′ = V·P·P′⁺,  b′ = b + V·P·(μ′ − μ)
/// ```
/// **EigenNet**, as WNN with S `[out, out]` in front: `y = S·V·P·(x − μ) + b`; the input
/// refresh is WNN's (V′ = V·P·P′⁺, b′ = b + S·V·P·(μ′ − μ)), and in the backward pass of a
/// refresh step the output gradient g (`[m, out]`, the gradient of the batch-mean loss) gives
/// ```
/// Σ_g = (1/m) Σᵢ (m·gᵢ)(m·gᵢ)ᵀ  (per-example gradients);   Σ_g = U Λ Uᵀ
/// λ̃ᵢ = λᵢ for the r leading eigenvalues, λ_r for the others;  δ = damping · mean(λ)
/// S′ = U (Λ̃ + δI)^{-1/2} Uᵀ,  V′ = S′⁻¹·S·V  (b unchanged)
/// ```
/// so the gradient that reaches V, Sᵀ·g, has covariance ≈ I on that batch, and V's Fisher block
/// (K-FAC's E[x̂x̂ᵀ] ⊗ E[ĝĝᵀ]) has both factors ≈ I. With `preservesGradientScale`,
/// S′ is multiplied by √(mean λ + δ): covariance ∝ I, SGD's step size kept.
///
/// **GWNN** (post-whitening), W `[out, d]`, A `[out, k]`, c, buffers ν `[out]`, Q `[k, out]`
/// and the input statistics μₓ `[d]`, Σₓ `[d, d]`:
/// ```
/// y = A·Q·(W·x − ν) + c
/// refresh: every data period, μₓ, Σₓ = statistics of x;  then (every T, no data pass)
///   ν′ = W·μₓ,  Σ_z = W·Σₓ·Wᵀ  (= W·Wᵀ for a whitened input);  Q′, Q′⁺ from Σ_z as P′ above
///   A′ = A·Q·Q′⁺,  c′ = c + A·Q·(ν′ − ν)
/// ```
///
/// With k smaller than the dimension, a refresh preserves the function on the kept subspace
/// only (P′⁺·P′ is the projection U_k U_kᵀ): exactly for inputs in it, approximately otherwise.
/// The construction starts from a plain layer's initial W₀, b₀: with k = d it is the same
/// function (P = I, μ = 0, V = W₀, S = I; GWNN: Q, A from W₀·W₀ᵀ, ν = 0); with k < d it is the
/// plain layer restricted to W₀'s k leading right singular directions.
///
/// A refresh also changes the coordinates of SGD's momentum: ``carryOptimizerState(_:)`` maps the
/// velocity of V (or A) with the same matrices, so that a step moves W_eff as it would have
/// before the refresh.
public final class WhitenedAffine<Scalar: NormScalar> {
    /// The settings.
    public let settings: WhiteningSettings
    /// d.
    public let inputs: Int
    /// out.
    public let outputs: Int
    /// k.
    public let rank: Int
    /// V (WNN, EigenNet) or W (GWNN).
    public let weight: Parameter<Scalar>
    /// A (GWNN only).
    public let mix: Parameter<Scalar>?
    /// b (c for GWNN).
    public let bias: Parameter<Scalar>
    /// μ (WNN, EigenNet: `[d]`) or ν (GWNN: `[out]`).
    public private(set) var mean: Tensor<Scalar>
    /// P (`[k, d]`) or Q (`[k, out]`).
    public private(set) var projection: Tensor<Scalar>
    /// S (EigenNet: `[out, out]`).
    public private(set) var gradientWhitening: Tensor<Scalar>?
    /// μₓ and Σₓ (GWNN).
    public private(set) var inputMean: Tensor<Scalar>?
    /// Σₓ (GWNN).
    public private(set) var inputCovariance: Tensor<Scalar>?
    /// Training forward calls so far (the whitening's update step).
    public private(set) var step = 0
    let name: String
    var lastInput: Tensor<Scalar>?
    var lastEffective: Tensor<Scalar>?
    var refreshedLastForward = false
    /// Velocity maps of the refreshes since the last optimiser step: v ← L·v·R per parameter.
    var pendingLeft: [String: Matrix] = [:]
    var pendingRight: [String: Matrix] = [:]

    /// Creates the map from a plain layer's initial weight (`[out, d]` values) and bias.
    /// - Throws: ``TrainingError/invalidSetting(name:value:requirement:)`` for bad settings or
    ///   a rank above the whitened dimension; ``LinearAlgebraError`` when LAPACK fails.
    public init(
        inputs: Int, outputs: Int, initialWeight: [Scalar], initialBias: [Scalar],
        settings: WhiteningSettings, name: String
    ) throws {
        try settings.validate()
        guard inputs >= 1, outputs >= 1, initialWeight.count == inputs * outputs,
            initialBias.count == outputs
        else {
            throw TrainingError.invalidSetting(
                name: name, value: "\(inputs)→\(outputs)",
                requirement: "positive sizes and an [out, in] initial weight")
        }
        let whitened = settings.kind == .gwnn ? outputs : inputs
        let k = settings.rank ?? whitened
        guard k <= whitened else {
            throw TrainingError.invalidSetting(
                name: "whitening rank", value: "\(k)",
                requirement: "at most the whitened dimension \(whitened) of \(name)")
        }
        if settings.kind == .eigennet, let r = settings.gradientRank, r > outputs {
            throw TrainingError.invalidSetting(
                name: "gradient whitening rank", value: "\(r)",
                requirement: "at most the \(outputs) outputs of \(name)")
        }
        self.settings = settings
        self.inputs = inputs
        self.outputs = outputs
        self.rank = k
        self.name = name
        let w0 = Matrix(rows: outputs, cols: inputs, values: initialWeight.map { Double($0) })
        bias = Parameter(name: name + ".bias", value: Tensor(initialBias))
        switch settings.kind {
        case .wnn, .eigennet:
            // P = I (k = d), or the k leading right singular directions of W₀ (unit scale).
            var p = Matrix(rows: k, cols: inputs)
            if k == inputs {
                p = Matrix.identity(inputs)
            } else {
                let (_, vectors) = try Matrix.product(w0, w0, transposeA: true).symmetricEigen()
                for r in 0..<k { for j in 0..<inputs { p[r, j] = vectors[j, inputs - 1 - r] } }
            }
            weight = Parameter(
                name: name + ".weight",
                value: try WhiteningAlgebra.tensor(
                    Matrix.product(w0, p, transposeB: true), shape: [outputs, k]))
            mix = nil
            mean = try Tensor(zeros: [inputs])
            projection = try WhiteningAlgebra.tensor(p, shape: [k, inputs])
            if settings.kind == .eigennet {
                gradientWhitening = try WhiteningAlgebra.tensor(
                    Matrix.identity(outputs), shape: [outputs, outputs])
            }
        case .gwnn:
            // Q from Σ_z = W₀·W₀ᵀ (a white input's output covariance), A = Q⁺.
            let (q, inverse) = try WhiteningAlgebra.whitening(
                Matrix.product(w0, w0, transposeB: true), rank: k, epsilon: settings.epsilon)
            weight = Parameter(
                name: name + ".weight",
                value: try WhiteningAlgebra.tensor(w0, shape: [outputs, inputs]))
            mix = Parameter(
                name: name + ".mix",
                value: try WhiteningAlgebra.tensor(inverse, shape: [outputs, k]))
            mean = try Tensor(zeros: [outputs])
            projection = try WhiteningAlgebra.tensor(q, shape: [k, outputs])
            inputMean = try Tensor(zeros: [inputs])
            inputCovariance = try WhiteningAlgebra.tensor(
                Matrix.identity(inputs), shape: [inputs, inputs])
        }
    }

    /// The trainable parameters: V (or W, A) and b.
    public var parameters: [Parameter<Scalar>] { [weight] + (mix.map { [$0] } ?? []) + [bias] }

    // MARK: - Effective map

    /// W_eff `[out, d]` and b_eff `[out]` of the current parameters and whitening.
    public func effective() -> (weight: Matrix, bias: [Double]) {
        let p = WhiteningAlgebra.matrix(
            projection, rows: projection.shape[0], cols: projection.shape[1])
        let b = bias.value.scalars.map { Double($0) }
        let mu = mean.scalars.map { Double($0) }
        switch settings.kind {
        case .wnn, .eigennet:
            var vp = WhiteningAlgebra.matrix(weight.value, rows: outputs, cols: rank) * p
            if let s = gradientWhitening {
                vp = WhiteningAlgebra.matrix(s, rows: outputs, cols: outputs) * vp
            }
            let shift = WhiteningAlgebra.apply(vp, mu)
            return (vp, zip(b, shift).map { $0 - $1 })
        case .gwnn:
            let aq = WhiteningAlgebra.matrix(mix!.value, rows: outputs, cols: rank) * p
            let w = WhiteningAlgebra.matrix(weight.value, rows: outputs, cols: inputs)
            let shift = WhiteningAlgebra.apply(aq, mu)
            return (aq * w, zip(b, shift).map { $0 - $1 })
        }
    }

    // MARK: - Refresh

    /// Re-estimates the whitening from the rows of `x` (WNN, EigenNet; GWNN on its data steps)
    /// and re-expresses the parameters so that the function does not change.
    func refresh(_ x: Tensor<Scalar>, rows m: Int) throws {
        switch settings.kind {
        case .wnn, .eigennet:
            let (mu, sigma) = x.withUnsafeBufferPointer {
                WhiteningAlgebra.statistics(rows: $0, m: m, d: inputs)
            }
            try requireFinite(sigma.values, "the input of a whitening refresh")
            let (p, inverse) = try WhiteningAlgebra.whitening(
                sigma, rank: rank, epsilon: settings.epsilon)
            let old = WhiteningAlgebra.matrix(projection, rows: rank, cols: inputs)
            let change = old * inverse  // P·P′⁺, k×k
            var v = WhiteningAlgebra.matrix(weight.value, rows: outputs, cols: rank)
            // b′ = b + S·V·P·(μ′ − μ)
            var front = v * old
            if let s = gradientWhitening {
                front = WhiteningAlgebra.matrix(s, rows: outputs, cols: outputs) * front
            }
            let delta = zip(mu, mean.scalars).map { $0 - Double($1) }
            let shift = WhiteningAlgebra.apply(front, delta)
            v = v * change
            weight.value = try WhiteningAlgebra.tensor(v, shape: [outputs, rank])
            bias.value = try Tensor(
                shape: [outputs],
                rounding: zip(bias.value.scalars, shift).map { Double($0) + $1 })
            mean = try Tensor(shape: [inputs], rounding: mu)
            projection = try WhiteningAlgebra.tensor(p, shape: [rank, inputs])
            composeRight(weight.name, change)
        case .gwnn:
            if step % settings.effectiveDataPeriod == 0 {
                let (mu, sigma) = x.withUnsafeBufferPointer {
                    WhiteningAlgebra.statistics(rows: $0, m: m, d: inputs)
                }
                try requireFinite(sigma.values, "the input of a whitening refresh")
                inputMean = try Tensor(shape: [inputs], rounding: mu)
                inputCovariance = try WhiteningAlgebra.tensor(sigma, shape: [inputs, inputs])
            }
            let w = WhiteningAlgebra.matrix(weight.value, rows: outputs, cols: inputs)
            try requireFinite(w.values, "the weight W")
            let sigmaX = WhiteningAlgebra.matrix(inputCovariance!, rows: inputs, cols: inputs)
            let nu = WhiteningAlgebra.apply(w, inputMean!.scalars.map { Double($0) })
            let sigmaZ = Matrix.product(w * sigmaX, w, transposeB: true)
            let (q, inverse) = try WhiteningAlgebra.whitening(
                sigmaZ, rank: rank, epsilon: settings.epsilon)
            let old = WhiteningAlgebra.matrix(projection, rows: rank, cols: outputs)
            var a = WhiteningAlgebra.matrix(mix!.value, rows: outputs, cols: rank)
            let delta = zip(nu, mean.scalars).map { $0 - Double($1) }
            let shift = WhiteningAlgebra.apply(a * old, delta)
            let change = old * inverse
            a = a * change
            mix!.value = try WhiteningAlgebra.tensor(a, shape: [outputs, rank])
            bias.value = try Tensor(
                shape: [outputs],
                rounding: zip(bias.value.scalars, shift).map { Double($0) + $1 })
            mean = try Tensor(shape: [outputs], rounding: nu)
            projection = try WhiteningAlgebra.tensor(q, shape: [rank, outputs])
            composeRight(mix!.name, change)
        }
    }

    /// EigenNet: re-estimates S from the output gradient rows `g` (`[m, out]`) and re-expresses V.
    func refreshGradientWhitening(_ g: Tensor<Scalar>, rows m: Int) throws {
        guard let s = gradientWhitening else { return }
        var scaled = Matrix(
            rows: m, cols: outputs, values: g.scalars.map { Double($0) * Double(m) })
        let inverseRows = 1 / Double(max(m, 1)).squareRoot()
        for i in scaled.values.indices { scaled.values[i] *= inverseRows }
        let sigma = Matrix.product(scaled, scaled, transposeA: true)
        try requireFinite(sigma.values, "the output gradient of a whitening refresh")
        let (values, vectors) = try sigma.symmetricEigen()
        let clamped = values.map { max($0, 0) }
        let meanValue = clamped.reduce(0, +) / Double(outputs)
        let damping = settings.gradientDamping * max(meanValue, Double.leastNormalMagnitude)
        let r = settings.gradientRank ?? outputs
        // Ascending order: the r leading eigenvalues are the last r; the others take the r-th.
        let floor = clamped[outputs - r]
        var newS = Matrix(rows: outputs, cols: outputs)
        var newInverse = Matrix(rows: outputs, cols: outputs)
        let gain = settings.preservesGradientScale ? (meanValue + damping).squareRoot() : 1
        for c in 0..<outputs {
            let lambda = (c < outputs - r ? floor : clamped[c]) + damping
            let (down, up) = (gain / lambda.squareRoot(), lambda.squareRoot() / gain)
            for i in 0..<outputs {
                for j in 0..<outputs {
                    let uu = vectors[i, c] * vectors[j, c]
                    newS.values[i * outputs + j] += down * uu
                    newInverse.values[i * outputs + j] += up * uu
                }
            }
        }
        let change = newInverse * WhiteningAlgebra.matrix(s, rows: outputs, cols: outputs)
        let v = change * WhiteningAlgebra.matrix(weight.value, rows: outputs, cols: rank)
        weight.value = try WhiteningAlgebra.tensor(v, shape: [outputs, rank])
        gradientWhitening = try WhiteningAlgebra.tensor(newS, shape: [outputs, outputs])
        pendingLeft[weight.name] = pendingLeft[weight.name].map { change * $0 } ?? change
    }

    /// Refuses NaN or infinite statistics before LAPACK sees them (a diverged run reaches the
    /// refresh before its loss is computed).
    /// - Throws: ``TrainingError/diverged(layer:what:)``.
    func requireFinite(_ values: [Double], _ what: String) throws(TrainingError) {
        guard values.allSatisfy({ $0.isFinite }) else {
            throw .diverged(layer: name, what: what)
        }
    }

    func composeRight(_ name: String, _ change: Matrix) {
        pendingRight[name] = pendingRight[name].map { $0 * change } ?? change
    }

    // MARK: - Forward and backward

    /// y `[m, out]` from x `[m, d]`; a training call on a refresh step re-estimates first.
    public func forward(rows x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard x.rank == 2, x.shape[1] == inputs, x.shape[0] >= 1 else {
            throw TrainingError.shape(layer: name, expected: "[m ≥ 1, \(inputs)]", actual: x.shape)
        }
        let m = x.shape[0]
        refreshedLastForward = false
        if mode == .training {
            if step % settings.period == 0 {
                try refresh(x, rows: m)
                refreshedLastForward = true
            }
            step += 1
        }
        let (w, b) = effective()
        let weightScalars: Tensor<Scalar> = try WhiteningAlgebra.tensor(
            w, shape: [outputs, inputs])
        let biasScalars = b.map { Scalar($0) }
        var y = try Tensor<Scalar>(zeros: [m, outputs])
        let (d, out) = (inputs, outputs)
        x.withUnsafeBufferPointer { xp in
            weightScalars.withUnsafeBufferPointer { wp in
                y.withUnsafeMutableBufferPointer { yp in
                    BLAS.gemm(
                        transposeA: false, transposeB: true, m: m, n: out, k: d, xp.baseAddress!,
                        lda: d, wp.baseAddress!, ldb: d, yp.baseAddress!, ldc: out)
                    for i in 0..<m { for j in 0..<out { yp[i * out + j] += biasScalars[j] } }
                }
            }
        }
        lastInput = x
        lastEffective = weightScalars
        return y
    }

    /// dL/dx `[m, d]` from dL/dy `[m, out]`, adding the parameters' gradients (EigenNet first
    /// re-estimates S on a refresh step).
    public func backward(rows g: Tensor<Scalar>) throws -> Tensor<Scalar> {
        guard let x = lastInput, let weightScalars = lastEffective else {
            throw TrainingError.noForward(layer: name)
        }
        let m = x.shape[0]
        guard g.shape == [m, outputs] else {
            throw TrainingError.shape(
                layer: name, expected: "dy [\(m), \(outputs)]", actual: g.shape)
        }
        if refreshedLastForward && settings.kind == .eigennet {
            try refreshGradientWhitening(g, rows: m)
            refreshedLastForward = false
        }
        let (d, out) = (inputs, outputs)
        var gx = try Tensor<Scalar>(zeros: [out, d])
        var dx = try Tensor<Scalar>(zeros: [m, d])
        g.withUnsafeBufferPointer { gp in
            x.withUnsafeBufferPointer { xp in
                gx.withUnsafeMutableBufferPointer { op in
                    // gᵀ·x
                    BLAS.gemm(
                        transposeA: true, transposeB: false, m: out, n: d, k: m, gp.baseAddress!,
                        lda: out, xp.baseAddress!, ldb: d, op.baseAddress!, ldc: d)
                }
            }
            weightScalars.withUnsafeBufferPointer { wp in
                dx.withUnsafeMutableBufferPointer { dp in
                    // dx = g·W_eff
                    BLAS.gemm(
                        transposeA: false, transposeB: false, m: m, n: d, k: out, gp.baseAddress!,
                        lda: out, wp.baseAddress!, ldb: d, dp.baseAddress!, ldc: d)
                }
            }
        }
        var gsum = [Double](repeating: 0, count: out)
        for i in 0..<m { for j in 0..<out { gsum[j] += Double(g[flat: i * out + j]) } }
        let big = WhiteningAlgebra.matrix(gx, rows: out, cols: d)
        let p = WhiteningAlgebra.matrix(
            projection, rows: projection.shape[0], cols: projection.shape[1])
        let mu = mean.scalars.map { Double($0) }
        switch settings.kind {
        case .wnn, .eigennet:
            // D = gᵀ·(x − μ);  dV = [Sᵀ]·D·Pᵀ
            var centred = big
            for i in 0..<out { for j in 0..<d { centred[i, j] -= gsum[i] * mu[j] } }
            var left = centred
            if let s = gradientWhitening {
                left = Matrix.product(
                    WhiteningAlgebra.matrix(s, rows: out, cols: out), centred, transposeA: true)
            }
            try accumulate(weight, Matrix.product(left, p, transposeB: true))
        case .gwnn:
            // dA = (gᵀx·Wᵀ − gsum·νᵀ)·Qᵀ;  dW = (A·Q)ᵀ·gᵀx
            let w = WhiteningAlgebra.matrix(weight.value, rows: out, cols: d)
            var z = Matrix.product(big, w, transposeB: true)
            for i in 0..<out { for j in 0..<out { z[i, j] -= gsum[i] * mu[j] } }
            try accumulate(mix!, Matrix.product(z, p, transposeB: true))
            let aq = WhiteningAlgebra.matrix(mix!.value, rows: out, cols: rank) * p
            try accumulate(weight, Matrix.product(aq, big, transposeA: true))
        }
        bias.gradient = try bias.gradient + Tensor(shape: [out], rounding: gsum)
        return dx
    }

    func accumulate(_ p: Parameter<Scalar>, _ g: Matrix) throws {
        p.gradient = try p.gradient + WhiteningAlgebra.tensor(g, shape: p.value.shape)
    }

    // MARK: - Optimiser state and checkpoints

    /// Maps SGD's velocity of V (or A) into the coordinates of the refreshes since the last call
    /// (v ← L·v·R with the refreshes' matrices), then forgets them.
    public func carryOptimizerState(_ velocity: inout [String: Tensor<Scalar>]) throws {
        for p in parameters {
            let left = pendingLeft[p.name]
            let right = pendingRight[p.name]
            guard left != nil || right != nil, let v = velocity[p.name] else { continue }
            var mapped = WhiteningAlgebra.matrix(v, rows: p.value.shape[0], cols: p.value.shape[1])
            if let left { mapped = left * mapped }
            if let right { mapped = mapped * right }
            velocity[p.name] = try WhiteningAlgebra.tensor(mapped, shape: p.value.shape)
        }
        pendingLeft = [:]
        pendingRight = [:]
    }

    /// The whitening state, with its update step (two Float-exact 24-bit halves).
    public var buffers: [String: Tensor<Scalar>] {
        var b: [String: Tensor<Scalar>] = [
            name + ".whiten_mean": mean, name + ".whiten_projection": projection,
            name + ".whiten_step": Tensor([Scalar(step >> 24), Scalar(step & 0xFF_FFFF)]),
        ]
        if let gradientWhitening { b[name + ".grad_whitening"] = gradientWhitening }
        if let inputMean { b[name + ".whiten_input_mean"] = inputMean }
        if let inputCovariance { b[name + ".whiten_input_covariance"] = inputCovariance }
        return b
    }

    /// Restores ``buffers`` (every key of this layer; shapes and values checked).
    /// - Throws: ``TrainingError/checkpoint(_:)`` for a missing, misshapen or non-finite buffer.
    public func loadBuffers(_ stored: [String: Tensor<Scalar>]) throws {
        let current = buffers
        for (key, value) in current {
            guard let s = stored[key], s.shape == value.shape,
                s.scalars.allSatisfy({ $0.isFinite })
            else {
                throw TrainingError.checkpoint(
                    "buffer \(key) is missing, has the wrong shape or holds NaN or infinite values")
            }
        }
        let halves = stored[name + ".whiten_step"]!.scalars
        guard halves.allSatisfy({ $0 >= 0 && $0 < 16_777_216 && $0.rounded() == $0 }) else {
            throw TrainingError.checkpoint("buffer \(name).whiten_step is not a step count")
        }
        step = (Int(halves[0]) << 24) | Int(halves[1])
        mean = stored[name + ".whiten_mean"]!
        projection = stored[name + ".whiten_projection"]!
        if gradientWhitening != nil { gradientWhitening = stored[name + ".grad_whitening"] }
        if inputMean != nil { inputMean = stored[name + ".whiten_input_mean"] }
        if inputCovariance != nil { inputCovariance = stored[name + ".whiten_input_covariance"] }
    }
}
