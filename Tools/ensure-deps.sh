#!/usr/bin/env bash
# Installs what NormKit needs beyond the Swift toolchain, each dependency checked on its own and
# installed from Debian's packages only when missing. Safe to run repeatedly.
#   OpenBLAS (CBLAS), LAPACKE, pkg-config   the training harness's GEMMs, the whitening layers
#   zlib (zlib1g-dev)                       gzip data sets (the Fashion-MNIST loader)
#   Open MPI (libopenmpi-dev, openmpi-bin)  SyncBatchNorm and `mpirun -np K normkit train`
#   dataset-fashion-mnist                   the Fashion-MNIST studies
#   chromium                                the headless check of the HTML reports
set -euo pipefail
if [ "$(uname)" = "Darwin" ]; then
    # Accelerate provides BLAS and LAPACK; Open MPI comes from Homebrew (brew install open-mpi).
    command -v mpirun >/dev/null 2>&1 || echo "NormKit's MPI tools need Open MPI: brew install open-mpi"
    exit 0
fi

missing=()
need() { missing+=("$@"); }

have_pc() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists "$1" 2>/dev/null; }

command -v pkg-config >/dev/null 2>&1 || need pkg-config
have_pc openblas || need libopenblas-dev
have_pc lapacke || need liblapacke-dev
have_pc zlib || need zlib1g-dev
have_pc ompi-c || need libopenmpi-dev
command -v mpirun >/dev/null 2>&1 || need openmpi-bin
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need dataset-fashion-mnist
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || need chromium

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "NormKit needs these Debian packages: ${missing[*]}; install them as root"
        exit 1
    }
    sudo="sudo"
fi
echo "Installing ${missing[*]} (Debian packages)…"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
