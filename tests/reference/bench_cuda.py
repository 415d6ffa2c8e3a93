"""The baseline for `sdlite bench-cuda`: diffusers (PyTorch SDPA) on the GPU machine, on the
real architectures with seeded random weights, in the dtypes a user would run them in.

Writes, under OUT_DIR, each model in the diffusers layout (the weights sdlite loads), the
inputs, diffusers' outputs (for the error figures) and `diffusers.json` with the median
time of one forward and the peak GPU memory of each case, and of PyTorch SDPA on one
full-size Wan attention (32,760 tokens x 12 heads x 128). Then `sdlite bench-cuda --dir
OUT_DIR` runs the same weights and inputs on sdlite's CUDA backend and prints both.

Usage: python tests/reference/bench_cuda.py OUT_DIR [--iters N]
"""

import json
import os
import sys
import time

import torch
from full_configs import wan13b_dit
from safetensors.torch import save_file

torch.set_grad_enabled(False)
DEV = "cuda"
# (channels, height, width) of the convolutions timed alone; `sdlite bench-cuda` times the same.
# (input channels, output channels, height, width): the widest, the largest and the last.
CONV_SHAPES = [(96, 96, 480, 832), (384, 384, 120, 208), (96, 3, 480, 832)]


def median_time(fn, iters):
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_case(name, make, inputs, forward, dtype, out, results, tensors, iters, keep=lambda y: y):
    """Builds the model (seeded), saves it, times `forward(model, *inputs)` and records
    the output and the peak memory of the timed region (weights included)."""
    folder = os.path.join(out, name)
    torch.manual_seed(sum(map(ord, name)))
    model = make().to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    model = model.to(DEV).eval()
    dev_inputs = [x.to(DEV) if torch.is_tensor(x) else x for x in inputs]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = median_time(lambda: forward(model, *dev_inputs), iters)
    y = forward(model, *dev_inputs)
    peak = torch.cuda.max_memory_allocated() / 2**30
    results[name] = {"seconds": seconds, "peak_gib": peak}
    for i, x in enumerate(inputs):
        if torch.is_tensor(x):
            tensors[f"{name}.input{i}"] = x.float().contiguous()
    tensors[f"{name}.output"] = keep(y).float().cpu().contiguous()
    print(f"{name}: diffusers {seconds * 1000:.1f} ms, peak {peak:.2f} GiB", flush=True)
    del model, dev_inputs, y
    torch.cuda.empty_cache()


def main():
    out = sys.argv[1]
    iters = int(sys.argv[sys.argv.index("--iters") + 1]) if "--iters" in sys.argv else 5
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    os.makedirs(out, exist_ok=True)
    from diffusers import AutoencoderKLWan, UNet2DConditionModel

    g = torch.Generator().manual_seed(0)
    results, tensors = {}, {}
    bf16, f16 = torch.bfloat16, torch.float16

    def dit_forward(m, x, t, ctx):
        return m(x.to(bf16), t, ctx.to(bf16)).sample

    ctx = (torch.randn((1, 512, 4096), generator=g) * 0.1).to(bf16)
    cases = {
        "wan_dit_8190": (wan13b_dit, [torch.randn((1, 16, 21, 30, 52), generator=g).to(bf16), torch.tensor([500.0]), ctx], dit_forward, bf16),
        "wan_dit_32760": (wan13b_dit, [torch.randn((1, 16, 21, 60, 104), generator=g).to(bf16), torch.tensor([500.0]), ctx], dit_forward, bf16),
        "sd_unet_cfg": (
            lambda: UNet2DConditionModel(cross_attention_dim=768, sample_size=64),
            [torch.randn((2, 4, 64, 64), generator=g).to(f16), torch.tensor([981.0, 981.0]), (torch.randn((2, 77, 768), generator=g)).to(f16)],
            lambda m, x, t, c: m(x, t, c).sample,
            f16,
        ),
        # Three output frames (first, middle, last) are kept for the error figure.
        "wan_vae_decode": (
            AutoencoderKLWan,
            [torch.randn((1, 16, 21, 60, 104), generator=g).to(bf16)],
            lambda m, z: m.decode(z).sample,
            bf16,
        ),
    }
    # The attention of one Wan DiT layer at 81x480x832 alone: PyTorch's SDPA, which
    # `sdlite bench-cuda` prints beside its own kernels.
    q = torch.randn((1, 12, 32760, 128), generator=g).to(bf16).to(DEV)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    results["sdpa_attention_32760"] = {"seconds": median_time(lambda: sdpa(q, q, q), iters)}
    print(f"attention 32760x12x128 bf16: torch SDPA {results['sdpa_attention_32760']['seconds'] * 1000:.2f} ms", flush=True)
    del q
    # One frame of a Wan VAE decoder convolution at its largest and its widest level, and the
    # output convolution (3x3x3, two cached frames in front): cuDNN through PyTorch, beside
    # sdlite's convolution kernels.
    for c_in, c_out, h, w in CONV_SHAPES:
        x = torch.randn((1, c_in, 3, h, w), generator=g).to(bf16).to(DEV)
        k = (torch.randn((c_out, c_in, 3, 3, 3), generator=g) * 0.02).to(bf16).to(DEV)
        conv = lambda: torch.nn.functional.conv3d(x, k, padding=(0, 1, 1))
        key = f"conv3d_{c_in}_{c_out}_{h}x{w}"
        results[key] = {"seconds": median_time(conv, iters)}
        print(f"conv3d {c_in} -> {c_out} channels 3x{h}x{w} bf16: torch {results[key]['seconds'] * 1000:.2f} ms", flush=True)
        del x, k
    for name, (make, inputs, forward, dtype) in cases.items():
        if only and name not in only:
            continue
        keep = (lambda y: y[:, :, [0, 40, 80]]) if name == "wan_vae_decode" else (lambda y: y)
        run_case(name, make, inputs, forward, dtype, out, results, tensors, iters if name != "wan_vae_decode" else 2, keep)
    save_file(tensors, os.path.join(out, "tensors.safetensors"))
    results["gpu"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    import diffusers

    results["diffusers"] = diffusers.__version__
    with open(os.path.join(out, "diffusers.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
