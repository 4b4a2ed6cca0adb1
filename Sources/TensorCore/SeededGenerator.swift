/// A small, fast, seeded random number generator (SplitMix64), so that every NormKit
/// experiment, sample tensor and test is reproducible from its seed on every platform.
///
/// ## References
/// 1. Steele, Lea & Flood 2014, "Fast Splittable Pseudorandom Number Generators" (SplitMix64).
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64

    /// Creates a generator whose whole stream is determined by `seed`.
    public init(seed: UInt64) { state = seed }

    /// The next 64 random bits.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A uniform double in [0, 1) with 53 random bits.
    public mutating func nextUniform() -> Double {
        Double(next() >> 11) * 0x1p-53
    }

    /// A standard normal sample (Box–Muller; one of the pair is discarded for simplicity).
    public mutating func nextNormal() -> Double {
        let u1 = 1 - nextUniform()  // (0, 1]: the logarithm stays finite.
        let u2 = nextUniform()
        return (-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2)
    }
}

extension Tensor {
    /// A tensor of independent normal samples `mean + standardDeviation · z`.
    public static func randomNormal(
        shape: [Int], mean: Double = 0, standardDeviation: Double = 1,
        using generator: inout SeededGenerator
    ) throws(TensorError) -> Tensor {
        let count = try Shape.elementCount(shape)
        let values = (0..<count).map { _ in
            Scalar(mean + standardDeviation * generator.nextNormal())
        }
        return Tensor(uncheckedShape: shape, scalars: values)
    }
}

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#elseif canImport(ucrt)
    import ucrt
#endif
