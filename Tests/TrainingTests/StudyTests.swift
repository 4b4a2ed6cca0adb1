import Foundation
import NormKit
import Testing

@testable import Studies
@testable import Training

@Suite("Studies")
struct StudyTests {
    /// The demo's old defect: a rise from 0.3% to 2.2% was called "about the same".
    @Test func aSevenfoldRiseIsCalledARise() {
        let text = Wording.change(from: Summary([0.003]), to: Summary([0.022]), floor: 0.005)
        #expect(text.hasPrefix("rises from 0.3% to 2.2%"), "\(text)")
        #expect(text.contains("7.3×"), "\(text)")
        let flat = Wording.change(
            from: Summary([0.20, 0.22, 0.21]), to: Summary([0.21, 0.20, 0.22]))
        #expect(flat.hasPrefix("stays within the seed spread"), "\(flat)")
    }

    @Test func summaryHasMeanAndSampleStandardDeviation() {
        let s = Summary([1, 2, 3, .nan])
        #expect(s.count == 3 && s.mean == 2 && abs(s.std - 1) < 1e-12)
        #expect(s.text(digits: 2) == "2.00 ± 1.00")
    }

    /// Integer x values (epochs) get each tick once; the old chart printed "1, 2, 2, 3, 4".
    @Test func integerTicksAreNotRepeated() {
        let chart = Chart(
            id: "t", title: "t", xLabel: "epoch", yLabel: "y",
            series: [
                Chart.Series(
                    name: "a",
                    points: (1...4).map { Chart.Point(x: Double($0), y: 1, low: 1, high: 1) })
            ])
        let svg = chart.svg()
        let labels = svg.components(separatedBy: "text-anchor=\"middle\">").dropFirst().compactMap {
            Int($0.prefix { $0 != "<" })
        }
        #expect(labels == [1, 2, 3, 4], "\(labels)")
    }

    /// One series far above the others switches the y-axis to a log scale.
    @Test func aDominantSeriesGetsALogAxis() {
        func series(_ v: Double) -> Chart.Series {
            Chart.Series(
                name: "\(v)",
                points: [
                    Chart.Point(x: 1, y: v, low: v, high: v),
                    Chart.Point(x: 2, y: v, low: v, high: v),
                ])
        }
        var wide = Chart(
            id: "w", title: "", xLabel: "", yLabel: "", series: [series(0.3), series(20)])
        wide.chooseYScale()
        #expect(wide.yScale == .log)
        var close = Chart(
            id: "c", title: "", xLabel: "", yLabel: "", series: [series(3), series(5)])
        close.chooseYScale()
        #expect(close.yScale == .linear)
    }

    /// Options for a small study on the shipped digits.
    static func digits(seeds: Int, train: Int, test: Int) -> StudyOptions {
        var o = StudyOptions()
        o.dataset = "digits"
        o.seeds = seeds
        o.trainCount = train
        o.testCount = test
        return o
    }

    /// A study on the shipped digits writes its JSON, CSV and a page with every chart's data,
    /// into a folder that already holds another file (kept).
    @Test func ablationStudyWritesItsReport() throws {
        let result = try Studies.run(
            .ablation, options: Self.digits(seeds: 2, train: 200, test: 100))
        #expect(result.charts.count == 1 && result.tables.count == 1)
        #expect(result.runs.count == 1 + 4 * 2 * 3 * 5)
        #expect(!result.headline.isEmpty && result.command.contains("--seeds 2"))
        let dir = NSTemporaryDirectory() + "normkit-study-\(UUID().uuidString)/nested"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "keep".write(toFile: dir + "/other.txt", atomically: true, encoding: .utf8)
        let page = try StudyReport.write(result, to: dir)
        let html = try String(contentsOfFile: page, encoding: .utf8)
        #expect(html.contains("<meta name=\"normkit-charts\" content=\"1\">"))
        #expect(
            html.contains(
                "<svg class=\"chart\" id=\"ablation-accuracy\" data-series=\"4\" data-points=\"20\""
            ))
        #expect(html.components(separatedBy: "<polyline class=\"mean\"").count == 5)
        #expect(html.contains("<table>"))
        #expect(try String(contentsOfFile: dir + "/other.txt", encoding: .utf8) == "keep")
        let csv = try String(contentsOfFile: dir + "/ablation.csv", encoding: .utf8)
        #expect(csv.hasPrefix("normalizer,seed,draw,fraction,test_accuracy\n"))
        // The page is rebuilt from the JSON: a second study lands in the same page.
        #expect(try StudyReport.rebuild(dir) == page)
    }

    /// Outputs that cannot be written fail before any training, with the path named, and a
    /// failed write leaves the folder's earlier files as they were.
    @Test func reportOutputsAreCheckedFirst() throws {
        let dir = NSTemporaryDirectory() + "normkit-study-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "x".write(toFile: dir + "/file", atomically: true, encoding: .utf8)
        #expect(throws: FileFormatError.self) {
            try StudyReport.prepare([.ablation], in: dir + "/file")
        }
        // report.html is a directory: nothing of the study is written.
        try FileManager.default.createDirectory(
            atPath: dir + "/out/report.html", withIntermediateDirectories: true)
        let result = StudyResult(
            name: .ablation, title: "t", claim: "c", headline: "h", matchesPaper: false,
            setup: "s", command: "normkit study ablation", seconds: 1, tables: [], charts: [],
            notes: [], runs: [["a"]])
        #expect(throws: FileFormatError.self) { try StudyReport.write(result, to: dir + "/out") }
        #expect(!FileManager.default.fileExists(atPath: dir + "/out/ablation.json"))
    }

    /// ζ(h) with one position per sample is the spec's formula with loss'' estimated by the
    /// squared per-sample gradient, computed here directly in Double.
    @Test func estimatedZetaMatchesTheSpecFormula() {
        let n = 5
        let channels = 2
        let m = 8
        var g = SeededGenerator(seed: 3)
        let normalized = (0..<(n * channels)).map { _ in Float(g.nextNormal()) }
        let dy = (0..<(n * channels)).map { _ in Float(g.nextNormal() * 0.1) }
        let zeta = normalized.withUnsafeBufferPointer { h in
            dy.withUnsafeBufferPointer { d in
                PopulationNorm.estimateZeta(
                    normalized: h, dy: d, n: n, channels: channels, positions: 1, batchSize: m)
            }
        }
        for c in 0..<channels {
            let v = (0..<n).map { Double(normalized[$0 * channels + c]) }
            let second = (0..<n).map { pow(Double(n) * Double(dy[$0 * channels + c]), 2) }
            let m2 = v.map { $0 * $0 }.reduce(0, +) / Double(n)
            let m4 = v.map { pow($0, 4) }.reduce(0, +) / Double(n)
            let rho = m4 / (m2 * m2) - 3
            let curvature = second.reduce(0, +) / Double(n)
            let fisher = zip(v, second).map { $0 * $0 * $1 }.reduce(0, +) / Double(n)
            let expected = (rho + 2) / (8 * Double(m)) * fisher + curvature / (2 * Double(m))
            #expect(abs(zeta[c] - expected) <= 1e-9 * max(1, abs(expected)))
        }
    }

    /// The regularization study with `estimatedZeta` trains the fourth variant and records a
    /// positive ζ for it.
    @Test func regularizationRunsTheEstimatedZetaVariant() throws {
        var o = Self.digits(seeds: 1, train: 64, test: 32)
        o.epochs = 1
        o.estimatedZeta = true
        let result = try Studies.run(.regularization, options: o)
        let rows = result.runs.dropFirst().filter { $0[0] == RegularizationStudy.estimated }
        #expect(rows.count == 2)
        for row in rows { #expect((Double(row[3]) ?? 0) > 0) }
        #expect(result.command.hasSuffix("--estimated-zeta"))
    }
}

@Suite("Harness elementwise loops")
struct ElementwiseTests {
    /// The Float lanes against the scalar definition on sizes around the lane width, with NaN,
    /// ±0 and ±∞.
    @Test(arguments: [1, 7, 8, 9, 17, 1001])
    func floatLanesMatchTheDefinition(count: Int) {
        var g = SeededGenerator(seed: UInt64(count))
        var x = (0..<count).map { _ in Float(g.nextNormal()) }
        let specials: [Float] = [.nan, -0.0, 0, .infinity, -.infinity]
        for (i, v) in specials.enumerated() where i < count { x[(i * 3) % count] = v }
        let dy = (0..<count).map { _ in Float(g.nextNormal()) }
        var y = [Float](repeating: 7, count: count)
        var dx = [Float](repeating: 7, count: count)
        x.withUnsafeBufferPointer { xp in
            y.withUnsafeMutableBufferPointer {
                Elementwise.rectify(xp.baseAddress!, into: $0.baseAddress!, count: count)
            }
        }
        dy.withUnsafeBufferPointer { dp in
            x.withUnsafeBufferPointer { xp in
                dx.withUnsafeMutableBufferPointer {
                    Elementwise.pass(
                        dp.baseAddress!, where: xp.baseAddress!, into: $0.baseAddress!,
                        count: count)
                }
            }
        }
        for i in 0..<count {
            #expect(y[i] == (x[i] > 0 ? x[i] : 0))
            #expect(dx[i] == (x[i] > 0 ? dy[i] : 0))
        }
        let finite = dy.map(Double.init)
        let total = dy.withUnsafeBufferPointer { Elementwise.sum($0.baseAddress!, count: count) }
        let exact = finite.reduce(0, +)
        let scale = finite.map(abs).reduce(0, +)
        #expect(abs(Double(total) - exact) <= 1e-6 * max(scale, 1))
    }
}
