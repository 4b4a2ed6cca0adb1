import Foundation
import NormIO

/// Writes study results to a folder and renders every study found there as one HTML page.
///
/// `DIR/NAME.json` holds a ``StudyResult`` (tables, chart data, headline), `DIR/NAME.csv` one
/// row per training run, and `DIR/report.html` every study whose JSON is in DIR, in the order
/// of ``StudyName/allCases``: running the studies one by one into the same folder builds one
/// report. Other files in DIR are left alone.
public enum StudyReport {
    /// Creates `directory` if missing and checks that a study's files can be written there
    /// (``OutputSet``), so that a bad `--output` fails before any training.
    ///
    /// - Throws: ``FileFormatError/io(path:reason:)`` naming the folder or file.
    @discardableResult
    public static func prepare(_ names: [StudyName], in directory: String) throws -> OutputSet {
        do {
            try FileManager.default.createDirectory(
                atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw FileFormatError.io(path: directory, reason: "the folder cannot be created")
        }
        return try OutputSet(
            names.flatMap {
                [directory + "/\($0.rawValue).json", directory + "/\($0.rawValue).csv"]
            }
                + [directory + "/report.html"])
    }

    /// Writes `result`'s JSON and CSV into `directory` (created if missing) and rebuilds
    /// `directory/report.html`, all three through one ``OutputSet`` (each file is the old one
    /// or the complete new one); returns the page's path.
    @discardableResult
    public static func write(_ result: StudyResult, to directory: String) throws -> String {
        var files = try prepare([result.name], in: directory)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(
            positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        let name = result.name.rawValue
        files.stage(Array(try encoder.encode(result)), to: directory + "/\(name).json")
        let csv = result.runs.map { $0.map(csvField).joined(separator: ",") }.joined(
            separator: "\n")
        files.stage(csv + "\n", to: directory + "/\(name).csv")
        let page = directory + "/report.html"
        files.stage(html(results(in: directory, replacing: result)), to: page)
        try files.commit()
        return page
    }

    /// Renders `directory/report.html` from the study JSON files there; returns its path.
    @discardableResult
    public static func rebuild(_ directory: String) throws -> String {
        let path = directory + "/report.html"
        var files = try OutputSet([path])
        files.stage(html(results(in: directory)), to: path)
        try files.commit()
        return path
    }

    /// The studies whose JSON is in `directory`, in the order of ``StudyName/allCases``, with
    /// `replacement` in place of its study's file.
    static func results(in directory: String, replacing replacement: StudyResult? = nil)
        -> [StudyResult]
    {
        let decoder = JSONDecoder()
        decoder.nonConformingFloatDecodingStrategy = .convertFromString(
            positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        var results: [StudyResult] = []
        for name in StudyName.allCases {
            if let replacement, replacement.name == name {
                results.append(replacement)
                continue
            }
            let path = directory + "/\(name.rawValue).json"
            guard let data = FileManager.default.contents(atPath: path),
                let r = try? decoder.decode(StudyResult.self, from: data), r.name == name
            else { continue }
            results.append(r)
        }
        return results
    }

    static func csvField(_ s: String) -> String {
        s.contains(",") || s.contains("\"") || s.contains("\n")
            ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
    }

    static func escape(_ s: String) -> String { Chart.escape(s) }

    /// An HTML table.
    static func table(_ t: Table) -> String {
        var s = "<table><caption>\(escape(t.title))</caption>\n<thead><tr>"
        s += t.columns.map { "<th>\(escape($0))</th>" }.joined() + "</tr></thead>\n<tbody>\n"
        for row in t.rows {
            s += "<tr>" + row.map { "<td>\(escape($0))</td>" }.joined() + "</tr>\n"
        }
        return s + "</tbody></table>\n"
    }

    /// The page: a summary list of headlines, then one section per study.
    public static func html(_ results: [StudyResult]) -> String {
        let charts = results.map { $0.charts.count }.reduce(0, +)
        var body = "<h1>NormKit studies: normalization claims on real data</h1>\n"
        body +=
            "<p>Every number on this page was measured by the command shown under each study; "
            + "bands and ± are one standard deviation over seeds. A headline says plainly when the "
            + "measurement does not match the paper.</p>\n"
        body += "<h2>Headlines</h2>\n<ul class=\"headlines\">\n"
        for r in results {
            body +=
                "<li><a href=\"#\(r.name.rawValue)\">\(escape(r.title))</a>: "
                + "<span class=\"\(r.matchesPaper ? "match" : "mismatch")\">"
                + "\(r.matchesPaper ? "matches the paper" : "does not match the paper")</span>. "
                + "\(escape(r.headline))</li>\n"
        }
        body += "</ul>\n"
        for r in results {
            body += "<section id=\"\(r.name.rawValue)\">\n<h2>\(escape(r.title))</h2>\n"
            body += "<p class=\"headline\"><strong>\(escape(r.headline))</strong></p>\n"
            body += "<p><em>The paper:</em> \(escape(r.claim))</p>\n"
            body += "<p><em>Setup:</em> \(escape(r.setup)).</p>\n"
            body +=
                "<p><em>Reproduce:</em> <code>\(escape(r.command))</code> "
                + "(\(String(format: "%.0f", r.seconds)) s on the machine that made this page).</p>\n"
            for c in r.charts {
                body +=
                    "<figure>\n" + c.svg()
                    + "<figcaption>\(escape(c.title))</figcaption></figure>\n"
            }
            for t in r.tables { body += table(t) }
            if !r.notes.isEmpty {
                body += "<ul class=\"notes\">\n"
                body += r.notes.map { "<li>\(escape($0))</li>" }.joined(separator: "\n")
                body += "\n</ul>\n"
            }
            body += "</section>\n"
        }
        return """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8">
            <meta name="normkit-charts" content="\(charts)">
            <title>NormKit studies</title>
            <style>
            body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
            figure{margin:1em 0}figcaption{font-size:13px;color:#555}
            svg{background:#fff;border:1px solid #ddd;max-width:100%;height:auto}
            table{border-collapse:collapse;margin:1em 0;font-size:13px}
            caption{text-align:left;font-weight:600;padding:4px 0}
            th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
            th:first-child,td:first-child{text-align:left}
            thead{background:#f3f3f3}
            .match{color:#1a7f37;font-weight:600}.mismatch{color:#b35900;font-weight:600}
            code{background:#f3f3f3;padding:1px 4px}
            </style>
            </head><body>
            \(body)</body></html>

            """
    }
}
