import Foundation
import NormKit
import Training

extension NGDStudy {
    /// The networks compared: the same MLP with plain, batch-normalized or whitened layers.
    enum Method: String, CaseIterable, Sendable {
        case plain, bn, wnn, gwnn, eigennet

        /// The whitened layers' reparametrization (nil for plain and BN).
        var whitening: WhitenedLayerKind? {
            switch self {
            case .plain, .bn: return nil
            case .wnn: return .wnn
            case .gwnn: return .gwnn
            case .eigennet: return .eigennet
            }
        }

        /// Legend text.
        var label: String {
            switch self {
            case .plain: return "plain SGD"
            case .bn: return "BN"
            case .wnn: return "WNN"
            case .gwnn: return "GWNN"
            case .eigennet: return "EigenNet"
            }
        }
    }

    /// One dense layer of the MLP, `y = layer(x)`, in Double.
    ///
    /// Plain: `y = W·x + b`. BN: `y = BN(W·x + b)` with the batch's statistics. Whitened: a
    /// ``WhitenedLinear``. Every kind is, for the batch it last saw, one affine map
    /// `y = W_eff·x + b_eff` of its input x (``effective()``; BN's with that batch's mean and
    /// variance held fixed), and records the input rows x and the output gradient rows dL/dy of
    /// its last forward and backward call, from which the per-example gradients of the
    /// parameters of that map follow.
    final class DenseLayer {
        let method: Method
        let inputs: Int
        let outputs: Int
        let linear: Linear<Double>?
        let norm: NormSlot<Double>?
        let whitened: WhitenedLinear<Double>?
        /// The rows x `[m, d]` of the last forward call.
        var input = Matrix(rows: 0, cols: 0)
        /// dL/dy `[m, out]` of the last backward call (L the batch-mean loss).
        var outputGradient = Matrix(rows: 0, cols: 0)
        /// BN: dL/dz `[m, out]` at the normalizer's input.
        var preNormGradient = Matrix(rows: 0, cols: 0)
        /// PyTorch's BatchNorm ε (the registry's default).
        static let batchNormEpsilon = 1e-5

        /// A layer whose initial W, b are drawn as ``Linear`` draws them (the same for every
        /// method with the same generator state).
        init(
            _ method: Method, inputs: Int, outputs: Int, name: String,
            whitening: WhiteningSettings?, generator: inout SeededGenerator
        ) throws {
            self.method = method
            self.inputs = inputs
            self.outputs = outputs
            if let kind = method.whitening, var settings = whitening {
                settings.kind = kind
                whitened = try WhitenedLinear<Double>(
                    inputs, outputs, settings: settings, name: name, generator: &generator)
                linear = nil
                norm = nil
            } else {
                whitened = nil
                linear = try Linear<Double>(inputs, outputs, name: name, generator: &generator)
                norm =
                    method == .bn
                    ? try NormSlot<Double>(.bn, channels: outputs, name: name + "_bn") : nil
            }
        }

        /// The trainable parameters.
        var parameters: [Parameter<Double>] {
            if let whitened { return whitened.parameters }
            return (linear?.parameters ?? []) + (norm?.parameters ?? [])
        }

        /// Running statistics (BN) and whitening state.
        var buffers: [String: Tensor<Double>] {
            (norm?.buffers ?? [:]).merging(whitened?.buffers ?? [:]) { a, _ in a }
        }

        /// Restores ``buffers``.
        func loadBuffers(_ b: [String: Tensor<Double>]) throws {
            try norm?.loadBuffers(b)
            try whitened?.loadBuffers(b)
        }

        func forward(_ x: Tensor<Double>, mode: Mode) throws -> Tensor<Double> {
            input = Matrix(rows: x.shape[0], cols: inputs, values: x.scalars)
            if let whitened { return try whitened.forward(x, mode: mode) }
            let z = try linear!.forward(x, mode: mode)
            guard let norm else { return z }
            let m = x.shape[0]
            return try norm.forward(z.reshaped([m, outputs, 1, 1]), mode: mode).reshaped([
                m, outputs,
            ])
        }

        func backward(_ dy: Tensor<Double>) throws -> Tensor<Double> {
            let m = dy.shape[0]
            outputGradient = Matrix(rows: m, cols: outputs, values: dy.scalars)
            if let whitened { return try whitened.backward(dy) }
            var dz = dy
            if let norm {
                dz = try norm.backward(dy.reshaped([m, outputs, 1, 1])).reshaped([m, outputs])
                preNormGradient = Matrix(rows: m, cols: outputs, values: dz.scalars)
            }
            return try linear!.backward(dz)
        }

        /// W_eff `[out, d]` and b_eff of the current parameters (BN: with the mean and variance
        /// of W·x + b over the rows of the last input).
        func effective() -> (weight: Matrix, bias: [Double]) {
            if let whitened { return whitened.core.effective() }
            let w = Matrix(
                rows: outputs, cols: inputs, values: linear!.weight.plain!.value.scalars)
            let b = linear!.bias.value.scalars
            guard let norm else { return (w, b) }
            let z = Matrix.product(input, w, transposeB: true)
            let m = Double(max(input.rows, 1))
            var weight = w
            var bias = b
            let gamma = norm.parameters.first { $0.name.hasSuffix(".weight") }!.value.scalars
            let beta = norm.parameters.first { $0.name.hasSuffix(".bias") }!.value.scalars
            for j in 0..<outputs {
                var mean = 0.0
                for i in 0..<input.rows { mean += z[i, j] + b[j] }
                mean /= m
                var variance = 0.0
                for i in 0..<input.rows {
                    variance += (z[i, j] + b[j] - mean) * (z[i, j] + b[j] - mean)
                }
                let scale = gamma[j] / (variance / m + Self.batchNormEpsilon).squareRoot()
                for c in 0..<inputs { weight[j, c] = scale * w[j, c] }
                bias[j] = beta[j] + scale * (b[j] - mean)
            }
            return (weight, bias)
        }

        /// The per-example gradients of (W_eff, b_eff), one row each: `m·dyᵢ ⊗ [xᵢ, 1]`
        /// (row-major W_eff, then b_eff), from the last forward and backward call.
        func effectiveRows() -> Matrix {
            NGDStudy.outerRows(outputGradient, scale: Double(input.rows), input)
        }

        /// The inputs of the layer's own trainable weight, one row each, from the last forward
        /// call: plain and BN, x; WNN and EigenNet, the whitened P·(x − μ); GWNN, the input of A,
        /// Q·(W·x − ν).
        func ownInputs() -> Matrix {
            guard let core = whitened?.core else { return input }
            let p = Matrix(
                rows: core.projection.shape[0], cols: core.projection.shape[1],
                values: core.projection.scalars)
            let mu = core.mean.scalars
            var centred: Matrix
            switch core.settings.kind {
            case .wnn, .eigennet:
                centred = input
            case .gwnn:
                let w = Matrix(rows: outputs, cols: inputs, values: core.weight.value.scalars)
                centred = Matrix.product(input, w, transposeB: true)
            }
            for i in 0..<centred.rows { for j in 0..<centred.cols { centred[i, j] -= mu[j] } }
            return Matrix.product(centred, p, transposeB: true)
        }

        /// The gradients of the batch-mean loss at the output of the layer's own trainable
        /// weight, one row each, from the last backward call: plain, WNN and GWNN, dL/dy; BN,
        /// dL/dz at the normalizer's input; EigenNet, Sᵀ·dL/dy.
        func ownOutputGradients() -> Matrix {
            if method == .bn { return preNormGradient }
            guard let s = whitened?.core.gradientWhitening else { return outputGradient }
            // Row i of dy·S is (Sᵀ·dyᵢ)ᵀ.
            return Matrix.product(
                outputGradient, Matrix(rows: outputs, cols: outputs, values: s.scalars))
        }

        /// The per-example gradients of the layer's own trainable weight and bias, one row each,
        /// `m·ĝᵢ ⊗ [âᵢ, 1]` with âᵢ from ``ownInputs()`` and ĝᵢ from ``ownOutputGradients()``:
        /// plain (W, b), the effective rows; BN (W, b) through the normalizer (γ, β left out);
        /// WNN and EigenNet (V, b); GWNN (A, c) (W left out).
        func ownRows() -> Matrix {
            NGDStudy.outerRows(ownOutputGradients(), scale: Double(input.rows), ownInputs())
        }

        /// The rows `[âᵢ, 1]` whose second moment (1/m) Σᵢ [âᵢ, 1][âᵢ, 1]ᵀ is the input-side
        /// Kronecker factor of the own weight's Fisher block (K-FAC's A).
        func ownInputFactorRows() -> Matrix {
            let a = ownInputs()
            var out = Matrix(rows: a.rows, cols: a.cols + 1)
            for i in 0..<a.rows {
                for j in 0..<a.cols { out[i, j] = a[i, j] }
                out[i, a.cols] = 1
            }
            return out
        }
    }

    /// The MLP `d → hidden → ReLU → classes` of one method.
    final class Network {
        let layers: [DenseLayer]
        let relu = ReLU<Double>()

        init(
            _ method: Method, inputs: Int, hidden: Int, classes: Int,
            whitening: WhiteningSettings, seed: UInt64
        ) throws {
            var g = SeededGenerator(seed: seed)
            layers = [
                try DenseLayer(
                    method, inputs: inputs, outputs: hidden, name: "fc1", whitening: whitening,
                    generator: &g),
                // BN normalizes the hidden layer only; the classifier stays affine.
                try DenseLayer(
                    method == .bn ? .plain : method, inputs: hidden, outputs: classes,
                    name: "fc2", whitening: whitening, generator: &g),
            ]
        }

        var parameters: [Parameter<Double>] { layers.flatMap(\.parameters) }
        var buffers: [String: Tensor<Double>] {
            layers.reduce(into: [:]) { $0.merge($1.buffers) { a, _ in a } }
        }

        func loadBuffers(_ b: [String: Tensor<Double>]) throws {
            for l in layers { try l.loadBuffers(b) }
        }

        /// Loss, gradients of every parameter (accumulated from zero) and the layers' records.
        func lossAndGradients(_ x: Tensor<Double>, _ labels: [Int], mode: Mode) throws -> Double {
            for p in parameters { p.zeroGradient() }
            let h = try relu.forward(layers[0].forward(x, mode: mode), mode: mode)
            let logits = try layers[1].forward(h, mode: mode)
            let (loss, dLogits, _) = try SoftmaxCrossEntropy.evaluate(logits, labels: labels)
            _ = try layers[0].backward(relu.backward(layers[1].backward(dLogits)))
            return loss
        }

        /// Loss and correct count in inference mode.
        func evaluate(_ x: Tensor<Double>, _ labels: [Int]) throws -> (loss: Double, correct: Int) {
            let h = try relu.forward(layers[0].forward(x, mode: .inference), mode: .inference)
            let (loss, _, correct) = try SoftmaxCrossEntropy.evaluate(
                layers[1].forward(h, mode: .inference), labels: labels)
            return (loss, correct)
        }

        /// One step of SGD without momentum: W ← W − η·∇W for every trainable parameter (the
        /// whitened layers' refresh bookkeeping is cleared; there is no velocity to carry).
        func step(_ x: Tensor<Double>, _ labels: [Int], learningRate: Double) throws -> Double {
            let loss = try lossAndGradients(x, labels, mode: .training)
            var noVelocity: [String: Tensor<Double>] = [:]
            for l in layers { try l.whitened?.core.carryOptimizerState(&noVelocity) }
            for p in parameters { try NGDStudy.descend(p, learningRate) }
            return loss
        }
    }

    /// p ← p − η·∇p.
    static func descend(_ p: Parameter<Double>, _ eta: Double) throws {
        p.value = try Tensor(
            shape: p.value.shape,
            scalars: zip(p.value.scalars, p.gradient.scalars).map { $0 - eta * $1 })
    }

    /// Rows `scale·gᵢ ⊗ [aᵢ, 1]` (`[m, out·(k + 1)]`): the per-example gradients of a weight
    /// `[out, k]` and bias acting on inputs aᵢ, from the rows gᵢ of the batch-mean loss's
    /// output gradient (`scale` = m turns them into per-example gradients).
    static func outerRows(_ g: Matrix, scale: Double, _ a: Matrix) -> Matrix {
        let (m, out, k) = (a.rows, g.cols, a.cols)
        var rows = Matrix(rows: m, cols: out * (k + 1))
        let width = out * (k + 1)
        for i in 0..<m {
            for o in 0..<out {
                let gi = scale * g[i, o]
                let base = i * width + o * (k + 1)
                for j in 0..<k { rows.values[base + j] = gi * a[i, j] }
                rows.values[base + k] = gi
            }
        }
        return rows
    }
}
