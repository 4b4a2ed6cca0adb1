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

/// The entries of a loaded state every whitening layer has (`weight`, `bias`, the running
/// matrices), checked and converted but not yet written.
struct WhiteningEntries<S: NormScalar> {
    var weight: Tensor<S>?
    var bias: Tensor<S>?
    var matrices: [Matrix]?

    init(_ t: [String: Tensor<S>], channels: Int, matrixKey: String, like current: [Matrix])
        throws
    {
        matrices = try t[matrixKey].map {
            try GroupMatrices.unpack($0, like: current, name: matrixKey)
        }
        weight = try GroupMatrices.entry(t, "weight", count: channels)
        bias = try GroupMatrices.entry(t, "bias", count: channels)
    }
}

extension GroupWhiteningNorm {
    /// The running matrices' key: DBN's `running_projection` or IterNorm's `running_wm`.
    var matrixKey: String { method == .eigendecomposition ? "running_projection" : "running_wm" }

    /// `weight`, `bias` (with affine), `running_mean` [C] and the running matrices [G, d, d].
    func stateDictionary() throws -> [String: Tensor<Scalar>] {
        var out = affineParameters(scale, offset)
        out["running_mean"] = runningMean
        out[matrixKey] = try GroupMatrices.pack(runningWhitening)
        return out
    }

    /// Loads the entries of ``state()`` (any shape with the right element count); all are
    /// checked before any is written.
    public func load(_ t: [String: Tensor<Scalar>]) throws {
        let common = try WhiteningEntries(
            t, channels: channelCount, matrixKey: matrixKey, like: runningWhitening)
        let mean = try GroupMatrices.entry(t, "running_mean", count: channelCount)
        if let mean { runningMean = mean }
        if let matrices = common.matrices { runningWhitening = matrices }
        scale = common.weight ?? scale
        offset = common.bias ?? offset
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
        let common = try WhiteningEntries(
            t, channels: channelCount, matrixKey: "running_cov", like: runningCovariance)
        let mean = try t["running_mean"].map {
            try GroupMatrices.vector($0, count: channelCount, name: "running_mean")
        }
        let ml = try GroupMatrices.entry(t, "sw_mean_weight", count: type)
        let vl = try GroupMatrices.entry(t, "sw_var_weight", count: type)
        if let mean { runningMean = mean }
        if let matrices = common.matrices { runningCovariance = matrices }
        scale = common.weight ?? scale
        offset = common.bias ?? offset
        meanLogits = ml ?? meanLogits
        varianceLogits = vl ?? varianceLogits
    }
}
