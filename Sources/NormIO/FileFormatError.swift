import TensorCore

/// Errors raised when reading or writing `.npy` and safetensors files.
///
/// Readers validate every header field against the file's real size before allocating, so a
/// malformed, truncated or lying file gives one of these, never a crash or a huge allocation.
public enum FileFormatError: Error, Equatable, CustomStringConvertible {
    /// The file could not be read or written.
    case io(path: String, reason: String)
    /// The file does not start with the format's magic bytes or is too short to.
    case notAFile(format: String, reason: String)
    /// The header is not what the format specifies.
    case malformedHeader(format: String, reason: String)
    /// The element type is not one NormKit reads.
    case unsupportedDType(format: String, dtype: String)
    /// The data section is shorter or longer than the header says.
    case sizeMismatch(format: String, name: String, expectedBytes: Int, actualBytes: Int)
    /// A tensor named in a request is not in the file.
    case missingTensor(name: String, available: [String])
    /// A tensor has a dtype other than the one requested.
    case wrongDType(name: String, expected: String, actual: String)

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .io(let path, let reason):
            return "cannot access '\(path)': \(reason)"
        case .notAFile(let format, let reason):
            return "not a \(format) file: \(reason)"
        case .malformedHeader(let format, let reason):
            return "malformed \(format) header: \(reason)"
        case .unsupportedDType(let format, let dtype):
            return "\(format) dtype '\(dtype)' is not supported (NormKit reads little-endian "
                + "float32 and float64" + (format == "safetensors" ? ", and int64 buffers)" : ")")
        case .sizeMismatch(let format, let name, let expected, let actual):
            return "\(format) data for '\(name)' should be \(expected) bytes but the file has "
                + "\(actual): the file is truncated or its header lies"
        case .missingTensor(let name, let available):
            return "no tensor named '\(name)' in the file (it has: "
                + "\(available.sorted().joined(separator: ", ")))"
        case .wrongDType(let name, let expected, let actual):
            return "tensor '\(name)' is \(actual), expected \(expected)"
        }
    }
}

/// A dense array read from a file: float32, float64 or int64.
public enum StoredArray: Sendable, Equatable {
    /// Little-endian IEEE single precision.
    case float32(Tensor<Float>)
    /// Little-endian IEEE double precision.
    case float64(Tensor<Double>)
    /// Little-endian 64-bit integers (PyTorch's `num_batches_tracked`).
    case int64(shape: [Int], values: [Int64])

    /// The array's shape.
    public var shape: [Int] {
        switch self {
        case .float32(let t): return t.shape
        case .float64(let t): return t.shape
        case .int64(let shape, _): return shape
        }
    }

    /// The dtype name as PyTorch prints it.
    public var dtypeName: String {
        switch self {
        case .float32: return "float32"
        case .float64: return "float64"
        case .int64: return "int64"
        }
    }

    /// The values as a tensor of the requested floating-point type (int64 values convert).
    public func tensor<T: NormScalar>(as _: T.Type = T.self) -> Tensor<T> {
        switch self {
        case .float32(let t): return t.converted(to: T.self)
        case .float64(let t): return t.converted(to: T.self)
        case .int64(let shape, let values):
            // The shape was validated when the array was read.
            return (try? Tensor(shape: shape, scalars: values.map { T($0) })) ?? Tensor([])
        }
    }
}

/// Reads little-endian scalars out of a byte buffer.
enum ByteReader {
    static func uint(_ bytes: UnsafeRawBufferPointer, at offset: Int, width: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in 0..<width { value |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
        return value
    }

    static func floats<T: NormScalar>(
        _ bytes: UnsafeRawBufferPointer, at offset: Int, count: Int, as _: T.Type
    ) -> [T] {
        let width = T.byteCount
        return (0..<count).map {
            T(littleEndianBits: uint(bytes, at: offset + $0 * width, width: width))
        }
    }

    static func int64s(_ bytes: UnsafeRawBufferPointer, at offset: Int, count: Int) -> [Int64] {
        (0..<count).map { Int64(bitPattern: uint(bytes, at: offset + $0 * 8, width: 8)) }
    }

    static func append(_ value: UInt64, width: Int, to out: inout [UInt8]) {
        for i in 0..<width { out.append(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) }
    }
}
