import Foundation
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

    /// A study on the shipped digits writes its JSON, CSV and a page with every chart's data,
    /// into a folder that already holds another file (kept).
    @Test func ablationStudyWritesItsReport() throws {
        var o = StudyOptions()
        o.dataset = "digits"
        o.seeds = 2
        o.trainCount = 200
        o.testCount = 100
        let result = try Studies.run(.ablation, options: o)
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
}
