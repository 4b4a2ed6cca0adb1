import Normalization
import TensorCore

/// Spatially-adaptive normalization (SPADE): a parameter-free BatchNorm or InstanceNorm whose
/// recovery is a per-pixel γ and β predicted from a segmentation map.
///
/// ```
/// m = nearest_resize(segmap, H × W)
/// a = ReLU(Conv_k(m; L → hidden))
/// y = PFN(x) ⊙ (1 + Conv_k(a; hidden → C)) + Conv_k(a; hidden → C)
/// ```
/// Following NVlabs/SPADE's `normalization.py`: the configuration string `spade<norm><k>x<k>`
/// (`spadebatch3x3`, `spadeinstance3x3`; `syncbatch` is BatchNorm on one process) picks the
/// parameter-free norm and the kernel size; hidden width 128 by default; padding k/2; the
/// "1 +" makes γ = 0 a unit scale. Nearest resizing takes source index ⌊i·in/out⌋ (PyTorch's
/// `mode='nearest'`, computed in integers). Φ is an unchanged ``BatchNorm`` (running statistics
/// and modes as BatchNorm's) or ``InstanceNorm`` without affine parameters; Ψ is
/// ``ConditionalAffine`` per element. Backward reaches x, every convolution and the
/// segmentation map (through the convolutions and the adjoint of the resize).
///
/// Parameter keys are the official ones: `mlp_shared.0.weight` `[hidden, L, k, k]`,
/// `mlp_shared.0.bias`, `mlp_gamma.weight` `[C, hidden, k, k]`, `mlp_gamma.bias`,
/// `mlp_beta.weight`, `mlp_beta.bias`; buffers `param_free_norm.running_mean`,
/// `param_free_norm.running_var`, `param_free_norm.num_batches_tracked` (BatchNorm only).
/// Initial weights: the repository's `init_weights('xavier', 0.02)`, normal with standard
/// deviation 0.02·√(2/(fan_in + fan_out)) from a seeded generator; biases 0.
///
/// ## Shape
/// x `[N, C, H, W]`; segmap `[N, L, H_s, W_s]` (any spatial size); output x's shape.
///
/// ## References
/// 1. Park, Liu, Wang & Zhu 2019, "Semantic Image Synthesis with Spatially-Adaptive
///    Normalization", arXiv:1903.07291.
public final class SPADE<Scalar: NormScalar>: ConditionalNormalizing, CustomStringConvertible {
    /// The parameter-free normalization before the spatial recovery.
    public enum ParameterFreeNorm: String, Sendable, Hashable, CaseIterable {
        /// BatchNorm without affine parameters (`batch`, `syncbatch`).
        case batch
        /// InstanceNorm without affine parameters (`instance`).
        case instance
    }

    /// C.
    public let channelCount: Int
    /// L, the segmentation map's channels.
    public let labelCount: Int
    /// The shared convolution's output channels (128 in the official code).
    public let hiddenCount: Int
    /// k (odd).
    public let kernelSize: Int
    /// The parameter-free norm.
    public let parameterFreeNorm: ParameterFreeNorm
    /// Φ.
    public let normLayer: NormLayer<Scalar>
    private var values: [String: Tensor<Scalar>]
    private var segmap: Tensor<Scalar>?
    private var cache: Cache?

    private struct Cache {
        let normalized: Tensor<Scalar>
        let normCache: NormLayer<Scalar>.Cache
        let resized: [Scalar]
        let preActivation: [Scalar]
        let activation: [Scalar]
        let gamma: [Double]
        let segmapShape: [Int]
    }

    static var bufferPrefix: String { "param_free_norm." }

    /// The layer's name in messages.
    public var displayName: String { "SPADE" }
    /// One conditioning input, `segmap`.
    public var conditionNames: [String] { ["segmap"] }

    /// Creates a SPADE layer from the official configuration string (`spadebatch3x3`,
    /// `spadeinstance3x3`, `spadesyncbatch5x5`).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` for another string.
    public convenience init(
        configuration: String, channelCount: Int, labelCount: Int, hiddenCount: Int = 128,
        epsilon: Double = 1e-5, momentum: Momentum = .pytorchDefault, seed: UInt64 = 0
    ) throws(NormError) {
        let (norm, k) = try Self.parse(configuration)
        try self.init(
            channelCount: channelCount, labelCount: labelCount, hiddenCount: hiddenCount,
            kernelSize: k, norm: norm, epsilon: epsilon, momentum: momentum, seed: seed)
    }

    /// Parses `spade<norm><k>x<k>`.
    public static func parse(_ text: String) throws(NormError) -> (ParameterFreeNorm, Int) {
        let bad = NormError.invalidHyperparameter(
            name: "SPADE configuration", value: text,
            requirement: "must read spade<batch|syncbatch|instance><k>x<k>, e.g. spadebatch3x3")
        guard text.hasPrefix("spade") else { throw bad }
        let rest = text.dropFirst("spade".count)
        let letters = rest.prefix { $0.isLetter }
        let sizes = rest.dropFirst(letters.count).split(separator: "x")
        guard sizes.count == 2, let k = Int(sizes[0]), Int(sizes[1]) == k else { throw bad }
        switch letters {
        case "batch", "syncbatch": return (.batch, k)
        case "instance": return (.instance, k)
        default: throw bad
        }
    }

    /// Creates a SPADE layer.
    /// - Parameters:
    ///   - channelCount: C.
    ///   - labelCount: L.
    ///   - hiddenCount: the shared convolution's width (128 in the official code).
    ///   - kernelSize: k, odd.
    ///   - norm: BatchNorm or InstanceNorm (both without affine parameters).
    ///   - epsilon, momentum: the parameter-free norm's.
    ///   - seed: the seed of the initial weights.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)``.
    public init(
        channelCount: Int, labelCount: Int, hiddenCount: Int = 128, kernelSize: Int = 3,
        norm: ParameterFreeNorm = .batch, epsilon: Double = 1e-5,
        momentum: Momentum = .pytorchDefault, seed: UInt64 = 0
    ) throws(NormError) {
        for (name, v) in [
            ("channel count", channelCount), ("label count", labelCount),
            ("hidden width", hiddenCount),
        ] where v < 1 {
            throw .invalidHyperparameter(name: name, value: "\(v)", requirement: "must be ≥ 1")
        }
        guard kernelSize >= 1, kernelSize % 2 == 1 else {
            throw .invalidHyperparameter(
                name: "kernel size", value: "\(kernelSize)",
                requirement: "must be odd (padding k/2 keeps the feature map's size)")
        }
        // The convolution weights, before they are allocated (and before k·k can overflow).
        let kernelLimit = 1 << 10
        guard kernelSize <= kernelLimit else {
            throw .invalidHyperparameter(
                name: "kernel size", value: "\(kernelSize)",
                requirement: "must be at most \(kernelLimit)")
        }
        try HyperparameterCheck.parameterSize(
            [hiddenCount, labelCount, kernelSize, kernelSize], name: "mlp_shared.0.weight")
        try HyperparameterCheck.parameterSize(
            [channelCount, hiddenCount, kernelSize, kernelSize], name: "mlp_gamma.weight")
        self.channelCount = channelCount
        self.labelCount = labelCount
        self.hiddenCount = hiddenCount
        self.kernelSize = kernelSize
        parameterFreeNorm = norm
        switch norm {
        case .batch:
            normLayer = try BatchNorm(
                featureCount: channelCount, epsilon: epsilon, momentum: momentum, affine: false)
        case .instance:
            normLayer = try InstanceNorm(featureCount: channelCount, epsilon: epsilon)
        }
        var generator = SeededGenerator(seed: seed)
        let k2 = kernelSize * kernelSize
        func xavier(_ shape: [Int]) throws(NormError) -> Tensor<Scalar> {
            let fanIn = Double(shape[1] * k2)
            let fanOut = Double(shape[0] * k2)
            let std = 0.02 * (2 / (fanIn + fanOut)).squareRoot()
            let count = shape.reduce(1, *)
            let v = (0..<count).map { _ in std * generator.nextNormal() }
            do { return try Tensor(shape: shape, rounding: v) } catch { throw .tensor(error) }
        }
        func zeros(_ n: Int) throws(NormError) -> Tensor<Scalar> {
            do { return try Tensor(zeros: [n]) } catch { throw .tensor(error) }
        }
        values = [
            "mlp_shared.0.weight": try xavier([hiddenCount, labelCount, kernelSize, kernelSize]),
            "mlp_shared.0.bias": try zeros(hiddenCount),
            "mlp_gamma.weight": try xavier([channelCount, hiddenCount, kernelSize, kernelSize]),
            "mlp_gamma.bias": try zeros(channelCount),
            "mlp_beta.weight": try xavier([channelCount, hiddenCount, kernelSize, kernelSize]),
            "mlp_beta.bias": try zeros(channelCount),
        ]
    }

    private var shared: SameConvolution<Scalar> {
        SameConvolution(
            inputChannels: labelCount, outputChannels: hiddenCount, kernelSize: kernelSize)
    }
    private var head: SameConvolution<Scalar> {
        SameConvolution(
            inputChannels: hiddenCount, outputChannels: channelCount, kernelSize: kernelSize)
    }

    /// Sets the segmentation map `[N, L, H_s, W_s]`.
    /// - Throws: ``NormError/invalidCondition(name:problem:)`` for a wrong rank or label count,
    ///   or NaN; the previous map is kept then.
    public func setConditions(_ conditions: [String: Tensor<Scalar>]) throws {
        for key in conditions.keys.sorted() where key != "segmap" {
            throw NormError.unknownParameter(layer: displayName, key: key, known: conditionNames)
        }
        guard let s = conditions["segmap"] else {
            throw NormError.invalidCondition(name: "segmap", problem: "is missing")
        }
        // N = 0 is an empty batch (as the input's); an empty map plane has nothing to resize.
        guard s.rank == 4, s.shape[1] == labelCount, s.shape[2] > 0, s.shape[3] > 0 else {
            throw NormError.invalidCondition(
                name: "segmap",
                problem:
                    "must have shape [N, \(labelCount), H, W] (rank 4, H, W ≥ 1), got \(s.shape)")
        }
        guard s.isFinite else {
            throw NormError.invalidCondition(
                name: "segmap", problem: "contains NaN or infinity (shape \(s.shape))")
        }
        segmap = s
    }

    // MARK: - Forward

    /// PFN(x) ⊙ (1 + γ(m)) + β(m).
    /// - Throws: ``NormError`` for a missing map, one whose batch differs from x's, or an x that
    ///   is not `[N, C, H, W]`; nothing changes then (running statistics included).
    public func normalize(_ x: Tensor<Scalar>, mode: Mode) throws -> Tensor<Scalar> {
        guard let segmap else {
            throw NormError.invalidCondition(
                name: "segmap", problem: "is missing (set it with setConditions)")
        }
        guard x.rank == 4 else {
            throw NormError.invalidRank(
                layer: displayName, expected: "rank 4 [N, C, H, W]", shape: x.shape)
        }
        guard x.shape[1] == channelCount else {
            throw NormError.channelMismatch(
                layer: displayName, expected: channelCount, actual: x.shape[1], shape: x.shape)
        }
        guard segmap.shape[0] == x.shape[0] else {
            throw NormError.invalidCondition(
                name: "segmap",
                problem: "must have the input's batch size: segmap \(segmap.shape), input "
                    + "\(x.shape)")
        }
        // An empty batch is computed (every loop is empty); an empty plane with N > 0 has
        // statistic sets of no values.
        guard x.count > 0 || x.shape[0] == 0 else {
            throw NormError.emptyTensor(layer: displayName, shape: x.shape)
        }
        let (n, h, w) = (x.shape[0], x.shape[2], x.shape[3])
        let resized = Self.resize(segmap, height: h, width: w)
        let pre = shared.forward(
            resized, batch: n, height: h, width: w, weight: values["mlp_shared.0.weight"]!.scalars,
            bias: values["mlp_shared.0.bias"]!.scalars)
        let activation = pre.map { max($0, 0) }
        let gamma = head.forward(
            activation, batch: n, height: h, width: w,
            weight: values["mlp_gamma.weight"]!.scalars, bias: values["mlp_gamma.bias"]!.scalars
        ).map { 1 + Double($0) }
        let beta = head.forward(
            activation, batch: n, height: h, width: w, weight: values["mlp_beta.weight"]!.scalars,
            bias: values["mlp_beta.bias"]!.scalars
        ).map { Double($0) }
        let (normalized, normCache) = try normLayer.forward(x, mode: mode)
        let y = try ConditionalAffine(.elementwise).apply(normalized, scale: gamma, offset: beta)
        cache = Cache(
            normalized: normalized, normCache: normCache, resized: resized, preActivation: pre,
            activation: activation, gamma: gamma, segmapShape: segmap.shape)
        return y
    }

    /// Nearest resize of `[N, L, H_s, W_s]` to `[N, L, H, W]`: source index ⌊i·H_s/H⌋.
    static func resize(_ s: Tensor<Scalar>, height h: Int, width w: Int) -> [Scalar] {
        let (n, l, hs, ws) = (s.shape[0], s.shape[1], s.shape[2], s.shape[3])
        var out = [Scalar](repeating: 0, count: n * l * h * w)
        for plane in 0..<n * l {
            for i in 0..<h {
                let si = i * hs / h
                for j in 0..<w {
                    out[(plane * h + i) * w + j] = s.scalars[(plane * hs + si) * ws + j * ws / w]
                }
            }
        }
        return out
    }

    /// The adjoint of ``resize(_:height:width:)``: each source pixel collects the gradients of
    /// the pixels copied from it.
    static func resizeAdjoint(_ g: [Scalar], shape: [Int], height h: Int, width w: Int)
        -> [Scalar]
    {
        let (n, l, hs, ws) = (shape[0], shape[1], shape[2], shape[3])
        var out = [Scalar](repeating: 0, count: n * l * hs * ws)
        for plane in 0..<n * l {
            for i in 0..<h {
                let si = i * hs / h
                for j in 0..<w {
                    out[(plane * hs + si) * ws + j * ws / w] += g[(plane * h + i) * w + j]
                }
            }
        }
        return out
    }

    // MARK: - Backward

    /// dx through the parameter-free norm of g = dy ⊙ (1 + γ); dγ = dy ⊙ x̂ and dβ = dy per
    /// element, then back through both head convolutions, the ReLU, the shared convolution and
    /// the resize into the segmentation map (`conditions["segmap"]`).
    /// - Throws: ``NormError/noForwardCall(layer:)``, ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>) throws -> NormGradients<Scalar> {
        guard let cache else { throw NormError.noForwardCall(layer: displayName) }
        let x = cache.normCache.input
        guard dy.shape == x.shape else {
            throw NormError.gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let (n, h, w) = (x.shape[0], x.shape[2], x.shape[3])
        let (g, dGamma, dBeta) = try ConditionalAffine(.elementwise).backward(
            dy, normalized: cache.normalized, scale: cache.gamma)
        let dx = try normLayer.backward(g, cache: cache.normCache).input
        let gammaPart = head.backward(
            dGamma.map { Scalar($0) }, input: cache.activation, batch: n, height: h, width: w,
            weight: values["mlp_gamma.weight"]!.scalars)
        let betaPart = head.backward(
            dBeta.map { Scalar($0) }, input: cache.activation, batch: n, height: h, width: w,
            weight: values["mlp_beta.weight"]!.scalars)
        var dPre = [Scalar](repeating: 0, count: cache.preActivation.count)
        for i in 0..<dPre.count where cache.preActivation[i] > 0 {
            dPre[i] = gammaPart.input[i] + betaPart.input[i]
        }
        let sharedPart = shared.backward(
            dPre, input: cache.resized, batch: n, height: h, width: w,
            weight: values["mlp_shared.0.weight"]!.scalars)
        let dSegmap = Self.resizeAdjoint(
            sharedPart.input, shape: cache.segmapShape, height: h, width: w)
        func t(_ key: String, _ v: [Scalar]) throws -> Tensor<Scalar> {
            try Tensor(shape: values[key]!.shape, scalars: v)
        }
        return NormGradients(
            input: dx,
            parameters: [
                "mlp_shared.0.weight": try t("mlp_shared.0.weight", sharedPart.weight),
                "mlp_shared.0.bias": try t("mlp_shared.0.bias", sharedPart.bias),
                "mlp_gamma.weight": try t("mlp_gamma.weight", gammaPart.weight),
                "mlp_gamma.bias": try t("mlp_gamma.bias", gammaPart.bias),
                "mlp_beta.weight": try t("mlp_beta.weight", betaPart.weight),
                "mlp_beta.bias": try t("mlp_beta.bias", betaPart.bias),
            ],
            conditions: ["segmap": try Tensor(shape: cache.segmapShape, scalars: dSegmap)])
    }

    // MARK: - Parameters and state

    /// The three convolutions by the official keys.
    public var parameters: [String: Tensor<Scalar>] { values }

    /// Replaces parameters (shape-checked, all or nothing).
    public func setParameters(_ new: [String: Tensor<Scalar>]) throws {
        try checkedParameterUpdate(new, current: values, layer: displayName)
        values.merge(new) { $1 }
    }

    /// Parameters and, for BatchNorm, `param_free_norm.running_mean`, `…running_var` and the
    /// counter `…num_batches_tracked`.
    public func state() throws -> NormState<Scalar> {
        let inner = normLayer.state()
        var tensors = values
        for (key, value) in inner.tensors { tensors[Self.bufferPrefix + key] = value }
        var counters: [String: Int] = [:]
        for (key, count) in inner.counters { counters[Self.bufferPrefix + key] = count }
        return NormState(tensors: tensors, counters: counters)
    }

    /// Restores parameters and buffers (shape-checked, all or nothing).
    public func load(_ state: NormState<Scalar>) throws {
        let current = try self.state()
        for key in state.keys where current.tensors[key] == nil && current.counters[key] == nil {
            throw NormError.unknownParameter(layer: displayName, key: key, known: current.keys)
        }
        for (key, value) in state.tensors where current.tensors[key]!.shape != value.shape {
            throw NormError.parameterShapeMismatch(
                name: key, expected: current.tensors[key]!.shape, actual: value.shape)
        }
        var buffers: [String: Tensor<Scalar>] = [:]
        for (key, value) in state.tensors where key.hasPrefix(Self.bufferPrefix) {
            buffers[String(key.dropFirst(Self.bufferPrefix.count))] = value
        }
        try normLayer.load(
            buffers, batchesTracked: state.counters[Self.bufferPrefix + "num_batches_tracked"])
        values.merge(state.tensors.filter { values[$0.key] != nil }) { $1 }
    }

    /// The convolutions are a conditioning network.
    public func role(ofParameter key: String) -> ParameterRole { .conditioning }

    // MARK: - CustomStringConvertible

    /// One line with the configuration, in the official string convention.
    public var description: String {
        "SPADE(spade\(parameterFreeNorm.rawValue)\(kernelSize)x\(kernelSize), C=\(channelCount), "
            + "labels=\(labelCount), hidden=\(hiddenCount))"
    }
}
