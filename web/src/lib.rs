//! sdlite in the browser: the runtime's Stable Diffusion and Wan2.1 pipelines on WebGPU
//! (wgpu's `webgpu` backend), driven by the demo page in `www/`. Nothing here computes: ops
//! and models are the runtime's, so the tab's pictures and videos are the native wgpu
//! backend's.
//!
//! JS sees one object, `Studio`: `Studio.open()` takes the WebGPU adapter, `load(name, paths,
//! contents)` a diffusers folder's files (returning a `ModelInfo`), `generate(request,
//! onProgress, worker)` returns a Promise of an `Output` (a picture, or a video's frames), and
//! `cancel()` stops the running generation at its next step.
//!
//! With a `worker` (the page's WebTransport link to `sdlite worker --webtransport`), the
//! denoiser's steps run there in the same wire format as `sdlite gen --worker`; if the worker
//! fails mid-job the remaining steps run here on WebGPU.

use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;

use sdlite_remote::channel::Channel;
use sdlite_remote::channel_denoiser::{ChannelDenoiser, ChannelStats};
use sdlite_remote::frame::{read_frame, write_frame, Frame, TensorRef, DEFAULT_MAX_FRAME_BYTES};
use sdlite_remote::model_id::DenoiserPackage;
use sdlite_remote::protocol::{Envelope, Response};
use sdlite_runtime::models::denoiser::{Denoiser, DenoiserLoad, TextContext};
use sdlite_runtime::models::flow_schedulers::FlowSampler;
use sdlite_runtime::models::schedulers::Sampler;
use sdlite_runtime::models::sd::{SdRequest, StableDiffusion};
use sdlite_runtime::models::wan::{Wan, WanRequest};
use sdlite_runtime::models::{Phase, RequestDefaults};
use sdlite_runtime::source::{MemorySource, Source};
use sdlite_runtime::{image, Backend, DType, Error, HostTensor, Result, WgpuBackend, WgpuOptions};
use wasm_bindgen::prelude::*;

/// The files of a diffusers folder as the browser hands them over, keyed by their path inside
/// the folder. A picked directory's paths start with its own name (`sd-tiny/unet/...`): the
/// folder is where `model_index.json` sits, and files outside it are dropped.
pub fn folder_files(files: Vec<(String, Vec<u8>)>) -> Result<MemorySource> {
    let root = files
        .iter()
        .filter_map(|(p, _)| p.strip_suffix("model_index.json"))
        .filter(|prefix| prefix.is_empty() || prefix.ends_with('/'))
        .min_by_key(|prefix| prefix.len())
        .map(str::to_string)
        .ok_or_else(|| Error::Invalid("not a diffusers model folder: no model_index.json among the files given".into()))?;
    let mut source = MemorySource::default();
    for (path, bytes) in files {
        if let Some(inner) = path.strip_prefix(&root) {
            source.files.insert(inner.to_string(), bytes.into());
        }
    }
    Ok(source)
}

/// A look at a latent `[1, c, h, w]` (or a video's `[1, c, t, h, w]`, its first frame) while
/// it is denoised: its first three channels as RGBA, each stretched over its own range (the
/// VAE would cost a full decode per preview).
pub fn latent_preview(latent: &HostTensor) -> Result<Picture> {
    let s = &latent.shape;
    let frames = match s.len() {
        4 => 1,
        5 => s[2],
        _ => 0,
    };
    if frames == 0 || s[0] != 1 || s[1] < 3 {
        return Err(Error::Invalid(format!("latent preview: shape {s:?} is not [1, c >= 3, (t,) h, w]")));
    }
    let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
    let plane = h * w;
    let values = latent.to_f32();
    let mut chw = Vec::with_capacity(3 * plane);
    for c in 0..3 {
        let ch = &values[c * frames * plane..][..plane];
        let (lo, hi) = ch
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, u), &v| (l.min(v), u.max(v)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        chw.extend(ch.iter().map(|v| (v - lo) / span));
    }
    Ok(Picture::from_rgb(w, h, &image::rgb8(&chw, plane)))
}

/// An image as the page draws it: RGBA rows, top first.
#[wasm_bindgen]
pub struct Picture {
    #[wasm_bindgen(readonly)]
    pub width: u32,
    #[wasm_bindgen(readonly)]
    pub height: u32,
    #[wasm_bindgen(readonly, getter_with_clone)]
    pub rgba: Vec<u8>,
}

impl Picture {
    fn from_rgb(width: usize, height: usize, rgb: &[u8]) -> Self {
        let rgba = rgb.chunks_exact(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
        Self {
            width: width as u32,
            height: height as u32,
            rgba,
        }
    }
}

/// A generation's result: a video `[3, frames, h, w]` in [0, 1] (a picture is one frame),
/// as frames to draw and as the PNG (animated for videos) `sdlite gen` would write.
#[wasm_bindgen]
pub struct Output {
    video: Vec<f32>,
    #[wasm_bindgen(readonly)]
    pub frames: u32,
    #[wasm_bindgen(readonly)]
    pub width: u32,
    #[wasm_bindgen(readonly)]
    pub height: u32,
    fps: u16,
    parameters: String,
    stats: ChannelStats,
}

#[wasm_bindgen]
impl Output {
    /// Frame `i` (0 for a picture).
    pub fn frame(&self, i: u32) -> std::result::Result<Picture, JsError> {
        if i >= self.frames {
            return Err(JsError::new(&format!("frame {i} of {}", self.frames)));
        }
        let (w, h) = (self.width as usize, self.height as usize);
        let chw = image::frame_planes(&self.video, self.frames as usize, i as usize, w * h);
        Ok(Picture::from_rgb(w, h, &image::rgb8(&chw, w * h)))
    }

    /// Denoising steps the worker ran.
    #[wasm_bindgen(getter, js_name = remoteSteps)]
    pub fn remote_steps(&self) -> u32 {
        self.stats.remote_steps as u32
    }

    /// Denoising steps run here.
    #[wasm_bindgen(getter, js_name = localSteps)]
    pub fn local_steps(&self) -> u32 {
        self.stats.local_steps as u32
    }

    /// Why the worker was given up, if it was.
    #[wasm_bindgen(getter, js_name = workerFailure)]
    pub fn worker_failure(&self) -> Option<String> {
        self.stats.failure.clone()
    }

    /// The PNG file: a picture, or a looping animated PNG that browsers play.
    pub fn png(&self) -> std::result::Result<Vec<u8>, JsError> {
        let (frames, w, h) = (self.frames as usize, self.width as usize, self.height as usize);
        image::png(&self.video, frames, w, h, self.fps, &self.parameters).map_err(js_err)
    }
}

/// What a loaded model is and the size it generates by default.
#[wasm_bindgen]
pub struct ModelInfo {
    /// `"sd"` (pictures) or `"wan"` (videos).
    #[wasm_bindgen(readonly, getter_with_clone)]
    pub kind: String,
    #[wasm_bindgen(readonly)]
    pub width: u32,
    #[wasm_bindgen(readonly)]
    pub height: u32,
    /// 1 for picture models.
    #[wasm_bindgen(readonly)]
    pub frames: u32,
    #[wasm_bindgen(readonly)]
    pub guidance: f32,
}

impl ModelInfo {
    fn new(kind: &str, d: RequestDefaults) -> Self {
        ModelInfo {
            kind: kind.into(),
            width: d.width as u32,
            height: d.height as u32,
            frames: d.frames as u32,
            guidance: d.cfg_scale,
        }
    }
}

#[wasm_bindgen]
impl ModelInfo {
    /// The samplers this model takes, the default first.
    #[wasm_bindgen(getter)]
    pub fn samplers(&self) -> Vec<String> {
        let names: &[&str] = if self.kind == "wan" {
            &["unipc", "flow_euler"]
        } else {
            &["dpmpp_2m", "euler_a", "euler", "ddim"]
        };
        names.iter().map(|s| s.to_string()).collect()
    }
}

enum Model {
    Sd(Rc<StableDiffusion<WgpuBackend>>),
    Wan(Rc<Wan<WgpuBackend>>),
}

impl Model {
    fn info(&self) -> ModelInfo {
        match self {
            Model::Sd(sd) => ModelInfo::new("sd", sd.defaults),
            Model::Wan(wan) => ModelInfo::new("wan", wan.defaults),
        }
    }
}

/// What to generate; the page fills it from its form. Zero sizes and an empty sampler take
/// the model's defaults; guidance is the model's (as `sdlite gen` takes it) unless set.
#[wasm_bindgen(getter_with_clone)]
#[derive(Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    /// Negative: the model's default.
    pub guidance: f32,
    /// A whole number below 2^53 (what a JS number holds exactly).
    pub seed: f64,
    pub width: u32,
    pub height: u32,
    /// Video length for Wan: 1 + 4k.
    pub frames: u32,
    pub sampler: String,
    /// Steps between two latent previews; 0 for none.
    pub preview_every: u32,
}

#[wasm_bindgen]
impl Request {
    #[wasm_bindgen(constructor)]
    pub fn new(prompt: String) -> Request {
        Request {
            prompt,
            negative_prompt: String::new(),
            steps: 25,
            guidance: -1.0,
            seed: 0.0,
            width: 0,
            height: 0,
            frames: 0,
            sampler: String::new(),
            preview_every: 5,
        }
    }
}

impl Request {
    fn seed(&self) -> Result<u64> {
        if !(self.seed >= 0.0 && self.seed.fract() == 0.0 && self.seed < 9007199254740992.0) {
            return Err(Error::Invalid(format!("seed {} is not a whole number in 0..2^53", self.seed)));
        }
        Ok(self.seed as u64)
    }

    fn or(v: u32, default: u32) -> usize {
        if v == 0 {
            default as usize
        } else {
            v as usize
        }
    }

    fn guidance(&self, default: f32) -> f32 {
        if self.guidance < 0.0 {
            default
        } else {
            self.guidance
        }
    }

    fn sampler<'a>(&'a self, default: &'a str) -> &'a str {
        if self.sampler.is_empty() {
            default
        } else {
            &self.sampler
        }
    }

    fn to_sd(&self, info: &ModelInfo) -> Result<SdRequest> {
        Ok(SdRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps as usize,
            cfg_scale: self.guidance(info.guidance),
            seed: self.seed()?,
            width: Self::or(self.width, info.width),
            height: Self::or(self.height, info.height),
            sampler: Sampler::parse(self.sampler("dpmpp_2m"))?,
            init_latent: None,
        })
    }

    fn to_wan(&self, info: &ModelInfo) -> Result<WanRequest> {
        Ok(WanRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps as usize,
            cfg_scale: self.guidance(info.guidance),
            seed: self.seed()?,
            width: Self::or(self.width, info.width),
            height: Self::or(self.height, info.height),
            frames: Self::or(self.frames, info.frames),
            sampler: FlowSampler::parse(self.sampler("unipc"))?,
            shift: None,
            init_latent: None,
        })
    }

    /// The `parameters` text of the PNG, as `sdlite gen` writes it.
    fn describe(&self, model: &str, sampler: &str, cfg_scale: f32, width: usize, height: usize, frames: Option<usize>) -> Result<String> {
        Ok(image::Parameters {
            prompt: &self.prompt,
            negative_prompt: &self.negative_prompt,
            steps: self.steps as usize,
            sampler,
            cfg_scale,
            seed: self.seed()?,
            width,
            height,
            frames,
            model,
            backend: "browser WebGPU",
        }
        .to_string())
    }
}

/// The pipeline's denoiser with the page's hooks: a cancel flag checked before every step and
/// a latent preview every few steps.
struct Watched<'a, D> {
    inner: D,
    cancelled: &'a Cell<bool>,
    every: usize,
    preview: &'a dyn Fn(usize, Picture),
}

impl<'a, D> Watched<'a, D> {
    fn new(inner: D, cancelled: &'a Cell<bool>, every: usize, preview: &'a dyn Fn(usize, Picture)) -> Self {
        Self {
            inner,
            cancelled,
            every,
            preview,
        }
    }
}

impl<B: Backend, D: Denoiser<B>> Denoiser<B> for Watched<'_, D> {
    async fn begin(&mut self, b: &B, text: &TextContext<B>, cfg_scale: f32) -> Result<()> {
        self.inner.begin(b, text, cfg_scale).await
    }

    async fn predict(&mut self, b: &B, step: usize, input: &HostTensor, timestep: f32) -> Result<Vec<f32>> {
        if self.cancelled.get() {
            return Err(Error::Cancelled);
        }
        if self.every > 0 && step > 0 && step.is_multiple_of(self.every) {
            (self.preview)(step, latent_preview(input)?);
        }
        self.inner.predict(b, step, input, timestep).await
    }
}

/// A loaded model and the name the page gave it (written into the PNGs' parameters).
struct Loaded {
    name: String,
    model: Model,
    /// The denoiser's files, hashed (and sent, if a worker lacks them) on first offload.
    denoiser_files: MemorySource,
    package: OnceCell<DenoiserPackage>,
}

impl Loaded {
    fn package(&self) -> Result<&DenoiserPackage> {
        if let Some(p) = self.package.get() {
            return Ok(p);
        }
        let made = DenoiserPackage::from_source(&self.denoiser_files).map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(self.package.get_or_init(|| made))
    }
}

#[wasm_bindgen]
extern "C" {
    /// The page's link to a worker (app.js `WorkerTransport`): `exchange(frame)` sends one
    /// request frame on a fresh WebTransport stream and resolves to the answer frame.
    pub type WorkerTransport;

    #[wasm_bindgen(method, catch)]
    async fn exchange(this: &WorkerTransport, frame: js_sys::Uint8Array) -> std::result::Result<JsValue, JsValue>;

    #[wasm_bindgen(method, getter)]
    fn url(this: &WorkerTransport) -> String;

    #[wasm_bindgen(method, getter)]
    fn token(this: &WorkerTransport) -> String;
}

/// A JavaScript exception's message (`WebTransportError: Connection lost.`).
fn js_message(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

/// The protocol's requests over the page's transport: frames are encoded and decoded here by
/// the same code as natively, JavaScript only moves bytes.
struct JsChannel {
    transport: WorkerTransport,
    url: String,
    token: String,
}

impl JsChannel {
    fn new(transport: WorkerTransport) -> Self {
        Self {
            url: transport.url(),
            token: transport.token(),
            transport,
        }
    }
}

impl Channel for JsChannel {
    fn label(&self) -> String {
        self.url.clone()
    }

    fn token(&self) -> &str {
        &self.token
    }

    async fn exchange(&self, envelope: &Envelope, tensors: &[TensorRef<'_>]) -> sdlite_remote::Result<Frame<Response>> {
        let mut frame = vec![];
        write_frame(&mut frame, envelope, tensors).await?;
        let answer = self
            .transport
            .exchange(js_sys::Uint8Array::from(frame.as_slice()))
            .await
            .map_err(|e| sdlite_remote::Error::Connection {
                worker: self.url.clone(),
                detail: js_message(&e),
            })?;
        let bytes = js_sys::Uint8Array::new(&answer).to_vec();
        read_frame(&mut bytes.as_slice(), DEFAULT_MAX_FRAME_BYTES).await
    }
}

struct Inner {
    backend: WgpuBackend,
    model: RefCell<Option<Rc<Loaded>>>,
    cancelled: Cell<bool>,
    busy: Cell<bool>,
}

/// Clears the busy flag however a generation ends.
struct Busy<'a>(&'a Cell<bool>);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// WebGPU says only "Out of Memory" when the adapter cannot hold a generation's tensors (every
/// kernel runs within WebGPU's default limits, so memory is the limit a model and size can
/// hit): say which size was too large and what to do instead.
fn explain_memory(e: Error, width: usize, height: usize, frames: usize) -> Error {
    match e {
        Error::Gpu(m) if m.contains("Out of Memory") => {
            let frames = if frames > 1 { format!(", {frames} frames") } else { String::new() };
            Error::Gpu(format!(
                "this GPU does not have the memory for this model at {width}×{height}{frames} ({m}): \
                 choose a smaller size{}, or generate on a worker",
                if frames.is_empty() { "" } else { " or fewer frames" }
            ))
        }
        e => e,
    }
}

fn js_err(e: Error) -> JsError {
    JsError::new(&e.to_string())
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::EncodeText => "encode",
        Phase::Denoise => "denoise",
        Phase::Decode => "decode",
    }
}

/// The runtime in a tab: one WebGPU device, one loaded model, one generation at a time.
#[wasm_bindgen]
pub struct Studio {
    inner: Rc<Inner>,
}

#[wasm_bindgen]
impl Studio {
    /// Takes the browser's WebGPU adapter (f32 throughout: not every adapter has
    /// `shader-f16`, and the f32 path is the one that matches the native backends).
    pub async fn open() -> std::result::Result<Studio, JsError> {
        let backend = WgpuBackend::new(WgpuOptions::default()).await.map_err(js_err)?;
        Ok(Studio {
            inner: Rc::new(Inner {
                backend,
                model: RefCell::new(None),
                cancelled: Cell::new(false),
                busy: Cell::new(false),
            }),
        })
    }

    /// The adapter, as the runtime names it.
    #[wasm_bindgen(getter)]
    pub fn adapter(&self) -> String {
        self.inner.backend.name()
    }

    /// Loads a diffusers folder (Stable Diffusion 1.x/2.x or Wan2.1) from its files
    /// (`paths[i]` holds `contents[i]`, a Uint8Array); `name` labels its outputs.
    pub fn load(&self, name: String, paths: Vec<String>, contents: js_sys::Array) -> std::result::Result<ModelInfo, JsError> {
        if self.inner.busy.get() {
            return Err(JsError::new("a generation is running; cancel it first"));
        }
        if paths.len() != contents.length() as usize {
            return Err(JsError::new("load: paths and contents differ in length"));
        }
        let files = paths
            .into_iter()
            .zip(contents.iter())
            .map(|(p, c)| {
                let bytes = c
                    .dyn_into::<js_sys::Uint8Array>()
                    .map_err(|_| JsError::new(&format!("load: the contents of {p} are not a Uint8Array")))?;
                Ok((p, bytes.to_vec()))
            })
            .collect::<std::result::Result<Vec<_>, JsError>>()?;
        let mut source = folder_files(files).map_err(js_err)?;
        let index: serde_json::Value = source.config("model_index.json").map_err(js_err)?;
        let b = &self.inner.backend;
        // The denoiser, the pipeline's largest part, is read on its first local step: a page
        // that sends every step to a worker never holds it on its GPU.
        let later = DenoiserLoad::OnFirstUse;
        let model = if index["_class_name"].as_str().is_some_and(|c| c.starts_with("Wan")) {
            Model::Wan(Rc::new(Wan::load_with(b, &source, DType::F32, later).map_err(js_err)?))
        } else {
            Model::Sd(Rc::new(StableDiffusion::load_with(b, &source, DType::F32, later).map_err(js_err)?))
        };
        let info = model.info();
        let component = if info.kind == "wan" { "transformer/" } else { "unet/" };
        let denoiser_files = MemorySource {
            files: source.files.drain().filter(|(p, _)| p.starts_with(component)).collect(),
        };
        *self.inner.model.borrow_mut() = Some(Rc::new(Loaded {
            name,
            model,
            denoiser_files,
            package: OnceCell::new(),
        }));
        Ok(info)
    }

    /// Stops the running generation before its next step (its Promise rejects with
    /// "cancelled").
    pub fn cancel(&self) {
        self.inner.cancelled.set(true);
    }

    /// Generates a picture (SD) or a video (Wan). `on_progress(phase, done, total, preview)`
    /// is called as the work advances: phase "encode", "denoise" or "decode" (frames, for
    /// videos); `preview` a `Picture` of the latent every `request.preview_every` steps, else
    /// undefined; phase "worker" carries a line about the worker (connected, uploading,
    /// failed) as `preview`. With `worker` the denoiser runs there (see the module's docs).
    pub fn generate(&self, request: &Request, on_progress: js_sys::Function, worker: Option<WorkerTransport>) -> js_sys::Promise {
        let inner = self.inner.clone();
        let request = request.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let loaded = inner.model.borrow().clone().ok_or_else(|| JsError::new("load a model first"))?;
            if inner.busy.replace(true) {
                return Err(JsError::new("a generation is already running").into());
            }
            let _busy = Busy(&inner.busy);
            inner.cancelled.set(false);
            let report = |phase: &str, done: usize, total: usize, preview: JsValue| {
                let args = js_sys::Array::of4(&phase.into(), &(done as u32).into(), &(total as u32).into(), &preview);
                // A throwing callback must not abort the generation.
                let _ = on_progress.apply(&JsValue::NULL, &args);
            };
            let steps = request.steps as usize;
            let preview = |step: usize, picture: Picture| report("denoise", step, steps, picture.into());
            let mut progress = |phase: Phase, done: usize, total: usize| report(phase_name(phase), done, total, JsValue::UNDEFINED);
            let log = |line: String| report("worker", 0, 0, line.into());
            let every = request.preview_every as usize;
            let info = loaded.model.info();
            let b = &inner.backend;
            let remote = match worker {
                Some(t) => Some((JsChannel::new(t), loaded.package().map_err(js_err)?)),
                None => None,
            };
            let output = match &loaded.model {
                Model::Sd(sd) => {
                    let req = request.to_sd(&info).map_err(js_err)?;
                    let mut denoiser = Watched::new(
                        ChannelDenoiser::new(remote, &sd.unet, sd.dtype, &log),
                        &inner.cancelled,
                        every,
                        &preview,
                    );
                    let out = sd.generate_with(b, &req, &mut denoiser, &mut progress).await;
                    denoiser.inner.finish().await;
                    let out = out.map_err(|e| js_err(explain_memory(e, req.width, req.height, 1)))?;
                    Output {
                        video: out.image.to_f32(),
                        frames: 1,
                        width: req.width as u32,
                        height: req.height as u32,
                        fps: 1,
                        stats: denoiser.inner.stats,
                        parameters: request
                            .describe(
                                &loaded.name,
                                request.sampler("dpmpp_2m"),
                                req.cfg_scale,
                                req.width,
                                req.height,
                                None,
                            )
                            .map_err(js_err)?,
                    }
                }
                Model::Wan(wan) => {
                    let req = request.to_wan(&info).map_err(js_err)?;
                    let mut denoiser = Watched::new(
                        ChannelDenoiser::new(remote, &wan.transformer, wan.dtype, &log),
                        &inner.cancelled,
                        every,
                        &preview,
                    );
                    let out = wan.generate_with(b, &req, &mut denoiser, &mut progress).await;
                    denoiser.inner.finish().await;
                    let out = out.map_err(|e| js_err(explain_memory(e, req.width, req.height, req.frames)))?;
                    Output {
                        video: out.video.to_f32(),
                        frames: req.frames as u32,
                        width: req.width as u32,
                        height: req.height as u32,
                        fps: 16,
                        stats: denoiser.inner.stats,
                        parameters: request
                            .describe(
                                &loaded.name,
                                request.sampler("unipc"),
                                req.cfg_scale,
                                req.width,
                                req.height,
                                Some(req.frames),
                            )
                            .map_err(js_err)?,
                    }
                }
            };
            Ok(output.into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picked_directory_is_rooted_at_model_index() {
        let files = vec![
            ("sd-tiny/model_index.json".to_string(), b"{}".to_vec()),
            ("sd-tiny/unet/config.json".to_string(), b"{}".to_vec()),
            ("sd-tiny/sd2/model_index.json".to_string(), b"{}".to_vec()),
            ("elsewhere.txt".to_string(), b"x".to_vec()),
        ];
        let s = folder_files(files).unwrap();
        let mut keys: Vec<_> = s.files.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["model_index.json", "sd2/model_index.json", "unet/config.json"]);
    }

    #[test]
    fn files_without_model_index_are_refused() {
        let err = folder_files(vec![("unet/config.json".into(), vec![])]).err().unwrap();
        assert!(err.to_string().contains("model_index.json"), "{err}");
        // A file merely ending in the name is no model index.
        let err = folder_files(vec![("old_model_index.json".into(), vec![])]).err().unwrap();
        assert!(err.to_string().contains("model_index.json"), "{err}");
    }

    #[test]
    fn out_of_memory_names_the_size_and_the_ways_out() {
        let e = explain_memory(Error::Gpu("Out of Memory".into()), 832, 480, 81).to_string();
        assert!(
            e.contains("832×480, 81 frames") && e.contains("fewer frames") && e.contains("worker"),
            "{e}"
        );
        let e = explain_memory(Error::Gpu("Out of Memory".into()), 512, 512, 1).to_string();
        assert!(e.contains("512×512 (") && !e.contains("frames"), "{e}");
        let other = explain_memory(Error::Gpu("Validation".into()), 512, 512, 1).to_string();
        assert!(!other.contains("memory"), "{other}");
    }

    #[test]
    fn latent_preview_stretches_each_channel() {
        // 4 channels of 1 x 2: channel c holds (c, c + 2); the fourth is ignored.
        let data = vec![0.0, 2.0, 1.0, 3.0, 2.0, 4.0, 9.0, 9.0];
        let p = latent_preview(&HostTensor::from_f32(&[1, 4, 1, 2], data).unwrap()).unwrap();
        assert_eq!((p.width, p.height), (2, 1));
        assert_eq!(p.rgba, vec![0, 0, 0, 255, 255, 255, 255, 255]);
        assert!(latent_preview(&HostTensor::from_f32(&[1, 2, 1, 1], vec![0.0, 1.0]).unwrap()).is_err());
        // A video latent [1, 3, 2 frames, 1, 1]: the first frame's values.
        let v = HostTensor::from_f32(&[1, 3, 2, 1, 1], vec![1.0, 5.0, 2.0, 6.0, 3.0, 7.0]).unwrap();
        assert_eq!(latent_preview(&v).unwrap().rgba.len(), 4);
    }

    #[test]
    fn requests_take_the_model_defaults_and_refuse_bad_seeds() {
        let sd = ModelInfo::new(
            "sd",
            RequestDefaults {
                width: 64,
                height: 64,
                frames: 1,
                cfg_scale: 7.5,
            },
        );
        let mut r = Request::new("a red star".into());
        r.seed = 42.0;
        let q = r.to_sd(&sd).unwrap();
        assert_eq!((q.width, q.height, q.seed, q.steps, q.cfg_scale), (64, 64, 42, 25, 7.5));
        r.width = 32;
        assert_eq!(r.to_sd(&sd).unwrap().width, 32);
        let wan = ModelInfo::new(
            "wan",
            RequestDefaults {
                width: 64,
                height: 48,
                frames: 17,
                cfg_scale: 5.0,
            },
        );
        let w = r.to_wan(&wan).unwrap();
        assert_eq!((w.width, w.height, w.frames, w.cfg_scale), (32, 48, 17, 5.0));
        r.guidance = 3.0;
        assert_eq!(r.to_wan(&wan).unwrap().cfg_scale, 3.0);
        assert_eq!(wan.samplers()[0], "unipc");
        r.seed = 1.5;
        assert!(r.to_sd(&sd).unwrap_err().to_string().contains("seed"));
        r.seed = 3.0;
        r.sampler = "plms".into();
        assert!(r.to_sd(&sd).unwrap_err().to_string().contains("plms"));
        assert!(r.to_wan(&wan).unwrap_err().to_string().contains("plms"));
    }
}
