import NormKit

/// A trainable tensor: its value, the gradient of the last backward pass, and the optimiser
/// group it belongs to.
public final class Parameter<Scalar: NormScalar> {
    /// The name in checkpoints (`conv1.weight`, `block1.norm1.mean_weight`).
    public var name: String
    /// The value.
    public var value: Tensor<Scalar>
    /// dL/dvalue from the last backward pass (accumulated by ``Module/backward(_:)``).
    public var gradient: Tensor<Scalar>
    /// The optimiser group (`"default"`, `"norm"`, `"mixture"`): groups get their own learning
    /// rate and weight decay, as the learned normalizers' logits need.
    public var group: String
    /// A frozen parameter is not updated by the optimiser (Sparse SN's one-hot weights).
    public var isFrozen = false

    /// Creates a parameter with a zero gradient.
    public init(name: String, value: Tensor<Scalar>, group: String = "default") {
        self.name = name
        self.value = value
        self.gradient = (try? Tensor(zeros: value.shape)) ?? value
        self.group = group
    }

    /// Sets the gradient to zero.
    public func zeroGradient() {
        gradient = (try? Tensor(zeros: value.shape)) ?? gradient
    }
}

/// A layer of the training harness: forward keeps what backward needs (of the last call), and
/// backward adds parameter gradients into ``Parameter/gradient``.
public protocol Module: AnyObject {
    /// The element type.
    associatedtype Scalar: NormScalar
    /// Computes the output; in `.training` mode normalizers update their running statistics.
    func forward(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar>
    /// dL/dx from dL/dy for the last forward call; parameter gradients are added.
    func backward(_ dy: Tensor<Scalar>) throws -> Tensor<Scalar>
    /// Trainable parameters, with names relative to this module.
    var parameters: [Parameter<Scalar>] { get }
    /// Non-trainable state (running statistics) by name, for checkpoints.
    var buffers: [String: Tensor<Scalar>] { get }
    /// Restores buffers saved by ``buffers``.
    func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws
}

extension Module {
    /// No buffers by default.
    public var buffers: [String: Tensor<Scalar>] { [:] }
    /// Nothing to restore by default.
    public func loadBuffers(_ buffers: [String: Tensor<Scalar>]) throws {}
}

/// Errors of the training harness.
public enum TrainingError: Error, Equatable, CustomStringConvertible {
    /// An input has the wrong shape for a layer.
    case shape(layer: String, expected: String, actual: [Int])
    /// backward was called before forward.
    case noForward(layer: String)
    /// A name (model, normalizer, data set) is not known.
    case unknownName(kind: String, name: String, known: [String])
    /// A setting is out of range.
    case invalidSetting(name: String, value: String, requirement: String)
    /// A checkpoint does not fit the model.
    case checkpoint(String)
    /// Training diverged: a layer met NaN or infinite values (`what`) in its state or input.
    case diverged(layer: String, what: String)

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .shape(let layer, let expected, let actual):
            return "\(layer) expects \(expected), got shape \(actual)"
        case .noForward(let layer):
            return "\(layer): backward called before forward"
        case .unknownName(let kind, let name, let known):
            return "unknown \(kind) '\(name)'; known: \(known.joined(separator: ", "))"
        case .invalidSetting(let name, let value, let requirement):
            return "\(name) = \(value) is invalid: \(requirement)"
        case .checkpoint(let reason):
            return "checkpoint does not fit the model: \(reason)"
        case .diverged(let layer, let what):
            return
                "\(layer): \(what) holds NaN or infinite values; training diverged (try a smaller "
                + "learning rate)"
        }
    }
}
