#!/usr/bin/env bash
# Fetches the real CLIP BPE vocabulary from the PyPI package open_clip_torch (no model hub)
# and writes it in the diffusers tokenizer layout (vocab.json + merges.txt) under
# target/reference/clip-vocab, where the tokenizer tests look for it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/reference/clip-vocab
[ -s "$out/vocab.json" ] && [ -s "$out/merges.txt" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "open_clip_torch==3.*"
mkdir -p "$out"
python3 - "$tmp"/open_clip_torch-*.whl "$out" <<'PY'
import gzip, json, sys, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    text = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
# The reference tokenizer keeps the first 49152 - 256 - 2 merges after the header line.
merges = text.split("\n")[1 : 49152 - 256 - 2 + 1]
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
base = [chr(c) for c in cs]
tokens = base + [t + "</w>" for t in base] + ["".join(m.split(" ")) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
with open(f"{out}/vocab.json", "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
with open(f"{out}/merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
print(f"CLIP vocabulary: {len(tokens)} tokens, {len(merges)} merges -> {out}")
PY
