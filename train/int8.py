"""Int8 storage for shipped weights, which halves an f16 checkpoint: every tensor of two or
more dimensions becomes int8 with an f16 scale per row (`x` as I8 beside `x_scale` of shape
[rows, 1], the channel-wise layout of compressed-tensors checkpoints), symmetric, the
row's largest magnitude at 127. Tensors of one dimension (biases, norms) stay as they are.

The runtime dequantizes such a file when it opens it (`dequantize_int8` in
runtime/src/weights.rs): `q * scale` in f32, rounded once to the scale's dtype. diffusers
cannot read the file, so `dequantized_copy` gives it a copy of a model folder dequantized
the same way, bit for bit, and the reference outputs come from the weights the runtime runs.

An output larger than SHARD_BYTES is written as shards with a diffusers index beside them
(`OUT-00001-of-00002.safetensors` ..., `OUT.index.json`), each tensor in the same shard as
its scale (the runtime dequantizes file by file), so no file the repository tracks is large.

Usage: python train/int8.py IN.safetensors OUT.safetensors    (OUT may be IN)
"""

import glob
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

SHARD_BYTES = 7 << 19  # 3.5 MiB: under the 4 MiB a tracked file may take


def quantize(tensors):
    out = {}
    for name, w in tensors.items():
        if w.ndim < 2:
            out[name] = w
            continue
        rows = w.reshape(w.shape[0], -1).astype(np.float32)
        scale = (np.abs(rows).max(axis=1, keepdims=True) / 127).astype(np.float16)
        scale[scale == 0] = 1  # a row of zeros stays zeros at any scale
        q = np.clip(np.rint(rows / scale.astype(np.float32)), -127, 127).astype(np.int8)
        out[name] = q.reshape(w.shape)
        out[name + "_scale"] = scale
    return out


def dequantize(tensors):
    out = {}
    for name, t in tensors.items():
        quantized = name.removesuffix("_scale")
        if t.dtype != np.int8:
            if quantized == name or quantized not in tensors or tensors[quantized].dtype != np.int8:
                out[name] = t
            continue
        scale = tensors[name + "_scale"]
        rows = t.reshape(t.shape[0] if t.ndim else 1, -1).astype(np.float32) * scale.reshape(-1, 1).astype(np.float32)
        out[name] = rows.astype(scale.dtype).reshape(t.shape)
    return out


def metadata(path):
    with safe_open(path, "np") as f:
        return f.metadata()


def shards(tensors):
    """`tensors` split in name order into groups of at most SHARD_BYTES, a tensor and its
    scale always in one group (a single group when all fit)."""
    groups, size = [{}], 0
    for name in sorted(n for n in tensors if not n.endswith("_scale") or n.removesuffix("_scale") not in tensors):
        unit = {n: tensors[n] for n in (name, name + "_scale") if n in tensors}
        unit_size = sum(t.nbytes for t in unit.values())
        if groups[-1] and size + unit_size > SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1].update(unit)
        size += unit_size
    return groups


def save(tensors, path, meta):
    """`tensors` as `path`, or as shards beside an index named after it when larger than
    SHARD_BYTES; either way, files a previous save left there under the other layout go."""
    stem = path.removesuffix(".safetensors")
    index_path = path + ".index.json"
    for stale in glob.glob(glob.escape(stem) + "-*-of-*.safetensors") + [index_path, path]:
        if os.path.exists(stale):
            os.remove(stale)
    groups = shards(tensors)
    if len(groups) == 1:
        save_file(groups[0], path, metadata=meta)
        return [path]
    weight_map, written = {}, []
    for i, group in enumerate(groups):
        shard = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, shard, metadata=meta)
        weight_map.update({name: os.path.basename(shard) for name in group})
        written.append(shard)
    total = sum(t.nbytes for t in tensors.values())
    with open(index_path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")
    return written + [index_path]


def dequantized_copy(folder):
    """A temporary copy of a model folder with every int8 safetensors file dequantized (and
    any shard index's map and total size rewritten to match): what `from_pretrained` can load. The caller
    removes it when done (or leaves it to the OS)."""
    copy = os.path.join(tempfile.mkdtemp(prefix="sdlite-dequantized-"), os.path.basename(os.path.normpath(folder)))
    shutil.copytree(folder, copy)
    for root, _, files in os.walk(copy):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".safetensors"):
                tensors = load_file(path)
                if any(t.dtype == np.int8 for t in tensors.values()):
                    save_file(dequantize(tensors), path, metadata=metadata(path))
        for name in files:
            if name.endswith(".safetensors.index.json"):
                path = os.path.join(root, name)
                with open(path) as f:
                    index = json.load(f)
                held, total = {}, 0
                for shard in set(index["weight_map"].values()):
                    with safe_open(os.path.join(root, shard), "np") as f:
                        for tensor in f.keys():
                            held[tensor] = shard
                            total += f.get_tensor(tensor).nbytes
                index["weight_map"] = held
                index.setdefault("metadata", {})["total_size"] = total
                with open(path, "w") as f:
                    json.dump(index, f, indent=2)
    return copy


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1:]
    tensors, meta, size = load_file(src), metadata(src), os.path.getsize(src)
    if any(t.dtype == np.int8 for t in tensors.values()):
        sys.exit(f"{src} already holds int8 tensors; give the float checkpoint they came from")
    q = quantize(tensors)
    back = dequantize(q)
    worst = max(float(np.abs(back[n].astype(np.float32) - t.astype(np.float32)).max()) for n, t in tensors.items())
    written = save(q, dst, meta)
    print(f"{src}: {size} -> {sum(os.path.getsize(p) for p in written)} bytes in {', '.join(written)}, worst element error {worst:.3g}")


if __name__ == "__main__":
    main()
