import Foundation
import NormKit
import NormTestSupport
import Testing

@testable import NormKitCLI

/// `normkit apply` for the conditional and LLM-era layers, with the issue's command-line forms,
/// against the PyTorch fixtures of `Tools/generate_conditional_fixtures.py`.
@Suite("normkit apply: conditional and LLM-era layers")
struct ConditionalApplyTests {
    static let tolerance = 1e-9

    /// A little-endian int64 `.npy` file (what `np.save` writes for class labels).
    static func writeInt64(_ values: [Int64], to path: String) throws {
        var header = "{'descr': '<i8', 'fortran_order': False, 'shape': (\(values.count),), }"
        while (10 + header.utf8.count + 1) % 64 != 0 { header += " " }
        header += "\n"
        var bytes: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, 1, 0]
        bytes += [UInt8(header.utf8.count & 0xff), UInt8(header.utf8.count >> 8)]
        bytes += Array(header.utf8)
        for v in values {
            for i in 0..<8 {
                bytes.append(UInt8(truncatingIfNeeded: UInt64(bitPattern: v) >> (8 * UInt64(i))))
            }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    /// Fixture, extra flags, condition flags → fixture tensor, gradient flags → fixture key.
    static let cases: [(String, [String], [String: String], [String: String])] = [
        ("adain_unbiased_rank4", [], ["--style": "style"], ["--grad-style": "dstyle"]),
        (
            "adain_biased_rank3_alpha03", ["--unbiased", "false", "--alpha", "0.3"],
            ["--style": "style"], ["--grad-style": "dstyle"]
        ),
        ("conditionalbn_embedding_rank4", ["--classes", "5"], ["--labels": "labels"], [:]),
        (
            "conditionalbn_biggan_rank4", ["--unit-offset", "true"], ["--condition": "condition"],
            ["--grad-condition": "dcondition"]
        ),
        ("spade_batch3x3_down", [], ["--segmap": "segmap"], ["--grad-segmap": "dsegmap"]),
        (
            "spade_instance5x5_same", ["--spade-config", "spadeinstance5x5"],
            ["--segmap": "segmap"], ["--grad-segmap": "dsegmap"]
        ),
        (
            "adaln_tokens_nogate", ["--gate", "false"], ["--condition": "condition"],
            ["--grad-condition": "dcondition"]
        ),
        ("adaln_film_no_norm", ["--film", "--gate", "false"], ["--condition": "condition"], [:]),
        ("dyt_rank3_last", [], [:], [:]),
        ("dyt_rank4_first", ["--layout", "nchw"], [:], [:]),
        ("dyt_rank3_nobias", [], [:], [:]),
        ("rmsnorm1p_rank3", [], [:], [:]),
        ("qknorm_heads", [], [:], [:]),
        ("unitnorm_rank3", [], [:], [:]),
        (
            "addrmsnorm_rank3_unit_offset", ["--unit-offset", "true"], ["--residual": "residual"],
            [:]
        ),
    ]

    @Test(arguments: cases.indices)
    func applyMatchesPyTorch(_ index: Int) throws {
        let (name, flags, conditionFlags, gradientFlags) = Self.cases[index]
        let f = try RawFixture.load("conditional/" + name)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ file: String) -> String { dir.appendingPathComponent(file).path }

        let layer = f.string("layer")!
        let conditionKeys = Set(conditionFlags.values).union(["residual", "branch", "x", "y", "h"])
        var params = Safetensors.File()
        for key in f.file.tensors.keys where f.has("d" + key) && !conditionKeys.contains(key) {
            params.tensors[key] = f.file.tensors[key]
        }
        for key in f.file.tensors.keys where key.hasSuffix(".in") {
            params.tensors[String(key.dropLast(3))] = f.file.tensors[key]
        }
        try Safetensors.write(params, to: path("p.safetensors"))
        try Numpy.write(f.tensor("x", as: Double.self), to: path("x.npy"))
        try Numpy.write(f.tensor("dy", as: Double.self), to: path("dy.npy"))
        var args = [
            "apply", layer, "--input", path("x.npy"), "--output", path("y.npy"), "--params",
            path("p.safetensors"), "--grad-output", path("dy.npy"), "--grad-params",
            path("g.safetensors"),
        ]
        if let eps = f.number("eps") { args += ["--eps", "\(eps)"] }
        args += flags
        for (flag, key) in conditionFlags {
            if key == "labels", case .int64(_, let values)? = f.file.tensors["labels"] {
                try Self.writeInt64(values, to: path("labels.npy"))
            } else {
                try Numpy.write(f.tensor(key, as: Double.self), to: path(key + ".npy"))
            }
            args += [flag, path(key + ".npy")]
        }
        for (flag, key) in gradientFlags { args += [flag, path(key + ".npy")] }
        if layer == "addrmsnorm" {
            args += ["--residual-output", path("h.npy")]
        } else {
            args += ["--grad-input", path("dx.npy")]
        }
        var command = try NormKitCommand.parseAsRoot(args)
        try command.run()

        func expectClose(_ file: String, _ key: String) throws {
            guard case .float64(let a) = try Numpy.read(contentsOf: path(file)) else {
                Issue.record("\(name): \(file) is not float64")
                return
            }
            let expected: Tensor<Double> = f.tensor(key)
            #expect(a.shape == expected.shape, "\(name) \(key)")
            let c = Comparison(a.scalars, expected.scalars)
            #expect(c.relative < Self.tolerance, "\(name) \(key): \(c)")
        }
        try expectClose("y.npy", "y")
        if layer == "addrmsnorm" {
            // The fixture's dx includes dL/dh from h's other uses, which the CLI does not take.
            try expectClose("h.npy", "h")
        } else {
            try expectClose("dx.npy", "dx")
        }
        for key in gradientFlags.values { try expectClose(key + ".npy", key) }
        let grads = try Safetensors.read(contentsOf: path("g.safetensors"))
        for key in params.tensors.keys where f.has("d" + key) {
            guard case .float64(let g)? = grads.tensors[key] else {
                Issue.record("\(name): no gradient for \(key)")
                continue
            }
            let c = Comparison(g.scalars, (f.tensor("d" + key) as Tensor<Double>).scalars)
            #expect(c.relative < Self.tolerance, "\(name) d\(key): \(c)")
        }
    }

    @Test func badConditionsFailBeforeAnythingIsWritten() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "normkit-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ file: String) -> String { dir.appendingPathComponent(file).path }
        try Numpy.write(try Tensor<Float>(zeros: [2, 3, 4, 4]), to: path("x.npy"))
        try Numpy.write(try Tensor<Float>(zeros: [2, 4, 4, 4]), to: path("style.npy"))
        try Self.writeInt64([0, 7], to: path("labels.npy"))
        for args in [
            ["adain", "--style", path("style.npy")],
            ["conditionalbn", "--labels", path("labels.npy"), "--classes", "3"],
            ["adain"],
        ] {
            var command = try NormKitCommand.parseAsRoot(
                ["apply"] + args + ["--input", path("x.npy"), "--output", path("y.npy")])
            #expect(throws: NormError.self) { try command.run() }
            #expect(!FileManager.default.fileExists(atPath: path("y.npy")))
        }
    }
}
