"""Time to first image of the built-in model on the CPU: `sdlite gen` against diffusers
(PyTorch, all cores) on the same checkpoint, prompt, sampler (DPM++ 2M), 25 steps,
guidance 7.5 and size, each timed as a whole fresh process (start-up, loading and
generation), best of --runs.

Usage: python tests/reference/bench_default_model.py [--sdlite target/release/sdlite] [--runs 3]
Needs torch, diffusers, transformers (requirements.txt) and a release build of sdlite.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODEL = os.path.join(REPO, "models", "sdlite-tiny-sd")
PROMPT = "a red star on a yellow background"

DIFFUSERS = f"""
import os, torch
torch.set_num_threads(os.cpu_count())
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({MODEL!r}, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe({PROMPT!r}, num_inference_steps=25, guidance_scale=7.5, generator=torch.Generator().manual_seed(1)).images[0].save(os.environ["OUT"])
"""


def best_of(runs, cmd, env=None):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdlite", default=os.path.join(REPO, "target", "release", "sdlite"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "x.png")
        ours = best_of(args.runs, [args.sdlite, "gen", "--prompt", PROMPT, "--seed", "1", "--backend", "cpu", "--out", out])
        ref = best_of(args.runs, [sys.executable, "-c", DIFFUSERS], env=dict(os.environ, OUT=out))
    print(f"time to first image, sdlite-tiny-sd 64x64, 25 steps, CPU ({os.cpu_count()} cores), best of {args.runs}:")
    print(f"  diffusers (PyTorch) {ref:6.2f} s")
    print(f"  sdlite gen          {ours:6.2f} s   ({ref / ours:.2f}x diffusers)")


if __name__ == "__main__":
    main()
