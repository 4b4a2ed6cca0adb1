import Foundation
import NormKit
import Training

/// Renders the demo's results as Markdown (for the terminal) and as an HTML page with SVG
/// charts (no JavaScript).
public enum Report {
    static let palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#7f7f7f", "#ff7f0e", "#17becf", "#8c564b",
    ]

    /// The Markdown summary.
    public static func markdown(_ r: Experiments.Results) -> String {
        var md = "# NormKit demo\n\n"
        md +=
            "Measured in this run (\(String(format: "%.0f", r.seconds)) s). Data: UCI digits (batch-size study), "
        md +=
            "procedural shapes with per-image contrast and colour shifts (optimisation study).\n\n"
        md +=
            "## Test error by batch size (convnet on digits, \(r.plan.epochs) epochs, lr = 0.1·B/32)\n\n"
        md +=
            "| normalizer | " + r.plan.batchSizes.map { "B=\($0)" }.joined(separator: " | ")
            + " |\n"
        md += "|---|" + r.plan.batchSizes.map { _ in "---|" }.joined() + "\n"
        for n in r.plan.normalizers {
            let row = r.plan.batchSizes.map { b -> String in
                guard
                    let run = r.batchSize.first(where: { $0.normalizer == n && $0.batchSize == b })
                else { return "" }
                return run.diverged ? "diverged" : String(format: "%.1f%%", 100 * run.testError)
            }
            md += "| \(n) | " + row.joined(separator: " | ") + " |\n"
        }
        let learned = r.batchSize.filter { !$0.weights.isEmpty }
        if !learned.isEmpty {
            md += "\n## What the learned normalizers chose (end of training)\n\n"
            md += "| run | slot | mean weights | variance weights |\n|---|---|---|---|\n"
            for run in learned {
                for w in run.weights {
                    func fmt(_ v: [Double]) -> String {
                        zip(w.components, v).map { "\($0) \(String(format: "%.2f", $1))" }.joined(
                            separator: ", ")
                    }
                    md +=
                        "| \(run.normalizer) B=\(run.batchSize) | \(w.slot) | \(fmt(w.mean)) | \(fmt(w.variance)) |\n"
                }
            }
        }
        if let run = learned.first(where: { $0.batchSize == r.plan.batchSizes.max() }),
            !run.weightHistory.isEmpty
        {
            md +=
                "\n## How \(run.normalizer)'s mean weights moved during training (B=\(run.batchSize), after each epoch)\n\n"
            md += "| epoch | " + run.weights.map(\.slot).joined(separator: " | ") + " |\n"
            md += "|---|" + run.weights.map { _ in "---|" }.joined() + "\n"
            for (e, slots) in run.weightHistory.enumerated() {
                let cells = slots.map { w in
                    zip(w.components, w.mean).map { "\($0) \(String(format: "%.2f", $1))" }.joined(
                        separator: ", ")
                }
                md += "| \(e + 1) | " + cells.joined(separator: " | ") + " |\n"
            }
        }
        md += "\n## BatchNorm's optimisation effect (convnet on shapes, batch 32)\n\n"
        md +=
            "| normalizer | learning rate | first loss | last loss | test error |\n|---|---|---|---|---|\n"
        for c in r.curves {
            let finite = c.losses.filter(\.isFinite)
            let last =
                c.losses.last.map { $0.isFinite ? String(format: "%.3f", $0) : "diverged" } ?? ""
            md +=
                "| \(c.normalizer) | \(c.learningRate) | \(finite.first.map { String(format: "%.3f", $0) } ?? "") | "
            md += "\(last) | \(String(format: "%.1f%%", 100 * c.testError)) |\n"
        }
        md += "\n" + observations(r)
        return md
    }

    /// Plain statements of what the numbers show, including where they differ from the papers.
    static func observations(_ r: Experiments.Results) -> String {
        var lines: [String] = []
        func error(_ n: String, _ b: Int) -> Double? {
            r.batchSize.first { $0.normalizer == n && $0.batchSize == b }?.testError
        }
        if let small = r.plan.batchSizes.min(), let large = r.plan.batchSizes.max(), small != large
        {
            for n in r.plan.normalizers {
                if let a = error(n, small), let b = error(n, large) {
                    lines.append(
                        "- \(n): \(String(format: "%.1f%%", 100 * b)) at B=\(large), \(String(format: "%.1f%%", 100 * a)) at B=\(small)"
                            + " (\(a > b + 0.02 ? "worse" : a + 0.02 < b ? "better" : "about the same") with the small batch)."
                    )
                }
            }
            lines.append(
                "- Wu & He (2018) report BN degrading at small batches while GN stays stable; compare the bn and gn rows "
                    + "above. On this small data set and short schedule the differences can be small or reversed."
            )
            if let kn = error("kn", small), let bn = error("bn", small) {
                lines.append(
                    "- Micro-batches (B=\(small)): Kalman Normalization \(String(format: "%.1f%%", 100 * kn)) against "
                        + "BatchNorm \(String(format: "%.1f%%", 100 * bn)) (Wang et al. 2018 report KN ahead of BN at "
                        + "batch sizes 1 to 4).")
            }
        }
        let bn = r.curves.filter { $0.normalizer == "bn" }
        let none = r.curves.filter { $0.normalizer == "none" }
        if let high = r.plan.learningRates.max(),
            let b = bn.first(where: { $0.learningRate == high }),
            let n = none.first(where: { $0.learningRate == high })
        {
            lines.append(
                "- At the high learning rate \(high): final loss with BN "
                    + "\(b.losses.last.map { $0.isFinite ? String(format: "%.3f", $0) : "diverged" } ?? "?"), without "
                    + "\(n.losses.last.map { $0.isFinite ? String(format: "%.3f", $0) : "diverged" } ?? "?") "
                    + "(Santurkar et al. 2018: BN allows larger learning rates).")
        }
        return "## Observations\n\n" + lines.joined(separator: "\n") + "\n"
    }

    /// The HTML page with three SVG charts.
    public static func html(_ r: Experiments.Results) -> String {
        var body =
            "<h1>NormKit demo</h1>\n<p>Measured in this run (\(String(format: "%.0f", r.seconds)) s).</p>\n"
        body += "<h2>Test error by batch size</h2>\n" + batchSizeChart(r)
        body += "<h2>What the learned normalizers chose</h2>\n" + weightsChart(r)
        body +=
            "<h2>How the BN share of SN's mean weights moved during training</h2>\n"
            + weightHistoryChart(r)
        body += "<h2>Training loss with and without BatchNorm</h2>\n" + lossChart(r)
        body += "<h2>Summary</h2>\n<pre>" + escape(markdown(r)) + "</pre>\n"
        return """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>NormKit demo</title>
            <style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}
            svg{background:#fff;border:1px solid #ddd}text{font-size:12px}pre{background:#f6f6f6;padding:1em;overflow:auto}</style>
            </head><body>
            \(body)</body></html>
            """
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;")
    }

    /// A line chart: series of (x, y) points, x on a log2 axis when asked.
    static func lineChart(
        series: [(name: String, points: [(Double, Double)])], xLabel: String, yLabel: String,
        logX: Bool,
        yMax: Double? = nil
    ) -> String {
        let (w, h, left, bottom, top, right) = (720.0, 360.0, 60.0, 40.0, 20.0, 150.0)
        let xs = series.flatMap { $0.points.map { logX ? log2($0.0) : $0.0 } }
        let ys = series.flatMap { $0.points.map(\.1) }.filter(\.isFinite)
        guard let x0 = xs.min(), let x1 = xs.max(), let y1 = yMax ?? ys.max() else {
            return "<p>(no data)</p>"
        }
        let y0 = 0.0
        func px(_ x: Double) -> Double {
            left + (logX ? log2(x) - x0 : x - x0) / max(x1 - x0, 1e-9) * (w - left - right)
        }
        func py(_ y: Double) -> Double {
            h - bottom - (min(y, y1) - y0) / max(y1 - y0, 1e-9) * (h - bottom - top)
        }
        var svg =
            "<svg width=\"\(Int(w))\" height=\"\(Int(h))\" viewBox=\"0 0 \(Int(w)) \(Int(h))\" xmlns=\"http://www.w3.org/2000/svg\">\n"
        svg +=
            "<line x1=\"\(left)\" y1=\"\(h - bottom)\" x2=\"\(w - right)\" y2=\"\(h - bottom)\" stroke=\"#333\"/>"
        svg +=
            "<line x1=\"\(left)\" y1=\"\(top)\" x2=\"\(left)\" y2=\"\(h - bottom)\" stroke=\"#333\"/>\n"
        for k in 0...4 {
            let y = y0 + (y1 - y0) * Double(k) / 4
            svg +=
                "<text x=\"\(left - 6)\" y=\"\(py(y) + 4)\" text-anchor=\"end\">\(String(format: "%.2f", y))</text>"
        }
        let ticks =
            logX
            ? Array(Set(series.flatMap { $0.points.map(\.0) })).sorted()
            : (0...4).map { x0 + (x1 - x0) * Double($0) / 4 }
        for t in ticks {
            svg +=
                "<text x=\"\(px(t))\" y=\"\(h - bottom + 16)\" text-anchor=\"middle\">\(logX ? String(Int(t)) : String(format: "%.0f", t))</text>"
        }
        svg +=
            "<text x=\"\((w - right + left) / 2)\" y=\"\(h - 6)\" text-anchor=\"middle\">\(xLabel)</text>"
        svg +=
            "<text x=\"14\" y=\"\(top + (h - bottom - top) / 2)\" text-anchor=\"middle\" transform=\"rotate(-90 14 \(top + (h - bottom - top) / 2))\">\(yLabel)</text>\n"
        for (i, s) in series.enumerated() {
            let color = palette[i % palette.count]
            let points = s.points.filter { $0.1.isFinite }.map { "\(px($0.0)),\(py($0.1))" }.joined(
                separator: " ")
            svg +=
                "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(points)\"/>\n"
            svg +=
                "<text x=\"\(w - right + 10)\" y=\"\(top + 16 * Double(i + 1))\" fill=\"\(color)\">\(s.name)</text>\n"
        }
        return svg + "</svg>\n"
    }

    static func batchSizeChart(_ r: Experiments.Results) -> String {
        let series = r.plan.normalizers.map { n in
            (
                name: n,
                points: r.batchSize.filter { $0.normalizer == n }.map {
                    (Double($0.batchSize), $0.testError)
                }
            )
        }
        // Scale to the data: errors of a few percent would sit on the axis of a 0…1 chart.
        let top = series.flatMap { $0.points.map(\.1) }.filter(\.isFinite).max() ?? 1
        return lineChart(
            series: series, xLabel: "batch size", yLabel: "test error", logX: true,
            yMax: min(1, max(top * 1.15, 0.01)))
    }

    static func lossChart(_ r: Experiments.Results) -> String {
        let series = r.curves.map { c in
            (
                name: "\(c.normalizer) lr \(c.learningRate)",
                points: c.losses.enumerated().map { (Double($0.offset), $0.element) }
            )
        }
        let top = series.flatMap { $0.points.map(\.1) }.filter(\.isFinite).max() ?? 3
        return lineChart(
            series: series, xLabel: "step", yLabel: "training loss", logX: false, yMax: min(top, 5))
    }

    /// The BN component of the mean weights of every slot of each learned run at the largest
    /// batch, after every epoch.
    static func weightHistoryChart(_ r: Experiments.Results) -> String {
        var series: [(name: String, points: [(Double, Double)])] = []
        for run in r.batchSize
        where run.batchSize == r.plan.batchSizes.max() && !run.weightHistory.isEmpty {
            let slots = run.weightHistory.first?.map(\.slot) ?? []
            for (k, slot) in slots.enumerated() {
                let points = run.weightHistory.enumerated().compactMap {
                    e, weights -> (Double, Double)? in
                    guard k < weights.count, let bn = weights[k].components.firstIndex(of: "BN")
                    else { return nil }
                    return (Double(e + 1), weights[k].mean[bn])
                }
                series.append((name: "\(run.normalizer) \(slot)", points: points))
            }
        }
        guard !series.isEmpty else { return "<p>(no learned normalizer in this run)</p>" }
        return lineChart(
            series: series, xLabel: "epoch", yLabel: "BN weight (mean)", logX: false, yMax: 1)
    }

    /// Stacked bars of the mean and variance weights of every SN/SSN slot.
    static func weightsChart(_ r: Experiments.Results) -> String {
        let runs = r.batchSize.filter {
            !$0.weights.isEmpty && $0.batchSize == r.plan.batchSizes.max()
        }
        guard !runs.isEmpty else { return "<p>(no learned normalizer in this run)</p>" }
        var bars: [(label: String, weights: [Double], names: [String])] = []
        for run in runs {
            for w in run.weights {
                bars.append(("\(run.normalizer) \(w.slot) μ", w.mean, w.components))
                bars.append(("\(run.normalizer) \(w.slot) σ²", w.variance, w.components))
            }
        }
        let rowHeight = 18.0
        let (w, left) = (720.0, 170.0)
        let h = Double(bars.count) * rowHeight + 40
        var svg =
            "<svg width=\"\(Int(w))\" height=\"\(Int(h))\" xmlns=\"http://www.w3.org/2000/svg\">\n"
        for (i, bar) in bars.enumerated() {
            let y = 10 + Double(i) * rowHeight
            svg +=
                "<text x=\"\(left - 6)\" y=\"\(y + 12)\" text-anchor=\"end\">\(escape(bar.label))</text>"
            var x = left
            for (k, v) in bar.weights.enumerated() {
                let width = v * (w - left - 20)
                svg +=
                    "<rect x=\"\(x)\" y=\"\(y)\" width=\"\(max(width, 0))\" height=\"\(rowHeight - 4)\" fill=\"\(palette[k % palette.count])\"><title>\(bar.names[k]) \(String(format: "%.3f", v))</title></rect>"
                x += width
            }
            svg += "\n"
        }
        let names = bars.first?.names ?? []
        for (k, n) in names.enumerated() {
            svg +=
                "<text x=\"\(left + Double(k) * 60)\" y=\"\(h - 8)\" fill=\"\(palette[k % palette.count])\">■ \(n)</text>"
        }
        return svg + "</svg>\n"
    }
}
