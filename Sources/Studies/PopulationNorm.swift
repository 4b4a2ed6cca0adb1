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
        let xs = x.scalars
        if mode == .training {
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
        for c in 0..<channels {
            let mean = runningMean[c]
            let rstd = 1 / (runningVariance[c] + epsilon).squareRoot()
            for s in 0..<n {
                for i in 0..<l {
                    let k = (s * channels + c) * l + i
                    let h = Float((Double(xs[k]) - mean) * rstd)
                    xhat[flat: k] = h
                    y[flat: k] = g[c] * h + b[c]
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
        for c in 0..<channels {
            let scale = Float(Double(g[c]) / (runningVariance[c] + epsilon).squareRoot())
            for s in 0..<n {
                for i in 0..<l {
                    let k = (s * channels + c) * l + i
                    let d = dy[flat: k]
                    dg[c] += d * xhat[flat: k]
                    db[c] += d
                    dx[flat: k] = d * scale
                }
            }
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
        var g = SeededGenerator(seed: seed)
        let c = inputShape[0]
        return Sequential(
            try Conv2d<Float>(
                c, width, kernel: 3, padding: 1, bias: false, name: "conv1", generator: &g
            )
            .erased,
            try norm(width, "norm1"), ReLU<Float>().erased,
            try Conv2d<Float>(
                width, 2 * width, kernel: 3, padding: 1, bias: false, name: "conv2", generator: &g
            ).erased,
            try norm(2 * width, "norm2"), ReLU<Float>().erased,
            Pool2d<Float>(.max, size: 2).erased,
            try Conv2d<Float>(
                2 * width, 2 * width, kernel: 3, padding: 1, bias: false, name: "conv3",
                generator: &g
            ).erased,
            try norm(2 * width, "norm3"), ReLU<Float>().erased,
            GlobalAveragePool<Float>().erased,
            try Linear<Float>(2 * width, classes, name: "fc", generator: &g).erased)
    }

    /// Loss and error rate in inference mode.
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
