"""Finds which part of a built-in model loses a shape: the autoencoder or the denoiser.

  python train/diagnose.py roundtrip --model DIR --sdlite BIN --out OUT
      renders 120 (--count) scenes of the training grammar (pictures for an sdlite-tiny-sd
      folder, clips for an sdlite-tiny-wan one), passes them through the VAE alone (encode,
      decode) and scores the renders and the round trips with `sdlite fidelity --image`: what
      the checker can read back at best, whatever the denoiser draws. Tallied by shape and by
      object size (small; large or unnamed; two or three small ones).
  python train/diagnose.py denoise --model DIR --out GRID.png
      (sdlite-tiny-wan) noises the true latents of six clips to sigma 1, 0.82, 0.67, 0.5 and
      0.25 (the shift-3 schedule's points) and lets the DiT sample from there (Euler, 20 steps
      of the whole schedule, guidance 5 unless --guidance); the grid's columns are the first
      frame of the render, of the VAE round trip, then of the DiT from each sigma, highest
      first. Where a shape turns into a blob says which noise levels the DiT has not learnt.
  python train/diagnose.py attention --model DIR
      (sdlite-tiny-wan) noises the true latents of 8 (--count) clips to sigma 1, 0.6 and 0.3
      and reports, per DiT block, the mean share of cross-attention the tokens give the
      prompt's rows (the rest goes to the zero padding), and how much the DiT's x0 prediction
      moves when the caption's shape word, or its colour word, is swapped (mean pairwise
      distance over the variants: five shapes, eight colours; relative to the prediction's size).
"""

import argparse
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))

import scenes  # noqa: E402
from train_wan import (  # noqa: E402
    BLUR_SIZE,
    FRAMES,
    PROMPT_TOKENS,
    SHAPE_CHANNELS,
    PromptAttention,
    as_video,
    blur_detail,
    blur_window,
    object_mask,
    prompt_rows,
    shape_code_target,
    shape_index,
    text_context,
    with_code,
)
from training import SIZE, render_dataset, to_unit  # noqa: E402

SEED = 79  # not a training seed: these scenes were never trained on


def to_uint8(pixels):
    """A VAE's output in [-1, 1] to uint8: pictures (n, 3, h, w) as they are, clips
    (n, 3, frames, h, w) as (n, frames, 3, h, w), the renders' layout."""
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 1, 3, 4) if pixels.dim() == 5 else pixels


def size_class(caption):
    """Several objects are always small; a single one is small, large, or either when the
    caption names no size."""
    return "two or three" if caption.split()[0] in ("two", "three") else "small" if " small " in f" {caption} " else "large or unsized"


def code_read_back(z, objects):
    """Per clip, the shape whose code lies nearest the mean of the latent's code channels
    over the positions the object covers."""
    codes = shape_code_target(torch.arange(len(scenes.SHAPES)), torch.ones(1, 1, 1, 1, dtype=torch.bool)).flatten(1)
    weights = objects[:, None].float()
    mean = (z[:, -SHAPE_CHANNELS:] * weights).sum(dim=(2, 3, 4)) / weights.sum(dim=(2, 3, 4)).clamp(min=1)
    return torch.cdist(mean, codes).argmin(dim=1)


def roundtrip(args):
    from PIL import Image

    video = os.path.isdir(os.path.join(args.model, "transformer"))
    if video:
        from diffusers import AutoencoderKLWan as Autoencoder
    else:
        from diffusers import AutoencoderKL as Autoencoder
    if args.shape_code and not video:
        raise SystemExit("--shape-code checks a clip autoencoder's shape code: give an sdlite-tiny-wan folder")
    vae = Autoencoder.from_pretrained(os.path.join(args.model, "vae")).eval()
    prepare = as_video if video else to_unit
    os.makedirs(args.out, exist_ok=True)
    caps, renders = render_dataset(args.count or 120, SEED, "cpu", frames=FRAMES if video else 1)
    with torch.no_grad():
        z = torch.cat([vae.encode(prepare(renders[i : i + 20])).latent_dist.mode() for i in range(0, len(caps), 20)])

        def decode(latents):
            return torch.cat([to_uint8(vae.decode(latents[i : i + 20]).sample) for i in range(0, len(latents), 20)])

        kinds = {"render": (renders, caps), "vae": (decode(z), caps)}
        if args.shape_code:
            shapes = torch.tensor([shape_index(c) for c in caps])
            objects = object_mask(renders, vae)
            right = (code_read_back(z, objects) == shapes).sum().item()
            print(f"shape code read back from the encoder's latents: {right}/{len(caps)}")
            true = with_code(z, shape_code_target(shapes, objects))
            kinds["true code"] = (decode(true), caps)
            # Blurred detail stands for a DiT's rounded outlines: the code should then decide.
            blurred = blur_detail(true, torch.ones(len(caps), dtype=torch.bool), args.blur_size)
            kinds["blurred"] = (decode(blurred), caps)
            other = (shapes + 1) % len(scenes.SHAPES)
            coded = with_code(blurred, shape_code_target(other, objects))
            kinds["code swapped"] = (decode(coded), [swapped(c, scenes.SHAPES)[o] for c, o in zip(caps, other.tolist())])
    tally = {kind: {} for kind in kinds}
    for kind, (pixels, captions) in kinds.items():
        for i, cap in enumerate(captions):
            path = os.path.join(args.out, f"{i:03}-{kind.replace(' ', '-')}.png")
            strip = torch.cat(list(pixels[i]), dim=2) if video else pixels[i]
            Image.fromarray(strip.permute(1, 2, 0).numpy()).save(path)
            command = [args.sdlite, "fidelity", "--image", path, "--prompt", cap] + (["--frames", str(FRAMES)] if video else [])
            right = "shape: ok" in subprocess.run(command, capture_output=True, text=True, check=True).stdout
            for key in (scenes.SHAPES[shape_index(cap)], size_class(cap)):
                counts = tally[kind].setdefault(key, [0, 0])
                counts[0] += right
                counts[1] += 1
    for kind, by_key in tally.items():
        right, total = (sum(by_key[s][j] for s in scenes.SHAPES if s in by_key) for j in (0, 1))
        print(f"{kind}: shape read back {right}/{total}; " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in by_key.items()))


def wan_scenes(model, rows):
    """The sdlite-tiny-wan pipeline of `model`, and `rows` unseen clips: their captions,
    renders and normalised true latents (what the DiT is trained to draw)."""
    from diffusers import WanPipeline
    from int8 import dequantized_copy

    # The shipped DiT is stored int8, which from_pretrained cannot read.
    pipe = WanPipeline.from_pretrained(dequantized_copy(model), torch_dtype=torch.float32)
    vae = pipe.vae
    caps, clips = render_dataset(rows, SEED, "cpu", frames=FRAMES)
    mean = torch.tensor(vae.config.latents_mean)[None, :, None, None, None]
    std = torch.tensor(vae.config.latents_std)[None, :, None, None, None]
    with torch.no_grad():
        x0 = (vae.encode(as_video(clips)).latent_dist.mode() - mean) / std
    return pipe, caps, clips, x0, (mean, std)


def context_of(pipe, caps):
    """The DiT's context for captions, and which of its rows hold each prompt."""
    enc = pipe.tokenizer(caps, padding="max_length", max_length=PROMPT_TOKENS, return_tensors="pt")
    with torch.no_grad():
        return text_context(pipe.text_encoder, enc.input_ids, enc.attention_mask), prompt_rows(enc.attention_mask)


def swapped(caption, words):
    """The caption with its first word from `words` replaced by each of them in turn (the
    object's shape, or its colour: the background's comes later)."""
    old = next(w for w in caption.split() if w in words)
    return [caption.replace(old, new, 1) for new in words]


def relative_spread(preds):
    """Mean pairwise distance between predictions, each relative to the first of the pair."""
    pairs = [(a, b) for i, a in enumerate(preds) for b in preds[:i]]
    return sum(((a - b).norm() / a.norm()).item() for a, b in pairs) / len(pairs)


def attention(args):
    pipe, caps, _, x0, _ = wan_scenes(args.model, args.count or 8)
    dit = pipe.transformer
    context, rows = context_of(pipe, caps)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    variants = {"shape": scenes.SHAPES, "colour": list(scenes.COLOURS)}
    print("sigma | prompt share, blocks 0.. | x0 spread over " + ", ".join(f"{what} words" for what in variants))
    for sigma in (1.0, 0.6, 0.3):
        xt = (1 - sigma) * x0 + sigma * noise
        t = torch.full((len(caps),), sigma * 1000)
        with torch.no_grad(), PromptAttention(dit, rows) as shares:
            dit(xt, t, context)
        spreads = []
        for words in variants.values():
            per_clip = []
            for i, cap in enumerate(caps):
                ctx, _ = context_of(pipe, swapped(cap, words))
                with torch.no_grad():
                    v = dit(xt[i : i + 1].expand(len(words), -1, -1, -1, -1), t[:1].expand(len(words)), ctx).sample
                per_clip.append(relative_spread(list(xt[i : i + 1] - sigma * v)))
            spreads.append(sum(per_clip) / len(per_clip))
        blocks = " ".join(f"{s.exp().mean().item():.3f}" for s in shares)
        print(f"{sigma:.1f} | {blocks} | " + ", ".join(f"{s:.3f}" for s in spreads), flush=True)


def denoise(args):
    from PIL import Image

    rows = 6
    pipe, caps, clips, x0, (mean, std) = wan_scenes(args.model, rows)
    vae, dit = pipe.vae, pipe.transformer
    schedule = torch.linspace(1, 0, 21)
    schedule = 3 * schedule / (1 + 2 * schedule)  # flow shift 3, as the pipeline samples
    context, _ = context_of(pipe, caps + [""])
    cond, uncond = context[:rows], context[rows:].expand(rows, -1, -1)
    with torch.no_grad():
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
    ap.add_argument("check", choices=["roundtrip", "denoise", "attention"])
    ap.add_argument("--model", default=os.path.join(HERE, "..", "models", "sdlite-tiny-wan"), help="a built-in model's folder")
    ap.add_argument("--out", help="roundtrip: a folder for the strips; denoise: the grid's PNG path")
    ap.add_argument("--sdlite", default="sdlite", help="roundtrip: the sdlite binary that scores the strips")
    ap.add_argument("--count", type=int, help="how many scenes (roundtrip: 120, attention: 8)")
    ap.add_argument(
        "--blur-size",
        type=blur_window,
        default=BLUR_SIZE,
        help="roundtrip --shape-code: the blur's window in latent pixels (as the autoencoder was trained with)",
    )
    ap.add_argument(
        "--shape-code",
        action="store_true",
        help="roundtrip: the clip autoencoder was trained with train_wan.py --shape-code; also read its code back, and score decodes with the true code (as the DiT learns them), with it and blurred detail, and with blurred detail and another shape's code",
    )
    ap.add_argument("--guidance", type=float, default=5.0, help="denoise: classifier-free guidance scale (1: none)")
    args = ap.parse_args()
    if args.check != "attention" and not args.out:
        ap.error(f"{args.check} writes files: give --out")
    {"roundtrip": roundtrip, "denoise": denoise, "attention": attention}[args.check](args)


if __name__ == "__main__":
    main()
