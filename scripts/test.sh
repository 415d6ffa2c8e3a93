#!/usr/bin/env bash
# The test command: the browser demo's wasm32 build, then every crate's tests (wgpu kernels
# against the CPU reference on the local adapter: lavapipe where there is no GPU; the demo
# page in headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
# lavapipe warns about this when it is unset; harmless, but keep the log clean.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# With the library scripts/fetch-nvrtc.sh fetched, every CUDA kernel file must compile.
if ls target/nvrtc/libnvrtc.so.* >/dev/null 2>&1; then
    export LD_LIBRARY_PATH="$PWD/target/nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SDLITE_REQUIRE_NVRTC=1
fi
bash scripts/build-web.sh --locked
cargo test --workspace --locked
# The browser test's screenshots and report (cli/tests/web.rs), for CI to keep.
for f in target/web-test/page.png target/web-test/video.png target/web-test/no-webgpu.png target/web-test/report.json; do
    [ -f "$f" ] && echo "browser test artifact: $f"
done
true
