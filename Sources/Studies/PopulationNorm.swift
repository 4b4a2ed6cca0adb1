import Foundation
import NormKit
import Training

/// Population normalization: BatchNorm that normalizes with its running (population)
/// statistics in training as well, so no gradient flows through the batch statistics.
///
/// ```
/// y = γ ⊙ (x − μ_pop) / √(σ²_pop + ε) + β
/// μ_pop ← (1 − m)·μ_pop + m·μ_B,   σ²_pop ← (1 − m)·σ²_pop + m·σ²_B (unbiased)
/// ```
/// The population statistics are updated from the batch before it is normalized (so the first
/// batches are not normalized by the initial μ = 0, σ² = 1 alone), and treated as constants by
/// backward: `dx = dy ⊙ γ / √(σ²_pop + ε)`. Luo et al. (ICLR 2019, arXiv:1809.00846) show BN
/// ≈ PN plus an adaptive penalty on γ; ``RegularizationStudy`` tests that.
///
/// ## Shape
/// `[N, C, H, W]` → the same.
final class PopulationNorm: Module {
    let weight: Parameter<Float>
    let bias: Parameter<Float>
    var runningMean: [Double]
    var runningVariance: [Double]
    let momentum: Double
    let epsilon = 1e-5
    let channels: Int
    var lastXhat: Tensor<Float>?
    /// When set, every backward pass updates ``zeta`` for BN's batch noise at this batch size M.
    var zetaBatchSize: Int?
    /// The estimated γ-decay strength ζ(h) of each channel (normalizers-spec section 9), a
    /// running average over training steps (nil before the first estimate).
    var zeta: [Double]?

    /// One step's estimate of ζ(h) per channel, from the normalized values n̄ = (h − μ_P)/σ_P and
    /// dy = ∂L/∂y of the batch-mean loss L over `n` samples.
    ///
    /// BN's batch statistics perturb every position of a sample's channel alike, so sample i's
    /// output moves by Δy = −γ·(δμ + n̄·δσ)/σ_P with δμ/σ_P ~ N(0, 1/M) and
    /// δσ/σ_P ~ N(0, (ρ + 2)/(4M)) (ρ the excess kurtosis of h). With the Hessian of sample i's
    /// loss ℓ_i in y replaced by its outer-product (Fisher) estimate g_i g_iᵀ, g_i = n·dy_i, the
    /// expected second-order loss increase is ζ·γ² with
    /// ζ = 1/(2M)·mean_i a_i² + (ρ + 2)/(8M)·mean_i b_i², a_i = Σ_p g_ip, b_i = Σ_p n̄_p·g_ip:
    /// the spec's ζ(h) with loss'' estimated by the squared gradient (the two coincide for one
    /// position per sample).
    static func estimateZeta(
        normalized: UnsafeBufferPointer<Float>, dy: UnsafeBufferPointer<Float>, n: Int,
        channels: Int, positions l: Int, batchSize m: Int
    ) -> [Double] {
        let scale = Double(n)
        return (0..<channels).map { c in
            var (sumA2, sumB2, m2, m4) = (0.0, 0.0, 0.0, 0.0)
            for s in 0..<n {
                let base = (s * channels + c) * l
                var (a, b) = (0.0, 0.0)
                for i in base..<(base + l) {
                    let g = scale * Double(dy[i])
                    let v = Double(normalized[i])
                    a += g
                    b += v * g
                    m2 += v * v
                    m4 += v * v * v * v
                }
                sumA2 += a * a
                sumB2 += b * b
            }
            let count = Double(n * l)
            let variance = m2 / count
            let kurtosis = variance > 0 ? (m4 / count) / (variance * variance) - 3 : 0
            let rho = max(kurtosis, -2)  // ρ + 2 = E[n̄⁴]/E[n̄²]² − 1 ≥ 0
            return (sumA2 / Double(n)) / (2 * Double(m))
                + (rho + 2) / (8 * Double(m)) * (sumB2 / Double(n))
        }
    }

    init(channels: Int, name: String, momentum: Double = 0.1) throws {
        self.channels = channels
        self.momentum = momentum
        weight = Parameter(
            name: name + ".weight", value: try Tensor(repeating: 1, shape: [channels]),
            group: "norm")
        bias = Parameter(name: name + ".bias", value: try Tensor(zeros: [channels]), group: "norm")
        runningMean = Array(repeating: 0, count: channels)
        runningVariance = Array(repeating: 1, count: channels)
    }

    var parameters: [Parameter<Float>] { [weight, bias] }

    var buffers: [String: Tensor<Float>] {
        [
            weight.name.replacingOccurrences(of: ".weight", with: ".running_mean"): Tensor(
                runningMean.map(Float.init)),
            weight.name.replacingOccurrences(of: ".weight", with: ".running_var"): Tensor(
                runningVariance.map(Float.init)),
        ]
    }

    func loadBuffers(_ b: [String: Tensor<Float>]) throws {
        let prefix = weight.name.replacingOccurrences(of: ".weight", with: "")
        guard let m = b[prefix + ".running_mean"], let v = b[prefix + ".running_var"],
            m.count == channels, v.count == channels
        else { throw TrainingError.checkpoint("missing \(prefix) population statistics") }
        runningMean = m.scalars.map(Double.init)
        runningVariance = v.scalars.map(Double.init)
    }

    func forward(_ x: Tensor<Float>, mode: Mode) throws -> Tensor<Float> {
        guard x.rank == 4, x.shape[1] == channels else {
            throw TrainingError.shape(
                layer: "PopulationNorm", expected: "[N, \(channels), H, W]", actual: x.shape)
        }
        let (n, l) = (x.shape[0], x.shape[2] * x.shape[3])
        if mode == .training {
            let xs = x.scalars
            let count = Double(n * l)
            for c in 0..<channels {
                var sum = 0.0
                for s in 0..<n { for i in 0..<l { sum += Double(xs[(s * channels + c) * l + i]) } }
                let mean = sum / count
                var sq = 0.0  // two-pass variance
                for s in 0..<n {
                    for i in 0..<l {
                        let d = Double(xs[(s * channels + c) * l + i]) - mean
                        sq += d * d
                    }
                }
                let unbiased = sq / max(count - 1, 1)
                runningMean[c] = (1 - momentum) * runningMean[c] + momentum * mean
                runningVariance[c] = (1 - momentum) * runningVariance[c] + momentum * unbiased
            }
        }
        var y = x
        var xhat = x
        let g = weight.value.scalars
        let b = bias.value.scalars
        let (mean, variance, epsilon, channels) = (runningMean, runningVariance, epsilon, channels)
        y.withUnsafeMutableBufferPointer { yp in
            xhat.withUnsafeMutableBufferPointer { hp in
                for c in 0..<channels {
                    let mu = Float(mean[c])
                    let rstd = Float(1 / (variance[c] + epsilon).squareRoot())
                    for s in 0..<n {
                        let base = (s * channels + c) * l
                        for i in base..<(base + l) {
                            let h = (hp[i] - mu) * rstd
                            hp[i] = h
                            yp[i] = g[c] * h + b[c]
                        }
                    }
                }
            }
        }
        lastXhat = xhat
        return y
    }

    func backward(_ dy: Tensor<Float>) throws -> Tensor<Float> {
        guard let xhat = lastXhat, xhat.shape == dy.shape else {
            throw TrainingError.noForward(layer: "PopulationNorm")
        }
        let (n, l) = (dy.shape[0], dy.shape[2] * dy.shape[3])
        var dx = dy
        var dg = [Float](repeating: 0, count: channels)
        var db = [Float](repeating: 0, count: channels)
        let g = weight.value.scalars
        let (variance, epsilon, channels) = (runningVariance, epsilon, channels)
        xhat.withUnsafeBufferPointer { hp in
            dx.withUnsafeMutableBufferPointer { d in
                for c in 0..<channels {
                    let scale = Float(Double(g[c]) / (variance[c] + epsilon).squareRoot())
                    var sg: Float = 0
                    var sb: Float = 0
                    for s in 0..<n {
                        let base = (s * channels + c) * l
                        for i in base..<(base + l) {
                            sg += d[i] * hp[i]
                            sb += d[i]
                            d[i] *= scale
                        }
                    }
                    dg[c] = sg
                    db[c] = sb
                }
            }
        }
        if let m = zetaBatchSize {
            let step = xhat.withUnsafeBufferPointer { hp in
                dy.withUnsafeBufferPointer { dp in
                    Self.estimateZeta(
                        normalized: hp, dy: dp, n: n, channels: channels, positions: l,
                        batchSize: m)
                }
            }
            zeta = zeta.map { old in zip(old, step).map { 0.9 * $0 + 0.1 * $1 } } ?? step
        }
        weight.gradient = try weight.gradient + Tensor(dg)
        bias.gradient = try bias.gradient + Tensor(db)
        return dx
    }
}

/// The harness convnet (conv-norm-ReLU ×2, max-pool, conv-norm-ReLU, global average pool,
/// linear) with any normalization module, for studies whose normalizer is not in the registry.
enum StudyNetwork {
    static func convnet(
        inputShape: [Int], classes: Int, width: Int, seed: UInt64,
        norm: (Int, String) throws -> AnyModule<Float>
    ) throws -> Sequential<Float> {
        try Models.convnet(
            inputShape: inputShape, classes: classes, width: width, seed: seed, norm: norm)
    }

    static func evaluate(_ model: Sequential<Float>, _ data: Dataset<Float>) throws -> (
        loss: Double, error: Double
    ) {
        var total = 0.0
        var correct = 0
        var start = 0
        while start < data.count {
            let end = min(data.count, start + 256)
            let (x, labels) = try data.batch(Array(start..<end)[...])
            let (loss, _, right) = try SoftmaxCrossEntropy.evaluate(
                try model.forward(x, mode: .inference), labels: labels)
            total += loss * Double(end - start)
            correct += right
            start = end
        }
        return (total / Double(data.count), 1 - Double(correct) / Double(data.count))
    }
}
