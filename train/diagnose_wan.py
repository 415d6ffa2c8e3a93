"""Finds which part of sdlite-tiny-wan loses a shape: the autoencoder or the DiT.

  python train/diagnose_wan.py roundtrip --model DIR --sdlite BIN --out OUT
      renders 120 (--clips) clips of the training grammar, passes them through the VAE alone
      (encode, decode) and scores the renders and the round trips with `sdlite fidelity
      --image`: what the checker can read back at best, whatever the DiT draws.
  python train/diagnose_wan.py denoise --model DIR --out GRID.png
      noises the true latents of six clips to sigma 1, 0.82, 0.67, 0.5 and 0.25 (the shift-3
      schedule's points) and lets the DiT sample from there (Euler, 20 steps of the whole
      schedule, guidance 5 unless --guidance); the grid's columns are the first frame of the
      render, of the VAE round trip, then of the DiT from each sigma, highest first. Where a
      shape turns into a blob says which noise levels the DiT has not learnt.
"""

import argparse
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))

from train_wan import FRAMES, PROMPT_TOKENS, as_video, text_context  # noqa: E402
from training import SIZE, render_dataset  # noqa: E402

SEED = 79  # not a training seed: these clips were never trained on
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def to_uint8(video):
    """The VAE's (n, 3, frames, h, w) in [-1, 1] to uint8 (n, frames, 3, h, w)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 1, 3, 4)


def roundtrip(args):
    from diffusers import AutoencoderKLWan
    from PIL import Image

    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.model, "vae")).eval()
    os.makedirs(args.out, exist_ok=True)
    caps, clips = render_dataset(args.clips, SEED, "cpu", frames=FRAMES)
    with torch.no_grad():
        recon = torch.cat(
            [to_uint8(vae.decode(vae.encode(as_video(clips[i : i + 20])).latent_dist.mode()).sample) for i in range(0, len(caps), 20)]
        )
    tally = {kind: {s: [0, 0] for s in SHAPES} for kind in ("render", "vae")}
    for i, cap in enumerate(caps):
        shape = next(s for s in SHAPES if s in cap)
        for kind, video in (("render", clips[i]), ("vae", recon[i])):
            path = os.path.join(args.out, f"{i:03}-{kind}.png")
            Image.fromarray(torch.cat(list(video), dim=2).permute(1, 2, 0).numpy()).save(path)
            report = subprocess.run(
                [args.sdlite, "fidelity", "--image", path, "--prompt", cap, "--frames", str(FRAMES)], capture_output=True, text=True, check=True
            ).stdout
            tally[kind][shape][0] += "shape: ok" in report
            tally[kind][shape][1] += 1
    for kind, by_shape in tally.items():
        right, total = sum(v[0] for v in by_shape.values()), sum(v[1] for v in by_shape.values())
        print(f"{kind}: shape read back {right}/{total}; " + ", ".join(f"{s} {v[0]}/{v[1]}" for s, v in by_shape.items()))


def denoise(args):
    from diffusers import WanPipeline
    from PIL import Image

    pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    vae, dit = pipe.vae, pipe.transformer
    mean = torch.tensor(vae.config.latents_mean)[None, :, None, None, None]
    std = torch.tensor(vae.config.latents_std)[None, :, None, None, None]
    rows = 6
    caps, clips = render_dataset(rows, SEED, "cpu", frames=FRAMES)
    enc = pipe.tokenizer(caps + [""], padding="max_length", max_length=PROMPT_TOKENS, return_tensors="pt")
    schedule = torch.linspace(1, 0, 21)
    schedule = 3 * schedule / (1 + 2 * schedule)  # flow shift 3, as the pipeline samples
    with torch.no_grad():
        context = text_context(pipe.text_encoder, enc.input_ids, enc.attention_mask)
        cond, uncond = context[:rows], context[rows:].expand(rows, -1, -1)
        x0 = (vae.encode(as_video(clips)).latent_dist.mode() - mean) / std
        columns = [clips[:, 0], to_uint8(vae.decode(x0 * std + mean).sample)[:, 0]]
        for first in (0, 8, 12, 15, 18):
            sigmas = schedule[first:]
            x = (1 - sigmas[0]) * x0 + sigmas[0] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                t = (s * 1000).expand(rows)
                v_uncond = dit(x, t, uncond).sample
                v = v_uncond + args.guidance * (dit(x, t, cond).sample - v_uncond)
                x = x + (s_next - s) * v
            columns.append(to_uint8(vae.decode(x * std + mean).sample)[:, 0])
    grid = Image.new("RGB", (SIZE * len(columns), SIZE * rows))
    for c, column in enumerate(columns):
        for r in range(rows):
            grid.paste(Image.fromarray(column[r].permute(1, 2, 0).numpy()), (SIZE * c, SIZE * r))
    grid.save(args.out)
    with open(args.out + ".txt", "w") as f:
        f.write("\n".join(caps) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("check", choices=["roundtrip", "denoise"])
    ap.add_argument("--model", default=os.path.join(HERE, "..", "models", "sdlite-tiny-wan"), help="an sdlite-tiny-wan folder")
    ap.add_argument("--out", required=True, help="roundtrip: a folder for the strips; denoise: the grid's PNG path")
    ap.add_argument("--sdlite", default="sdlite", help="roundtrip: the sdlite binary that scores the strips")
    ap.add_argument("--clips", type=int, default=120, help="roundtrip: how many clips")
    ap.add_argument("--guidance", type=float, default=5.0, help="denoise: classifier-free guidance scale (1: none)")
    args = ap.parse_args()
    if args.check == "roundtrip":
        roundtrip(args)
    else:
        denoise(args)


if __name__ == "__main__":
    main()
