import Foundation
import Testing

@testable import Training

@Suite("Fashion-MNIST")
struct FashionMNISTTests {
    static let installed = FileManager.default.fileExists(
        atPath: Datasets.fashionMNISTDirectory + "/train-images-idx3-ubyte.gz")

    static func idx(type: UInt8 = 0x08, sizes: [Int], data: Int, magic: [UInt8] = [0, 0])
        -> [UInt8]
    {
        var b = magic + [type, UInt8(sizes.count)]
        for s in sizes {
            b += [UInt8(s >> 24 & 255), UInt8(s >> 16 & 255), UInt8(s >> 8 & 255), UInt8(s & 255)]
        }
        return b + (0..<data).map { UInt8($0 % 256) }
    }

    static func write(_ bytes: [UInt8], _ name: String, in dir: String) throws -> String {
        let path = dir + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    static func temporaryDirectory() throws -> String {
        let dir = NSTemporaryDirectory() + "normkit-idx-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Needs Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`); without it
    /// the test is skipped, with that note.
    @Test(
        .enabled(
            if: installed,
            "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (or Tools/ensure-deps.sh)"
        ))
    func installedFilesHaveTheOfficialSizesAndBalancedClasses() throws {
        let (train, test): (Dataset<Float>, Dataset<Float>) = try Datasets.fashionMNIST()
        #expect(train.images.shape == [60000, 1, 28, 28])
        #expect(test.images.shape == [10000, 1, 28, 28])
        // The published split has 6,000 training and 1,000 test images of each class.
        #expect((0..<10).allSatisfy { c in train.labels.filter { $0 == c }.count == 6000 })
        #expect((0..<10).allSatisfy { c in test.labels.filter { $0 == c }.count == 1000 })
        let pixels = test.images.scalars
        #expect(pixels.allSatisfy { $0 >= 0 && $0 <= 1 })
        #expect(pixels.contains(1) && pixels.contains(0))
        let mean = pixels.reduce(0, +) / Float(pixels.count)
        #expect(mean > 0.2 && mean < 0.4, "mean pixel \(mean)")
    }

    @Test func missingFilesSayHowToInstall() throws {
        let dir = try Self.temporaryDirectory()
        do {
            let _: (Dataset<Float>, Dataset<Float>) = try Datasets.fashionMNIST(directory: dir)
            Issue.record("no error for an empty folder")
        } catch let error as DatasetError {
            guard case .missing = error else {
                Issue.record("wrong error \(error)")
                return
            }
            #expect(error.description.contains("apt-get install dataset-fashion-mnist"))
        }
    }

    @Test func wellFormedIDXFilesRead() throws {
        let dir = try Self.temporaryDirectory()
        let images = try Self.write(Self.idx(sizes: [3, 4, 5], data: 60), "i", in: dir)
        let labels = try Self.write([0, 0, 8, 1, 0, 0, 0, 3, 2, 9, 0], "l", in: dir)
        let data: Dataset<Float> = try IDX.read(images: images, labels: labels, classCount: 10)
        #expect(data.images.shape == [3, 1, 4, 5])
        #expect(data.labels == [2, 9, 0])
        #expect(data.images.scalars[59] == Float(59) / 255)
    }

    @Test func malformedIDXFilesGiveTypedErrors() throws {
        let cases: [([UInt8], Int, String)] = [
            (Self.idx(sizes: [2, 2, 2], data: 8, magic: [1, 0]), 3, "magic"),
            (Self.idx(type: 0x0D, sizes: [2, 2, 2], data: 8), 3, "element type"),
            (Self.idx(sizes: [2, 2], data: 4), 3, "dimensions"),
            (Self.idx(sizes: [2, 2, 2], data: 7), 3, "need 8 data bytes"),
            (Self.idx(sizes: [2, 2, 2], data: 9), 3, "need 8 data bytes"),
            ([0, 0, 8], 1, "shorter"),
            ([0, 0, 8, 3, 0, 0], 3, "truncated"),
            (Self.idx(sizes: [65536, 65536, 65536], data: 0), 3, "need"),
        ]
        for (bytes, rank, phrase) in cases {
            #expect {
                _ = try IDX.parse(bytes, rank: rank, path: "x")
            } throws: { error in
                guard let e = error as? DatasetError, case .malformed(_, let reason) = e else {
                    return false
                }
                return reason.contains(phrase)
            }
        }
    }

    @Test func labelsMustMatchImagesAndClasses() throws {
        let dir = try Self.temporaryDirectory()
        let images = try Self.write(Self.idx(sizes: [3, 2, 2], data: 12), "i", in: dir)
        let short = try Self.write([0, 0, 8, 1, 0, 0, 0, 2, 1, 1], "l2", in: dir)
        let big = try Self.write([0, 0, 8, 1, 0, 0, 0, 3, 1, 10, 1], "l3", in: dir)
        #expect(throws: DatasetError.malformed(path: short, reason: "2 labels for 3 images")) {
            let _: Dataset<Float> = try IDX.read(images: images, labels: short, classCount: 10)
        }
        #expect(throws: DatasetError.malformed(path: big, reason: "label 10 outside 0…9")) {
            let _: Dataset<Float> = try IDX.read(images: images, labels: big, classCount: 10)
        }
    }

    /// A gzip stream cut short is reported as damaged, not read as a short file.
    @Test(.enabled(if: installed, "needs the installed Fashion-MNIST gzip files"))
    func truncatedGzipIsAnError() throws {
        let whole = try Data(
            contentsOf: URL(
                fileURLWithPath: Datasets.fashionMNISTDirectory + "/t10k-labels-idx1-ubyte.gz"))
        #expect(
            try Gzip.read(Datasets.fashionMNISTDirectory + "/t10k-labels-idx1-ubyte.gz").count
                == 10008)
        let dir = try Self.temporaryDirectory()
        let path = try Self.write([UInt8](whole.prefix(whole.count / 2)), "cut.gz", in: dir)
        #expect(throws: DatasetError.self) { _ = try Gzip.read(path) }
    }
}
