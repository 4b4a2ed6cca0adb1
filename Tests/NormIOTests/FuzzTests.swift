import Foundation
import NormIO
import NormTestSupport
import TensorCore
import Testing

/// Mutations of valid files: the readers must return a typed error or a consistent value,
/// never trap, hang or allocate what the file does not contain.
enum Mutator {
    /// One mutated copy of `bytes`; `headerEnd` bounds the "lying header" edits.
    static func mutate(
        _ bytes: [UInt8], headerEnd: Int, using g: inout SeededGenerator
    ) -> [UInt8] {
        var out = bytes
        switch g.next() % 7 {
        case 0:  // byte flips
            for _ in 0..<(1 + Int(g.next() % 4)) where !out.isEmpty {
                out[Int(g.next() % UInt64(out.count))] ^= UInt8(1 << (g.next() % 8))
            }
        case 1:  // random bytes
            for _ in 0..<(1 + Int(g.next() % 8)) where !out.isEmpty {
                out[Int(g.next() % UInt64(out.count))] = UInt8(truncatingIfNeeded: g.next())
            }
        case 2:  // truncation
            out.removeLast(Int(g.next() % UInt64(out.count + 1)))
        case 3:  // insertion
            let at = Int(g.next() % UInt64(out.count + 1))
            out.insert(
                contentsOf: (0..<(1 + g.next() % 16)).map { _ in UInt8(truncatingIfNeeded: g.next())
                },
                at: at)
        case 4:  // a lying number in the header: digits replaced by a huge or odd value
            let digits = (0..<min(headerEnd, out.count)).filter {
                (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(out[$0])
            }
            if let at = digits.randomElement(using: &g) {
                let lie = [
                    "9223372036854775807", "18446744073709551616", "99999999999", "-1", "0",
                    "1e308", "4611686018427387904",
                ].randomElement(using: &g)!
                out.replaceSubrange(at...at, with: Array(lie.utf8))
            }
        case 5:  // a lying length prefix
            let width = out.count >= 8 && out[0] != 0x93 ? 8 : 2
            let offset = width == 8 ? 0 : 8
            if out.count >= offset + width {
                for i in 0..<width {
                    out[offset + i] = UInt8(truncatingIfNeeded: g.next())
                }
            }
        default:  // a header token duplicated (keys twice, junk after the dict)
            if headerEnd > 12, out.count >= headerEnd {
                let from = 10 + Int(g.next() % UInt64(headerEnd - 10))
                let length = min(1 + Int(g.next() % 40), headerEnd - from)
                let at = 10 + Int(g.next() % UInt64(headerEnd - 10))
                out.insert(contentsOf: out[from..<(from + length)], at: at)
            }
        }
        return out
    }

    /// The header end of an `.npy` or safetensors file (for the header mutations).
    static func headerEnd(_ bytes: [UInt8]) -> Int {
        if bytes.first == 0x93 { return 10 + Int(bytes[8]) + Int(bytes[9]) << 8 }
        return 8 + bytes.prefix(8).enumerated().reduce(0) { $0 | Int($1.1) << (8 * $1.0) }
    }
}

@Suite("Fuzzed readers")
struct FuzzTests {
    /// Mutations per seed file; the whole suite runs in a few seconds in a debug build.
    static let rounds = 1000

    static func consistent(_ array: StoredArray) -> Bool {
        let count = array.shape.reduce(1, *)
        switch array {
        case .float32(let t): return t.scalars.count == count
        case .float64(let t): return t.scalars.count == count
        case .int64(_, let values): return values.count == count
        }
    }

    static func npySeeds() throws -> [[UInt8]] {
        let folder = Fixtures.directory.appendingPathComponent("npy")
        var seeds = try ["f4_v1.npy", "f8_v2.npy", "f4_v3.npy", "scalar.npy", "empty.npy"].map {
            [UInt8](try Data(contentsOf: folder.appendingPathComponent($0)))
        }
        seeds.append(Numpy.encode(try Tensor<Float>(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6])))
        return seeds
    }

    static func safetensorsSeeds() throws -> [[UInt8]] {
        var file = Safetensors.File(metadata: ["format": "pt", "note": "a \"quoted\" note"])
        file.tensors["weight"] = .float32(try Tensor(shape: [2, 2], scalars: [1, 2, 3, 4]))
        file.tensors["running_var"] = .float64(Tensor([0.5, 2]))
        file.tensors["num_batches_tracked"] = .int64(shape: [], values: [7])
        let fixture = [UInt8](
            try Data(
                contentsOf: Fixtures.directory.appendingPathComponent(
                    "batchnorm/rank2_train.safetensors")))
        return [Safetensors.encode(file), fixture]
    }

    @Test func mutatedNpyFilesGiveTypedErrorsOrConsistentArrays() throws {
        var g = SeededGenerator(seed: 14)
        var accepted = 0
        var refused = 0
        for seed in try Self.npySeeds() {
            let end = Mutator.headerEnd(seed)
            for _ in 0..<Self.rounds {
                let bytes = Mutator.mutate(seed, headerEnd: end, using: &g)
                do {
                    let array = try Numpy.decode(bytes)
                    #expect(Self.consistent(array))
                    accepted += 1
                } catch {
                    #expect(!error.description.contains("-1 bytes"))
                    refused += 1
                }
            }
        }
        // Both outcomes occur, so the mutations reach past the magic bytes.
        #expect(accepted > 0 && refused > 0, "accepted \(accepted), refused \(refused)")
    }

    @Test func mutatedSafetensorsFilesGiveTypedErrorsOrConsistentFiles() throws {
        var g = SeededGenerator(seed: 1414)
        var accepted = 0
        var refused = 0
        for seed in try Self.safetensorsSeeds() {
            let end = Mutator.headerEnd(seed)
            for _ in 0..<(2 * Self.rounds) {
                let bytes = Mutator.mutate(seed, headerEnd: end, using: &g)
                do {
                    let file = try Safetensors.decode(bytes)
                    #expect(file.tensors.values.allSatisfy(Self.consistent))
                    accepted += 1
                } catch {
                    #expect(!error.description.contains("-1 bytes"))
                    refused += 1
                }
            }
        }
        #expect(accepted > 0 && refused > 0, "accepted \(accepted), refused \(refused)")
    }
}

@Suite("Strict parsing")
struct StrictParsingTests {
    static func safetensors(_ json: String, data: [UInt8] = []) -> [UInt8] {
        let text = Array(json.utf8)
        return (0..<8).map { UInt8(truncatingIfNeeded: text.count >> (8 * $0)) } + text + data
    }

    static func npy(_ header: String, data: [UInt8] = []) -> [UInt8] {
        let text = Array(header.utf8)
        return Numpy.magic + [1, 0, UInt8(text.count & 0xFF), UInt8(text.count >> 8)] + text + data
    }

    @Test func aSafetensorsKeyGivenTwiceIsRefused() throws {
        let entry = #"{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#
        let bytes = Self.safetensors(#"{"w":\#(entry),"w":\#(entry)}"#, data: [0, 0, 128, 63])
        #expect(throws: FileFormatError.self) { _ = try Safetensors.decode(bytes) }
        do { _ = try Safetensors.decode(bytes) } catch {
            #expect(error.description.contains("the key 'w' appears twice"))
        }
        // Inside a tensor's entry too.
        let inner = Self.safetensors(
            #"{"w":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}}"#,
            data: [0, 0, 128, 63])
        #expect(throws: FileFormatError.self) { _ = try Safetensors.decode(inner) }
        // The same header without the duplicate reads.
        let good = Self.safetensors(#"{"w":\#(entry)}"#, data: [0, 0, 128, 63])
        #expect(try Safetensors.decode(good).tensors["w"] == .float32(Tensor([1])))
    }

    @Test func offsetErrorsSayWhatIsWrong() throws {
        let cases = [
            (#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[-1,4]}}"#, "0 ≤ begin ≤ end"),
            (#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, "0 ≤ begin ≤ end"),
            (#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, "two integers"),
            (#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,1.5]}}"#, "two integers"),
            (#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,400]}}"#, "4-byte data section"),
            (
                #"{"w":{"dtype":"F64","shape":[4611686018427387904,4],"data_offsets":[0,4]}}"#,
                "more"
            ),
        ]
        for (json, expected) in cases {
            do {
                _ = try Safetensors.decode(Self.safetensors(json, data: [0, 0, 128, 63]))
                Issue.record("\(json) must be refused")
            } catch {
                #expect(error.description.contains(expected), "\(error)")
                #expect(!error.description.contains("-1 bytes"))
            }
        }
    }

    @Test func deeplyNestedOrTrailingJSONIsRefused() throws {
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        #expect(throws: FileFormatError.self) {
            _ = try Safetensors.decode(Self.safetensors(#"{"w":\#(deep)}"#))
        }
        #expect(throws: FileFormatError.self) {
            _ = try Safetensors.decode(Self.safetensors(#"{} {}"#))
        }
    }

    @Test func junkAfterTheNpyHeaderDictIsRefused() throws {
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }"
        let one: [UInt8] = [0, 0, 128, 63]
        #expect(try Numpy.decode(Self.npy(dict + "   \n", data: one)).shape == [1])
        for junk in ["x\n", " {}\n", "}\n", " 'shape': (2,)\n"] {
            #expect(
                throws: FileFormatError.malformedHeader(
                    format: "npy", reason: "unexpected text after the header dict")
            ) { _ = try Numpy.decode(Self.npy(dict + junk, data: one)) }
        }
        let twice = "{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (1,), }\n"
        #expect(
            throws: FileFormatError.malformedHeader(
                format: "npy", reason: "the key 'descr' appears twice")
        ) { _ = try Numpy.decode(Self.npy(twice, data: one)) }
    }

    @Test func absurdNpyShapesAreRefusedBeforeAllocating() throws {
        let huge = "{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 4), }\n"
        #expect(throws: FileFormatError.self) { _ = try Numpy.decode(Self.npy(huge)) }
        let large = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }\n"
        do {
            _ = try Numpy.decode(Self.npy(large, data: [1, 2, 3]))
            Issue.record("must be refused")
        } catch {
            #expect(
                error
                    == .sizeMismatch(
                        format: "npy", name: "array [1000000000000]",
                        expectedBytes: 8_000_000_000_000, actualBytes: 3))
        }
    }
}
