import Foundation

/// A line chart with a spread band per series, as data; ``svg()`` draws it as inline SVG.
///
/// Every series is drawn as its mean line with a band from `low` to `high` (mean ± one standard
/// deviation over seeds, or min…max); each point carries a `<title>` with its numbers, and the
/// `<svg>` element carries `data-series` and `data-points` counts that the CI page check reads.
public struct Chart: Sendable, Codable, Hashable {
    /// An axis scale.
    public enum Scale: String, Sendable, Codable, Hashable {
        /// Linear.
        case linear
        /// Logarithmic (base 10 ticks); non-positive values are not drawn.
        case log
        /// Base-2 logarithmic with a tick at every x value of the data (batch sizes).
        case log2
    }

    /// One point: the mean and its band.
    public struct Point: Sendable, Codable, Hashable {
        /// x.
        public var x: Double
        /// Mean y.
        public var y: Double
        /// Lower edge of the band.
        public var low: Double
        /// Upper edge of the band.
        public var high: Double

        /// A point with a band.
        public init(x: Double, y: Double, low: Double, high: Double) {
            (self.x, self.y, self.low, self.high) = (x, y, low, high)
        }

        /// A point with mean ± std of `s` (scaled by `scale`).
        public init(x: Double, _ s: Summary, scale: Double = 1) {
            self.init(
                x: x, y: s.mean * scale, low: (s.mean - s.std) * scale,
                high: (s.mean + s.std) * scale)
        }
    }

    /// A named series.
    public struct Series: Sendable, Codable, Hashable {
        /// Legend text.
        public var name: String
        /// Points in x order.
        public var points: [Point]
        /// Dashed line (reference values such as a paper's numbers).
        public var dashed = false

        /// A series.
        public init(name: String, points: [Point], dashed: Bool = false) {
            (self.name, self.points, self.dashed) = (name, points, dashed)
        }
    }

    /// Unique id in the page.
    public var id: String
    /// Caption.
    public var title: String
    /// x-axis label.
    public var xLabel: String
    /// y-axis label.
    public var yLabel: String
    /// x scale.
    public var xScale: Scale = .linear
    /// y scale.
    public var yScale: Scale = .linear
    /// The series.
    public var series: [Series]
    /// Force the y range to include this value (0 for error rates on a linear axis).
    public var yIncludes: Double?

    /// A chart.
    public init(
        id: String, title: String, xLabel: String, yLabel: String, xScale: Scale = .linear,
        yScale: Scale = .linear, series: [Series], yIncludes: Double? = nil
    ) {
        self.id = id
        self.title = title
        self.xLabel = xLabel
        self.yLabel = yLabel
        self.xScale = xScale
        self.yScale = yScale
        self.series = series
        self.yIncludes = yIncludes
    }

    static let palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
        "#7f7f7f", "#bcbd22",
    ]

    /// Chooses a log y scale when one series' values would flatten the others on a linear one
    /// (the largest positive value is more than 8× the smallest series maximum).
    public mutating func chooseYScale() {
        let maxima = series.compactMap { $0.points.map(\.y).filter { $0.isFinite && $0 > 0 }.max() }
        let minimum = series.flatMap { $0.points.map(\.y) }.filter { $0.isFinite && $0 > 0 }.min()
        if let top = maxima.max(), let low = maxima.min(), let minimum, minimum > 0, top > 8 * low {
            yScale = .log
            yIncludes = nil
        }
    }

    /// Rounded linear ticks covering `lo…hi`.
    static func niceTicks(_ lo: Double, _ hi: Double, count: Int = 5) -> [Double] {
        let span = Swift.max(hi - lo, 1e-12)
        let raw = span / Double(count)
        let magnitude = pow(10, floor(log10(raw)))
        let step = [1.0, 2, 2.5, 5, 10].map { $0 * magnitude }.first { $0 >= raw } ?? raw
        var t = ceil(lo / step - 1e-9) * step
        var ticks: [Double] = []
        while t <= hi + step * 1e-9 {
            ticks.append(abs(t) < step * 1e-9 ? 0 : t)
            t += step
        }
        return ticks
    }

    static func label(_ v: Double) -> String {
        if v == 0 { return "0" }
        let a = abs(v)
        if a >= 1000 || a < 0.001 { return String(format: "%.0e", v) }
        if v == v.rounded() { return String(Int(v)) }
        if a >= 10 { return String(format: "%.1f", v) }
        if a >= 1 { return String(format: "%.2f", v) }
        return String(format: "%.3g", v)
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(
                of: "\"", with: "&quot;")
    }

    /// The chart as an `<svg>` element (width 640).
    public func svg() -> String {
        let (w, h, left, right, top, bottom) = (640.0, 340.0, 64.0, 170.0, 16.0, 44.0)
        func tx(_ v: Double, _ s: Scale) -> Double? {
            switch s {
            case .linear: return v.isFinite ? v : nil
            case .log: return v > 0 && v.isFinite ? log10(v) : nil
            case .log2: return v > 0 && v.isFinite ? log2(v) : nil
            }
        }
        let points = series.flatMap(\.points)
        let xs = points.compactMap { tx($0.x, xScale) }
        var ys = points.flatMap { [$0.y, $0.low, $0.high] }.compactMap { tx($0, yScale) }
        if let inc = yIncludes, let v = tx(inc, yScale) { ys.append(v) }
        let count = series.map { $0.points.count }.reduce(0, +)
        var svg =
            "<svg class=\"chart\" id=\"\(Self.escape(id))\" data-series=\"\(series.count)\" data-points=\"\(count)\" "
            + "width=\"\(Int(w))\" height=\"\(Int(h))\" viewBox=\"0 0 \(Int(w)) \(Int(h))\" "
            + "xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"\(Self.escape(title))\">\n"
        guard var x0 = xs.min(), var x1 = xs.max(), var y0 = ys.min(), var y1 = ys.max() else {
            return svg + "<text x=\"20\" y=\"40\">no finite data</text></svg>\n"
        }
        if x1 - x0 < 1e-12 { (x0, x1) = (x0 - 1, x1 + 1) }
        if y1 - y0 < 1e-12 { (y0, y1) = (y0 - 0.5, y1 + 0.5) }
        // Ticks, then the plotting range extended to them.
        let yTicks: [Double]
        if yScale == .linear {
            yTicks = Self.niceTicks(y0, y1)
            y0 = Swift.min(y0, yTicks.first ?? y0)
            y1 = Swift.max(y1, yTicks.last ?? y1)
        } else {
            let lo = floor(y0)
            let hi = ceil(y1)
            var t: [Double] = []
            for e in Int(lo)...Int(hi) {
                for m in (hi - lo <= 2 ? [1.0, 2, 5] : [1.0]) {
                    let v = log10(m) + Double(e)
                    if v >= y0 - 1e-9 && v <= y1 + 1e-9 { t.append(v) }
                }
            }
            if t.count < 2 { t = [y0, y1] }
            yTicks = t
        }
        let xTicks: [Double]
        switch xScale {
        case .log2:
            xTicks = Array(Set(points.map(\.x).filter { $0 > 0 })).sorted().map { log2($0) }
        case .log:
            xTicks = Array(Int(floor(x0))...Int(ceil(x1))).map(Double.init).filter {
                $0 >= x0 - 1e-9 && $0 <= x1 + 1e-9
            }
        case .linear:
            let allIntegers = points.allSatisfy { $0.x == $0.x.rounded() }
            var t = Self.niceTicks(x0, x1)
            if allIntegers { t = Array(Set(t.filter { $0 == $0.rounded() })).sorted() }
            xTicks = t
        }
        let plotW = w - left - right
        let plotH = h - top - bottom
        func px(_ v: Double) -> Double { left + (v - x0) / (x1 - x0) * plotW }
        func py(_ v: Double) -> Double { top + plotH - (v - y0) / (y1 - y0) * plotH }
        func f(_ v: Double) -> String { String(format: "%.1f", v) }
        func untransform(_ v: Double, _ s: Scale) -> Double {
            s == .linear ? v : s == .log ? pow(10, v) : pow(2, v)
        }
        svg += "<g class=\"axes\" font-size=\"11\" fill=\"#333\">\n"
        for t in yTicks {
            svg +=
                "<line x1=\"\(f(left))\" y1=\"\(f(py(t)))\" x2=\"\(f(w - right))\" y2=\"\(f(py(t)))\" stroke=\"#eee\"/>"
            svg +=
                "<text x=\"\(f(left - 6))\" y=\"\(f(py(t) + 4))\" text-anchor=\"end\">\(Self.label(untransform(t, yScale)))</text>\n"
        }
        for t in xTicks {
            svg +=
                "<line x1=\"\(f(px(t)))\" y1=\"\(f(top + plotH))\" x2=\"\(f(px(t)))\" y2=\"\(f(top + plotH + 4))\" stroke=\"#333\"/>"
            svg +=
                "<text x=\"\(f(px(t)))\" y=\"\(f(top + plotH + 16))\" text-anchor=\"middle\">\(Self.label(untransform(t, xScale)))</text>\n"
        }
        svg +=
            "<rect x=\"\(f(left))\" y=\"\(f(top))\" width=\"\(f(plotW))\" height=\"\(f(plotH))\" fill=\"none\" stroke=\"#333\"/>\n"
        let scaleNote = { (s: Scale) in s == .linear ? "" : " (log scale)" }
        svg +=
            "<text x=\"\(f(left + plotW / 2))\" y=\"\(f(h - 8))\" text-anchor=\"middle\">\(Self.escape(xLabel + scaleNote(xScale)))</text>\n"
        svg +=
            "<text x=\"14\" y=\"\(f(top + plotH / 2))\" text-anchor=\"middle\" transform=\"rotate(-90 14 \(f(top + plotH / 2)))\">\(Self.escape(yLabel + scaleNote(yScale)))</text>\n"
        svg += "</g>\n"
        for (i, s) in series.enumerated() {
            let color = Self.palette[i % Self.palette.count]
            let valid = s.points.compactMap { p -> (Double, Double, Double, Double, Point)? in
                guard let x = tx(p.x, xScale), let y = tx(p.y, yScale) else { return nil }
                let lo = tx(p.low, yScale) ?? y0
                let hi = tx(p.high, yScale) ?? y
                return (x, y, lo, hi, p)
            }
            svg += "<g class=\"series\" data-name=\"\(Self.escape(s.name))\">\n"
            if valid.contains(where: { $0.2 != $0.3 }) {
                let upper = valid.map { "\(f(px($0.0))),\(f(py($0.3)))" }
                let lower = valid.reversed().map { "\(f(px($0.0))),\(f(py($0.2)))" }
                svg +=
                    "<polygon class=\"band\" points=\"\((upper + lower).joined(separator: " "))\" fill=\"\(color)\" fill-opacity=\"0.15\" stroke=\"none\"/>\n"
            }
            let line = valid.map { "\(f(px($0.0))),\(f(py($0.1)))" }.joined(separator: " ")
            svg +=
                "<polyline class=\"mean\" points=\"\(line)\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\"\(s.dashed ? " stroke-dasharray=\"5 4\"" : "")/>\n"
            for v in valid {
                let p = v.4
                svg +=
                    "<circle cx=\"\(f(px(v.0)))\" cy=\"\(f(py(v.1)))\" r=\"3\" fill=\"\(color)\"><title>\(Self.escape(s.name)): x = \(Self.label(p.x)), y = \(String(format: "%.4g", p.y)) (band \(String(format: "%.4g", p.low)) … \(String(format: "%.4g", p.high)))</title></circle>"
            }
            svg += "\n</g>\n"
            svg +=
                "<text x=\"\(f(w - right + 12))\" y=\"\(f(top + 14 + 16 * Double(i)))\" fill=\"\(color)\" font-size=\"12\">\(s.dashed ? "- -" : "—") \(Self.escape(s.name))</text>\n"
        }
        return svg + "</svg>\n"
    }
}
