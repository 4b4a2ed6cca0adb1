import LinearAlgebra
import NormKernels
import Normalization
import TensorCore

/// Packs per-group d × d matrices into one `[G, d, d]` tensor and back.
///
/// Groups of unequal
/// sizes (a last, smaller group; the official code has none) pack as one flat vector of the
/// concatenated row-major blocks.
enum GroupMatrices {
    static func pack<S: NormScalar>(_ matrices: [Matrix]) throws -> Tensor<S> {
        let d = matrices.first?.rows ?? 0
        let values = matrices.flatMap(\.values)
        guard matrices.allSatisfy({ $0.rows == d }) else {
            return try Tensor(shape: [values.count], rounding: values)
        }
        return try Tensor(shape: [matrices.count, d, d], rounding: values)
    }

    static func unpack<S: NormScalar>(_ t: Tensor<S>, like matrices: [Matrix], name: String) throws
        -> [Matrix]
    {
        let total = matrices.reduce(0) { $0 + $1.values.count }
        guard t.count == total else {
            throw NormError.parameterShapeMismatch(
                name: name,
                expected: [matrices.count, matrices.first?.rows ?? 0, matrices.first?.rows ?? 0],
                actual: t.shape)
        }
        var offset = 0
        return matrices.map { m in
            let values = t.scalars[offset..<(offset + m.values.count)].map(Double.init)
            offset += m.values.count
            return Matrix(rows: m.rows, cols: m.cols, values: values)
        }
    }

    static func vector<S: NormScalar>(_ t: Tensor<S>, count: Int, name: String) throws -> [Double] {
        guard t.count == count else {
            throw NormError.parameterShapeMismatch(name: name, expected: [count], actual: t.shape)
        }
        return t.scalars.map(Double.init)
    }

    /// The entry `name` of a loaded state as a `[count]` tensor, nil when absent.
    static func entry<S: NormScalar>(_ t: [String: Tensor<S>], _ name: String, count: Int) throws
        -> Tensor<S>?
    {
        try t[name].map {
            try Tensor(shape: [count], rounding: vector($0, count: count, name: name))
        }
    }
}

extension DecorrelatedBatchNorm {
    /// `weight`, `bias`, `running_mean` [C], `running_projection` [G, d, d].
    func stateDictionary() throws -> [String: Tensor<Scalar>] {
        var out: [String: Tensor<Scalar>] = [
            "running_mean": runningMean,
            "running_projection": try GroupMatrices.pack(runningProjections),
        ]
        if let scale, let offset {
            out["weight"] = scale
            out["bias"] = offset
        }
        return out
    }

    /// Loads the entries of ``state()`` (any shape with the right element count).
    public func load(_ t: [String: Tensor<Scalar>]) throws {
        let projections = try t["running_projection"].map {
            try GroupMatrices.unpack($0, like: runningProjections, name: "running_projection")
        }
        let mean = try GroupMatrices.entry(t, "running_mean", count: channelCount)
        let w = try GroupMatrices.entry(t, "weight", count: channelCount)
        let b = try GroupMatrices.entry(t, "bias", count: channelCount)
        if let projections { runningProjections = projections }
        if let mean { runningMean = mean }
        if let w { scale = w }
        if let b { offset = b }
    }
}

extension IterNorm {
    /// `weight`, `bias`, `running_mean` [C], `running_wm` [G, d, d].
    func stateDictionary() throws -> [String: Tensor<Scalar>] {
        var out: [String: Tensor<Scalar>] = [
            "running_mean": runningMean, "running_wm": try GroupMatrices.pack(runningWhitening),
        ]
        if let scale, let offset {
            out["weight"] = scale
            out["bias"] = offset
        }
        return out
    }

    /// Loads the entries of ``state()`` (any shape with the right element count).
    public func load(_ t: [String: Tensor<Scalar>]) throws {
        let wm = try t["running_wm"].map {
            try GroupMatrices.unpack($0, like: runningWhitening, name: "running_wm")
        }
        let mean = try GroupMatrices.entry(t, "running_mean", count: channelCount)
        let w = try GroupMatrices.entry(t, "weight", count: channelCount)
        let b = try GroupMatrices.entry(t, "bias", count: channelCount)
        if let wm { runningWhitening = wm }
        if let mean { runningMean = mean }
        if let w { scale = w }
        if let b { offset = b }
    }
}

extension SwitchableWhitening {
    /// `weight`, `bias`, `sw_mean_weight`, `sw_var_weight`, `running_mean` [C], `running_cov` [G, d, d].
    func stateDictionary() throws -> [String: Tensor<Scalar>] {
        [
            "weight": scale, "bias": offset, "sw_mean_weight": meanLogits,
            "sw_var_weight": varianceLogits,
            "running_mean": try Tensor(shape: [channelCount], rounding: runningMean),
            "running_cov": try GroupMatrices.pack(runningCovariance),
        ]
    }

    /// Loads the entries of ``state()`` (any shape with the right element count).
    public func load(_ t: [String: Tensor<Scalar>]) throws {
        let cov = try t["running_cov"].map {
            try GroupMatrices.unpack($0, like: runningCovariance, name: "running_cov")
        }
        let mean = try t["running_mean"].map {
            try GroupMatrices.vector($0, count: channelCount, name: "running_mean")
        }
        let w = try GroupMatrices.entry(t, "weight", count: channelCount)
        let b = try GroupMatrices.entry(t, "bias", count: channelCount)
        let ml = try GroupMatrices.entry(t, "sw_mean_weight", count: type)
        let vl = try GroupMatrices.entry(t, "sw_var_weight", count: type)
        if let cov { runningCovariance = cov }
        if let mean { runningMean = mean }
        if let w { scale = w }
        if let b { offset = b }
        if let ml { meanLogits = ml }
        if let vl { varianceLogits = vl }
    }
}
