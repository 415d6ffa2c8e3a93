"""A full-size Wan2.1-T2V-1.3B pipeline folder with seeded random weights (UMT5-XXL text
encoder, the 1.3B DiT, the Wan VAE; the tiny test tokenizer and the release's scheduler
config), and diffusers' own time for one generation with it: the baseline for
`sdlite gen --worker ...` on the same folder (see docs/bench.md, "End to end").

Usage: python tests/reference/wan_pipeline_e2e.py OUT_DIR [--steps 50] [--no-run]
"""

import json
import os
import shutil
import sys
import time

import torch
from full_configs import wan13b_dit

torch.set_grad_enabled(False)
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "data", "wan-tiny")


def build(out):
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    os.makedirs(out, exist_ok=True)
    for part in ["tokenizer", "scheduler"]:
        shutil.copytree(os.path.join(TINY, part), os.path.join(out, part), dirs_exist_ok=True)
    shutil.copy(os.path.join(TINY, "model_index.json"), out)
    # Built on the GPU: random initialisation of 5.7B parameters on the CPU takes minutes.
    with torch.device("cuda"):
        torch.manual_seed(11)
        te = UMT5EncoderModel(
            UMT5Config(
                vocab_size=256384,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu",
                dense_act_fn="gelu_new",
            )
        )
        te.to(torch.bfloat16).save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True)
        del te
        torch.manual_seed(12)
        dit = wan13b_dit()
        dit.to(torch.bfloat16).save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
        del dit
        torch.manual_seed(13)
        AutoencoderKLWan().to(torch.bfloat16).save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    torch.cuda.empty_cache()


def run(out, steps):
    from diffusers import WanPipeline

    start = time.perf_counter()
    pipe = WanPipeline.from_pretrained(out, torch_dtype=torch.bfloat16).to("cuda")
    torch.cuda.synchronize()
    load = time.perf_counter() - start
    print(f"diffusers WanPipeline loaded in {load:.1f} s", flush=True)
    args = dict(prompt="a red fox running through snow", negative_prompt="", num_frames=81, height=480, width=832,
                num_inference_steps=steps, guidance_scale=5.0, output_type="np", generator=torch.Generator("cuda").manual_seed(1))
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(**args)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"diffusers WanPipeline {steps} steps 81x480x832: {seconds:.1f} s", flush=True)
    with open(os.path.join(out, "diffusers-e2e.json"), "w") as f:
        json.dump({"steps": steps, "seconds": seconds, "load_seconds": load}, f)


def main():
    out = sys.argv[1]
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 50
    if not os.path.exists(os.path.join(out, "vae", "config.json")):
        build(out)
    if "--no-run" not in sys.argv:
        run(out, steps)


if __name__ == "__main__":
    main()
