//! `sdlite gen`: text to image with a Stable Diffusion checkpoint, on the CPU reference or
//! the GPU through wgpu, with a progress bar per phase and a PNG that records how it was made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sdlite_runtime::models::schedulers::Sampler;
use sdlite_runtime::models::sd::{Phase, SdRequest, StableDiffusion};
use sdlite_runtime::source::{DirSource, Source};
use sdlite_runtime::{Backend, CpuBackend, DType, Error};

use crate::DeviceArgs;

#[derive(clap::Args)]
pub struct GenArgs {
    /// A diffusers model folder (with model_index.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    #[arg(long, default_value_t = 7.5)]
    cfg_scale: f32,
    /// Same seed, same backend: same picture. Random when not given (and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Defaults to the model's native size.
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// ddim, euler, euler_a or dpmpp_2m.
    #[arg(long, default_value = "dpmpp_2m")]
    sampler: String,
    #[arg(long, value_enum, default_value_t = BackendKind::Wgpu)]
    backend: BackendKind,
    /// Run in f16 on GPUs that support it (faster, less memory); f32 otherwise.
    #[arg(long)]
    half: bool,
    /// Output PNG; defaults to sdlite-SEED.png.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BackendKind {
    Cpu,
    Wgpu,
}

pub fn run(args: GenArgs) -> Result<()> {
    if !args.model.exists() {
        bail!("no model at {}: pass a diffusers folder with --model", args.model.display());
    }
    let sampler = Sampler::parse(&args.sampler)?;
    match args.backend {
        BackendKind::Cpu => generate(&CpuBackend, DType::F32, &args, sampler),
        BackendKind::Wgpu => {
            let g = args.device.open()?;
            let dtype = if args.half && g.supports(DType::F16) {
                DType::F16
            } else {
                DType::F32
            };
            generate(&g, dtype, &args, sampler)
        }
    }
}

fn generate<B: Backend>(b: &B, dtype: DType, args: &GenArgs, sampler: Sampler) -> Result<()> {
    let source = DirSource(args.model.clone());
    let index: serde_json::Value = source.config("model_index.json")?;
    let class = index["_class_name"].as_str().unwrap_or("");
    if !class.starts_with("StableDiffusion") {
        bail!("{}: pipeline `{class}` is not supported by sdlite gen yet", args.model.display());
    }
    eprintln!("loading {} on {} ({dtype:?})", args.model.display(), b.name());
    let sd = StableDiffusion::load(b, &source, dtype)?;
    let native = sd.unet.config.sample_size * sd.vae_decoder.config.scale_factor();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64 % 1_000_000_007)
    });
    let req = SdRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        cfg_scale: args.cfg_scale,
        seed,
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
        sampler,
        init_latent: None,
    };
    sd.validate(&req)?;
    let mut bar: Option<ProgressBar> = None;
    let mut progress = |phase: Phase, done: usize, total: usize| {
        if done == 0 {
            let label = match phase {
                Phase::EncodeText => "text",
                Phase::Denoise => "denoise",
                Phase::Decode => "decode",
            };
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
    };
    let out = pollster::block_on(sd.generate(b, &req, &mut progress)).map_err(explain)?;
    let path = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("sdlite-{seed}.png")));
    let params = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}, Backend: {}",
        req.prompt,
        req.negative_prompt,
        req.steps,
        args.sampler,
        req.cfg_scale,
        req.width,
        req.height,
        args.model.display(),
        b.name()
    );
    write_png(&path, &out.image.to_f32(), req.width, req.height, &params)?;
    println!("wrote {} (seed {seed})", path.display());
    Ok(())
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

/// Writes `[3, h, w]` values in [0, 1] as an 8-bit RGB PNG with `parameters` in a text chunk.
pub fn write_png(path: &Path, chw: &[f32], width: usize, height: usize, parameters: &str) -> Result<()> {
    let plane = width * height;
    let rgb: Vec<u8> = (0..plane)
        .flat_map(|i| (0..3).map(move |c| (chw[c * plane + i] * 255.0).round().clamp(0.0, 255.0) as u8))
        .collect();
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.add_text_chunk("parameters".into(), parameters.into())?;
    enc.write_header()?.write_image_data(&rgb)?;
    Ok(())
}
