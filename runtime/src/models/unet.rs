//! Stable Diffusion's denoiser (diffusers `UNet2DConditionModel`): a time embedding, down
//! blocks of ResNet blocks with spatial transformers (self-attention, cross-attention to
//! the text, GEGLU feed-forward), a middle block, and up blocks fed by the skip connections.
//! SD 1.x and 2.x differ only in config (heads per block, linear projections).

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::nn::{from_tokens, to_tokens, Attention, Conv2d, GroupNorm, LayerNorm, Linear, ResnetBlock};
use crate::ops;
use crate::tensor::{DType, Tensor};
use crate::weights::Params;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(i).copied().unwrap_or(0),
        }
    }
}

/// Mirrors diffusers' `UNet2DConditionModel` config (the fields SD 1.x / 2.x use).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UNetConfig {
    #[serde(default = "d::in_channels")]
    pub in_channels: usize,
    #[serde(default = "d::in_channels")]
    pub out_channels: usize,
    #[serde(default = "d::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d::layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "d::cross_attention_dim")]
    pub cross_attention_dim: usize,
    #[serde(default = "d::attention_head_dim")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "d::norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d::norm_eps")]
    pub norm_eps: f32,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "d::flip_sin_to_cos")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    #[serde(default = "d::sample_size")]
    pub sample_size: usize,
}

mod d {
    use super::PerBlock;
    pub fn in_channels() -> usize {
        4
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![320, 640, 1280, 1280]
    }
    pub fn down_block_types() -> Vec<String> {
        [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn up_block_types() -> Vec<String> {
        ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
            .map(String::from)
            .to_vec()
    }
    pub fn layers_per_block() -> usize {
        2
    }
    pub fn cross_attention_dim() -> usize {
        1280
    }
    pub fn attention_head_dim() -> PerBlock {
        PerBlock::One(8)
    }
    pub fn norm_num_groups() -> usize {
        32
    }
    pub fn norm_eps() -> f32 {
        1e-5
    }
    pub fn flip_sin_to_cos() -> bool {
        true
    }
    pub fn sample_size() -> usize {
        64
    }
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward,
/// each after a layer norm and added back.
struct TransformerBlock<B: Backend> {
    norm1: LayerNorm<B>,
    attn1: Attention<B>,
    norm2: LayerNorm<B>,
    attn2: Attention<B>,
    norm3: LayerNorm<B>,
    geglu: Linear<B>,
    ff_out: Linear<B>,
}

impl<B: Backend> TransformerBlock<B> {
    fn load(p: &Params<B>, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: LayerNorm::load(&p.at("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&p.at("attn1"), dim, dim, heads, false)?,
            norm2: LayerNorm::load(&p.at("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&p.at("attn2"), dim, context_dim, heads, false)?,
            norm3: LayerNorm::load(&p.at("norm3"), dim, 1e-5)?,
            geglu: Linear::load(&p.at("ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: Linear::load(&p.at("ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>, context: &Tensor<B>) -> Result<Tensor<B>> {
        let x = ops::add(b, x, &self.attn1.forward(b, &self.norm1.forward(b, x)?, None)?)?;
        let x = ops::add(b, &x, &self.attn2.forward(b, &self.norm2.forward(b, &x)?, Some(context))?)?;
        let proj = self.geglu.forward(b, &self.norm3.forward(b, &x)?)?;
        let last = proj.rank() - 1;
        let inner = proj.shape()[last] / 2;
        let gated = ops::mul(
            b,
            &ops::slice(b, &proj, last, 0, inner)?,
            &ops::gelu_erf(b, &ops::slice(b, &proj, last, inner, inner)?)?,
        )?;
        ops::add(b, &x, &self.ff_out.forward(b, &gated)?)
    }
}

/// A projection in or out of a spatial transformer: 1x1 conv (SD 1.x) or linear (SD 2.x).
enum Projection<B: Backend> {
    Conv(Conv2d<B>),
    Linear(Linear<B>),
}

/// diffusers `Transformer2DModel` with one transformer block.
struct SpatialTransformer<B: Backend> {
    norm: GroupNorm<B>,
    proj_in: Projection<B>,
    block: TransformerBlock<B>,
    proj_out: Projection<B>,
}

impl<B: Backend> SpatialTransformer<B> {
    fn load(p: &Params<B>, c: &UNetConfig, channels: usize, heads: usize) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection<B>> {
            Ok(if c.use_linear_projection {
                Projection::Linear(Linear::load(&p.at(name), channels, channels, true)?)
            } else {
                Projection::Conv(Conv2d::load(&p.at(name), channels, channels, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::load(&p.at("norm"), c.norm_num_groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            block: TransformerBlock::load(&p.at("transformer_blocks.0"), channels, c.cross_attention_dim, heads)?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>, context: &Tensor<B>) -> Result<Tensor<B>> {
        let (h, w) = (x.shape()[2], x.shape()[3]);
        let normed = self.norm.forward(b, x)?;
        let tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(b, &conv.forward(b, &normed)?)?,
            Projection::Linear(lin) => lin.forward(b, &to_tokens(b, &normed)?)?,
        };
        let tokens = self.block.forward(b, &tokens, context)?;
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(b, &from_tokens(b, &tokens, h, w)?)?,
            Projection::Linear(lin) => from_tokens(b, &lin.forward(b, &tokens)?, h, w)?,
        };
        ops::add(b, &out, x)
    }
}

/// Resnets, each optionally followed by a spatial transformer, then an optional resampler.
struct Stage<B: Backend> {
    resnets: Vec<ResnetBlock<B>>,
    attentions: Vec<SpatialTransformer<B>>,
    resample: Option<Conv2d<B>>,
}

pub struct UNet<B: Backend> {
    pub config: UNetConfig,
    conv_in: Conv2d<B>,
    time_1: Linear<B>,
    time_2: Linear<B>,
    down: Vec<Stage<B>>,
    mid_resnets: [ResnetBlock<B>; 2],
    mid_attention: SpatialTransformer<B>,
    up: Vec<Stage<B>>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    dtype: DType,
}

fn has_attention(block_type: &str, name: &str) -> Result<bool> {
    match block_type {
        "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(true),
        "DownBlock2D" | "UpBlock2D" => Ok(false),
        other => Err(Error::Invalid(format!(
            "UNet config: {name} `{other}` is not supported (SD 1.x/2.x blocks only)"
        ))),
    }
}

impl<B: Backend> UNet<B> {
    pub fn load(p: &Params<B>, config: UNetConfig) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let blocks = ch.len();
        if blocks == 0 || c.down_block_types.len() != blocks || c.up_block_types.len() != blocks {
            return Err(Error::Invalid(
                "UNet config: block_out_channels, down_block_types and up_block_types must have equal, non-zero lengths".into(),
            ));
        }
        // diffusers names the per-block head count `attention_head_dim` when `num_attention_heads` is unset.
        let heads = c.num_attention_heads.as_ref().unwrap_or(&c.attention_head_dim);
        let temb = 4 * ch[0];
        let (g, eps) = (c.norm_num_groups, c.norm_eps);
        let mut down = Vec::new();
        let mut input = ch[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let bp = p.at("down_blocks").at(i);
            let attn = has_attention(kind, "down_block_types")?;
            let out = ch[i];
            let mut stage = Stage {
                resnets: vec![],
                attentions: vec![],
                resample: None,
            };
            for j in 0..c.layers_per_block {
                let cin = if j == 0 { input } else { out };
                stage
                    .resnets
                    .push(ResnetBlock::load(&bp.at("resnets").at(j), cin, out, Some(temb), g, eps)?);
                if attn {
                    stage
                        .attentions
                        .push(SpatialTransformer::load(&bp.at("attentions").at(j), c, out, heads.get(i))?);
                }
            }
            if i + 1 < blocks {
                stage.resample = Some(Conv2d::load(&bp.at("downsamplers.0.conv"), out, out, 3, 2, 1)?);
            }
            down.push(stage);
            input = out;
        }
        let last = ch[blocks - 1];
        let mp = p.at("mid_block");
        let mid_resnets = [
            ResnetBlock::load(&mp.at("resnets.0"), last, last, Some(temb), g, eps)?,
            ResnetBlock::load(&mp.at("resnets.1"), last, last, Some(temb), g, eps)?,
        ];
        let mid_attention = SpatialTransformer::load(&mp.at("attentions.0"), c, last, heads.get(blocks - 1))?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = (0..blocks).rev().map(|i| heads.get(i)).collect();
        let mut up = Vec::new();
        let mut prev = last;
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let bp = p.at("up_blocks").at(i);
            let attn = has_attention(kind, "up_block_types")?;
            let out = rev[i];
            let skip_in = rev[(i + 1).min(blocks - 1)];
            let layers = c.layers_per_block + 1;
            let mut stage = Stage {
                resnets: vec![],
                attentions: vec![],
                resample: None,
            };
            for j in 0..layers {
                let skip = if j == layers - 1 { skip_in } else { out };
                let cin = if j == 0 { prev } else { out };
                stage
                    .resnets
                    .push(ResnetBlock::load(&bp.at("resnets").at(j), cin + skip, out, Some(temb), g, eps)?);
                if attn {
                    stage
                        .attentions
                        .push(SpatialTransformer::load(&bp.at("attentions").at(j), c, out, rev_heads[i])?);
                }
            }
            if i + 1 < blocks {
                stage.resample = Some(Conv2d::load(&bp.at("upsamplers.0.conv"), out, out, 3, 1, 1)?);
            }
            up.push(stage);
            prev = out;
        }
        Ok(Self {
            conv_in: Conv2d::load(&p.at("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            time_1: Linear::load(&p.at("time_embedding.linear_1"), ch[0], temb, true)?,
            time_2: Linear::load(&p.at("time_embedding.linear_2"), temb, temb, true)?,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: GroupNorm::load(&p.at("conv_norm_out"), g, ch[0], eps)?,
            conv_out: Conv2d::load(&p.at("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            dtype: p.dtype,
            config,
        })
    }

    /// The noise prediction for `x [n, in_channels, h, w]` at `timesteps` (one per batch row)
    /// given text embeddings `context [n, seq, cross_attention_dim]`.
    pub fn forward(&self, b: &B, x: &Tensor<B>, timesteps: &[f32], context: &Tensor<B>) -> Result<Tensor<B>> {
        let c = &self.config;
        let factor = 1 << (c.block_out_channels.len() - 1);
        let s = x.shape();
        if s.len() != 4 || s[1] != c.in_channels || !s[2].is_multiple_of(factor) || !s[3].is_multiple_of(factor) || timesteps.len() != s[0]
        {
            return Err(Error::Invalid(format!(
                "UNet input {s:?} with {} timesteps: expected [n, {}, h, w] with h and w multiples of {factor} and one timestep per row",
                timesteps.len(),
                c.in_channels
            )));
        }
        let ch0 = c.block_out_channels[0];
        let t = ops::timestep_embedding(b, timesteps, ch0, c.flip_sin_to_cos, c.freq_shift, 10000.0, self.dtype)?;
        let temb = self.time_2.forward(b, &ops::silu(b, &self.time_1.forward(b, &t)?)?)?;
        let temb = ops::silu(b, &temb)?;
        let mut h = self.conv_in.forward(b, x)?;
        let mut skips = vec![h.clone()];
        for stage in &self.down {
            for (j, resnet) in stage.resnets.iter().enumerate() {
                h = resnet.forward(b, &h, Some(&temb))?;
                if let Some(attn) = stage.attentions.get(j) {
                    h = attn.forward(b, &h, context)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &stage.resample {
                h = down.forward(b, &h)?;
                skips.push(h.clone());
            }
        }
        h = self.mid_resnets[0].forward(b, &h, Some(&temb))?;
        h = self.mid_attention.forward(b, &h, context)?;
        h = self.mid_resnets[1].forward(b, &h, Some(&temb))?;
        for stage in &self.up {
            for (j, resnet) in stage.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Invalid("UNet: more up layers than skip connections".into()))?;
                h = resnet.forward(b, &ops::concat(b, &[&h, &skip], 1)?, Some(&temb))?;
                if let Some(attn) = stage.attentions.get(j) {
                    h = attn.forward(b, &h, context)?;
                }
            }
            if let Some(conv) = &stage.resample {
                h = conv.forward(b, &ops::upsample_nearest(b, &h, 2)?)?;
            }
        }
        let h = self.norm_out.forward_silu(b, &h)?;
        self.conv_out.forward(b, &h)
    }
}
