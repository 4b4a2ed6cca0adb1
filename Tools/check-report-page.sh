#!/usr/bin/env bash
# Loads an HTML report in headless Chromium and checks the rendered DOM: the page loads, and
# every chart is there as an <svg class="chart"> with its series drawn (a polyline with points)
# and the number of charts the page announces (<meta name="normkit-charts">).
#   Tools/check-report-page.sh DIR/report.html [more pages…]
set -euo pipefail
browser=""
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then browser="$b"; break; fi
done
if [ -z "$browser" ]; then
    echo "headless Chromium is needed for the page check: apt-get install chromium"; exit 1
fi
status=0
for page in "$@"; do
    [ -f "$page" ] || { echo "FAIL $page: no such file"; status=1; continue; }
    dom=$(mktemp)
    url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
    if ! timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
        --dump-dom "$url" >"$dom" 2>/dev/null; then
        echo "FAIL $page: chromium could not load it"; status=1; rm -f "$dom"; continue
    fi
    python3 - "$page" "$dom" <<'PY' || status=1
import re, sys
page, dom_path = sys.argv[1], sys.argv[2]
dom = open(dom_path, encoding="utf-8").read()
problems = []
if "</html>" not in dom or "<body" not in dom:
    problems.append("the DOM dump is not a complete page")
announced = re.search(r'<meta name="normkit-charts" content="(\d+)"', dom)
charts = re.findall(r'<svg class="chart"[^>]*>.*?</svg>', dom, re.S)
if announced is None:
    problems.append("no <meta name=\"normkit-charts\"> announcing the chart count")
elif int(announced.group(1)) != len(charts):
    problems.append(f"the page announces {announced.group(1)} charts, the DOM has {len(charts)}")
if not charts:
    problems.append("no charts")
for svg in charts:
    cid = re.search(r'id="([^"]*)"', svg).group(1)
    series = int(re.search(r'data-series="(\d+)"', svg).group(1))
    drawn = re.findall(r'<polyline class="mean" points="([^"]*)"', svg)
    nonempty = [p for p in drawn if len(p.split()) >= 1]
    circles = len(re.findall(r"<circle ", svg))
    if series == 0 or len(nonempty) < series or circles == 0:
        problems.append(f"chart {cid}: {series} series announced, {len(nonempty)} drawn, {circles} points")
    if "NaN" in svg or "nan," in svg or "inf," in svg:
        problems.append(f"chart {cid}: non-finite coordinates")
if problems:
    print(f"FAIL {page}:\n  " + "\n  ".join(problems))
    sys.exit(1)
print(f"ok {page}: {len(charts)} charts rendered, each with its series and points")
PY
    rm -f "$dom"
done
exit "$status"
