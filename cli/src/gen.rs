//! `sdlite gen`: text to image (Stable Diffusion) or text to video (Wan2.1), on the CPU
//! reference or the GPU through wgpu, with a progress bar per phase. Images are PNGs and
//! videos animated PNGs (browsers play them), each recording how it was made.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sdlite_remote::model_id::DenoiserPackage;
use sdlite_remote::offload::{OffloadDenoiser, OffloadMode};
use sdlite_remote::protocol::DenoiserKind;
use sdlite_runtime::models::clip_tokenizer::ClipTokenizer;
use sdlite_runtime::models::flow_schedulers::FlowSampler;
use sdlite_runtime::models::schedulers::{Prediction, Sampler};
use sdlite_runtime::models::sd::{single_file_part, SdConfigs, SdRequest, StableDiffusion};
use sdlite_runtime::models::wan::{Wan, WanRequest};
use sdlite_runtime::models::{Phase, RequestDefaults};
use sdlite_runtime::source::{DirSource, Source};
use sdlite_runtime::weights::Weights;
use sdlite_runtime::{Backend, CpuBackend, CudaBackend, CudaOptions, DType, Error};

use crate::default_models;
use crate::remote::{denoiser_load, package, report, OffloadArgs};
use crate::DeviceArgs;

#[derive(clap::Args)]
pub struct GenArgs {
    /// A diffusers model folder (with model_index.json): Stable Diffusion 1.x/2.x or Wan2.1;
    /// a Stable Diffusion 1.x/2.x single-file checkpoint (.safetensors, original key names);
    /// or a built-in model: `tiny-sd` (64x64 pictures of coloured shapes, the default) or
    /// `tiny-wan` (clips of moving shapes).
    #[arg(long, default_value = default_models::DEFAULT)]
    model: PathBuf,
    /// For single-file checkpoints: a CLIP tokenizer folder (vocab.json, merges.txt), e.g.
    /// the one `scripts/fetch-vocab.sh` writes to target/reference/clip-vocab.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// For SD 2.x single-file checkpoints: what the model predicts, `v` (the 768x768
    /// releases) or `epsilon` (the 512x512 base releases); the file does not say.
    #[arg(long)]
    prediction: Option<PredictionArg>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off. Default 7.5 (SD), 5 (Wan).
    #[arg(long)]
    cfg_scale: Option<f32>,
    /// Same seed, same backend: same picture. Random when not given (and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Defaults to the model's native size (SD) or 832x480 (Wan).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Video length for Wan: 1 + 4k frames (81, or the model's own length, by default).
    #[arg(long)]
    frames: Option<usize>,
    /// Frames per second of the written video.
    #[arg(long, default_value_t = 16)]
    fps: u16,
    /// Also write every video frame as a PNG into this folder.
    #[arg(long)]
    frames_dir: Option<PathBuf>,
    /// SD: ddim, euler, euler_a or dpmpp_2m (default). Wan: unipc (default) or flow_euler.
    #[arg(long)]
    sampler: Option<String>,
    /// Wan's flow shift (the scheduler config's by default; 3 for 480p, 5 for 720p).
    #[arg(long)]
    shift: Option<f64>,
    #[arg(long, value_enum, default_value_t = BackendKind::Wgpu)]
    backend: BackendKind,
    /// Half precision (faster, less memory): f16 on wgpu adapters with shader-f16, bf16 on
    /// CUDA; f32 otherwise.
    #[arg(long)]
    half: bool,
    /// Output PNG; defaults to sdlite-SEED.png.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    offload: OffloadArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PredictionArg {
    Epsilon,
    V,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BackendKind {
    Cpu,
    Wgpu,
    /// Our CUDA kernels (NVIDIA GPUs with the driver and CUDA 13 libraries).
    Cuda,
}

pub fn run(mut args: GenArgs) -> Result<()> {
    args.model = default_models::resolve(&args.model.to_string_lossy())?;
    match args.backend {
        BackendKind::Cpu => generate(&CpuBackend, DType::F32, &args),
        BackendKind::Wgpu => {
            let g = args.device.open()?;
            let dtype = if args.half && g.supports(DType::F16) {
                DType::F16
            } else {
                DType::F32
            };
            generate(&g, dtype, &args)
        }
        BackendKind::Cuda => {
            let c = CudaBackend::new(&CudaOptions::default())?;
            let dtype = if args.half { c.half_dtype() } else { DType::F32 };
            generate(&c, dtype, &args)
        }
    }
}

fn generate<B: Backend>(b: &B, dtype: DType, args: &GenArgs) -> Result<()> {
    let source = DirSource(args.model.clone());
    let single_file = args.model.is_file();
    let class = if single_file {
        "StableDiffusion".to_string()
    } else {
        let index: serde_json::Value = source.config("model_index.json")?;
        index["_class_name"].as_str().unwrap_or("").to_string()
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64 % 1_000_000_007)
    });
    let path = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("sdlite-{seed}.png")));
    let (model_name, backend_name) = (args.model.display().to_string(), b.name());
    let describe = |sampler: &str, cfg_scale: f32, width: usize, height: usize, frames: Option<usize>| {
        sdlite_runtime::image::Parameters {
            prompt: &args.prompt,
            negative_prompt: &args.negative_prompt,
            steps: args.steps,
            sampler,
            cfg_scale,
            seed,
            width,
            height,
            frames,
            model: &model_name,
            backend: &backend_name,
        }
        .to_string()
    };
    if class.starts_with("StableDiffusion") {
        let sampler_name = args.sampler.as_deref().unwrap_or("dpmpp_2m");
        let sampler = Sampler::parse(sampler_name)?;
        let offload = args.offload.setup()?;
        eprintln!("loading {} on {} ({dtype:?})", args.model.display(), b.name());
        let unet_package: Box<dyn FnOnce() -> sdlite_remote::Result<DenoiserPackage>>;
        let loading = Instant::now();
        let sd = if single_file {
            let Some(dir) = &args.tokenizer else {
                bail!(
                    "{} is a single-file checkpoint, which carries no tokenizer: pass --tokenizer DIR (a folder with \
                     vocab.json and merges.txt; scripts/fetch-vocab.sh writes the CLIP one to target/reference/clip-vocab)",
                    args.model.display()
                );
            };
            let mut tokenizer = ClipTokenizer::from_source(&DirSource(dir.clone()), "")?;
            let sd2 = Weights::open(&args.model)?.contains("cond_stage_model.model.token_embedding.weight");
            if sd2 {
                // SD 2.x's tokenizer pads with `!`, as its release's tokenizer config says.
                tokenizer = tokenizer.with_pad("!")?;
            }
            let configs = match (sd2, args.prediction) {
                (false, _) => SdConfigs::sd15(),
                (true, Some(PredictionArg::V)) => SdConfigs::sd21(Prediction::VPrediction),
                (true, Some(PredictionArg::Epsilon)) => SdConfigs::sd21(Prediction::Epsilon),
                (true, None) => bail!(
                    "{} is a Stable Diffusion 2.x checkpoint, which does not say what it predicts: pass \
                     --prediction v (768x768 releases) or --prediction epsilon (512x512 base releases)",
                    args.model.display()
                ),
            };
            let (file, config) = (args.model.clone(), serde_json::to_string(&configs.unet)?);
            let weights = single_file_part(&args.model, &configs, "unet")?;
            unet_package = Box::new(move || DenoiserPackage::new(DenoiserKind::Unet, &config, &file.display().to_string(), weights));
            StableDiffusion::load_single_file(b, &args.model, configs, tokenizer, dtype, denoiser_load(&offload))?
        } else {
            let dir = args.model.clone();
            unet_package = Box::new(move || DenoiserPackage::from_pipeline(&dir));
            StableDiffusion::load_with(b, &source, dtype, denoiser_load(&offload))?
        };
        eprintln!("loaded in {:.1} s", loading.elapsed().as_secs_f64());
        let req = Ask::from_args(args, seed).sd(&sd.defaults, sampler);
        sd.validate(&req)?;
        let out = match offload {
            None => pollster::block_on(sd.generate(b, &req, &mut progress_bars())),
            Some(mut offload) => {
                if let OffloadMode::Blocks(_) = offload.mode {
                    bail!("--offload blocks=A..B splits a DiT (Wan); for Stable Diffusion use --offload denoiser");
                }
                let package = package(unet_package)?;
                let auto = offload.mode == OffloadMode::Auto;
                let mut d = OffloadDenoiser::whole(&mut offload.pool, &package, &sd.unet, dtype, auto);
                (d.upload, d.fallback, d.cfg_parallel) = (offload.upload, offload.fallback, offload.cfg_parallel);
                let out = pollster::block_on(sd.generate_with(b, &req, &mut d, &mut progress_bars()));
                let stats = d.stats.clone();
                drop(d);
                report(&stats, &offload.pool);
                out
            }
        }
        .map_err(explain)?;
        let params = describe(sampler_name, req.cfg_scale, req.width, req.height, None);
        write_png(&path, &out.image.to_f32(), 1, req.width, req.height, 1, &params)?;
    } else if class.starts_with("Wan") {
        let sampler_name = args.sampler.as_deref().unwrap_or("unipc");
        let sampler = FlowSampler::parse(sampler_name)?;
        let offload = args.offload.setup()?;
        eprintln!("loading {} on {} ({dtype:?})", args.model.display(), b.name());
        let loading = Instant::now();
        let wan = Wan::load_with(b, &source, dtype, denoiser_load(&offload))?;
        eprintln!("loaded in {:.1} s", loading.elapsed().as_secs_f64());
        let req = Ask::from_args(args, seed).wan(&wan.defaults, sampler);
        wan.latent_shape(&req)?;
        let out = match offload {
            None => pollster::block_on(wan.generate(b, &req, &mut progress_bars())),
            Some(mut offload) => {
                let package = package(|| DenoiserPackage::from_pipeline(&args.model))?;
                let mut d = match offload.mode.clone() {
                    OffloadMode::Blocks(range) => OffloadDenoiser::blocks(b, &mut offload.pool, &package, &wan.transformer, range, dtype)?,
                    mode => OffloadDenoiser::whole(&mut offload.pool, &package, &wan.transformer, dtype, mode == OffloadMode::Auto),
                };
                d.upload = offload.upload;
                d.fallback = offload.fallback;
                d.cfg_parallel &= offload.cfg_parallel;
                let out = pollster::block_on(wan.generate_with(b, &req, &mut d, &mut progress_bars()));
                let stats = d.stats.clone();
                drop(d);
                report(&stats, &offload.pool);
                out
            }
        }
        .map_err(explain)?;
        let params = describe(sampler_name, req.cfg_scale, req.width, req.height, Some(req.frames));
        let video = out.video.to_f32();
        write_png(&path, &video, req.frames, req.width, req.height, args.fps, &params)?;
        if let Some(dir) = &args.frames_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for f in 0..req.frames {
                let frame = sdlite_runtime::image::frame_planes(&video, req.frames, f, req.width * req.height);
                write_png(&dir.join(format!("frame-{f:04}.png")), &frame, 1, req.width, req.height, 1, &params)?;
            }
        }
    } else {
        bail!(
            "{}: pipeline `{class}` is not supported (Stable Diffusion or Wan)",
            args.model.display()
        );
    }
    println!("wrote {} (seed {seed})", path.display());
    Ok(())
}

/// What one generation asks for; what it leaves unset comes from the model's defaults.
struct Ask<'a> {
    prompt: &'a str,
    negative_prompt: &'a str,
    steps: usize,
    seed: u64,
    cfg_scale: Option<f32>,
    width: Option<usize>,
    height: Option<usize>,
    frames: Option<usize>,
    shift: Option<f64>,
}

impl<'a> Ask<'a> {
    fn from_args(args: &'a GenArgs, seed: u64) -> Self {
        Ask {
            prompt: &args.prompt,
            negative_prompt: &args.negative_prompt,
            steps: args.steps,
            seed,
            cfg_scale: args.cfg_scale,
            width: args.width,
            height: args.height,
            frames: args.frames,
            shift: args.shift,
        }
    }

    /// A prompt alone, everything else the model's own.
    fn prompt(prompt: &'a str, steps: usize, seed: u64) -> Self {
        Ask {
            prompt,
            negative_prompt: "",
            steps,
            seed,
            cfg_scale: None,
            width: None,
            height: None,
            frames: None,
            shift: None,
        }
    }

    fn sd(&self, d: &RequestDefaults, sampler: Sampler) -> SdRequest {
        SdRequest {
            prompt: self.prompt.to_string(),
            negative_prompt: self.negative_prompt.to_string(),
            steps: self.steps,
            cfg_scale: self.cfg_scale.unwrap_or(d.cfg_scale),
            seed: self.seed,
            width: self.width.unwrap_or(d.width),
            height: self.height.unwrap_or(d.height),
            sampler,
            init_latent: None,
        }
    }

    fn wan(&self, d: &RequestDefaults, sampler: FlowSampler) -> WanRequest {
        WanRequest {
            prompt: self.prompt.to_string(),
            negative_prompt: self.negative_prompt.to_string(),
            steps: self.steps,
            cfg_scale: self.cfg_scale.unwrap_or(d.cfg_scale),
            seed: self.seed,
            width: self.width.unwrap_or(d.width),
            height: self.height.unwrap_or(d.height),
            frames: self.frames.unwrap_or(d.frames),
            sampler,
            shift: self.shift,
            init_latent: None,
        }
    }
}

/// A progress callback that shows one bar per phase with rate and ETA.
fn progress_bars() -> impl FnMut(Phase, usize, usize) {
    let mut bar: Option<ProgressBar> = None;
    let mut started = Instant::now();
    // indicatif draws only on a terminal: logs and pipes get one line per finished phase.
    let plain = !std::io::stderr().is_terminal();
    move |phase: Phase, done: usize, total: usize| {
        let label = match phase {
            Phase::EncodeText => "text",
            Phase::Denoise => "denoise",
            Phase::Decode => "decode",
        };
        if done == total && plain {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{label:>8} {total}/{total} in {secs:.1} s ({:.3} s each)",
                secs / total.max(1) as f64
            );
        }
        if done == 0 {
            started = Instant::now();
            let pb = ProgressBar::new(total as u64).with_prefix(label);
            pb.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} ({elapsed})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            pb.enable_steady_tick(Duration::from_millis(200));
            bar = Some(pb);
        } else if let Some(pb) = &bar {
            pb.set_position(done as u64);
            if done == total {
                pb.finish();
            }
        }
    }
}

/// Turns a device failure into advice where one applies.
fn explain(e: Error) -> anyhow::Error {
    match &e {
        Error::Gpu(msg) if msg.to_lowercase().contains("memory") => anyhow::anyhow!(
            "the GPU adapter ran out of memory for this request ({msg}); try a smaller --width/--height, --half, or --backend cpu"
        ),
        _ => e.into(),
    }
}

/// Writes a video `[3, frames, h, w]` in [0, 1] (one frame: a picture) as a PNG, animated
/// at `fps` when it has several frames, with `parameters` in a text chunk.
pub fn write_png(path: &Path, video: &[f32], frames: usize, width: usize, height: usize, fps: u16, parameters: &str) -> Result<()> {
    let start = Instant::now();
    let bytes = sdlite_runtime::image::png(video, frames, width, height, fps, parameters)?;
    std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    if frames > 1 {
        eprintln!(
            "video: {frames} frames, {:.1} MB in {:.1} s",
            bytes.len() as f64 / 1e6,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

type RenderFn = Box<dyn FnMut(&str, u64) -> Result<(Vec<Vec<u8>>, usize, usize)>>;

/// A model loaded once on one backend, generating prompt after prompt with the model's
/// defaults (what `sdlite fidelity` evaluates): each call gives the frames as 8-bit RGB.
pub struct Renderer {
    backend: String,
    run: RenderFn,
}

impl Renderer {
    pub fn open(kind: BackendKind, device: &DeviceArgs, model: &Path, steps: usize) -> Result<Self> {
        match kind {
            BackendKind::Cpu => Self::with(CpuBackend, DType::F32, model, steps),
            BackendKind::Wgpu => Self::with(device.open()?, DType::F32, model, steps),
            BackendKind::Cuda => Self::with(CudaBackend::new(&CudaOptions::default())?, DType::F32, model, steps),
        }
    }

    fn with<B: Backend + 'static>(b: B, dtype: DType, model: &Path, steps: usize) -> Result<Self> {
        let source = DirSource(model.to_path_buf());
        let index: serde_json::Value = source.config("model_index.json")?;
        let class = index["_class_name"].as_str().unwrap_or("").to_string();
        let backend = b.name();
        let run: RenderFn = if class.starts_with("StableDiffusion") {
            let sd = StableDiffusion::load(&b, &source, dtype)?;
            Box::new(move |prompt, seed| {
                let req = Ask::prompt(prompt, steps, seed).sd(&sd.defaults, Sampler::parse("dpmpp_2m")?);
                let out = pollster::block_on(sd.generate(&b, &req, &mut |_, _, _| {}))?;
                Ok((
                    vec![sdlite_runtime::image::rgb8(&out.image.to_f32(), req.width * req.height)],
                    req.width,
                    req.height,
                ))
            })
        } else if class.starts_with("Wan") {
            let wan = Wan::load(&b, &source, dtype)?;
            Box::new(move |prompt, seed| {
                let req = Ask::prompt(prompt, steps, seed).wan(&wan.defaults, FlowSampler::parse("unipc")?);
                let video = pollster::block_on(wan.generate(&b, &req, &mut |_, _, _| {}))?.video.to_f32();
                let plane = req.width * req.height;
                let frames = (0..req.frames)
                    .map(|f| sdlite_runtime::image::rgb8(&sdlite_runtime::image::frame_planes(&video, req.frames, f, plane), plane))
                    .collect();
                Ok((frames, req.width, req.height))
            })
        } else {
            bail!("{}: pipeline `{class}` is not supported (Stable Diffusion or Wan)", model.display());
        };
        Ok(Renderer { backend, run })
    }

    pub fn backend_name(&self) -> &str {
        &self.backend
    }

    pub fn run(&mut self, prompt: &str, seed: u64) -> Result<(Vec<Vec<u8>>, usize, usize)> {
        (self.run)(prompt, seed)
    }
}
