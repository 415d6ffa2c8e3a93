"""Goldens of the built-in models (models/sdlite-tiny-sd, models/sdlite-tiny-wan): the
diffusers pipelines in float32 on the CPU, from fixed starting latents, so the Rust
pipelines can be checked against the reference on the trained weights as shipped
(tests/builtin_models.rs). The shipped folders' int8 files are read dequantized as the
runtime reads them (train/int8.py).

Usage: python tests/reference/builtin_goldens.py    writes tests/data/builtin-goldens.safetensors
"""

import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..")
sys.path.insert(0, os.path.join(REPO, "train"))
from int8 import dequantized_copy  # noqa: E402
SD_PROMPT = "a red star on a yellow background"
WAN_PROMPT = "a red circle on a blue background, moving right"
WAN_FRAMES_KEPT = [0, 16]  # the first frame's own path and the last causal chunk


def sd_goldens(g):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        dequantized_copy(os.path.join(REPO, "models", "sdlite-tiny-sd")), torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    init = torch.randn((1, 4, 16, 16), generator=g)
    latent = pipe(SD_PROMPT, negative_prompt="", num_inference_steps=4, guidance_scale=7.5, latents=init.clone(), output_type="latent").images
    image = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
    return {"sd_init_latent": init, "sd_latent": latent, "sd_image": image}


def wan_goldens(g):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(dequantized_copy(os.path.join(REPO, "models", "sdlite-tiny-wan")), torch_dtype=torch.float32)
    init = torch.randn((1, 8, 5, 16, 16), generator=g)
    latent = pipe(
        WAN_PROMPT, negative_prompt="", height=64, width=64, num_frames=17, num_inference_steps=3, guidance_scale=5.0, latents=init.clone(), output_type="latent"
    ).frames
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    video = vae.decode(latent * std + mean).sample
    return {"wan_init_latent": init, "wan_latent": latent, "wan_frames": video[:, :, WAN_FRAMES_KEPT]}


def main():
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(2026)
    out = {**sd_goldens(g), **wan_goldens(g)}
    save_file({k: v.contiguous().float() for k, v in out.items()}, os.path.join(REPO, "tests", "data", "builtin-goldens.safetensors"))


if __name__ == "__main__":
    main()
