import Foundation
import TensorCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Reader and writer of NumPy's `.npy` format, versions 1.0 to 3.0.
///
/// Accepted: little-endian float32 (`<f4`), float64 (`<f8`) and int64 (`<i8`: class labels) in
/// C order (Fortran order is
/// accepted for rank ≤ 1, where it is the same). Written: version 1.0 (2.0 when the header
/// does not fit 65,535 bytes), header padded so the data starts on a 64-byte boundary.
///
/// ## References
/// 1. NumPy Enhancement Proposal 1, "A simple file format for NumPy arrays".
public enum Numpy {
    /// The six magic bytes every `.npy` file starts with.
    public static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]  // \x93NUMPY
    static let format = "npy"

    /// Reads an array from a file.
    public static func read(contentsOf path: String) throws(FileFormatError) -> StoredArray {
        try decode(try FileBytes.read(path))
    }

    /// Reads a float array from a file as a tensor of the requested type.
    public static func readTensor<T: NormScalar>(contentsOf path: String, as _: T.Type)
        throws(FileFormatError)
        -> Tensor<T>
    {
        try read(contentsOf: path).tensor(as: T.self)
    }

    /// Writes a tensor to a file through ``OutputFile/write(_:to:)`` (a regular file is
    /// replaced atomically; `/dev/null`, FIFOs and symbolic links are written through).
    public static func write<T: NormScalar>(_ tensor: Tensor<T>, to path: String)
        throws(FileFormatError)
    {
        try FileBytes.write(encode(tensor), to: path)
    }

    /// Decodes the bytes of an `.npy` file.
    public static func decode(_ bytes: [UInt8]) throws(FileFormatError) -> StoredArray {
        guard bytes.count >= 10, Array(bytes[0..<6]) == magic else {
            throw .notAFile(format: format, reason: "missing the \\x93NUMPY magic bytes")
        }
        let major = bytes[6]
        let minor = bytes[7]
        guard (1...3).contains(major), minor == 0 else {
            throw .malformedHeader(
                format: format, reason: "unsupported format version \(major).\(minor)")
        }
        let lengthWidth = major == 1 ? 2 : 4
        guard bytes.count >= 8 + lengthWidth else {
            throw .notAFile(format: format, reason: "file ends inside the header length")
        }
        let headerLength = bytes.withUnsafeBytes {
            Int(ByteReader.uint($0, at: 8, width: lengthWidth))
        }
        let headerStart = 8 + lengthWidth
        guard headerLength <= bytes.count - headerStart else {
            throw .notAFile(
                format: format,
                reason: "header length \(headerLength) exceeds the file size \(bytes.count)")
        }
        let headerBytes = bytes[headerStart..<(headerStart + headerLength)]
        let headerText: String
        if major == 3 {
            guard let text = String(bytes: headerBytes, encoding: .utf8) else {
                throw .malformedHeader(format: format, reason: "header is not UTF-8")
            }
            headerText = text
        } else {
            headerText = String(headerBytes.map { Character(Unicode.Scalar($0)) })  // latin-1
        }
        let header = try NumpyHeader.parse(headerText)
        let dataStart = headerStart + headerLength
        let count: Int
        do { count = try Shape.elementCount(header.shape) } catch {
            throw .malformedHeader(format: format, reason: error.description)
        }
        let itemSize: Int
        switch header.descr {
        case "<f4": itemSize = 4
        case "<f8", "<i8": itemSize = 8
        default: throw .unsupportedDType(format: format, dtype: header.descr)
        }
        if header.fortranOrder && header.shape.filter({ $0 > 1 }).count > 1 {
            throw .malformedHeader(
                format: format, reason: "Fortran-order arrays are not supported; save in C order")
        }
        let (needed, overflow) = count.multipliedReportingOverflow(by: itemSize)
        guard !overflow else {
            throw .malformedHeader(
                format: format, reason: "shape \(header.shape) has more bytes than memory can hold")
        }
        let available = bytes.count - dataStart
        guard needed == available else {
            throw .sizeMismatch(
                format: format, name: "array \(header.shape)", expectedBytes: needed,
                actualBytes: available)
        }
        return bytes.withUnsafeBytes { raw in
            if header.descr == "<i8" {
                return .int64(
                    shape: header.shape, values: ByteReader.int64s(raw, at: dataStart, count: count)
                )
            }
            if itemSize == 4 {
                return .float32(
                    Tensor(
                        unchecked: header.shape,
                        ByteReader.floats(raw, at: dataStart, count: count, as: Float.self)))
            }
            return .float64(
                Tensor(
                    unchecked: header.shape,
                    ByteReader.floats(raw, at: dataStart, count: count, as: Double.self)))
        }
    }

    /// Encodes a tensor as `.npy` bytes.
    public static func encode<T: NormScalar>(_ tensor: Tensor<T>) -> [UInt8] {
        let shapeText: String
        switch tensor.shape.count {
        case 0: shapeText = "()"
        case 1: shapeText = "(\(tensor.shape[0]),)"
        default: shapeText = "(" + tensor.shape.map(String.init).joined(separator: ", ") + ")"
        }
        var header =
            "{'descr': '\(T.numpyDescriptor)', 'fortran_order': False, 'shape': \(shapeText), }"
        var major: UInt8 = 1
        var lengthWidth = 2
        // Pad with spaces so that magic + version + length + header is a multiple of 64.
        func padded(_ base: String, prefix: Int) -> String {
            let total = prefix + base.utf8.count + 1
            return base + String(repeating: " ", count: (64 - total % 64) % 64) + "\n"
        }
        var text = padded(header, prefix: 8 + lengthWidth)
        if text.utf8.count > 65_535 {
            major = 2
            lengthWidth = 4
            text = padded(header, prefix: 8 + lengthWidth)
        }
        header = text
        var out = magic + [major, 0]
        ByteReader.append(UInt64(header.utf8.count), width: lengthWidth, to: &out)
        out.append(contentsOf: header.utf8)
        out.reserveCapacity(out.count + tensor.count * T.byteCount)
        for value in tensor.scalars {
            ByteReader.append(value.littleEndianBits, width: T.byteCount, to: &out)
        }
        return out
    }
}

extension Tensor {
    /// Builds a tensor whose count the caller has already checked against the shape.
    init(unchecked shape: [Int], _ scalars: [Scalar]) {
        // The count was validated by the reader; fall back to an empty vector defensively.
        self = (try? Tensor(shape: shape, scalars: scalars)) ?? Tensor([])
    }
}

/// The fields of an `.npy` header, a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
struct NumpyHeader: Equatable {
    var descr: String
    var fortranOrder: Bool
    var shape: [Int]

    /// Parses the literal with a small tokenizer: strings, True/False, tuples of integers.
    static func parse(_ text: String) throws(FileFormatError) -> NumpyHeader {
        var scanner = LiteralScanner(Array(text.unicodeScalars))
        func fail(_ reason: String) -> FileFormatError {
            .malformedHeader(format: "npy", reason: reason)
        }
        var descr: String?
        var fortran: Bool?
        var shape: [Int]?
        var seen = Set<String>()
        guard scanner.consume("{") else { throw fail("the header is not a dict literal") }
        while true {
            if scanner.consume("}") { break }
            guard let key = scanner.string() else { throw fail("expected a quoted key") }
            guard scanner.consume(":") else { throw fail("expected ':' after '\(key)'") }
            guard !seen.contains(key) else { throw fail("the key '\(key)' appears twice") }
            seen.insert(key)
            switch key {
            case "descr":
                guard let value = scanner.string() else { throw fail("'descr' must be a string") }
                descr = value
            case "fortran_order":
                guard let value = scanner.boolean() else {
                    throw fail("'fortran_order' must be True or False")
                }
                fortran = value
            case "shape":
                guard let value = scanner.intTuple() else {
                    throw fail("'shape' must be a tuple of integers")
                }
                guard value.allSatisfy({ $0 >= 0 }) else {
                    throw fail("'shape' has a negative dimension")
                }
                shape = value
            default:
                throw fail("unexpected key '\(key)'")
            }
            if scanner.consume(",") { continue }
            guard scanner.consume("}") else { throw fail("expected ',' or '}'") }
            break
        }
        // NumPy pads the dict with spaces and ends it with a newline; anything else is junk.
        guard scanner.isAtEnd else { throw fail("unexpected text after the header dict") }
        guard let descr, let fortran, let shape else {
            throw fail("the header must have 'descr', 'fortran_order' and 'shape'")
        }
        return NumpyHeader(descr: descr, fortranOrder: fortran, shape: shape)
    }
}

/// A tiny scanner for the Python literals that `.npy` headers use.
struct LiteralScanner {
    private let scalars: [Unicode.Scalar]
    private var position = 0

    init(_ scalars: [Unicode.Scalar]) { self.scalars = scalars }

    private mutating func skipSpace() {
        while position < scalars.count, scalars[position].properties.isWhitespace { position += 1 }
    }

    /// True when only whitespace is left.
    var isAtEnd: Bool {
        mutating get {
            skipSpace()
            return position == scalars.count
        }
    }

    mutating func consume(_ token: String) -> Bool {
        skipSpace()
        let tokenScalars = Array(token.unicodeScalars)
        guard position + tokenScalars.count <= scalars.count,
            Array(scalars[position..<(position + tokenScalars.count)]) == tokenScalars
        else { return false }
        position += tokenScalars.count
        return true
    }

    mutating func string() -> String? {
        skipSpace()
        guard position < scalars.count, scalars[position] == "'" || scalars[position] == "\"" else {
            return nil
        }
        let quote = scalars[position]
        var end = position + 1
        while end < scalars.count, scalars[end] != quote { end += 1 }
        guard end < scalars.count else { return nil }
        var text = String.UnicodeScalarView()
        text.append(contentsOf: scalars[(position + 1)..<end])
        position = end + 1
        return String(text)
    }

    mutating func boolean() -> Bool? {
        if consume("True") { return true }
        if consume("False") { return false }
        return nil
    }

    mutating func integer() -> Int? {
        skipSpace()
        var digits = ""
        while position < scalars.count, ("0"..."9").contains(scalars[position]) {
            digits.unicodeScalars.append(scalars[position])
            position += 1
        }
        if consume("L") {}  // Python 2 long suffix, written by old NumPy versions.
        return digits.isEmpty ? nil : Int(digits)
    }

    mutating func intTuple() -> [Int]? {
        guard consume("(") else { return nil }
        var values: [Int] = []
        while true {
            if consume(")") { return values }
            guard let value = integer() else { return nil }
            values.append(value)
            if consume(",") { continue }
            return consume(")") ? values : nil
        }
    }
}

/// Whole-file reads, and writes through ``OutputFile``.
enum FileBytes {
    static func read(_ path: String) throws(FileFormatError) -> [UInt8] {
        var info = stat()
        if stat(path, &info) == 0, info.st_mode & S_IFMT == S_IFDIR {
            throw .io(path: path, reason: "it is a directory, not a file")
        }
        do {
            return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        } catch {
            guard FileManager.default.fileExists(atPath: path) else {
                // Arguments that were not valid UTF-8 reach Swift with U+FFFD in place of the
                // bad bytes, so the name no longer matches the file on disk.
                throw .io(
                    path: path,
                    reason: path.unicodeScalars.contains("\u{FFFD}")
                        ? "no such file (its name contains U+FFFD; a file name that is not valid "
                            + "UTF-8 cannot be passed to NormKit, rename the file)"
                        : "no such file")
            }
            throw .io(path: path, reason: "it cannot be read")
        }
    }

    static func write(_ bytes: [UInt8], to path: String) throws(FileFormatError) {
        try OutputFile.write(bytes, to: path)
    }
}
