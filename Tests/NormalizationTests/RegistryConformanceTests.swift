import NormKit
import NormTestSupport
import Testing

/// Every registry normalizer, through the `Normalizing` protocol only.
///
/// Finite differences in
/// training and inference, fast against reference kernels, and errors that leave the state
/// unchanged. A new registry entry is checked here without writing a test.
@Suite("Registry conformance")
struct RegistryConformanceTests {
    static let shape = [3, 4, 2, 3]
    static let names = NormalizerRegistry.all.entries.filter(\.conditions.isEmpty).map(\.name)

    /// The layer with its parameters moved away from their initial values (so that γ = 1,
    /// β = 0 and equal mixture logits do not hide a wrong gradient).
    static func layer<T: NormScalar>(_ name: String, as _: T.Type) throws -> any Normalizing<T> {
        var options = NormalizerOptions()
        options.groups = 2
        options.values["group-size"] = "2"
        // Batch Renorm treats r and d as constants in backward (the paper's stop-gradient), so
        // its gradient is the true derivative only where they are clipped to r = 1, d = 0; its
        // own tests check the detached formula with active corrections.
        options.values["rmax"] = "1"
        options.values["dmax"] = "0"
        let layer = try NormalizerRegistry.all.make(
            name, NormalizerRequest(inputShape: shape, options: options), as: T.self)
        var g = SeededGenerator(seed: 17)
        var moved: [String: Tensor<T>] = [:]
        for (key, value) in layer.parameters {
            moved[key] = value.map { $0 + T(0.3 * g.nextNormal()) }
        }
        try layer.setParameters(moved)
        return layer
    }

    static func input<T: NormScalar>(_: T.Type, seed: UInt64 = 4) throws -> Tensor<T> {
        var g = SeededGenerator(seed: seed)
        return try Tensor<T>.randomNormal(
            shape: shape, mean: 0.7, standardDeviation: 1.3, using: &g)
    }

    @Test(arguments: names)
    func gradientsMatchFiniteDifferences(_ name: String) throws {
        let layer = try Self.layer(name, as: Double.self)
        let x = try Self.input(Double.self)
        try Conformance.checkGradients(layer, input: x, mode: .training, tolerance: 1e-5)
        _ = try layer.normalize(try Self.input(Double.self, seed: 9), mode: .training)
        try Conformance.checkGradients(layer, input: x, mode: .inference, tolerance: 1e-5)
    }

    @Test(arguments: names)
    func fastKernelsMatchTheReference(_ name: String) throws {
        let x = try Self.input(Float.self)
        for mode in [Mode.training, .inference] {
            try Conformance.checkFastMatchesReference(
                { try Self.layer(name, as: Float.self) }, input: x, mode: mode, tolerance: 1e-4)
        }
    }

    @Test(arguments: names)
    func anErrorLeavesTheStateUnchanged(_ name: String) throws {
        let layer = try Self.layer(name, as: Double.self)
        _ = try layer.normalize(try Self.input(Double.self), mode: .training)
        var g = SeededGenerator(seed: 1)
        let wrong = try Tensor<Double>.randomNormal(shape: [3, 5, 2, 4], using: &g)
        try Conformance.checkErrorLeavesStateUnchanged(layer, badInput: wrong, mode: .training)
        let nan = try Self.input(Double.self).map { _ in .nan }
        let before = try layer.state()
        _ = try? layer.normalize(nan, mode: .training)
        // A NaN batch may produce NaN outputs, but never NaN running statistics.
        let after = try layer.state()
        for (key, value) in after.tensors where before.tensors[key]?.isFinite == true {
            #expect(value.isFinite, "\(name): \(key) became non-finite after a NaN batch")
        }
    }

    @Test func listedNamesAreUniqueAndResolve() throws {
        var seen: Set<String> = []
        for entry in NormalizerRegistry.all.entries {
            for name in [entry.name] + entry.aliases {
                #expect(seen.insert(name).inserted, "\(name) is listed twice")
                #expect(try NormalizerRegistry.all.entry(named: name).name == entry.name)
            }
        }
        #expect(throws: NormError.self) { try NormalizerRegistry.all.entry(named: "nosuchnorm") }
    }
}
