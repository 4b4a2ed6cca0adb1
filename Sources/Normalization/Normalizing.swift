import TensorCore

/// What a normalizer keeps between calls, under PyTorch `state_dict` names: parameters and
/// floating-point buffers as tensors, integer buffers (`num_batches_tracked`, Sparse SN's
/// `mean_fixed`) as counters (int64 in files).
public struct NormState<Scalar: NormScalar>: Sendable, Equatable {
    /// Parameters and floating-point buffers by key (`weight`, `running_mean`, …).
    public var tensors: [String: Tensor<Scalar>]
    /// Integer buffers by key (`num_batches_tracked`).
    public var counters: [String: Int]

    /// A state from its tensors and counters.
    public init(tensors: [String: Tensor<Scalar>] = [:], counters: [String: Int] = [:]) {
        self.tensors = tensors
        self.counters = counters
    }

    /// The tensor under a key.
    public subscript(key: String) -> Tensor<Scalar>? { tensors[key] }

    /// Every key, tensors and counters together, sorted.
    public var keys: [String] { (Array(tensors.keys) + Array(counters.keys)).sorted() }
}

/// What ``Normalizing/backward(_:)`` returns: dL/dx, dL/d(parameter) under the parameter's key,
/// and dL/d(conditioning input) for conditional normalizers (AdaIN's `style`).
public struct NormGradients<Scalar: NormScalar>: Sendable {
    /// dL/dx.
    public var input: Tensor<Scalar>
    /// Parameter gradients by the parameters' `state_dict` keys.
    public var parameters: [String: Tensor<Scalar>]
    /// Gradients into conditioning inputs by their names (empty for unconditional layers).
    public var conditions: [String: Tensor<Scalar>]

    /// Gradients from their parts.
    public init(
        input: Tensor<Scalar>, parameters: [String: Tensor<Scalar>] = [:],
        conditions: [String: Tensor<Scalar>] = [:]
    ) {
        self.input = input
        self.parameters = parameters.compactMapValues { $0 }
        self.conditions = conditions
    }
}

/// How an optimiser should treat a parameter.
public enum ParameterRole: String, Sendable, Hashable {
    /// γ, β and other ordinary weights.
    case affine
    /// Mixture logits of learned normalizers (SN, SSN, MetaNorm, SW): their own learning rate
    /// and no weight decay, as the official code trains them.
    case mixture
    /// Kalman Normalization's transition and gain.
    case kalman
    /// Weights of a conditioning network (SPADE's convolutions, CBN's embedding).
    case conditioning
}

/// Every activation normalizer: standard, learned, whitening, Kalman and conditional.
///
/// The layer keeps what ``backward(_:)`` needs from the last ``normalize(_:mode:)`` call, so a
/// training loop is
/// ```swift
/// let y = try layer.normalize(x, mode: .training)
/// let g = try layer.backward(dy)          // g.input, g.parameters["weight"], …
/// try layer.setParameters(updated)        // shape-checked, all or nothing
/// ```
/// Parameters and buffers use PyTorch's `state_dict` keys, so a state saved by PyTorch loads
/// with ``load(_:)`` and ``state()`` writes one PyTorch reads. A call that throws changes
/// nothing: no parameter, buffer, counter or cached value.
public protocol Normalizing<Scalar>: AnyObject {
    /// The element type.
    associatedtype Scalar: NormScalar

    /// The layer's name in messages (`"BatchNorm"`).
    var displayName: String { get }

    /// Normalizes `x`; training mode may update running statistics.
    func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar>

    /// dL/dx and the parameter gradients for the last ``normalize(_:mode:)`` call.
    func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar>

    /// The trainable parameters by `state_dict` key.
    var parameters: [String: Tensor<Scalar>] { get }

    /// Replaces some or all parameters; every key must be a parameter of the layer and every
    /// shape must match (checked before anything changes).
    func setParameters(_ values: [String: Tensor<Scalar>]) throws

    /// Parameters, buffers and counters.
    func state() throws -> NormState<Scalar>

    /// Restores a state saved by ``state()`` or by PyTorch: shape-checked and all or nothing.
    /// Keys the layer does not have are refused with an error naming them.
    func load(_ state: NormState<Scalar>) throws

    /// The optimiser role of a parameter (default ``ParameterRole/affine``).
    func role(ofParameter key: String) -> ParameterRole
}

extension Normalizing {
    /// Every parameter is an ordinary weight unless the layer says otherwise.
    public func role(ofParameter key: String) -> ParameterRole { .affine }
}

/// A normalizer with no parameters and no buffers (AdaIN, UnitNorm): the protocol's parameter
/// and state requirements, written once.
public protocol ParameterlessNormalizing: Normalizing {}

extension ParameterlessNormalizing {
    /// No parameters.
    public var parameters: [String: Tensor<Scalar>] { [:] }

    /// Refuses every key.
    public func setParameters(_ values: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(values, current: [:], layer: displayName)
    }

    /// An empty state.
    public func state() throws -> NormState<Scalar> { NormState() }

    /// Accepts only an empty state.
    public func load(_ state: NormState<Scalar>) throws {
        try refuseUnknownKeys(state.keys, known: [], layer: displayName)
    }
}

/// A normalizer that also reads conditioning inputs: AdaIN's style, conditional BN's labels,
/// SPADE's segmentation map, adaLN's conditioning vector, fused add + RMSNorm's residual.
public protocol ConditionalNormalizing<Scalar>: Normalizing {
    /// The conditioning inputs' names, in the order the CLI lists them (`["style"]`).
    var conditionNames: [String] { get }
    /// Sets the conditioning inputs for the next ``Normalizing/normalize(_:mode:)`` call.
    func setConditions(_ conditions: [String: Tensor<Scalar>]) throws
    /// Outputs besides the normalized tensor from the last call, by name (fused add + RMSNorm's
    /// `residual`); empty by default.
    var auxiliaryOutputs: [String: Tensor<Scalar>] { get }
}

extension ConditionalNormalizing {
    /// No outputs besides the normalized tensor.
    public var auxiliaryOutputs: [String: Tensor<Scalar>] { [:] }
}

/// Shape-checked parameter replacement shared by the conformances: refuses unknown keys and
/// wrong shapes before anything is written.
public func checkedParameterUpdate<Scalar: NormScalar>(
    _ values: [String: Tensor<Scalar>], current: [String: Tensor<Scalar>], layer: String
) throws(NormError) {
    for (key, value) in values.sorted(by: { $0.key < $1.key }) {
        guard let old = current[key] else {
            throw .unknownParameter(
                layer: layer, key: key, known: current.keys.sorted())
        }
        guard old.shape == value.shape else {
            throw .parameterShapeMismatch(name: key, expected: old.shape, actual: value.shape)
        }
    }
}

/// A normalizer that learns a mixture of statistics (SN, SSN, MetaNorm, Switchable Whitening):
/// its importance weights, for reports.
public protocol MixtureNormalizing {
    /// The components' names and the mean and variance importance weights.
    var importanceWeights: (components: [String], mean: [Double], variance: [Double]) { get }
}

/// A normalizer with a per-step schedule (Sparse SN's radius) and parameters it may freeze
/// itself (Sparse SN's one-hot weights).
public protocol ScheduledNormalizing {
    /// Advances the schedule by one training step.
    func advanceSchedule()
    /// Parameters the layer has frozen; an optimiser must stop moving them.
    var frozenParameterKeys: Set<String> { get }
}

/// γ, β and the two mixture-logit vectors of a learned normalizer, by official key.
///
/// SN, Sparse SN, MetaNorm and Switchable Whitening use `weight`, `bias`, `<prefix>mean_weight`
/// and `<prefix>var_weight` (Switchable Whitening's prefix is `sw_`). Used for the parameters
/// and, with the gradient tensors, for the gradients.
public func mixtureParameters<Scalar: NormScalar>(
    scale: Tensor<Scalar>, offset: Tensor<Scalar>, meanLogits: Tensor<Scalar>,
    varianceLogits: Tensor<Scalar>, logitPrefix: String = ""
) -> [String: Tensor<Scalar>] {
    [
        "weight": scale, "bias": offset, logitPrefix + "mean_weight": meanLogits,
        logitPrefix + "var_weight": varianceLogits,
    ]
}

/// The optimiser role of a mixture layer's parameter: the logits (keys ending in `_weight`)
/// are ``ParameterRole/mixture``, γ and β ``ParameterRole/affine``.
public func mixtureRole(ofParameter key: String) -> ParameterRole {
    key.hasSuffix("_weight") ? .mixture : .affine
}

/// A normalizer whose kernels can be chosen (fast or reference), so that the two can be checked
/// against each other.
public protocol KernelSelectable: AnyObject {
    /// Which kernels compute the layer.
    var kernels: KernelChoice { get set }
}
