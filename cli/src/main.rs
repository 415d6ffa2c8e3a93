//! The `sdlite` command: generation, workers, the browser demo server, adapter information
//! and the benchmarks.

mod bench_cuda;
mod default_models;
mod fidelity;
mod gen;
mod remote;
mod serve;

use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng};
use sdlite_runtime::{ops, Backend, DType, HostData, HostTensor, WgpuBackend, WgpuOptions};

#[derive(Parser)]
#[command(name = "sdlite", version, about = "Diffusion models on our own tensor runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Gen(Box<gen::GenArgs>),
    /// Score a built-in model's pictures or clips against their prompts (colour, shape,
    /// count, position, motion) by image analysis, over the held-out prompt set.
    Fidelity(Box<fidelity::FidelityArgs>),
    /// Serve denoiser steps to `sdlite gen --worker` clients over QUIC.
    Worker(Box<remote::WorkerArgs>),
    /// Serve the browser demo page and model folders over HTTP (build the page with
    /// scripts/build-web.sh first).
    Serve(serve::ServeArgs),
    /// Bytes on the wire and overhead per step of offloading full-size Wan2.1-1.3B at
    /// 81x480x832 over loopback, against a worker with a given compute time per step.
    BenchOffload {
        /// The worker's compute time per step, in ms (default: two rows of the H100's
        /// diffusers forward, 2 x 627 ms).
        #[arg(long, default_value_t = 1254)]
        step_ms: u64,
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Decode a Wan2.1 VAE clip (full-size architecture, synthetic weights) on the GPU adapter
    /// and report time and peak device memory.
    BenchWanVae {
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long, default_value_t = 81)]
        frames: usize,
        #[arg(long, default_value_t = 832)]
        width: usize,
        #[arg(long, default_value_t = 480)]
        height: usize,
        /// Use f16 activations and weights (when the adapter has shader-f16).
        #[arg(long)]
        half: bool,
    },
    /// Time the CUDA backend against diffusers on the GPU machine: run
    /// `tests/reference/bench_cuda.py DIR` there first (it writes the weights, inputs, outputs
    /// and diffusers' timings), then this on the same DIR.
    BenchCuda {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Timed runs per case (after two warm-up runs); the median is reported.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Comma-separated cases to run (default: every case in DIR).
        #[arg(long)]
        only: Option<String>,
        /// Also print where the time goes, per primitive (timed on the GPU by CUDA events).
        #[arg(long)]
        profile: bool,
        /// Run the DiT cases as a guided step on a worker does: input and text twice, one
        /// batch of two (times are per batch; the error check reads the first item).
        #[arg(long)]
        cfg_batch: bool,
        /// How the models' convolutions are computed: the backend's choice (auto), or one
        /// kernel throughout (implicit-gemm, hopper, columns): a kernel change's baseline,
        /// timed in the same run.
        #[arg(long, default_value = "auto")]
        conv: sdlite_runtime::ConvKernel,
    },
    /// Print the GPU adapter and the limits sdlite runs under.
    Info {
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Time the matmul and attention kernels on the GPU adapter.
    Bench {
        #[command(flatten)]
        device: DeviceArgs,
        /// Small sizes only (a CPU adapter such as lavapipe takes minutes on the full set).
        #[arg(long)]
        quick: bool,
        /// The GPU's FP32 peak in TFLOP/s, to print each f32 result as a share of it.
        #[arg(long)]
        peak_tflops: Option<f64>,
    },
}

#[derive(clap::Args, Clone)]
pub struct DeviceArgs {
    /// Request exactly WebGPU's default limits, as most browsers grant.
    #[arg(long)]
    default_limits: bool,
    /// Use f32 storage even where the adapter supports f16.
    #[arg(long)]
    no_f16: bool,
    /// Cap one storage chunk (one binding) at this many MiB.
    #[arg(long)]
    max_chunk_mib: Option<u64>,
    /// Keep at most this many MiB of freed buffers for reuse (less peak memory, more
    /// allocations).
    #[arg(long, default_value_t = 2048)]
    pool_mib: u64,
    /// Kernel variants: shaped for software adapters that run invocations as SIMD lanes on
    /// CPU cores (lavapipe, SwiftShader), for GPUs, or by the adapter's kind (auto).
    #[arg(long, value_enum, default_value_t = WgpuKernels::Auto)]
    wgpu_kernels: WgpuKernels,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WgpuKernels {
    Auto,
    Gpu,
    Software,
}

impl DeviceArgs {
    fn open(&self) -> Result<WgpuBackend> {
        let options = WgpuOptions {
            default_limits: self.default_limits,
            allow_f16: !self.no_f16,
            max_chunk_bytes: self.max_chunk_mib.map(|m| m << 20),
            pool_bytes: self.pool_mib << 20,
            software_kernels: match self.wgpu_kernels {
                WgpuKernels::Auto => None,
                WgpuKernels::Gpu => Some(false),
                WgpuKernels::Software => Some(true),
            },
            ..Default::default()
        };
        pollster::block_on(WgpuBackend::new(options))
            .context("opening the GPU adapter (set WGPU_BACKEND=vulkan|metal|dx12|gl to choose one)")
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Gen(args) => gen::run(*args),
        Command::Fidelity(args) => fidelity::run(*args),
        Command::Worker(args) => remote::worker(*args),
        Command::Serve(args) => serve::run(args),
        Command::BenchOffload { step_ms, steps } => remote::bench_offload(step_ms, steps),
        Command::BenchWanVae {
            device,
            frames,
            width,
            height,
            half,
        } => bench_wan_vae(&device.open()?, frames, width, height, half),
        Command::Info { device } => info(&device.open()?),
        Command::BenchCuda {
            dir,
            iters,
            only,
            profile,
            cfg_batch,
            conv,
        } => bench_cuda::bench_cuda(&dir, iters, only.as_deref(), profile, cfg_batch, conv),
        Command::Bench {
            device,
            quick,
            peak_tflops,
        } => bench(&device.open()?, quick, peak_tflops),
    }
}

fn info(g: &WgpuBackend) -> Result<()> {
    let l = g.limits();
    println!("adapter: {}", g.name());
    println!("f16 storage: {}", g.supports(DType::F16));
    println!(
        "max storage binding: {} MiB, max buffer: {} MiB, chunk: {} MiB",
        l.max_storage_buffer_binding_size >> 20,
        l.max_buffer_size >> 20,
        g.chunk_bytes() >> 20
    );
    println!("workgroup memory: {} KiB", l.max_compute_workgroup_storage_size >> 10);
    Ok(())
}

/// Uniform values in [-1, 1) on the device: benchmark inputs.
fn random<B: Backend>(g: &B, shape: &[usize], dtype: DType, seed: u64) -> Result<sdlite_runtime::Tensor<B>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let host = HostTensor::new(
        shape,
        HostData::from_f32(dtype, (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()),
    )?;
    Ok(g.upload(&host)?)
}

/// Mean seconds per run of `f` after one warm-up run, over enough runs to fill ~1 s.
fn time(g: &WgpuBackend, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    g.wait_idle()?;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 3 || (start.elapsed().as_secs_f64() < 1.0 && runs < 50) {
        f()?;
        g.wait_idle()?;
        runs += 1;
    }
    Ok(start.elapsed().as_secs_f64() / runs as f64)
}

fn bench(g: &WgpuBackend, quick: bool, peak_tflops: Option<f64>) -> Result<()> {
    println!("adapter: {}", g.name());
    let mut dtypes = vec![DType::F32];
    if g.supports(DType::F16) {
        dtypes.push(DType::F16);
    }
    let square: &[usize] = if quick { &[256, 512] } else { &[1024, 2048, 4096] };
    let mut matmuls: Vec<(String, usize, usize, usize)> = square.iter().map(|&n| (format!("{n}^3"), n, n, n)).collect();
    if !quick {
        // Wan2.1-1.3B at 480x832x81: 32,760 tokens through the 1536-wide projections and FFN.
        matmuls.push(("wan qkv 32760x1536x1536".into(), 32760, 1536, 1536));
        matmuls.push(("wan ffn 32760x1536x8960".into(), 32760, 1536, 8960));
    }
    println!("{:<28} {:>5} {:>12} {:>10} {:>9}", "op", "dtype", "time (ms)", "GFLOP/s", "of peak");
    for &dt in &dtypes {
        for (name, m, k, n) in &matmuls {
            let a = random(g, &[*m, *k], dt, 1)?;
            let w = random(g, &[*n, *k], dt, 2)?;
            let s = time(g, || {
                ops::linear(g, &a, &w, None)?;
                Ok(())
            })?;
            report(&format!("matmul {name}"), dt, s, 2.0 * (*m * *k * *n) as f64, peak_tflops);
        }
        let seqs: &[usize] = if quick { &[1024] } else { &[4096, 32760] };
        for &seq in seqs {
            let (heads, d) = (12, 128);
            let q = random(g, &[1, heads, seq, d], dt, 3)?;
            let k = random(g, &[1, heads, seq, d], dt, 4)?;
            let v = random(g, &[1, heads, seq, d], dt, 5)?;
            let scale = 1.0 / (d as f32).sqrt();
            let s = time(g, || {
                ops::attention(g, &q, &k, &v, scale)?;
                Ok(())
            })?;
            report(
                &format!("attention 12x{seq}x128"),
                dt,
                s,
                4.0 * (heads * seq * seq * d) as f64,
                peak_tflops,
            );
        }
    }
    Ok(())
}

fn report(name: &str, dt: DType, seconds: f64, flops: f64, peak_tflops: Option<f64>) {
    let gflops = flops / seconds / 1e9;
    let share = match (dt, peak_tflops) {
        (DType::F32, Some(p)) => format!("{:.0}%", gflops / (p * 10.0)),
        _ => "-".into(),
    };
    println!(
        "{name:<28} {:>5} {:>12.3} {gflops:>10.0} {share:>9}",
        format!("{dt:?}").to_lowercase(),
        seconds * 1e3
    );
}

fn bench_wan_vae(g: &WgpuBackend, frames: usize, width: usize, height: usize, half: bool) -> Result<()> {
    use sdlite_runtime::models::wan_vae::{WanVaeConfig, WanVaeDecoder};
    use sdlite_runtime::weights::{Params, Weights};
    let dtype = if half && g.supports(DType::F16) { DType::F16 } else { DType::F32 };
    if frames == 0 || !(frames - 1).is_multiple_of(4) || !width.is_multiple_of(8) || !height.is_multiple_of(8) {
        anyhow::bail!("frames must be 1 + 4k and width, height multiples of 8");
    }
    let stats = format!(r#"{{"latents_mean": {0:?}, "latents_std": {1:?}}}"#, [0.0f32; 16], [1.0f32; 16]);
    let config: WanVaeConfig = serde_json::from_str(&stats)?;
    let weights = Weights::synthetic(7);
    let vae = WanVaeDecoder::load(&Params::new(g, &weights, dtype), config)?;
    g.wait_idle()?;
    let (weights_bytes, _) = g.memory();
    let shape = [1, 16, (frames - 1) / 4 + 1, height / 8, width / 8];
    let z = random(g, &shape, dtype, 9)?;
    g.reset_peak_memory();
    println!("adapter: {}", g.name());
    println!("wan vae decode {frames}x{height}x{width} ({dtype:?}), latent {shape:?}");
    let start = Instant::now();
    let video = pollster::block_on(vae.decode(g, &z, |done, total| {
        eprint!("\r  latent frame {done}/{total} ({:.1} s)", start.elapsed().as_secs_f64());
    }))?;
    eprintln!();
    let seconds = start.elapsed().as_secs_f64();
    let (_, peak) = g.memory();
    let finite = video.to_f32().iter().all(|v| v.is_finite());
    println!("output {:?}, all finite: {finite}", video.shape);
    println!("time: {seconds:.2} s");
    println!(
        "device memory: weights {:.0} MiB, peak {:.0} MiB (tensor buffers in use or pooled)",
        weights_bytes as f64 / (1 << 20) as f64,
        peak as f64 / (1 << 20) as f64
    );
    Ok(())
}
