import Normalization
import TensorCore

extension NormalizerRegistry {
    /// SPADE (needs GEMM, so it lives here rather than in Normalization).
    public static let spatial: [NormalizerEntry] = [
        NormalizerEntry(
            "spade",
            summary: "SPADE: parameter-free BN/IN, per-pixel γ, β from a segmentation map",
            conditions: ["segmap"], trainable: false, builder: SPADEBuilder())
    ]
}

/// `spade`: `config` (`spadebatch3x3`, the default, `spadeinstance3x3`, …) or `norm` and
/// `kernel-size`; `hidden` (default 128); the label count from the segmentation map, else from
/// `mlp_shared.0.weight`, else `label-nc` (default 16, for benchmarks).
struct SPADEBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        guard o.layout == .channelsFirst else {
            throw NormError.invalidHyperparameter(
                name: "layout", value: "nhwc", requirement: "SPADE is channels-first")
        }
        let channels = try request.channelCount(layer: "SPADE", minimumRank: 4)
        let shared = request.parameterShapes["mlp_shared.0.weight"]
        var (norm, kernel) = try SPADE<T>.parse(o.values["config"] ?? "spadebatch3x3")
        if let text = o.values["norm"] {
            guard let n = SPADE<T>.ParameterFreeNorm(rawValue: text == "syncbatch" ? "batch" : text)
            else {
                throw NormError.invalidHyperparameter(
                    name: "norm", value: text, requirement: "must be batch or instance")
            }
            norm = n
        }
        kernel =
            try o.int("kernel-size") ?? shared.flatMap { $0.count == 4 ? $0[2] : nil } ?? kernel
        let fallbackLabels = try o.int("label-nc") ?? 16
        let labels =
            request.conditionShapes["segmap"].flatMap { $0.count == 4 ? $0[1] : nil }
            ?? shared.flatMap { $0.count == 4 ? $0[1] : nil } ?? fallbackLabels
        let hidden = try o.int("hidden") ?? shared?.first ?? 128
        return try SPADE<T>(
            channelCount: channels, labelCount: labels, hiddenCount: hidden, kernelSize: kernel,
            norm: norm, epsilon: o.epsilon ?? 1e-5, momentum: o.momentum ?? .pytorchDefault)
    }
}
