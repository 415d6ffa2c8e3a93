#!/usr/bin/env bash
# Installs what sdlite needs on a fresh Debian 12 machine, from its package registries only:
# Mesa's lavapipe (a Vulkan driver on the CPU, so wgpu runs without a GPU), the wasm32
# toolchain (Debian's rustc-web with std sources, and lld-16 as the wasm linker), and the
# real CLIP vocabulary from PyPI for the tokenizer tests; iproute2 (ip netns, tc netem) for
# the offload test across network namespaces; NVIDIA's runtime compiler library from PyPI,
# so the tests compile the CUDA kernels without a GPU; for the browser demo, the
# wasm-bindgen CLI (crates.io, the version in Cargo.lock), Chromium and Node with
# playwright-core (npm) for its tests.
# Needs a Rust toolchain (rustup) for the native build. Idempotent.
set -euo pipefail
packages=(mesa-vulkan-drivers rustc-web cargo-web rust-web-src lld-16 iproute2 chromium)
# Node from elsewhere (it bundles npm) conflicts with Debian's npm: only add ours when absent.
command -v npm >/dev/null || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup first" >&2; exit 1; }
bash "$(dirname "$0")/fetch-vocab.sh"
bash "$(dirname "$0")/fetch-nvrtc.sh"
cd "$(dirname "$0")/.."
bindgen=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $bindgen" ]; then
    cargo install --quiet wasm-bindgen-cli --version "$bindgen"
fi
(cd tests/web && npm ci --no-audit --no-fund --silent)
echo "setup: ok"
