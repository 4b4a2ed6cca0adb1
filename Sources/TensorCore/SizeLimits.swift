/// Sizes that commands take from users (`--shape`, `--repeat`), checked before anything is
/// allocated, against limits that are documented here and named in the error.
///
/// A value past a limit is refused, never silently capped. The limits keep a mistyped size from
/// asking the allocator for terabytes (which aborts the process) or a loop from running for
/// days; they are far above what the commands need.
public enum SizeLimits {
    /// The most elements one user-sized tensor may have: 2²⁸ (1 GiB of Float, 2 GiB of
    /// Double).
    public static let maximumElements = 1 << 28
    /// The most repetitions of a timed loop (`bench --repeat`).
    public static let maximumRepeats = 100_000
    /// The highest rank of a user-given shape.
    public static let maximumRank = 8

    /// Why a size was refused.
    public struct Violation: Error, Equatable, CustomStringConvertible {
        /// The option or quantity (`--shape`).
        public var name: String
        /// The value as given.
        public var value: String
        /// What it must be, with the limit.
        public var requirement: String

        /// Creates a violation.
        public init(name: String, value: String, requirement: String) {
            self.name = name
            self.value = value
            self.requirement = requirement
        }

        /// A readable one-line description.
        public var description: String { "\(name) '\(value)' is refused: \(requirement)" }
    }

    /// Parses a comma-separated shape such as `8,64,32,32` strictly: every field a positive
    /// integer (no empty field, so `2,3,,4` is refused rather than read as `[2, 3, 4]`), the
    /// rank in `ranks`, and at most `maximumElements` elements in all.
    ///
    /// - Parameters:
    ///   - text: the option's text; spaces around fields are allowed.
    ///   - ranks: the ranks the command accepts.
    ///   - maximumElements: a tighter element limit for commands that allocate several copies.
    ///   - name: the option's name in messages.
    /// - Throws: ``Violation`` naming the problem.
    public static func parseShape(
        _ text: String, ranks: ClosedRange<Int> = 1...maximumRank,
        maximumElements: Int = SizeLimits.maximumElements, name: String = "--shape"
    ) throws(Violation) -> [Int] {
        func refuse(_ requirement: String) -> Violation {
            Violation(name: name, value: text, requirement: requirement)
        }
        let fields = text.split(separator: ",", omittingEmptySubsequences: false)
        var dims: [Int] = []
        for field in fields {
            let trimmed = field.drop(while: { $0 == " " }).reversed().drop(while: { $0 == " " })
            let digits = String(trimmed.reversed())
            guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }),
                let value = Int(digits), value >= 1
            else {
                throw refuse("every dimension must be a positive integer (got '\(field)')")
            }
            dims.append(value)
        }
        guard ranks.contains(dims.count) else {
            throw refuse(
                ranks.count == 1
                    ? "needs exactly \(ranks.lowerBound) dimensions"
                    : "needs \(ranks.lowerBound) to \(ranks.upperBound) dimensions")
        }
        try checkElements(dims, maximumElements: maximumElements, name: name, text: text)
        return dims
    }

    /// Checks that a shape has at most `maximumElements` elements, with overflow-checked
    /// arithmetic.
    /// - Throws: ``Violation``.
    public static func checkElements(
        _ shape: [Int], maximumElements: Int = SizeLimits.maximumElements,
        name: String = "shape", text: String? = nil
    ) throws(Violation) {
        var count = 1
        for d in shape {
            guard d >= 0 else {
                throw Violation(
                    name: name, value: text ?? "\(shape)", requirement: "a dimension is negative")
            }
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            guard !overflow, product <= maximumElements else {
                throw Violation(
                    name: name, value: text ?? "\(shape)",
                    requirement: "at most \(maximumElements) elements (SizeLimits)")
            }
            count = product
        }
    }

    /// Checks a repetition count: 1 … `limit`.
    /// - Throws: ``Violation``.
    public static func checkRepeats(
        _ count: Int, limit: Int = maximumRepeats, name: String = "--repeat"
    ) throws(Violation) {
        guard count >= 1, count <= limit else {
            throw Violation(name: name, value: "\(count)", requirement: "must lie in 1…\(limit)")
        }
    }
}
