"""Int8 storage for shipped weights, which halves an f16 checkpoint: every tensor of two or
more dimensions becomes int8 with an f16 scale per row (`x` as I8 beside `x_scale` of shape
[rows, 1], the channel-wise layout of compressed-tensors checkpoints), symmetric, the
row's largest magnitude at 127. Tensors of one dimension (biases, norms) stay as they are.

The runtime dequantizes such a file when it opens it (`dequantize_int8` in
runtime/src/weights.rs): `q * scale` in f32, rounded once to the scale's dtype. diffusers
cannot read the file, so `dequantized_copy` gives it a copy of a model folder dequantized
the same way, bit for bit, and the reference outputs come from the weights the runtime runs.

Usage: python train/int8.py IN.safetensors OUT.safetensors    (OUT may be IN)
"""

import os
import shutil
import sys
import tempfile

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


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


def dequantized_copy(folder):
    """A temporary copy of a model folder with every int8 safetensors file dequantized: what
    `from_pretrained` can load. The caller removes it when done (or leaves it to the OS)."""
    copy = os.path.join(tempfile.mkdtemp(prefix="sdlite-dequantized-"), os.path.basename(os.path.normpath(folder)))
    shutil.copytree(folder, copy)
    for root, _, files in os.walk(copy):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".safetensors"):
                tensors = load_file(path)
                if any(t.dtype == np.int8 for t in tensors.values()):
                    save_file(dequantize(tensors), path, metadata=metadata(path))
    return copy


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1:]
    tensors, meta, size = load_file(src), metadata(src), os.path.getsize(src)
    q = quantize(tensors)
    back = dequantize(q)
    worst = max(float(np.abs(back[n].astype(np.float32) - t.astype(np.float32)).max()) for n, t in tensors.items())
    save_file(q, dst, metadata=meta)
    print(f"{src}: {size} -> {os.path.getsize(dst)} bytes, worst element error {worst:.3g}")


if __name__ == "__main__":
    main()
