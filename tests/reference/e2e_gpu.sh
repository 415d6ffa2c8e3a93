#!/bin/bash
# End to end on the GPU machine: diffusers' WanPipeline on a full-size random-weight
# folder, then sdlite gen with the denoiser on a local CUDA worker over loopback QUIC, then
# the client's peak memory with and without its own DiT (tests/reference/client_peak.py).
export LD_LIBRARY_PATH=$(python3 -c "import glob,os,site; print(':'.join(d for p in site.getsitepackages() for d in glob.glob(os.path.join(p,'nvidia','*','lib'))))")
export SDLITE_CUDA_CACHE=/tmp/cc
# Usage (repo root on the GPU machine, diffusers wheels in .whl, the sdlite binary at /tmp/sdlite):
#   bash tests/reference/e2e_gpu.sh        (DIFFUSERS=--no-run: build the folder, skip diffusers)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
SECONDS=0
python3 -c "
import sys, runpy
sys.modules['peft'] = None
sys.argv = ['wan_pipeline_e2e.py', '/tmp/e2e/wan-full'] + sys.argv[1:]
sys.path.insert(0, 'tests/reference')
runpy.run_path('tests/reference/wan_pipeline_e2e.py', run_name='__main__')
" $DIFFUSERS 2>&1 | tr '\r' '\n' | grep -E "loaded in|WanPipeline [0-9]+ steps|Error|error" | tail -6
echo "diffusers done at $SECONDS s"
/tmp/sdlite worker --listen 127.0.0.1:4433 --backend cuda --models /tmp/e2e --token T > /tmp/worker.log 2>&1 &
for i in $(seq 60); do grep -q "fingerprint sha256=" /tmp/worker.log && break; sleep 1; done
FP=$(grep -o "fingerprint sha256=[0-9a-f]*" /tmp/worker.log | head -1 | cut -d= -f2)
# The request both parts make; the worker's address is this run's.
GEN=(/tmp/sdlite gen --model /tmp/e2e/wan-full --backend cuda --half --prompt "a red fox running through snow"
     --frames 81 --seed 1 --worker "quic://127.0.0.1:4433#sha256=$FP" --token T)
gen() {
  local start=$SECONDS
  "${GEN[@]}" --steps $1 --offload denoiser --out /tmp/fox-$1.png > /tmp/gen.log 2>&1
  echo "sdlite gen $2, $1 step(s): wall $((SECONDS - start)) s"
  grep -v "^loading\|^wrote" /tmp/gen.log | tail -8
}
gen 1 "cold kernel cache"
gen 50 "warm kernel cache"
ls -la /tmp/fox-50.png
# The client's memory with its DiT deferred (--offload denoiser) and loaded at start
# (blocks=0..30: every block remote, the DiT loaded for the blocks it would run here).
for mode in denoiser blocks=0..30 denoiser blocks=0..30; do
  echo "client, --offload $mode, 1 step:"
  python3 tests/reference/client_peak.py "${GEN[@]}" --steps 1 --offload $mode --out /tmp/fox-peak.png | grep -E "^rc|loaded in"
done
