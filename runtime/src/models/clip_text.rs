//! CLIP text encoder (transformers `CLIPTextModel`): token + position embeddings, pre-norm
//! transformer layers with causal self-attention, final layer norm. SD 1.x uses ViT-L/14's
//! (12 layers, 768 wide, quick-GELU); SD 2.x OpenCLIP ViT-H's (23 layers, 1024, GELU).

use std::sync::Arc;

use serde::Deserialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::nn::{biased_attention, Activation, LayerNorm, Linear};
use crate::ops;
use crate::tensor::{DType, HostTensor, Tensor};
use crate::weights::{Params, Weights};

/// Mirrors transformers' `CLIPTextConfig`.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f32,
}

mod defaults {
    use super::Activation;
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> Activation {
        Activation::QuickGelu
    }
    pub fn layer_norm_eps() -> f32 {
        1e-5
    }
}

struct Layer<B: Backend> {
    norm1: LayerNorm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
    norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

pub struct ClipTextEncoder<B: Backend> {
    pub config: ClipTextConfig,
    weights: Arc<Weights>,
    token_table: String,
    positions: Tensor<B>,
    layers: Vec<Layer<B>>,
    final_norm: LayerNorm<B>,
    dtype: DType,
}

impl<B: Backend> ClipTextEncoder<B> {
    pub fn load(b: &B, config: ClipTextConfig, weights: Arc<Weights>, dtype: DType) -> Result<Self> {
        let c = &config;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        if c.num_attention_heads == 0 || d % c.num_attention_heads != 0 {
            return Err(Error::Invalid(format!(
                "CLIP text config: {} heads do not divide hidden size {d}",
                c.num_attention_heads
            )));
        }
        // transformers 4 saved under `text_model.`, transformers 5 saves without it.
        let root = Params::new(b, &weights, dtype);
        let p = if root.contains("text_model.embeddings.token_embedding.weight") {
            root.at("text_model")
        } else {
            root
        };
        let emb = p.at("embeddings");
        let token_table = emb.full_name("token_embedding.weight");
        let table_shape = [c.vocab_size, d];
        if weights.shape(&token_table) != Some(&table_shape[..]) {
            // Reports the missing tensor or the shape disagreement with the file's name.
            emb.get("token_embedding.weight", &table_shape)?;
        }
        let positions = emb.get("position_embedding.weight", &[c.max_position_embeddings, d])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = p.at("encoder.layers").at(i);
                let a = l.at("self_attn");
                Ok(Layer {
                    norm1: LayerNorm::load(&l.at("layer_norm1"), d, eps)?,
                    q: Linear::load(&a.at("q_proj"), d, d, true)?,
                    k: Linear::load(&a.at("k_proj"), d, d, true)?,
                    v: Linear::load(&a.at("v_proj"), d, d, true)?,
                    out: Linear::load(&a.at("out_proj"), d, d, true)?,
                    norm2: LayerNorm::load(&l.at("layer_norm2"), d, eps)?,
                    fc1: Linear::load(&l.at("mlp.fc1"), d, c.intermediate_size, true)?,
                    fc2: Linear::load(&l.at("mlp.fc2"), c.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<_>>()?;
        let final_norm = LayerNorm::load(&p.at("final_layer_norm"), d, eps)?;
        Ok(Self {
            config,
            token_table,
            weights,
            positions,
            layers,
            final_norm,
            dtype,
        })
    }

    /// Last hidden state `[batch, seq, hidden]` for `batch` rows of `seq` token ids.
    pub fn forward(&self, b: &B, ids: &[Vec<u32>]) -> Result<Tensor<B>> {
        let c = &self.config;
        let seq = ids.first().map_or(0, Vec::len);
        if seq == 0 || seq > c.max_position_embeddings || ids.iter().any(|r| r.len() != seq) {
            return Err(Error::Invalid(format!(
                "CLIP text encoder takes rows of equal length 1..={} tokens",
                c.max_position_embeddings
            )));
        }
        let (batch, d, heads) = (ids.len(), c.hidden_size, c.num_attention_heads);
        let flat: Vec<u32> = ids.concat();
        let tokens = b.upload(&self.weights.load_rows(&self.token_table, &flat, self.dtype)?)?;
        let positions = ops::slice(b, &self.positions, 0, 0, seq)?;
        let mut x = ops::add(b, &tokens.reshape(&[batch, seq, d])?, &positions)?;
        let mask = b.upload(&causal_mask(seq, self.dtype)?)?;
        let scale = 1.0 / ((d / heads) as f32).sqrt();
        let split = |t: &Tensor<B>| ops::permute(b, &t.reshape(&[batch, seq, heads, d / heads])?, &[0, 2, 1, 3]);
        for l in &self.layers {
            let h = l.norm1.forward(b, &x)?;
            let (q, k, v) = (l.q.forward(b, &h)?, l.k.forward(b, &h)?, l.v.forward(b, &h)?);
            let a = biased_attention(b, &split(&q)?, &split(&k)?, &split(&v)?, &mask, scale)?;
            let a = ops::permute(b, &a, &[0, 2, 1, 3])?.reshape(&[batch, seq, d])?;
            x = ops::add(b, &x, &l.out.forward(b, &a)?)?;
            let h = l.norm2.forward(b, &x)?;
            let h = l.fc2.forward(b, &c.hidden_act.forward(b, &l.fc1.forward(b, &h)?)?)?;
            x = ops::add(b, &x, &h)?;
        }
        self.final_norm.forward(b, &x)
    }
}

/// `[seq, seq]` additive mask hiding later tokens. A large finite value rather than -inf:
/// WGSL compilers may assume no infinities, and it stays finite in f16.
fn causal_mask(seq: usize, dtype: DType) -> Result<HostTensor> {
    let values = (0..seq * seq).map(|i| if i % seq > i / seq { -30000.0 } else { 0.0 }).collect();
    HostTensor::new(&[seq, seq], crate::tensor::HostData::from_f32(dtype, values))
}
