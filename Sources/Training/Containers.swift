import Foundation
import NormKit

/// Modules applied in order; backward runs them in reverse.
public final class Sequential<Scalar: NormScalar>: Module {
    /// The layers.
    public let layers: [any Module]
    let forwards: [(Tensor<Scalar>, Mode) throws -> Tensor<Scalar>]
    let backwards: [(Tensor<Scalar>) throws -> Tensor<Scalar>]
    let parameterLists: [() -> [Parameter<Scalar>]]
    let bufferLists: [() -> [String: Tensor<Scalar>]]
    let bufferLoaders: [([String: Tensor<Scalar>]) throws -> Void]

    /// Creates a container of modules (wrap each with ``Module/erased``).
    public convenience init(_ modules: AnyModule<Scalar>...) {
        self.init(modules: modules)
    }

    /// Creates a container from type-erased modules (``AnyModule``).
    public init(modules: [AnyModule<Scalar>]) {
        layers = modules.map(\.base)
        forwards = modules.map { m in { try m.forward($0, mode: $1) } }
        backwards = modules.map { m in { try m.backward($0) } }
        parameterLists = modules.map { m in { m.parameters } }
        bufferLists = modules.map { m in { m.buffers } }
        bufferLoaders = modules.map { m in { try m.loadBuffers($0) } }
    }

    /// The trainable parameters.
    public var parameters: [Parameter<Scalar>] { parameterLists.flatMap { $0() } }

    /// Running statistics and other non-trainable state.
    public var buffers: [String: Tensor<Scalar>] {
        bufferLists.reduce(into: [:]) { $0.merge($1()) { a, _ in a } }
    }

    /// Restores state saved from ``buffers``.
    public func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws {
        for load in bufferLoaders { try load(buffers) }
    }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        var h = x
        for f in forwards { h = try f(h, mode) }
        return h
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        var g = dy
        for b in backwards.reversed() { g = try b(g) }
        return g
    }
}

extension Module {
    /// This module behind a type-erased wrapper, for containers.
    public var erased: AnyModule<Scalar> { AnyModule(self) }
}

/// A type-erased module of a given element type.
public final class AnyModule<Scalar: NormScalar>: Module {
    let base: any Module
    let forwardBody: (Tensor<Scalar>, Mode) throws -> Tensor<Scalar>
    let backwardBody: (Tensor<Scalar>) throws -> Tensor<Scalar>
    let parametersBody: () -> [Parameter<Scalar>]
    let buffersBody: () -> [String: Tensor<Scalar>]
    let loadBody: ([String: Tensor<Scalar>]) throws -> Void

    /// Wraps a module.
    public init<M: Module>(_ module: M) where M.Scalar == Scalar {
        base = module
        forwardBody = module.forward
        backwardBody = module.backward
        parametersBody = { module.parameters }
        buffersBody = { module.buffers }
        loadBody = module.loadBuffers
    }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        try forwardBody(x, mode)
    }
    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> { try backwardBody(dy) }
    /// The trainable parameters.
    public var parameters: [Parameter<Scalar>] { parametersBody() }
    /// Running statistics and other non-trainable state.
    public var buffers: [String: Tensor<Scalar>] { buffersBody() }
    /// Restores state saved from ``buffers``.
    public func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws { try loadBody(buffers) }
}

/// A residual block: `relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))`, with any
/// normalizer in both slots; the shortcut is a 1×1 convolution (and normalizer) when the width
/// or stride changes.
public final class ResidualBlock<Scalar: NormScalar>: Module {
    let body: Sequential<Scalar>
    let shortcut: Sequential<Scalar>?
    let outputReLU = ReLU<Scalar>()

    /// Creates a block.
    public init(
        _ inChannels: Int, _ outChannels: Int, stride: Int = 1, normalizer: NormalizerChoice,
        groups: Int = 8,
        name: String, generator: inout SeededGenerator, radiusSteps: Int = 1,
        weightNorm: WeightNormMethod = .none
    ) throws {
        let withBias = normalizer == .none
        body = Sequential(
            try Conv2d<Scalar>(
                inChannels, outChannels, kernel: 3, stride: stride, padding: 1, bias: withBias,
                name: name + ".conv1", weightNorm: weightNorm,
                generator: &generator
            ).erased,
            try NormSlot<Scalar>(
                normalizer, channels: outChannels, groups: groups, name: name + ".norm1",
                radiusSteps: radiusSteps
            ).erased,
            ReLU<Scalar>().erased,
            try Conv2d<Scalar>(
                outChannels, outChannels, kernel: 3, padding: 1, bias: withBias,
                name: name + ".conv2", weightNorm: weightNorm,
                generator: &generator
            ).erased,
            try NormSlot<Scalar>(
                normalizer, channels: outChannels, groups: groups, name: name + ".norm2",
                radiusSteps: radiusSteps
            ).erased)
        if inChannels != outChannels || stride != 1 {
            shortcut = Sequential(
                try Conv2d<Scalar>(
                    inChannels, outChannels, kernel: 1, stride: stride, bias: withBias,
                    name: name + ".shortcut", weightNorm: weightNorm,
                    generator: &generator
                ).erased,
                try NormSlot<Scalar>(
                    normalizer, channels: outChannels, groups: groups,
                    name: name + ".shortcut_norm",
                    radiusSteps: radiusSteps
                ).erased)
        } else {
            shortcut = nil
        }
    }

    /// The trainable parameters.
    public var parameters: [Parameter<Scalar>] { body.parameters + (shortcut?.parameters ?? []) }
    /// Running statistics and other non-trainable state.
    public var buffers: [String: Tensor<Scalar>] {
        body.buffers.merging(shortcut?.buffers ?? [:]) { a, _ in a }
    }

    /// Restores state saved from ``buffers``.
    public func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws {
        try body.loadBuffers(buffers)
        try shortcut?.loadBuffers(buffers)
    }

    /// Computes the output (see the type's documentation).
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        let main = try body.forward(x, mode: mode)
        let skip = try shortcut?.forward(x, mode: mode) ?? x
        return try outputReLU.forward(try main + skip, mode: mode)
    }

    /// Back-propagates dL/dy to dL/dx, adding the parameters' gradients.
    public func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar> {
        let g = try outputReLU.backward(dy)
        let dxMain = try body.backward(g)
        let dxSkip = try shortcut?.backward(g) ?? g
        return try dxMain + dxSkip
    }
}

/// Mean softmax cross-entropy over a batch, with its gradient.
public enum SoftmaxCrossEntropy {
    /// Loss and dL/dlogits for logits `[N, K]` and labels in `0..<K`.
    /// - Throws: ``TrainingError/shape(layer:expected:actual:)`` for a label out of range or a
    ///   count that does not match.
    public static func evaluate<Scalar: NormScalar>(_ logits: Tensor<Scalar>, labels: [Int]) throws
        -> (
            loss: Double, gradient: Tensor<Scalar>, correct: Int
        )
    {
        guard logits.rank == 2, logits.shape[0] == labels.count else {
            throw TrainingError.shape(
                layer: "SoftmaxCrossEntropy", expected: "[\(labels.count), K]", actual: logits.shape
            )
        }
        let (n, k) = (logits.shape[0], logits.shape[1])
        guard labels.allSatisfy({ $0 >= 0 && $0 < k }) else {
            throw TrainingError.shape(
                layer: "SoftmaxCrossEntropy", expected: "labels in 0..<\(k)",
                actual: [labels.max() ?? -1])
        }
        var loss = 0.0
        var correct = 0
        var grad = [Scalar](repeating: 0, count: n * k)
        for i in 0..<n {
            let row = (0..<k).map { Double(logits.scalars[i * k + $0]) }
            let top = row.max() ?? 0
            let e = row.map { Foundation.exp($0 - top) }
            let total = e.reduce(0, +)
            loss += -(row[labels[i]] - top - Foundation.log(total))
            if row.firstIndex(of: top) == labels[i] { correct += 1 }
            for j in 0..<k {
                grad[i * k + j] = Scalar((e[j] / total - (j == labels[i] ? 1 : 0)) / Double(n))
            }
        }
        return (loss / Double(n), try Tensor(shape: [n, k], scalars: grad), correct)
    }
}
