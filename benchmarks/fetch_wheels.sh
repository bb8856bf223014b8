#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu.sh installs on a machine without network access.
#
#   benchmarks/fetch_wheels.sh [WHEELS_DIR] [PYTHON_VERSION]
#
# WHEELS_DIR      default benchmarks/wheels (ignored by git: wheels are never committed)
# PYTHON_VERSION  the GPU machine's Python, default 3.12 (CPython, manylinux x86_64)
#
# Run it where PyPI (or pip's configured index) is reachable. It fetches binary wheels of
# the project's dependencies except torch and torchvision (the GPU machines have their own),
# with everything they depend on, plus setuptools and wheel (to build the project offline)
# and pip (to bootstrap a venv made without it). PYTHON picks the interpreter that runs pip
# (default python3, 3.11 or later); the wheels are for PYTHON_VERSION whatever it is.
# SET=bench (default, ~40 MB) leaves out what only training and evaluation need (pandas,
# scikit-learn, matplotlib, scipy): small enough to travel with the repository to a GPU
# machine (64 MiB). SET=all fetches every dependency (~110 MB).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
dest=${1:-$here/wheels}
pyver=${2:-3.12}
py=${PYTHON:-python3}
set_=${SET:-bench}

if [[ ! $pyver =~ ^3\.[0-9]+$ ]]; then
    echo "fetch_wheels.sh: PYTHON_VERSION must look like 3.12, not '$pyver'" >&2
    exit 2
fi
abi=cp${pyver/./}
mkdir -p "$dest"

mapfile -t reqs < <("$py" "$here/offline_requirements.py" --set "$set_" "$root/pyproject.toml")
echo "fetch_wheels.sh: ${#reqs[@]} requirements (set $set_; torch and torchvision left out) for CPython $pyver -> $dest"

"$py" -m pip download \
    --dest "$dest" \
    --only-binary=:all: \
    --implementation cp \
    --python-version "$pyver" \
    --abi "$abi" \
    --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 \
    "${reqs[@]}" "setuptools>=68" wheel pip

count=$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l)
size=$(du -sh "$dest" | cut -f1)
echo "fetch_wheels.sh: $count wheels ($size) in $dest"
