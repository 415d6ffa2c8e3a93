"""Builds the tiny test checkpoints and the golden outputs the Rust parity tests compare with.

Every model is the reference architecture (diffusers / transformers classes) at a tiny config
with seeded random weights, saved in the real checkpoint layouts. Goldens are computed by the
reference implementation in float32 on the CPU from the weights exactly as saved (each
component is reloaded from disk first, so storage rounding is part of the reference).

Usage: python tests/reference/make_goldens.py [--clip-vocab DIR]
  --clip-vocab DIR  a folder with the real CLIP vocab.json / merges.txt (scripts/fetch-vocab.sh
                    makes it); adds golden ids on the real vocabulary.
Writes tests/data/. Needs: torch, diffusers, transformers, safetensors (see requirements.txt).
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")

# Prompts that exercise lowercasing, punctuation, digits, apostrophes, unicode and truncation.
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Red  STAR, on a yellow background!!",
    "it's 3 o'clock; don't   stop (please) #42",
    "café naïve — ünïcödé 東京 emoji 🙂",
    "",
    " ".join(["longprompt"] * 100),
]


def set_seed(seed):
    torch.manual_seed(seed)


def randomize(module, seed, scale=0.2):
    """Seeded weights of a useful magnitude: norms near one, everything else small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and (name.endswith("weight") or name.endswith("gamma")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def tiny_clip_vocab(vocab_dir, n_merges):
    """vocab.json / merges.txt from the first `n_merges` merges of a CLIP BPE vocabulary."""
    with open(os.path.join(vocab_dir, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [l for l in lines[1:] if l][:n_merges]
    with open(os.path.join(vocab_dir, "vocab.json"), encoding="utf-8") as f:
        full = json.load(f)
    base = sorted(full.items(), key=lambda kv: kv[1])[:512]
    tokens = [t for t, _ in base] + ["".join(m.split(" ")) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return vocab, ["#version: 0.2"] + merges


def write_tokenizer(folder, vocab, merges, pad_token):
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def token_ids(tok):
    return [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS]


def write_pipeline_index(root, pipeline_class, sched_cfg, **components):
    """model_index.json and scheduler/scheduler_config.json of a diffusers pipeline folder."""
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched_cfg, f, indent=2)
    index = {"_class_name": pipeline_class, "scheduler": ["diffusers", sched_cfg["_class_name"]], **components}
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(dict(sorted(index.items())), f, indent=2)


# Stable Diffusion 1.5's scheduler config, as its release ships it.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def write_sd_pipeline_index(root):
    """The index and scheduler of a Stable Diffusion 1.5 pipeline folder."""
    write_pipeline_index(
        root,
        "StableDiffusionPipeline",
        SD15_SCHEDULER,
        text_encoder=["transformers", "CLIPTextModel"],
        tokenizer=["transformers", "CLIPTokenizer"],
        unet=["diffusers", "UNet2DConditionModel"],
        vae=["diffusers", "AutoencoderKL"],
    )


# The Wan2.1 T2V release's scheduler (UniPC on flow-matching sigmas, shift 3).
WAN_SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
}


def write_wan_pipeline_index(root):
    """The index and scheduler of a Wan2.1 text-to-video pipeline folder."""
    write_pipeline_index(
        root,
        "WanPipeline",
        WAN_SCHEDULER,
        text_encoder=["transformers", "UMT5EncoderModel"],
        tokenizer=["transformers", "T5Tokenizer"],
        transformer=["diffusers", "WanTransformer3DModel"],
        vae=["diffusers", "AutoencoderKLWan"],
    )


def fit_sentencepiece(tok_dir, lines, vocab_size, normalization="nmt_nfkc"):
    """A unigram SentencePiece model fitted on `lines` by the sentencepiece library (T5's
    special ids: pad 0, eos 1, unk 2), saved with the transformers T5 tokenizer files."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    os.makedirs(tok_dir, exist_ok=True)
    corpus = os.path.join(tok_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(tok_dir, "spiece"),
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        normalization_rule_name=normalization,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    os.remove(corpus)
    os.remove(os.path.join(tok_dir, "spiece.vocab"))
    tok = T5Tokenizer.from_pretrained(tok_dir, extra_ids=0, model_max_length=512)
    tok.save_pretrained(tok_dir)
    return T5Tokenizer.from_pretrained(tok_dir)


def umt5_config(vocab_size, d_model, d_kv, d_ff, layers, heads):
    """An encoder-only UMT5 config with the Wan2.1 text encoder's activation, norms and
    relative-position buckets."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
    )


def clip_text_config(vocab, hidden, intermediate, layers, heads):
    """A CLIP text encoder config on a vocabulary with `<|startoftext|>` / `<|endoftext|>`
    (the end token also pads), SD 1.5's activation and context length."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        projection_dim=hidden,
    )


def save_component(model, folder, dtype):
    """Saves in the diffusers layout with weights stored as `dtype`, then reloads in float32
    so the goldens see the stored (rounded) weights."""
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    return type(model).from_pretrained(folder, torch_dtype=torch.float32).eval()


def make_sd(clip_vocab):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = os.path.join(DATA, "sd-tiny")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    goldens, ints = {}, {}

    vocab, merges = tiny_clip_vocab(clip_vocab, 1000)
    tok = write_tokenizer(os.path.join(root, "tokenizer"), vocab, merges, "<|endoftext|>")
    ints["tiny_vocab_ids"] = token_ids(tok)

    set_seed(1)
    te = CLIPTextModel(clip_text_config(vocab, hidden=32, intermediate=64, layers=2, heads=4))
    randomize(te, 11)
    te = save_component(te, os.path.join(root, "text_encoder"), torch.bfloat16)

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    randomize(unet, 12, scale=0.1)
    unet = save_component(unet, os.path.join(root, "unet"), torch.float16)

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    randomize(vae, 13, scale=0.1)
    vae = save_component(vae, os.path.join(root, "vae"), torch.float32)

    sched_cfg = SD15_SCHEDULER
    write_sd_pipeline_index(root)

    write_sd_single_file(te, unet, vae, os.path.join(DATA, "sd-tiny-single-file.safetensors"))

    with torch.no_grad():
        ids = torch.tensor(ints["tiny_vocab_ids"][:2])
        goldens["text_hidden"] = te(ids).last_hidden_state

        g = torch.Generator().manual_seed(5)
        latent = torch.randn((2, 4, 8, 8), generator=g)
        goldens["unet_latent"] = latent
        goldens["unet_out"] = unet(latent, torch.tensor([981.0, 981.0]), goldens["text_hidden"]).sample

        z = torch.randn((1, 4, 8, 8), generator=g)
        goldens["vae_latent"] = z
        goldens["vae_decoded"] = vae.decode(z).sample
        image = torch.rand((1, 3, 16, 16), generator=g) * 2 - 1
        goldens["vae_image"] = image
        goldens["vae_encoded_mean"] = vae.encode(image).latent_dist.mean

        # The whole pipeline, two DDIM steps with guidance, from a stored initial latent.
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            unet=unet,
            scheduler=DDIMScheduler.from_config(sched_cfg),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        init = torch.randn((1, 4, 8, 8), generator=g)
        goldens["pipeline_init_latent"] = init
        out = pipe(
            PROMPTS[1],
            negative_prompt=PROMPTS[0],
            num_inference_steps=2,
            guidance_scale=7.5,
            latents=init.clone(),
            output_type="latent",
            height=16,
            width=16,
        ).images
        goldens["pipeline_latent"] = out
        goldens["pipeline_image"] = vae.decode(out / vae.config.scaling_factor).sample

    goldens.update(scheduler_goldens(sched_cfg))
    goldens.update(scheduler_goldens(dict(sched_cfg, prediction_type="v_prediction"), prefix="sched_v_"))
    make_sd2_parts(root, goldens, vae)
    save_file({k: v.contiguous().float() for k, v in goldens.items()}, os.path.join(DATA, "sd-tiny-goldens.safetensors"))
    return ints


def ldm_unet_name(k, cfg):
    """The original (LDM) key of diffusers UNet key `k`."""
    l = cfg.layers_per_block
    res = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]

    def resnet(rest):
        return next((to + rest[len(fr):] for fr, to in res if rest.startswith(fr)), rest)

    p = k.split(".")
    if p[0] == "conv_in":
        return "input_blocks.0.0." + ".".join(p[1:])
    if p[0] == "time_embedding":
        return {"linear_1": "time_embed.0.", "linear_2": "time_embed.2."}[p[1]] + ".".join(p[2:])
    if p[0] == "conv_norm_out":
        return "out.0." + ".".join(p[1:])
    if p[0] == "conv_out":
        return "out.2." + ".".join(p[1:])
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{(i + 1) * (l + 1)}.0.op." + ".".join(p[5:])
        n = 1 + i * (l + 1) + int(p[3])
        rest = ".".join(p[4:])
        return f"input_blocks.{n}.0.{resnet(rest)}" if p[2] == "resnets" else f"input_blocks.{n}.1.{rest}"
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        if p[1] == "attentions":
            return "middle_block.1." + rest
        return f"middle_block.{0 if p[2] == '0' else 2}.{resnet(rest)}"
    if p[0] == "up_blocks":
        i = int(p[1])
        attn = cfg.up_block_types[i].startswith("CrossAttn")
        if p[2] == "upsamplers":
            return f"output_blocks.{i * (l + 1) + l}.{2 if attn else 1}." + ".".join(p[4:])
        n = i * (l + 1) + int(p[3])
        rest = ".".join(p[4:])
        return f"output_blocks.{n}.0.{resnet(rest)}" if p[2] == "resnets" else f"output_blocks.{n}.1.{rest}"
    raise KeyError(k)


def ldm_vae_name(k, levels):
    p = k.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return k
    side, rest = p[0], p[1:]

    def resnet(r):
        return ".".join(r).replace("conv_shortcut", "nin_shortcut")

    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out." + ".".join(rest[1:])
    if rest[0] in ("conv_in", "conv_out"):
        return k
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}.{resnet(rest[3:])}"
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        tail = rest[4:] if rest[3] != "to_out" else rest[5:]
        return f"{side}.mid.attn_1.{names[rest[3]]}." + ".".join(tail)
    i = int(rest[1])
    if side == "decoder":
        i = levels - 1 - i
    kind = "down" if side == "encoder" else "up"
    if rest[2] == "resnets":
        return f"{side}.{kind}.{i}.block.{rest[3]}.{resnet(rest[4:])}"
    return f"{side}.{kind}.{i}.{'downsample' if kind == 'down' else 'upsample'}." + ".".join(rest[4:])


def write_sd_single_file(te, unet, vae, path):
    """The checkpoint in the original single-file layout (LDM key names, f16), checked
    against diffusers' own converters: converting it back must give the diffusers weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    levels = len(vae.config.block_out_channels)
    sd = {}
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + ldm_unet_name(k, unet.config)] = v
    for k, v in vae.state_dict().items():
        if "mid_block.attentions" in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        sd["first_stage_model." + ldm_vae_name(k, levels)] = v
    for k, v in te.state_dict().items():
        sd["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}
    for name, model, back in [
        ("unet", unet, convert_ldm_unet_checkpoint(dict(sd), unet.config)),
        ("vae", vae, convert_ldm_vae_checkpoint(dict(sd), vae.config)),
        ("text encoder", te, convert_ldm_clip_checkpoint(dict(sd))),
    ]:
        want = {k if name != "text encoder" or k.startswith("text_model.") else "text_model." + k: v for k, v in model.state_dict().items()}
        assert set(back) == set(want), (name, sorted(set(back) ^ set(want))[:5])
        for k, v in want.items():
            assert torch.equal(back[k].reshape(v.shape).float(), v.to(torch.float16).float()), (name, k)
    save_file(sd, path)


def make_sd2_parts(root, goldens, vae):
    """The SD 2.x config paths at tiny size: a UNet with linear projections and per-block head
    counts, and a GELU CLIP text encoder (under sd-tiny/sd2/)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = os.path.join(root, "sd2")
    set_seed(6)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        norm_num_groups=16,
    )
    randomize(unet, 61, scale=0.1)
    unet = save_component(unet, os.path.join(sd2, "unet"), torch.float16)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=1514, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, hidden_act="gelu", projection_dim=24))
    randomize(te, 62)
    te = save_component(te, os.path.join(sd2, "text_encoder"), torch.float32)
    g = torch.Generator().manual_seed(63)
    ids = torch.randint(0, 1514, (2, 77), generator=g)
    goldens["sd2_text_ids"] = ids.float()
    goldens["sd2_text_hidden"] = te(ids).last_hidden_state
    x = torch.randn((2, 4, 8, 8), generator=g)
    goldens["sd2_unet_latent"] = x
    goldens["sd2_unet_out"] = unet(x, torch.tensor([500.0, 500.0]), goldens["sd2_text_hidden"]).sample
    write_sd2_single_file(te, unet, vae, os.path.join(DATA, "sd2-tiny-single-file.safetensors"))


def write_sd2_single_file(te, unet, vae, path):
    """The SD 2.x-config parts in the original single-file layout: OpenCLIP text keys with
    fused q/k/v, checked against diffusers' converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    sd = {"model.diffusion_model." + ldm_unet_name(k, unet.config): v for k, v in unet.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + ldm_vae_name(k, levels)] = v
    te_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.state_dict().items()}
    layer_renames = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    prefix = "cond_stage_model.model."
    for k, v in te_sd.items():
        if k == "text_model.embeddings.position_embedding.weight":
            sd[prefix + "positional_embedding"] = v
        elif k == "text_model.embeddings.token_embedding.weight":
            sd[prefix + "token_embedding.weight"] = v
        elif k.startswith("text_model.final_layer_norm."):
            sd[prefix + "ln_final." + k.split(".")[-1]] = v
        elif ".self_attn.q_proj." in k:
            kind = k.split(".")[-1]
            fused = torch.cat([te_sd[k], te_sd[k.replace("q_proj", "k_proj")], te_sd[k.replace("q_proj", "v_proj")]])
            n = k.split(".")[3]
            sd[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"] = fused
        elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        else:
            n = k.replace("text_model.encoder.layers.", "transformer.resblocks.")
            for a, b in layer_renames:
                n = n.replace(a, b)
            sd[prefix + n] = v
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    back = convert_open_clip_checkpoint(te, dict(sd))
    assert set(back) == set(te_sd), sorted(set(back) ^ set(te_sd))[:5]
    assert all(torch.equal(back[k], te_sd[k]) for k in te_sd)
    back = convert_ldm_unet_checkpoint(dict(sd), unet.config)
    assert set(back) == set(unet.state_dict())
    # The text encoder stays f32 (as its folder stores it), so the file holds the same values.
    save_file({k: v if k.startswith("cond_stage_model.") else v.to(torch.float16) for k, v in sd.items()}, path)


def scheduler_goldens(cfg, steps=5, prefix="sched_"):
    """Each SD sampler driven by a fixed fake denoiser for `steps` steps: the timesteps, the
    final sample, and the noise the ancestral sampler drew (fed in instead of its RNG)."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_mod
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    g = torch.Generator().manual_seed(7)
    start = torch.randn((1, 4, 4, 4), generator=g)
    noises = torch.randn((steps, 1, 4, 4, 4), generator=g)
    out = {f"{prefix}start": start, f"{prefix}noise": noises}
    drawn = iter(noises)
    euler_a_mod.randn_tensor = lambda *a, **k: next(drawn)
    kinds = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
        "dpmpp_2m": DPMSolverMultistepScheduler,
    }
    for name, cls in kinds.items():
        s = cls.from_config(cfg)
        s.set_timesteps(steps)
        x = start.clone() * s.init_noise_sigma
        for t in s.timesteps:
            inp = s.scale_model_input(x, t)
            eps = torch.tanh(inp) * 0.5 + 0.01 * float(t) / 1000.0
            x = s.step(eps, t, x).prev_sample
        out[f"{prefix}{name}_timesteps"] = s.timesteps.float()
        out[f"{prefix}{name}_final"] = x
    return out


def make_wan():
    """The Wan2.1 DiT at a tiny config (bf16 storage) and one forward; the flow samplers."""
    from diffusers import WanTransformer3DModel

    root = os.path.join(DATA, "wan-tiny")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    goldens = {}
    set_seed(2)
    dit = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    randomize(dit, 21, scale=0.2)
    dit = save_component(dit, os.path.join(root, "transformer"), torch.bfloat16)
    write_wan_original(dit, os.path.join(DATA, "wan-tiny-dit-original.safetensors"))
    g = torch.Generator().manual_seed(22)
    latent = torch.randn((1, 4, 3, 8, 6), generator=g)
    context = torch.randn((1, 20, 16), generator=g)
    goldens["dit_latent"] = latent
    goldens["dit_context"] = context
    goldens["dit_out"] = dit(latent, torch.tensor([500.0]), context).sample

    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    randomize(vae, 24, scale=0.15)
    with torch.no_grad():
        # Keep most outputs inside the decoder's final clamp to [-1, 1], so they are compared.
        vae.decoder.conv_out.weight.mul_(0.2)
    vae = save_component(vae, os.path.join(root, "vae"), torch.float32)
    write_wan_vae_original(vae, os.path.join(DATA, "wan-tiny-vae-original.safetensors"))
    z = torch.randn((1, 4, 3, 4, 6), generator=g)
    goldens["wan_vae_latent"] = z
    goldens["wan_vae_decoded"] = vae.decode(z).sample
    ints = make_umt5(root, goldens, g)
    te = ints.pop("model")
    tok = ints.pop("tokenizer")

    from diffusers import UniPCMultistepScheduler, WanPipeline

    write_wan_pipeline_index(root)
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=te,
        transformer=dit,
        vae=vae,
        scheduler=UniPCMultistepScheduler.from_config(WAN_SCHEDULER),
    )
    init = torch.randn((1, 4, 2, 4, 6), generator=g)
    goldens["wan_pipeline_init_latent"] = init
    out = pipe(
        PROMPTS[1],
        negative_prompt=PROMPTS[0],
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=5.0,
        latents=init.clone(),
        output_type="latent",
    ).frames
    goldens["wan_pipeline_latent"] = out
    goldens.update(flow_scheduler_goldens())
    save_file({k: v.contiguous().float() for k, v in goldens.items()}, os.path.join(DATA, "wan-tiny-goldens.safetensors"))
    return ints


def caption_corpus(n=3000, seed=31):
    """Procedural captions (plus the test prompts) to fit a small unigram vocabulary on."""
    import random

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "grey"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "heart", "cross", "ring"]
    motions = ["moving left", "moving right", "moving up", "moving down", "spinning", "growing", "shrinking"]
    places = ["top left", "top right", "bottom left", "bottom right", "in the centre", "near the edge"]
    counts = ["a", "one", "two", "three", "four", "many"]
    lines = list(PROMPTS)
    syllables = ["ka", "lo", "mi", "ne", "tra", "ver", "sun", "ght", "ing", "er", "on", "pha", "qu", "zy", "est", "ble"]
    for _ in range(n):
        lines.append(" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(8)))
        c, sh = rng.choice(colours), rng.choice(shapes)
        lines.append(
            f"{rng.choice(counts)} {rng.choice(['small', 'large', 'tiny', 'big'])} {c} {sh}s "
            f"{rng.choice(motions)} on a {rng.choice(colours)} background, {rng.choice(places)}."
        )
    return lines


def make_umt5(root, goldens, g):
    """A unigram SentencePiece model fitted by the sentencepiece library, the UMT5 encoder at
    a tiny config on it, and golden ids from both the library and the transformers tokenizer."""
    import sentencepiece as spm
    from transformers import UMT5EncoderModel

    tok_dir = os.path.join(root, "tokenizer")
    tok = fit_sentencepiece(tok_dir, caption_corpus(), 400)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "spiece.model"))
    ints = {
        "spm_library_ids": [sp.encode(p) for p in PROMPTS],
        "umt5_ids": [tok(p, padding="max_length", max_length=512, truncation=True).input_ids for p in PROMPTS],
    }

    set_seed(3)
    te = UMT5EncoderModel(umt5_config(sp.get_piece_size(), d_model=16, d_kv=8, d_ff=32, layers=2, heads=2))
    randomize(te, 25, scale=0.3)
    te = save_component(te, os.path.join(root, "text_encoder"), torch.bfloat16)
    enc = tok(PROMPTS[:2], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    # The sequence is cut to 160 tokens for the golden (the model has no fixed length).
    ids, mask = enc.input_ids[:, :160], enc.attention_mask[:, :160]
    goldens["umt5_hidden"] = te(ids, attention_mask=mask).last_hidden_state
    ints["umt5_hidden_ids"] = ids.tolist()
    ints["model"] = te
    ints["tokenizer"] = tok
    return ints


def write_wan_original(dit, path):
    """The DiT under the original Wan release's key names (as single-file checkpoints carry
    them), checked against diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    renames = [
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("attn1.", "self_attn."),
        ("attn2.", "cross_attn."),
        (".to_out.0.", ".o."),
        (".to_q.", ".q."),
        (".to_k.", ".k."),
        (".to_v.", ".v."),
        ("ffn.net.0.proj", "ffn.0"),
        ("ffn.net.2", "ffn.2"),
        (".norm2.", ".norm3."),
        ("proj_out", "head.head"),
    ]
    sd = {}
    for k, v in dit.state_dict().items():
        n = k
        for a, b in renames:
            n = n.replace(a, b)
        n = "head.modulation" if n == "scale_shift_table" else n.replace("scale_shift_table", "modulation")
        sd[n] = v.detach().to(torch.bfloat16).contiguous()
    back = convert_wan_transformer_to_diffusers(dict(sd))
    want = dit.state_dict()
    assert set(back) == set(want), sorted(set(back) ^ set(want))[:5]
    assert all(torch.equal(back[k].float(), want[k].to(torch.bfloat16).float()) for k in want)
    save_file(sd, path)


def write_wan_vae_original(vae, path):
    """The VAE decoder under the original Wan release's key names, checked against
    diffusers' own converter (which expects the real layout: two resnets per level)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    group = vae.config.num_res_blocks + 2
    res = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma", "conv2": "residual.6", "conv_shortcut": "shortcut"}

    def resnet(rest):
        return next((to + rest[len(fr):] for fr, to in res.items() if rest.startswith(fr)), rest)

    sd = {}
    for k, v in vae.state_dict().items():
        p = k.split(".")
        if p[0] == "post_quant_conv":
            n = "conv2." + p[1]
        elif p[0] != "decoder":
            continue
        elif p[1] == "conv_in":
            n = "decoder.conv1." + p[2]
        elif p[1] == "norm_out":
            n = "decoder.head.0.gamma"
        elif p[1] == "conv_out":
            n = "decoder.head.2." + p[2]
        elif p[1] == "mid_block":
            idx = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[2]}.{p[3]}"]
            rest = ".".join(p[4:])
            n = f"decoder.middle.{idx}." + (resnet(rest) if p[2] == "resnets" else rest)
        else:
            i, kind = int(p[2]), p[3]
            if kind == "resnets":
                n = f"decoder.upsamples.{i * group + int(p[4])}." + resnet(".".join(p[5:]))
            else:
                n = f"decoder.upsamples.{i * group + group - 1}." + ".".join(p[5:])
        sd[n] = v.detach().contiguous()
    back = convert_wan_vae_to_diffusers(dict(sd))
    want = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert set(back) == set(want), sorted(set(back) ^ set(want))[:5]
    assert all(torch.equal(back[k], want[k]) for k in want)
    save_file(sd, path)


def flow_scheduler_goldens(steps=6):
    """Wan's samplers (flow matching with shift 3) driven by a fixed fake velocity field."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    g = torch.Generator().manual_seed(23)
    start = torch.randn((1, 4, 2, 4, 4), generator=g)
    out = {"flow_start": start}
    kinds = {
        "flow_euler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "flow_unipc": UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    }
    for name, s in kinds.items():
        s.set_timesteps(steps)
        x = start.clone()
        for t in s.timesteps:
            v = torch.tanh(x) * 0.5 - 0.3 * x + 0.001 * float(t)
            x = s.step(v, t, x).prev_sample
        out[f"{name}_timesteps"] = s.timesteps.float()
        out[f"{name}_final"] = x
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-vocab", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    os.makedirs(DATA, exist_ok=True)
    ints = {"prompts": PROMPTS}
    ints.update(make_sd(args.clip_vocab))
    ints.update(make_wan())
    from transformers import CLIPTokenizer

    full = CLIPTokenizer(
        os.path.join(args.clip_vocab, "vocab.json"),
        os.path.join(args.clip_vocab, "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    ints["clip_vocab_ids"] = token_ids(full)
    sd2 = CLIPTokenizer(
        os.path.join(args.clip_vocab, "vocab.json"),
        os.path.join(args.clip_vocab, "merges.txt"),
        pad_token="!",
        model_max_length=77,
    )
    ints["clip_vocab_ids_pad_bang"] = token_ids(sd2)
    with open(os.path.join(DATA, "goldens.json"), "w", encoding="utf-8") as f:
        json.dump(ints, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
