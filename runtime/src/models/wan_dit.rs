//! Wan2.1's video denoiser (diffusers `WanTransformer3DModel`): a 3D patch embedding, a
//! timestep embedding projected to six adaLN modulation vectors per block, and transformer
//! blocks of self-attention with RMS-normed q/k and 3D rotary embedding, cross-attention to
//! the text, and a GELU-tanh feed-forward, each gated by the modulation.
//!
//! The forward is split into `embed`, `run_blocks` and `head` so that a range of blocks can
//! run elsewhere (remote offload sends the hidden tokens and `BlockInputs` across).

use std::ops::Range;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::denoiser::{check_last_repeats, TextContext};
use crate::models::nn::{biased_multi_head_attention, multi_head_attention, LayerNorm, Linear};
use crate::ops;
use crate::spec::UnaryOp;
use crate::tensor::{DType, HostTensor, Tensor};
use crate::weights::{Params, Weights};

/// Mirrors diffusers' `WanTransformer3DModel` config (text-to-video fields).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct WanDitConfig {
    #[serde(default = "d::patch_size")]
    pub patch_size: [usize; 3],
    #[serde(default = "d::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d::attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d::channels")]
    pub in_channels: usize,
    #[serde(default = "d::channels")]
    pub out_channels: usize,
    #[serde(default = "d::text_dim")]
    pub text_dim: usize,
    #[serde(default = "d::freq_dim")]
    pub freq_dim: usize,
    #[serde(default = "d::ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "d::num_layers")]
    pub num_layers: usize,
    #[serde(default = "d::cross_attn_norm")]
    pub cross_attn_norm: bool,
    #[serde(default = "d::eps")]
    pub eps: f32,
    #[serde(default)]
    pub image_dim: Option<usize>,
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
}

mod d {
    pub fn patch_size() -> [usize; 3] {
        [1, 2, 2]
    }
    pub fn num_attention_heads() -> usize {
        40
    }
    pub fn attention_head_dim() -> usize {
        128
    }
    pub fn channels() -> usize {
        16
    }
    pub fn text_dim() -> usize {
        4096
    }
    pub fn freq_dim() -> usize {
        256
    }
    pub fn ffn_dim() -> usize {
        13824
    }
    pub fn num_layers() -> usize {
        40
    }
    pub fn cross_attn_norm() -> bool {
        true
    }
    pub fn eps() -> f32 {
        1e-6
    }
}

/// The diffusers name of a tensor named as in the original Wan2.1 release (and the
/// single-file checkpoints that repackage it): `self_attn.q`, `ffn.0`, `norm3` (the
/// cross-attention norm), `modulation`, `head.head` ...
fn diffusers_name(original: &str) -> String {
    const RENAMES: [(&str, &str); 16] = [
        ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
        ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
        ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
        ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
        ("time_projection.1.", "condition_embedder.time_proj."),
        ("head.head.", "proj_out."),
        (".self_attn.", ".attn1."),
        (".cross_attn.", ".attn2."),
        (".o.", ".to_out.0."),
        (".q.", ".to_q."),
        (".k.", ".to_k."),
        (".v.", ".to_v."),
        (".ffn.0.", ".ffn.net.0.proj."),
        (".ffn.2.", ".ffn.net.2."),
        (".norm3.", ".norm2."),
        (".modulation", ".scale_shift_table"),
    ];
    let name = original.strip_prefix("model.diffusion_model.").unwrap_or(original);
    if name == "head.modulation" {
        return "scale_shift_table".into();
    }
    RENAMES.iter().fold(name.to_string(), |n, (from, to)| n.replacen(from, to, 1))
}

/// DiT weights under the diffusers names, whether the file uses them or the original
/// release's (recognised by its `head.head.weight`).
pub fn with_diffusers_names(weights: Weights) -> Weights {
    if weights.contains("head.head.weight") || weights.contains("model.diffusion_model.head.head.weight") {
        weights.renamed(|n| Some(diffusers_name(n)))
    } else {
        weights
    }
}

impl WanDitConfig {
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// Wan attention: biased q/k/v projections, RMS norm of q and k across all heads, optional
/// rotary embedding (self-attention only).
struct WanAttention<B: Backend> {
    heads: usize,
    eps: f32,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
    norm_q: Tensor<B>,
    norm_k: Tensor<B>,
}

impl<B: Backend> WanAttention<B> {
    fn load(p: &Params<B>, dim: usize, heads: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            heads,
            eps,
            q: Linear::load(&p.at("to_q"), dim, dim, true)?,
            k: Linear::load(&p.at("to_k"), dim, dim, true)?,
            v: Linear::load(&p.at("to_v"), dim, dim, true)?,
            out: Linear::load(&p.at("to_out.0"), dim, dim, true)?,
            norm_q: p.get("norm_q.weight", &[dim])?,
            norm_k: p.get("norm_k.weight", &[dim])?,
        })
    }

    /// `residual + gate * attention(x)` (no gate: 1), over `context` (cross-attention, with
    /// its bias on the scores when given) or `x`.
    fn forward(
        &self,
        b: &B,
        x: &Tensor<B>,
        context: Option<(&Tensor<B>, Option<&Tensor<B>>)>,
        rope: Option<(&Tensor<B>, &Tensor<B>)>,
        residual: &Tensor<B>,
        gate: Option<&Tensor<B>>,
    ) -> Result<Tensor<B>> {
        let (ctx, key_bias) = context.unwrap_or((x, None));
        let norm = |t: &Tensor<B>, gamma: &Tensor<B>| match rope {
            Some((cos, sin)) => ops::rms_norm_rope(b, t, Some(gamma), self.eps, cos, sin),
            None => ops::rms_norm(b, t, Some(gamma), self.eps),
        };
        let q = norm(&self.q.forward(b, x)?, &self.norm_q)?;
        let k = norm(&self.k.forward(b, ctx)?, &self.norm_k)?;
        let v = self.v.forward(b, ctx)?;
        let attended = match key_bias {
            None => multi_head_attention(b, &q, &k, &v, self.heads)?,
            Some(bias) => biased_multi_head_attention(b, &q, &k, &v, bias, self.heads)?,
        };
        self.out.forward_residual(b, residual, &attended, gate)
    }
}

struct Block<B: Backend> {
    modulation: Tensor<B>,
    self_attn: WanAttention<B>,
    cross_norm: Option<LayerNorm<B>>,
    cross_attn: WanAttention<B>,
    ffn_in: Linear<B>,
    ffn_out: Linear<B>,
}

/// Activations between the stages of the forward.
pub struct DitState<B: Backend> {
    /// Tokens `[batch, frames*height*width (patched), dim]`.
    pub hidden: Tensor<B>,
    /// Time embedding `[batch, dim]` (for the output modulation).
    pub temb: Tensor<B>,
    /// The patched grid: frames, height, width.
    pub grid: [usize; 3],
    pub blocks: BlockInputs<B>,
}

/// What every block reads besides the hidden tokens: all a worker running a range of blocks
/// needs (it rebuilds the rotary tables from the grid).
pub struct BlockInputs<B: Backend> {
    /// Time embedding projected to the six modulation vectors `[batch, 6, dim]`.
    pub modulation: Tensor<B>,
    /// Projected text `[batch, text_len, dim]`.
    pub context: Tensor<B>,
    /// Added to the cross-attention scores `[1, 1, text_len]` when the last text position
    /// stands for several (`TextContext`): ln(repeats) on that key.
    pub context_bias: Option<Tensor<B>>,
    /// Rotary tables `[tokens, head_dim / 2]`.
    pub rope_cos: Tensor<B>,
    pub rope_sin: Tensor<B>,
}

pub struct WanDit<B: Backend> {
    pub config: WanDitConfig,
    patch_weight: Tensor<B>,
    patch_bias: Tensor<B>,
    time_1: Linear<B>,
    time_2: Linear<B>,
    time_proj: Linear<B>,
    text_1: Linear<B>,
    text_2: Linear<B>,
    blocks: Vec<Block<B>>,
    out_modulation: Tensor<B>,
    proj_out: Linear<B>,
    dtype: DType,
    /// The rotary tables of the last grid asked for, on the device: a denoising loop asks for
    /// the same grid at every step, and building and uploading them (16 MB in bf16 at 32,760
    /// tokens) kept the GPU waiting at the start of every forward.
    rope: Mutex<Option<RopeTables<B>>>,
}

/// Rotary tables on the device for one patched grid.
struct RopeTables<B: Backend> {
    grid: [usize; 3],
    cos: Tensor<B>,
    sin: Tensor<B>,
}

impl<B: Backend> WanDit<B> {
    pub fn load(p: &Params<B>, config: WanDitConfig) -> Result<Self> {
        let c = &config;
        if c.image_dim.is_some() || c.added_kv_proj_dim.is_some() {
            return Err(Error::Invalid(
                "Wan DiT config: image conditioning (I2V) is not supported, text-to-video only".into(),
            ));
        }
        if c.patch_size[0] != 1 || !c.attention_head_dim.is_multiple_of(2) || c.attention_head_dim < 6 {
            return Err(Error::Invalid(format!(
                "Wan DiT config: patch size {:?} / head dim {} not supported (temporal patch 1, even head dim >= 6)",
                c.patch_size, c.attention_head_dim
            )));
        }
        let (dim, heads, eps) = (c.dim(), c.num_attention_heads, c.eps);
        let [pt, ph, pw] = c.patch_size;
        let blocks = (0..c.num_layers)
            .map(|i| {
                let bp = p.at("blocks").at(i);
                Ok(Block {
                    modulation: bp.get("scale_shift_table", &[1, 6, dim])?,
                    self_attn: WanAttention::load(&bp.at("attn1"), dim, heads, eps)?,
                    cross_norm: c.cross_attn_norm.then(|| LayerNorm::load(&bp.at("norm2"), dim, eps)).transpose()?,
                    cross_attn: WanAttention::load(&bp.at("attn2"), dim, heads, eps)?,
                    ffn_in: Linear::load(&bp.at("ffn.net.0.proj"), dim, c.ffn_dim, true)?,
                    ffn_out: Linear::load(&bp.at("ffn.net.2"), c.ffn_dim, dim, true)?,
                })
            })
            .collect::<Result<_>>()?;
        let ce = p.at("condition_embedder");
        Ok(Self {
            patch_weight: p.get("patch_embedding.weight", &[dim, c.in_channels, pt, ph, pw])?,
            patch_bias: p.get("patch_embedding.bias", &[dim])?,
            time_1: Linear::load(&ce.at("time_embedder.linear_1"), c.freq_dim, dim, true)?,
            time_2: Linear::load(&ce.at("time_embedder.linear_2"), dim, dim, true)?,
            time_proj: Linear::load(&ce.at("time_proj"), dim, 6 * dim, true)?,
            text_1: Linear::load(&ce.at("text_embedder.linear_1"), c.text_dim, dim, true)?,
            text_2: Linear::load(&ce.at("text_embedder.linear_2"), dim, dim, true)?,
            blocks,
            out_modulation: p.get("scale_shift_table", &[1, 2, dim])?,
            proj_out: Linear::load(&p.at("proj_out"), dim, c.out_channels * pt * ph * pw, true)?,
            dtype: p.dtype,
            rope: Mutex::new(None),
            config,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Patch embedding, time and text embeddings, rotary tables for the latent `x [batch,
    /// in_channels, frames, height, width]` at `timesteps` (one per row) with text
    /// `context [batch, text_len, text_dim]`.
    pub fn embed(&self, b: &B, x: &Tensor<B>, timesteps: &[f32], text: &TextContext<B>) -> Result<DitState<B>> {
        let c = &self.config;
        let s = x.shape();
        let [pt, ph, pw] = c.patch_size;
        if s.len() != 5
            || s[1] != c.in_channels
            || !s[2].is_multiple_of(pt)
            || !s[3].is_multiple_of(ph)
            || !s[4].is_multiple_of(pw)
            || timesteps.len() != s[0]
        {
            return Err(Error::Invalid(format!(
                "Wan DiT input {s:?} with {} timesteps: expected [n, {}, frames, h, w] with h, w multiples of {ph}, {pw} and one timestep per row",
                timesteps.len(),
                c.in_channels
            )));
        }
        let cs = text.states.shape();
        if cs.len() != 3 || cs[0] != s[0] || cs[2] != c.text_dim {
            return Err(Error::Invalid(format!(
                "Wan DiT text context {cs:?}: expected [{}, text_len, {}]",
                s[0], c.text_dim
            )));
        }
        let (n, dim) = (s[0], c.dim());
        let grid = [s[2] / pt, s[3] / ph, s[4] / pw];
        let tokens = grid.iter().product::<usize>();
        let patches = ops::conv3d(b, x, &self.patch_weight, Some(&self.patch_bias), c.patch_size, [0; 3], [0; 3], 1)?;
        let hidden = ops::permute(b, &patches.reshape(&[n, dim, tokens])?, &[0, 2, 1])?;
        let t = ops::timestep_embedding(b, timesteps, c.freq_dim, true, 0.0, 10000.0, self.dtype)?;
        let temb = self.time_2.forward(b, &ops::silu(b, &self.time_1.forward(b, &t)?)?)?;
        let modulation = self.time_proj.forward(b, &ops::silu(b, &temb)?)?.reshape(&[n, 6, dim])?;
        let projected = self.project_text(b, text)?;
        Ok(DitState {
            hidden,
            temb,
            grid,
            blocks: self.block_inputs(b, modulation, &projected, grid)?,
        })
    }

    /// The text embedder's output `[batch, positions, dim]`: row-wise, so a position standing
    /// for several stays one.
    pub fn project_text(&self, b: &B, text: &TextContext<B>) -> Result<TextContext<B>> {
        Ok(TextContext {
            states: self
                .text_2
                .forward(b, &self.text_1.forward_then(b, &text.states, UnaryOp::GeluTanh)?)?,
            last_repeats: text.last_repeats,
        })
    }

    /// The block inputs for modulation `[batch, 6, dim]` and projected text on a patched grid.
    pub fn block_inputs(&self, b: &B, modulation: Tensor<B>, text: &TextContext<B>, grid: [usize; 3]) -> Result<BlockInputs<B>> {
        let (context, context_bias) = self.cross_attention_text(b, text)?;
        let mut cached = self.rope.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let tables = match cached.as_ref() {
            Some(t) if t.grid == grid => t,
            _ => {
                let (cos, sin) = ops::rope3d_tables(grid[0], grid[1], grid[2], self.config.attention_head_dim, 10000.0)?;
                cached.insert(RopeTables {
                    grid,
                    cos: b.upload(&cos.to_dtype(self.dtype))?,
                    sin: b.upload(&sin.to_dtype(self.dtype))?,
                })
            }
        };
        Ok(BlockInputs {
            modulation,
            context,
            context_bias,
            rope_cos: tables.cos.clone(),
            rope_sin: tables.sin.clone(),
        })
    }

    /// The projected text as the cross-attention reads it: in f32 its positions once each,
    /// ln(repeats) added to the last one's scores (softmax over m equal keys gives one of them
    /// ln(m) more score), which spares the keys and values of Wan's ~500 padding positions. The
    /// scores of that path are materialised in the model's dtype, where the fused attention
    /// keeps them in f32, so half dtypes repeat the last position instead.
    fn cross_attention_text(&self, b: &B, text: &TextContext<B>) -> Result<(Tensor<B>, Option<Tensor<B>>)> {
        let s = text.states.shape();
        let repeats = text.last_repeats;
        check_last_repeats(repeats, true)?;
        if s.len() != 3 || s[1] == 0 {
            return Err(Error::Invalid(format!("Wan DiT text {s:?}: expected [batch, positions >= 1, dim]")));
        }
        if repeats == 1 {
            return Ok((text.states.clone(), None));
        }
        let positions = s[1];
        if self.dtype == DType::F32 {
            let mut bias = vec![0.0f32; positions];
            bias[positions - 1] = (repeats as f32).ln();
            let bias = b.upload(&HostTensor::from_f32(&[1, 1, positions], bias)?)?;
            return Ok((text.states.clone(), Some(bias)));
        }
        let last = ops::slice(b, &text.states, 1, positions - 1, 1)?;
        let ones = b.upload(&HostTensor::from_f32(&[1, repeats - 1, 1], vec![1.0; repeats - 1])?.to_dtype(self.dtype))?;
        let context = ops::concat(b, &[&text.states, &ops::mul(b, &last, &ones)?], 1)?;
        Ok((context, None))
    }

    /// Runs blocks `range` on `hidden`.
    pub fn run_blocks(&self, b: &B, hidden: Tensor<B>, inputs: &BlockInputs<B>, range: Range<usize>) -> Result<Tensor<B>> {
        if range.end > self.blocks.len() || range.start > range.end {
            return Err(Error::Invalid(format!(
                "blocks {range:?} are outside the model's {} blocks",
                self.blocks.len()
            )));
        }
        let tokens = inputs.rope_cos.shape()[0];
        let hs = hidden.shape();
        if hs.len() != 3 || hs[1] != tokens || hs[2] != self.config.dim() || inputs.modulation.shape()[0] != hs[0] {
            return Err(Error::Invalid(format!(
                "Wan DiT blocks: hidden {hs:?} does not fit {tokens} tokens of width {} with modulation {:?}",
                self.config.dim(),
                inputs.modulation.shape()
            )));
        }
        self.blocks[range]
            .iter()
            .try_fold(hidden, |h, block| self.block(b, block, h, inputs))
    }

    fn block(&self, b: &B, block: &Block<B>, x: Tensor<B>, s: &BlockInputs<B>) -> Result<Tensor<B>> {
        let eps = self.config.eps;
        let m = ops::add(b, &block.modulation, &s.modulation)?;
        let part = |i: usize| ops::slice(b, &m, 1, i, 1);
        let (shift, scale, gate) = (part(0)?, part(1)?, part(2)?);
        let (c_shift, c_scale, c_gate) = (part(3)?, part(4)?, part(5)?);
        let h = ops::layer_norm_modulate(b, &x, &scale, &shift, eps)?;
        let x = block
            .self_attn
            .forward(b, &h, None, Some((&s.rope_cos, &s.rope_sin)), &x, Some(&gate))?;
        let h = match &block.cross_norm {
            Some(norm) => norm.forward(b, &x)?,
            None => x.clone(),
        };
        let x = block
            .cross_attn
            .forward(b, &h, Some((&s.context, s.context_bias.as_ref())), None, &x, None)?;
        let h = ops::layer_norm_modulate(b, &x, &c_scale, &c_shift, eps)?;
        block
            .ffn_out
            .forward_residual(b, &x, &block.ffn_in.forward_then(b, &h, UnaryOp::GeluTanh)?, Some(&c_gate))
    }

    /// Output modulation, projection and unpatchify: the velocity `[batch, out_channels,
    /// frames, height, width]`.
    pub fn head(&self, b: &B, s: &DitState<B>) -> Result<Tensor<B>> {
        let c = &self.config;
        let (n, dim) = (s.hidden.shape()[0], c.dim());
        let m = ops::add(b, &self.out_modulation, &s.temb.reshape(&[n, 1, dim])?)?;
        let (shift, scale) = (ops::slice(b, &m, 1, 0, 1)?, ops::slice(b, &m, 1, 1, 1)?);
        let h = ops::layer_norm_modulate(b, &s.hidden, &scale, &shift, c.eps)?;
        let out = self.proj_out.forward(b, &h)?;
        let [f, hh, ww] = s.grid;
        let [_, ph, pw] = c.patch_size;
        let co = c.out_channels;
        let per_row = (0..n)
            .map(|i| {
                let row = ops::slice(b, &out, 0, i, 1)?.reshape(&[f, hh, ww, ph, pw, co])?;
                ops::permute(b, &row, &[5, 0, 1, 3, 2, 4])?.reshape(&[1, co, f, hh * ph, ww * pw])
            })
            .collect::<Result<Vec<_>>>()?;
        ops::concat(b, &per_row.iter().collect::<Vec<_>>(), 0)
    }

    pub fn forward(&self, b: &B, x: &Tensor<B>, timesteps: &[f32], text: &TextContext<B>) -> Result<Tensor<B>> {
        let mut state = self.embed(b, x, timesteps, text)?;
        state.hidden = self.run_blocks(b, state.hidden, &state.blocks, 0..self.blocks.len())?;
        self.head(b, &state)
    }
}
