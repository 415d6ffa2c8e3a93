#!/bin/bash
# The CUDA backend on the GPU machine: our kernel tests against the CPU reference, then
# diffusers and `sdlite bench-cuda` on the same random-weight models (docs/bench.md).
# Prepare on a build machine, in the repo root:
#   cargo build --release -p sdlite-cli; cargo test --no-run -p sdlite-tests --test kernels
#   mkdir -p .carry; strip -o /tmp/s target/release/sdlite; xz -c /tmp/s > .carry/sdlite.xz
#   strip -o /tmp/k target/debug/deps/kernels-<hash>; xz -c /tmp/k > .carry/kernels.xz
#   the diffusers wheel and its two dependencies in .whl (docs/bench.md)
# Usage (repo root on the GPU machine, .carry and .whl carried there):
#   [TESTS=filter] [NOTEST=1] [NOBENCH=1] [ONLY=case,case] [PROFILE=1] [BASELINE=1] bash tests/reference/cuda_gpu.sh
# TESTS picks kernel tests by name (default: conv; empty: all), ONLY the benchmark cases,
# PROFILE adds a --profile run, BASELINE the VAE with the sm_80 convolution. Writes tests.txt,
# bench.txt and profile.txt to $OUT.
export LD_LIBRARY_PATH=$(python3 -c "import glob,os,site; print(':'.join(d for p in site.getsitepackages() for d in glob.glob(os.path.join(p,'nvidia','*','lib'))))")
export SDLITE_CUDA_CACHE=/tmp/cc
xz -dc .carry/kernels.xz > /tmp/kernels && chmod +x /tmp/kernels
xz -dc .carry/sdlite.xz > /tmp/sdlite && chmod +x /tmp/sdlite
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv
if [ -z "$NOTEST" ]; then
  SDLITE_REQUIRE_CUDA=1 timeout 300 /tmp/kernels ${TESTS-conv} --nocapture > $OUT/tests.txt 2>&1; rc=$?
  grep -E "hopper|test result|FAILED|panicked|Error|error" $OUT/tests.txt | tail -40
  [ $rc = 0 ] || exit 1
fi
[ -n "$NOBENCH" ] && exit 0
[ -d /tmp/site/diffusers ] || pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
[ -f /tmp/b/diffusers.json ] || python3 tests/reference/bench_cuda.py /tmp/b ${ONLY:+--only $ONLY} 2>&1 | grep -v Warning | tail -8
/tmp/sdlite bench-cuda --dir /tmp/b ${ONLY:+--only $ONLY} 2>&1 | tee $OUT/bench.txt | tail -30
[ -n "$PROFILE" ] && /tmp/sdlite bench-cuda --dir /tmp/b ${ONLY:+--only $ONLY} --profile --iters 1 2>&1 | tee $OUT/profile.txt | grep -v "^attention\|^linear" | tail -40
[ -n "$BASELINE" ] && /tmp/sdlite bench-cuda --dir /tmp/b --only wan_vae_decode --iters 2 --conv implicit-gemm 2>&1 | tee $OUT/baseline.txt | grep -iv "^attention\|^linear" | tail -12
true
