#!/usr/bin/env bash
# Builds the runtime for wasm32-unknown-unknown (the browser target). The rustup toolchain
# here ships only the x86-64 std, so this uses Debian's rustc-web with its std sources
# (-Zbuild-std, allowed on a stable compiler by RUSTC_BOOTSTRAP, confined to this command)
# and lld-16 as the wasm linker. scripts/setup.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=/usr/bin/wasm-ld-16 \
    /usr/bin/cargo build --release --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort \
    --target-dir target/wasm -p sdlite-runtime "$@"
