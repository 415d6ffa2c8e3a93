#!/usr/bin/env bash
# Builds the browser demo into target/web/site: the sdlite-web crate (and with it the
# runtime) for wasm32-unknown-unknown, its JS bindings, and the page from web/www.
# `sdlite serve` serves that folder. The rustup toolchain here ships only the x86-64 std,
# so this uses Debian's rustc-web with its std sources (-Zbuild-std, allowed on a stable
# compiler by RUSTC_BOOTSTRAP, confined to this command) and lld-16 as the wasm linker;
# the bindings come from the wasm-bindgen CLI of the version in Cargo.lock. scripts/setup.sh
# installs all of them. Extra arguments go to cargo (e.g. --locked).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=/usr/bin/wasm-ld-16 \
    /usr/bin/cargo build --release --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort \
    --target-dir target/wasm -p sdlite-web "$@"
site=target/web/site
rm -rf "$site" && mkdir -p "$site"
wasm-bindgen --target web --no-typescript --out-dir "$site/pkg" target/wasm/wasm32-unknown-unknown/release/sdlite_web.wasm
cp web/www/* "$site/"
echo "web: built $site; sdlite_web_bg.wasm is $(wc -c < "$site/pkg/sdlite_web_bg.wasm") bytes, $(gzip -9c "$site/pkg/sdlite_web_bg.wasm" | wc -c) gzipped"
