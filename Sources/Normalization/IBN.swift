import TensorCore

/// IBN-a of IBN-Net: instance normalization (with affine) on the first channels, batch
/// normalization on the rest, concatenated.
///
/// ```
/// y[:, :h] = InstanceNorm(x[:, :h]) (affine),   y[:, h:] = BatchNorm(x[:, h:]),   h = ⌊C·ratio⌋
/// ```
/// The official module (XingangPan/IBN-Net `IBN`) uses ratio 0.5 and replaces the first
/// normalizer of the residual blocks of layer1…layer3. IBN-b is instance normalization with
/// affine applied after the residual addition, which is ``InstanceNorm`` with `affine: true` in
/// that slot (``instanceAfterResidual(channelCount:)``).
///
/// Checkpoint names follow the official module: `IN.weight`, `IN.bias`, `BN.weight`, `BN.bias`,
/// `BN.running_mean`, `BN.running_var`, `BN.num_batches_tracked`.
///
/// ## Shape
/// Input `[N, C, …]` (or channels-last) with at least one spatial axis; output the same.
///
/// ## References
/// 1. Pan, Luo, Shi & Tang 2018, "Two at Once: Enhancing Learning and Generalization Capacities
///    via IBN-Net", arXiv:1807.09441.
public final class IBN<Scalar: NormScalar>: CustomStringConvertible {
    /// What the last ``normalize(_:mode:)`` call keeps for ``backward(_:)`` (the
    /// ``Normalizing`` entry points; `forward(_:mode:)` returns its cache instead).
    public var lastCache: Cache?

    /// C.
    public let channelCount: Int
    /// h, the channels that get instance normalization.
    public let instanceChannels: Int
    /// Channel axis.
    public let layout: Layout
    /// The instance-normalized part (affine, no running statistics).
    public let instance: InstanceNorm<Scalar>
    /// The batch-normalized part.
    public let batch: BatchNorm<Scalar>

    /// Creates IBN-a.
    /// - Parameter ratio: the share of channels that get instance normalization (0.5).
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` when either part
    ///   would have no channels.
    public init(
        channelCount: Int, ratio: Double = 0.5, epsilon: Double = 1e-5,
        layout: Layout = .channelsFirst
    )
        throws(NormError)
    {
        try HyperparameterCheck.fraction(ratio, name: "IBN ratio")
        try HyperparameterCheck.epsilon(epsilon)
        let h = Int(Double(channelCount) * ratio)
        guard h >= 1, h < channelCount else {
            throw .invalidHyperparameter(
                name: "IBN ratio", value: "\(ratio) of \(channelCount) channels",
                requirement: "both parts need at least one channel")
        }
        self.channelCount = channelCount
        self.instanceChannels = h
        self.layout = layout
        instance = try InstanceNorm(featureCount: h, epsilon: epsilon, affine: true, layout: layout)
        batch = try BatchNorm(featureCount: channelCount - h, epsilon: epsilon, layout: layout)
    }

    /// IBN-b's normalizer: ``InstanceNorm`` with affine parameters, for after the residual add.
    public static func instanceAfterResidual(
        channelCount: Int, epsilon: Double = 1e-5, layout: Layout = .channelsFirst
    )
        throws(NormError) -> InstanceNorm<Scalar>
    {
        try InstanceNorm(featureCount: channelCount, epsilon: epsilon, affine: true, layout: layout)
    }

    /// The caches of both parts.
    public struct Cache: Sendable {
        let instance: NormLayer<Scalar>.Cache
        let batch: NormLayer<Scalar>.Cache
    }

    /// Gradients: dx and each part's parameter gradients.
    public struct Gradients: Sendable {
        /// dL/dx.
        public var input: Tensor<Scalar>
        /// The instance part's gradients (`IN.weight`, `IN.bias`).
        public var instance: NormLayer<Scalar>.Gradients
        /// The batch part's gradients (`BN.weight`, `BN.bias`).
        public var batch: NormLayer<Scalar>.Gradients
    }

    /// Normalizes both parts of `x`.
    /// - Throws: ``NormError`` for a wrong rank or channel count, or what either part throws.
    public func forward(_ x: Tensor<Scalar>, mode: Mode) throws(NormError) -> (
        output: Tensor<Scalar>, cache: Cache
    ) {
        guard x.rank >= 3 else {
            throw .invalidRank(layer: "IBN", expected: "rank ≥ 3 (N, C, spatial…)", shape: x.shape)
        }
        let axis = layout.channelAxis(rank: x.rank)
        guard x.shape[axis] == channelCount else {
            throw .channelMismatch(
                layer: "IBN", expected: channelCount, actual: x.shape[axis], shape: x.shape)
        }
        // An empty batch goes through both parts (as PyTorch); an empty spatial extent with
        // samples is refused here, so that the error names IBN and the whole input.
        guard x.count > 0 || x.shape[0] == 0 else {
            throw .emptyTensor(layer: "IBN", shape: x.shape)
        }
        let (a, b) = try ChannelSplit.split(x, at: instanceChannels, axis: axis)
        // Run the part that cannot change state first: if BatchNorm then throws, nothing changed.
        let (ya, ca) = try instance.forward(a, mode: mode)
        let (yb, cb) = try batch.forward(b, mode: mode)
        return (try ChannelSplit.concatenate(ya, yb, axis: axis), Cache(instance: ca, batch: cb))
    }

    /// Back-propagates through both parts.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``.
    public func backward(_ dy: Tensor<Scalar>, cache: Cache) throws(NormError) -> Gradients {
        let axis = layout.channelAxis(rank: dy.rank)
        guard dy.rank >= 2, dy.shape[axis] == channelCount else {
            throw .gradientShapeMismatch(expected: [channelCount], actual: dy.shape)
        }
        let (a, b) = try ChannelSplit.split(dy, at: instanceChannels, axis: axis)
        let ga = try instance.backward(a, cache: cache.instance)
        let gb = try batch.backward(b, cache: cache.batch)
        return Gradients(
            input: try ChannelSplit.concatenate(ga.input, gb.input, axis: axis), instance: ga,
            batch: gb)
    }

    /// Parameters and buffers under the official names (`IN.weight`, `BN.running_mean`, …).
    func stateTensors() -> (tensors: [String: Tensor<Scalar>], batchesTracked: Int?) {
        var tensors: [String: Tensor<Scalar>] = [:]
        for (k, v) in instance.stateTensors().tensors { tensors["IN." + k] = v }
        let bn = batch.stateTensors()
        for (k, v) in bn.tensors { tensors["BN." + k] = v }
        return (tensors, bn.batchesTracked)
    }

    /// Loads parameters and buffers by their official names.
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)``; nothing is loaded then.
    public func load(_ tensors: [String: Tensor<Scalar>], batchesTracked: Int? = nil)
        throws(NormError)
    {
        var a: [String: Tensor<Scalar>] = [:]
        var b: [String: Tensor<Scalar>] = [:]
        for (key, value) in tensors {
            if key.hasPrefix("IN.") {
                a[String(key.dropFirst(3))] = value
            } else if key.hasPrefix("BN.") {
                b[String(key.dropFirst(3))] = value
            } else {
                throw .unknownParameter(
                    layer: "IBN", key: key, known: state().tensors.keys.sorted())
            }
        }
        // Validate both before changing either.
        let savedInstance = instance.stateTensors().tensors
        try instance.load(a)
        do { try batch.load(b, batchesTracked: batchesTracked) } catch {
            try? instance.load(savedInstance)
            throw error
        }
    }

    /// One line with the configuration.
    public var description: String {
        "IBN-a(\(channelCount): IN on \(instanceChannels), BN on \(channelCount - instanceChannels), layout=\(layout))"
    }
}

/// Splitting and joining tensors along the channel axis (any rank, either layout).
enum ChannelSplit {
    static func split<S: NormScalar>(_ x: Tensor<S>, at h: Int, axis: Int) throws(NormError) -> (
        Tensor<S>, Tensor<S>
    ) {
        let c = x.shape[axis]
        let outer = x.shape[..<axis].reduce(1, *)
        let inner = x.shape[(axis + 1)...].reduce(1, *)
        var first: [S] = []
        var second: [S] = []
        first.reserveCapacity(outer * h * inner)
        second.reserveCapacity(outer * (c - h) * inner)
        x.withUnsafeBufferPointer { p in
            for o in 0..<outer {
                let base = o * c * inner
                first.append(contentsOf: p[base..<(base + h * inner)])
                second.append(contentsOf: p[(base + h * inner)..<(base + c * inner)])
            }
        }
        var shapeA = x.shape
        var shapeB = x.shape
        shapeA[axis] = h
        shapeB[axis] = c - h
        do {
            return (
                try Tensor(shape: shapeA, scalars: first),
                try Tensor(shape: shapeB, scalars: second)
            )
        } catch {
            throw .tensor(error)
        }
    }

    static func concatenate<S: NormScalar>(_ a: Tensor<S>, _ b: Tensor<S>, axis: Int)
        throws(NormError) -> Tensor<S>
    {
        let ha = a.shape[axis]
        let hb = b.shape[axis]
        let outer = a.shape[..<axis].reduce(1, *)
        let inner = a.shape[(axis + 1)...].reduce(1, *)
        var out: [S] = []
        out.reserveCapacity(a.count + b.count)
        a.withUnsafeBufferPointer { pa in
            b.withUnsafeBufferPointer { pb in
                for o in 0..<outer {
                    out.append(contentsOf: pa[(o * ha * inner)..<((o + 1) * ha * inner)])
                    out.append(contentsOf: pb[(o * hb * inner)..<((o + 1) * hb * inner)])
                }
            }
        }
        var shape = a.shape
        shape[axis] = ha + hb
        do { return try Tensor(shape: shape, scalars: out) } catch { throw .tensor(error) }
    }
}
