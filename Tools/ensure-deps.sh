#!/usr/bin/env bash
# Installs what NormKit needs beyond the Swift toolchain, when it is missing:
# OpenBLAS (CBLAS), LAPACKE and pkg-config, from Debian's packages. Safe to run repeatedly.
set -euo pipefail
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openblas lapacke 2>/dev/null; then
    exit 0
fi
if [ "$(uname)" = "Darwin" ]; then
    exit 0  # Accelerate provides BLAS.
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "NormKit needs libopenblas-dev, liblapacke-dev and pkg-config: install them as root"; exit 1; }
    sudo="sudo"
fi
echo "Installing libopenblas-dev, liblapacke-dev and pkg-config (Debian packages)…"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libopenblas-dev liblapacke-dev pkg-config >/dev/null
