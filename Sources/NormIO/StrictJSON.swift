/// A small, strict JSON reader for safetensors headers (RFC 8259).
///
/// Stricter than Foundation's `JSONSerialization` where that matters for a file format: a key
/// given twice in one object is an error (Foundation keeps the last, so two readers of the
/// same file could disagree on its contents), nesting is limited (a header of a million `[`
/// cannot exhaust the stack), and integers keep their exact value rather than passing through
/// a Double. Objects keep their keys in file order.
enum StrictJSON: Equatable {
    case object([(key: String, value: StrictJSON)])
    case array([StrictJSON])
    case string(String)
    /// A number: the exact integer when it is one that fits `Int`, and its Double value.
    case number(integer: Int?, value: Double)
    case bool(Bool)
    case null

    static func == (a: StrictJSON, b: StrictJSON) -> Bool {
        switch (a, b) {
        case (.object(let x), .object(let y)):
            return x.count == y.count
                && zip(x, y).allSatisfy { $0.key == $1.key && $0.value == $1.value }
        case (.array(let x), .array(let y)): return x == y
        case (.string(let x), .string(let y)): return x == y
        case (.number(let i, let x), .number(let j, let y)): return i == j && x == y
        case (.bool(let x), .bool(let y)): return x == y
        case (.null, .null): return true
        default: return false
        }
    }

    /// The deepest nesting of arrays and objects accepted.
    static let maximumDepth = 64

    /// Parses one JSON value that fills `bytes` (surrounding whitespace allowed).
    /// - Throws: a reason in words, with the byte offset where the problem is.
    static func parse(_ bytes: ArraySlice<UInt8>) throws(StrictJSONError) -> StrictJSON {
        var parser = Parser(bytes: bytes)
        let value = try parser.value(depth: 0)
        parser.skipSpace()
        guard parser.position == bytes.endIndex else {
            throw parser.fail("unexpected text after the JSON value")
        }
        return value
    }

    /// The integer value of a number, or nil.
    var integer: Int? {
        if case .number(let i, _) = self { return i }
        return nil
    }

    struct Parser {
        let bytes: ArraySlice<UInt8>
        var position: Int

        init(bytes: ArraySlice<UInt8>) {
            self.bytes = bytes
            position = bytes.startIndex
        }

        func fail(_ reason: String) -> StrictJSONError {
            StrictJSONError(reason: reason, offset: position - bytes.startIndex)
        }

        mutating func skipSpace() {
            while position < bytes.endIndex,
                [0x20, 0x09, 0x0A, 0x0D].contains(bytes[position])
            {
                position += 1
            }
        }

        mutating func consume(_ byte: UInt8) -> Bool {
            skipSpace()
            guard position < bytes.endIndex, bytes[position] == byte else { return false }
            position += 1
            return true
        }

        mutating func literal(_ text: String) -> Bool {
            let utf8 = Array(text.utf8)
            guard bytes.endIndex - position >= utf8.count,
                bytes[position..<(position + utf8.count)].elementsEqual(utf8)
            else { return false }
            position += utf8.count
            return true
        }

        mutating func value(depth: Int) throws(StrictJSONError) -> StrictJSON {
            skipSpace()
            guard position < bytes.endIndex else { throw fail("the JSON ends early") }
            switch bytes[position] {
            case UInt8(ascii: "{"):
                guard depth < StrictJSON.maximumDepth else { throw fail("nesting is too deep") }
                position += 1
                var members: [(key: String, value: StrictJSON)] = []
                var keys = Set<String>()
                if consume(UInt8(ascii: "}")) { return .object(members) }
                repeat {
                    skipSpace()
                    let keyOffset = position
                    guard position < bytes.endIndex, bytes[position] == UInt8(ascii: "\"") else {
                        throw fail("expected a quoted key")
                    }
                    let key = try string()
                    guard keys.insert(key).inserted else {
                        position = keyOffset
                        throw fail("the key '\(key)' appears twice in one object")
                    }
                    guard consume(UInt8(ascii: ":")) else { throw fail("expected ':'") }
                    members.append((key, try value(depth: depth + 1)))
                } while consume(UInt8(ascii: ","))
                guard consume(UInt8(ascii: "}")) else { throw fail("expected ',' or '}'") }
                return .object(members)
            case UInt8(ascii: "["):
                guard depth < StrictJSON.maximumDepth else { throw fail("nesting is too deep") }
                position += 1
                var items: [StrictJSON] = []
                if consume(UInt8(ascii: "]")) { return .array(items) }
                repeat {
                    items.append(try value(depth: depth + 1))
                } while consume(
                    UInt8(ascii: ","))
                guard consume(UInt8(ascii: "]")) else { throw fail("expected ',' or ']'") }
                return .array(items)
            case UInt8(ascii: "\""):
                return .string(try string())
            case UInt8(ascii: "t"):
                if literal("true") { return .bool(true) }
            case UInt8(ascii: "f"):
                if literal("false") { return .bool(false) }
            case UInt8(ascii: "n"):
                if literal("null") { return .null }
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                return try number()
            default:
                break
            }
            throw fail("unexpected character")
        }

        mutating func number() throws(StrictJSONError) -> StrictJSON {
            let start = position
            func digits() -> Int {
                let from = position
                while position < bytes.endIndex,
                    (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[position])
                {
                    position += 1
                }
                return position - from
            }
            if bytes[position] == UInt8(ascii: "-") { position += 1 }
            let intStart = position
            guard digits() > 0 else { throw fail("a number needs digits") }
            if position - intStart > 1 && bytes[intStart] == UInt8(ascii: "0") {
                throw fail("a number has a leading zero")
            }
            var isInteger = true
            if position < bytes.endIndex, bytes[position] == UInt8(ascii: ".") {
                position += 1
                isInteger = false
                guard digits() > 0 else { throw fail("a number needs digits after '.'") }
            }
            if position < bytes.endIndex, bytes[position] | 0x20 == UInt8(ascii: "e") {
                position += 1
                isInteger = false
                if position < bytes.endIndex,
                    bytes[position] == UInt8(ascii: "+") || bytes[position] == UInt8(ascii: "-")
                {
                    position += 1
                }
                guard digits() > 0 else { throw fail("a number needs digits in its exponent") }
            }
            let text = String(decoding: bytes[start..<position], as: UTF8.self)
            let value = Double(text) ?? .infinity
            return .number(integer: isInteger ? Int(text) : nil, value: value)
        }

        mutating func string() throws(StrictJSONError) -> String {
            position += 1  // the opening quote
            var scalars = String.UnicodeScalarView()
            var run = position  // start of the current run of plain bytes
            func flush(_ end: Int) throws(StrictJSONError) {
                guard run < end else { return }
                guard let text = String(validating: bytes[run..<end], as: UTF8.self) else {
                    throw fail("a string is not valid UTF-8")
                }
                scalars.append(contentsOf: text.unicodeScalars)
            }
            while true {
                guard position < bytes.endIndex else { throw fail("a string is not closed") }
                let byte = bytes[position]
                if byte == UInt8(ascii: "\"") {
                    try flush(position)
                    position += 1
                    return String(scalars)
                }
                guard byte >= 0x20 else { throw fail("a control character inside a string") }
                guard byte == UInt8(ascii: "\\") else {
                    position += 1
                    continue
                }
                try flush(position)
                position += 1
                guard position < bytes.endIndex else { throw fail("a string is not closed") }
                let escape = bytes[position]
                position += 1
                switch escape {
                case UInt8(ascii: "\""): scalars.append("\"")
                case UInt8(ascii: "\\"): scalars.append("\\")
                case UInt8(ascii: "/"): scalars.append("/")
                case UInt8(ascii: "b"): scalars.append("\u{08}")
                case UInt8(ascii: "f"): scalars.append("\u{0C}")
                case UInt8(ascii: "n"): scalars.append("\n")
                case UInt8(ascii: "r"): scalars.append("\r")
                case UInt8(ascii: "t"): scalars.append("\t")
                case UInt8(ascii: "u"):
                    var code = try hex4()
                    if (0xD800..<0xDC00).contains(code) {
                        guard literal("\\u") else { throw fail("an unpaired surrogate") }
                        let low = try hex4()
                        guard (0xDC00..<0xE000).contains(low) else {
                            throw fail("an unpaired surrogate")
                        }
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    }
                    guard let scalar = Unicode.Scalar(code) else {
                        throw fail("an unpaired surrogate")
                    }
                    scalars.append(scalar)
                default:
                    throw fail("an unknown escape in a string")
                }
                run = position
            }
        }

        mutating func hex4() throws(StrictJSONError) -> UInt32 {
            guard bytes.endIndex - position >= 4 else { throw fail("a short \\u escape") }
            var code: UInt32 = 0
            for _ in 0..<4 {
                guard let digit = hexValue(bytes[position]) else {
                    throw fail("a bad \\u escape")
                }
                code = code * 16 + digit
                position += 1
            }
            return code
        }

        func hexValue(_ byte: UInt8) -> UInt32? {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return UInt32(byte - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return UInt32(byte - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return UInt32(byte - UInt8(ascii: "A") + 10)
            default: return nil
            }
        }
    }
}

/// Why a JSON text was refused, and where.
struct StrictJSONError: Error, Equatable {
    var reason: String
    /// The byte offset in the JSON text.
    var offset: Int
}
