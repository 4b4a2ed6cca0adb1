/// A dense, row-major tensor with value semantics.
///
/// Storage is a Swift `Array`, so copies are cheap until one side is mutated
/// (copy-on-write). Shapes are written as `[Int]`; a rank-0 tensor has shape `[]` and one
/// scalar. NormKit's layers interpret the axes through a ``Layout``; the tensor itself only
/// knows its shape.
public struct Tensor<Scalar: NormScalar>: Sendable, Equatable {
    /// The size of every axis, outermost first.
    public private(set) var shape: [Int]
    /// The elements in row-major (C) order; `scalars.count == shape.reduce(1, *)`.
    public private(set) var scalars: [Scalar]

    /// Creates a tensor from a shape and its scalars in row-major order.
    /// - Throws: ``TensorError`` when the count does not match the shape.
    public init(shape: [Int], scalars: [Scalar]) throws(TensorError) {
        let count = try Shape.elementCount(shape)
        guard count == scalars.count else {
            throw .countMismatch(shape: shape, count: scalars.count)
        }
        self.shape = shape
        self.scalars = scalars
    }

    /// Creates a tensor filled with one value.
    /// - Throws: ``TensorError`` for a negative or overflowing shape.
    public init(repeating value: Scalar, shape: [Int]) throws(TensorError) {
        let count = try Shape.elementCount(shape)
        self.shape = shape
        self.scalars = [Scalar](repeating: value, count: count)
    }

    /// Creates a tensor of zeros.
    ///
    /// Fills memory with zero bytes (+0.0 in IEEE formats) rather than element by element, so it
    /// stays fast when called from unspecialized generic code.
    public init(zeros shape: [Int]) throws(TensorError) {
        let count = try Shape.elementCount(shape)
        self.shape = shape
        self.scalars = [Scalar](unsafeUninitializedCapacity: count) { buffer, initialized in
            UnsafeMutableRawBufferPointer(buffer).initializeMemory(as: UInt8.self, repeating: 0)
            initialized = count
        }
    }

    /// A tensor from Double values, rounded to `Scalar` (a specialized loop for Float and
    /// Double, so unspecialized generic callers do not pay a witness call per element).
    /// - Throws: ``TensorError`` when the count does not match the shape.
    public init(shape: [Int], rounding values: [Double]) throws(TensorError) {
        let count = try Shape.elementCount(shape)
        guard count == values.count else { throw .countMismatch(shape: shape, count: values.count) }
        self.shape = shape
        if Scalar.self == Double.self {
            self.scalars = unsafeBitCast(values, to: [Scalar].self)
        } else if Scalar.self == Float.self {
            let floats = values.map { Float($0) }
            self.scalars = unsafeBitCast(floats, to: [Scalar].self)
        } else {
            self.scalars = values.map { Scalar($0) }
        }
    }

    /// Elementwise sum of two tensors of the same shape.
    /// - Throws: ``TensorError/countMismatch(shape:count:)`` when the shapes differ.
    public static func + (lhs: Tensor, rhs: Tensor) throws(TensorError) -> Tensor {
        guard lhs.shape == rhs.shape else {
            throw .countMismatch(shape: lhs.shape, count: rhs.count)
        }
        if Scalar.self == Float.self {
            // Specialized loop: generic code would pay a witness call per element.
            var out = lhs
            out.scalars.withUnsafeMutableBufferPointer { o in
                rhs.scalars.withUnsafeBufferPointer { r in
                    let of = UnsafeMutableRawBufferPointer(o).assumingMemoryBound(to: Float.self)
                    let rf = UnsafeRawBufferPointer(r).assumingMemoryBound(to: Float.self)
                    for i in 0..<of.count { of[i] += rf[i] }
                }
            }
            return out
        }
        return Tensor(
            uncheckedShape: lhs.shape, scalars: zip(lhs.scalars, rhs.scalars).map { $0 + $1 })
    }

    /// Creates a rank-1 tensor from an array.
    public init(_ vector: [Scalar]) {
        self.shape = [vector.count]
        self.scalars = vector
    }

    /// Internal unchecked initialiser for callers that already validated the count.
    @usableFromInline
    init(uncheckedShape shape: [Int], scalars: [Scalar]) {
        self.shape = shape
        self.scalars = scalars
    }

    /// The number of axes.
    public var rank: Int { shape.count }
    /// The number of elements.
    public var count: Int { scalars.count }

    /// The same scalars under another shape with the same element count.
    public func reshaped(_ newShape: [Int]) throws(TensorError) -> Tensor {
        try Tensor(shape: newShape, scalars: scalars)
    }

    /// Converts every element to another scalar type (rounding to nearest).
    public func converted<Other: NormScalar>(to _: Other.Type = Other.self) -> Tensor<Other> {
        Tensor<Other>(uncheckedShape: shape, scalars: scalars.map { Other($0) })
    }

    /// Applies a function to every element.
    public func map(_ transform: (Scalar) throws -> Scalar) rethrows -> Tensor {
        Tensor(uncheckedShape: shape, scalars: try scalars.map(transform))
    }

    /// Reads or writes the element at a multi-index.
    public subscript(_ index: Int...) -> Scalar {
        get { scalars[flatIndex(index)] }
        set { scalars[flatIndex(index)] = newValue }
    }

    /// Reads or writes the element at a row-major flat index.
    public subscript(flat index: Int) -> Scalar {
        get { scalars[index] }
        set { scalars[index] = newValue }
    }

    private func flatIndex(_ index: [Int]) -> Int {
        precondition(index.count == rank, "Index \(index) has the wrong rank for shape \(shape).")
        var flat = 0
        for (axis, i) in index.enumerated() {
            precondition(
                i >= 0 && i < shape[axis], "Index \(index) is out of bounds for shape \(shape).")
            flat = flat * shape[axis] + i
        }
        return flat
    }

    /// Calls `body` with the scalars as a contiguous buffer.
    public func withUnsafeBufferPointer<R>(
        _ body: (UnsafeBufferPointer<Scalar>) throws -> R
    ) rethrows -> R {
        try scalars.withUnsafeBufferPointer(body)
    }

    /// Calls `body` with the scalars as a mutable contiguous buffer.
    public mutating func withUnsafeMutableBufferPointer<R>(
        _ body: (inout UnsafeMutableBufferPointer<Scalar>) throws -> R
    ) rethrows -> R {
        try scalars.withUnsafeMutableBufferPointer(body)
    }

    /// True when every element is finite (no NaN or infinity).
    public var isFinite: Bool { scalars.allSatisfy { $0.isFinite } }
}

extension Tensor: CustomStringConvertible {
    /// A short summary: dtype, shape and the first few values.
    public var description: String {
        let head = scalars.prefix(6).map { "\($0)" }.joined(separator: ", ")
        let more = scalars.count > 6 ? ", …" : ""
        return "Tensor<\(Scalar.dtypeName)>\(shape) [\(head)\(more)]"
    }
}
