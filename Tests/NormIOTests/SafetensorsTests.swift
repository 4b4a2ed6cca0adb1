import Foundation
import NormIO
import NormTestSupport
import TensorCore
import Testing

@Suite("safetensors")
struct SafetensorsTests {
    static func header(_ json: String, data: [UInt8]) -> [UInt8] {
        let text = Array(json.utf8)
        var out: [UInt8] = (0..<8).map { UInt8(truncatingIfNeeded: text.count >> (8 * $0)) }
        out += text
        return out + data
    }

    @Test func roundTripsEveryDType() throws {
        var file = Safetensors.File(metadata: ["format": "pt", "note": "quote \" and \\ survive"])
        file.tensors["weight"] = .float32(try Tensor(shape: [2, 2], scalars: [1, 2, 3, 4]))
        file.tensors["running_var"] = .float64(Tensor([0.5, 1e-200]))
        file.tensors["num_batches_tracked"] = .int64(shape: [], values: [7])
        file.tensors["empty"] = .float32(try Tensor(zeros: [0]))
        let bytes = Safetensors.encode(file)
        #expect(try Safetensors.decode(bytes) == file)
        let headerLength = bytes.prefix(8).enumerated().reduce(0) { $0 | Int($1.1) << (8 * $1.0) }
        #expect(headerLength % 8 == 0)
    }

    @Test func readsTheFixturesPyTorchsSideWrote() throws {
        let file = try Safetensors.read(
            contentsOf: Fixtures.directory.appendingPathComponent(
                "batchnorm/rank4_eval.safetensors"
            ).path)
        #expect(file.tensors["x"]?.shape == [2, 3, 3, 3])
        #expect(file.tensors["num_batches_tracked.out"] == .int64(shape: [], values: [3]))
        #expect(file.metadata["generator"] == "Tools/generate_fixtures.py")
    }

    @Test(arguments: [
        // Not JSON, not an object, missing fields.
        ("not json", [UInt8]()),
        ("[1, 2]", []),
        ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", [0, 0, 0, 0]),
        // Offsets outside the data, reversed, or not matching the shape.
        ("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", [0, 0, 0, 0]),
        ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 0]}}", [0, 0, 0, 0]),
        ("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", [0, 0, 0, 0]),
        ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", [0, 0, 0, 0]),
        // Huge or negative shapes.
        (
            "{\"a\": {\"dtype\": \"F32\", \"shape\": [4611686018427387904, 4], \"data_offsets\": [0, 4]}}",
            [0, 0, 0, 0]
        ),
        ("{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", [0, 0, 0, 0]),
        (
            "{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}",
            [0, 0, 0, 0]
        ),
        // Unsupported dtype, overlapping tensors, bad metadata.
        ("{\"a\": {\"dtype\": \"BF16\", \"shape\": [2], \"data_offsets\": [0, 4]}}", [0, 0, 0, 0]),
        (
            "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
                + "\"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
            [0, 0, 0, 0]
        ),
        ("{\"__metadata__\": {\"a\": 1}}", []),
    ])
    func malformedHeadersAreRefused(_ json: String, _ data: [UInt8]) {
        #expect(throws: FileFormatError.self) {
            _ = try Safetensors.decode(Self.header(json, data: data))
        }
    }

    @Test func truncatedFilesAreRefused() throws {
        var file = Safetensors.File()
        file.tensors["x"] = .float64(Tensor([1, 2, 3]))
        let bytes = Safetensors.encode(file)
        for cut in [0, 3, 8, 20, bytes.count - 1] {
            #expect(throws: FileFormatError.self) {
                _ = try Safetensors.decode(Array(bytes.prefix(cut)))
            }
        }
        // A header length far larger than the file.
        var lying = bytes
        lying[7] = 0x7F
        #expect(throws: FileFormatError.self) { _ = try Safetensors.decode(lying) }
    }

    @Test func missingTensorsListWhatIsThere() throws {
        let file = Safetensors.File(tensors: ["a": .float32(Tensor([1]))])
        #expect(throws: FileFormatError.missingTensor(name: "b", available: ["a"])) {
            _ = try file.tensor("b", as: Float.self)
        }
    }
}
