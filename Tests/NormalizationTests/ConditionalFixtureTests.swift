import NormKit
import NormTestSupport
import Testing

/// Builds the layer of a `conditional/` fixture (Tools/generate_conditional_fixtures.py) with
/// the case's configuration, parameters, buffers and conditioning inputs.
enum ConditionalCase {
    /// The layer, its conditioning inputs, and the mode of the final call.
    struct Built<T: NormScalar> {
        let layer: any Normalizing<T>
        let conditions: [String: Tensor<T>]
        let mode: Mode
    }

    static func parameterKeys(_ f: RawFixture) -> [String] {
        f.file.tensors.keys.filter { key in
            key.hasPrefix("d") && key != "dx" && key != "dy" && key != "dh"
                && f.has(String(key.dropFirst()))
        }.map { String($0.dropFirst()) }.sorted()
    }

    static func make<T: NormScalar>(_ f: RawFixture, as _: T.Type) throws -> Built<T> {
        let x: Tensor<T> = f.tensor("x")
        let layerName = f.string("layer")!
        var conditions: [String: Tensor<T>] = [:]
        let layer: any Normalizing<T>
        var state: [String: Tensor<T>] = [:]
        var conditionNames: [String] = []
        switch layerName {
        case "adain":
            layer = try AdaIN<T>(
                convention: f.bool("unbiased")! ? .pytorchPort : .originalTorch,
                alpha: f.number("alpha") ?? 1)
            conditionNames = ["style"]
        case "conditionalbn":
            let source: ConditionalBatchNorm<T>.Source =
                f.string("source") == "embedding"
                ? .embedding(classes: Int(f.number("classes")!))
                : .linear(
                    conditionDimension: Int(f.number("condition_dim")!),
                    unitOffset: f.bool("one_plus") ?? false)
            layer = try ConditionalBatchNorm<T>(channelCount: x.shape[1], source: source)
            conditionNames = f.has("labels") ? ["labels"] : ["condition"]
            state["running_mean"] = f.tensor("running_mean.in")
            state["running_var"] = f.tensor("running_var.in")
        case "spade":
            layer = try SPADE<T>(
                channelCount: x.shape[1], labelCount: Int(f.number("label_nc")!),
                hiddenCount: Int(f.number("hidden")!), kernelSize: Int(f.number("ks")!),
                norm: f.string("norm") == "batch" ? .batch : .instance)
            conditionNames = ["segmap"]
            if f.has("param_free_norm.running_mean.in") {
                for key in ["running_mean", "running_var"] {
                    state["param_free_norm." + key] = f.tensor("param_free_norm.\(key).in")
                }
            }
        case "adaln":
            layer = try AdaLN<T>(
                featureCount: x.shape.last!, conditionDimension: Int(f.number("condition_dim")!),
                gated: f.bool("gate") ?? false, normalizes: f.string("norm") != "none",
                silu: f.bool("silu") ?? true, epsilon: f.number("eps") ?? 1e-6)
            conditionNames = ["condition"]
        case "dyt":
            let last = f.string("layout") != "nchw"
            layer = try DynamicTanh<T>(
                channelCount: last ? x.shape.last! : x.shape[1], bias: f.bool("bias") ?? true,
                layout: last ? .channelsLast : .channelsFirst)
        case "addrmsnorm":
            layer = try AddRMSNorm<T>(
                featureCount: x.shape.last!, epsilon: f.number("eps") ?? 1e-6,
                unitOffset: f.bool("unit_offset") ?? false)
            conditionNames = ["residual"]
        case "rmsnorm1p":
            layer = try WeightedRMSNorm<T>(
                featureCount: x.shape.last!, epsilon: f.number("eps") ?? 1e-6, unitOffset: true)
        case "qknorm":
            layer = try QKNorm<T>(headDimension: x.shape.last!, epsilon: f.number("eps") ?? 1e-6)
        case "unitnorm":
            layer = try UnitNorm<T>()
        default:
            fatalError("unknown fixture layer \(layerName)")
        }
        for key in parameterKeys(f)
        where !conditionNames.contains(key)
            && !["residual", "branch"].contains(key)
        {
            state[key] = f.tensor(key)
        }
        try layer.load(NormState(tensors: state))
        for name in conditionNames { conditions[name] = f.tensor(name) }
        if let conditional = layer as? any ConditionalNormalizing<T> {
            try conditional.setConditions(conditions)
        }
        return Built(
            layer: layer, conditions: conditions,
            mode: f.string("mode") == "eval" ? .inference : .training)
    }
}

/// Every conditional and LLM-era layer against its PyTorch version (float64 fixtures).
@Suite("Conditional and LLM-era layers vs PyTorch")
struct ConditionalFixtureTests {
    static let cases = RawFixture.names("conditional")

    static func check<T: NormScalar>(_ f: RawFixture, as _: T.Type, tolerance: Double) throws {
        let built = try ConditionalCase.make(f, as: T.self)
        let layer = built.layer
        for k in 0..<Int(f.number("steps") ?? 0) {
            _ = try layer.normalize(f.tensor("x.\(k)", as: T.self), mode: .training)
        }
        let y = try layer.normalize(f.tensor("x", as: T.self), mode: built.mode)
        var compared: [(String, Tensor<T>, String)] = [("y", y, "y")]
        var gradients: NormGradients<T>
        if let adaln = layer as? AdaLN<T>, f.has("dh") {
            let h = try adaln.gatedResidual(f.tensor("residual"), branch: f.tensor("branch"))
            let (dr, db) = try adaln.gatedResidualBackward(f.tensor("dh"))
            compared += [("h", h, "h"), ("dresidual", dr, "dresidual"), ("dbranch", db, "dbranch")]
            gradients = try adaln.backward(f.tensor("dy"))
        } else if let add = layer as? AddRMSNorm<T> {
            gradients = try add.backward(f.tensor("dy"), residualOutputGradient: f.tensor("dh"))
            compared.append(("h", add.residualOutput!, "h"))
        } else {
            gradients = try layer.backward(f.tensor("dy"))
        }
        compared.append(("dx", gradients.input, "dx"))
        for (name, g) in gradients.conditions {
            compared.append(("d" + name, g, "d" + name))
        }
        for key in ConditionalCase.parameterKeys(f) where layer.parameters[key] != nil {
            compared.append(("d" + key, gradients.parameters[key]!, "d" + key))
        }
        let state = try layer.state().tensors
        for key in f.file.tensors.keys where key.hasSuffix(".out") {
            let name = String(key.dropLast(".out".count))
            compared.append((name, state[name]!, key))
        }
        // Every gradient and buffer the fixture has is compared.
        let expectedKeys = Set(
            f.file.tensors.keys.filter {
                ($0.hasPrefix("d") && $0 != "dy" && $0 != "dh") || $0.hasSuffix(".out")
            })
        #expect(expectedKeys.isSubset(of: Set(compared.map(\.2))), "\(f) compares every gradient")
        for (label, actual, key) in compared {
            let expected: Tensor<Double> = f.tensor(key)
            #expect(actual.shape == expected.shape, "\(f) \(label) shape")
            let c = Comparison(actual.scalars, expected.scalars)
            #expect(c.relative <= tolerance, "\(f) \(label): \(c)")
        }
    }

    @Test(arguments: cases)
    func doubleMatchesPyTorch(_ name: String) throws {
        try Self.check(RawFixture.load(name), as: Double.self, tolerance: 1e-9)
    }

    @Test(arguments: cases)
    func floatMatchesPyTorch(_ name: String) throws {
        let f = try RawFixture.load(name)
        // 1000 + 0.05·noise must normalize to within 1e-3 of float64 (design.md, Numerics).
        try Self.check(f, as: Float.self, tolerance: (f.number("offset") ?? 0) > 0 ? 1e-3 : 1e-4)
    }

    @Test func everyLayerHasFixtures() {
        let layers = Set(Self.cases.map { $0.split(separator: "/")[1].split(separator: "_")[0] })
        #expect(
            layers == [
                "adain", "conditionalbn", "spade", "adaln", "dyt", "addrmsnorm", "rmsnorm1p",
                "qknorm", "unitnorm",
            ])
    }
}

/// Central finite differences in Double into every input, conditioning input and parameter, on
/// every fixture's configuration: L = Σ y ⊙ dy.
@Suite("Conditional layers: finite differences")
struct ConditionalGradientTests {
    /// Relative error allowed: central differences with h = 1e-5 are exact to about 1e-9 here.
    static let tolerance = 1e-6

    @Test(
        arguments: ConditionalFixtureTests.cases.filter {
            !$0.contains("offset") && !$0.contains("hidden128")
        })
    func gradientsMatchFiniteDifferences(_ name: String) throws {
        let f = try RawFixture.load(name)
        let built = try ConditionalCase.make(f, as: Double.self)
        let layer = built.layer
        let x: Tensor<Double> = f.tensor("x")
        let dy: Tensor<Double> = f.tensor("dy")
        // Every input but the integer labels has a gradient, and every parameter does.
        let conditions = built.conditions.filter { $0.key != "labels" }
        let results = try GradientCheck.run(
            layer, input: x, outputGradient: dy, mode: .training, conditions: built.conditions)
        #expect(
            Set(results.map(\.name))
                == Set(["x"] + Array(layer.parameters.keys) + Array(conditions.keys)),
            "\(name): \(results.map(\.name))")
        for r in results {
            #expect(r.relativeError <= Self.tolerance, "\(name) \(r)")
        }
    }
}
