"""Time to first output of a built-in model on the CPU: `sdlite gen` against diffusers
(PyTorch, all cores) on the same checkpoint, prompt, sampler, 25 steps, guidance and size,
each timed as a whole fresh process (start-up, loading, generation and writing the file),
best of --runs. tiny-sd: DPM++ 2M, guidance 7.5, one 64x64 PNG; tiny-wan: UniPC, guidance
5, 17 frames of 64x64 (sdlite writes an MP4, diffusers the frames side by side as one PNG).

With --wgpu-kernels it times `sdlite gen --backend wgpu` instead, with the kernels for
software adapters against the GPU kernels on the same adapter (on a machine without a GPU:
lavapipe, where those kernels are the default), best of --runs each.

With --against PATH it also times another sdlite build the same way in the same run (one
from an earlier commit, say), alternating with this one: sdlite's own speed-ups measured
against what they replaced.

Usage: python tests/reference/bench_default_model.py [--model tiny-sd|tiny-wan] [--sdlite target/release/sdlite] [--runs 3] [--wgpu-kernels] [--against OTHER_SDLITE]
Needs torch, diffusers, transformers (requirements.txt) and a release build of sdlite.
diffusers loads a dequantized copy of the folder (train/int8.py), made before the timing;
sdlite's time includes its own dequantization of the int8 files.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(REPO, "train"))
from int8 import dequantized_copy  # noqa: E402

SETUP = "import os, torch\ntorch.set_num_threads(os.cpu_count())\n"
MODELS = {
    "tiny-sd": dict(
        folder="sdlite-tiny-sd",
        prompt="a red star on a yellow background",
        out="x.png",
        diffusers="""
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe(PROMPT, num_inference_steps=25, guidance_scale=7.5, generator=torch.Generator().manual_seed(1)).images[0].save(os.environ["OUT"])
""",
    ),
    "tiny-wan": dict(
        folder="sdlite-tiny-wan",
        prompt="a red circle on a blue background, moving right",
        out="x.mp4",
        diffusers="""
import numpy as np
from PIL import Image
from diffusers import WanPipeline
pipe = WanPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
frames = pipe(PROMPT, height=64, width=64, num_frames=17, num_inference_steps=25, guidance_scale=5.0,
              generator=torch.Generator().manual_seed(1), output_type="np").frames[0]
Image.fromarray((np.concatenate(list(frames), 1) * 255).round().astype("uint8")).save(os.environ["OUT"] + ".png")
""",
    ),
}


def best_of(runs, *cmds, env=None):
    """Best wall time of each command over `runs` rounds, the commands alternating."""
    times = [[] for _ in cmds]
    for _ in range(runs):
        for cmd, t in zip(cmds, times):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def gen_command(sdlite, model, prompt, out):
    """`sdlite gen` of the benchmark, less the backend's name."""
    return [sdlite, "gen", "--model", model, "--prompt", prompt, "--seed", "1", "--out", out, "--backend"]


def print_against(path, ours, other):
    print(f"  {path}: {other:.2f} s   (this build {other / ours:.2f}x as fast)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="tiny-sd")
    ap.add_argument("--sdlite", default=os.path.join(REPO, "target", "release", "sdlite"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--wgpu-kernels", action="store_true", help="software-adapter against GPU kernels on the wgpu backend")
    ap.add_argument("--against", help="another sdlite build to time alongside (software kernels with --wgpu-kernels)")
    args = ap.parse_args()
    m = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, m["out"])
        gen = gen_command(args.sdlite, args.model, m["prompt"], out)
        against = [gen_command(args.against, args.model, m["prompt"], out)] if args.against else []
        if args.wgpu_kernels:
            software = ["wgpu", "--wgpu-kernels", "software"]
            gpu, ours, *other = best_of(args.runs, gen + ["wgpu", "--wgpu-kernels", "gpu"], gen + software, *[a + software for a in against])
            # `sdlite info`'s first line, less the kernel variant its adapter name ends with.
            adapter = subprocess.run([args.sdlite, "info"], capture_output=True, text=True).stdout.splitlines()[0].rsplit(", ", 1)[0]
            print(f"time to first output, sdlite-{args.model}, 25 steps, wgpu backend, {adapter}, best of {args.runs}:")
            print(f"  GPU kernels      {gpu:7.2f} s")
            print(f"  software kernels {ours:7.2f} s   ({gpu / ours:.2f}x the GPU kernels)")
            if other:
                print_against(f"{args.against}, software kernels", ours, other[0])
            return
        ours, *other = best_of(args.runs, gen + ["cpu"], *[a + ["cpu"] for a in against])
        script = SETUP + f"MODEL = {dequantized_copy(os.path.join(REPO, 'models', m['folder']))!r}\nPROMPT = {m['prompt']!r}\n" + m["diffusers"]
        (ref,) = best_of(args.runs, [sys.executable, "-c", script], env=dict(os.environ, OUT=out))
    print(f"time to first output, sdlite-{args.model}, 25 steps, CPU ({os.cpu_count()} cores), best of {args.runs}:")
    print(f"  diffusers (PyTorch) {ref:6.2f} s")
    print(f"  sdlite gen          {ours:6.2f} s   ({ref / ours:.2f}x diffusers)")
    if other:
        print_against(args.against, ours, other[0])


if __name__ == "__main__":
    main()
