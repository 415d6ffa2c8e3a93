"""The full-size architectures (real configs, seeded random weights) and their reference
outputs, for a one-off comparison on a GPU machine: SD 1.5's CLIP text encoder, UNet and VAE
decoder; Wan2.1-T2V-1.3B's DiT and VAE decoder. Weights are stored as f16 (SD) / bf16 (Wan)
in the diffusers layout; references are computed in float32 on CUDA with TF32 off, from the
stored weights.

Usage: python tests/reference/full_size.py OUT_DIR
Then:  SDLITE_FULL_SIZE=OUT_DIR <models test binary> --ignored full_size
"""

import os
import sys
import time

import make_goldens
from full_configs import wan13b_dit
import torch
from safetensors.torch import save_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_grad_enabled(False)
DEV = "cuda"


def save_component(model, folder, dtype):
    return make_goldens.save_component(model, folder, dtype).to(DEV)


def timed(name, fn):
    fn()
    torch.cuda.synchronize()
    start = time.time()
    out = fn()
    torch.cuda.synchronize()
    print(f"{name}: diffusers {time.time() - start:.3f} s (float32)", flush=True)
    return out


def sd(out, goldens, g):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = os.path.join(out, "sd15")
    torch.manual_seed(1)
    te = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768))
    te = save_component(te, os.path.join(root, "text_encoder"), torch.float16)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    goldens["sd_text_ids"] = ids.float()
    goldens["sd_text_hidden"] = timed("clip text", lambda: te(ids.to(DEV)).last_hidden_state)
    del te

    torch.manual_seed(2)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    unet = save_component(unet, os.path.join(root, "unet"), torch.float16)
    x = torch.randn((2, 4, 64, 64), generator=g)
    goldens["sd_unet_latent"] = x
    ctx = goldens["sd_text_hidden"]
    goldens["sd_unet_out"] = timed("sd unet 64x64 batch 2", lambda: unet(x.to(DEV), torch.tensor([981.0, 981.0], device=DEV), ctx).sample)
    del unet

    torch.manual_seed(3)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    vae = save_component(vae, os.path.join(root, "vae"), torch.float16)
    z = torch.randn((1, 4, 64, 64), generator=g)
    goldens["sd_vae_latent"] = z
    goldens["sd_vae_decoded"] = timed("sd vae decode 512", lambda: vae.decode(z.to(DEV)).sample)


def wan(out, goldens, g):
    from diffusers import AutoencoderKLWan

    root = os.path.join(out, "wan")
    torch.manual_seed(4)
    dit = wan13b_dit()
    dit = save_component(dit, os.path.join(root, "transformer"), torch.bfloat16)
    x = torch.randn((1, 16, 5, 30, 52), generator=g)
    ctx = torch.randn((1, 512, 4096), generator=g) * 0.1
    goldens["wan_dit_latent"] = x
    goldens["wan_dit_context"] = ctx
    goldens["wan_dit_out"] = timed(
        "wan dit 1950 tokens", lambda: dit(x.to(DEV), torch.tensor([500.0], device=DEV), ctx.to(DEV)).sample
    )
    del dit

    torch.manual_seed(5)
    vae = save_component(AutoencoderKLWan(), os.path.join(root, "vae"), torch.bfloat16)
    z = torch.randn((1, 16, 3, 30, 52), generator=g)
    goldens["wan_vae_latent"] = z
    goldens["wan_vae_decoded"] = timed("wan vae decode 9x240x416", lambda: vae.decode(z.to(DEV)).sample)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    goldens = {}
    sd(out, goldens, g)
    wan(out, goldens, g)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in goldens.items()}, os.path.join(out, "goldens.safetensors"))


if __name__ == "__main__":
    main()
