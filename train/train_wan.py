"""Trains sdlite-tiny-wan: the Wan2.1 text-to-video architecture (UMT5 text encoder, DiT,
causal 3D VAE) at a small config, on the moving-shape clips of scenes.py, 17 frames of 64x64.

Two phases, each one command on the GPU machine (docs/tiny-models.md has the commands):
  python train/train_wan.py vae --out OUT              the causal autoencoder
  python train/train_wan.py vae --out OUT2 --decoder-of OUT/vae   its decoder, on 17 frames
  python train/train_wan.py dit --out OUT --vae DIR    tokenizer, text encoder and DiT, then
                                                       the diffusers folder in OUT/sdlite-tiny-wan
`--quick` shrinks everything to a CPU smoke run. Every random choice is seeded; the loss
curves go to OUT/losses-wan-*.json (train/plot_losses.py draws them).

Training choices, and why:
- the VAE compresses 4x in space (three levels, not Wan's four: a 64x64 frame keeps a 16x16
  latent, where a shape still has an outline) and 4x in time, like Wan's; by default it
  learns on 9-frame clips at half the cost, which the shipped VAE did and which left its
  decoder unable to decode past frame 10 until tuned on 17 (`--decoder-of`); from scratch,
  pass `--frames 17`;
- the DiT learns Wan's flow matching (velocity noise - x0 at sigma = t / 1000) on uniform
  sigmas (`--logit-normal`: SD3's logit-normal ones); sampling uses the release's UniPC with
  shift 3;
- the text encoder sees the prompt's tokens only and its output is zero past the prompt and
  padded to 512 rows, exactly what the pipeline feeds the DiT;
- the caption is dropped (empty prompt) 10% of the time, so classifier-free guidance works;
  an EMA of the weights is what is saved.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))

import scenes  # noqa: E402
from training import SEED, SIZE, Budget, Ema, cosine_lr, decoder_parameters, log_loss, outline_l1, render_dataset, save_components, to_unit, update  # noqa: E402

FRAMES = 17
VAE_FRAMES = 9
Z_DIM = 8
TEXT_LEN = 512  # the pipeline's text length
PROMPT_TOKENS = 32  # every caption of the grammar fits (checked)
VOCAB_MAX = 256  # an upper bound: the fitted vocabulary stops at what the grammar needs
SHAPE_CHANNELS = 2  # the latent channels --shape-code gives over to the object's shape
SHAPE_CODE_RADIUS = 3.0  # about twice the shipped latents' spread (std 0.9-2.9 a channel)
BLUR_SIZE = 3  # blur_detail's window, latent pixels, unless --blur-size says otherwise


def make_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=16,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * Z_DIM,
        latents_std=[1.0] * Z_DIM,
        scale_factor_spatial=4,  # what the pipeline sizes latents by; three levels halve twice
    )


def with_new_decoder(folder, base_dim):
    """The autoencoder in `folder` with a fresh decoder of base width `base_dim`; the encoder
    side is kept, so the latents, their statistics and a DiT trained on them stay valid."""
    from diffusers import AutoencoderKLWan

    old = AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32)
    new = AutoencoderKLWan.from_config({**old.config, "decoder_base_dim": base_dim})
    kept = {k: v for k, v in old.state_dict().items() if not k.startswith("decoder.")}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    if unexpected or not all(k.startswith("decoder.") for k in missing):
        raise SystemExit(f"{folder}: the encoder side does not fit the new autoencoder (unexpected {unexpected}, missing {missing})")
    return new


def make_transformer(heads=4, head_dim=32):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=64,
        freq_dim=64,
        ffn_dim=4 * heads * head_dim,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def make_text_encoder(vocab_size):
    from make_goldens import umt5_config
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel(umt5_config(vocab_size, d_model=64, d_kv=16, d_ff=256, layers=3, heads=4))


def as_video(clips):
    """uint8 (n, frames, 3, h, w) to the VAE's float (n, 3, frames, h, w) in [-1, 1]."""
    return to_unit(clips).permute(0, 2, 1, 3, 4)


def train_vae(args, device):
    """The whole autoencoder on 9-frame clips (from scratch, or continuing --init, whose
    latent statistics are then measured anew); or, with --decoder-of, that autoencoder's
    decoder alone (or a fresh one, --decoder-base-dim) on full-length clips with the encoder
    frozen, so the latent space (and the statistics a trained DiT normalises with) stays as
    it is."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(SEED + 10)
    tune = args.decoder_of is not None
    start = args.decoder_of or args.init
    if args.decoder_base_dim:
        vae = with_new_decoder(start, args.decoder_base_dim)
    elif start:
        vae = AutoencoderKLWan.from_pretrained(start, torch_dtype=torch.float32)
    else:
        vae = make_vae()
    vae = vae.to(device).train()
    params = decoder_parameters(vae) if tune else list(vae.parameters())
    frames = FRAMES if tune else args.frames
    n = 256 if args.quick else 16000 * VAE_FRAMES // frames
    caps, clips = render_dataset(n, SEED + 11, device, frames=frames)
    steps, batch = (10, 4) if args.quick else (args.steps or 6000, args.batch or 48 * VAE_FRAMES // frames)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(SEED + 12)
    history, started, step, budget = [], time.time(), 0, Budget(args.budget_s)
    while step < steps:
        steps = budget.steps(step, steps)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 200, 1e-3)
        pick = torch.randint(0, n, (batch,), device=device, generator=g)
        x = as_video(clips[pick])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.set_grad_enabled(not tune):
                post = vae.encode(x).latent_dist
            z = post.sample(generator=g)
            if args.shape_code:
                # The decoder always learns from the true code; the encoder learns to write it.
                code = true_code([caps[i] for i in pick.tolist()], object_mask(clips[pick], vae))
                z = with_code(z, code)
            if args.blur_detail:
                z = blur_detail(z, torch.rand(batch, device=device, generator=g) < args.blur_detail, args.blur_size)
            recon = vae.decode(z).sample
        rec = F.mse_loss(recon.float(), x) + 0.5 * F.l1_loss(recon.float(), x)
        loss = rec if tune else rec + 1e-4 * post.kl().mean() / x[0].numel()
        if args.edge_weight:
            loss = loss + args.edge_weight * outline_l1(recon.float(), x)
        figures = {}
        if args.shape_code:
            figures["shape_code"] = F.mse_loss(post.mean[:, -SHAPE_CHANNELS:].float(), code)
            loss = loss + args.shape_code * figures["shape_code"]
        update(opt, loss, params)
        if step % 100 == 0 or step == steps - 1:
            log_loss(history, step, rec.item(), started, **{name: value.item() for name, value in figures.items()})
        step += 1
    vae.eval()
    # The latent statistics the pipeline normalises with, from full-length clips.
    caps, clips = render_dataset(64 if args.quick else 512, SEED + 13, device, frames=FRAMES)
    with torch.no_grad():
        x = as_video(clips)
        lat = torch.cat([vae.encode(x[i : i + 64]).latent_dist.mode() for i in range(0, len(x), 64)])
        if args.shape_code:
            lat = with_code(lat, true_code(caps, object_mask(clips, vae)))
        mean, std = lat.mean(dim=(0, 2, 3, 4)), lat.std(dim=(0, 2, 3, 4))
        if not tune:
            vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        recon = torch.cat([vae.decode(lat[i : i + 64]).sample for i in range(0, len(x), 64)])
        per_frame = ((recon - x) ** 2).mean(dim=(0, 1, 3, 4))
        print(f"17-frame reconstruction mse {per_frame.mean().item():.5f}, by frame {[round(e, 4) for e in per_frame.tolist()]}")
        print(f"latent mean {mean.tolist()} std {std.tolist()}")
    vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    with open(os.path.join(args.out, "losses-wan-decoder.json" if tune else "losses-wan-vae.json"), "w") as f:
        json.dump(history, f)


def shape_index(caption):
    """The index in scenes.SHAPES of the shape a caption names."""
    return next(i for i, s in enumerate(scenes.SHAPES) if s in caption)


def shape_code_target(shapes, objects):
    """What --shape-code asks of the last SHAPE_CHANNELS latent channels: at the positions an
    object covers (`objects`, object_mask's), its shape's point on a circle of radius
    SHAPE_CODE_RADIUS (one point per shape, evenly spread); zero elsewhere. The shape then
    lies in the latent the way a colour does, constant over the object, which a DiT learns
    from the prompt with ease; its outline is a few latent pixels' detail, which it does not."""
    angle = 2 * math.pi * shapes.float() / len(scenes.SHAPES)
    code = SHAPE_CODE_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    return code[:, :, None, None, None] * objects[:, None].float()


def true_code(captions, objects):
    """The code channels the scenes call for: each caption's shape over the latent positions
    its clip's object covers (`objects`, object_mask's). The generator knows every scene, so the decoder and
    the DiT learn from these rather than from what the encoder makes of the pixels."""
    shapes = torch.tensor([shape_index(c) for c in captions], device=objects.device)
    return shape_code_target(shapes, objects)


def with_code(z, code):
    """Latents with their last SHAPE_CHANNELS channels replaced by `code`."""
    return torch.cat([z[:, :-SHAPE_CHANNELS], code.to(z.dtype)], dim=1)


def shape_weights(text):
    """--shape-weight's value, "star=3,cross=2": how many times as often as the others each
    named shape's clips are drawn."""
    weights = {}
    for item in text.split(","):
        shape, _, value = item.partition("=")
        if shape not in scenes.SHAPES:
            raise argparse.ArgumentTypeError(f"{shape!r} is not a shape of the grammar ({', '.join(scenes.SHAPES)})")
        if shape in weights:
            raise argparse.ArgumentTypeError(f"{shape!r} is given twice")
        try:
            weights[shape] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight after '=' must be a number") from None
        if not (0 < weights[shape] < math.inf):
            raise argparse.ArgumentTypeError(f"{item!r}: a weight must be a positive finite number")
    return weights


def blur_window(text):
    """--blur-size's argparse type: blur_detail's window needs a centre, so an odd size, checked
    before any clip is rendered."""
    size = int(text)
    if size < 1 or size % 2 == 0:
        raise argparse.ArgumentTypeError(f"{text}: the window needs a centre, give an odd size")
    return size


def blur_detail(z, which, size):
    """Latents with their detail channels (all but the shape code's) blurred over size x size
    positions in the clips `which` selects: decoding those, the decoder learns to draw the
    outline from the code when the detail is rounded, as a DiT's is."""
    detail = z[:, :-SHAPE_CHANNELS]
    n, c, t, h, w = detail.shape
    frames = detail.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    blurred = F.avg_pool2d(frames, size, stride=1, padding=size // 2, count_include_pad=False).view(n, t, c, h, w).permute(0, 2, 1, 3, 4)
    detail = torch.where(which[:, None, None, None, None], blurred, detail)
    return torch.cat([detail, z[:, -SHAPE_CHANNELS:]], dim=1)


def object_mask(clips, vae):
    """Which latent positions of `vae` an object covers: (n, latent frames, h / space, w /
    space) bools for uint8 clips (n, frames, 3, h, w), space and time being the VAE's scale
    factors. A position is set when any pixel of its space x space block, in any frame it
    encodes (the first frame alone, then `time` at a time, as the causal VAE groups them), is
    far from the background, the median of the first frame's top row."""
    space, time = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    background = clips[:, 0, :, 0, :].float().median(dim=-1).values
    far = (clips.float() - background[:, None, :, None, None]).abs().amax(dim=2) > 24
    n, frames, h, w = far.shape
    blocks = F.max_pool2d(far.float().view(n * frames, 1, h, w), space).view(n, frames, h // space, w // space)
    later = blocks[:, 1:].view(n, (frames - 1) // time, time, h // space, w // space).amax(dim=2)
    return torch.cat([blocks[:, :1], later], dim=1) > 0


def encode_clips(vae, n, seed, device, chunk=512, shape_code=False):
    """Captions, normalised VAE latents (n, z, 5, 16, 16) and object masks (n, 5, 16, 16) of
    n training clips, rendered and encoded a chunk at a time (the pixels of all of them would
    not fit)."""
    mean = torch.tensor(vae.config.latents_mean, device=device)[None, :, None, None, None]
    std = torch.tensor(vae.config.latents_std, device=device)[None, :, None, None, None]
    caps, lats, masks = [], [], []
    for start in range(0, n, chunk):
        c, clips = render_dataset(min(chunk, n - start), seed + start, device, frames=FRAMES)
        with torch.no_grad():
            x = as_video(clips)
            z = torch.cat([vae.encode(x[i : i + 128]).latent_dist.mode() for i in range(0, len(x), 128)])
        objects = object_mask(clips, vae)
        if shape_code:
            z = with_code(z, true_code(c, objects))
        caps += c
        lats.append(((z - mean) / std).to(torch.bfloat16))
        masks.append(objects)
    return caps, torch.cat(lats), torch.cat(masks)


def tokenizer_corpus():
    """Captions, then the same captions with their words shuffled. The unigram trainer seeds
    its pieces from repeated substrings, and in a grammar this regular a word always sits in
    the same longer phrase, so without the shuffled copies few words become pieces."""
    caps = scenes.captions_corpus(20000, SEED)
    rng = random.Random(SEED)
    shuffled = []
    for c in caps:
        words = c.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    return caps + shuffled


def text_context(te, ids, mask):
    """The DiT's context as the pipeline builds it: encoder states, zero past each prompt,
    padded to TEXT_LEN rows."""
    hidden = te(ids, attention_mask=mask).last_hidden_state * mask[:, :, None]
    return F.pad(hidden, (0, 0, 0, TEXT_LEN - ids.shape[1]))


def prompt_rows(mask):
    """Which of the TEXT_LEN context rows hold the prompt (the rest are the zero padding)."""
    return F.pad(mask, (0, TEXT_LEN - mask.shape[1])).bool()


class PromptAttention:
    """Records how much of its cross-attention each DiT token gives the prompt. The pipeline
    pads the context with zero rows to TEXT_LEN; after the text embedder they are ~500 copies
    of one "null" key and value, which take the attention unless the prompt's dozen keys
    score about log(500 / 12) = 3.7 above it. Used as `with PromptAttention(dit, rows) as
    shares:` (rows: prompt_rows of the batch); each forward pass inside appends, per block,
    the log of the share on the prompt's rows, (batch, heads, tokens), recomputed from the
    block's own projections so the attention itself is diffusers' untouched."""

    def __init__(self, dit, rows):
        self.dit, self.rows, self.shares, self.hooks = dit, rows, [], []

    def __enter__(self):
        self.hooks = [block.attn2.register_forward_hook(self.record) for block in self.dit.blocks]
        return self.shares

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def record(self, attn, args, output):
        tokens, context = args[0], args[1]
        query = attn.norm_q(attn.to_q(tokens)).unflatten(2, (attn.heads, -1)).float()
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1)).float()
        logits = torch.einsum("bnhd,bmhd->bhnm", query, key) / query.shape[-1] ** 0.5
        on_prompt = logits.masked_fill(~self.rows[:, None, None, :], float("-inf"))
        self.shares.append(on_prompt.logsumexp(-1) - logits.logsumexp(-1))


def deepen(dit, depth):
    """Gives a trained DiT `depth` blocks: after each block, copies of it whose output
    projections (self-attention, cross-attention, feed-forward) are zero. Each copy starts
    as the identity, so the deeper DiT computes what the trained one did, and from the
    trained block's attention rather than from noise."""
    import copy

    trained = list(dit.blocks)
    if depth % len(trained):
        raise SystemExit(f"--depth {depth} is not a multiple of the DiT's {len(trained)} blocks")
    blocks = []
    for block in trained:
        blocks.append(block)
        for _ in range(depth // len(trained) - 1):
            twin = copy.deepcopy(block)
            for out in (twin.attn1.to_out[0], twin.attn2.to_out[0], [m for m in twin.ffn.modules() if isinstance(m, torch.nn.Linear)][-1]):
                torch.nn.init.zeros_(out.weight)
                torch.nn.init.zeros_(out.bias)
            blocks.append(twin)
    dit.blocks = torch.nn.ModuleList(blocks)
    dit.register_to_config(num_layers=depth)


def train_dit(args, device):
    from diffusers import AutoencoderKLWan
    from make_goldens import fit_sentencepiece, write_wan_pipeline_index

    torch.manual_seed(SEED + 20)
    root = os.path.join(args.out, "sdlite-tiny-wan")
    tok = fit_sentencepiece(os.path.join(root, "tokenizer"), tokenizer_corpus(), VOCAB_MAX, normalization="identity")
    vae = AutoencoderKLWan.from_pretrained(args.vae).to(device).eval()
    if args.init:
        # A second run continues the first one's weights (at a lower peak rate).
        from diffusers import WanTransformer3DModel
        from transformers import UMT5EncoderModel

        from int8 import dequantized_copy

        init = dequantized_copy(args.init)  # the shipped DiT is stored int8, which from_pretrained cannot read
        te = UMT5EncoderModel.from_pretrained(os.path.join(init, "text_encoder"), torch_dtype=torch.float32)
        dit = WanTransformer3DModel.from_pretrained(os.path.join(init, "transformer"), torch_dtype=torch.float32)
        if args.depth:
            deepen(dit, args.depth)
    else:
        shape = {name: value for name, value in (("heads", args.heads), ("head_dim", args.head_dim)) if value}
        te, dit = make_text_encoder(len(tok)), make_transformer(**shape)
    te, dit = te.to(device).train(), dit.to(device).train()
    # The compiled forward shares dit's parameters: the optimiser, the EMA and the save see one model.
    forward = torch.compile(dit) if args.compile else dit

    n = 256 if args.quick else args.clips or 40000
    caps, lat, objects = encode_clips(vae, n, SEED + 21 + 1000 * args.run, device, shape_code=bool(args.shape_code))
    if args.clips:
        with open(os.path.join(args.out, "captions.txt"), "w") as f:
            f.write("\n".join(caps) + "\n")
    enc = tok(caps, padding="max_length", max_length=PROMPT_TOKENS, truncation=True, return_tensors="pt")
    if enc.attention_mask[:, -1].any():
        raise SystemExit(f"a caption is longer than {PROMPT_TOKENS} tokens")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    empty = tok("", padding="max_length", max_length=PROMPT_TOKENS, return_tensors="pt")
    empty_ids, empty_mask = empty.input_ids.to(device), empty.attention_mask.to(device)

    clip_weight = None
    if args.shape_weight:
        by_shape = [args.shape_weight.get(shape, 1.0) for shape in scenes.SHAPES]
        clip_weight = torch.tensor([by_shape[shape_index(c)] for c in caps], device=device)

    steps, batch = (10, 8) if args.quick else (args.steps or 20000, args.batch or 256)
    params = list(dit.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_dit, ema_te = Ema(dit, 0.999), Ema(te, 0.999)
    g = torch.Generator(device=device).manual_seed(SEED + 22 + 1000 * args.run)

    def flow_loss(count, frames, measure_attention):
        """Flow-matching loss on `count` random training latents cut to their first
        `frames` latent frames, and (with `measure_attention`) the cross-attention's
        shortfall and share on the prompt."""
        if clip_weight is None:
            pick = torch.randint(0, n, (count,), device=device, generator=g)
        else:
            pick = torch.multinomial(clip_weight, count, replacement=True, generator=g)
        x0 = lat[pick, :, :frames].float()
        drop = (torch.rand(count, device=device, generator=g) < 0.1)[:, None]
        b_ids = torch.where(drop, empty_ids, ids[pick])
        b_mask = torch.where(drop, empty_mask, mask[pick])
        if args.logit_normal:
            # SD3's logit-normal sigmas: fewer near 0 and 1, more where an outline is decided.
            sigma = torch.sigmoid(torch.randn(count, device=device, generator=g))
        else:
            sigma = torch.rand(count, device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        s = sigma[:, None, None, None, None]
        xt = (1 - s) * x0 + s * noise
        probe = PromptAttention(dit, prompt_rows(b_mask)) if measure_attention else contextlib.nullcontext([])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), probe as shares:
            pred = forward(xt, sigma * 1000, text_context(te, b_ids, b_mask)).sample
        err = (pred.float() - (noise - x0)) ** 2
        if args.object_weight:
            weight = 1 + args.object_weight * objects[pick, None, :frames].float()
            loss = (err * weight).mean() / weight.mean()
        else:
            loss = err.mean()
        captioned = (~drop[:, 0]).float()

        def over_captioned(per_clip):
            # Captions dropped for guidance have nothing to attend to: they do not count.
            return (per_clip * captioned).sum() / captioned.sum()

        shortfall = [over_captioned(F.relu(math.log(0.5) - log_share).mean(dim=(1, 2))) for log_share in shares]
        share = [over_captioned(log_share.exp().mean(dim=(1, 2))) for log_share in shares]
        return loss, sum(shortfall) / max(len(shortfall), 1), share

    history, started, step, budget = [], time.time(), 0, Budget(args.budget_s)
    while step < steps:
        steps = budget.steps(step, steps)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 300, args.lr)
        clip_loss, shortfall, share = flow_loss(batch, lat.shape[2], bool(args.prompt_attention))
        loss = clip_loss + args.prompt_attention * shortfall
        if args.images:
            loss = loss + flow_loss(args.images, 1, False)[0]
        update(opt, loss, params, [(ema_dit, dit), (ema_te, te)])
        if step % 100 == 0 or step == steps - 1:
            log_loss(history, step, clip_loss.item(), started, **{f"prompt_share_{i}": s.item() for i, s in enumerate(share)})
        step += 1
    ema_dit.copy_to(dit)
    ema_te.copy_to(te)
    with open(os.path.join(args.out, "losses-wan-dit.json"), "w") as f:
        json.dump(history, f)

    save_components(root, [("text_encoder", te), ("transformer", dit), ("vae", vae)])
    write_wan_pipeline_index(root)
    with open(os.path.join(root, "model_index.json")) as f:
        index = json.load(f)
    index["_sdlite_defaults"] = {"width": SIZE, "height": SIZE, "frames": FRAMES}
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    sample_strips(root, device, os.path.join(args.out, "samples-wan.png"), quick=args.quick)


def sample_strips(root, device, path, quick=False):
    """Held-out prompts through the diffusers pipeline, every other frame side by side: a look
    before the Rust evaluation."""
    from diffusers import WanPipeline
    from PIL import Image

    pipe = WanPipeline.from_pretrained(root, torch_dtype=torch.float32).to(device)
    prompts = scenes.held_out_prompts(video=True)[: 2 if quick else 12]
    shown = list(range(0, FRAMES, 2))
    grid = Image.new("RGB", (len(shown) * SIZE, len(prompts) * SIZE))
    for row, prompt in enumerate(prompts):
        frames = pipe(
            prompt,
            height=SIZE,
            width=SIZE,
            num_frames=FRAMES,
            num_inference_steps=25,
            guidance_scale=5.0,
            generator=torch.Generator(device).manual_seed(row),
            output_type="np",
        ).frames[0]
        for col, f in enumerate(shown):
            grid.paste(Image.fromarray((frames[f] * 255).round().astype("uint8")), (col * SIZE, row * SIZE))
    grid.save(path)
    with open(path + ".txt", "w") as f:
        f.write("\n".join(prompts) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["vae", "dit"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vae", help="the trained autoencoder folder (phase dit)")
    ap.add_argument("--decoder-of", help="phase vae: tune this autoencoder's decoder on full-length clips")
    ap.add_argument("--steps", type=int)
    ap.add_argument(
        "--init",
        help="continue from this sdlite-tiny-wan folder (phase dit), or this autoencoder folder, encoder included (phase vae)",
    )
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (phase dit)")
    ap.add_argument("--budget-s", type=float, help="cap the training loop's seconds")
    ap.add_argument("--batch", type=int, help="clips per step (default: 256 for the DiT; 432 frames' worth for the VAE)")
    ap.add_argument(
        "--decoder-base-dim",
        type=int,
        help="phase vae with --decoder-of: train a fresh decoder of this base width (the shipped one's is 16) instead of tuning the old one",
    )
    ap.add_argument("--frames", type=int, default=VAE_FRAMES, help="phase vae: clip length the whole autoencoder learns on (1 + 4k)")
    ap.add_argument(
        "--edge-weight",
        type=float,
        default=0.0,
        help="phase vae: also match the clips' pixel differences (outlines) at this weight, as an L1 loss",
    )
    ap.add_argument(
        "--shape-code",
        type=float,
        default=0.0,
        help="phase vae, encoder trained: the last latent channels hold a code of the object's shape over the object, zero elsewhere (shape_code_target); the decoder learns from the true code, the encoder learns to write it at this weight. Phase dit: any non-zero value says the --vae was trained so, and the DiT learns from the true code",
    )
    ap.add_argument(
        "--blur-detail",
        type=float,
        default=0.0,
        help="phase vae: decode this fraction of clips from latents whose detail channels are blurred (blur_detail), so the decoder draws outlines from the shape code",
    )
    ap.add_argument("--blur-size", type=blur_window, default=BLUR_SIZE, help="phase vae: --blur-detail's window in latent pixels (odd)")
    ap.add_argument(
        "--images",
        type=int,
        default=0,
        help="phase dit: also learn this many pictures a step, the first frames of training clips (one latent frame each)",
    )
    ap.add_argument(
        "--object-weight",
        type=float,
        default=0.0,
        help="phase dit: weigh the loss at latent positions an object covers by 1 + this (a shape's outline is a few pixels against a flat background)",
    )
    ap.add_argument(
        "--prompt-attention",
        type=float,
        default=0.0,
        help="phase dit: add, at this weight, how far below one half (in log) each token's cross-attention share on the prompt's rows falls (the rest goes to the zero padding)",
    )
    ap.add_argument(
        "--shape-weight",
        type=shape_weights,
        help='phase dit: draw the clips of these shapes this many times as often as the others, e.g. "star=3" (the shape the DiT draws worst)',
    )
    ap.add_argument(
        "--clips",
        type=int,
        help="phase dit: learn from this many distinct clips (default 40,000) and write their captions to OUT/captions.txt (a capacity probe: can the DiT reproduce the shapes of clips it has seen many times?)",
    )
    ap.add_argument("--heads", type=int, help="phase dit from scratch: attention heads (default 4)")
    ap.add_argument("--head-dim", type=int, help="phase dit from scratch: width of a head, default 32 (the DiT's width is heads x this)")
    ap.add_argument("--depth", type=int, help="phase dit with --init: deepen the DiT to this many blocks (a multiple of its own)")
    ap.add_argument(
        "--logit-normal",
        action="store_true",
        help="phase dit: draw the training sigmas as sigmoid(N(0, 1)) instead of uniformly (more of them at mid noise, where the DiT blurs outlines into blobs)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="phase dit: run the DiT's forward through torch.compile (fused kernels; the first steps wait for the compiler)",
    )
    ap.add_argument("--run", type=int, default=0, help="phase dit: a continued run's number, so it draws fresh clips and noise")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.depth and not (args.phase == "dit" and args.init):
        ap.error("--depth deepens a trained DiT: give it with phase dit and --init")
    if (args.heads or args.head_dim) and not (args.phase == "dit" and not args.init):
        ap.error("--heads and --head-dim shape a new DiT: give them with phase dit and without --init")
    if args.shape_weight and args.phase != "dit":
        ap.error("--shape-weight draws the DiT's training clips: give it with phase dit")
    if args.logit_normal and args.phase != "dit":
        ap.error("--logit-normal draws the DiT's training sigmas: give it with phase dit")
    if args.compile and (args.phase != "dit" or args.prompt_attention):
        ap.error("--compile serves phase dit, and not with --prompt-attention, whose forward hooks it was not tried with")
    if args.decoder_base_dim and not (args.phase == "vae" and args.decoder_of):
        ap.error("--decoder-base-dim gives an autoencoder a new decoder: give it with phase vae and --decoder-of")
    if args.shape_code and args.phase == "vae" and args.decoder_of:
        ap.error("--shape-code shapes the latent the encoder writes: give it without --decoder-of")
    if args.phase == "vae" and args.decoder_of and args.init:
        ap.error("--decoder-of tunes one autoencoder's decoder, --init continues a whole one: give one of them")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # cuDNN picks its algorithm per convolution shape (on from the second decoder tuning in
    # docs/tiny-models.md; the earlier runs had it off).
    torch.backends.cudnn.benchmark = True
    if args.phase == "vae":
        train_vae(args, device)
    else:
        train_dit(args, device)


if __name__ == "__main__":
    main()
