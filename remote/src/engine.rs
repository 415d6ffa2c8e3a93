//! What a worker computes, behind the `Engine` trait: the real one (`ModelEngine`) loads
//! denoisers from its `ModelStore` on a runtime backend; benchmarks and fault tests put
//! stand-ins behind the same trait. An engine lives on the worker's one compute thread, so it
//! owns its device and needs no locking.

use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;

use sdlite_runtime::models::denoiser::{check_last_repeats, guided_prediction, DenoiserModel, HostText, TextContext};
use sdlite_runtime::models::unet::UNet;
use sdlite_runtime::models::wan_dit::WanDit;
use sdlite_runtime::weights::Params;
use sdlite_runtime::{Backend, DType, HostTensor, Tensor};

use crate::model_id::ModelStore;
use crate::protocol::{DenoiserKind, ErrorCode, JobMode, ModelHash};

/// An error answer: the code and a message for the client.
pub type Failure = (ErrorCode, String);

/// Built on the compute thread by the factory `start_worker` is given, so it need not be `Send`.
pub trait Engine: 'static {
    /// The backend, for the `Hello` answer.
    fn describe(&self) -> String;
    fn has_model(&self, model: &ModelHash) -> bool;
    fn open_job(&mut self, model: ModelHash, mode: JobMode, dtype: DType, cfg_scale: f32, text: HostText) -> Result<u64, Failure>;
    /// The guided prediction for one latent `[1, ...]`.
    fn step(&mut self, job: u64, input: HostTensor, timestep: f32) -> Result<HostTensor, Failure>;
    /// Hidden tokens after DiT blocks `range`.
    fn blocks(
        &mut self,
        job: u64,
        hidden: HostTensor,
        modulation: HostTensor,
        range: Range<usize>,
        grid: [usize; 3],
    ) -> Result<HostTensor, Failure>;
    fn close_job(&mut self, job: u64);
    /// Keeps a model whose upload checked out.
    fn add_model(&mut self, model: ModelHash, kind: DenoiserKind, config: &str, tensors: &[(String, HostTensor)]) -> Result<(), Failure>;
}

/// A worker picks its backend at start, so its engine's type is chosen at run time.
impl Engine for Box<dyn Engine> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn has_model(&self, model: &ModelHash) -> bool {
        (**self).has_model(model)
    }
    fn open_job(&mut self, model: ModelHash, mode: JobMode, dtype: DType, cfg_scale: f32, text: HostText) -> Result<u64, Failure> {
        (**self).open_job(model, mode, dtype, cfg_scale, text)
    }
    fn step(&mut self, job: u64, input: HostTensor, timestep: f32) -> Result<HostTensor, Failure> {
        (**self).step(job, input, timestep)
    }
    fn blocks(
        &mut self,
        job: u64,
        hidden: HostTensor,
        modulation: HostTensor,
        range: Range<usize>,
        grid: [usize; 3],
    ) -> Result<HostTensor, Failure> {
        (**self).blocks(job, hidden, modulation, range, grid)
    }
    fn close_job(&mut self, job: u64) {
        (**self).close_job(job)
    }
    fn add_model(&mut self, model: ModelHash, kind: DenoiserKind, config: &str, tensors: &[(String, HostTensor)]) -> Result<(), Failure> {
        (**self).add_model(model, kind, config, tensors)
    }
}

enum Loaded<B: Backend> {
    Unet(Box<UNet<B>>),
    Dit(Box<WanDit<B>>),
}

impl<B: Backend> DenoiserModel<B> for Loaded<B> {
    fn forward(&self, b: &B, x: &Tensor<B>, timesteps: &[f32], text: &TextContext<B>) -> sdlite_runtime::Result<Tensor<B>> {
        match self {
            Loaded::Unet(m) => DenoiserModel::forward(&**m, b, x, timesteps, text),
            Loaded::Dit(m) => DenoiserModel::forward(&**m, b, x, timesteps, text),
        }
    }
}

struct Job<B: Backend> {
    model: Rc<Loaded<B>>,
    mode: JobMode,
    dtype: DType,
    cfg_scale: f32,
    text: TextContext<B>,
}

/// Denoisers from a `ModelStore` on backend `B`, the most recently used `max_loaded` kept
/// resident.
pub struct ModelEngine<B: Backend> {
    backend: B,
    store: ModelStore,
    max_loaded: usize,
    loaded: Vec<(ModelHash, DType, Rc<Loaded<B>>)>,
    jobs: HashMap<u64, Job<B>>,
}

fn compute_err(e: impl std::fmt::Display) -> Failure {
    (ErrorCode::Compute, e.to_string())
}

impl<B: Backend + 'static> ModelEngine<B> {
    pub fn new(backend: B, store: ModelStore, max_loaded: usize) -> Self {
        Self {
            backend,
            store,
            max_loaded: max_loaded.max(1),
            loaded: vec![],
            jobs: HashMap::new(),
        }
    }

    fn model(&mut self, hash: ModelHash, dtype: DType) -> Result<Rc<Loaded<B>>, Failure> {
        if let Some(i) = self.loaded.iter().position(|(h, d, _)| *h == hash && *d == dtype) {
            let entry = self.loaded.remove(i);
            let model = entry.2.clone();
            self.loaded.push(entry);
            return Ok(model);
        }
        let package = self
            .store
            .get(&hash)
            .ok_or_else(|| (ErrorCode::UnknownModel, format!("no model with hash {hash} here")))?;
        let p = Params::new(&self.backend, &package.weights, dtype);
        let model = match package.kind {
            DenoiserKind::Unet => Loaded::Unet(Box::new(
                UNet::load(&p, serde_json::from_str(&package.config).map_err(compute_err)?).map_err(compute_err)?,
            )),
            DenoiserKind::WanDit => Loaded::Dit(Box::new(
                WanDit::load(&p, serde_json::from_str(&package.config).map_err(compute_err)?).map_err(compute_err)?,
            )),
        };
        if self.loaded.len() >= self.max_loaded {
            self.loaded.remove(0);
        }
        let model = Rc::new(model);
        self.loaded.push((hash, dtype, model.clone()));
        Ok(model)
    }

    fn upload(&self, t: &HostTensor, dtype: DType) -> Result<Tensor<B>, Failure> {
        let t = HostTensor::new(&t.shape, t.data.convert(dtype)).map_err(|e| (ErrorCode::BadTensor, e.to_string()))?;
        self.backend.upload(&t).map_err(compute_err)
    }

    fn job(&self, job: u64) -> Result<&Job<B>, Failure> {
        self.jobs.get(&job).ok_or_else(|| (ErrorCode::UnknownJob, format!("no job {job}")))
    }
}

impl<B: Backend + 'static> Engine for ModelEngine<B> {
    fn describe(&self) -> String {
        self.backend.name()
    }

    fn has_model(&self, model: &ModelHash) -> bool {
        self.store.get(model).is_some()
    }

    fn open_job(&mut self, model: ModelHash, mode: JobMode, dtype: DType, cfg_scale: f32, text: HostText) -> Result<u64, Failure> {
        let s = &text.states.shape;
        if s.len() != 3 || !(1..=2).contains(&s[0]) || s[1] == 0 {
            return Err((ErrorCode::BadTensor, format!("context {s:?}: expected [1 or 2, seq >= 1, width]")));
        }
        if !self.backend.supports(dtype) {
            return Err((ErrorCode::Compute, format!("this worker's backend does not compute in {dtype:?}")));
        }
        let loaded = self.model(model, dtype)?;
        if mode == JobMode::Blocks && !matches!(*loaded, Loaded::Dit(_)) {
            return Err((ErrorCode::BadTensor, "block offload needs a DiT model".into()));
        }
        check_last_repeats(text.last_repeats, matches!(*loaded, Loaded::Dit(_))).map_err(|e| (ErrorCode::BadTensor, e.to_string()))?;
        let text = TextContext {
            states: self.upload(&text.states, dtype)?,
            last_repeats: text.last_repeats,
        };
        let id = loop {
            let id = rand::random::<u64>();
            if !self.jobs.contains_key(&id) {
                break id;
            }
        };
        self.jobs.insert(
            id,
            Job {
                model: loaded,
                mode,
                dtype,
                cfg_scale,
                text,
            },
        );
        Ok(id)
    }

    fn step(&mut self, job: u64, input: HostTensor, timestep: f32) -> Result<HostTensor, Failure> {
        let j = self.job(job)?;
        if j.mode != JobMode::Denoiser || input.shape.first() != Some(&1) {
            return Err((
                ErrorCode::BadTensor,
                format!("step input {:?}: expected one latent [1, ...] in a denoiser job", input.shape),
            ));
        }
        let pred = pollster::block_on(guided_prediction(
            &self.backend,
            &*j.model,
            &j.text,
            j.cfg_scale,
            j.dtype,
            &input,
            timestep,
        ))
        .map_err(compute_err)?;
        HostTensor::from_f32(&input.shape, pred).map_err(compute_err)
    }

    fn blocks(
        &mut self,
        job: u64,
        hidden: HostTensor,
        modulation: HostTensor,
        range: Range<usize>,
        grid: [usize; 3],
    ) -> Result<HostTensor, Failure> {
        let j = self.job(job)?;
        let Loaded::Dit(dit) = &*j.model else {
            return Err((ErrorCode::BadTensor, "block offload needs a DiT model".into()));
        };
        let tokens = grid.iter().product::<usize>();
        if j.mode != JobMode::Blocks || hidden.shape.len() != 3 || hidden.shape[1] != tokens {
            return Err((
                ErrorCode::BadTensor,
                format!("hidden {:?} does not hold the {tokens} tokens of grid {grid:?}", hidden.shape),
            ));
        }
        let (b, dtype) = (&self.backend, j.dtype);
        let inputs = dit
            .block_inputs(b, self.upload(&modulation, dtype)?, &j.text, grid)
            .map_err(compute_err)?;
        let out = dit
            .run_blocks(b, self.upload(&hidden, dtype)?, &inputs, range)
            .map_err(compute_err)?;
        pollster::block_on(b.read(&out)).map_err(compute_err)
    }

    fn close_job(&mut self, job: u64) {
        self.jobs.remove(&job);
    }

    fn add_model(&mut self, model: ModelHash, kind: DenoiserKind, config: &str, tensors: &[(String, HostTensor)]) -> Result<(), Failure> {
        self.store
            .add_upload(model, kind, config, tensors)
            .map_err(|e| (ErrorCode::Upload, e.to_string()))
    }
}
