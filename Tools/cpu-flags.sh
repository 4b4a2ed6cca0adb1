#!/usr/bin/env bash
# Prints the `swift build` flags that let the compiler use this machine's vector units
# (AVX2 / AVX-512) in NormKit's kernels, or nothing when it knows no better target.
# The kernels are written to be fast on the default x86-64 target too; these flags only widen
# the SIMD instructions. Use a separate build folder, since the flags change every object:
#
#   swift build -c release --scratch-path .build-native $(Tools/cpu-flags.sh)
set -euo pipefail
[ -r /proc/cpuinfo ] || exit 0
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
vendor=$(grep -m1 '^vendor_id' /proc/cpuinfo | awk '{print $3}' || true)
cpu=""
if [[ " $flags " == *" avx512f "* && " $flags " == *" avx512bw "* && " $flags " == *" avx512vl "* ]]; then
    if [ "$vendor" = "AuthenticAMD" ]; then cpu=znver4; else cpu=skylake-avx512; fi
elif [[ " $flags " == *" avx2 "* && " $flags " == *" fma "* ]]; then
    if [ "$vendor" = "AuthenticAMD" ]; then cpu=znver2; else cpu=haswell; fi
fi
[ -n "$cpu" ] && echo "-Xswiftc -target-cpu -Xswiftc $cpu"
exit 0
