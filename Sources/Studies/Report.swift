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
        observationLines(r).map { "- " + $0 }.joined(separator: "\n").isEmpty
            ? ""
            : "## Observations\n\n" + observationLines(r).map { "- " + $0 }.joined(separator: "\n")
                + "\n"
    }

    /// One seed per configuration: a change counts when it exceeds half a point of error.
    static func observationLines(_ r: Experiments.Results) -> [String] {
        var lines: [String] = []
        func error(_ n: String, _ b: Int) -> Summary? {
            r.batchSize.first { $0.normalizer == n && $0.batchSize == b && !$0.diverged }.map {
                Summary([$0.testError])
            }
        }
        if let small = r.plan.batchSizes.min(), let large = r.plan.batchSizes.max(), small != large
        {
            for n in r.plan.normalizers {
                if let a = error(n, large), let b = error(n, small) {
                    lines.append(
                        "\(n): from batch \(large) to \(small) the test error "
                            + Wording.change(from: a, to: b, floor: 0.005) + ".")
                }
            }
            if let bnL = error("bn", large), let bnS = error("bn", small),
                let gnL = error("gn", large),
                let gnS = error("gn", small)
            {
                let bnRise = bnS.mean - bnL.mean
                let gnRise = gnS.mean - gnL.mean
                lines.append(
                    bnRise > gnRise + 0.005
                        ? "BN loses more than GN at the small batch (\(String(format: "%+.1f", 100 * bnRise)) against \(String(format: "%+.1f", 100 * gnRise)) points), the direction Wu & He (2018) report."
                        : "BN does not lose more than GN at the small batch (\(String(format: "%+.1f", 100 * bnRise)) against \(String(format: "%+.1f", 100 * gnRise)) points): this short single-seed run does not reproduce Wu & He (2018); see `normkit study batch-size`."
                )
            }
            if let kn = error("kn", small), let bn = error("bn", small) {
                lines.append(
                    "Micro-batches (B=\(small)): Kalman Normalization \(String(format: "%.1f%%", 100 * kn.mean)) against "
                        + "BatchNorm \(String(format: "%.1f%%", 100 * bn.mean)) (Wang et al. 2018 report KN ahead of BN at "
                        + "batch sizes 1 to 4).")
            }
        }
        let bn = r.curves.filter { $0.normalizer == "bn" }
        let none = r.curves.filter { $0.normalizer == "none" }
        if let high = r.plan.learningRates.max(),
            let b = bn.first(where: { $0.learningRate == high }),
            let n = none.first(where: { $0.learningRate == high })
        {
            func last(_ c: Experiments.LossCurve) -> String {
                c.losses.last.map { $0.isFinite ? String(format: "%.3f", $0) : "diverged" } ?? "?"
            }
            lines.append(
                "At the high learning rate \(high): final loss with BN \(last(b)), without \(last(n)) "
                    + "(Santurkar et al. 2018: BN allows larger learning rates).")
        }
        return lines
    }

    /// The HTML page: charts as inline SVG, results as HTML tables, observations as a list.
    public static func html(_ r: Experiments.Results) -> String {
        var charts: [Chart] = []
        var batchChart = Chart(
            id: "demo-batch-size", title: "Test error by batch size (convnet on digits, one seed)",
            xLabel: "batch size", yLabel: "test error (%)", xScale: .log2,
            series: r.plan.normalizers.map { n in
                Chart.Series(
                    name: n,
                    points: r.batchSize.filter { $0.normalizer == n && !$0.diverged }.map {
                        Chart.Point(
                            x: Double($0.batchSize), y: 100 * $0.testError, low: 100 * $0.testError,
                            high: 100 * $0.testError)
                    })
            }, yIncludes: 0)
        batchChart.chooseYScale()
        charts.append(batchChart)
        var history: [Chart.Series] = []
        for run in r.batchSize
        where run.batchSize == r.plan.batchSizes.max() && !run.weightHistory.isEmpty {
            for (k, slot) in (run.weightHistory.first?.map(\.slot) ?? []).enumerated() {
                history.append(
                    Chart.Series(
                        name: "\(run.normalizer) \(slot)",
                        points: run.weightHistory.enumerated().compactMap { e, weights in
                            guard k < weights.count,
                                let bn = weights[k].components.firstIndex(of: "BN")
                            else {
                                return nil
                            }
                            let v = weights[k].mean[bn]
                            return Chart.Point(x: Double(e + 1), y: v, low: v, high: v)
                        }))
            }
        }
        if !history.isEmpty {
            charts.append(
                Chart(
                    id: "demo-weight-history",
                    title: "BN's share of the learned normalizers' mean weights after each epoch",
                    xLabel: "epoch", yLabel: "BN weight (mean)", series: history, yIncludes: 0))
        }
        var lossChart = Chart(
            id: "demo-loss",
            title: "Training loss with and without BatchNorm (diverged steps left out)",
            xLabel: "step", yLabel: "training loss",
            series: r.curves.map { c in
                Chart.Series(
                    name: "\(c.normalizer) lr \(c.learningRate)",
                    points: c.losses.enumerated().compactMap { i, v in
                        v.isFinite ? Chart.Point(x: Double(i + 1), y: v, low: v, high: v) : nil
                    })
            })
        lossChart.chooseYScale()
        charts.append(lossChart)

        var tables: [Table] = []
        tables.append(
            Table(
                title:
                    "Test error by batch size (convnet on digits, \(r.plan.epochs) epochs, lr = 0.1·B/32)",
                columns: ["normalizer"] + r.plan.batchSizes.map { "B = \($0)" },
                rows: r.plan.normalizers.map { n in
                    [n]
                        + r.plan.batchSizes.map { b in
                            guard
                                let run = r.batchSize.first(where: {
                                    $0.normalizer == n && $0.batchSize == b
                                })
                            else {
                                return ""
                            }
                            return run.diverged
                                ? "diverged" : String(format: "%.1f%%", 100 * run.testError)
                        }
                }))
        let learned = r.batchSize.filter { !$0.weights.isEmpty }
        if !learned.isEmpty {
            tables.append(
                Table(
                    title: "What the learned normalizers chose (end of training)",
                    columns: ["run", "slot", "mean weights", "variance weights"],
                    rows: learned.flatMap { run in
                        run.weights.map { w in
                            let fmt = { (v: [Double]) in
                                zip(w.components, v).map { "\($0) \(String(format: "%.2f", $1))" }
                                    .joined(separator: ", ")
                            }
                            return [
                                "\(run.normalizer) B=\(run.batchSize)", w.slot, fmt(w.mean),
                                fmt(w.variance),
                            ]
                        }
                    }))
        }
        tables.append(
            Table(
                title: "BatchNorm's optimisation effect (convnet on shapes, batch 32)",
                columns: ["normalizer", "learning rate", "first loss", "last loss", "test error"],
                rows: r.curves.map { c in
                    [
                        c.normalizer, "\(c.learningRate)",
                        c.losses.first(where: \.isFinite).map { String(format: "%.3f", $0) } ?? "",
                        c.losses.last.map { $0.isFinite ? String(format: "%.3f", $0) : "diverged" }
                            ?? "",
                        String(format: "%.1f%%", 100 * c.testError),
                    ]
                }))
        var body = "<h1>NormKit demo</h1>\n"
        body +=
            "<p>Measured in this run (\(String(format: "%.0f", r.seconds)) s), one seed per configuration. "
            + "Data: UCI digits (batch-size study) and procedural shapes (optimisation study). For seeds, "
            + "error bars and Fashion-MNIST, run <code>normkit study all</code>.</p>\n"
        body += "<h2>Observations</h2>\n<ul>\n"
        body +=
            observationLines(r).map { "<li>\(escape($0))</li>" }.joined(separator: "\n")
            + "\n</ul>\n"
        for c in charts {
            body +=
                "<figure>\n" + c.svg() + "<figcaption>\(escape(c.title))</figcaption></figure>\n"
        }
        for t in tables { body += StudyReport.table(t) }
        let page = StudyReport.html([])
        let head = page[..<page.range(of: "<body>")!.upperBound]
        return head.replacingOccurrences(of: "content=\"0\"", with: "content=\"\(charts.count)\"")
            .replacingOccurrences(
                of: "<title>NormKit studies</title>", with: "<title>NormKit demo</title>")
            + "\n" + body + "</body></html>\n"
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;")
    }
}
