import NormKernels
import TensorCore

/// What a mixture layer's forward (Switchable Normalization, Sparse SN, MetaNorm) keeps for
/// backward.
///
/// ## Shape
/// The input `[N, C, spatial…]`; the statistics per (sample, channel), `[N·C]`.
public struct MixtureCache<Scalar: NormScalar>: Sendable {
    let input: Tensor<Scalar>
    let plan: ReductionPlan
    /// L, the spatial positions per (sample, channel).
    let spatial: Int
    /// What the engine computed; nil for an empty batch (N = 0) outside synchronized training.
    let statistics: MixtureEngine.Statistics?
    /// Whether V is the unbiased spatial variance (SN) or the biased one (MetaNorm).
    let unbiasedInstanceVariance: Bool
}

/// Gradients of a scalar loss through a mixture layer.
public struct MixtureGradients<Scalar: NormScalar>: Sendable {
    /// dL/dx.
    public var input: Tensor<Scalar>
    /// dL/dγ.
    public var scale: Tensor<Scalar>
    /// dL/dβ.
    public var offset: Tensor<Scalar>
    /// dL/d(mean logits).
    public var meanLogits: Tensor<Scalar>
    /// dL/d(variance logits).
    public var varianceLogits: Tensor<Scalar>
}

/// The steps a mixture layer shares around ``MixtureEngine``: partial moments per
/// (sample, channel), apply, and the backward through the kernels.
extension MixtureEngine {
    /// The per-(sample, channel) plan of an input (reducing the spatial axes; none for rank 2),
    /// the channel indexing of γ and β, and L.
    func instancePlan(_ shape: [Int], layout: Layout) -> (
        plan: ReductionPlan, indexing: ParameterIndexing, spatial: Int
    ) {
        let spatialAxes = layout.spatialAxes(rank: shape.count)
        let plan = ReductionPlan(
            viewShape: shape, reduced: (0..<shape.count).map { spatialAxes.contains($0) })
        let indexing = ParameterIndexing(
            divisor: Shape.strides(shape)[layout.channelAxis(rank: shape.count)],
            modulus: channelCount)
        return (plan, indexing, spatialAxes.reduce(1) { $0 * shape[$1] })
    }

    /// M and V per (sample, channel): the partial moments every component aggregates.
    ///
    /// V is the biased spatial variance, or the unbiased one (0 for a single position, where the
    /// official SN code gives NaN).
    func instanceMoments<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, indexing: ParameterIndexing, spatial: Int,
        unbiased: Bool, kernels: KernelChoice
    ) -> (m: [Double], v: [Double]) {
        let op = ReferenceNormKernel.Operation(
            centers: true, scales: true, unbiased: false, epsilon: 0)
        let moments = kernels.moments(x, plan: plan, operation: op, indexing: indexing)
        guard unbiased else { return (moments.mean, moments.biasedVariance) }
        let correction = spatial > 1 ? Double(spatial) / Double(spatial - 1) : 0
        return (moments.mean, moments.biasedVariance.map { $0 * correction })
    }

    /// An empty batch (N = 0): an empty output of the input's shape and a cache whose backward
    /// gives an empty dx and zero parameter gradients.
    func emptyBatch<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, spatial: Int, unbiased: Bool
    ) throws(NormError) -> (output: Tensor<Scalar>, cache: MixtureCache<Scalar>) {
        let cache = MixtureCache(
            input: x, plan: plan, spatial: spatial, statistics: nil,
            unbiasedInstanceVariance: unbiased)
        do { return (try Tensor(zeros: x.shape), cache) } catch { throw .tensor(error) }
    }

    /// Throws unless both logit vectors have one entry per component.
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)``.
    func validateLogits<Scalar: NormScalar>(
        _ meanLogits: Tensor<Scalar>, _ varianceLogits: Tensor<Scalar>
    ) throws(NormError) {
        let k = components.count
        for (label, t) in [("mean_weight", meanLogits), ("var_weight", varianceLogits)]
        where t.count != k {
            throw .parameterShapeMismatch(name: label, expected: [k], actual: t.shape)
        }
    }

    /// y = γ·(x − μ)·rstd + β with the mixed statistics.
    func apply<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, indexing: ParameterIndexing,
        statistics: Statistics, affine: ChannelAffine<Scalar>, kernels: KernelChoice
    ) throws(NormError) -> Tensor<Scalar> {
        var y: Tensor<Scalar>
        do { y = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        if x.count > 0 {
            y.withUnsafeMutableBufferPointer { yb in
                kernels.forward(
                    x, plan: plan, mean: statistics.mean, rstd: statistics.rstd,
                    scale: affine.scale, offset: affine.offset, indexing: indexing, into: yb)
            }
        }
        return y
    }

    /// Back-propagates through the forward call that produced `cache`: the kernel's partial
    /// sums Σg, Σg·(x − μ) per (sample, channel) (g = γ·dy), the engine's reduction to dM, dV
    /// and the logit gradients, then `dx = rstd·g + dM/L + dV·2(x − M)/L′` with L′ = L − 1
    /// for an unbiased V and L for a biased one.
    /// - Throws: ``NormError/gradientShapeMismatch(expected:actual:)``; communication errors.
    func backward<Scalar: NormScalar>(
        _ dy: Tensor<Scalar>, cache: MixtureCache<Scalar>, affine: ChannelAffine<Scalar>,
        layout: Layout, kernels: KernelChoice, communicator: (any Communicator)?
    ) throws(NormError) -> MixtureGradients<Scalar> {
        let x = cache.input
        guard dy.shape == x.shape else {
            throw .gradientShapeMismatch(expected: x.shape, actual: dy.shape)
        }
        let k = components.count
        guard let st = cache.statistics else {
            // An empty batch: empty dx, zero parameter gradients (as PyTorch's autograd gives).
            let zero = [Double](repeating: 0, count: channelCount)
            return try gradients(
                input: dy, affine: affine.gradients(scaleSums: zero, offsetSums: zero),
                meanLogits: [Double](repeating: 0, count: k),
                varianceLogits: [Double](repeating: 0, count: k))
        }
        let indexing = instancePlan(x.shape, layout: layout).indexing
        let sums = kernels.gradientSums(
            x, outputGradient: dy, plan: cache.plan, mean: st.mean, rstd: st.rstd,
            scale: affine.scale, indexing: indexing)
        let reduced = try backward(
            sumG: sums.sumG, sumGD: sums.sumGD, statistics: st, communicator: communicator)
        let l = Double(cache.spatial)
        let b: [Double]
        if cache.unbiasedInstanceVariance {
            b = reduced.dV.map { cache.spatial > 1 ? 2 * $0 / (l - 1) : 0 }
        } else {
            b = reduced.dV.map { 2 * $0 / l }
        }
        let c = reduced.dM.map { $0 / l }
        var dx: Tensor<Scalar>
        do { dx = try Tensor(zeros: x.shape) } catch { throw .tensor(error) }
        if x.count > 0 {
            dx.withUnsafeMutableBufferPointer { dxb in
                kernels.applyGradient(
                    x, outputGradient: dy, plan: cache.plan, mean: st.instanceMean, a: st.rstd,
                    b: b, c: c, scale: affine.scale, indexing: indexing, into: dxb)
            }
        }
        return try gradients(
            input: dx,
            affine: affine.gradients(
                scaleSums: sums.scaleGradient, offsetSums: sums.offsetGradient),
            meanLogits: reduced.meanLogits, varianceLogits: reduced.varianceLogits)
    }

    private func gradients<Scalar: NormScalar>(
        input: Tensor<Scalar>, affine: [String: Tensor<Scalar>], meanLogits: [Double],
        varianceLogits: [Double]
    ) throws(NormError) -> MixtureGradients<Scalar> {
        do {
            return MixtureGradients(
                input: input, scale: affine[ParameterKey.scale.rawValue]!,
                offset: affine[ParameterKey.offset.rawValue]!,
                meanLogits: try Tensor(shape: [meanLogits.count], rounding: meanLogits),
                varianceLogits: try Tensor(
                    shape: [varianceLogits.count], rounding: varianceLogits))
        } catch { throw .tensor(error) }
    }

    /// Checks an input against the layer: rank ≥ 2, C channels, and no empty axis except,
    /// when `allowingEmptyBatch`, the batch axis.
    /// - Throws: ``NormError/emptyTensor(layer:shape:)``, ``NormError/invalidRank(layer:expected:shape:)``,
    ///   ``NormError/channelMismatch(layer:expected:actual:shape:)``.
    func validate(_ shape: [Int], layout: Layout, allowingEmptyBatch: Bool) throws(NormError) {
        let empty = shape.contains(0)
        guard
            !empty
                || (allowingEmptyBatch && shape.count >= 2 && shape[0] == 0
                    && shape.dropFirst().allSatisfy({ $0 > 0 }))
        else { throw .emptyTensor(layer: layer, shape: shape) }
        guard shape.count >= 2 else {
            throw .invalidRank(layer: layer, expected: "rank ≥ 2 (N, C, …)", shape: shape)
        }
        let axis = layout.channelAxis(rank: shape.count)
        guard shape[axis] == channelCount else {
            throw .channelMismatch(
                layer: layer, expected: channelCount, actual: shape[axis], shape: shape)
        }
    }
}

/// A layer built from a channel affine and two mixture logit vectors (Switchable Normalization,
/// Sparse SN, MetaNorm): γ, β and the logits under their usual names.
public protocol MixtureParameterized: AnyObject {
    /// The element type.
    associatedtype Scalar: NormScalar
    /// γ and β.
    var affine: ChannelAffine<Scalar> { get set }
    /// The mean mixture's logits (`mean_weight`).
    var meanMixture: MixtureLogits<Scalar> { get set }
    /// The variance mixture's logits (`var_weight`).
    var varianceMixture: MixtureLogits<Scalar> { get set }
}

extension MixtureParameterized {
    /// γ; `weight` in checkpoints.
    public var scale: Tensor<Scalar> {
        get { affine.scale }
        set { affine.scale = newValue }
    }
    /// β; `bias` in checkpoints.
    public var offset: Tensor<Scalar> {
        get { affine.offset }
        set { affine.offset = newValue }
    }
    /// Logits of the mean mixture; `mean_weight` in checkpoints.
    public var meanLogits: Tensor<Scalar> {
        get { meanMixture.logits }
        set { meanMixture.logits = newValue }
    }
    /// Logits of the variance mixture; `var_weight` in checkpoints.
    public var varianceLogits: Tensor<Scalar> {
        get { varianceMixture.logits }
        set { varianceMixture.logits = newValue }
    }
}

extension MixtureParameterized {
    /// Checks every key's element count against `expected` (any shape with that many elements:
    /// the official buffers are `[1, C, 1]`), loads γ, β and the logits among them, and returns
    /// every given tensor flattened, for the layer's own buffers.
    /// - Throws: ``NormError/parameterShapeMismatch(name:expected:actual:)`` for an unknown key
    ///   or a wrong count; nothing is loaded then.
    func loadMixtureParameters(_ tensors: [String: Tensor<Scalar>], expected: [String: Int])
        throws(NormError) -> [String: Tensor<Scalar>]
    {
        for (key, value) in tensors where expected[key] != value.count {
            throw .parameterShapeMismatch(
                name: key, expected: expected[key].map { [$0] } ?? [], actual: value.shape)
        }
        let flat = tensors.mapValues { (try? $0.reshaped([$0.count])) ?? $0 }
        if let t = flat["weight"] { scale = t }
        if let t = flat["bias"] { offset = t }
        if let t = flat["mean_weight"] { meanLogits = t }
        if let t = flat["var_weight"] { varianceLogits = t }
        return flat
    }
}

extension MixtureGradients {
    /// The gradients under the parameters' `state_dict` keys.
    public var keyed: NormGradients<Scalar> {
        NormGradients(
            input: input,
            parameters: mixtureParameters(
                scale: scale, offset: offset, meanLogits: meanLogits,
                varianceLogits: varianceLogits))
    }
}

extension SwitchableNorm: MixtureParameterized {}
extension MetaNorm: MixtureParameterized {}
