import Foundation
import NormKit
import NormTestSupport
import Testing

@testable import NormKitCLI

/// `normkit apply` for the learned normalizers, end to end in float64, against the fixtures.
@Suite("normkit apply, learned normalizers")
struct LearnedApplyTests {
    struct Case: Sendable, CustomStringConvertible {
        var fixture: String
        var flags: [String]
        /// fixture key → file key for the initial parameters.
        var parameters: [String: String]
        /// gradient file key → fixture key.
        var gradients: [String: String]
        var description: String { fixture }
    }

    static let snParameters = [
        "weight": "weight", "bias": "bias", "mean_weight": "mean_weight",
        "var_weight": "var_weight",
        "running_mean.in": "running_mean", "running_var.in": "running_var",
    ]
    static let snGradients = [
        "weight": "dweight", "bias": "dbias", "mean_weight": "dmean_weight",
        "var_weight": "dvar_weight",
    ]

    static let cases: [Case] = [
        Case(
            fixture: "switchnorm/rank4_eval", flags: ["switchnorm"], parameters: snParameters,
            gradients: snGradients),
        Case(
            fixture: "switchnorm/rank3_keep0997", flags: ["switchnorm", "--momentum", "0.997"],
            parameters: snParameters, gradients: snGradients),
        Case(
            fixture: "sparseswitchnorm/rank4_radius0.6",
            flags: ["sparseswitchnorm", "--radius", "0.6"],
            parameters: snParameters, gradients: snGradients),
        Case(
            fixture: "metanorm/rank4_default",
            flags: ["metanorm", "--aggregations", "in,bn,ln,gn2"],
            parameters: [
                "weight": "weight", "bias": "bias", "mean_weight": "mean_weight",
                "var_weight": "var_weight",
            ],
            gradients: snGradients),
        Case(
            fixture: "ibn/rank4_eval", flags: ["ibn"],
            parameters: [
                "IN.weight": "IN.weight", "IN.bias": "IN.bias", "BN.weight": "BN.weight",
                "BN.bias": "BN.bias",
                "BN.running_mean.in": "BN.running_mean", "BN.running_var.in": "BN.running_var",
            ],
            gradients: [
                "IN.weight": "dIN.weight", "IN.bias": "dIN.bias", "BN.weight": "dBN.weight",
                "BN.bias": "dBN.bias",
            ]),
        Case(
            fixture: "batchrenorm/rank4_steps", flags: ["batchrenorm", "--momentum", "0.1"],
            parameters: [
                "weight": "weight", "bias": "bias", "running_mean.in": "running_mean",
                "running_std.in": "running_std",
            ], gradients: ["weight": "dweight", "bias": "dbias"]),
    ]

    @Test(arguments: cases)
    func applyMatchesTheFixtures(_ c: Case) throws {
        let f = try RawFixture.load(c.fixture)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ name: String) -> String { dir.appendingPathComponent(name).path }
        var params = Safetensors.File()
        for (fixtureKey, fileKey) in c.parameters {
            params.tensors[fileKey] = f.file.tensors[fixtureKey]
        }
        try Safetensors.write(params, to: path("p.safetensors"))
        let steps = Int(f.number("steps") ?? 0)
        var layoutFlags: [String] = []
        if f.string("layout") == "nhwc" { layoutFlags = ["--layout", "nhwc"] }
        for step in 0...steps {
            let last = step == steps
            try Numpy.write(f.tensor(last ? "x" : "x.\(step)", as: Double.self), to: path("x.npy"))
            var args =
                ["apply"] + c.flags + layoutFlags + [
                    "--input", path("x.npy"), "--output", path("y.npy"), "--params",
                    path("p.safetensors"),
                    "--updated-params", path("p.safetensors"),
                ]
            if last {
                try Numpy.write(f.tensor("dy", as: Double.self), to: path("dy.npy"))
                args += [
                    "--grad-output", path("dy.npy"), "--grad-input", path("dx.npy"),
                    "--grad-params", path("g.safetensors"),
                ]
                if f.string("mode") == "eval" { args.append("--eval") }
            }
            var command = try NormKitCommand.parseAsRoot(args)
            try command.run()
        }
        func expectClose(_ array: StoredArray?, _ key: String) {
            guard case .float64(let t)? = array else {
                Issue.record("\(c) \(key): missing or not float64")
                return
            }
            let comparison = Comparison(t.scalars, (f.tensor(key) as Tensor<Double>).scalars)
            #expect(comparison.relative < 1e-9, "\(c) \(key): \(comparison)")
        }
        expectClose(try Numpy.read(contentsOf: path("y.npy")), "y")
        expectClose(try Numpy.read(contentsOf: path("dx.npy")), "dx")
        let grads = try Safetensors.read(contentsOf: path("g.safetensors"))
        for (fileKey, fixtureKey) in c.gradients { expectClose(grads.tensors[fileKey], fixtureKey) }
    }

    @Test func unknownAggregationsAreRefused() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let x = dir.appendingPathComponent("x.npy").path
        try Numpy.write(try Tensor<Double>(zeros: [2, 4, 3]), to: x)
        var command = try NormKitCommand.parseAsRoot([
            "apply", "metanorm", "--aggregations", "in,xx", "--input", x, "--output", x + ".out",
        ])
        #expect(throws: NormError.self) { try command.run() }
    }
}

@Suite("normkit weights")
struct WeightsCommandTests {
    @Test func readsEveryLayerOfAFile() throws {
        var file = Safetensors.File()
        file.tensors["layer1.sn.mean_weight"] = .float32(Tensor([0, 0, 0]))
        file.tensors["layer1.sn.var_weight"] = .float32(Tensor([1000, 0, 0]))
        file.tensors["layer2.sn.mean_weight"] = .float64(Tensor([2, 0]))
        file.tensors["layer2.sn.var_weight"] = .float64(Tensor([0, 2]))
        let report = try ImportanceReport.read(
            file, layer: "switchnorm", radius: nil, aggregations: "")
        #expect(report.entries.count == 2)
        #expect(report.entries[0].components == ["IN", "LN", "BN"])
        #expect(report.entries[0].mean.allSatisfy { abs($0 - 1.0 / 3) < 1e-12 })
        #expect(report.entries[0].variance == [1, 0, 0])
        #expect(report.entries[1].components == ["IN", "LN"])
        #expect(report.text.contains("layer1.sn mean: IN 0.333  LN 0.333  BN 0.333"))
        let sparse = try ImportanceReport.read(
            file, layer: "sparseswitchnorm", radius: 1, aggregations: "")
        #expect(sparse.entries[1].mean == [1, 0])
        #expect(throws: (any Error).self) {
            _ = try ImportanceReport.read(
                Safetensors.File(), layer: "switchnorm", radius: nil, aggregations: "")
        }
    }
}

/// `normkit apply` for the whitening layers against the PyTorch fixtures (training mode).
@Suite("normkit apply, whitening")
struct WhiteningApplyTests {
    @Test(arguments: [
        ("dbn/rank4_group2", ["dbn", "--group-size", "2"]),
        ("iternorm/rank4_group2_T3", ["iternorm", "--group-size", "2", "--iterations", "3"]),
        ("switchwhiten/type5", ["switchwhiten", "--group-size", "2", "--sw-type", "5"]),
    ])
    func applyMatchesPyTorch(_ name: String, _ flags: [String]) throws {
        let f = try RawFixture.load(name)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ n: String) -> String { dir.appendingPathComponent(n).path }
        var params = Safetensors.File()
        for key in ["weight", "bias", "sw_mean_weight", "sw_var_weight"] where f.has(key) {
            params.tensors[key] = f.file.tensors[key]
        }
        try Safetensors.write(params, to: path("p.safetensors"))
        try Numpy.write(f.tensor("x", as: Double.self), to: path("x.npy"))
        try Numpy.write(f.tensor("dy", as: Double.self), to: path("dy.npy"))
        var command = try NormKitCommand.parseAsRoot(
            ["apply"] + flags + [
                "--input", path("x.npy"), "--output", path("y.npy"), "--params",
                path("p.safetensors"),
                "--grad-output", path("dy.npy"), "--grad-input", path("dx.npy"), "--updated-params",
                path("u.safetensors"),
            ])
        try command.run()
        for (file, key) in [("y.npy", "y"), ("dx.npy", "dx")] {
            let got = try Numpy.read(contentsOf: path(file)).tensor(as: Double.self)
            let c = Comparison(got.scalars, (f.tensor(key) as Tensor<Double>).scalars)
            #expect(c.relative < 1e-8, "\(name) \(key): \(c)")
        }
        #expect(FileManager.default.fileExists(atPath: path("u.safetensors")))
    }

    /// A single Kalman Normalization layer is the first of its chain: with no predecessor its
    /// estimate is the batch's own, so in training it normalizes exactly as BatchNorm does.
    @Test func kalmanNormAloneIsTheFirstLayerOfAChain() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let x = dir.appendingPathComponent("x.npy").path
        var g = SeededGenerator(seed: 3)
        try Numpy.write(
            try Tensor<Double>.randomNormal(shape: [4, 3, 5], mean: 2, using: &g), to: x)
        for layer in ["kalmannorm", "batchnorm"] {
            var command = try NormKitCommand.parseAsRoot([
                "apply", layer, "--input", x, "--output", x + "." + layer,
            ])
            try command.run()
        }
        let kn = try Numpy.read(contentsOf: x + ".kalmannorm").tensor(as: Double.self)
        let bn = try Numpy.read(contentsOf: x + ".batchnorm").tensor(as: Double.self)
        #expect(kn.shape == bn.shape)
        let worst = zip(kn.scalars, bn.scalars).map { abs($0 - $1) }.max() ?? .infinity
        #expect(worst < 1e-9)
    }
}
