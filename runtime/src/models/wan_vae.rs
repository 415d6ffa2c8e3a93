//! Wan2.1's causal 3D VAE decoder (diffusers `AutoencoderKLWan`, decoder side): causal 3D
//! convolutions, channel RMS norms, a per-frame attention block, and upsamplers that double
//! space (and time, through a causal time convolution).
//!
//! Decoding streams: every causal convolution keeps the last two frames of its input in a
//! `CausalCache`, which makes running it on one frame at a time equal to running it on the
//! whole clip. So one latent frame enters at a time, as in the reference, and below each
//! time upsampler the frames it makes continue one by one: device memory holds one frame's
//! activations per level plus the caches, whatever the clip length. The caches keep the
//! tensors that came in, and a convolution reads them beside the new frame
//! (`ops::conv3d_frames`), so streaming copies no frames.

use serde::Deserialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::nn::multi_head_attention;
use crate::ops;
use crate::tensor::{HostData, HostTensor, Tensor};
use crate::weights::{replace_prefix, Params, Weights};

/// Mirrors diffusers' `AutoencoderKLWan` config (Wan 2.1 fields).
#[derive(Clone, Debug, Deserialize)]
pub struct WanVaeConfig {
    #[serde(default = "d::base_dim")]
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "d::z_dim")]
    pub z_dim: usize,
    #[serde(default = "d::dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "d::num_res_blocks")]
    pub num_res_blocks: usize,
    #[serde(default = "d::temperal_downsample")]
    pub temperal_downsample: Vec<bool>,
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "d::out_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    pub latents_mean: Vec<f32>,
    pub latents_std: Vec<f32>,
}

mod d {
    pub fn base_dim() -> usize {
        96
    }
    pub fn z_dim() -> usize {
        16
    }
    pub fn dim_mult() -> Vec<usize> {
        vec![1, 2, 4, 4]
    }
    pub fn num_res_blocks() -> usize {
        2
    }
    pub fn temperal_downsample() -> Vec<bool> {
        vec![false, true, true]
    }
    pub fn out_channels() -> usize {
        3
    }
}

/// The diffusers name of a decoder tensor named as in the original Wan2.1 release
/// (`decoder.upsamples.K.residual.2.weight`, `decoder.head.0.gamma`, top-level `conv2` ...):
/// the original keeps each level's resnets and upsampler in one flat list of
/// `num_res_blocks + 2` entries. Encoder tensors are not needed and map to nothing.
fn diffusers_name(original: &str, num_res_blocks: usize) -> Option<String> {
    let resnet = |rest: &str| -> String {
        const RENAMES: [(&str, &str); 5] = [
            ("residual.0.", "norm1."),
            ("residual.2.", "conv1."),
            ("residual.3.", "norm2."),
            ("residual.6.", "conv2."),
            ("shortcut.", "conv_shortcut."),
        ];
        replace_prefix(rest, &RENAMES).unwrap_or_else(|| rest.to_string())
    };
    if let Some(rest) = original.strip_prefix("conv2.") {
        return Some(format!("post_quant_conv.{rest}"));
    }
    let rest = original.strip_prefix("decoder.")?;
    let (head, tail) = rest.split_once('.')?;
    Some(match head {
        "conv1" => format!("decoder.conv_in.{tail}"),
        "head" => match tail.split_once('.')? {
            ("0", t) => format!("decoder.norm_out.{t}"),
            ("2", t) => format!("decoder.conv_out.{t}"),
            _ => return None,
        },
        "middle" => match tail.split_once('.')? {
            ("0", t) => format!("decoder.mid_block.resnets.0.{}", resnet(t)),
            ("1", t) => format!("decoder.mid_block.attentions.0.{t}"),
            ("2", t) => format!("decoder.mid_block.resnets.1.{}", resnet(t)),
            _ => return None,
        },
        "upsamples" => {
            let (k, t) = tail.split_once('.')?;
            let k: usize = k.parse().ok()?;
            let group = num_res_blocks + 2;
            let (level, j) = (k / group, k % group);
            if j == group - 1 {
                format!("decoder.up_blocks.{level}.upsamplers.0.{t}")
            } else {
                format!("decoder.up_blocks.{level}.resnets.{j}.{}", resnet(t))
            }
        }
        _ => return None,
    })
}

/// VAE weights under the diffusers names, whether the file uses them or the original
/// release's (recognised by its `decoder.conv1.weight`).
pub fn with_diffusers_names(weights: Weights, config: &WanVaeConfig) -> Weights {
    if weights.contains("decoder.conv1.weight") {
        weights.renamed(|n| diffusers_name(n, config.num_res_blocks))
    } else {
        weights
    }
}

/// The cached input frames of every causal convolution, by the slot number each was given
/// at load time: the tensors that ended its input so far, in time order, kept as they came
/// (convolutions read them in place), at most the frames its kernel reaches back.
pub struct CausalCache<B: Backend> {
    slots: Vec<Vec<Tensor<B>>>,
}

impl<B: Backend> Default for CausalCache<B> {
    fn default() -> Self {
        Self { slots: Vec::new() }
    }
}

impl<B: Backend> CausalCache<B> {
    fn slot(&mut self, i: usize) -> &mut Vec<Tensor<B>> {
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, Vec::new);
        }
        &mut self.slots[i]
    }
}

/// Frames (dimension 2) of `parts` joined in time.
fn frames<B: Backend>(parts: &[Tensor<B>]) -> usize {
    parts.iter().map(|t| t.shape()[2]).sum()
}

/// Trims `parts` (joined in time) to their last `n` frames: whole parts are dropped, and only
/// a part the cut falls inside is copied.
fn keep_last_frames<B: Backend>(b: &B, parts: &mut Vec<Tensor<B>>, n: usize) -> Result<()> {
    while parts.len() > 1 && frames(&parts[1..]) >= n {
        parts.remove(0);
    }
    let excess = frames(parts).saturating_sub(n);
    if excess > 0 {
        let t = parts[0].shape()[2];
        parts[0] = ops::slice(b, &parts[0], 2, excess, t - excess)?;
    }
    Ok(())
}

/// Hands out cache slot numbers while a decoder loads.
#[derive(Default)]
struct Slots(usize);

impl Slots {
    fn next(&mut self) -> usize {
        self.0 += 1;
        self.0 - 1
    }
}

/// A causal 3D convolution (time padded in front only) with stride 1.
struct CausalConv<B: Backend> {
    weight: Tensor<B>,
    bias: Tensor<B>,
    /// Frames of zero padding in front when nothing is cached: `kernel_t - 1`.
    front: usize,
    pad_hw: usize,
    /// Where its input's last frames are cached (kernels longer than one frame).
    slot: Option<usize>,
}

impl<B: Backend> CausalConv<B> {
    fn load(p: &Params<B>, input: usize, output: usize, kernel: [usize; 3], slots: &mut Slots) -> Result<Self> {
        Ok(Self {
            weight: p.get("weight", &[output, input, kernel[0], kernel[1], kernel[2]])?,
            bias: p.get("bias", &[output])?,
            front: kernel[0] - 1,
            pad_hw: kernel[1] / 2,
            slot: (kernel[0] > 1).then(|| slots.next()),
        })
    }

    /// Convolves `x`, continuing the sequence whose last frames its cache slot holds, and
    /// leaves the last `front` frames of the (cached + new) input there for what follows.
    fn forward(&self, b: &B, x: &Tensor<B>, cache: &mut CausalCache<B>) -> Result<Tensor<B>> {
        let p = self.pad_hw;
        let conv = |parts: &[&Tensor<B>], front: usize| {
            ops::conv3d_frames(b, parts, &self.weight, Some(&self.bias), [1, 1, 1], [front, p, p], [0, p, p], 1)
        };
        let Some(i) = self.slot else {
            return conv(&[x], self.front);
        };
        let slot = cache.slot(i);
        let front = self.front.saturating_sub(frames(slot));
        slot.push(x.clone());
        let y = conv(&slot.iter().collect::<Vec<_>>(), front)?;
        keep_last_frames(b, slot, self.front)?;
        Ok(y)
    }
}

/// `silu` of the RMS norm over the channels of `[n, c, t, h, w]` times `gamma`: the
/// reference's `F.normalize(x, dim=1) * sqrt(c) * gamma`, then SiLU.
fn norm_silu<B: Backend>(b: &B, x: &Tensor<B>, gamma: &Tensor<B>) -> Result<Tensor<B>> {
    ops::channel_rms_norm_silu(b, x, gamma, 1e-12)
}

struct ResidualBlock<B: Backend> {
    norm1: Tensor<B>,
    conv1: CausalConv<B>,
    norm2: Tensor<B>,
    conv2: CausalConv<B>,
    shortcut: Option<CausalConv<B>>,
}

impl<B: Backend> ResidualBlock<B> {
    fn load(p: &Params<B>, input: usize, output: usize, slots: &mut Slots) -> Result<Self> {
        Ok(Self {
            norm1: p.get("norm1.gamma", &[input])?,
            conv1: CausalConv::load(&p.at("conv1"), input, output, [3; 3], slots)?,
            norm2: p.get("norm2.gamma", &[output])?,
            conv2: CausalConv::load(&p.at("conv2"), output, output, [3; 3], slots)?,
            shortcut: (input != output)
                .then(|| CausalConv::load(&p.at("conv_shortcut"), input, output, [1; 3], slots))
                .transpose()?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>, cache: &mut CausalCache<B>) -> Result<Tensor<B>> {
        let h = match &self.shortcut {
            Some(s) => s.forward(b, x, cache)?,
            None => x.clone(),
        };
        let y = norm_silu(b, x, &self.norm1)?;
        let y = self.conv1.forward(b, &y, cache)?;
        let y = norm_silu(b, &y, &self.norm2)?;
        let y = self.conv2.forward(b, &y, cache)?;
        ops::add(b, &y, &h)
    }
}

/// Single-head self-attention over the pixels of each frame.
struct AttentionBlock<B: Backend> {
    norm: Tensor<B>,
    qkv_weight: Tensor<B>,
    qkv_bias: Tensor<B>,
    proj_weight: Tensor<B>,
    proj_bias: Tensor<B>,
}

impl<B: Backend> AttentionBlock<B> {
    fn load(p: &Params<B>, dim: usize) -> Result<Self> {
        Ok(Self {
            norm: p.get("norm.gamma", &[dim])?,
            qkv_weight: p.get("to_qkv.weight", &[3 * dim, dim])?,
            qkv_bias: p.get("to_qkv.bias", &[3 * dim])?,
            proj_weight: p.get("proj.weight", &[dim, dim])?,
            proj_bias: p.get("proj.bias", &[dim])?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let s = x.shape().to_vec();
        let (n, c, t, h, w) = (s[0], s[1], s[2], s[3], s[4]);
        let tokens = ops::permute(b, x, &[0, 2, 3, 4, 1])?.reshape(&[n * t, h * w, c])?;
        let normed = ops::rms_norm(b, &tokens, Some(&self.norm), 1e-12)?;
        let qkv = ops::linear(b, &normed, &self.qkv_weight, Some(&self.qkv_bias))?;
        let part = |i: usize| ops::slice(b, &qkv, 2, i * c, c);
        let attended = multi_head_attention(b, &part(0)?, &part(1)?, &part(2)?, 1)?;
        let out = ops::linear(b, &attended, &self.proj_weight, Some(&self.proj_bias))?;
        let out = ops::permute(b, &out.reshape(&[n, t, h, w, c])?, &[0, 4, 1, 2, 3])?;
        ops::add(b, &out, x)
    }
}

/// Doubles height and width (nearest, then a 3x3 conv to half the channels); `time` also
/// doubles the frames after the first through a causal time convolution.
struct Upsample<B: Backend> {
    conv_weight: Tensor<B>,
    conv_bias: Tensor<B>,
    time: Option<CausalConv<B>>,
}

impl<B: Backend> Upsample<B> {
    fn load(p: &Params<B>, dim: usize, temporal: bool, slots: &mut Slots) -> Result<Self> {
        let w = p.get("resample.1.weight", &[dim / 2, dim, 3, 3])?;
        Ok(Self {
            conv_weight: w.reshape(&[dim / 2, dim, 1, 3, 3])?,
            conv_bias: p.get("resample.1.bias", &[dim / 2])?,
            time: temporal
                .then(|| CausalConv::load(&p.at("time_conv"), dim, 2 * dim, [3, 1, 1], slots))
                .transpose()?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>, cache: &mut CausalCache<B>) -> Result<Tensor<B>> {
        let mut x = x.clone();
        if let Some(time) = &self.time {
            let slot = cache.slot(time.slot.expect("a time conv has a cache slot"));
            if slot.is_empty() {
                // The first chunk is not doubled in time; later chunks continue the sequence
                // from a zero frame, as the reference does.
                let s = x.shape();
                let zero = HostTensor::new(
                    &[s[0], s[1], 1, s[3], s[4]],
                    HostData::from_f32(x.dtype(), vec![0.0; s[0] * s[1] * s[3] * s[4]]),
                )?;
                slot.push(b.upload(&zero)?);
            } else {
                let y = time.forward(b, &x, cache)?;
                let s = x.shape().to_vec();
                let (n, c, t, h, w) = (s[0], s[1], s[2], s[3], s[4]);
                // Channels [2, c] become two frames per input frame.
                let y = ops::permute(b, &y.reshape(&[n, 2, c, t, h, w])?, &[0, 2, 3, 1, 4, 5])?;
                x = y.reshape(&[n, c, 2 * t, h, w])?;
            }
        }
        let up = ops::upsample_nearest(b, &x, 2)?;
        ops::conv3d(b, &up, &self.conv_weight, Some(&self.conv_bias), [1, 1, 1], [0, 1, 1], [0, 1, 1], 1)
    }
}

struct UpBlock<B: Backend> {
    resnets: Vec<ResidualBlock<B>>,
    upsample: Option<Upsample<B>>,
}

pub struct WanVaeDecoder<B: Backend> {
    pub config: WanVaeConfig,
    post_quant: CausalConv<B>,
    conv_in: CausalConv<B>,
    mid_resnets: [ResidualBlock<B>; 2],
    mid_attention: AttentionBlock<B>,
    up: Vec<UpBlock<B>>,
    norm_out: Tensor<B>,
    conv_out: CausalConv<B>,
}

impl<B: Backend> WanVaeDecoder<B> {
    pub fn load(p: &Params<B>, config: WanVaeConfig) -> Result<Self> {
        let c = &config;
        if c.is_residual || c.patch_size.is_some() {
            return Err(Error::Invalid(
                "Wan VAE config: the Wan 2.2 residual/patched VAE is not supported (Wan 2.1 only)".into(),
            ));
        }
        let levels = c.dim_mult.len();
        if levels == 0 || c.temperal_downsample.len() + 1 < levels || c.latents_mean.len() != c.z_dim || c.latents_std.len() != c.z_dim {
            return Err(Error::Invalid(
                "Wan VAE config: dim_mult, temperal_downsample and the latent statistics do not fit z_dim".into(),
            ));
        }
        let base = c.decoder_base_dim.unwrap_or(c.base_dim);
        let dims: Vec<usize> = std::iter::once(c.dim_mult[levels - 1])
            .chain(c.dim_mult.iter().rev().copied())
            .map(|m| m * base)
            .collect();
        let temporal_up: Vec<bool> = c.temperal_downsample.iter().rev().copied().collect();
        let dp = p.at("decoder");
        let mut slots = Slots::default();
        let post_quant = CausalConv::load(&p.at("post_quant_conv"), c.z_dim, c.z_dim, [1; 3], &mut slots)?;
        let top = dims[0];
        let conv_in = CausalConv::load(&dp.at("conv_in"), c.z_dim, top, [3; 3], &mut slots)?;
        let mp = dp.at("mid_block");
        let mid_resnets = [
            ResidualBlock::load(&mp.at("resnets.0"), top, top, &mut slots)?,
            ResidualBlock::load(&mp.at("resnets.1"), top, top, &mut slots)?,
        ];
        let mut up = Vec::new();
        for i in 0..levels {
            let (mut input, output) = (dims[i], dims[i + 1]);
            if i > 0 {
                input /= 2;
            }
            let bp = dp.at("up_blocks").at(i);
            let resnets = (0..=c.num_res_blocks)
                .map(|j| ResidualBlock::load(&bp.at("resnets").at(j), if j == 0 { input } else { output }, output, &mut slots))
                .collect::<Result<_>>()?;
            let upsample = (i + 1 < levels)
                .then(|| Upsample::load(&bp.at("upsamplers.0"), output, temporal_up[i], &mut slots))
                .transpose()?;
            up.push(UpBlock { resnets, upsample });
        }
        let last = dims[levels];
        Ok(Self {
            post_quant,
            conv_in,
            mid_resnets,
            mid_attention: AttentionBlock::load(&mp.at("attentions.0"), top)?,
            up,
            norm_out: dp.get("norm_out.gamma", &[last])?,
            conv_out: CausalConv::load(&dp.at("conv_out"), last, c.out_channels, [3; 3], &mut slots)?,
            config,
        })
    }

    /// Video frames per latent frame after the first.
    pub fn temporal_factor(&self) -> usize {
        1 << self
            .up
            .iter()
            .filter(|u| u.upsample.as_ref().is_some_and(|s| s.time.is_some()))
            .count()
    }

    pub fn spatial_factor(&self) -> usize {
        1 << self.up.iter().filter(|u| u.upsample.is_some()).count()
    }

    /// The denoiser's latent `[n, z, t, h, w]` mapped to the VAE's: `z * std + mean` per channel.
    pub fn denormalize(&self, b: &B, latent: &Tensor<B>) -> Result<Tensor<B>> {
        let c = &self.config;
        let stat = |v: &[f32]| {
            b.upload(&HostTensor::new(
                &[1, c.z_dim, 1, 1, 1],
                HostData::from_f32(latent.dtype(), v.to_vec()),
            )?)
        };
        let scaled = ops::mul(b, latent, &stat(&c.latents_std)?)?;
        ops::add(b, &scaled, &stat(&c.latents_mean)?)
    }

    /// Decodes one latent frame `[n, z, 1, h, w]` (already denormalised), continuing the clip
    /// whose state `cache` holds; returns its video frames `[n, c, 1, H, W]` before the final
    /// clamp to [-1, 1] (which `decode` applies on the host): 1 for the first latent frame,
    /// `temporal_factor()` after.
    pub fn decode_chunk(&self, b: &B, z: &Tensor<B>, cache: &mut CausalCache<B>) -> Result<Vec<Tensor<B>>> {
        let s = z.shape();
        if s.len() != 5 || s[1] != self.config.z_dim || s[2] != 1 {
            return Err(Error::Invalid(format!(
                "Wan VAE chunk {s:?}: expected one latent frame [n, {}, 1, h, w]",
                self.config.z_dim
            )));
        }
        let x = self.post_quant.forward(b, z, cache)?;
        let mut x = self.conv_in.forward(b, &x, cache)?;
        x = self.mid_resnets[0].forward(b, &x, cache)?;
        x = self.mid_attention.forward(b, &x)?;
        x = self.mid_resnets[1].forward(b, &x, cache)?;
        let mut frames = Vec::new();
        self.stream(b, 0, x, cache, &mut frames)?;
        Ok(frames)
    }

    /// Runs up block `level` and everything after it on one frame, one frame at a time below
    /// each time upsampler.
    fn stream(&self, b: &B, level: usize, x: Tensor<B>, cache: &mut CausalCache<B>, out: &mut Vec<Tensor<B>>) -> Result<()> {
        let Some(block) = self.up.get(level) else {
            let x = norm_silu(b, &x, &self.norm_out)?;
            out.push(self.conv_out.forward(b, &x, cache)?);
            return Ok(());
        };
        let mut x = x;
        for r in &block.resnets {
            x = r.forward(b, &x, cache)?;
        }
        let Some(upsample) = &block.upsample else {
            return self.stream(b, level + 1, x, cache, out);
        };
        let y = upsample.forward(b, &x, cache)?;
        drop(x);
        let frames = y.shape()[2];
        if frames == 1 {
            return self.stream(b, level + 1, y, cache, out);
        }
        for f in 0..frames {
            self.stream(b, level + 1, ops::slice(b, &y, 2, f, 1)?, cache, out)?;
        }
        Ok(())
    }

    /// The whole clip `[n, out_channels, 1 + factor * (t - 1), h * s, w * s]` on the host, in
    /// [-1, 1] and the backend's dtype, from a denormalised latent `[n, z, t, h, w]`, one
    /// latent frame at a time. Each latent frame's video frames are joined and clamped on the
    /// device and read at once; the read of one is awaited after the next is queued, so the
    /// device decodes while the host takes frames, and `on_frame` reports frames on the host.
    pub async fn decode(&self, b: &B, z: &Tensor<B>, mut on_frame: impl FnMut(usize, usize)) -> Result<HostTensor> {
        let t = z.shape()[2];
        let frames = 1 + self.temporal_factor() * t.saturating_sub(1);
        let mut cache = CausalCache::default();
        let mut video: Option<HostTensor> = None;
        let mut at = 0;
        let mut in_flight = None;
        for i in 0..=t {
            let queued = if i < t {
                let latent_frame = ops::slice(b, z, 2, i, 1)?;
                let parts = self.decode_chunk(b, &latent_frame, &mut cache)?;
                let joined = ops::concat(b, &parts.iter().collect::<Vec<_>>(), 2)?;
                Some(b.read(&ops::clamp(b, &joined, -1.0, 1.0)?))
            } else {
                None
            };
            let Some(previous) = std::mem::replace(&mut in_flight, queued) else {
                continue;
            };
            let chunk = previous.await?;
            let s = &chunk.shape;
            let v = video.get_or_insert_with(|| HostTensor::zeros(&[s[0], s[1], frames, s[3], s[4]], chunk.dtype()));
            v.set_slice(2, at, &chunk)?;
            at += s[2];
            on_frame(i, t);
        }
        match video {
            Some(v) if at == frames => Ok(v),
            _ => Err(Error::Invalid(format!(
                "Wan VAE decode: {t} latent frames gave {at} video frames, expected {frames}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::tensor::DType;

    /// `[1, 1, t, 1, 1]` holding `values` as its frames.
    fn frames_of(b: &CpuBackend, values: &[f32]) -> Tensor<CpuBackend> {
        b.upload(&HostTensor::new(&[1, 1, values.len(), 1, 1], HostData::from_f32(DType::F32, values.to_vec())).unwrap())
            .unwrap()
    }

    fn values(b: &CpuBackend, parts: &[Tensor<CpuBackend>]) -> Vec<f32> {
        parts.iter().flat_map(|t| pollster::block_on(b.read(t)).unwrap().to_f32()).collect()
    }

    #[test]
    fn cache_keeps_the_last_frames_dropping_whole_parts_first() {
        let b = CpuBackend;
        let mut parts = vec![frames_of(&b, &[1.0]), frames_of(&b, &[2.0]), frames_of(&b, &[3.0])];
        keep_last_frames(&b, &mut parts, 2).unwrap();
        assert_eq!((parts.len(), values(&b, &parts)), (2, vec![2.0, 3.0]));
        let mut parts = vec![frames_of(&b, &[1.0, 2.0]), frames_of(&b, &[3.0, 4.0, 5.0])];
        keep_last_frames(&b, &mut parts, 2).unwrap();
        assert_eq!((parts.len(), values(&b, &parts)), (1, vec![4.0, 5.0]));
        let mut parts = vec![frames_of(&b, &[1.0, 2.0, 3.0]), frames_of(&b, &[4.0])];
        keep_last_frames(&b, &mut parts, 2).unwrap();
        assert_eq!((parts.len(), values(&b, &parts)), (2, vec![3.0, 4.0]));
        let mut parts = vec![frames_of(&b, &[1.0])];
        keep_last_frames(&b, &mut parts, 2).unwrap();
        assert_eq!(values(&b, &parts), vec![1.0]);
    }
}
