//! UMT5 encoder (transformers `UMT5EncoderModel`), Wan2.1's text encoder: token embeddings,
//! pre-norm layers of self-attention with a learned relative-position bias per layer (no
//! score scaling, T5 style) and a gated-GELU feed-forward, RMS norms without mean.

use std::sync::Arc;

use serde::Deserialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::nn::{biased_attention, Linear};
use crate::ops;
use crate::parallel::par_chunks_mut;
use crate::tensor::{DType, HostData, HostTensor, Tensor};
use crate::weights::{Params, Weights};

/// Mirrors transformers' `UMT5Config` (encoder fields).
#[derive(Clone, Debug, Deserialize)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "d::buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d::max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "d::eps")]
    pub layer_norm_epsilon: f32,
    #[serde(default = "d::proj")]
    pub feed_forward_proj: String,
}

mod d {
    pub fn buckets() -> usize {
        32
    }
    pub fn max_distance() -> usize {
        128
    }
    pub fn eps() -> f32 {
        1e-6
    }
    pub fn proj() -> String {
        "gated-gelu".into()
    }
}

struct Layer<B: Backend> {
    attn_norm: Tensor<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    /// `[buckets, heads]`, kept on the host: the bias is built per sequence length there.
    relative_bias: Vec<f32>,
    ffn_norm: Tensor<B>,
    wi_0: Linear<B>,
    wi_1: Linear<B>,
    wo: Linear<B>,
}

pub struct Umt5Encoder<B: Backend> {
    pub config: Umt5Config,
    weights: Arc<Weights>,
    table: String,
    layers: Vec<Layer<B>>,
    final_norm: Tensor<B>,
    dtype: DType,
}

/// T5's bidirectional bucket of the relative position `key - query`, computed in f32 as the
/// reference does (its truncation decides bucket boundaries).
pub fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs() as usize;
    let exact = half / 2;
    bucket += if distance < exact {
        distance
    } else {
        let ratio = (distance as f32 / exact as f32).ln() / ((max_distance as f64 / exact as f64).ln() as f32);
        let large = exact + (ratio * (half - exact) as f32) as usize;
        large.min(half - 1)
    };
    bucket
}

impl<B: Backend> Umt5Encoder<B> {
    pub fn load(b: &B, config: Umt5Config, weights: Arc<Weights>, dtype: DType) -> Result<Self> {
        let c = &config;
        if c.feed_forward_proj != "gated-gelu" {
            return Err(Error::Invalid(format!(
                "UMT5 config: feed_forward_proj `{}` is not supported (gated-gelu)",
                c.feed_forward_proj
            )));
        }
        let p = Params::new(b, &weights, dtype);
        let table = ["shared.weight", "encoder.embed_tokens.weight"]
            .into_iter()
            .find(|t| weights.contains(t))
            .ok_or_else(|| Error::MissingTensor {
                file: weights.label().to_string(),
                tensor: "shared.weight".into(),
            })?
            .to_string();
        let (dm, inner) = (c.d_model, c.num_heads * c.d_kv);
        let layers = (0..c.num_layers)
            .map(|i| {
                let l = p.at("encoder.block").at(i);
                let a = l.at("layer.0.SelfAttention");
                let f = l.at("layer.1.DenseReluDense");
                let bias_name = a.full_name("relative_attention_bias.weight");
                Ok(Layer {
                    attn_norm: l.get("layer.0.layer_norm.weight", &[dm])?,
                    q: Linear::load(&a.at("q"), dm, inner, false)?,
                    k: Linear::load(&a.at("k"), dm, inner, false)?,
                    v: Linear::load(&a.at("v"), dm, inner, false)?,
                    o: Linear::load(&a.at("o"), inner, dm, false)?,
                    relative_bias: weights
                        .load(&bias_name, &[c.relative_attention_num_buckets, c.num_heads], DType::F32)?
                        .to_f32(),
                    ffn_norm: l.get("layer.1.layer_norm.weight", &[dm])?,
                    wi_0: Linear::load(&f.at("wi_0"), dm, c.d_ff, false)?,
                    wi_1: Linear::load(&f.at("wi_1"), dm, c.d_ff, false)?,
                    wo: Linear::load(&f.at("wo"), c.d_ff, dm, false)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            final_norm: p.get("encoder.final_layer_norm.weight", &[dm])?,
            config,
            weights,
            table,
            layers,
            dtype,
        })
    }

    /// Last hidden state `[batch, seq, d_model]` for rows of `seq` ids whose first `lens[i]`
    /// tokens are real (the rest is padding, masked as keys).
    pub fn forward(&self, b: &B, ids: &[Vec<u32>], lens: &[usize]) -> Result<Tensor<B>> {
        let c = &self.config;
        let seq = ids.first().map_or(0, Vec::len);
        if seq == 0 || ids.iter().any(|r| r.len() != seq) || lens.len() != ids.len() {
            return Err(Error::Invalid(
                "UMT5 encoder takes non-empty rows of equal length, one length each".into(),
            ));
        }
        let (batch, heads, dm) = (ids.len(), c.num_heads, c.d_model);
        let flat: Vec<u32> = ids.concat();
        let mut x = b
            .upload(&self.weights.load_rows(&self.table, &flat, self.dtype)?)?
            .reshape(&[batch, seq, dm])?;
        let buckets: Vec<usize> = (0..seq * seq)
            .map(|i| {
                relative_bucket(
                    (i % seq) as i64 - (i / seq) as i64,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                )
            })
            .collect();
        let split = |t: &Tensor<B>| ops::permute(b, &t.reshape(&[batch, seq, heads, c.d_kv])?, &[0, 2, 1, 3]);
        // The padding mask over keys, per row; added to each layer's position bias on the
        // device, so the host builds `heads * seq^2` values a layer rather than `batch` times
        // as many (at 512 tokens and 64 heads, 17 million).
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&len| (0..seq).map(move |k| if k >= len { -30000.0 } else { 0.0 }))
            .collect();
        let mask = b.upload(&HostTensor::new(&[batch, 1, 1, seq], HostData::from_f32(self.dtype, mask))?)?;
        for l in &self.layers {
            let (table, mut position) = (&l.relative_bias, vec![0.0f32; heads * seq * seq]);
            par_chunks_mut(&mut position, seq * seq, |h, out| {
                for (o, &bk) in out.iter_mut().zip(&buckets) {
                    *o = table[bk * heads + h];
                }
            });
            let position = b.upload(&HostTensor::new(&[1, heads, seq, seq], HostData::from_f32(self.dtype, position))?)?;
            let bias = ops::add(b, &position, &mask)?.reshape(&[batch * heads, seq, seq])?;
            let h = ops::rms_norm(b, &x, Some(&l.attn_norm), c.layer_norm_epsilon)?;
            let (q, k, v) = (l.q.forward(b, &h)?, l.k.forward(b, &h)?, l.v.forward(b, &h)?);
            let a = biased_attention(b, &split(&q)?, &split(&k)?, &split(&v)?, &bias, 1.0)?;
            let a = ops::permute(b, &a, &[0, 2, 1, 3])?.reshape(&[batch, seq, heads * c.d_kv])?;
            x = ops::add(b, &x, &l.o.forward(b, &a)?)?;
            let h = ops::rms_norm(b, &x, Some(&l.ffn_norm), c.layer_norm_epsilon)?;
            let gated = ops::mul(b, &ops::gelu_tanh(b, &l.wi_0.forward(b, &h)?)?, &l.wi_1.forward(b, &h)?)?;
            x = ops::add(b, &x, &l.wo.forward(b, &gated)?)?;
        }
        ops::rms_norm(b, &x, Some(&self.final_norm), c.layer_norm_epsilon)
    }
}
