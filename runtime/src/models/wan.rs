//! The Wan2.1 text-to-video pipeline: UMT5 prompt embeddings (cut to the prompt's length and
//! zero-padded, as the reference does, the padding given as one position standing for all),
//! flow-matching denoising of a seeded latent with classifier-free guidance, and the causal
//! VAE decoding one latent frame at a time. Loads a diffusers folder (`model_index.json`,
//! `tokenizer/`, `text_encoder/`, `transformer/`, `vae/`, `scheduler/`).

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::denoiser::{Denoiser, DenoiserLoad, LocalDenoiser, OnDemand, TextContext};
use crate::models::flow_schedulers::{FlowSampler, FlowScheduler, FlowSchedulerConfig};
use crate::models::sentencepiece::SentencePiece;
use crate::models::umt5::Umt5Encoder;
use crate::models::wan_dit::{WanDit, WanDitConfig};
use crate::models::wan_vae::{WanVaeConfig, WanVaeDecoder};
use crate::models::{check_finite, initial_latent, Phase, RequestDefaults};
use crate::source::Source;
use crate::tensor::{DType, HostData, HostTensor};
use crate::weights::Params;

/// The reference pipeline's text length.
pub const TEXT_LEN: usize = 512;

pub struct Wan<B: Backend> {
    pub tokenizer: SentencePiece,
    pub text_encoder: Umt5Encoder<B>,
    pub transformer: OnDemand<B, WanDit<B>>,
    /// The transformer's config, known before its weights are loaded.
    pub transformer_config: WanDitConfig,
    pub vae: WanVaeDecoder<B>,
    pub scheduler_config: FlowSchedulerConfig,
    /// The reference pipeline's 832x480, 81 frames, guidance 5, unless the folder says otherwise.
    pub defaults: RequestDefaults,
    pub dtype: DType,
}

#[derive(Clone, Debug)]
pub struct WanRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f32,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// `1 + 4k` frames.
    pub frames: usize,
    pub sampler: FlowSampler,
    /// Overrides the scheduler config's shift.
    pub shift: Option<f64>,
    /// Start from this latent instead of seeded noise (parity tests).
    pub init_latent: Option<Vec<f32>>,
}

pub struct WanOutput {
    /// The final latent `[1, z, t, h/8, w/8]`.
    pub latent: HostTensor,
    /// The video `[3, frames, height, width]` in [0, 1].
    pub video: HostTensor,
}

/// The reference's prompt cleanup: HTML entities and runs of whitespace.
fn clean_prompt(text: &str) -> String {
    let unescaped = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    unescaped.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl<B: Backend> Wan<B> {
    pub fn load(b: &B, source: &impl Source, dtype: DType) -> Result<Self> {
        Self::load_with(b, source, dtype, DenoiserLoad::Now)
    }

    /// `load`, with the transformer loaded now or on first use.
    pub fn load_with(b: &B, source: &impl Source, dtype: DType, transformer_load: DenoiserLoad) -> Result<Self> {
        if !source.exists("model_index.json") {
            return Err(Error::Invalid(format!(
                "{}: not a diffusers Wan folder (no model_index.json)",
                source.label()
            )));
        }
        let spiece = source.bytes("tokenizer/spiece.model")?;
        let transformer_weights = crate::models::wan_dit::with_diffusers_names(source.weights("transformer")?);
        let transformer_config: WanDitConfig = source.config("transformer/config.json")?;
        let dit_config = transformer_config.clone();
        let transformer = OnDemand::new(b, transformer_load, move |b: &B| {
            WanDit::load(&Params::new(b, &transformer_weights, dtype), dit_config)
        })?;
        let vae_config: WanVaeConfig = source.config("vae/config.json")?;
        let vae_weights = crate::models::wan_vae::with_diffusers_names(source.weights("vae")?, &vae_config);
        Ok(Self {
            tokenizer: SentencePiece::from_model_bytes(&format!("{}/tokenizer/spiece.model", source.label()), &spiece)?,
            text_encoder: Umt5Encoder::load(
                b,
                source.config("text_encoder/config.json")?,
                Arc::new(source.weights("text_encoder")?),
                dtype,
            )?,
            transformer,
            transformer_config,
            vae: WanVaeDecoder::load(&Params::new(b, &vae_weights, dtype), vae_config)?,
            scheduler_config: source.config("scheduler/scheduler_config.json")?,
            defaults: RequestDefaults {
                width: 832,
                height: 480,
                frames: 81,
                cfg_scale: 5.0,
            }
            .with_overrides(source)?,
            dtype,
        })
    }

    /// The latent shape for a request, after checking the sizes fit the model.
    pub fn latent_shape(&self, req: &WanRequest) -> Result<[usize; 5]> {
        let (s, t) = (self.vae.spatial_factor(), self.vae.temporal_factor());
        let [_, ph, pw] = self.transformer_config.patch_size;
        let (fh, fw) = (s * ph, s * pw);
        if req.width == 0 || req.height == 0 || !req.width.is_multiple_of(fw) || !req.height.is_multiple_of(fh) {
            return Err(Error::Invalid(format!(
                "{}x{} is not a size this model takes: width must be a positive multiple of {fw}, height of {fh}",
                req.width, req.height
            )));
        }
        if req.frames == 0 || !(req.frames - 1).is_multiple_of(t) {
            return Err(Error::Invalid(format!(
                "{} frames is not a length this model takes: it must be 1 + {t}k (e.g. 81)",
                req.frames
            )));
        }
        if req.steps == 0 {
            return Err(Error::Invalid("steps must be at least 1".into()));
        }
        Ok([1, self.vae.config.z_dim, (req.frames - 1) / t + 1, req.height / s, req.width / s])
    }

    /// Prompt embeddings as the reference pads them, `[rows, TEXT_LEN, d_model]` zero past each
    /// prompt's length, given as the positions up to the longest prompt's and one zero
    /// position standing for the rest (`TextContext`). The encoder sees those positions only:
    /// its padding mask keeps every prompt position from attending past the prompt, and its
    /// position bias depends on distances alone, so the positions kept are the same.
    pub fn encode_prompts(&self, b: &B, prompts: &[&str]) -> Result<TextContext<B>> {
        let (mut ids, lens): (Vec<Vec<u32>>, Vec<usize>) = prompts
            .iter()
            .map(|p| self.tokenizer.encode_padded(&clean_prompt(p), TEXT_LEN))
            .unzip();
        let kept = (lens.iter().max().copied().unwrap_or(0) + 1).min(TEXT_LEN);
        ids.iter_mut().for_each(|row| row.truncate(kept));
        let hidden = self.text_encoder.forward(b, &ids, &lens)?;
        let keep: Vec<f32> = lens
            .iter()
            .flat_map(|&l| (0..kept).map(move |i| if i < l { 1.0 } else { 0.0 }))
            .collect();
        let keep = b.upload(&HostTensor::new(&[prompts.len(), kept, 1], HostData::from_f32(self.dtype, keep))?)?;
        Ok(TextContext {
            states: crate::ops::mul(b, &hidden, &keep)?,
            last_repeats: TEXT_LEN - kept + 1,
        })
    }

    pub async fn generate(&self, b: &B, req: &WanRequest, progress: &mut dyn FnMut(Phase, usize, usize)) -> Result<WanOutput> {
        self.generate_with(b, req, &mut LocalDenoiser::new(&self.transformer, self.dtype), progress)
            .await
    }

    /// `generate` with the DiT evaluated by `denoiser` (local, remote, or split).
    pub async fn generate_with(
        &self,
        b: &B,
        req: &WanRequest,
        denoiser: &mut impl Denoiser<B>,
        progress: &mut dyn FnMut(Phase, usize, usize),
    ) -> Result<WanOutput> {
        let shape = self.latent_shape(req)?;
        progress(Phase::EncodeText, 0, 1);
        let prompts: Vec<&str> = if req.cfg_scale > 1.0 {
            vec![&req.negative_prompt, &req.prompt]
        } else {
            vec![&req.prompt]
        };
        let text = self.encode_prompts(b, &prompts)?;
        progress(Phase::EncodeText, 1, 1);
        let mut config = self.scheduler_config.clone();
        if let Some(shift) = req.shift {
            config.flow_shift = shift;
        }
        let mut scheduler = FlowScheduler::new(req.sampler, &config, req.steps)?;
        let mut latent = initial_latent(req.init_latent.as_ref(), &shape, req.seed)?;
        denoiser.begin(b, &text, req.cfg_scale).await?;
        let timesteps = scheduler.timesteps().to_vec();
        progress(Phase::Denoise, 0, timesteps.len());
        for (i, &t) in timesteps.iter().enumerate() {
            let velocity = denoiser.predict(b, i, &HostTensor::from_f32(&shape, latent.clone())?, t).await?;
            latent = scheduler.step(i, &velocity, &latent)?;
            check_finite(&latent, i + 1, self.dtype)?;
            progress(Phase::Denoise, i + 1, timesteps.len());
        }
        let z = b.upload(&HostTensor::new(&shape, HostData::from_f32(self.dtype, latent.clone()))?)?;
        let z = self.vae.denormalize(b, &z)?;
        let latent_frames = shape[2];
        progress(Phase::Decode, 0, latent_frames);
        let video = self.vae.decode(b, &z, |done, total| progress(Phase::Decode, done, total)).await?;
        let s = video.shape.clone();
        let pixels = video.to_f32().into_iter().map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)).collect();
        Ok(WanOutput {
            latent: HostTensor::from_f32(&shape, latent)?,
            video: HostTensor::from_f32(&s[1..], pixels)?,
        })
    }
}
