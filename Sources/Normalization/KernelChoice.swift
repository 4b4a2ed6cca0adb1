import NormKernels
import TensorCore

/// Which kernels a layer runs.
///
/// `.automatic` runs ``FastNormKernel`` (SIMD, threads, one read of x per set where it fits in
/// cache) for Float tensors whose partition has one of its memory shapes, which covers every
/// standard layer in both layouts; everything else (Double tensors, unusual partitions) runs
/// ``ReferenceNormKernel``. `.reference` always runs the reference kernel, for checks.
public enum KernelChoice: String, Sendable, Hashable {
    /// Fast kernels where they apply.
    case automatic
    /// The plain reference kernel.
    case reference

    /// The fast geometry for a call, or nil when the reference kernel runs.
    func fastGeometry<Scalar: NormScalar>(
        _: Scalar.Type, plan: ReductionPlan, indexing: ParameterIndexing?
    ) -> FastNormKernel.Geometry? {
        guard self == .automatic, Scalar.self == Float.self else { return nil }
        return FastNormKernel.geometry(for: plan, parameters: indexing)
    }

    /// Training forward: statistics and output.
    ///
    /// The fast or reference kernel runs as always;
    /// sets whose sums overflowed or underflowed (|x| near the type's limits, or ε = 0 with a
    /// constant set) are then recomputed on rescaled data
    /// (``ReferenceNormKernel/rescaleSets(_:setIndex:setCount:flags:operation:scale:offset:parameterIndexing:mean:variance:biasedVariance:rstd:into:)``).
    /// - Returns: the statistics, and whether any set was rescaled (backward then runs the
    ///   reference kernel, which works in Double throughout).
    func forwardTraining<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, operation op: ReferenceNormKernel.Operation,
        scale: Tensor<Scalar>?, offset: Tensor<Scalar>?, indexing: ParameterIndexing?,
        into yb: UnsafeMutableBufferPointer<Scalar>
    ) -> (statistics: FastNormKernel.Statistics, rescaled: Bool) {
        var statistics: FastNormKernel.Statistics
        let tiny: Double
        if let geometry = fastGeometry(Scalar.self, plan: plan, indexing: indexing) {
            statistics = x.withUnsafeBufferPointer { xb in
                withOptionalBuffers(scale, offset) { sb, ob in
                    FastNormKernel.forwardTraining(
                        xb.asFloat, geometry: geometry, operation: op, scale: sb?.asFloat,
                        offset: ob?.asFloat, into: yb.asFloat)
                }
            }
            tiny = 1e-30  // Float accumulators
        } else {
            statistics = referenceForwardTraining(
                x, plan: plan, operation: op, scale: scale, offset: offset, indexing: indexing,
                into: yb)
            tiny = 1e-290  // Double accumulators
        }
        guard
            let flags = ReferenceNormKernel.setsNeedingRescale(
                mean: statistics.mean, variance: statistics.variance, rstd: statistics.rstd,
                operation: op, tinyVariance: tiny)
        else { return (statistics, false) }
        rescale(
            x, plan: plan, flags: flags, operation: op, scale: scale, offset: offset,
            indexing: indexing, statistics: &statistics, into: yb)
        return (statistics, true)
    }

    /// The rare path of ``forwardTraining(_:plan:operation:scale:offset:indexing:into:)``.
    @inline(never)
    func rescale<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, flags: [Bool],
        operation op: ReferenceNormKernel.Operation, scale: Tensor<Scalar>?,
        offset: Tensor<Scalar>?, indexing: ParameterIndexing?,
        statistics: inout FastNormKernel.Statistics, into yb: UnsafeMutableBufferPointer<Scalar>
    ) {
        let setIndex = plan.setIndices()
        x.withUnsafeBufferPointer { xb in
            withOptionalBuffers(scale, offset) { sb, ob in
                ReferenceNormKernel.rescaleSets(
                    xb, setIndex: setIndex, setCount: plan.setCount, flags: flags, operation: op,
                    scale: sb, offset: ob, parameterIndexing: indexing, mean: &statistics.mean,
                    variance: &statistics.variance, biasedVariance: &statistics.biasedVariance,
                    rstd: &statistics.rstd, into: yb)
            }
        }
    }

    private func referenceForwardTraining<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, operation op: ReferenceNormKernel.Operation,
        scale: Tensor<Scalar>?, offset: Tensor<Scalar>?, indexing: ParameterIndexing?,
        into yb: UnsafeMutableBufferPointer<Scalar>
    ) -> FastNormKernel.Statistics {
        let setIndex = plan.setIndices()
        let moments = x.withUnsafeBufferPointer {
            ReferenceNormKernel.moments(
                $0, setIndex: setIndex, setCount: plan.setCount, operation: op)
        }
        let rstd = ReferenceNormKernel.reciprocalStandardDeviation(
            variance: moments.variance, operation: op)
        x.withUnsafeBufferPointer { xb in
            withOptionalBuffers(scale, offset) { sb, ob in
                ReferenceNormKernel.forward(
                    xb, setIndex: setIndex, mean: moments.mean, rstd: rstd, scale: sb,
                    offset: ob,
                    parameterIndexing: indexing, into: yb)
            }
        }
        return FastNormKernel.Statistics(
            mean: moments.mean, variance: moments.variance, biasedVariance: moments.biasedVariance,
            rstd: rstd)
    }

    /// y = γ·(x − μ)·rstd + β with per-set μ and rstd given, into `yb`.
    public func forward<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, mean: [Double], rstd: [Double],
        scale: Tensor<Scalar>?,
        offset: Tensor<Scalar>?, indexing: ParameterIndexing?,
        into yb: UnsafeMutableBufferPointer<Scalar>
    ) {
        let geometry = fastGeometry(Scalar.self, plan: plan, indexing: indexing)
        let setIndex = geometry == nil ? plan.setIndices() : []
        x.withUnsafeBufferPointer { xb in
            withOptionalBuffers(scale, offset) { sb, ob in
                if let geometry {
                    FastNormKernel.forward(
                        xb.asFloat, geometry: geometry, mean: mean, rstd: rstd,
                        scale: sb?.asFloat,
                        offset: ob?.asFloat, into: yb.asFloat)
                } else {
                    ReferenceNormKernel.forward(
                        xb, setIndex: setIndex, mean: mean, rstd: rstd, scale: sb, offset: ob,
                        parameterIndexing: indexing, into: yb)
                }
            }
        }
    }

    func backward<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, outputGradient dy: Tensor<Scalar>, plan: ReductionPlan, mean: [Double],
        rstd: [Double], operation op: ReferenceNormKernel.Operation, statisticsAreConstant: Bool,
        scale: Tensor<Scalar>?, indexing: ParameterIndexing?,
        inputGradient dxb: UnsafeMutableBufferPointer<Scalar>,
        scaleGradient: inout [Double], offsetGradient: inout [Double]
    ) {
        let geometry = fastGeometry(Scalar.self, plan: plan, indexing: indexing)
        let setIndex = geometry == nil ? plan.setIndices() : []
        x.withUnsafeBufferPointer { xb in
            dy.withUnsafeBufferPointer { dyb in
                withOptionalBuffers(scale, nil) { sb, _ in
                    if let geometry {
                        FastNormKernel.backward(
                            xb.asFloat, outputGradient: dyb.asFloat, geometry: geometry,
                            mean: mean,
                            rstd: rstd, operation: op,
                            statisticsAreConstant: statisticsAreConstant,
                            scale: sb?.asFloat, parameterCount: indexing?.modulus ?? 0,
                            inputGradient: dxb.asFloat, scaleGradient: &scaleGradient,
                            offsetGradient: &offsetGradient)
                    } else {
                        ReferenceNormKernel.backward(
                            xb, outputGradient: dyb, setIndex: setIndex,
                            setCount: plan.setCount, mean: mean,
                            rstd: rstd, operation: op,
                            statisticsAreConstant: statisticsAreConstant, scale: sb,
                            parameterIndexing: indexing, inputGradient: dxb,
                            scaleGradient: &scaleGradient,
                            offsetGradient: &offsetGradient)
                    }
                }
            }
        }
    }
}

extension UnsafeBufferPointer {
    /// The same memory as Float (only called when `Element` is `Float`).
    var asFloat: UnsafeBufferPointer<Float> {
        UnsafeRawBufferPointer(self).assumingMemoryBound(to: Float.self)
    }
}

extension UnsafeMutableBufferPointer {
    /// The same memory as Float (only called when `Element` is `Float`).
    var asFloat: UnsafeMutableBufferPointer<Float> {
        UnsafeMutableRawBufferPointer(self).assumingMemoryBound(to: Float.self)
    }
}

// MARK: - Primitives for statistics sources (Switchable Normalization, Batch Renormalization)

extension KernelChoice {
    /// Per-set statistics of `x` over `plan`, without an output (a primitive for statistics
    /// sources that mix or filter statistics before normalizing).
    public func moments<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, plan: ReductionPlan, operation op: ReferenceNormKernel.Operation,
        indexing: ParameterIndexing?
    ) -> FastNormKernel.Statistics {
        if let geometry = fastGeometry(Scalar.self, plan: plan, indexing: indexing) {
            return x.withUnsafeBufferPointer {
                FastNormKernel.moments($0.asFloat, geometry: geometry, operation: op)
            }
        }
        let setIndex = plan.setIndices()
        let m = x.withUnsafeBufferPointer {
            ReferenceNormKernel.moments(
                $0, setIndex: setIndex, setCount: plan.setCount, operation: op)
        }
        return FastNormKernel.Statistics(
            mean: m.mean, variance: m.variance, biasedVariance: m.biasedVariance,
            rstd: ReferenceNormKernel.reciprocalStandardDeviation(
                variance: m.variance, operation: op))
    }

    /// Per-set Σg, Σg·(x − μ) and the affine gradients (g = dy·γ, x̂ = (x − μ)·rstd).
    public func gradientSums<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, outputGradient dy: Tensor<Scalar>, plan: ReductionPlan, mean: [Double],
        rstd: [Double], scale: Tensor<Scalar>?, indexing: ParameterIndexing?
    ) -> FastNormKernel.GradientSums {
        let geometry = fastGeometry(Scalar.self, plan: plan, indexing: indexing)
        let setIndex = geometry == nil ? plan.setIndices() : []
        return x.withUnsafeBufferPointer { xb in
            dy.withUnsafeBufferPointer { dyb in
                withOptionalBuffers(scale, nil) { sb, _ in
                    if let geometry {
                        return FastNormKernel.gradientSums(
                            xb.asFloat, outputGradient: dyb.asFloat, geometry: geometry, mean: mean,
                            rstd: rstd, scale: sb?.asFloat, parameterCount: indexing?.modulus ?? 0)
                    }
                    return ReferenceNormKernel.gradientSums(
                        xb, outputGradient: dyb, setIndex: setIndex, setCount: plan.setCount,
                        mean: mean,
                        rstd: rstd, scale: sb, parameterIndexing: indexing)
                }
            }
        }
    }

    /// dx = A·g + B·(x − μ) + C per set (g = dy·γ), into `dxb`.
    public func applyGradient<Scalar: NormScalar>(
        _ x: Tensor<Scalar>, outputGradient dy: Tensor<Scalar>, plan: ReductionPlan, mean: [Double],
        a: [Double], b: [Double], c: [Double], scale: Tensor<Scalar>?, indexing: ParameterIndexing?,
        into dxb: UnsafeMutableBufferPointer<Scalar>
    ) {
        let geometry = fastGeometry(Scalar.self, plan: plan, indexing: indexing)
        let setIndex = geometry == nil ? plan.setIndices() : []
        x.withUnsafeBufferPointer { xb in
            dy.withUnsafeBufferPointer { dyb in
                withOptionalBuffers(scale, nil) { sb, _ in
                    if let geometry {
                        FastNormKernel.applyGradient(
                            xb.asFloat, outputGradient: dyb.asFloat, geometry: geometry, mean: mean,
                            a: a,
                            b: b, c: c, scale: sb?.asFloat, into: dxb.asFloat)
                    } else {
                        ReferenceNormKernel.applyGradient(
                            xb, outputGradient: dyb, setIndex: setIndex, mean: mean, a: a, b: b,
                            c: c,
                            scale: sb, parameterIndexing: indexing, into: dxb)
                    }
                }
            }
        }
    }
}
