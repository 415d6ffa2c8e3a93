//! The layers the models share, each loaded from its checkpoint prefix and run with `ops`.

use crate::backend::Backend;
use crate::error::Result;
use crate::ops;
use crate::spec::UnaryOp;
use crate::tensor::Tensor;
use crate::weights::Params;

/// PyTorch `Linear`: `y = x W^T + b`, weight `[out, in]`.
pub struct Linear<B: Backend> {
    pub weight: Tensor<B>,
    pub bias: Option<Tensor<B>>,
}

impl<B: Backend> Linear<B> {
    pub fn load(p: &Params<B>, input: usize, output: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: p.get("weight", &[output, input])?,
            bias: if bias { Some(p.get("bias", &[output])?) } else { None },
        })
    }

    pub fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        ops::linear(b, x, &self.weight, self.bias.as_ref())
    }

    /// `then(forward(x))`, the activation fused into the product where the backend can.
    pub fn forward_then(&self, b: &B, x: &Tensor<B>, then: UnaryOp) -> Result<Tensor<B>> {
        ops::linear_then(b, x, &self.weight, self.bias.as_ref(), then)
    }

    /// `residual + gate * forward(x)` (no gate: 1), folded into the product where the
    /// backend can.
    pub fn forward_residual(&self, b: &B, residual: &Tensor<B>, x: &Tensor<B>, gate: Option<&Tensor<B>>) -> Result<Tensor<B>> {
        ops::linear_residual(b, residual, x, &self.weight, self.bias.as_ref(), gate)
    }
}

/// PyTorch `Conv2d` with a square kernel and stride; padding `[height, width]` before
/// (`pad_lo`) and after (`pad_hi`) the input, symmetric unless set otherwise.
pub struct Conv2d<B: Backend> {
    pub weight: Tensor<B>,
    pub bias: Option<Tensor<B>>,
    pub stride: usize,
    pub pad_lo: [usize; 2],
    pub pad_hi: [usize; 2],
}

impl<B: Backend> Conv2d<B> {
    pub fn load(p: &Params<B>, input: usize, output: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            weight: p.get("weight", &[output, input, kernel, kernel])?,
            bias: Some(p.get("bias", &[output])?),
            stride,
            pad_lo: [padding; 2],
            pad_hi: [padding; 2],
        })
    }

    pub fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        ops::conv2d_padded(b, x, &self.weight, self.bias.as_ref(), self.stride, self.pad_lo, self.pad_hi, 1)
    }
}

/// Group norm with affine parameters over `[n, c, ...]`.
pub struct GroupNorm<B: Backend> {
    pub groups: usize,
    pub eps: f32,
    pub gamma: Tensor<B>,
    pub beta: Tensor<B>,
}

impl<B: Backend> GroupNorm<B> {
    pub fn load(p: &Params<B>, groups: usize, channels: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            groups,
            eps,
            gamma: p.get("weight", &[channels])?,
            beta: p.get("bias", &[channels])?,
        })
    }

    pub fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        ops::group_norm(b, x, self.groups, Some(&self.gamma), Some(&self.beta), self.eps)
    }

    /// `silu(self.forward(x))` in one pass where the backend fuses it.
    pub fn forward_silu(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        ops::group_norm_silu(b, x, self.groups, Some(&self.gamma), Some(&self.beta), self.eps)
    }
}

/// Layer norm over the last dimension, with optional affine parameters.
pub struct LayerNorm<B: Backend> {
    pub eps: f32,
    pub gamma: Option<Tensor<B>>,
    pub beta: Option<Tensor<B>>,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(p: &Params<B>, dim: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            eps,
            gamma: Some(p.get("weight", &[dim])?),
            beta: Some(p.get("bias", &[dim])?),
        })
    }

    pub fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        ops::layer_norm(b, x, self.gamma.as_ref(), self.beta.as_ref(), self.eps)
    }
}

/// Multi-head attention on `[batch, seq, heads * head_dim]` activations, read and written in
/// place as `[batch, seq, heads, head_dim]` (no permutes).
pub fn multi_head_attention<B: Backend>(b: &B, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>, heads: usize) -> Result<Tensor<B>> {
    let (batch, q_len, dim) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let kv_len = k.shape()[1];
    let head_dim = dim / heads;
    let split = |t: &Tensor<B>, len: usize| t.reshape(&[batch, len, heads, head_dim]);
    let out = ops::attention_tokens_first(
        b,
        &split(q, q_len)?,
        &split(k, kv_len)?,
        &split(v, kv_len)?,
        1.0 / (head_dim as f32).sqrt(),
    )?;
    out.reshape(&[batch, q_len, dim])
}

/// `multi_head_attention` with `bias` (broadcastable to `[batch * heads, q_len, kv_len]`)
/// added to the scores, through `biased_attention`: for few keys, as it materialises scores.
pub fn biased_multi_head_attention<B: Backend>(
    b: &B,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    bias: &Tensor<B>,
    heads: usize,
) -> Result<Tensor<B>> {
    let (batch, q_len, dim) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let head_dim = dim / heads;
    let heads_first = |t: &Tensor<B>| ops::permute(b, &t.reshape(&[batch, t.shape()[1], heads, head_dim])?, &[0, 2, 1, 3]);
    let out = biased_attention(
        b,
        &heads_first(q)?,
        &heads_first(k)?,
        &heads_first(v)?,
        bias,
        1.0 / (head_dim as f32).sqrt(),
    )?;
    ops::permute(b, &out, &[0, 2, 1, 3])?.reshape(&[batch, q_len, dim])
}

/// Attention with an additive bias on the scores (a causal mask, a relative position bias),
/// for the short sequences of text encoders: q `[batch, heads, q_len, d]`, k and v
/// `[batch, heads, kv_len, d]`, `bias` broadcastable to `[batch * heads, q_len, kv_len]`.
/// The score matrix is materialised, which is why long sequences use `ops::attention`.
pub fn biased_attention<B: Backend>(b: &B, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>, bias: &Tensor<B>, scale: f32) -> Result<Tensor<B>> {
    let (batch, heads, q_len, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let kv_len = k.shape()[2];
    let flat = |t: &Tensor<B>, len: usize| t.reshape(&[batch * heads, len, d]);
    let scores = ops::matmul(b, &flat(q, q_len)?, &flat(k, kv_len)?, None, false, true)?;
    let probs = ops::softmax(b, &ops::add_scaled(b, &scores, bias, scale, 1.0)?)?;
    ops::matmul(b, &probs, &flat(v, kv_len)?, None, false, false)?.reshape(&[batch, heads, q_len, d])
}

/// The activations reference configs name (`hidden_act`, `act_fn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum Activation {
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "gelu")]
    Gelu,
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl Activation {
    pub fn forward<B: Backend>(self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        match self {
            // x * sigmoid(1.702 x)
            Activation::QuickGelu => {
                let gate = ops::unary(b, &ops::scale(b, x, 1.702, 0.0)?, UnaryOp::Sigmoid)?;
                ops::mul(b, x, &gate)
            }
            Activation::Gelu => ops::gelu_erf(b, x),
            Activation::GeluTanh => ops::gelu_tanh(b, x),
            Activation::Silu => ops::silu(b, x),
        }
    }
}

/// diffusers `Attention`: q/k/v projections (with bias in the VAE, without in the UNet), heads,
/// and `to_out.0`. `context` is the cross-attention input (`None`: self-attention).
pub struct Attention<B: Backend> {
    pub heads: usize,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> Attention<B> {
    pub fn load(p: &Params<B>, dim: usize, context_dim: usize, heads: usize, qkv_bias: bool) -> Result<Self> {
        Ok(Self {
            heads,
            q: Linear::load(&p.at("to_q"), dim, dim, qkv_bias)?,
            k: Linear::load(&p.at("to_k"), context_dim, dim, qkv_bias)?,
            v: Linear::load(&p.at("to_v"), context_dim, dim, qkv_bias)?,
            out: Linear::load(&p.at("to_out.0"), dim, dim, true)?,
        })
    }

    /// `x [batch, seq, dim]`, `context [batch, ctx_seq, context_dim]`.
    pub fn forward(&self, b: &B, x: &Tensor<B>, context: Option<&Tensor<B>>) -> Result<Tensor<B>> {
        let ctx = context.unwrap_or(x);
        let q = self.q.forward(b, x)?;
        let (k, v) = (self.k.forward(b, ctx)?, self.v.forward(b, ctx)?);
        self.out.forward(b, &multi_head_attention(b, &q, &k, &v, self.heads)?)
    }
}

/// diffusers `ResnetBlock2D`: GN, SiLU, conv, (+ projected time embedding), GN, SiLU, conv,
/// plus the input (through a 1x1 conv when the channel count changes).
pub struct ResnetBlock<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    time_proj: Option<Linear<B>>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock<B> {
    pub fn load(p: &Params<B>, input: usize, output: usize, temb: Option<usize>, groups: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&p.at("norm1"), groups, input, eps)?,
            conv1: Conv2d::load(&p.at("conv1"), input, output, 3, 1, 1)?,
            time_proj: temb.map(|t| Linear::load(&p.at("time_emb_proj"), t, output, true)).transpose()?,
            norm2: GroupNorm::load(&p.at("norm2"), groups, output, eps)?,
            conv2: Conv2d::load(&p.at("conv2"), output, output, 3, 1, 1)?,
            shortcut: (input != output)
                .then(|| Conv2d::load(&p.at("conv_shortcut"), input, output, 1, 1, 0))
                .transpose()?,
        })
    }

    /// `x [n, c, h, w]`; `temb_act` is SiLU(time embedding) `[n, temb]`, shared by all blocks.
    pub fn forward(&self, b: &B, x: &Tensor<B>, temb_act: Option<&Tensor<B>>) -> Result<Tensor<B>> {
        let mut h = self.conv1.forward(b, &self.norm1.forward_silu(b, x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_proj, temb_act) {
            let t = proj.forward(b, t)?;
            let (n, c) = (t.shape()[0], t.shape()[1]);
            h = ops::add(b, &h, &t.reshape(&[n, c, 1, 1])?)?;
        }
        let h = self.conv2.forward(b, &self.norm2.forward_silu(b, &h)?)?;
        let x = match &self.shortcut {
            Some(s) => s.forward(b, x)?,
            None => x.clone(),
        };
        ops::add(b, &x, &h)
    }
}

/// `[n, c, h, w]` -> `[n, h*w, c]`, the token layout attention runs on.
pub fn to_tokens<B: Backend>(b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
    let s = x.shape();
    let (n, c, hw) = (s[0], s[1], s[2] * s[3]);
    ops::permute(b, &x.reshape(&[n, c, hw])?, &[0, 2, 1])
}

/// `[n, h*w, c]` -> `[n, c, h, w]`.
pub fn from_tokens<B: Backend>(b: &B, x: &Tensor<B>, h: usize, w: usize) -> Result<Tensor<B>> {
    let (n, c) = (x.shape()[0], x.shape()[2]);
    ops::permute(b, x, &[0, 2, 1])?.reshape(&[n, c, h, w])
}
