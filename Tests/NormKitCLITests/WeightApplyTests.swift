import Foundation
import NormKit
import NormTestSupport
import Testing

@testable import NormKitCLI

/// `normkit apply linear|conv2d --weight-norm …` end to end, in-process, against PyTorch's
/// parametrized modules: exact `state_dict` key sets in and out, forward, dx, every parameter
/// gradient, and Spectral Norm's u and v across calls.
@Suite("normkit apply linear|conv2d")
struct WeightApplyTests {
    /// float64 files: summation order only (worst measured in the library tests: 5e-13).
    static let doubleTolerance = 1e-10
    /// float32 files against float64 PyTorch.
    static let floatTolerance = 1e-5

    static func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-weight-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// The flags that reproduce a fixture.
    static func arguments(_ f: WeightFixture) -> [String] {
        var args = [f.layer, "--weight-norm", f.cliMethod]
        if f.layer == "conv2d" { args += ["--stride", "\(f.stride)", "--padding", "\(f.padding)"] }
        if f.raw.spec["dim"] != nil { args += ["--dim", f.dim.map { "\($0)" } ?? "none"] }
        if let n = f.raw.number("iterations") { args += ["--power-iterations", "\(Int(n))"] }
        if let eps = f.raw.number("eps") { args += ["--eps", "\(eps)"] }
        return args
    }

    static func write<T: NormScalar>(
        _ tensors: [String: Tensor<Double>], as _: T.Type, to path: String
    )
        throws
    {
        var file = Safetensors.File()
        for (k, v) in tensors { file.tensors[k] = StoredArray(v.converted(to: T.self)) }
        try Safetensors.write(file, to: path)
    }

    func replay<T: NormScalar>(_ name: String, as _: T.Type, tolerance: Double) throws {
        let f = try WeightFixture(name)
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ file: String) -> String { dir.appendingPathComponent(file).path }
        try Self.write(f.state("in/"), as: T.self, to: path("p.safetensors"))
        for step in 0...f.steps {
            let isLast = step == f.steps
            let x: Tensor<Double> = f.raw.tensor(isLast ? "x" : "x.\(step)")
            try Numpy.write(x.converted(to: T.self), to: path("x.npy"))
            var args =
                Self.arguments(f) + [
                    "--input", path("x.npy"), "--output", path("y.npy"), "--params",
                    path("p.safetensors"), "--updated-params", path("p.safetensors"),
                ]
            if isLast {
                let dy: Tensor<Double> = f.raw.tensor("dy")
                try Numpy.write(dy.converted(to: T.self), to: path("dy.npy"))
                args += [
                    "--grad-output", path("dy.npy"), "--grad-input", path("dx.npy"),
                    "--grad-params", path("g.safetensors"),
                ]
                if f.isEval { args.append("--eval") }
            }
            var command = try NormKitCommand.parseAsRoot(["apply"] + args)
            try command.run()
        }
        func expectClose(_ actual: StoredArray?, _ key: String, _ expected: Tensor<Double>) {
            guard let actual else {
                Issue.record("\(name): \(key) missing")
                return
            }
            let a = actual.tensor(as: Double.self)
            #expect(a.shape == expected.shape, "\(name) \(key) shape \(a.shape)")
            let c = Comparison(a.scalars, expected.scalars)
            #expect(c.relative < tolerance, "\(name) \(key): \(c)")
        }
        expectClose(try Numpy.read(contentsOf: path("y.npy")), "y", f.raw.tensor("y"))
        expectClose(try Numpy.read(contentsOf: path("dx.npy")), "dx", f.raw.tensor("dx"))
        let grads = try Safetensors.read(contentsOf: path("g.safetensors"))
        let expectedGrads: [String: Tensor<Double>] = f.state("grad/")
        // The contract: gradients under exactly the parameters' keys (buffers have none).
        #expect(grads.tensors.keys.sorted() == expectedGrads.keys.sorted(), "\(name) grad keys")
        for (key, expected) in expectedGrads {
            expectClose(grads.tensors[key], "d" + key, expected)
        }
        let updated = try Safetensors.read(contentsOf: path("p.safetensors"))
        let expectedAfter: [String: Tensor<Double>] = f.state("out/")
        #expect(updated.tensors.keys.sorted() == expectedAfter.keys.sorted(), "\(name) keys")
        for (key, expected) in expectedAfter {
            expectClose(updated.tensors[key], "out " + key, expected)
        }
    }

    @Test(arguments: WeightFixture.names)
    func applyMatchesPyTorchInDouble(_ name: String) throws {
        try replay(name, as: Double.self, tolerance: Self.doubleTolerance)
    }

    @Test(arguments: WeightFixture.names)
    func applyMatchesPyTorchInFloat(_ name: String) throws {
        try replay(name, as: Float.self, tolerance: Self.floatTolerance)
    }

    @Test func defaultEpsilonIsTheMethodsOwn() {
        #expect(WeightNormMethod.ws.defaultEpsilon == 1e-5)
        #expect(WeightNormMethod.wsBiT.defaultEpsilon == 1e-10)
        #expect(WeightNormMethod.cwn.defaultEpsilon == 1e-5)
        #expect(WeightNormMethod.sn.defaultEpsilon == 1e-12)
    }

    @Test func badRequestsGiveClearErrorsAndWriteNothing() throws {
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ file: String) -> String { dir.appendingPathComponent(file).path }
        try Numpy.write(try Tensor<Double>(zeros: [2, 3]), to: path("x.npy"))
        func run(_ tensors: [String: Tensor<Double>], _ extra: [String]) throws {
            try Self.write(tensors, as: Double.self, to: path("p.safetensors"))
            var command = try NormKitCommand.parseAsRoot(
                [
                    "apply", "linear", "--input", path("x.npy"), "--output", path("y.npy"),
                    "--params", path("p.safetensors"),
                ] + extra)
            try command.run()
        }
        let v = try Tensor<Double>(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6])
        // g of the wrong shape: the error names the key and both shapes.
        #expect(
            throws: NormError.parameterShapeMismatch(
                name: WeightNorm<Double>.magnitudeKey, expected: [2, 1], actual: [2])
        ) {
            try run(
                [
                    WeightNorm<Double>.directionKey: v,
                    WeightNorm<Double>.magnitudeKey: Tensor([1, 2]),
                ],
                ["--weight-norm", "wn"])
        }
        // u of the wrong length.
        #expect(throws: NormError.self) {
            try run(
                [
                    "parametrizations.weight.original": v,
                    "parametrizations.weight.0._u": Tensor([1, 0, 0]),
                    "parametrizations.weight.0._v": Tensor([1, 0, 0]),
                ], ["--weight-norm", "sn"])
        }
        // A key the method does not have, and a missing one.
        #expect(throws: NormError.self) {
            try run(["parametrizations.weight.original": v, "weight": v], ["--weight-norm", "ws"])
        }
        #expect(throws: WeightApplyError.self) { try run(["weight": v], ["--weight-norm", "ws"]) }
        // A zero row under Weight Norm.
        let zeroRow = try Tensor<Double>(shape: [2, 3], scalars: [1, 2, 3, 0, 0, 0])
        #expect(throws: WeightNormError.self) {
            try run(
                [
                    WeightNorm<Double>.directionKey: zeroRow,
                    WeightNorm<Double>.magnitudeKey: try Tensor(shape: [2, 1], scalars: [1, 1]),
                ], ["--weight-norm", "wn"])
        }
        // Unbiased WS on a fan-in of 1.
        try Numpy.write(try Tensor<Double>(zeros: [2, 1]), to: path("x.npy"))
        #expect(throws: WeightNormError.self) {
            try run(
                ["parametrizations.weight.original": try Tensor(shape: [2, 1], scalars: [1, 2])],
                ["--weight-norm", "ws"])
        }
        #expect(!FileManager.default.fileExists(atPath: path("y.npy")))
        #expect(throws: (any Error).self) {
            _ = try NormKitCommand.parseAsRoot(
                ["apply", "linear", "--input", "x", "--output", "y", "--weight-norm", "bogus"])
        }
    }
}
