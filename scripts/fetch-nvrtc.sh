#!/usr/bin/env bash
# Fetches NVIDIA's runtime compiler library (libnvrtc, CUDA 13) from PyPI into target/nvrtc,
# so the CUDA kernels are compiled by the tests on machines without a GPU or a CUDA install:
# CI checks that every file under kernels/ compiles for sm_80 and sm_90. Nothing else uses it;
# a GPU machine uses its own CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/nvrtc
ls "$out"/libnvrtc.so.* >/dev/null 2>&1 && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --dest "$tmp" "nvidia-cuda-nvrtc==13.*"
mkdir -p "$out"
python3 - "$tmp"/nvidia_cuda_nvrtc-*.whl "$out" <<'PY'
import os, sys, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if "/lib/libnvrtc" in name:
            with open(os.path.join(out, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
print(f"libnvrtc -> {out}: {sorted(os.listdir(out))}")
PY
