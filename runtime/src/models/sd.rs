//! The Stable Diffusion pipeline: tokenize, encode the prompt and the negative prompt, denoise
//! from seeded noise with classifier-free guidance and a sampler, decode with the VAE. Loads a
//! diffusers folder (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/`,
//! `scheduler/`).

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextEncoder};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::denoiser::{Denoiser, DenoiserLoad, LocalDenoiser, OnDemand, TextContext};
use crate::models::schedulers::{Prediction, Sampler, Scheduler, SchedulerConfig};
#[cfg(not(target_arch = "wasm32"))]
use crate::models::sd_single_file::{component_name, split_fused_qkv};
use crate::models::sd_vae::{VaeConfig, VaeDecoder, VaeEncoder};
use crate::models::unet::{UNet, UNetConfig};
use crate::models::{check_finite, initial_latent, Phase, RequestDefaults};
use crate::source::Source;
use crate::tensor::{DType, HostData, HostTensor, Tensor};
use crate::weights::{Params, Weights};

pub struct StableDiffusion<B: Backend> {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextEncoder<B>,
    pub unet: OnDemand<B, UNet<B>>,
    /// The UNet's config, known before its weights are loaded.
    pub unet_config: UNetConfig,
    pub vae_decoder: VaeDecoder<B>,
    pub vae_encoder: VaeEncoder<B>,
    pub scheduler_config: SchedulerConfig,
    /// The UNet's native size and guidance 7.5, unless the folder says otherwise.
    pub defaults: RequestDefaults,
    pub dtype: DType,
}

fn parse<T: serde::de::DeserializeOwned>(json: &str) -> T {
    serde_json::from_str(json).expect("built-in config parses")
}

/// The configs of the four components.
pub struct SdConfigs {
    pub text: ClipTextConfig,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl SdConfigs {
    pub fn from_source(source: &impl Source) -> Result<Self> {
        Ok(Self {
            text: source.config("text_encoder/config.json")?,
            unet: source.config("unet/config.json")?,
            vae: source.config("vae/config.json")?,
            scheduler: source.config("scheduler/scheduler_config.json")?,
        })
    }

    /// Stable Diffusion 1.x: CLIP ViT-L/14, the 768-wide cross-attention UNet, the KL VAE.
    pub fn sd15() -> Self {
        Self {
            text: parse(r#"{"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}"#),
            unet: parse(r#"{"cross_attention_dim": 768}"#),
            vae: parse("{}"),
            scheduler: SchedulerConfig::default(),
        }
    }

    /// Stable Diffusion 2.x: OpenCLIP ViT-H (23 of its 24 layers, GELU), a UNet with linear
    /// projections and 64-wide heads. 768x768 releases predict v (`Prediction::VPrediction`).
    pub fn sd21(prediction: Prediction) -> Self {
        let mut configs = Self {
            text: parse(
                r#"{"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23, "hidden_act": "gelu"}"#,
            ),
            unet: parse(
                r#"{"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": true, "sample_size": 96}"#,
            ),
            vae: parse("{}"),
            scheduler: SchedulerConfig::default(),
        };
        configs.scheduler.prediction_type = prediction;
        configs
    }
}

/// What one generation asks for.
#[derive(Clone, Debug)]
pub struct SdRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f32,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub sampler: Sampler,
    /// Start from this latent `[1, c, h/f, w/f]` instead of seeded noise (the reference
    /// pipeline's `latents=` argument; parity tests use it).
    pub init_latent: Option<Vec<f32>>,
}

pub struct SdOutput {
    /// The final latent `[1, c, h/f, w/f]`, scaled as the denoiser sees it.
    pub latent: HostTensor,
    /// The image `[3, height, width]` in [0, 1].
    pub image: HostTensor,
}

/// One component's tensors (`text_encoder`, `unet`, `vae`) of a single-file checkpoint, under
/// the diffusers names.
#[cfg(not(target_arch = "wasm32"))]
pub fn single_file_part(file: &std::path::Path, configs: &SdConfigs, component: &str) -> Result<Weights> {
    let levels = configs.vae.block_out_channels.len();
    let w = Weights::open(file)?.renamed(|name| {
        component_name(name, &configs.unet, levels)
            .filter(|(c, _)| *c == component)
            .map(|(_, n)| n)
    });
    if w.names().next().is_none() {
        return Err(Error::Invalid(format!(
            "{}: no {component} tensors under the original Stable Diffusion key names",
            file.display()
        )));
    }
    Ok(w)
}

impl<B: Backend> StableDiffusion<B> {
    /// Loads a diffusers Stable Diffusion folder.
    pub fn load(b: &B, source: &impl Source, dtype: DType) -> Result<Self> {
        Self::load_with(b, source, dtype, DenoiserLoad::Now)
    }

    /// `load`, with the UNet loaded now or on first use.
    pub fn load_with(b: &B, source: &impl Source, dtype: DType, unet_load: DenoiserLoad) -> Result<Self> {
        if !source.exists("model_index.json") {
            return Err(Error::Invalid(format!(
                "{}: not a diffusers Stable Diffusion folder (no model_index.json)",
                source.label()
            )));
        }
        let parts = [source.weights("text_encoder")?, source.weights("unet")?, source.weights("vae")?];
        let mut sd = Self::assemble(
            b,
            SdConfigs::from_source(source)?,
            ClipTokenizer::from_source(source, "tokenizer")?,
            parts,
            dtype,
            unet_load,
        )?;
        sd.defaults = sd.defaults.with_overrides(source)?;
        Ok(sd)
    }

    /// Loads a single-file checkpoint with the original key names (`configs` as the model's;
    /// `SdConfigs::sd15()` for SD 1.x files), with the tokenizer given separately.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_single_file(
        b: &B,
        file: &std::path::Path,
        configs: SdConfigs,
        tokenizer: ClipTokenizer,
        dtype: DType,
        unet_load: DenoiserLoad,
    ) -> Result<Self> {
        let mut text = single_file_part(file, &configs, "text_encoder")?;
        split_fused_qkv(&mut text)?;
        let parts = [
            text,
            single_file_part(file, &configs, "unet")?,
            single_file_part(file, &configs, "vae")?,
        ];
        Self::assemble(b, configs, tokenizer, parts, dtype, unet_load)
    }

    fn assemble(
        b: &B,
        configs: SdConfigs,
        tokenizer: ClipTokenizer,
        [text, unet, vae]: [Weights; 3],
        dtype: DType,
        unet_load: DenoiserLoad,
    ) -> Result<Self> {
        let vp = Params::new(b, &vae, dtype);
        let unet_config = configs.unet.clone();
        let native = configs.unet.sample_size * configs.vae.scale_factor();
        Ok(Self {
            tokenizer,
            text_encoder: ClipTextEncoder::load(b, configs.text, Arc::new(text), dtype)?,
            unet: OnDemand::new(b, unet_load, move |b: &B| UNet::load(&Params::new(b, &unet, dtype), unet_config))?,
            unet_config: configs.unet,
            vae_decoder: VaeDecoder::load(&vp, configs.vae.clone())?,
            vae_encoder: VaeEncoder::load(&vp, configs.vae)?,
            scheduler_config: configs.scheduler,
            defaults: RequestDefaults {
                width: native,
                height: native,
                frames: 1,
                cfg_scale: 7.5,
            },
            dtype,
        })
    }

    /// Checks a request against what the model can take, before any work starts.
    pub fn validate(&self, req: &SdRequest) -> Result<()> {
        let f = self.vae_decoder.config.scale_factor() * (1 << (self.unet_config.block_out_channels.len() - 1));
        if req.width == 0 || req.height == 0 || !req.width.is_multiple_of(f) || !req.height.is_multiple_of(f) {
            return Err(Error::Invalid(format!(
                "{}x{} is not a size this model takes: width and height must be positive multiples of {f}",
                req.width, req.height
            )));
        }
        if req.steps == 0 {
            return Err(Error::Invalid("steps must be at least 1".into()));
        }
        Ok(())
    }

    fn latent_shape(&self, req: &SdRequest) -> [usize; 4] {
        let f = self.vae_decoder.config.scale_factor();
        [1, self.unet_config.in_channels, req.height / f, req.width / f]
    }

    /// Text embeddings `[2, seq, d]` (negative, positive) or `[1, seq, d]` without guidance.
    pub fn encode_prompts(&self, b: &B, req: &SdRequest) -> Result<Tensor<B>> {
        let mut ids = vec![];
        if req.cfg_scale > 1.0 {
            ids.push(self.tokenizer.encode(&req.negative_prompt));
        }
        ids.push(self.tokenizer.encode(&req.prompt));
        self.text_encoder.forward(b, &ids)
    }

    pub async fn generate(&self, b: &B, req: &SdRequest, progress: &mut dyn FnMut(Phase, usize, usize)) -> Result<SdOutput> {
        self.generate_with(b, req, &mut LocalDenoiser::new(&self.unet, self.dtype), progress)
            .await
    }

    /// `generate` with the UNet evaluated by `denoiser` (local, remote, or split).
    pub async fn generate_with(
        &self,
        b: &B,
        req: &SdRequest,
        denoiser: &mut impl Denoiser<B>,
        progress: &mut dyn FnMut(Phase, usize, usize),
    ) -> Result<SdOutput> {
        self.validate(req)?;
        progress(Phase::EncodeText, 0, 1);
        let context = self.encode_prompts(b, req)?;
        progress(Phase::EncodeText, 1, 1);
        let mut scheduler = Scheduler::new(req.sampler, self.scheduler_config.clone(), req.steps)?;
        let shape = self.latent_shape(req);
        let n: usize = shape.iter().product();
        let mut latent = initial_latent(req.init_latent.as_ref(), &shape, req.seed)?;
        let sigma = scheduler.init_noise_sigma();
        latent.iter_mut().for_each(|v| *v *= sigma);
        denoiser.begin(b, &TextContext::full(&context), req.cfg_scale).await?;
        let timesteps = scheduler.timesteps().to_vec();
        progress(Phase::Denoise, 0, timesteps.len());
        for (i, &t) in timesteps.iter().enumerate() {
            let scale = scheduler.input_scale(i);
            let input = HostTensor::from_f32(&shape, latent.iter().map(|v| v * scale).collect())?;
            let eps = denoiser.predict(b, i, &input, t).await?;
            let noise = scheduler
                .needs_noise()
                .then(|| crate::noise::gaussian(req.seed.wrapping_add(1 + i as u64), n));
            latent = scheduler.step(i, &eps, &latent, noise.as_deref())?;
            check_finite(&latent, i + 1, self.dtype)?;
            progress(Phase::Denoise, i + 1, timesteps.len());
        }
        progress(Phase::Decode, 0, 1);
        let image = self.decode(b, &latent, shape).await?;
        progress(Phase::Decode, 1, 1);
        Ok(SdOutput {
            latent: HostTensor::from_f32(&shape, latent)?,
            image,
        })
    }

    /// The image `[3, h, w]` in [0, 1] for a denoised latent.
    pub async fn decode(&self, b: &B, latent: &[f32], shape: [usize; 4]) -> Result<HostTensor> {
        let inv = 1.0 / self.vae_decoder.config.scaling_factor;
        let z = latent.iter().map(|v| v * inv).collect();
        let z = b.upload(&HostTensor::new(&shape, HostData::from_f32(self.dtype, z))?)?;
        let decoded = b.read(&self.vae_decoder.forward(b, &z)?).await?;
        let s = decoded.shape.clone();
        let pixels = decoded.to_f32().into_iter().map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)).collect();
        HostTensor::from_f32(&s[1..], pixels)
    }
}
