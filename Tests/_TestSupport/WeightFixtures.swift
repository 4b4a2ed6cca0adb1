import Foundation
import NormKit

/// One case of `Tools/generate_weight_fixtures.py` (`weightnorm/<case>`): a Linear or Conv2d
/// whose weight PyTorch parametrized, with its state before and after and every gradient.
public struct WeightFixture: Sendable, CustomStringConvertible {
    /// The raw fixture.
    public let raw: RawFixture

    /// Loads `weightnorm/<case>`.
    public init(_ name: String) throws { raw = try RawFixture.load(name) }

    /// Every case name.
    public static var names: [String] { RawFixture.names("weightnorm") }

    /// The case name.
    public var description: String { raw.name }

    /// `linear` or `conv2d`.
    public var layer: String { raw.string("layer") ?? "" }
    /// The generator's method: none, wn, wn-legacy, cwn, ws, ws-bit, sn, sn-legacy.
    public var method: String { raw.string("method") ?? "" }
    /// The CLI's method name (legacy forms share their method's name).
    public var cliMethod: String {
        method.replacingOccurrences(of: "-legacy", with: "")
    }
    /// Earlier training-mode calls.
    public var steps: Int { Int(raw.number("steps") ?? 0) }
    /// The final call is in inference mode.
    public var isEval: Bool { raw.string("mode") == "eval" }
    /// Convolution stride and padding.
    public var stride: Int { Int(raw.number("stride") ?? 1) }
    /// Convolution padding.
    public var padding: Int { Int(raw.number("padding") ?? 0) }
    /// `dim` (nil: the whole tensor, written as null).
    public var dim: Int? {
        if case .other? = raw.spec["dim"] { return nil }
        return Int(raw.number("dim") ?? 0)
    }

    /// The library options that reproduce the case.
    public var options: WeightNormMethod.Options {
        var o = WeightNormMethod.Options()
        o.dim = dim
        o.epsilon = raw.number("eps")
        o.learnableScale = raw.bool("learnable_scale") ?? false
        o.scale = raw.number("nscale") ?? 1.414
        o.powerIterations = Int(raw.number("iterations") ?? 1)
        o.legacySpectralNorm = method == "sn-legacy"
        return o
    }

    /// The library method.
    public var libraryMethod: WeightNormMethod {
        WeightNormMethod(rawValue: cliMethod) ?? .none
    }

    /// The tensors under `prefix` (`in/`, `out/`, `grad/`), prefix removed.
    public func state<T: NormScalar>(_ prefix: String, as _: T.Type = T.self) -> [String: Tensor<
        T
    >] {
        var out: [String: Tensor<T>] = [:]
        for key in raw.file.tensors.keys where key.hasPrefix(prefix) {
            out[String(key.dropFirst(prefix.count))] = raw.tensor(key, as: T.self)
        }
        return out
    }

    /// The raw weight (v for WN, the original weight otherwise) before the first call.
    public func originalWeight<T: NormScalar>(as _: T.Type = T.self) -> Tensor<T> {
        let s: [String: Tensor<T>] = state("in/")
        for key in [
            "weight", "parametrizations.weight.original", "parametrizations.weight.original1",
            "weight_orig", "weight_v",
        ] {
            if let t = s[key] { return t }
        }
        fatalError("\(raw.name) has no weight")
    }

    /// The parametrization with the case's configuration and initial state (bias excluded).
    public func makeParametrization<T: NormScalar>(as _: T.Type = T.self) throws
        -> any WeightParametrization<T>
    {
        let p = try libraryMethod.make(weight: originalWeight(as: T.self), options: options)
        var s: [String: Tensor<T>] = state("in/")
        s["bias"] = nil
        try p.load(NormState(tensors: s))
        return p
    }

    /// Maps a fixture key to the library's (legacy names to current ones).
    public func libraryKey<T>(_ key: String, in p: any WeightParametrization<T>) -> String {
        p.legacyKeys[key] ?? key
    }
}
