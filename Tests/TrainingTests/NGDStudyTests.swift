import Foundation
import NormKit
import Testing

@testable import Studies
@testable import Training

/// The NGD study's measurements: its natural gradient against a direct solve, its cosine, the
/// mapping of a step in a layer's own parameters back to the layer's map, the whitened input
/// factor, and what happens when training diverges.
@Suite("NGD study")
struct NGDStudyTests {
    /// Rows with an offset and correlated columns of very different scales (so that the plain
    /// input factor is far from I).
    static func rows(_ m: Int, _ d: Int, seed: UInt64) throws -> Tensor<Double> {
        var g = SeededGenerator(seed: seed)
        var values = [Double](repeating: 0, count: m * d)
        for i in 0..<m {
            let z = (0..<d).map { _ in g.nextNormal() }
            for j in 0..<d {
                // Column j mixes z_j and z_{j−1}, scaled by 3^j, around 2 + j.
                let previous = j > 0 ? z[j - 1] : 0
                values[i * d + j] = 2 + Double(j) + pow(3, Double(j)) * (z[j] + 0.8 * previous)
            }
        }
        return try Tensor(shape: [m, d], scalars: values)
    }

    static func labels(_ m: Int, classes: Int) -> [Int] { (0..<m).map { ($0 * 7 + 3) % classes } }

    /// x with (A + λI)x = b by Gaussian elimination with partial pivoting (A n×n row-major).
    static func directSolve(_ a: [Double], _ b: [Double]) -> [Double] {
        let n = b.count
        var m = a
        var r = b
        for c in 0..<n {
            let pivot = (c..<n).max { abs(m[$0 * n + c]) < abs(m[$1 * n + c]) }!
            if pivot != c {
                for j in 0..<n { m.swapAt(c * n + j, pivot * n + j) }
                r.swapAt(c, pivot)
            }
            for i in (c + 1)..<n {
                let f = m[i * n + c] / m[c * n + c]
                for j in c..<n { m[i * n + j] -= f * m[c * n + j] }
                r[i] -= f * r[c]
            }
        }
        var x = [Double](repeating: 0, count: n)
        for i in stride(from: n - 1, through: 0, by: -1) {
            var s = r[i]
            for j in (i + 1)..<n { s -= m[i * n + j] * x[j] }
            x[i] = s / m[i * n + i]
        }
        return x
    }

    static func relativeError(_ a: [Double], _ b: [Double]) -> Double {
        let diff = zip(a, b).map { ($0 - $1) * ($0 - $1) }.reduce(0, +).squareRoot()
        let size = b.map { $0 * $0 }.reduce(0, +).squareRoot()
        return diff / max(size, 1e-300)
    }

    /// (F + λI)⁻¹ḡ of the study equals Gaussian elimination on F + λI formed here from the rows,
    /// with λ = damping · trace(F)/n, for a full-rank and a rank-deficient F (m < n).
    @Test(arguments: [(9, 6), (3, 6)])
    func naturalGradientEqualsADirectSolve(_ size: (Int, Int)) throws {
        let (m, n) = size
        var g = SeededGenerator(seed: UInt64(m * 31 + n))
        let rows = Matrix(rows: m, cols: n, values: (0..<(m * n)).map { _ in g.nextNormal() })
        let damping = 0.05
        let fisher = try NGDStudy.Fisher(rows: rows, damping: damping)
        var f = [Double](repeating: 0, count: n * n)
        var mean = [Double](repeating: 0, count: n)
        for i in 0..<m {
            for a in 0..<n {
                mean[a] += rows[i, a] / Double(m)
                for b in 0..<n { f[a * n + b] += rows[i, a] * rows[i, b] / Double(m) }
            }
        }
        let lambda = damping * (0..<n).map { f[$0 * n + $0] }.reduce(0, +) / Double(n)
        #expect(abs(fisher.damping - lambda) <= 1e-12 * lambda)
        #expect(Self.relativeError(fisher.gradient, mean) < 1e-13)
        var damped = f
        for a in 0..<n { damped[a * n + a] += lambda }
        let direct = Self.directSolve(damped, mean)
        let error = Self.relativeError(fisher.natural, direct)
        #expect(error < 1e-10, "relative error \(error)")
        // The solve is not the gradient itself: the check above could fail.
        #expect(Self.relativeError(mean, direct) > 0.1)
        // Another damping through the same eigenvectors.
        var strong = f
        for a in 0..<n { strong[a * n + a] += 0.7 / damping * lambda }
        let strongError = Self.relativeError(
            fisher.natural(relativeDamping: 0.7), Self.directSolve(strong, mean))
        #expect(strongError < 1e-10, "relative error \(strongError)")
        // The eigenvalues alone are those of the full decomposition.
        let alone = try Matrix(rows: n, cols: n, values: f).symmetricEigenvalues()
        let full = try Matrix(rows: n, cols: n, values: f).symmetricEigen().values
        #expect(Self.relativeError(alone, full) < 1e-12)
        // κ of F + λI from its extreme eigenvalues.
        let (values, _) = try Matrix(rows: n, cols: n, values: f).symmetricEigen()
        let kappa = (values.last! + lambda) / (max(values.first!, 0) + lambda)
        #expect(abs(fisher.condition - kappa) <= 1e-9 * kappa)
    }

    @Test func cosineOfAVectorWithItselfIsOne() {
        let v = [0.3, -1.2, 4.0, 0.0, 2.5]
        #expect(abs(NGDStudy.cosine(v, v) - 1) < 1e-15)
        #expect(abs(NGDStudy.cosine(v, v.map { 7 * $0 }) - 1) < 1e-15)
        #expect(abs(NGDStudy.cosine(v, v.map { -$0 }) + 1) < 1e-15)
        #expect(abs(NGDStudy.cosine([1, 0, 0], [0, 2, 0])) < 1e-15)
        #expect(abs(NGDStudy.cosine([1, 1], [1, 0]) - 0.5.squareRoot()) < 1e-15)
        #expect(NGDStudy.cosine(v, [0, 0, 0, 0, 0]) == 0)
    }

    /// A small network of `method` after one SGD step with T = 1 (every training forward
    /// re-whitens), and its batch.
    static func network(_ method: NGDStudy.Method, seed: UInt64 = 3) throws -> (
        NGDStudy.Network, Tensor<Double>, [Int]
    ) {
        let x = try rows(24, 5, seed: seed)
        let labels = labels(24, classes: 3)
        let settings = WhiteningSettings(
            kind: .wnn, period: 1, epsilon: 1e-3, preservesGradientScale: true)
        let net = try NGDStudy.Network(
            method, inputs: 5, hidden: 4, classes: 3, whitening: settings, seed: seed)
        _ = try net.step(x, labels, learningRate: 0.01)
        return (net, x, labels)
    }

    /// The logits of a plain MLP with the given affine maps (W₁, b₁), (W₂, b₂).
    static func plainLogits(_ maps: [(weight: Matrix, bias: [Double])], _ x: Tensor<Double>)
        -> [Double]
    {
        var a = Matrix(rows: x.shape[0], cols: x.shape[1], values: x.scalars)
        for (l, map) in maps.enumerated() {
            var z = Matrix.product(a, map.weight, transposeB: true)
            for i in 0..<z.rows {
                for j in 0..<z.cols {
                    z[i, j] += map.bias[j]
                    if l == 0 { z[i, j] = max(z[i, j], 0) }
                }
            }
            a = z
        }
        return a.values
    }

    /// The logits of `net` on x: in training mode for BN (its map holds the batch's statistics),
    /// in inference mode otherwise (no refresh).
    static func logits(_ net: NGDStudy.Network, _ x: Tensor<Double>) throws -> [Double] {
        let mode: Mode = net.layers[0].method == .bn ? .training : .inference
        let h = try net.relu.forward(net.layers[0].forward(x, mode: mode), mode: mode)
        return try net.layers[1].forward(h, mode: mode).scalars
    }

    /// The study maps a step in a layer's own parameters (V; W and A; W, γ, β through BN) back
    /// to the change of its affine map: a small random step in the own parameters changes the
    /// network's output exactly as a plain MLP whose layer map moves by the mapped step.
    @Test(arguments: NGDStudy.Method.allCases)
    func aStepMapsBackToTheOriginalParameters(_ method: NGDStudy.Method) throws {
        let (net, x, _) = try Self.network(method)
        let start = try Self.logits(net, x)
        let maps = net.layers.map { $0.effective() }
        // The maps describe the network as it is.
        #expect(Self.relativeError(Self.plainLogits(maps, x), start) < 1e-12)
        var g = SeededGenerator(seed: 77)
        for (l, layer) in net.layers.enumerated() {
            let saved = layer.parameters.map(\.value)
            for p in layer.parameters {
                p.value = try Tensor(
                    shape: p.value.shape,
                    scalars: p.value.scalars.map { $0 + 1e-4 * g.nextNormal() })
            }
            let moved = try Self.logits(net, x)
            var mapped = maps
            mapped[l] = layer.effective()
            let predicted = Self.plainLogits(mapped, x)
            let change = zip(moved, start).map { $0 - $1 }
            let mappedChange = zip(predicted, start).map { $0 - $1 }
            #expect(
                change.contains { abs($0) > 1e-7 }, "\(method) layer \(l): the step moved nothing")
            let error = Self.relativeError(change, mappedChange)
            #expect(error < 1e-6, "\(method) layer \(l): relative error \(error)")
            for (p, v) in zip(layer.parameters, saved) { p.value = v }
        }
    }

    /// With T = 1 the whitened layer's input-side Fisher factor E[[â, 1][â, 1]ᵀ] on the batch
    /// it was whitened on is I (up to ε); the plain layer's on the same rows is far from it.
    @Test(arguments: [NGDStudy.Method.wnn, .gwnn, .eigennet, .plain])
    func withPeriodOneTheInputFactorIsIdentity(_ method: NGDStudy.Method) throws {
        let x = try Self.rows(40, 5, seed: 9)
        let settings = WhiteningSettings(kind: .wnn, period: 1, epsilon: 1e-12)
        var generator = SeededGenerator(seed: 5)
        let layer = try NGDStudy.DenseLayer(
            method, inputs: 5, outputs: 4, name: "fc", whitening: settings,
            generator: &generator)
        _ = try layer.forward(x, mode: .training)
        let a = layer.ownInputFactorRows()
        let factor = Matrix.product(a, a, transposeA: true)
        var deviation = 0.0
        for i in 0..<factor.rows {
            for j in 0..<factor.cols {
                deviation = max(deviation, abs(factor[i, j] / 40 - (i == j ? 1 : 0)))
            }
        }
        let kappa = try NGDStudy.Fisher(rows: a, damping: 1e-3, vectors: false).condition
        if method == .plain {
            #expect(deviation > 1 && kappa > 100, "deviation \(deviation), κ \(kappa)")
        } else {
            #expect(deviation < 1e-6, "\(method): deviation \(deviation)")
            #expect(kappa < 1 + 1e-6, "\(method): κ \(kappa)")
        }
    }

    /// WNN with T = 1: the SGD step on (V, b), mapped back, is the natural gradient of the
    /// input-side Kronecker factor alone, −η·[∇W, ∇b]·Ã⁻¹ with Ã the second moment of [x, 1]
    /// whose covariance part carries WNN's ε — the relation the claim rests on.
    @Test func wnnStepIsTheInputFactorNaturalGradient() throws {
        let x = try Self.rows(30, 4, seed: 21)
        let labels = Self.labels(30, classes: 3)
        let settings = WhiteningSettings(kind: .wnn, period: 1, epsilon: 1e-2)
        let net = try NGDStudy.Network(
            .wnn, inputs: 4, hidden: 3, classes: 3, whitening: settings, seed: 4)
        _ = try net.lossAndGradients(x, labels, mode: .training)
        let layer = net.layers[0]
        let gradient = try NGDStudy.Fisher(rows: layer.effectiveRows(), damping: 1e-3).gradient
        let before = layer.effective()
        let eta = 0.3
        for p in layer.parameters { try NGDStudy.descend(p, eta) }
        let after = layer.effective()
        let step = zip(
            NGDStudy.flatten(after.weight, after.bias), NGDStudy.flatten(before.weight, before.bias)
        ).map { $0 - $1 }
        // Ã = [[Σ + ε·mean(λ)·I + μμᵀ, μ], [μᵀ, 1]] from the batch.
        let (m, d) = (30, 4)
        var mu = [Double](repeating: 0, count: d)
        for i in 0..<m { for j in 0..<d { mu[j] += x[flat: i * d + j] / Double(m) } }
        var sigma = [Double](repeating: 0, count: d * d)
        for i in 0..<m {
            for a in 0..<d {
                for b in 0..<d {
                    sigma[a * d + b] +=
                        (x[flat: i * d + a] - mu[a]) * (x[flat: i * d + b] - mu[b]) / Double(m)
                }
            }
        }
        let epsilon = 1e-2 * (0..<d).map { sigma[$0 * d + $0] }.reduce(0, +) / Double(d)
        var factor = [Double](repeating: 0, count: (d + 1) * (d + 1))
        for a in 0...d {
            for b in 0...d {
                let ma = a < d ? mu[a] : 1
                let mb = b < d ? mu[b] : 1
                factor[a * (d + 1) + b] =
                    (a < d && b < d ? sigma[a * d + b] + (a == b ? epsilon : 0) : 0) + ma * mb
            }
        }
        var expected: [Double] = []
        for o in 0..<3 {
            let row = Array(gradient[(o * (d + 1))..<((o + 1) * (d + 1))])
            expected += Self.directSolve(factor, row).map { -eta * $0 }
        }
        let error = Self.relativeError(step, expected)
        #expect(error < 1e-8, "relative error \(error)")
        // Plain SGD's step, −η·ḡ, is not it.
        #expect(Self.relativeError(gradient.map { -eta * $0 }, expected) > 0.1)
    }

    /// Plain SGD's step on (W, b) is −η·ḡ: its cosine with F⁻¹g is the gradient's.
    @Test func plainStepCosineIsTheGradientCosine() throws {
        let (net, x, labels) = try Self.network(.plain)
        let probes = try NGDStudy.probe(net, x, labels, learningRate: 0.1, damping: 1e-3)
        for p in probes {
            #expect(abs(p.updateCosine - p.gradientCosine) < 1e-10)
            #expect(p.updateCosine > 0 && p.updateCosine < 1)
            #expect(abs(p.effectiveCondition - p.ownCondition) <= 1e-9 * p.ownCondition)
        }
    }

    /// A probe leaves the network as it found it (parameters, whitening, BN statistics).
    @Test(arguments: NGDStudy.Method.allCases)
    func aProbeChangesNothing(_ method: NGDStudy.Method) throws {
        let (net, x, labels) = try Self.network(method)
        let values = net.parameters.map(\.value)
        let buffers = net.buffers
        _ = try NGDStudy.probe(net, x, labels, learningRate: 0.1, damping: 1e-3)
        #expect(net.parameters.map(\.value) == values)
        #expect(net.buffers == buffers)
    }

    /// A rate far too large for a whitened network ends the run as diverged, without an error
    /// (it used to reach LAPACK with NaN statistics: "dsyev failed (info −5)").
    @Test(arguments: [NGDStudy.Method.wnn, .gwnn, .eigennet])
    func aDivergedRunIsRecordedNotThrown(_ method: NGDStudy.Method) throws {
        var o = StudyOptions()
        o.dataset = "digits"
        o.trainCount = 256
        o.testCount = 64
        o.epochs = 1
        var plan = NGDStudy.Plan(o)
        plan.probeSize = 64
        plan.steps = 60
        plan.probeEvery = 20
        plan.hidden = 4
        let data = try NGDStudy.data(o, plan)
        let run = try NGDStudy.train(method, learningRate: 1e4, seed: 1, plan: plan, data: data)
        #expect(run.diverged, "\(method): losses \(run.losses)")
        #expect(run.testAccuracy.isNaN)
        let fine = try NGDStudy.train(method, learningRate: 1e-3, seed: 1, plan: plan, data: data)
        #expect(!fine.diverged && fine.losses.count == 4 && fine.probes.count == 4)
    }

    @Test func theRateWithTheLowestStablePilotLossIsChosen() {
        let rates = [0.5, 0.2, 0.1, 0.05]
        #expect(NGDStudy.chooseRate([nil, 0.9, 0.4, 0.6], rates: rates) == 0.1)
        #expect(NGDStudy.chooseRate([0.3, nil, 0.4, 0.6], rates: rates) == 0.5)
        #expect(NGDStudy.chooseRate([nil, nil, nil, nil], rates: rates) == 0.05)
    }

    /// The headline is computed from the runs: made-up probes where GWNN's step is closer to
    /// F⁻¹g than plain SGD's at both dampings and WNN's is not give those words.
    @Test func theHeadlineFollowsTheMeasurements() {
        func run(_ cosine: Double, _ spread: Double) -> NGDStudy.Run {
            var r = NGDStudy.Run(learningRate: 0.1)
            r.steps = [0, 10, 20]
            r.seconds = [0, 1, 2]
            r.losses = [2.3, 1.0, 0.5]
            r.probes = [0, 1, 2].map { k in
                let c = cosine + spread * Double(k - 1)
                let probe = NGDStudy.LayerProbe(
                    updateCosine: c, gradientCosine: 0.1, updateCosineStrong: c,
                    gradientCosineStrong: 0.2, effectiveCondition: 100, ownCondition: 100,
                    inputFactorCondition: 2)
                return [probe, probe]
            }
            return r
        }
        var runs: [NGDStudy.Method: [NGDStudy.Run]] = [:]
        for m in NGDStudy.Method.allCases {
            let c: Double = m == .gwnn ? 0.9 : 0.1
            runs[m] = [run(c, 0.01), run(c + 0.01, 0.01), run(c - 0.01, 0.01)]
        }
        let analysis = NGDStudy.Analysis(runs: runs, seeds: 3)
        let headline = analysis.headline
        #expect(headline.contains("GWNN is closer than plain SGD, WNN and EigenNet are not"))
        #expect(headline.contains("GWNN closer than BN"))
        #expect(!headline.contains("no step is near it"))
        #expect(!analysis.matches)  // EigenNet is not closer
        var diagnosed = analysis
        diagnosed.rates = [0.1, 0.01]
        diagnosed.pilots = [.wnn: [nil, 0.5], .gwnn: [nil, 0.6], .eigennet: [nil, 0.7]]
        diagnosed.freshPilots = [.wnn: [0.4, 0.5], .gwnn: [nil, 0.6], .eigennet: [nil, 0.7]]
        let note = diagnosed.notes.first { $0.hasPrefix("Largest stable rate") } ?? ""
        #expect(note.contains("WNN 0.01 with T = 10, 0.1 with T = 1; GWNN 0.01 with T = 10"))
        #expect(note.contains("allows a larger rate for WNN:"))
        diagnosed.freshPilots[.wnn] = [nil, 0.5]
        #expect(diagnosed.notes.contains { $0.contains("does not allow a larger rate") })
        runs[.gwnn] = runs[.plain]
        let flat = NGDStudy.Analysis(runs: runs, seeds: 3).headline
        #expect(flat.contains("no whitened layer's step is closer to it than plain SGD's"))
        #expect(flat.contains("largest mean cosine 0.10"))
    }
}
