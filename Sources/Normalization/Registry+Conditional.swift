import TensorCore

/// The registry lines of the conditional and LLM-era layers of this module (SPADE's is in the
/// Conditional module). `NormalizerRegistry.all` (NormKit) lists them after the others.
extension NormalizerRegistry {
    /// AdaIN, conditional BN, adaLN/FiLM, DyT, fused add + RMSNorm, (1 + w) RMSNorm, QK-norm
    /// and unit norm.
    public static let conditional: [NormalizerEntry] = [
        NormalizerEntry(
            "adain", summary: "AdaIN: the content's per-(n, c) statistics replaced by the style's",
            conditions: ["style"], trainable: false, builder: AdaINBuilder()),
        NormalizerEntry(
            "conditionalbn", aliases: ["cbn"],
            summary:
                "Conditional BatchNorm: γ, β per class (--labels) or from a vector (--condition)",
            conditions: ["labels", "condition"], trainable: false,
            builder: ConditionalBatchNormBuilder()),
        NormalizerEntry(
            "adaln", aliases: ["film", "adalnzero"],
            summary:
                "adaLN-Zero / FiLM: x·(1 + scale) + shift predicted from a conditioning vector",
            conditions: ["condition"], trainable: false, builder: AdaLNBuilder()),
        NormalizerEntry(
            "dyt", summary: "Dynamic Tanh: w·tanh(α x) + b, no statistics",
            builder: DynamicTanhBuilder()),
        NormalizerEntry(
            "addrmsnorm",
            summary: "Fused residual add + RMSNorm over the last axis (also writes x + r)",
            conditions: ["residual"], trainable: false, builder: RMSNormVariantBuilder(kind: .add)),
        NormalizerEntry(
            "rmsnorm1p", aliases: ["gemmarmsnorm"],
            summary: "RMSNorm over the last axis with the (1 + w) weight, w = 0 initially",
            trainable: false, builder: RMSNormVariantBuilder(kind: .unitOffset)),
        NormalizerEntry(
            "qknorm",
            summary: "QK-norm: RMSNorm over head_dim of [B, heads, T, head_dim]",
            trainable: false, builder: RMSNormVariantBuilder(kind: .qk)),
        NormalizerEntry(
            "unitnorm", summary: "nGPT's unit-norm projection x/‖x‖ over the last axis",
            trainable: false, builder: RMSNormVariantBuilder(kind: .unit)),
    ]
}

private func requireChannelsFirst(_ o: NormalizerOptions, layer: String) throws(NormError) {
    guard o.layout == .channelsFirst else {
        throw .invalidHyperparameter(
            name: "layout", value: "nhwc", requirement: "\(layer) is channels-first")
    }
}

/// `adain`: options `unbiased` (true: the PyTorch port, default; false: the original Torch
/// code) and `alpha`.
struct AdaINBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        try requireChannelsFirst(o, layer: "AdaIN")
        return try AdaIN<T>(
            convention: (try o.bool("unbiased") ?? true) ? .pytorchPort : .originalTorch,
            alpha: try o.double("alpha") ?? 1, epsilon: o.epsilon ?? 1e-5)
    }
}

/// Builds `conditionalbn`.
///
/// Labels (`classes` K, or the rows of `weights.weight`) or a conditioning vector (its width;
/// `unit-offset` for BigGAN's γ = 1 + Linear). Without either (a benchmark), an embedding of
/// `classes` (default 10).
struct ConditionalBatchNormBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        try requireChannelsFirst(o, layer: "ConditionalBatchNorm")
        let channels = try request.channelCount(layer: "ConditionalBatchNorm")
        let conditionWidth =
            request.conditionShapes["condition"].flatMap { $0.count == 2 ? $0[1] : nil }
            ?? request.parameterShapes["gain.weight"].flatMap { $0.count == 2 ? $0[1] : nil }
        let source: ConditionalBatchNorm<T>.Source
        if let width = conditionWidth, request.conditionShapes["labels"] == nil {
            source = .linear(
                conditionDimension: width, unitOffset: try o.bool("unit-offset") ?? false)
        } else {
            let classes =
                try o.int("classes") ?? request.parameterShapes["weights.weight"]?.first
            if classes == nil, request.conditionShapes["labels"] != nil {
                throw NormError.invalidHyperparameter(
                    name: "--classes", value: "missing",
                    requirement: "conditionalbn with --labels needs the class count K (or "
                        + "weights.weight in --params)")
            }
            source = .embedding(classes: classes ?? 10)
        }
        return try ConditionalBatchNorm<T>(
            channelCount: channels, source: source, epsilon: o.epsilon ?? 1e-5,
            momentum: o.momentum ?? .pytorchDefault)
    }
}

/// `adaln`: the condition's width from the condition (or the weight; default D); `gate`
/// (default: from the weight's rows, else true), `film` (no LayerNorm and no SiLU), `silu`.
struct AdaLNBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        guard let d = request.inputShape.last, request.inputShape.count >= 2 else {
            throw NormError.invalidRank(
                layer: "AdaLN", expected: "rank ≥ 2 [N, *, D]", shape: request.inputShape)
        }
        let weight = request.parameterShapes[AdaLN<T>.weightKey]
        let width =
            request.conditionShapes["condition"].flatMap { $0.count == 2 ? $0[1] : nil }
            ?? weight.flatMap { $0.count == 2 ? $0[1] : nil } ?? d
        let gated = try o.bool("gate") ?? weight.map { $0.first == 3 * d } ?? true
        let film = try o.bool("film") ?? false
        return try AdaLN<T>(
            featureCount: d, conditionDimension: width, gated: gated, normalizes: !film,
            silu: try o.bool("silu") ?? !film, epsilon: o.epsilon ?? 1e-6)
    }
}

/// Builds `dyt`.
///
/// `alpha` (α's initial value, 0.5), `bias` (false: the no-bias variant). The layout is
/// `--layout` when given, else channels-last below rank 4 (token tensors `[B, T, C]`) and
/// channels-first from rank 4 (images `[N, C, H, W]`, the training harness's slots).
struct DynamicTanhBuilder: NormalizerBuilder {
    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        let shape = request.inputShape
        let layout: Layout
        if o.values["layout"] != nil {
            layout = o.layout
        } else {
            layout = shape.count >= 4 ? .channelsFirst : .channelsLast
        }
        guard !shape.isEmpty, layout == .channelsLast || shape.count >= 2 else {
            throw NormError.invalidRank(layer: "DyT", expected: "rank ≥ 1", shape: shape)
        }
        let channels = layout == .channelsLast ? shape[shape.count - 1] : shape[1]
        return try DynamicTanh<T>(
            channelCount: channels, alpha: try o.double("alpha") ?? 0.5,
            bias: try o.bool("bias")
                ?? (request.parameterShapes.isEmpty
                    || request.parameterShapes["bias"] != nil),
            layout: layout)
    }
}

/// The RMSNorm family over the last axis: ε default 1e-6; `unit-offset` for `addrmsnorm` and
/// `qknorm`.
struct RMSNormVariantBuilder: NormalizerBuilder {
    enum Kind { case add, unitOffset, qk, unit }
    let kind: Kind

    func make<T: NormScalar>(_ request: NormalizerRequest, as _: T.Type) throws -> any Normalizing<
        T
    > {
        let o = request.options
        guard let d = request.inputShape.last, d >= 1 else {
            throw NormError.emptyTensor(layer: "RMSNorm", shape: request.inputShape)
        }
        let eps = o.epsilon ?? 1e-6
        switch kind {
        case .add:
            return try AddRMSNorm<T>(
                featureCount: d, epsilon: eps, unitOffset: try o.bool("unit-offset") ?? false)
        case .unitOffset:
            return try WeightedRMSNorm<T>(featureCount: d, epsilon: eps, unitOffset: true)
        case .qk:
            return try QKNorm<T>(
                headDimension: d, epsilon: eps, unitOffset: try o.bool("unit-offset") ?? false)
        case .unit:
            return try UnitNorm<T>()
        }
    }
}
