import Foundation
import NormKit
import Testing

@testable import Training

@Suite("Training with whitened layers and gradient normalization")
struct TrainerWhiteningTests {
    static func config(_ kind: String, every: Int = 3, rank: Int? = 4) -> TrainingConfig {
        var c = TrainingConfig()
        c.dataset = "digits"
        c.normalizer = "bn"
        c.batchSize = 32
        c.epochs = 2
        c.trainCount = 320
        c.testCount = 64
        c.learningRate = 0.05
        c.width = 4
        c.seed = 5
        c.whitenLayers = kind
        c.whitenEvery = every
        c.whitenRank = rank
        c.gradNorm = "standardize"
        c.gradNormScale = 0.5
        return c
    }

    /// A checkpoint written between two refreshes (step 7 of T = 3) resumes to the same losses,
    /// parameters and whitening state as an uninterrupted run.
    @Test(arguments: ["wnn", "gwnn", "eigennet"])
    func resumingMidPeriodEqualsAnUninterruptedRun(_ kind: String) throws {
        let full = try Trainer(Self.config(kind))
        try full.run()
        let partial = try Trainer(Self.config(kind))
        #expect(try !partial.run(maximumSteps: 7))
        #expect(partial.whitened.allSatisfy { $0.step == 7 })
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(
            "whitened-\(UUID().uuidString).safetensors"
        ).path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try partial.saveCheckpoint(to: path)
        let resumed = try Trainer.resume(from: path)
        #expect(resumed.whitened.map(\.step) == partial.whitened.map(\.step))
        try resumed.run()
        #expect(resumed.stepLosses == full.stepLosses)
        #expect(resumed.model.parameters.map(\.value) == full.model.parameters.map(\.value))
        #expect(resumed.model.buffers == full.model.buffers)
        #expect(full.whitened.count == 4 && full.whitened.allSatisfy { $0.step == 20 })
    }

    /// Without truncation a whitened network is the plain one: the same first loss (the step-0
    /// refresh preserves the function), and training lowers the loss.
    @Test(arguments: ["wnn", "gwnn", "eigennet"])
    func whitenedNetworkStartsAsThePlainOne(_ kind: String) throws {
        var plainConfig = Self.config("none", rank: nil)
        plainConfig.whitenEvery = nil
        plainConfig.gradNorm = nil
        plainConfig.gradNormScale = nil
        plainConfig.learningRate = 0.01
        var whitenedConfig = Self.config(kind, every: 5, rank: nil)
        // At the plain network's 0.05 the whitened ones diverged (see the docs section).
        whitenedConfig.learningRate = 0.01
        whitenedConfig.gradNorm = nil
        whitenedConfig.gradNormScale = nil
        let plain = try Trainer(plainConfig)
        let whitened = try Trainer(whitenedConfig)
        try plain.run(maximumSteps: 1)
        try whitened.run()
        let first = whitened.stepLosses[0]
        #expect(abs(first - plain.stepLosses[0]) < 1e-4, "\(first) vs \(plain.stepLosses[0])")
        let last = whitened.stepLosses.suffix(5).reduce(0, +) / 5
        // 20 steps at 0.01: the loss falls from 2.32 to about 2.1 (the plain network alike).
        #expect(last < first - 0.1, "\(kind): loss \(first) → \(last)")
    }

    /// Bad whitening and gradient-normalization settings give typed errors before any data is read.
    @Test func badSettingsAreTypedErrors() throws {
        func failure(_ change: (inout TrainingConfig) -> Void) -> TrainingError? {
            var c = Self.config("gwnn")
            change(&c)
            do {
                _ = try Trainer(c)
                return nil
            } catch let error as TrainingError { return error } catch { return nil }
        }
        func name(_ e: TrainingError?) -> String? {
            switch e {
            case .invalidSetting(let name, _, _)?: return name
            case .unknownName(let kind, _, _)?: return kind
            default: return nil
            }
        }
        #expect(name(failure { $0.whitenEvery = 0 }) == "whitening period")
        #expect(name(failure { $0.whitenEvery = -4 }) == "whitening period")
        #expect(name(failure { $0.whitenRank = 0 }) == "whitening rank")
        #expect(name(failure { $0.whitenRank = Int.max }) == "whitening rank")
        #expect(name(failure { $0.whitenDataEvery = 4 }) == "whitening data period")
        #expect(
            name(
                failure {
                    $0.whitenLayers = "eigennet"
                    $0.whitenDataEvery = 6
                }) == "whitening data period")
        #expect(name(failure { $0.whitenLayers = "pca" }) == "whitened layers")
        #expect(name(failure { $0.model = "resnet" }) == "whitened layers")
        #expect(name(failure { $0.weightNorm = "ws" }) == "whitened layers")
        #expect(
            name(
                failure {
                    $0.whitenLayers = nil
                    $0.whitenEvery = nil
                    $0.whitenRank = 3
                }) == "whitening rank")
        #expect(name(failure { $0.gradNorm = "clip" }) == "gradient normalization")
        #expect(name(failure { $0.gradNormScale = 0 }) == "gradient normalization scale")
        #expect(name(failure { $0.gradNormScale = .infinity }) == "gradient normalization scale")
    }
}

@Suite("Gradient normalization")
struct GradientNormalizationTests {
    static func parameters() throws -> [Parameter<Double>] {
        var g = SeededGenerator(seed: 21)
        let weight = Parameter(name: "w", value: try Tensor<Double>(zeros: [3, 2, 2, 2]))
        weight.gradient = try Tensor.randomNormal(shape: [3, 2, 2, 2], using: &g)
        for i in 0..<weight.gradient.count {
            weight.gradient[flat: i] = 5 + 3 * weight.gradient[flat: i]
        }
        let bias = Parameter(name: "b", value: try Tensor<Double>(zeros: [3]))
        bias.gradient = Tensor([1, 2, 3])
        let idle = Parameter(name: "z", value: try Tensor<Double>(zeros: [2, 2]))
        return [weight, bias, idle]
    }

    @Test(arguments: GradientNormalization.Method.allCases)
    func methodsGiveTheirStatistics(_ method: GradientNormalization.Method) throws {
        let ps = try Self.parameters()
        let before = ps[0].gradient
        try GradientNormalization(method, scale: 0.5).apply(to: ps)
        let g = ps[0].gradient.scalars
        #expect(ps[1].gradient.scalars == [1, 2, 3], "vectors keep their gradients")
        #expect(ps[2].gradient.scalars.allSatisfy { $0 == 0 }, "a zero gradient stays zero")
        let (r, c) = (3, 8)
        switch method {
        case .none:
            #expect(ps[0].gradient == before)
        case .scale:
            let rms = (g.reduce(0) { $0 + $1 * $1 } / Double(g.count)).squareRoot()
            #expect(abs(rms - 0.5) < 1e-6)
        case .standardize:
            for i in 0..<r {
                let row = g[(i * c)..<((i + 1) * c)]
                let mean = row.reduce(0, +) / Double(c)
                let std = (row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(c))
                    .squareRoot()
                #expect(abs(mean) < 1e-9 && abs(std - 0.5) < 1e-6, "row \(i): \(mean), \(std)")
            }
        case .whiten:
            let m = Matrix(rows: r, cols: c, values: g)
            let gram = (1 / Double(c)) * Matrix.product(m, m, transposeB: true)
            let error = zip(gram.values, (0.25 * Matrix.identity(r)).values).map { abs($0 - $1) }
                .max()!
            #expect(error < 1e-6, "(1/c)·G·Gᵀ − Ψ²I: \(error)")
        }
    }
}
