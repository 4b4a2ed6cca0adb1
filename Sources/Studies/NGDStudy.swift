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
///   own (whitened) coordinates, and of its input-side Kronecker factor;
///
/// then the loss against steps and against wall time, over seeds. Each method trains at its own
/// rate, chosen from a grid by pilot runs on seeds that are not reported (``pilot(_:plan:data:)``,
/// ``chooseRate(_:rates:)``): the whitened networks diverge at rates plain SGD needs. A run whose
/// loss or whitening statistics stop being finite is recorded as diverged, not thrown. See
/// ``Fisher`` for the definitions and ``DenseLayer`` for the layers.
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
        /// The grid each method's learning rate is chosen from (see ``chooseRate(_:rates:)``).
        var rates = [1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002]
        /// The seeds of the pilot runs that choose the rates (not reported seeds 1…K).
        var pilotSeeds = [1001, 1002]
        var damping = 1e-3
        var period = 10

        init(_ o: StudyOptions) {
            if o.isQuick {
                (trainCount, testCount) = (10_000, 2_000)
                (steps, probeEvery, probeSize, hidden) = (1000, 100, 1024, 16)
            } else {
                (trainCount, testCount) = (nil, nil)
                (steps, probeEvery, probeSize, hidden) = (3000, 150, 2048, 24)
            }
            trainCount = o.trainCount ?? trainCount
            testCount = o.testCount ?? testCount
            if let e = o.epochs { steps = max(1, e * 10_000 / batchSize) }
            probeEvery = max(1, min(probeEvery, steps))
        }

        /// ε of the whitening, relative to the mean eigenvalue (the library's default).
        var epsilon = 1e-3

        /// The whitened layers' settings: every layer whitened in full, refreshed every T steps
        /// (GWNN's data pass every 10·T), EigenNet's S scale-preserving as in `normkit train`.
        var whitening: WhiteningSettings {
            WhiteningSettings(
                kind: .wnn, period: period, epsilon: epsilon, preservesGradientScale: true)
        }
    }

    /// The data of one study run, pooled and in Double.
    struct StudyData {
        var train: Dataset<Float>
        var name: String
        /// Training rows `[N, d]`.
        var x: Tensor<Double>
        var inputs: Int
        /// The probe batch: the first training images.
        var probeX: Tensor<Double>
        var probeLabels: [Int]
        var testX: Tensor<Double>
        var testLabels: [Int]
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
    static func data(_ o: StudyOptions, _ plan: Plan) throws -> StudyData {
        var c = TrainingConfig()
        c.dataset = o.dataset
        c.trainCount = plan.trainCount
        c.testCount = plan.testCount
        c.seed = 1
        var name = o.dataset
        let split: (train: Dataset<Float>, test: Dataset<Float>)
        do {
            let s = try Datasets.split(for: c)
            split = (s.train, s.test)
        } catch DatasetError.missing {
            c.dataset = "digits"
            let s = try Datasets.split(for: c)
            split = (s.train, s.test)
            name = "digits (\(o.dataset) is not installed)"
        }
        let (x, inputs) = try pooledRows(split.train.images)
        let (testX, _) = try pooledRows(split.test.images)
        let probeCount = min(plan.probeSize, split.train.count)
        return StudyData(
            train: split.train, name: name, x: x, inputs: inputs,
            probeX: try rows(x, Array(0..<probeCount)[...]),
            probeLabels: Array(split.train.labels.prefix(probeCount)), testX: testX,
            testLabels: split.test.labels)
    }

    /// A probe-batch loss above this multiple of the initial loss ends a run as diverged.
    static let blowUp = 10.0

    /// One training run's record.
    struct Run {
        var learningRate = Double.nan
        var steps: [Int] = []
        var seconds: [Double] = []
        var losses: [Double] = []
        /// The probes, indexed [probe][layer].
        var probes: [[LayerProbe]] = []
        var testAccuracy = Double.nan
        /// The step at which the loss or the whitening statistics stopped being finite, or the
        /// probe loss passed ``NGDStudy/blowUp`` times its initial value.
        var divergedAt: Int?
        var diverged: Bool { divergedAt != nil }
    }

    /// Whether an error thrown by a training step means that training diverged: a whitened
    /// layer met NaN or infinite statistics (typed, before LAPACK), or an eigendecomposition
    /// met them.
    static func isDivergence(_ error: any Error) -> Bool {
        if case TrainingError.diverged = error { return true }
        if case LinearAlgebraError.nonFinite = error { return true }
        return false
    }

    /// Trains one network; with `probing`, measures it every `plan.probeEvery` steps (and at the
    /// end), otherwise only its final loss on the probe batch.
    static func train(
        _ method: Method, learningRate: Double, seed: Int, plan: Plan, data: StudyData,
        probing: Bool = true
    ) throws -> Run {
        let net = try Network(
            method, inputs: data.inputs, hidden: plan.hidden, classes: data.train.classCount,
            whitening: plan.whitening, seed: UInt64(seed))
        var run = Run(learningRate: learningRate)
        var g = SeededGenerator(seed: UInt64(seed) &* 104_729)
        var order: [Int] = []
        var cursor = 0
        var elapsed = 0.0
        for step in 0...plan.steps {
            if (probing && step % plan.probeEvery == 0) || step == 0 || step == plan.steps {
                let loss = try net.evaluate(data.probeX, data.probeLabels).loss
                // Diverged: not finite, or ten times the initial loss (ln 10 ≈ 2.3 at start).
                guard loss.isFinite, loss <= Self.blowUp * (run.losses.first ?? loss) else {
                    run.divergedAt = step
                    break
                }
                run.steps.append(step)
                run.seconds.append(elapsed)
                run.losses.append(loss)
                if probing {
                    run.probes.append(
                        try probe(
                            net, data.probeX, data.probeLabels, learningRate: learningRate,
                            damping: plan.damping))
                }
            }
            if step == plan.steps { break }
            if cursor + plan.batchSize > order.count {
                order = Array(0..<data.train.count)
                order.shuffle(using: &g)
                cursor = 0
            }
            let batch = order[cursor..<(cursor + plan.batchSize)]
            cursor += plan.batchSize
            let xb = try rows(data.x, batch)
            let labels = batch.map { data.train.labels[$0] }
            let start = Date()
            do {
                let loss = try net.step(xb, labels, learningRate: learningRate)
                guard loss.isFinite else {
                    run.divergedAt = step
                    break
                }
            } catch  where isDivergence(error) {
                run.divergedAt = step
                break
            }
            elapsed += Date().timeIntervalSince(start)
        }
        if !run.diverged {
            let correct = try net.evaluate(data.testX, data.testLabels).correct
            run.testAccuracy = Double(correct) / Double(max(data.testLabels.count, 1))
        }
        return run
    }

    /// The pilot of one method: at every rate of the grid, the worse of its final probe-batch
    /// losses on the ``Plan/pilotSeeds`` (trained as the reported runs, without probes), or nil
    /// when a pilot diverged or did not go below the initial loss.
    static func pilot(_ method: Method, plan: Plan, data: StudyData) throws -> [Double?] {
        try plan.rates.map { rate in
            var worst = -Double.infinity
            for seed in plan.pilotSeeds {
                let r = try train(
                    method, learningRate: rate, seed: seed, plan: plan, data: data,
                    probing: false)
                guard !r.diverged, let first = r.losses.first, let last = r.losses.last,
                    last < first
                else { return nil }
                worst = max(worst, last)
            }
            return worst
        }
    }

    /// The rate of the grid with the lowest pilot loss among the stable ones (the smallest rate
    /// when none is).
    static func chooseRate(_ pilotLosses: [Double?], rates: [Double]) -> Double {
        var best: (rate: Double, loss: Double)?
        for (rate, loss) in zip(rates, pilotLosses) {
            guard let loss else { continue }
            if best == nil || loss < best!.loss { best = (rate, loss) }
        }
        return best?.rate ?? rates.min() ?? 0.01
    }
}
