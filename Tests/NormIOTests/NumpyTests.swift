import Foundation
import NormIO
import NormTestSupport
import TensorCore
import Testing

@Suite("NumPy .npy")
struct NumpyTests {
    static let folder = Fixtures.directory.appendingPathComponent("npy")
    static let expected: [Double] = (0..<24).map { Double($0) / 8 - 1 }

    static func path(_ name: String) -> String { folder.appendingPathComponent(name).path }

    @Test(arguments: ["f4_v1.npy", "f8_v1.npy", "f8_v2.npy", "f4_v3.npy"])
    func readsFilesNumPyWrote(_ name: String) throws {
        let array = try Numpy.read(contentsOf: Self.path(name))
        #expect(array.shape == [2, 3, 4])
        #expect(array.dtypeName == (name.hasPrefix("f4") ? "float32" : "float64"))
        #expect(array.tensor(as: Double.self).scalars == Self.expected)
    }

    @Test func readsScalarsVectorsAndEmptyArrays() throws {
        #expect(
            try Numpy.read(contentsOf: Self.path("scalar.npy"))
                == .float64(try Tensor(shape: [], scalars: [2.5])))
        #expect(
            try Numpy.read(contentsOf: Self.path("vector.npy"))
                == .float32(Tensor([1.5, -2, 3.25])))
        #expect(try Numpy.read(contentsOf: Self.path("empty.npy")).shape == [0, 3])
    }

    @Test(arguments: [
        ("big_endian.npy", FileFormatError.unsupportedDType(format: "npy", dtype: ">f4")),
        ("int32.npy", .unsupportedDType(format: "npy", dtype: "<i4")),
        ("float16.npy", .unsupportedDType(format: "npy", dtype: "<f2")),
        (
            "fortran.npy",
            .malformedHeader(
                format: "npy", reason: "Fortran-order arrays are not supported; save in C order")
        ),
    ])
    func refusesWhatItCannotRead(_ name: String, _ error: FileFormatError) {
        #expect(throws: error) { _ = try Numpy.read(contentsOf: Self.path(name)) }
    }

    @Test func roundTripsBothPrecisions() throws {
        let f = try Tensor<Float>(shape: [3, 1, 2], scalars: [1, -2, 3.5, .pi, 0, -0.125])
        #expect(try Numpy.decode(Numpy.encode(f)) == .float32(f))
        let d = try Tensor<Double>(shape: [2, 2], scalars: [1e-300, -2, .pi, 7])
        #expect(try Numpy.decode(Numpy.encode(d)) == .float64(d))
        let bytes = Numpy.encode(d)
        #expect(bytes.count % 64 == 32)  // header padded to 64 bytes, then 4 doubles
    }

    @Test func writtenFilesKeepTheHeaderAligned() throws {
        let bytes = Numpy.encode(Tensor<Float>([1, 2, 3]))
        let headerLength = Int(bytes[8]) | Int(bytes[9]) << 8
        #expect((10 + headerLength) % 64 == 0)
        #expect(bytes[10 + headerLength - 1] == UInt8(ascii: "\n"))
    }

    @Test func malformedFilesGiveErrorsNotCrashes() throws {
        let good = Numpy.encode(try Tensor<Float>(shape: [2, 3], scalars: [1, 2, 3, 4, 5, 6]))
        // Truncated data.
        #expect(throws: FileFormatError.self) { _ = try Numpy.decode(Array(good.dropLast(4))) }
        // Extra data (a header that lies about the shape).
        #expect(throws: FileFormatError.self) { _ = try Numpy.decode(good + [0, 0, 0, 0]) }
        // Truncated inside the header, or nothing at all.
        for cut in [0, 5, 9, 20, 60] {
            #expect(throws: FileFormatError.self) { _ = try Numpy.decode(Array(good.prefix(cut))) }
        }
        // Wrong magic and unsupported version.
        var wrong = good
        wrong[1] = 0
        #expect(throws: FileFormatError.self) { _ = try Numpy.decode(wrong) }
        var version = good
        version[6] = 9
        #expect(throws: FileFormatError.self) { _ = try Numpy.decode(version) }
        // A header length that points past the end.
        var long = good
        long[8] = 0xFF
        long[9] = 0xFF
        #expect(throws: FileFormatError.self) { _ = try Numpy.decode(long) }
    }

    @Test(arguments: [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 100000000000), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 2), }",
        "{'descr': '<f4', 'fortran_order': False}",
        "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,), }",
        "{'descr': 5, 'fortran_order': False, 'shape': (2,), }",
        "['descr', '<f4']",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,",
    ])
    func lyingOrBrokenHeadersAreRefused(_ header: String) {
        var bytes = Numpy.magic + [1, 0]
        let text = Array(header.utf8) + [0x0A]
        bytes += [UInt8(text.count & 0xFF), UInt8(text.count >> 8)] + text
        bytes += [UInt8](repeating: 0, count: 8)
        #expect(throws: FileFormatError.self) { _ = try Numpy.decode(bytes) }
    }

    @Test func missingFilesNameThePath() {
        #expect(throws: FileFormatError.io(path: "/nonexistent/x.npy", reason: "no such file")) {
            _ = try Numpy.read(contentsOf: "/nonexistent/x.npy")
        }
    }
}
