import Foundation
import NormKit
import Training

/// Whitened layers against natural gradient descent, measured with the exact Fisher.
///
/// GWNN (Luo, ICML 2017) and WNN (Desjardins et al. 2015) whiten a layer's input so that SGD on
/// the reparametrized layer behaves like natural gradient descent; EigenNet (Luo, IJCAI 2017)
/// also whitens the back-propagated gradient, so that both Kronecker factors of the layer's
/// Fisher block are ≈ I. On an MLP small enough for the exact empirical Fisher of each layer
/// (`d → hidden → ReLU → 10`, inputs average-pooled to 7×7), at regular steps of training:
///
/// - the cosine between the step SGD takes on each layer's own parameters, mapped back to the
///   change of the layer's affine map (W_eff, b_eff) in the coordinates of its input x, and the
///   exact damped natural gradient (F + λI)⁻¹ḡ of (W_eff, b_eff) on the same batch;
/// - the condition number of the layer's Fisher block in those coordinates and in the layer's
///   own (whitened) coordinates;
///
/// then the loss against steps and against wall time, over seeds. See ``Fisher`` for the
/// definitions and ``DenseLayer`` for the layers.
public enum NGDStudy {
    /// The study's sizes.
    struct Plan {
        var trainCount: Int?
        var testCount: Int?
        var steps: Int
        var probeEvery: Int
        var probeSize: Int
        var hidden: Int
        var batchSize = 64
        var learningRate = 0.1
        var damping = 1e-3
        var period = 10

        init(_ o: StudyOptions) {
            if o.isQuick {
                (trainCount, testCount) = (10_000, 2_000)
                (steps, probeEvery, probeSize, hidden) = (500, 50, 1024, 16)
            } else {
                (trainCount, testCount) = (nil, nil)
                (steps, probeEvery, probeSize, hidden) = (3000, 150, 2048, 24)
            }
            trainCount = o.trainCount ?? trainCount
            testCount = o.testCount ?? testCount
            if let e = o.epochs { steps = max(1, e * 10_000 / batchSize) }
        }
    }

    /// Images `[N, 1, H, W]` as rows of `(H/f)·(W/f)` pixels averaged over f×f blocks (f = H/7
    /// when 7 divides H, else 1), in Double.
    static func pooledRows(_ images: Tensor<Float>) throws -> (Tensor<Double>, Int) {
        let (n, h, w) = (images.shape[0], images.shape[2], images.shape[3])
        let f = h > 7 && h % 7 == 0 && w % 7 == 0 ? h / 7 : 1
        let (ph, pw) = (h / f, w / f)
        let d = ph * pw
        var out = [Double](repeating: 0, count: n * d)
        let scale = 1 / Double(f * f)
        images.withUnsafeBufferPointer { p in
            for s in 0..<n {
                for i in 0..<h {
                    for j in 0..<w {
                        out[s * d + (i / f) * pw + j / f] += Double(p[(s * h + i) * w + j]) * scale
                    }
                }
            }
        }
        return (try Tensor(shape: [n, d], scalars: out), d)
    }

    /// Rows `indices` of `x` `[N, d]`.
    static func rows(_ x: Tensor<Double>, _ indices: ArraySlice<Int>) throws -> Tensor<Double> {
        let d = x.shape[1]
        var out: [Double] = []
        out.reserveCapacity(indices.count * d)
        x.withUnsafeBufferPointer { p in
            for i in indices { out.append(contentsOf: p[(i * d)..<((i + 1) * d)]) }
        }
        return try Tensor(shape: [indices.count, d], scalars: out)
    }

    /// The data: Fashion-MNIST when installed (digits otherwise, or when asked).
    static func data(_ o: StudyOptions, _ plan: Plan) throws -> (
        train: Dataset<Float>, test: Dataset<Float>, name: String
    ) {
        var c = TrainingConfig()
        c.dataset = o.dataset
        c.trainCount = plan.trainCount
        c.testCount = plan.testCount
        c.seed = 1
        do {
            let s = try Datasets.split(for: c)
            return (s.train, s.test, o.dataset)
        } catch DatasetError.missing {
            c.dataset = "digits"
            let s = try Datasets.split(for: c)
            return (s.train, s.test, "digits (Fashion-MNIST is not installed)")
        }
    }

    /// One training run's record.
    struct Run {
        var steps: [Int] = []
        var seconds: [Double] = []
        var losses: [Double] = []
        /// The probes, indexed [probe][layer].
        var probes: [[LayerProbe]] = []
        var testAccuracy = Double.nan
        var diverged = false
    }

    /// Trains one network, probing it every `plan.probeEvery` steps.
    static func train(
        _ method: Method, seed: Int, plan: Plan, inputs: Int, train: Dataset<Float>,
        x: Tensor<Double>, probeX: Tensor<Double>, probeLabels: [Int], testX: Tensor<Double>,
        testLabels: [Int]
    ) throws -> Run {
        let settings = WhiteningSettings(
            kind: .wnn, period: plan.period, preservesGradientScale: true)
        let net = try Network(
            method, inputs: inputs, hidden: plan.hidden, classes: train.classCount,
            whitening: settings, seed: UInt64(seed))
        var run = Run()
        var g = SeededGenerator(seed: UInt64(seed) &* 104_729)
        var order: [Int] = []
        var cursor = 0
        var elapsed = 0.0
        for step in 0...plan.steps {
            if step % plan.probeEvery == 0 || step == plan.steps {
                let loss = try net.evaluate(probeX, probeLabels).loss
                guard loss.isFinite else {
                    run.diverged = true
                    break
                }
                run.steps.append(step)
                run.seconds.append(elapsed)
                run.losses.append(loss)
                run.probes.append(
                    try probe(
                        net, probeX, probeLabels, learningRate: plan.learningRate,
                        damping: plan.damping))
            }
            if step == plan.steps { break }
            if cursor + plan.batchSize > order.count {
                order = Array(0..<train.count)
                order.shuffle(using: &g)
                cursor = 0
            }
            let batch = order[cursor..<(cursor + plan.batchSize)]
            cursor += plan.batchSize
            let xb = try rows(x, batch)
            let labels = batch.map { train.labels[$0] }
            let start = Date()
            _ = try net.step(xb, labels, learningRate: plan.learningRate)
            elapsed += Date().timeIntervalSince(start)
        }
        if !run.diverged {
            let correct = try net.evaluate(testX, testLabels).correct
            run.testAccuracy = Double(correct) / Double(max(testLabels.count, 1))
        }
        return run
    }
}
