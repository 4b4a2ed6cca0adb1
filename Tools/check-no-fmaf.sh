#!/usr/bin/env bash
# Fails when a release binary's NormKit kernels call the C library's fmaf: on the default
# x86-64 target, `addingProduct` on SIMD vectors lowers to one fmaf call per lane (about 20x
# slower than a multiply and an add), so the kernels must never use it.
#
#   Tools/check-no-fmaf.sh .build/release/normkit
set -euo pipefail
binary=${1:-.build/release/normkit}
[ -x "$binary" ] || { echo "no binary at $binary (build it with swift build -c release)"; exit 2; }
objdump -d --no-show-raw-insn "$binary" | awk '
    /^[0-9a-f]+ <.*>:$/ { fn = $2; kernels += (fn ~ /NormKernels/) }
    /call.*<fmaf/ && fn ~ /NormKernels|Normalization/ { print "fmaf call in " fn; bad = 1 }
    END {
        if (kernels == 0) { print "no NormKernels symbols found: is this the normkit binary?"; exit 2 }
        if (!bad) print "no fmaf calls in " kernels " NormKernels functions"
        exit bad
    }'
