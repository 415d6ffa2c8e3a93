//! Stable Diffusion single-file checkpoints (`*.safetensors` with the original LDM key
//! names: `model.diffusion_model.*`, `first_stage_model.*`, and `cond_stage_model.transformer.*`
//! (SD 1.x, CLIP) or `cond_stage_model.model.*` (SD 2.x, OpenCLIP)) mapped onto the diffusers
//! names the models load by. The file carries no configs (`SdConfigs::sd15` / `sd21` hold
//! the releases'), and the tokenizer comes from a diffusers `tokenizer/` folder.

use crate::models::unet::UNetConfig;
use crate::weights::replace_prefix;

/// The diffusers name of UNet tensor `name` (without `model.diffusion_model.`).
fn unet_name(name: &str, c: &UNetConfig) -> Option<String> {
    let l = c.layers_per_block;
    let resnet = |rest: &str| -> String {
        const RENAMES: [(&str, &str); 6] = [
            ("in_layers.0.", "norm1."),
            ("in_layers.2.", "conv1."),
            ("emb_layers.1.", "time_emb_proj."),
            ("out_layers.0.", "norm2."),
            ("out_layers.3.", "conv2."),
            ("skip_connection.", "conv_shortcut."),
        ];
        replace_prefix(rest, &RENAMES).unwrap_or_else(|| rest.to_string())
    };
    if let Some(rest) = name.strip_prefix("middle_block.") {
        let (m, rest) = rest.split_once('.')?;
        return match m {
            "0" => Some(format!("mid_block.resnets.0.{}", resnet(rest))),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", resnet(rest))),
            _ => None,
        };
    }
    let parts: Vec<&str> = name.splitn(4, '.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    match parts.as_slice() {
        ["time_embed", "0", rest @ ..] => Some(format!("time_embedding.linear_1.{}", rest.join("."))),
        ["time_embed", "2", rest @ ..] => Some(format!("time_embedding.linear_2.{}", rest.join("."))),
        ["out", "0", rest @ ..] => Some(format!("conv_norm_out.{}", rest.join("."))),
        ["out", "2", rest @ ..] => Some(format!("conv_out.{}", rest.join("."))),
        ["input_blocks", "0", "0", rest] => Some(format!("conv_in.{rest}")),
        ["input_blocks", n, m, rest] => {
            let n = num(n)? - 1;
            let (i, j) = (n / (l + 1), n % (l + 1));
            match (j == l, *m) {
                (true, "0") => Some(format!("down_blocks.{i}.downsamplers.0.conv.{}", rest.strip_prefix("op.")?)),
                (false, "0") => Some(format!("down_blocks.{i}.resnets.{j}.{}", resnet(rest))),
                (false, "1") => Some(format!("down_blocks.{i}.attentions.{j}.{rest}")),
                _ => None,
            }
        }
        ["output_blocks", n, m, rest] => {
            let n = num(n)?;
            let (i, j) = (n / (l + 1), n % (l + 1));
            let attention = c.up_block_types.get(i)?.starts_with("CrossAttn");
            match (*m, attention) {
                ("0", _) => Some(format!("up_blocks.{i}.resnets.{j}.{}", resnet(rest))),
                ("1", true) => Some(format!("up_blocks.{i}.attentions.{j}.{rest}")),
                ("1", false) | ("2", true) => Some(format!("up_blocks.{i}.upsamplers.0.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The diffusers name of VAE tensor `name` (without `first_stage_model.`); `levels` is the
/// number of resolution levels (the decoder's `up.N` count from the top).
fn vae_name(name: &str, levels: usize) -> Option<String> {
    let resnet = |rest: &str| rest.replacen("nin_shortcut", "conv_shortcut", 1);
    let attention = |rest: &str| {
        let (head, tail) = rest.split_once('.')?;
        let mapped = match head {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        Some(format!("{mapped}.{tail}"))
    };
    let (side, rest) = name.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| name.to_string());
    }
    let parts: Vec<&str> = rest.splitn(5, '.').collect();
    let mapped = match parts.as_slice() {
        ["norm_out", tail @ ..] => format!("conv_norm_out.{}", tail.join(".")),
        ["conv_in" | "conv_out", ..] => rest.to_string(),
        ["mid", "block_1", tail @ ..] => format!("mid_block.resnets.0.{}", resnet(&tail.join("."))),
        ["mid", "block_2", tail @ ..] => format!("mid_block.resnets.1.{}", resnet(&tail.join("."))),
        ["mid", "attn_1", tail @ ..] => format!("mid_block.attentions.0.{}", attention(&tail.join("."))?),
        ["down", i, "block", j, tail] => format!("down_blocks.{i}.resnets.{j}.{}", resnet(tail)),
        ["down", i, "downsample", tail @ ..] => format!("down_blocks.{i}.downsamplers.0.{}", tail.join(".")),
        ["up", i, "block", j, tail] => {
            let i = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            format!("up_blocks.{i}.resnets.{j}.{}", resnet(tail))
        }
        ["up", i, "upsample", tail @ ..] => {
            let i = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            format!("up_blocks.{i}.upsamplers.0.{}", tail.join("."))
        }
        _ => return None,
    };
    Some(format!("{side}.{mapped}"))
}

/// The transformers name of an SD 2.x OpenCLIP text tensor (without `cond_stage_model.model.`);
/// fused attention input projections keep the name `self_attn.in_proj.*` for
/// `split_fused_qkv`. The projection head and layers past the config's count go unused.
fn open_clip_name(name: &str) -> Option<String> {
    let mapped = match name {
        "positional_embedding" => "embeddings.position_embedding.weight".to_string(),
        "token_embedding.weight" => "embeddings.token_embedding.weight".to_string(),
        _ if name.starts_with("ln_final.") => name.replacen("ln_final.", "final_layer_norm.", 1),
        _ => {
            let rest = name.strip_prefix("transformer.resblocks.")?;
            let (n, tail) = rest.split_once('.')?;
            const RENAMES: [(&str, &str); 7] = [
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("attn.in_proj_weight", "self_attn.in_proj.weight"),
                ("attn.in_proj_bias", "self_attn.in_proj.bias"),
                ("attn.out_proj.", "self_attn.out_proj."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
            ];
            let tail = replace_prefix(tail, &RENAMES)?;
            format!("encoder.layers.{n}.{tail}")
        }
    };
    Some(format!("text_model.{mapped}"))
}

/// Splits the fused `self_attn.in_proj.{weight,bias}` of OpenCLIP checkpoints into q, k, v.
pub fn split_fused_qkv(weights: &mut crate::weights::Weights) -> crate::error::Result<()> {
    let fused: Vec<String> = weights
        .names()
        .filter(|n| n.contains(".self_attn.in_proj."))
        .map(String::from)
        .collect();
    for name in fused {
        let parts = ["q_proj", "k_proj", "v_proj"].map(|p| name.replacen("in_proj", p, 1));
        weights.split_rows(&name, &parts)?;
    }
    Ok(())
}

/// Which component a single-file key belongs to, and its diffusers name there.
pub fn component_name(name: &str, unet: &UNetConfig, vae_levels: usize) -> Option<(&'static str, String)> {
    if let Some(rest) = name.strip_prefix("model.diffusion_model.") {
        return Some(("unet", unet_name(rest, unet)?));
    }
    if let Some(rest) = name.strip_prefix("first_stage_model.") {
        return Some(("vae", vae_name(rest, vae_levels)?));
    }
    if let Some(rest) = name.strip_prefix("cond_stage_model.model.") {
        return Some(("text_encoder", open_clip_name(rest)?));
    }
    name.strip_prefix("cond_stage_model.transformer.")
        .map(|rest| ("text_encoder", rest.to_string()))
}
