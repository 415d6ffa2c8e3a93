//! sdlite in the browser: the runtime's Stable Diffusion pipeline on WebGPU (wgpu's `webgpu`
//! backend), driven by the demo page in `www/`. Nothing here computes: ops and models are the
//! runtime's, so the tab's pictures are the native wgpu backend's.
//!
//! JS sees one object, `Studio`: `Studio.open()` takes the WebGPU adapter, `load(paths,
//! contents)` a diffusers folder's files, `generate(request, onProgress)` returns a Promise
//! of a `Picture`, and `cancel()` stops the running generation at its next step.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use sdlite_runtime::models::denoiser::{Denoiser, LocalDenoiser};
use sdlite_runtime::models::schedulers::Sampler;
use sdlite_runtime::models::sd::{SdRequest, StableDiffusion};
use sdlite_runtime::models::Phase;
use sdlite_runtime::source::MemorySource;
use sdlite_runtime::{image, Backend, DType, Error, HostTensor, Result, Tensor, WgpuBackend, WgpuOptions};
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
            source.files.insert(inner.to_string(), bytes);
        }
    }
    Ok(source)
}

/// A look at a latent `[1, c, h, w]` while it is denoised: its first three channels as RGBA,
/// each stretched over its own range (the VAE would cost a full decode per preview).
pub fn latent_preview(latent: &HostTensor) -> Result<Picture> {
    let s = &latent.shape;
    if s.len() != 4 || s[1] < 3 {
        return Err(Error::Invalid(format!("latent preview: shape {s:?} is not [1, c >= 3, h, w]")));
    }
    let (h, w) = (s[2], s[3]);
    let plane = h * w;
    let values = latent.to_f32();
    let mut chw = Vec::with_capacity(3 * plane);
    for c in 0..3 {
        let ch = &values[c * plane..(c + 1) * plane];
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
    width: u32,
    height: u32,
    rgba: Vec<u8>,
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

    /// The pipeline's `[3, h, w]` image in [0, 1].
    fn from_planes(image: &HostTensor) -> Self {
        let (h, w) = (image.shape[1], image.shape[2]);
        Self::from_rgb(w, h, &image::rgb8(&image.to_f32(), w * h))
    }
}

#[wasm_bindgen]
impl Picture {
    #[wasm_bindgen(getter)]
    pub fn width(&self) -> u32 {
        self.width
    }

    #[wasm_bindgen(getter)]
    pub fn height(&self) -> u32 {
        self.height
    }

    #[wasm_bindgen(getter)]
    pub fn rgba(&self) -> Vec<u8> {
        self.rgba.clone()
    }
}

/// What to generate; the page fills it from its form. Defaults follow `sdlite gen`.
#[wasm_bindgen(getter_with_clone)]
#[derive(Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    pub guidance: f32,
    /// A whole number below 2^53 (what a JS number holds exactly).
    pub seed: f64,
    /// 0: the model's native size.
    pub width: u32,
    pub height: u32,
    /// `ddim`, `euler`, `euler_a` or `dpmpp_2m`.
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
            guidance: 7.5,
            seed: 0.0,
            width: 0,
            height: 0,
            sampler: "dpmpp_2m".into(),
            preview_every: 5,
        }
    }
}

impl Request {
    fn to_sd(&self, native: usize) -> Result<SdRequest> {
        if !(self.seed >= 0.0 && self.seed.fract() == 0.0 && self.seed < 9007199254740992.0) {
            return Err(Error::Invalid(format!("seed {} is not a whole number in 0..2^53", self.seed)));
        }
        let size = |v: u32| if v == 0 { native } else { v as usize };
        Ok(SdRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps as usize,
            cfg_scale: self.guidance,
            seed: self.seed as u64,
            width: size(self.width),
            height: size(self.height),
            sampler: Sampler::parse(&self.sampler)?,
            init_latent: None,
        })
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

impl<B: Backend, D: Denoiser<B>> Denoiser<B> for Watched<'_, D> {
    async fn begin(&mut self, b: &B, context: &Tensor<B>, cfg_scale: f32) -> Result<()> {
        self.inner.begin(b, context, cfg_scale).await
    }

    async fn predict(&mut self, b: &B, step: usize, input: &HostTensor, timestep: f32) -> Result<Vec<f32>> {
        if self.cancelled.get() {
            return Err(Error::Cancelled);
        }
        if self.every > 0 && step > 0 && step % self.every == 0 {
            (self.preview)(step, latent_preview(input)?);
        }
        self.inner.predict(b, step, input, timestep).await
    }
}

struct Inner {
    backend: WgpuBackend,
    model: RefCell<Option<Rc<StableDiffusion<WgpuBackend>>>>,
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

    /// Loads a Stable Diffusion diffusers folder from its files (`paths[i]` holds
    /// `contents[i]`, a Uint8Array); returns the model's native image size in pixels.
    pub fn load(&self, paths: Vec<String>, contents: js_sys::Array) -> std::result::Result<u32, JsError> {
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
        let source = folder_files(files).map_err(js_err)?;
        let sd = StableDiffusion::load(&self.inner.backend, &source, DType::F32).map_err(js_err)?;
        let native = sd.unet.config.sample_size * sd.vae_decoder.config.scale_factor();
        *self.inner.model.borrow_mut() = Some(Rc::new(sd));
        Ok(native as u32)
    }

    /// Stops the running generation before its next step (its Promise rejects with
    /// "cancelled").
    pub fn cancel(&self) {
        self.inner.cancelled.set(true);
    }

    /// Generates one picture. `on_progress(phase, done, total, preview)` is called as the
    /// work advances: phase "encode", "denoise" or "decode"; `preview` a `Picture` of the
    /// latent every `request.preview_every` steps, else undefined.
    pub fn generate(&self, request: &Request, on_progress: js_sys::Function) -> js_sys::Promise {
        let inner = self.inner.clone();
        let request = request.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let sd = inner.model.borrow().clone().ok_or_else(|| JsError::new("load a model first"))?;
            if inner.busy.replace(true) {
                return Err(JsError::new("a generation is already running").into());
            }
            let _busy = Busy(&inner.busy);
            inner.cancelled.set(false);
            let native = sd.unet.config.sample_size * sd.vae_decoder.config.scale_factor();
            let req = request.to_sd(native).map_err(js_err)?;
            let report = |phase: &str, done: usize, total: usize, preview: JsValue| {
                let args = js_sys::Array::of4(&phase.into(), &(done as u32).into(), &(total as u32).into(), &preview);
                // A throwing callback must not abort the generation.
                let _ = on_progress.apply(&JsValue::NULL, &args);
            };
            let total_steps = req.steps;
            let preview = |step: usize, picture: Picture| report("denoise", step, total_steps, picture.into());
            let mut denoiser = Watched {
                inner: LocalDenoiser::new(&sd.unet, sd.dtype),
                cancelled: &inner.cancelled,
                every: request.preview_every as usize,
                preview: &preview,
            };
            let mut progress = |phase: Phase, done: usize, total: usize| report(phase_name(phase), done, total, JsValue::UNDEFINED);
            let out = sd
                .generate_with(&inner.backend, &req, &mut denoiser, &mut progress)
                .await
                .map_err(js_err)?;
            Ok(Picture::from_planes(&out.image).into())
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
    fn latent_preview_stretches_each_channel() {
        // 4 channels of 1 x 2: channel c holds (c, c + 2); the fourth is ignored.
        let data = vec![0.0, 2.0, 1.0, 3.0, 2.0, 4.0, 9.0, 9.0];
        let p = latent_preview(&HostTensor::from_f32(&[1, 4, 1, 2], data).unwrap()).unwrap();
        assert_eq!((p.width, p.height), (2, 1));
        assert_eq!(p.rgba, vec![0, 0, 0, 255, 255, 255, 255, 255]);
        assert!(latent_preview(&HostTensor::from_f32(&[1, 2, 1, 1], vec![0.0, 1.0]).unwrap()).is_err());
    }

    #[test]
    fn requests_take_the_native_size_and_refuse_bad_seeds() {
        let mut r = Request::new("a red star".into());
        r.seed = 42.0;
        let sd = r.to_sd(64).unwrap();
        assert_eq!((sd.width, sd.height, sd.seed, sd.steps), (64, 64, 42, 25));
        r.width = 32;
        assert_eq!(r.to_sd(64).unwrap().width, 32);
        r.seed = 1.5;
        assert!(r.to_sd(64).unwrap_err().to_string().contains("seed"));
        r.seed = 3.0;
        r.sampler = "plms".into();
        assert!(r.to_sd(64).unwrap_err().to_string().contains("plms"));
    }
}
