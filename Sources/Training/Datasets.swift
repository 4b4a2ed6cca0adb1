import Foundation
import NormKit

/// A labelled image data set held in memory.
public struct Dataset<Scalar: NormScalar>: Sendable {
    /// Images `[count, C, H, W]`.
    public var images: Tensor<Scalar>
    /// Labels in `0..<classCount`.
    public var labels: [Int]
    /// Number of classes.
    public var classCount: Int

    /// Number of examples.
    public var count: Int { labels.count }
    /// `[C, H, W]`.
    public var imageShape: [Int] { Array(images.shape.dropFirst()) }

    /// The examples at `indices`, as one batch.
    public func batch(_ indices: ArraySlice<Int>) throws -> (Tensor<Scalar>, [Int]) {
        let size = imageShape.reduce(1, *)
        var values: [Scalar] = []
        values.reserveCapacity(indices.count * size)
        images.withUnsafeBufferPointer { p in
            for i in indices { values.append(contentsOf: p[(i * size)..<((i + 1) * size)]) }
        }
        return (
            try Tensor(shape: [indices.count] + imageShape, scalars: values),
            indices.map { labels[$0] }
        )
    }

    /// A seeded split into training and test sets (`testFraction` of each class's examples
    /// goes to the test set, so both keep the class balance).
    public func split(testFraction: Double, seed: UInt64) throws -> (train: Dataset, test: Dataset)
    {
        var generator = SeededGenerator(seed: seed)
        var trainIndices: [Int] = []
        var testIndices: [Int] = []
        for c in 0..<classCount {
            var members = labels.indices.filter { labels[$0] == c }
            members.shuffle(using: &generator)
            let cut = Int((Double(members.count) * testFraction).rounded())
            testIndices += members[..<cut]
            trainIndices += members[cut...]
        }
        trainIndices.sort()
        testIndices.sort()
        let (trainImages, trainLabels) = try batch(trainIndices[...])
        let (testImages, testLabels) = try batch(testIndices[...])
        return (
            Dataset(images: trainImages, labels: trainLabels, classCount: classCount),
            Dataset(images: testImages, labels: testLabels, classCount: classCount)
        )
    }
}

/// The data sets that ship with NormKit.
public enum Datasets {
    /// The UCI handwritten digits (1,797 images, 1×8×8, values scaled to [0, 1]), shipped in the
    /// package (see `Sources/Training/Resources/README.md` for source and licence).
    /// - Throws: ``FileFormatError`` when the shipped file is missing or damaged.
    public static func digits<Scalar: NormScalar>(as _: Scalar.Type = Scalar.self) throws
        -> Dataset<Scalar>
    {
        guard let url = Bundle.module.url(forResource: "digits", withExtension: "safetensors")
        else {
            throw FileFormatError.io(
                path: "digits.safetensors", reason: "not found in the package resources")
        }
        return try digits(contentsOf: url.path)
    }

    /// Reads a digits file in the shipped format.
    public static func digits<Scalar: NormScalar>(
        contentsOf path: String, as _: Scalar.Type = Scalar.self
    ) throws
        -> Dataset<Scalar>
    {
        let file = try Safetensors.read(contentsOf: path)
        let images: Tensor<Scalar> = try file.tensor("images")
        guard case .int64(let shape, let values)? = file.tensors["labels"],
            shape == [images.shape.first ?? -1],
            images.rank == 4
        else {
            throw FileFormatError.malformedHeader(
                format: "digits", reason: "needs images [N, 1, 8, 8] and int64 labels [N]")
        }
        let labels = values.map { Int($0) }
        guard labels.allSatisfy({ (0..<10).contains($0) }) else {
            throw FileFormatError.malformedHeader(format: "digits", reason: "labels outside 0…9")
        }
        return Dataset(images: images.map { $0 / 16 }, labels: labels, classCount: 10)
    }

    /// Ten classes of procedurally drawn shapes, `3×size×size`.
    ///
    /// Disc, square, triangle, cross, ring, diamond, horizontal bars, vertical bars,
    /// checkerboard and X, each with a random
    /// position, size, stripe texture, and a per-image contrast and colour shift (`a_c·x + b_c`
    /// with a ∈ [0.2, 3], b ∈ [−2, 2] per channel), so that the raw intensity scale carries no
    /// information and normalization matters. Generated from the seed, identical everywhere.
    public static func shapes<Scalar: NormScalar>(
        count: Int, size: Int = 32, seed: UInt64, as _: Scalar.Type = Scalar.self
    ) throws -> Dataset<Scalar> {
        guard count >= 10, size >= 8 else {
            throw TrainingError.invalidSetting(
                name: "shapes", value: "\(count) images of \(size)×\(size)",
                requirement: "at least 10 images of 8×8")
        }
        var g = SeededGenerator(seed: seed)
        var values: [Scalar] = []
        values.reserveCapacity(count * 3 * size * size)
        var labels: [Int] = []
        for i in 0..<count {
            let label = i % 10
            labels.append(label)
            let s = Double(size)
            let cx = s * (0.35 + 0.3 * g.nextUniform())
            let cy = s * (0.35 + 0.3 * g.nextUniform())
            let r = s * (0.18 + 0.12 * g.nextUniform())
            let stripe = 2 + Int(g.nextUniform() * 3)
            let gains = (0..<3).map { _ in 0.2 + 2.8 * g.nextUniform() }
            let shifts = (0..<3).map { _ in -2 + 4 * g.nextUniform() }
            var plane = [Double](repeating: 0, count: size * size)
            for y in 0..<size {
                for x in 0..<size {
                    let dx = Double(x) + 0.5 - cx
                    let dy = Double(y) + 0.5 - cy
                    let d = (dx * dx + dy * dy).squareRoot()
                    let inside: Bool
                    switch label {
                    case 0: inside = d < r
                    case 1: inside = abs(dx) < r && abs(dy) < r
                    case 2: inside = dy < r && dy > -r && abs(dx) < (r - dy) / 2
                    case 3:
                        inside =
                            (abs(dx) < r / 3 && abs(dy) < r) || (abs(dy) < r / 3 && abs(dx) < r)
                    case 4: inside = d < r && d > r * 0.55
                    case 5: inside = abs(dx) + abs(dy) < r
                    case 6: inside = abs(dx) < r && abs(dy) < r && (Int(dy + s) / stripe) % 2 == 0
                    case 7: inside = abs(dx) < r && abs(dy) < r && (Int(dx + s) / stripe) % 2 == 0
                    case 8:
                        inside =
                            abs(dx) < r && abs(dy) < r
                            && ((Int(dx + s) / stripe) + (Int(dy + s) / stripe)) % 2 == 0
                    default: inside = abs(abs(dx) - abs(dy)) < r / 4 && d < r * 1.2
                    }
                    let noise = 0.15 * g.nextNormal()
                    plane[y * size + x] = (inside ? 1 : 0) + noise
                }
            }
            for c in 0..<3 {
                for p in plane { values.append(Scalar(gains[c] * p + shifts[c])) }
            }
        }
        return Dataset(
            images: try Tensor(shape: [count, 3, size, size], scalars: values), labels: labels,
            classCount: 10)
    }
}
