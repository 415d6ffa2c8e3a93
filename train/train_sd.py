"""Trains sdlite-tiny-sd: the Stable Diffusion 1.5 architecture (CLIP text encoder, UNet,
KL autoencoder) at a small config, on the procedural scenes of scenes.py, 64x64 pictures.

Two phases, each one command on the GPU machine (docs/tiny-models.md has the commands):
  python train/train_sd.py vae  --out OUT      the autoencoder (reconstruction + KL); with
                                               --decoder-of DIR, DIR's decoder alone
  python train/train_sd.py unet --out OUT --vae DIR   text encoder and UNet together,
                                               then the diffusers folder in OUT/sdlite-tiny-sd
`--quick` shrinks everything to a CPU smoke run. Every random choice is seeded; the loss
curves go to OUT/losses-*.json (train/plot_losses.py draws them).

Training choices, and why:
- epsilon prediction on SD 1.5's scaled-linear schedule, so the pipeline and samplers are
  exactly SD 1.5's; offset noise (0.1) lets it reach the flat, saturated backgrounds that
  schedule otherwise cannot;
- min-SNR-5 loss weights and an EMA of the weights: sharper samples from a short run;
- the caption is dropped 10% of the time, so classifier-free guidance works.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))

import bpe  # noqa: E402
import scenes  # noqa: E402
from training import SEED, SIZE, Budget, Ema, cosine_lr, decoder_parameters, log_loss, outline_l1, render_dataset, save_components, to_unit, update  # noqa: E402


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 48, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def make_text_encoder(vocab):
    from make_goldens import clip_text_config
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config(vocab, hidden=64, intermediate=256, layers=3, heads=4))


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def train_vae(args, device):
    """The whole autoencoder from scratch; or, with --decoder-of, that autoencoder's decoder
    alone with the encoder frozen, so the latent space (and its scaling factor) a trained UNet
    draws in stays as it is."""
    from diffusers import AutoencoderKL

    tune = args.decoder_of is not None
    torch.manual_seed(SEED + 5 if tune else SEED)
    vae = (AutoencoderKL.from_pretrained(args.decoder_of, torch_dtype=torch.float32) if tune else make_vae()).to(device).train()
    params = decoder_parameters(vae) if tune else list(vae.parameters())
    n = 2048 if args.quick else 60000
    # A tuning run draws scenes the first run did not see.
    _, pics = render_dataset(n, SEED + 6 if tune else SEED, device)
    steps, batch = (20, 16) if args.quick else (args.steps or 6000, 128)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(SEED + 7 if tune else SEED)
    history, started, step, budget = [], time.time(), 0, Budget(args.budget_s)
    while step < steps:
        steps = budget.steps(step, steps)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 200, 1e-3)
        x = to_unit(pics[torch.randint(0, n, (batch,), device=device, generator=g)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.set_grad_enabled(not tune):
                post = vae.encode(x).latent_dist
            recon = vae.decode(post.sample(generator=g)).sample
        rec = F.mse_loss(recon.float(), x) + 0.5 * F.l1_loss(recon.float(), x)
        loss = rec if tune else rec + 1e-4 * post.kl().mean() / x[0].numel()
        if args.edge_weight:
            loss = loss + args.edge_weight * outline_l1(recon.float(), x)
        update(opt, loss, params)
        if step % 100 == 0 or step == steps - 1:
            log_loss(history, step, rec.item(), started)
        step += 1
    vae.eval()
    with torch.no_grad():
        x = to_unit(pics[:1024])
        lat = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mode() for i in range(0, len(x), 256)])
        if not tune:
            vae.register_to_config(scaling_factor=float(1 / lat.std()))
        recon = torch.cat([vae.decode(lat[i : i + 256]).sample for i in range(0, len(x), 256)])
        print(f"reconstruction mse {F.mse_loss(recon, x).item():.5f}, latent std {lat.std().item():.4f}")
    vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    with open(os.path.join(args.out, "losses-vae-decoder.json" if tune else "losses-vae.json"), "w") as f:
        json.dump(history, f)


def fit_tokenizer(folder):
    from make_goldens import write_tokenizer

    vocab, merges = bpe.fit(scenes.captions_corpus(20000, SEED))
    return vocab, write_tokenizer(folder, vocab, merges, bpe.EOS)


def train_unet(args, device):
    from diffusers import AutoencoderKL
    from make_goldens import write_sd_pipeline_index

    torch.manual_seed(SEED + 1)
    root = os.path.join(args.out, "sdlite-tiny-sd")
    vocab, tok = fit_tokenizer(os.path.join(root, "tokenizer"))
    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    if args.init:
        # A second run continues the first one's weights (at a lower peak rate).
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        from int8 import dequantized_copy

        init = dequantized_copy(args.init)  # the shipped UNet is stored int8, which from_pretrained cannot read
        te = CLIPTextModel.from_pretrained(os.path.join(init, "text_encoder"), torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(os.path.join(init, "unet"), torch_dtype=torch.float32)
    else:
        te, unet = make_text_encoder(vocab), make_unet()
    te, unet = te.to(device).train(), unet.to(device).train()

    n = 2048 if args.quick else 250000
    caps, pics = render_dataset(n, SEED + 2, device)
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_unit(pics[i : i + 1024])).latent_dist.mode() for i in range(0, n, 1024)])
        lat = (lat * vae.config.scaling_factor).to(torch.bfloat16)
    del pics
    ids = torch.tensor(tok(caps, padding="max_length", max_length=77, truncation=True).input_ids, device=device)
    empty = torch.tensor(tok("", padding="max_length", max_length=77).input_ids, device=device)

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float().to(device)
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=5.0) / snr

    steps, batch = (20, 16) if args.quick else (args.steps or 14000, 1024)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_te = Ema(unet, 0.999), Ema(te, 0.999)
    g = torch.Generator(device=device).manual_seed(SEED + 3)
    history, started, step, budget = [], time.time(), 0, Budget(args.budget_s)
    while step < steps:
        steps = budget.steps(step, steps)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 300, args.lr)
        pick = torch.randint(0, n, (batch,), device=device, generator=g)
        x0 = lat[pick].float()
        tokens = ids[pick]
        drop = torch.rand(batch, device=device, generator=g) < 0.1
        tokens = torch.where(drop[:, None], empty[None], tokens)
        t = torch.randint(0, 1000, (batch,), device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        noise = noise + 0.1 * torch.randn(batch, x0.shape[1], 1, 1, device=device, generator=g)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ctx = te(tokens).last_hidden_state
            pred = unet(xt, t, ctx).sample
        loss = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weight[t]).mean()
        update(opt, loss, params, [(ema_unet, unet), (ema_te, te)])
        if step % 100 == 0 or step == steps - 1:
            log_loss(history, step, loss.item(), started)
        step += 1
    ema_unet.copy_to(unet)
    ema_te.copy_to(te)
    with open(os.path.join(args.out, "losses-unet.json"), "w") as f:
        json.dump(history, f)

    save_components(root, [("text_encoder", te), ("unet", unet), ("vae", vae)])
    write_sd_pipeline_index(root)
    sample_grid(root, device, os.path.join(args.out, "samples-sd.png"), quick=args.quick)


def sample_grid(root, device, path, quick=False):
    """Held-out prompts through the diffusers pipeline: a look before the Rust evaluation."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(root, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    prompts = scenes.held_out_prompts()[: 4 if quick else 32]
    out = pipe(prompts, num_inference_steps=25, guidance_scale=7.5, generator=torch.Generator(device).manual_seed(0), output_type="pil").images
    cols = 8 if len(out) >= 8 else len(out)
    grid = Image.new("RGB", (cols * SIZE, math.ceil(len(out) / cols) * SIZE))
    for i, im in enumerate(out):
        grid.paste(im, ((i % cols) * SIZE, (i // cols) * SIZE))
    grid.save(path)
    with open(path + ".txt", "w") as f:
        f.write("\n".join(prompts) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["vae", "unet"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vae", help="the trained autoencoder folder (phase unet)")
    ap.add_argument("--decoder-of", help="phase vae: tune this autoencoder's decoder, its encoder frozen")
    ap.add_argument(
        "--edge-weight",
        type=float,
        default=0.0,
        help="phase vae: also match the pictures' pixel differences (outlines) at this weight, as an L1 loss",
    )
    ap.add_argument("--steps", type=int)
    ap.add_argument("--init", help="continue from this sdlite-tiny-sd folder (phase unet)")
    ap.add_argument("--lr", type=float, default=8e-4, help="peak learning rate (phase unet)")
    ap.add_argument("--budget-s", type=float, help="cap the training loop's seconds")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.phase == "vae":
        train_vae(args, device)
    else:
        train_unet(args, device)


if __name__ == "__main__":
    main()
