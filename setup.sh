#!/usr/bin/env bash
# Set up seqgen on a fresh machine: a virtual environment in .venv with a pinned torch (pip takes the local
# CPU wheel where the machine has one, as this project's machines do; from PyPI itself torch is the CUDA
# build, several GB: set SEQGEN_TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build there),
# seqgen with its test extras, and the Fashion-MNIST data (Debian package dataset-fashion-mnist) where this
# machine can install it. Safe to run again. Environment: PYTHON (default python3), SEQGEN_TORCH (default
# torch==2.13.0), SEQGEN_TORCH_INDEX (default: pip's configured indexes).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${SEQGEN_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q ${SEQGEN_TORCH_INDEX:+--index-url "$SEQGEN_TORCH_INDEX"} "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test]"

# Install a Debian package where this machine can (as root, or with passwordless sudo), else do nothing.
apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
        $sudo apt-get install -y -q "$1" >/dev/null 2>&1 \
            || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "$1" >/dev/null; } \
            || echo "setup: WARNING: apt-get could not install $1" >&2
    fi
}

# Fashion-MNIST: the experiments read IDX .gz files from --data-dir, $SEQGEN_FASHION_MNIST_DIR, or the
# Debian location. Nothing downloads at run time, so install them now if we can.
FMNIST_DIR=${SEQGEN_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -f "$FMNIST_DIR/t10k-images-idx3-ubyte.gz" ] || [ -f "$FMNIST_DIR/t10k-images-idx3-ubyte" ]; then
    echo "setup: Fashion-MNIST found in $FMNIST_DIR"
else
    apt_install dataset-fashion-mnist
    if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
        echo "setup: Fashion-MNIST installed in /usr/share/datasets/fashion-mnist"
    else
        cat >&2 <<'MSG'
setup: Fashion-MNIST is not installed. The digits experiments and the tests work without it; for the
Fashion-MNIST experiments either install the Debian/Ubuntu package (as root):
    apt-get install dataset-fashion-mnist
or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz in a directory and pass --data-dir DIR or set SEQGEN_FASHION_MNIST_DIR=DIR.
MSG
    fi
fi
# The English text corpus of the professor-forcing experiment: the Debian package fortunes (a plain-text file
# of your own works too, with --text FILE).
if [ -d /usr/share/games/fortunes ]; then
    echo "setup: fortunes corpus found in /usr/share/games/fortunes"
else
    apt_install fortunes
    if [ -d /usr/share/games/fortunes ]; then
        echo "setup: fortunes corpus installed in /usr/share/games/fortunes"
    else
        echo "setup: the fortunes corpus is not installed (apt-get install fortunes, as root); only the text" \
             "experiment needs it, and it also takes --text FILE" >&2
    fi
fi
echo "setup: done (.venv/bin/python)"
