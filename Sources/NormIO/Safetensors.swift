import Foundation
import TensorCore

/// Reader and writer of the safetensors format: an 8-byte little-endian header length, a JSON
/// header `{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {…}}`, then the data.
///
/// Accepted dtypes: `F32`, `F64`, `I64`. The reader checks that the header is strict JSON (no
/// key twice: the reference implementation refuses duplicates too), that it fits the file, that
/// every tensor's byte range lies inside the data section, matches its shape and dtype, and
/// overlaps no other tensor, before it allocates anything.
public enum Safetensors {
    static let format = "safetensors"
    /// Larger headers are refused (the reference implementation's limit is 100 MB).
    static let maximumHeaderBytes = 100_000_000

    /// The contents of a safetensors file.
    public struct File: Sendable, Equatable {
        /// Tensors by name.
        public var tensors: [String: StoredArray]
        /// The free-form `__metadata__` strings.
        public var metadata: [String: String]

        /// Creates a file's contents.
        public init(tensors: [String: StoredArray] = [:], metadata: [String: String] = [:]) {
            self.tensors = tensors
            self.metadata = metadata
        }

        /// The named tensor as the requested float type.
        public func tensor<T: NormScalar>(_ name: String, as _: T.Type = T.self)
            throws(FileFormatError) -> Tensor<T>
        {
            guard let array = tensors[name] else {
                throw .missingTensor(name: name, available: Array(tensors.keys))
            }
            return array.tensor(as: T.self)
        }
    }

    /// Reads a file.
    public static func read(contentsOf path: String) throws(FileFormatError) -> File {
        try decode(try FileBytes.read(path))
    }

    /// Writes a file through ``OutputFile/write(_:to:)`` (a regular file is replaced
    /// atomically; `/dev/null`, FIFOs and symbolic links are written through).
    public static func write(_ file: File, to path: String) throws(FileFormatError) {
        try FileBytes.write(encode(file), to: path)
    }

    /// Decodes the bytes of a safetensors file.
    public static func decode(_ bytes: [UInt8]) throws(FileFormatError) -> File {
        func fail(_ reason: String) -> FileFormatError {
            .malformedHeader(format: format, reason: reason)
        }
        guard bytes.count >= 8 else {
            throw .notAFile(
                format: format,
                reason: "the file is \(bytes.count) bytes, shorter than the 8-byte header length")
        }
        let declared = bytes.withUnsafeBytes { ByteReader.uint($0, at: 0, width: 8) }
        guard declared <= UInt64(min(bytes.count - 8, maximumHeaderBytes)) else {
            throw .notAFile(
                format: format,
                reason: "the header length \(declared) exceeds the file size \(bytes.count)")
        }
        let headerLength = Int(declared)
        let json: StrictJSON
        do {
            json = try StrictJSON.parse(bytes[8..<(8 + headerLength)])
        } catch {
            throw fail("the header is not valid JSON: \(error.reason) at byte \(error.offset)")
        }
        guard case .object(let members) = json else {
            throw fail("the header is not a JSON object")
        }
        let dataStart = 8 + headerLength
        let dataLength = bytes.count - dataStart
        var result = File()
        var ranges: [(Int, Int, String)] = []
        for (name, value) in members {
            if name == "__metadata__" {
                guard case .object(let metadata) = value else {
                    throw fail("__metadata__ is not an object")
                }
                for (key, item) in metadata {
                    guard case .string(let text) = item else {
                        throw fail("__metadata__['\(key)'] is not a string")
                    }
                    result.metadata[key] = text
                }
                continue
            }
            guard case .object(let fields) = value,
                case .string(let dtype)? = fields.first(where: { $0.key == "dtype" })?.value,
                case .array(let shapeValues)? = fields.first(where: { $0.key == "shape" })?.value,
                case .array(let offsetValues)? = fields.first(where: { $0.key == "data_offsets" })?
                    .value
            else { throw fail("tensor '\(name)' needs dtype, shape and data_offsets") }
            let shape = shapeValues.compactMap(\.integer)
            guard shape.count == shapeValues.count, shape.allSatisfy({ $0 >= 0 }) else {
                throw fail(
                    "tensor '\(name)' has a shape that is not a list of non-negative integers")
            }
            let offsets = offsetValues.compactMap(\.integer)
            guard offsets.count == 2, offsetValues.count == 2 else {
                throw fail("tensor '\(name)': data_offsets must be two integers [begin, end]")
            }
            guard offsets[0] >= 0, offsets[0] <= offsets[1] else {
                throw fail(
                    "tensor '\(name)': data_offsets [\(offsets[0]), \(offsets[1])] must satisfy "
                        + "0 ≤ begin ≤ end")
            }
            guard offsets[1] <= dataLength else {
                throw fail(
                    "tensor '\(name)': data_offsets [\(offsets[0]), \(offsets[1])] end past the "
                        + "\(dataLength)-byte data section (the file is truncated or its header lies)"
                )
            }
            let itemSize: Int
            switch dtype {
            case "F32": itemSize = 4
            case "F64", "I64": itemSize = 8
            default: throw .unsupportedDType(format: format, dtype: dtype)
            }
            let count: Int
            do { count = try Shape.elementCount(shape) } catch {
                throw fail("tensor '\(name)': \(error)")
            }
            let (needed, overflow) = count.multipliedReportingOverflow(by: itemSize)
            guard !overflow else {
                throw fail("tensor '\(name)': shape \(shape) has more bytes than memory can hold")
            }
            guard needed == offsets[1] - offsets[0] else {
                throw .sizeMismatch(
                    format: format, name: name, expectedBytes: needed,
                    actualBytes: offsets[1] - offsets[0])
            }
            ranges.append((offsets[0], offsets[1], name))
            let start = dataStart + offsets[0]
            result.tensors[name] = bytes.withUnsafeBytes { raw -> StoredArray in
                switch dtype {
                case "F32":
                    return .float32(
                        Tensor(
                            unchecked: shape,
                            ByteReader.floats(raw, at: start, count: count, as: Float.self)))
                case "F64":
                    return .float64(
                        Tensor(
                            unchecked: shape,
                            ByteReader.floats(raw, at: start, count: count, as: Double.self)))
                default:
                    return .int64(
                        shape: shape, values: ByteReader.int64s(raw, at: start, count: count))
                }
            }
        }
        ranges.sort { ($0.0, $0.1) < ($1.0, $1.1) }
        for (a, b) in zip(ranges, ranges.dropFirst()) where b.0 < a.1 {
            throw fail("the data of '\(a.2)' and '\(b.2)' overlap")
        }
        return result
    }

    /// Encodes a file: tensors sorted by name, header padded with spaces to 8 bytes.
    public static func encode(_ file: File) -> [UInt8] {
        var entries: [String] = []
        var data: [UInt8] = []
        for name in file.tensors.keys.sorted() {
            let array = file.tensors[name]!
            let start = data.count
            let dtype: String
            switch array {
            case .float32(let t):
                dtype = "F32"
                for v in t.scalars { ByteReader.append(v.littleEndianBits, width: 4, to: &data) }
            case .float64(let t):
                dtype = "F64"
                for v in t.scalars { ByteReader.append(v.littleEndianBits, width: 8, to: &data) }
            case .int64(_, let values):
                dtype = "I64"
                for v in values { ByteReader.append(UInt64(bitPattern: v), width: 8, to: &data) }
            }
            let shape = array.shape.map(String.init).joined(separator: ",")
            entries.append(
                "\(jsonString(name)):{\"dtype\":\"\(dtype)\",\"shape\":[\(shape)],\"data_offsets\":[\(start),\(data.count)]}"
            )
        }
        if !file.metadata.isEmpty {
            let items = file.metadata.keys.sorted().map {
                "\(jsonString($0)):\(jsonString(file.metadata[$0]!))"
            }
            entries.insert("\"__metadata__\":{\(items.joined(separator: ","))}", at: 0)
        }
        var header = Array("{\(entries.joined(separator: ","))}".utf8)
        while header.count % 8 != 0 { header.append(0x20) }
        var out: [UInt8] = []
        out.reserveCapacity(8 + header.count + data.count)
        ByteReader.append(UInt64(header.count), width: 8, to: &out)
        out += header
        out += data
        return out
    }

    private static func jsonString(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    out += String(format: "\\u%04x", scalar.value)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}
