//! Stable Diffusion's autoencoder (diffusers `AutoencoderKL`): the decoder turns latents into
//! images, the encoder (img2img) turns images into the latent distribution's mean.

use serde::Deserialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::nn::{from_tokens, to_tokens, Attention, Conv2d, GroupNorm, ResnetBlock};
use crate::ops;
use crate::tensor::Tensor;
use crate::weights::Params;

/// Mirrors diffusers' `AutoencoderKL` config.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d::three")]
    pub in_channels: usize,
    #[serde(default = "d::three")]
    pub out_channels: usize,
    #[serde(default = "d::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d::layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "d::latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "d::norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d::scaling_factor")]
    pub scaling_factor: f32,
}

mod d {
    pub fn three() -> usize {
        3
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![128, 256, 512, 512]
    }
    pub fn layers_per_block() -> usize {
        2
    }
    pub fn latent_channels() -> usize {
        4
    }
    pub fn norm_num_groups() -> usize {
        32
    }
    pub fn scaling_factor() -> f32 {
        0.18215
    }
}

const EPS: f32 = 1e-6;

/// Resnet, single-head self-attention over all pixels, resnet.
struct MidBlock<B: Backend> {
    resnets: [ResnetBlock<B>; 2],
    norm: GroupNorm<B>,
    attention: Attention<B>,
}

impl<B: Backend> MidBlock<B> {
    fn load(p: &Params<B>, channels: usize, groups: usize) -> Result<Self> {
        let a = p.at("attentions.0");
        Ok(Self {
            resnets: [
                ResnetBlock::load(&p.at("resnets.0"), channels, channels, None, groups, EPS)?,
                ResnetBlock::load(&p.at("resnets.1"), channels, channels, None, groups, EPS)?,
            ],
            norm: GroupNorm::load(&a.at("group_norm"), groups, channels, EPS)?,
            attention: Attention::load(&a, channels, channels, 1, true)?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let h = self.resnets[0].forward(b, x, None)?;
        let (hh, ww) = (h.shape()[2], h.shape()[3]);
        let tokens = to_tokens(b, &self.norm.forward(b, &h)?)?;
        let attended = from_tokens(b, &self.attention.forward(b, &tokens, None)?, hh, ww)?;
        let h = ops::add(b, &h, &attended)?;
        self.resnets[1].forward(b, &h, None)
    }
}

struct Stage<B: Backend> {
    resnets: Vec<ResnetBlock<B>>,
    resample: Option<Conv2d<B>>,
}

pub struct VaeDecoder<B: Backend> {
    pub config: VaeConfig,
    post_quant: Conv2d<B>,
    conv_in: Conv2d<B>,
    mid: MidBlock<B>,
    up: Vec<Stage<B>>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

pub struct VaeEncoder<B: Backend> {
    pub config: VaeConfig,
    conv_in: Conv2d<B>,
    down: Vec<Stage<B>>,
    mid: MidBlock<B>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    quant: Conv2d<B>,
}

fn check(config: &VaeConfig) -> Result<()> {
    if config.block_out_channels.is_empty() {
        return Err(Error::Invalid("VAE config: block_out_channels is empty".into()));
    }
    Ok(())
}

impl VaeConfig {
    /// Pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

impl<B: Backend> VaeDecoder<B> {
    pub fn load(p: &Params<B>, config: VaeConfig) -> Result<Self> {
        check(&config)?;
        let c = &config;
        let g = c.norm_num_groups;
        let dp = p.at("decoder");
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut prev = rev[0];
        for (i, &out) in rev.iter().enumerate() {
            let bp = dp.at("up_blocks").at(i);
            let resnets = (0..=c.layers_per_block)
                .map(|j| ResnetBlock::load(&bp.at("resnets").at(j), if j == 0 { prev } else { out }, out, None, g, EPS))
                .collect::<Result<_>>()?;
            let resample = (i + 1 < rev.len())
                .then(|| Conv2d::load(&bp.at("upsamplers.0.conv"), out, out, 3, 1, 1))
                .transpose()?;
            up.push(Stage { resnets, resample });
            prev = out;
        }
        let l = c.latent_channels;
        Ok(Self {
            post_quant: Conv2d::load(&p.at("post_quant_conv"), l, l, 1, 1, 0)?,
            conv_in: Conv2d::load(&dp.at("conv_in"), l, rev[0], 3, 1, 1)?,
            mid: MidBlock::load(&dp.at("mid_block"), rev[0], g)?,
            up,
            norm_out: GroupNorm::load(&dp.at("conv_norm_out"), g, prev, EPS)?,
            conv_out: Conv2d::load(&dp.at("conv_out"), prev, c.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// Image `[n, out_channels, h*f, w*f]` in about [-1, 1] from an unscaled latent
    /// `[n, latent_channels, h, w]` (divide the denoiser's latent by `scaling_factor` first).
    pub fn forward(&self, b: &B, z: &Tensor<B>) -> Result<Tensor<B>> {
        let s = z.shape();
        if s.len() != 4 || s[1] != self.config.latent_channels {
            return Err(Error::Invalid(format!(
                "VAE decoder input {s:?}: expected [n, {}, h, w]",
                self.config.latent_channels
            )));
        }
        let mut h = self.conv_in.forward(b, &self.post_quant.forward(b, z)?)?;
        h = self.mid.forward(b, &h)?;
        for stage in &self.up {
            for r in &stage.resnets {
                h = r.forward(b, &h, None)?;
            }
            if let Some(conv) = &stage.resample {
                h = conv.forward(b, &ops::upsample_nearest(b, &h, 2)?)?;
            }
        }
        self.conv_out.forward(b, &self.norm_out.forward_silu(b, &h)?)
    }
}

impl<B: Backend> VaeEncoder<B> {
    pub fn load(p: &Params<B>, config: VaeConfig) -> Result<Self> {
        check(&config)?;
        let c = &config;
        let g = c.norm_num_groups;
        let ep = p.at("encoder");
        let ch = &c.block_out_channels;
        let mut down = Vec::new();
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let bp = ep.at("down_blocks").at(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock::load(&bp.at("resnets").at(j), if j == 0 { prev } else { out }, out, None, g, EPS))
                .collect::<Result<_>>()?;
            // The reference pads the downsampler's input right and bottom only.
            let resample = (i + 1 < ch.len())
                .then(|| {
                    Conv2d::load(&bp.at("downsamplers.0.conv"), out, out, 3, 2, 0).map(|mut conv| {
                        conv.pad_hi = [1, 1];
                        conv
                    })
                })
                .transpose()?;
            down.push(Stage { resnets, resample });
            prev = out;
        }
        let l2 = 2 * c.latent_channels;
        Ok(Self {
            conv_in: Conv2d::load(&ep.at("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            down,
            mid: MidBlock::load(&ep.at("mid_block"), prev, g)?,
            norm_out: GroupNorm::load(&ep.at("conv_norm_out"), g, prev, EPS)?,
            conv_out: Conv2d::load(&ep.at("conv_out"), prev, l2, 3, 1, 1)?,
            quant: Conv2d::load(&p.at("quant_conv"), l2, l2, 1, 1, 0)?,
            config,
        })
    }

    /// The latent distribution's mean `[n, latent_channels, h/f, w/f]` (unscaled) for an
    /// image `[n, in_channels, h, w]` in [-1, 1].
    pub fn forward(&self, b: &B, image: &Tensor<B>) -> Result<Tensor<B>> {
        let s = image.shape();
        let f = self.config.scale_factor();
        if s.len() != 4 || s[1] != self.config.in_channels || !s[2].is_multiple_of(f) || !s[3].is_multiple_of(f) {
            return Err(Error::Invalid(format!(
                "VAE encoder input {s:?}: expected [n, {}, h, w] with h and w multiples of {f}",
                self.config.in_channels
            )));
        }
        let mut h = self.conv_in.forward(b, image)?;
        for stage in &self.down {
            for r in &stage.resnets {
                h = r.forward(b, &h, None)?;
            }
            if let Some(conv) = &stage.resample {
                h = conv.forward(b, &h)?;
            }
        }
        h = self.mid.forward(b, &h)?;
        let moments = self
            .quant
            .forward(b, &self.conv_out.forward(b, &self.norm_out.forward_silu(b, &h)?)?)?;
        ops::slice(b, &moments, 1, 0, self.config.latent_channels)
    }
}
