//! The denoiser as the pipelines see it: one guided model evaluation per sampler step. The
//! pipelines keep the sampler and the latent; where the model runs (this backend, a remote
//! worker, part here and part there) is the `Denoiser`'s business, so offload changes nothing
//! in the sampling loop and a failed remote step can be repeated elsewhere with the same inputs.

use crate::backend::Backend;
use crate::error::Result;
use crate::models::unet::UNet;
use crate::models::wan_dit::WanDit;
use crate::tensor::{DType, HostData, HostTensor, Tensor};

/// A job's text embeddings `[rows, positions, width]` (rows: negative then positive prompt
/// when guided, else the prompt) whose last position stands for `last_repeats` equal
/// positions. Attending to it is attending to the embeddings with that position repeated, so
/// a pipeline that pads its prompts with one vector (Wan pads to 512 zero positions) hands
/// over the prompts' positions and one padding position, and every denoiser, local or remote,
/// does the cross-attention of the positions that differ.
pub struct TextContext<B: Backend> {
    pub states: Tensor<B>,
    pub last_repeats: usize,
}

impl<B: Backend> Clone for TextContext<B> {
    fn clone(&self) -> Self {
        Self {
            states: self.states.clone(),
            last_repeats: self.last_repeats,
        }
    }
}

impl<B: Backend> TextContext<B> {
    /// The embeddings as they are, every position its own.
    pub fn full(states: &Tensor<B>) -> Self {
        Self {
            states: states.clone(),
            last_repeats: 1,
        }
    }

    /// Rows: one per prompt.
    pub fn rows(&self) -> usize {
        self.states.shape()[0]
    }

    /// The embeddings and count on the host, to send to a worker.
    pub async fn read(&self, b: &B) -> Result<HostText> {
        Ok(HostText {
            states: b.read(&self.states).await?,
            last_repeats: self.last_repeats,
        })
    }
}

/// A `TextContext` on the host: what a client sends a worker.
#[derive(Clone, Debug)]
pub struct HostText {
    pub states: HostTensor,
    pub last_repeats: usize,
}

/// The one rule for a text's repeat count, wherever a text arrives: at least 1, and above 1
/// only for a model that reads a position as several (the DiT; the UNet attends to each
/// position as given).
pub fn check_last_repeats(last_repeats: usize, reads_repeats: bool) -> Result<()> {
    if last_repeats == 0 || (last_repeats > 1 && !reads_repeats) {
        return Err(crate::error::Error::Invalid(format!(
            "a text whose last position stands for {last_repeats} positions: {}",
            if reads_repeats {
                "it must stand for at least 1"
            } else {
                "this model takes each position as given (1)"
            }
        )));
    }
    Ok(())
}

/// A model that predicts noise or velocity for a batch of latents at per-row timesteps given
/// text embeddings, one row per prompt: the SD UNet and the Wan DiT.
pub trait DenoiserModel<B: Backend> {
    fn forward(&self, b: &B, x: &Tensor<B>, timesteps: &[f32], text: &TextContext<B>) -> Result<Tensor<B>>;
}

impl<B: Backend> DenoiserModel<B> for UNet<B> {
    fn forward(&self, b: &B, x: &Tensor<B>, timesteps: &[f32], text: &TextContext<B>) -> Result<Tensor<B>> {
        check_last_repeats(text.last_repeats, false)?;
        UNet::forward(self, b, x, timesteps, &text.states)
    }
}

impl<B: Backend> DenoiserModel<B> for WanDit<B> {
    fn forward(&self, b: &B, x: &Tensor<B>, timesteps: &[f32], text: &TextContext<B>) -> Result<Tensor<B>> {
        WanDit::forward(self, b, x, timesteps, text)
    }
}

/// One guided evaluation per step. `begin` receives a job's text embeddings once (rows:
/// negative then positive prompt when guided); `predict` gets the model input for one latent
/// `[1, ...]` and returns the guided prediction of the same size.
#[allow(async_fn_in_trait)]
pub trait Denoiser<B: Backend> {
    async fn begin(&mut self, b: &B, text: &TextContext<B>, cfg_scale: f32) -> Result<()>;
    async fn predict(&mut self, b: &B, step: usize, input: &HostTensor, timestep: f32) -> Result<Vec<f32>>;
}

/// Whether a job with these embeddings rows is guided: guidance needs the negative row.
pub fn is_guided(rows: usize, cfg_scale: f32) -> bool {
    rows == 2 && cfg_scale > 1.0
}

/// The model's output for `input` repeated over the context's rows, combined by
/// classifier-free guidance: what a local run computes and what a worker computes for it.
pub async fn guided_prediction<B: Backend, M: DenoiserModel<B> + ?Sized>(
    b: &B,
    model: &M,
    text: &TextContext<B>,
    cfg_scale: f32,
    dtype: DType,
    input: &HostTensor,
    timestep: f32,
) -> Result<Vec<f32>> {
    let rows = text.rows();
    let x = batch_input(b, input, rows, dtype)?;
    let pred = b.read(&model.forward(b, &x, &vec![timestep; rows], text)?).await?.to_f32();
    Ok(crate::models::guide(pred, is_guided(rows, cfg_scale), cfg_scale))
}

/// One latent `[1, ...]` repeated to `rows` rows, on the device in `dtype`.
pub fn batch_input<B: Backend>(b: &B, input: &HostTensor, rows: usize, dtype: DType) -> Result<Tensor<B>> {
    let mut shape = input.shape.clone();
    shape[0] = rows;
    b.upload(&HostTensor::new(
        &shape,
        HostData::from_f32(dtype, input.data.to_f32().repeat(rows)),
    )?)
}

/// The denoiser on this backend, its model loaded at the first step it runs (a pipeline that
/// deferred it and offloads every step never loads it).
pub struct LocalDenoiser<'m, B: Backend, M> {
    model: &'m OnDemand<B, M>,
    dtype: DType,
    job: Option<(TextContext<B>, f32)>,
}

impl<'m, B: Backend, M: DenoiserModel<B>> LocalDenoiser<'m, B, M> {
    pub fn new(model: &'m OnDemand<B, M>, dtype: DType) -> Self {
        Self { model, dtype, job: None }
    }
}

impl<B: Backend, M: DenoiserModel<B>> Denoiser<B> for LocalDenoiser<'_, B, M> {
    async fn begin(&mut self, _b: &B, text: &TextContext<B>, cfg_scale: f32) -> Result<()> {
        self.job = Some((text.clone(), cfg_scale));
        Ok(())
    }

    async fn predict(&mut self, b: &B, _step: usize, input: &HostTensor, timestep: f32) -> Result<Vec<f32>> {
        let (text, cfg_scale) = self
            .job
            .as_ref()
            .ok_or_else(|| crate::error::Error::Invalid("denoiser: predict before begin".into()))?;
        guided_prediction(b, self.model.get(b)?, text, *cfg_scale, self.dtype, input, timestep).await
    }
}

/// When a pipeline reads and uploads its denoiser's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenoiserLoad {
    Now,
    /// At the first `OnDemand::get`: a client that offloads the denoiser needs its own copy
    /// only when no worker is left (or for auto's one timing), so it need not hold the
    /// pipeline's largest part in memory meanwhile.
    OnFirstUse,
}

type Loader<B, M> = Box<dyn FnOnce(&B) -> Result<M>>;

/// A pipeline's denoiser model, loaded when the pipeline is or on first use (`DenoiserLoad`).
/// A deferred load's errors (a missing or malformed tensor) surface at that first use, with
/// the same messages as an eager load's.
pub struct OnDemand<B: Backend, M> {
    model: std::cell::OnceCell<M>,
    load: std::cell::Cell<Option<Loader<B, M>>>,
}

impl<B: Backend, M> OnDemand<B, M> {
    /// `load` now (`DenoiserLoad::Now`) or at the first `get`.
    pub fn new(b: &B, when: DenoiserLoad, load: impl FnOnce(&B) -> Result<M> + 'static) -> Result<Self> {
        let this = Self {
            model: std::cell::OnceCell::new(),
            load: std::cell::Cell::new(Some(Box::new(load))),
        };
        if when == DenoiserLoad::Now {
            this.get(b)?;
        }
        Ok(this)
    }

    /// The model, loading it on the first call.
    pub fn get(&self, b: &B) -> Result<&M> {
        if let Some(model) = self.model.get() {
            return Ok(model);
        }
        let load = self
            .load
            .take()
            .ok_or_else(|| crate::error::Error::Invalid("denoiser: its weights failed to load earlier".into()))?;
        let model = load(b)?;
        Ok(self.model.get_or_init(|| model))
    }

    pub fn is_loaded(&self) -> bool {
        self.model.get().is_some()
    }
}
