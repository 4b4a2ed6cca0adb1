import NormKit

extension TrainingConfig {
    /// The largest `whitenRank` accepted (layers cap it at their own dimension).
    public static let maximumWhiteningRank = 1 << 16

    /// The whitened layers' settings, or nil for plain layers.
    /// - Throws: ``TrainingError`` for an unknown kind or an invalid period, rank or data period
    ///   (also when whitening settings are given without whitened layers).
    public func whiteningSettings() throws(TrainingError) -> WhiteningSettings? {
        let name = whitenLayers ?? "none"
        guard name != "none" else {
            for (flag, value) in [
                ("whitening period", whitenEvery), ("whitening rank", whitenRank),
                ("whitening data period", whitenDataEvery),
            ] {
                if let value {
                    throw .invalidSetting(
                        name: flag, value: "\(value)",
                        requirement: "applies only with whitened layers (gwnn, eigennet, wnn)")
                }
            }
            return nil
        }
        guard let kind = WhitenedLayerKind(rawValue: name) else {
            throw .unknownName(
                kind: "whitened layers", name: name,
                known: ["none"] + WhitenedLayerKind.allCases.map(\.rawValue))
        }
        if let whitenRank, !(1...Self.maximumWhiteningRank).contains(whitenRank) {
            throw .invalidSetting(
                name: "whitening rank", value: "\(whitenRank)",
                requirement: "must lie in 1…\(Self.maximumWhiteningRank)")
        }
        if whitenDataEvery != nil && kind != .gwnn {
            throw .invalidSetting(
                name: "whitening data period", value: "\(whitenDataEvery!)",
                requirement: "applies only to gwnn (wnn and eigennet measure on every refresh)")
        }
        let settings = WhiteningSettings(
            kind: kind, period: whitenEvery ?? 100, rank: whitenRank, dataPeriod: whitenDataEvery,
            preservesGradientScale: true)
        try settings.validate()
        return settings
    }

    /// The gradient normalizer of the run.
    /// - Throws: ``TrainingError`` for an unknown method or an invalid Ψ.
    public func gradientNormalization() throws(TrainingError) -> GradientNormalization {
        let name = gradNorm ?? "none"
        guard let method = GradientNormalization.Method(rawValue: name) else {
            throw .unknownName(
                kind: "gradient normalization", name: name,
                known: GradientNormalization.Method.allCases.map(\.rawValue))
        }
        let normalization = GradientNormalization(method, scale: gradNormScale ?? 1)
        try normalization.validate()
        return normalization
    }
}

extension Trainer {
    /// Between backward and the optimiser step: the gradient normalizer, then the whitened
    /// layers' refreshes carried into SGD's velocity.
    func prepareUpdate() throws {
        try gradientNormalization.apply(to: model.parameters)
        for core in whitened { try core.carryOptimizerState(&optimizer.velocity) }
    }
}
