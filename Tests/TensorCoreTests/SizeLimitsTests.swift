import TensorCore
import Testing

@Suite("Size limits")
struct SizeLimitsTests {
    @Test func shapesAreParsedStrictly() throws {
        #expect(try SizeLimits.parseShape("8, 64,32 ,32") == [8, 64, 32, 32])
        for text in ["2,3,,4", ",2", "2,", "", "2,-3", "2,0", "2,x", "2,3.5", "2,+3", "2,٣"] {
            #expect(throws: SizeLimits.Violation.self, "\(text)") {
                _ = try SizeLimits.parseShape(text)
            }
        }
        #expect(throws: SizeLimits.Violation.self) {
            _ = try SizeLimits.parseShape("2,3", ranks: 4...4)
        }
    }

    @Test func absurdSizesAreRefusedBeforeAllocating() throws {
        for text in [
            "100000,100000,100000", "9223372036854775807,2", "99999999999999999999",
            "65536,65536",
        ] {
            do {
                _ = try SizeLimits.parseShape(text)
                Issue.record("\(text) must be refused")
            } catch {
                #expect(
                    error.description.contains("\(SizeLimits.maximumElements)")
                        || error.description.contains("positive integer"))
            }
        }
        _ = try SizeLimits.parseShape("16384,16384")  // exactly 2^28
        #expect(throws: SizeLimits.Violation.self) {
            try SizeLimits.checkElements([4], maximumElements: 3)
        }
        #expect(throws: SizeLimits.Violation.self) { try SizeLimits.checkRepeats(Int.max) }
        #expect(throws: SizeLimits.Violation.self) { try SizeLimits.checkRepeats(0) }
        try SizeLimits.checkRepeats(SizeLimits.maximumRepeats)
    }
}
