/// A floating-point element type that NormKit tensors and kernels can hold.
///
/// NormKit computes in `Float` for speed and in `Double` for checks (finite differences,
/// comparison with float64 PyTorch). Both conform; nothing else needs to.
public protocol NormScalar: BinaryFloatingPoint, Sendable, CustomStringConvertible
where Self.RawSignificand: FixedWidthInteger {
    /// The NumPy dtype string of this type in little-endian order (`"<f4"`, `"<f8"`).
    static var numpyDescriptor: String { get }
    /// The safetensors dtype name (`"F32"`, `"F64"`).
    static var safetensorsName: String { get }
    /// Short human name (`"float32"`, `"float64"`), as PyTorch prints it.
    static var dtypeName: String { get }
    /// Bytes per element.
    static var byteCount: Int { get }
    /// Reinterprets little-endian raw bits as a value.
    init(littleEndianBits bits: UInt64)
    /// The value's bits, zero-extended to 64 bits, in little-endian order.
    var littleEndianBits: UInt64 { get }
}

extension Float: NormScalar {
    /// The NumPy dtype string.
    public static var numpyDescriptor: String { "<f4" }
    /// The safetensors dtype name.
    public static var safetensorsName: String { "F32" }
    /// The dtype name as PyTorch prints it.
    public static var dtypeName: String { "float32" }
    /// Bytes per element.
    public static var byteCount: Int { 4 }
    /// Reinterprets little-endian raw bits.
    public init(littleEndianBits bits: UInt64) {
        self.init(bitPattern: UInt32(truncatingIfNeeded: bits).littleEndian)
    }
    /// The raw bits in little-endian order.
    public var littleEndianBits: UInt64 { UInt64(bitPattern.littleEndian) }
}

extension Double: NormScalar {
    /// The NumPy dtype string.
    public static var numpyDescriptor: String { "<f8" }
    /// The safetensors dtype name.
    public static var safetensorsName: String { "F64" }
    /// The dtype name as PyTorch prints it.
    public static var dtypeName: String { "float64" }
    /// Bytes per element.
    public static var byteCount: Int { 8 }
    /// Reinterprets little-endian raw bits.
    public init(littleEndianBits bits: UInt64) {
        self.init(bitPattern: bits.littleEndian)
    }
    /// The raw bits in little-endian order.
    public var littleEndianBits: UInt64 { bitPattern.littleEndian }
}
