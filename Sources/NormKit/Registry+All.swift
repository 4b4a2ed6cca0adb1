extension NormalizerRegistry {
    /// Every activation normalizer NormKit ships, in listing order: the names `normkit apply`,
    /// `normkit bench`, `normkit train --normalizer` and the studies accept.
    ///
    /// Adding a normalizer: write the layer (conforming to `Normalizing`) and a
    /// `NormalizerBuilder` in one file, then add its `NormalizerEntry` to the list here.
    public static let all = NormalizerRegistry(builtin + whitening + conditional + spatial)
}
