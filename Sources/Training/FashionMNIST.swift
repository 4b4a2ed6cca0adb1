import CZlib
import Foundation
import NormKit

/// Why a data set on disk could not be read.
public enum DatasetError: Error, Equatable, CustomStringConvertible {
    /// The files are not there; `hint` says how to install them.
    case missing(path: String, hint: String)
    /// The file could not be opened or decompressed.
    case unreadable(path: String, reason: String)
    /// The file is not the IDX file it should be (magic number, sizes, labels).
    case malformed(path: String, reason: String)

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .missing(let path, let hint): return "data set file '\(path)' not found: \(hint)"
        case .unreadable(let path, let reason): return "cannot read '\(path)': \(reason)"
        case .malformed(let path, let reason): return "'\(path)' is not a valid IDX file: \(reason)"
        }
    }
}

/// Reads gzip files through the system zlib.
enum Gzip {
    /// The decompressed bytes of a gzip file (a plain file is returned as it is, as zlib's
    /// `gzread` does), at most `limit` bytes.
    /// - Throws: ``DatasetError`` when the file is missing, damaged or larger than `limit`.
    static func read(_ path: String, limit: Int = 1 << 30) throws -> [UInt8] {
        guard FileManager.default.fileExists(atPath: path) else {
            throw DatasetError.missing(path: path, hint: "no such file")
        }
        guard let file = gzopen(path, "rb") else {
            throw DatasetError.unreadable(path: path, reason: "gzopen failed")
        }
        defer { gzclose(file) }
        gzbuffer(file, 1 << 17)
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 18)
        while true {
            let n = chunk.withUnsafeMutableBytes { gzread(file, $0.baseAddress, UInt32($0.count)) }
            if n < 0 { break }
            if n == 0 { break }
            out.append(contentsOf: chunk[0..<Int(n)])
            guard out.count <= limit else {
                throw DatasetError.malformed(
                    path: path, reason: "decompresses to more than \(limit) bytes")
            }
        }
        var code: Int32 = 0
        let message = gzerror(file, &code).map { String(cString: $0) } ?? ""
        guard code == Z_OK || code == Z_STREAM_END else {
            throw DatasetError.unreadable(
                path: path, reason: "gzip data is damaged or truncated (zlib: \(message))")
        }
        return out
    }
}

/// IDX files (LeCun's MNIST format, also Fashion-MNIST's): a big-endian header
/// `0x00 0x00 type rank` (type 0x08 = unsigned byte), `rank` 32-bit big-endian sizes, then the
/// data in row-major order.
public enum IDX {
    /// The sizes and bytes of an unsigned-byte IDX file of the given rank.
    /// - Throws: ``DatasetError/malformed(path:reason:)`` for a wrong magic number, rank or
    ///   element type, or a data section that does not match the sizes.
    public static func parse(_ bytes: [UInt8], rank: Int, path: String) throws -> (
        shape: [Int], data: ArraySlice<UInt8>
    ) {
        guard bytes.count >= 4 else {
            throw DatasetError.malformed(path: path, reason: "shorter than the 4-byte magic number")
        }
        guard bytes[0] == 0, bytes[1] == 0 else {
            throw DatasetError.malformed(
                path: path,
                reason: "magic number starts \(bytes[0]) \(bytes[1]), IDX files start with 0 0")
        }
        guard bytes[2] == 0x08 else {
            throw DatasetError.malformed(
                path: path,
                reason:
                    "element type 0x\(String(bytes[2], radix: 16)), expected 0x08 (unsigned byte)")
        }
        guard Int(bytes[3]) == rank else {
            throw DatasetError.malformed(
                path: path, reason: "\(bytes[3]) dimensions, expected \(rank)")
        }
        let header = 4 + 4 * rank
        guard bytes.count >= header else {
            throw DatasetError.malformed(path: path, reason: "header truncated")
        }
        var shape: [Int] = []
        var count = 1
        for d in 0..<rank {
            let o = 4 + 4 * d
            let size =
                Int(bytes[o]) << 24 | Int(bytes[o + 1]) << 16 | Int(bytes[o + 2]) << 8
                | Int(bytes[o + 3])
            shape.append(size)
            let (product, overflow) = count.multipliedReportingOverflow(by: size)
            guard !overflow else {
                throw DatasetError.malformed(path: path, reason: "sizes \(shape) overflow")
            }
            count = product
        }
        guard bytes.count - header == count else {
            throw DatasetError.malformed(
                path: path,
                reason:
                    "sizes \(shape) need \(count) data bytes, the file has \(bytes.count - header)")
        }
        return (shape, bytes[header...])
    }

    /// Images `[N, 1, H, W]` scaled to [0, 1] and labels in `0..<classCount`, from an image
    /// file and a label file.
    static func read<Scalar: NormScalar>(
        images imagesPath: String, labels labelsPath: String, classCount: Int,
        as _: Scalar.Type = Scalar.self
    ) throws -> Dataset<Scalar> {
        let (shape, pixels) = try parse(Gzip.read(imagesPath), rank: 3, path: imagesPath)
        let (labelShape, labelBytes) = try parse(Gzip.read(labelsPath), rank: 1, path: labelsPath)
        guard labelShape[0] == shape[0] else {
            throw DatasetError.malformed(
                path: labelsPath, reason: "\(labelShape[0]) labels for \(shape[0]) images")
        }
        let labels = labelBytes.map { Int($0) }
        if let bad = labels.first(where: { $0 >= classCount }) {
            throw DatasetError.malformed(
                path: labelsPath, reason: "label \(bad) outside 0…\(classCount - 1)")
        }
        let images = try Tensor<Scalar>(
            shape: [shape[0], 1, shape[1], shape[2]], scalars: pixels.map { Scalar($0) / 255 })
        return Dataset(images: images, labels: labels, classCount: classCount)
    }
}

extension Datasets {
    /// Where Debian's `dataset-fashion-mnist` package puts the files; the environment variable
    /// `NORMKIT_FASHION_MNIST` overrides it.
    public static var fashionMNISTDirectory: String {
        ProcessInfo.processInfo.environment["NORMKIT_FASHION_MNIST"]
            ?? "/usr/share/datasets/fashion-mnist"
    }

    /// How to get the files.
    public static let fashionMNISTHint =
        "install Debian's package with `apt-get install dataset-fashion-mnist` (or run "
        + "Tools/ensure-deps.sh), or point NORMKIT_FASHION_MNIST at a folder holding "
        + "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        + "t10k-labels-idx1-ubyte.gz"

    /// Zalando's Fashion-MNIST, read from the installed gzip IDX files.
    ///
    /// Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747: 60,000 training and 10,000 test images of
    /// clothing, 1×28×28, ten classes; pixel values scaled to [0, 1]. Read from the gzip IDX files of `directory` (see `Sources/Training/FashionMNIST.md`).
    /// - Throws: ``DatasetError/missing(path:hint:)`` with installation instructions when the
    ///   files are absent, ``DatasetError`` for a damaged file.
    public static func fashionMNIST<Scalar: NormScalar>(
        directory: String = fashionMNISTDirectory, as _: Scalar.Type = Scalar.self
    ) throws -> (train: Dataset<Scalar>, test: Dataset<Scalar>) {
        let names = [
            "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        ]
        let paths = names.map { directory + "/" + $0 }
        if let absent = paths.first(where: { !FileManager.default.fileExists(atPath: $0) }) {
            throw DatasetError.missing(path: absent, hint: fashionMNISTHint)
        }
        let train: Dataset<Scalar> = try IDX.read(
            images: paths[0], labels: paths[1], classCount: 10)
        let test: Dataset<Scalar> = try IDX.read(
            images: paths[2], labels: paths[3], classCount: 10)
        guard train.imageShape == [1, 28, 28], test.imageShape == [1, 28, 28] else {
            throw DatasetError.malformed(
                path: paths[0],
                reason: "images are \(train.imageShape) and \(test.imageShape), expected 1×28×28")
        }
        return (train, test)
    }

    /// The training and test sets a configuration names: digits and shapes split by
    /// `testFraction` with the seed, Fashion-MNIST's official split; then the first
    /// `trainCount` / `testCount` examples.
    /// - Throws: ``TrainingError/unknownName(kind:name:known:)`` for an unknown data set,
    ///   ``DatasetError`` when Fashion-MNIST is missing or damaged.
    public static func split(for config: TrainingConfig) throws -> (
        train: Dataset<Float>, test: Dataset<Float>
    ) {
        let split: (train: Dataset<Float>, test: Dataset<Float>)
        switch config.dataset {
        case "digits":
            split = try digits().split(testFraction: config.testFraction, seed: config.seed)
        case "shapes":
            split = try shapes(
                count: config.shapesCount, size: config.shapesSize, seed: config.seed &+ 7
            ).split(testFraction: config.testFraction, seed: config.seed)
        case "fashion-mnist": split = try cachedFashionMNIST()
        default:
            throw TrainingError.unknownName(
                kind: "data set", name: config.dataset,
                known: ["digits", "shapes", "fashion-mnist"])
        }
        for count in [config.trainCount, config.testCount].compactMap({ $0 }) where count < 1 {
            throw TrainingError.invalidSetting(
                name: "example count", value: "\(count)", requirement: "at least 1")
        }
        return (
            try prefix(split.train, config.trainCount), try prefix(split.test, config.testCount)
        )
    }

    /// Fashion-MNIST as Float, read once per process (the studies train many networks on it).
    static func cachedFashionMNIST() throws -> (train: Dataset<Float>, test: Dataset<Float>) {
        try FashionMNISTCache.shared.get()
    }

    /// The first `count` examples (all when nil or larger).
    static func prefix<Scalar>(_ data: Dataset<Scalar>, _ count: Int?) throws -> Dataset<Scalar> {
        guard let count, count < data.count else { return data }
        let (images, labels) = try data.batch(Array(0..<count)[...])
        return Dataset(images: images, labels: labels, classCount: data.classCount)
    }
}

/// The process-wide copy of Fashion-MNIST.
final class FashionMNISTCache: @unchecked Sendable {
    static let shared = FashionMNISTCache()
    private let lock = NSLock()
    private var value: (directory: String, train: Dataset<Float>, test: Dataset<Float>)?

    func get() throws -> (train: Dataset<Float>, test: Dataset<Float>) {
        lock.lock()
        defer { lock.unlock() }
        let directory = Datasets.fashionMNISTDirectory
        if let value, value.directory == directory { return (value.train, value.test) }
        let (train, test): (Dataset<Float>, Dataset<Float>) = try Datasets.fashionMNIST(
            directory: directory)
        value = (directory, train, test)
        return (train, test)
    }
}
