import Foundation
import NormKit
import Testing

@testable import NormKitCLI

@Suite("CLI input validation")
struct ReliabilityCLITests {
    @Test func weightsRefusesABadRadiusAndPrintsValidJSON() throws {
        var file = Safetensors.File()
        file.tensors["a\"b\\c\n.mean_weight"] = .float32(Tensor([0, 1, 2]))
        file.tensors["a\"b\\c\n.var_weight"] = .float32(Tensor([2, 1, 0]))
        for radius in [Double.nan, .infinity, -0.1, 1.5] {
            #expect(throws: NormError.self) {
                _ = try ImportanceReport.read(
                    file, layer: "sparseswitchnorm", radius: radius, aggregations: "")
            }
        }
        let report = try ImportanceReport.read(
            file, layer: "sparseswitchnorm", radius: 0.5, aggregations: "")
        let parsed = try JSONSerialization.jsonObject(with: Data(report.json.utf8))
        let first = try #require((parsed as? [[String: Any]])?.first)
        #expect(first["layer"] as? String == "a\"b\\c\n.")
        #expect((first["mean"] as? [Double])?.count == 3)
        file.tensors["a\"b\\c\n.var_weight"] = .float32(Tensor([.nan, 1, 0]))
        #expect(throws: (any Error).self) {
            _ = try ImportanceReport.read(file, layer: "switchnorm", radius: nil, aggregations: "")
        }
    }

    @Test func tourRefusesMalformedAndAbsurdShapes() throws {
        for shape in ["2,3,,4", "4,6,3", "100000,100000,100000,100000", "0,6,3,3", "4,6,3,3,1"] {
            var tour = try NormKitCommand.parseAsRoot(["tour", "--shape", shape])
            #expect(throws: (any Error).self, "\(shape)") { try tour.run() }
        }
        #expect(throws: SizeLimits.Violation.self) {
            _ = try Tour.run(shape: [64, 64, 64, 64], seed: 1)
        }
    }

    /// Absurd counts are refused with the limit named, before anything is allocated or run
    /// (they trapped on an Int32 conversion, or ran for ever).
    @Test func absurdThreadAndStepCountsAreRefused() throws {
        for arguments in [
            ["train", "--threads", "2147483648"], ["train", "--threads", "0"],
            ["train", "--benchmark-steps", "9223372036854775807"],
            ["study", "ablation", "--threads", "4294967296"],
            ["bench", "layernorm", "--shape", "2,3", "--threads", "100000"],
        ] {
            #expect(throws: (any Error).self, "\(arguments)") {
                var command = try NormKitCommand.parseAsRoot(arguments)
                try command.run()
            }
        }
    }
}
