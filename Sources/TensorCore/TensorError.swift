/// Errors raised when a tensor is built or reshaped with inconsistent sizes.
public enum TensorError: Error, Equatable, CustomStringConvertible {
    /// A dimension is negative.
    case negativeDimension(shape: [Int])
    /// The element count overflows `Int`.
    case shapeOverflow(shape: [Int])
    /// The number of scalars does not match the product of the shape.
    case countMismatch(shape: [Int], count: Int)

    /// A readable one-line description.
    public var description: String {
        switch self {
        case .negativeDimension(let shape):
            return "shape \(shape) has a negative dimension"
        case .shapeOverflow(let shape):
            return "shape \(shape) has more elements than can be addressed"
        case .countMismatch(let shape, let count):
            return "shape \(shape) needs \(Shape.elementCountOrZero(shape)) scalars, got \(count)"
        }
    }
}

/// Helpers on shapes written as `[Int]`.
public enum Shape {
    /// The product of the dimensions, or an error when one is negative or the product overflows.
    public static func elementCount(_ shape: [Int]) throws(TensorError) -> Int {
        var count = 1
        for dim in shape {
            guard dim >= 0 else { throw .negativeDimension(shape: shape) }
            let (product, overflow) = count.multipliedReportingOverflow(by: dim)
            guard !overflow else { throw .shapeOverflow(shape: shape) }
            count = product
        }
        return count
    }

    /// The product of the dimensions, or 0 when it is not a valid shape (for messages).
    public static func elementCountOrZero(_ shape: [Int]) -> Int {
        (try? elementCount(shape)) ?? 0
    }

    /// Row-major (C order) strides of a shape, in elements.
    public static func strides(_ shape: [Int]) -> [Int] {
        var strides = [Int](repeating: 1, count: shape.count)
        var running = 1
        for axis in stride(from: shape.count - 1, through: 0, by: -1) {
            strides[axis] = running
            running *= max(shape[axis], 1)
        }
        return strides
    }
}
