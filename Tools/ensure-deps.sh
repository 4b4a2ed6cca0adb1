#!/usr/bin/env bash
# Installs what NormKit needs beyond the Swift toolchain, when it is missing, from Debian's
# packages: OpenBLAS (CBLAS), LAPACKE, zlib (gzip data sets), pkg-config, and the Fashion-MNIST
# data set. Each dependency has its own check; safe to run repeatedly.
set -euo pipefail
if [ "$(uname)" = "Darwin" ]; then
    exit 0  # Accelerate provides BLAS and LAPACK; the SDK has zlib.
fi
missing=()
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
have() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists "$1" 2>/dev/null; }
have openblas || missing+=(libopenblas-dev)
have lapacke || missing+=(liblapacke-dev)
have zlib || missing+=(zlib1g-dev)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "NormKit needs ${missing[*]}: install them as root (apt-get install ${missing[*]})"; exit 1; }
    sudo="sudo"
fi
echo "Installing ${missing[*]} (Debian packages)…"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
