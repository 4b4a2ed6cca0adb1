import TensorCore

/// Ψ's per-channel affine recovery, `y = γ_c·x̂ + β_c`: the two parameter vectors, their shape
/// check, and the backward, as one value that every layer with a channel affine holds.
///
/// ```
/// forward:   y = γ_c·x̂ + β_c
/// backward:  dx̂ = γ_c·dy,   dγ_c = Σ dy·x̂,   dβ_c = Σ dy     (sums over every axis but C)
/// ```
/// The fused kernels compute Σ dy·x̂ and Σ dy while they pass over the data; layers that hold
/// x̂ themselves (the whitening layers) use ``apply(to:batch:spatial:)`` and
/// ``backward(_:normalized:batch:spatial:)`` over channels-first `[N, C, L]` Doubles.
///
/// ## Shape
/// γ, β: `[C]` (`weight`, `bias` in PyTorch checkpoints).
public struct ChannelAffine<Scalar: NormScalar>: Sendable, Equatable {
    /// γ; `weight` in checkpoints.
    public var scale: Tensor<Scalar>
    /// β; `bias` in checkpoints.
    public var offset: Tensor<Scalar>

    /// γ = 1 (or 0 with `zeroInitialScale`, the `last_gamma` initialisation), β = 0.
    /// - Throws: ``NormError/invalidHyperparameter(name:value:requirement:)`` when C < 1.
    public init(channelCount: Int, zeroInitialScale: Bool = false) throws(NormError) {
        guard channelCount >= 1 else {
            throw .invalidHyperparameter(
                name: "channel count", value: "\(channelCount)", requirement: "must be ≥ 1")
        }
        do {
            scale = try Tensor(repeating: zeroInitialScale ? 0 : 1, shape: [channelCount])
            offset = try Tensor(zeros: [channelCount])
        } catch { throw .tensor(error) }
    }

    /// An affine from given γ and β (checked by ``validate(channelCount:)`` before use).
    public init(scale: Tensor<Scalar>, offset: Tensor<Scalar>) {
        self.scale = scale
        self.offset = offset
    }

    /// γ and β under their `state_dict` keys.
    public var parameters: [String: Tensor<Scalar>] {
        [ParameterKey.scale.rawValue: scale, ParameterKey.offset.rawValue: offset]
    }

    /// Throws when γ or β is not `[channelCount]` (after a load or a direct assignment).
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)``.
    public func validate(channelCount: Int) throws(NormError) {
        for (key, t) in [(ParameterKey.scale, scale), (.offset, offset)]
        where t.shape != [channelCount] {
            throw .parameterShapeMismatch(
                name: key.rawValue, expected: [channelCount], actual: t.shape)
        }
    }

    /// dγ and dβ as tensors under their keys, from the per-channel sums Σ dy·x̂ and Σ dy.
    /// - Throws: ``NormError/tensor(_:)`` when the sums do not have C entries.
    public func gradients(scaleSums: [Double], offsetSums: [Double]) throws(NormError)
        -> [String: Tensor<Scalar>]
    {
        do {
            return [
                ParameterKey.scale.rawValue: try Tensor(shape: scale.shape, rounding: scaleSums),
                ParameterKey.offset.rawValue: try Tensor(
                    shape: offset.shape, rounding: offsetSums),
            ]
        } catch { throw .tensor(error) }
    }

    /// `y ← γ_c·y + β_c` in place over channels-first `[N, C, L]` values.
    /// - Throws: ``NormError/shapeMismatch(name:expected:actual:)`` when `values` does not hold
    ///   N·C·L entries (nothing changes then).
    public func apply(to values: inout [Double], batch: Int, spatial: Int) throws(NormError) {
        let c = scale.count
        try Self.check("values", values.count, batch: batch, channels: c, spatial: spatial)
        let gs = scale.scalars.map(Double.init)
        let os = offset.scalars.map(Double.init)
        // Element i of [N, C, L] belongs to channel (i / L) mod C.
        for i in values.indices {
            let ch = (i / spatial) % c
            values[i] = values[i] * gs[ch] + os[ch]
        }
    }

    /// The backward of ``apply(to:batch:spatial:)``: dx̂ = γ_c·dy and the per-channel sums
    /// dγ = Σ dy·x̂, dβ = Σ dy, over channels-first `[N, C, L]` values.
    /// - Parameters:
    ///   - dy: dL/dy, `[N, C, L]`.
    ///   - normalized: x̂, the input of the affine, `[N, C, L]`.
    /// - Throws: ``NormError/shapeMismatch(name:expected:actual:)`` when a buffer does not hold
    ///   N·C·L entries.
    public func backward(_ dy: [Double], normalized: [Double], batch: Int, spatial: Int)
        throws(NormError) -> (normalizedGradient: [Double], scale: [Double], offset: [Double])
    {
        let c = scale.count
        try Self.check("dy", dy.count, batch: batch, channels: c, spatial: spatial)
        try Self.check("x̂", normalized.count, batch: batch, channels: c, spatial: spatial)
        var g = dy
        let gs = scale.scalars.map(Double.init)
        var dg = [Double](repeating: 0, count: c)
        var db = [Double](repeating: 0, count: c)
        for i in g.indices {
            let ch = (i / spatial) % c
            dg[ch] += g[i] * normalized[i]
            db[ch] += g[i]
            g[i] *= gs[ch]
        }
        return (g, dg, db)
    }

    /// Throws unless `count` = N·C·L (checked arithmetic: sizes come from callers).
    private static func check(_ name: String, _ count: Int, batch: Int, channels: Int, spatial: Int)
        throws(NormError)
    {
        let (nc, o1) = batch.multipliedReportingOverflow(by: channels)
        let (expected, o2) = nc.multipliedReportingOverflow(by: spatial)
        guard batch >= 0, spatial >= 0, !o1, !o2, count == expected else {
            throw .shapeMismatch(name: name, expected: [batch, channels, spatial], actual: [count])
        }
    }
}
