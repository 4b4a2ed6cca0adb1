import Foundation
import NormKit
import NormTestSupport
import Testing

@testable import NormKitCLI

/// `normkit apply` end to end, in-process, against the PyTorch fixtures.
@Suite("normkit apply")
struct ApplyCommandTests {
    static let tolerance = 1e-9

    static func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    static func arguments(for fixture: Fixture) -> [String] {
        let s = fixture.spec
        var args = [fixture.layer.rawValue, "--layout", s.layout.rawValue]
        if let eps = s.epsilon { args += ["--eps", "\(eps)"] }
        switch s.momentum {
        case .exponential(let m): args += ["--momentum", "\(m)"]
        case .cumulative: args += ["--momentum", "none"]
        }
        if let g = s.groups { args += ["--groups", "\(g)"] }
        args += ["--normalized-dims", "\(s.normalizedDims)"]
        if !s.affine { args += ["--affine", "false"] }
        if let t = s.track { args += ["--track-running-stats", "\(t)"] }
        return args
    }

    static let cases = [
        "batchnorm/rank4_eval", "batchnorm/rank3_cumulative", "batchnorm/rank4_nhwc",
        "batchnorm/rank2_offset",
        "layernorm/rank4_k3", "layernorm2d/rank4_nhwc", "instancenorm/rank4_tracked",
        "instancenorm/rank4_default",
        "groupnorm/rank4_nhwc", "groupnorm/rank3_offset_g1", "rmsnorm/rank3_k2",
        "rmsnorm/rank3_eps1e-5",
    ]

    /// Replays the fixture through the CLI one call at a time, carrying the updated parameters
    /// from call to call, in float64, and compares every file it writes.
    @Test(arguments: cases)
    func applyMatchesPyTorch(_ name: String) throws {
        let fixture = try Fixtures.load(name)
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ file: String) -> String { dir.appendingPathComponent(file).path }

        var params = Safetensors.File()
        for key in ["weight", "bias"] where fixture.has(key) {
            params.tensors[key] = fixture.file.tensors[key]
        }
        for key in ["running_mean", "running_var", "num_batches_tracked"]
        where fixture.has("\(key).in") {
            params.tensors[key] = fixture.file.tensors["\(key).in"]
        }
        try Safetensors.write(params, to: path("p.safetensors"))
        for step in 0...fixture.spec.steps {
            let isLast = step == fixture.spec.steps
            let input: Tensor<Double> = fixture.tensor(isLast ? "x" : "x.\(step)")
            try Numpy.write(input, to: path("x.npy"))
            var args =
                Self.arguments(for: fixture) + [
                    "--input", path("x.npy"), "--output", path("y.npy"), "--params",
                    path("p.safetensors"),
                    "--updated-params", path("p.safetensors"),
                ]
            if isLast {
                try Numpy.write(fixture.tensor("dy", as: Double.self), to: path("dy.npy"))
                args += [
                    "--grad-output", path("dy.npy"), "--grad-input", path("dx.npy"),
                    "--grad-params", path("g.safetensors"),
                ]
                if fixture.spec.isEval { args.append("--eval") }
            }
            var command = try NormKitCommand.parseAsRoot(["apply"] + args)
            try command.run()
        }
        func expectClose(_ actual: StoredArray?, _ key: String) {
            guard case .float64(let a)? = actual else {
                Issue.record("\(name): \(key) missing or not float64")
                return
            }
            let expected: Tensor<Double> = fixture.tensor(key)
            #expect(a.shape == expected.shape, "\(name) \(key)")
            let c = Comparison(a.scalars, expected.scalars)
            #expect(c.relative < Self.tolerance, "\(name) \(key): \(c)")
        }
        expectClose(try Numpy.read(contentsOf: path("y.npy")), "y")
        expectClose(try Numpy.read(contentsOf: path("dx.npy")), "dx")
        let grads = try Safetensors.read(contentsOf: path("g.safetensors"))
        if fixture.has("dweight") { expectClose(grads.tensors["weight"], "dweight") }
        if fixture.has("dbias") { expectClose(grads.tensors["bias"], "dbias") }
        let updated = try Safetensors.read(contentsOf: path("p.safetensors"))
        if fixture.has("running_mean.out") {
            expectClose(updated.tensors["running_mean"], "running_mean.out")
            expectClose(updated.tensors["running_var"], "running_var.out")
            #expect(
                updated.tensors["num_batches_tracked"]
                    == fixture.file.tensors["num_batches_tracked.out"])
        }
    }

    @Test func float32InputComputesAndWritesFloat32() throws {
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let x = try Tensor<Float>(shape: [2, 3], scalars: [1, 2, 3, 4, 6, 8])
        try Numpy.write(x, to: dir.appendingPathComponent("x.npy").path)
        var command = try NormKitCommand.parseAsRoot([
            "apply", "layernorm", "--input", dir.appendingPathComponent("x.npy").path, "--output",
            dir.appendingPathComponent("y.npy").path,
        ])
        try command.run()
        let y = try Numpy.read(contentsOf: dir.appendingPathComponent("y.npy").path)
        guard case .float32(let t) = y else {
            Issue.record("expected float32 output")
            return
        }
        #expect(abs(t[0, 0] + 1.2247357) < 1e-5)
    }

    @Test func badRequestsGiveClearErrorsAndWriteNothing() throws {
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let xPath = dir.appendingPathComponent("x.npy").path
        let yPath = dir.appendingPathComponent("y.npy").path
        try Numpy.write(try Tensor<Double>(shape: [1, 3], scalars: [1, 2, 3]), to: xPath)
        // Unknown layer and layout, and a gradient with nowhere to go, fail validation.
        #expect(throws: (any Error).self) {
            _ = try NormKitCommand.parseAsRoot([
                "apply", "weirdnorm", "--input", xPath, "--output", yPath,
            ])
        }
        #expect(throws: (any Error).self) {
            _ = try NormKitCommand.parseAsRoot([
                "apply", "batchnorm", "--input", xPath, "--output", yPath, "--layout", "nwhc",
            ])
        }
        #expect(throws: (any Error).self) {
            _ = try NormKitCommand.parseAsRoot([
                "apply", "batchnorm", "--input", xPath, "--output", yPath, "--grad-input", yPath,
            ])
        }
        #expect(throws: (any Error).self) {
            _ = try NormKitCommand.parseAsRoot([
                "apply", "batchnorm", "--input", xPath, "--output", yPath, "--momentum", "2",
            ])
        }
        // Batch of one in training BatchNorm, non-dividing groups, a bad K, a missing input (without
        // --groups GroupNorm takes 32 or the largest divisor of C below it).
        let failing: [([String], String)] = [
            (["batchnorm"], "single value"),
            (["groupnorm", "--groups", "2"], "do not divide"),
            (["layernorm", "--normalized-dims", "3"], "--normalized-dims"),
        ]
        for (args, message) in failing {
            var command = try NormKitCommand.parseAsRoot(
                ["apply"] + args + ["--input", xPath, "--output", yPath])
            do {
                try command.run()
                Issue.record("\(args) should fail")
            } catch {
                #expect("\(error)".contains(message), "\(args): \(error)")
            }
            #expect(!FileManager.default.fileExists(atPath: yPath), "\(args) wrote an output")
        }
        var missing = try NormKitCommand.parseAsRoot([
            "apply", "layernorm", "--input", xPath + ".missing", "--output", yPath,
        ])
        #expect(throws: FileFormatError.self) { try missing.run() }
        // A parameter file with the wrong shape.
        let pPath = dir.appendingPathComponent("p.safetensors").path
        try Safetensors.write(
            Safetensors.File(tensors: ["weight": .float64(Tensor([1, 1]))]), to: pPath)
        var wrongShape = try NormKitCommand.parseAsRoot([
            "apply", "layernorm", "--input", xPath, "--output", yPath, "--params", pPath,
        ])
        #expect(
            throws: NormError.parameterShapeMismatch(name: "weight", expected: [3], actual: [2])
        ) {
            try wrongShape.run()
        }
    }

    @Test func tourChecksEveryGradient() throws {
        let rows = try Tour.rowsFor(shape: [3, 4, 2, 3], seed: 1)
        #expect(rows.count == 7)
        for row in rows {
            #expect(row.gradientError < 1e-6, "\(row.name)")
            #expect(row.worstMean < 1e-12, "\(row.name)")
        }
        #expect(try Tour.run(shape: [2, 2, 2, 2], seed: 3).contains("GroupNorm"))
    }
}

@Suite("normkit apply, inferred normalized dims")
struct InferredDimsTests {
    @Test func layerNormTakesItsNormalizedShapeFromTheWeight() throws {
        let f = try Fixtures.load("layernorm/rank4_k3")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ n: String) -> String { dir.appendingPathComponent(n).path }
        try Numpy.write(f.tensor("x", as: Double.self), to: path("x.npy"))
        try Safetensors.write(
            Safetensors.File(tensors: [
                "weight": f.file.tensors["weight"]!, "bias": f.file.tensors["bias"]!,
            ]),
            to: path("p.safetensors"))
        var command = try NormKitCommand.parseAsRoot([
            "apply", "layernorm", "--input", path("x.npy"), "--output", path("y.npy"), "--params",
            path("p.safetensors"),
        ])
        try command.run()
        let y = try Numpy.read(contentsOf: path("y.npy")).tensor(as: Double.self)
        #expect(Comparison(y.scalars, (f.tensor("y") as Tensor<Double>).scalars).relative < 1e-9)
    }
}
