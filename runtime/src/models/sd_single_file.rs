//! Stable Diffusion 1.x single-file checkpoints (`*.safetensors` with the original LDM key
//! names: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`)
//! mapped onto the diffusers names the models load by. The file carries no configs; the
//! SD 1.x ones apply, and the tokenizer comes from a diffusers `tokenizer/` folder.

use crate::models::unet::UNetConfig;

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
        RENAMES
            .iter()
            .find_map(|(from, to)| rest.strip_prefix(from).map(|t| format!("{to}{t}")))
            .unwrap_or_else(|| rest.to_string())
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

/// Which component a single-file key belongs to, and its diffusers name there.
pub fn component_name(name: &str, unet: &UNetConfig, vae_levels: usize) -> Option<(&'static str, String)> {
    if let Some(rest) = name.strip_prefix("model.diffusion_model.") {
        return Some(("unet", unet_name(rest, unet)?));
    }
    if let Some(rest) = name.strip_prefix("first_stage_model.") {
        return Some(("vae", vae_name(rest, vae_levels)?));
    }
    name.strip_prefix("cond_stage_model.transformer.")
        .map(|rest| ("text_encoder", rest.to_string()))
}
