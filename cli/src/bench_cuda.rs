//! `sdlite bench-cuda`: the CUDA backend against diffusers on the same weights and inputs.
//! `tests/reference/bench_cuda.py DIR` writes the models, inputs, diffusers' outputs and
//! timings; this loads the same files, times sdlite's forward the same way (two warm-up
//! runs, median of the rest, each ended by a device synchronisation) and prints one table
//! with the ratio and the error against diffusers' output.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use sdlite_runtime::models::denoiser::TextContext;
use sdlite_runtime::models::unet::UNet;
use sdlite_runtime::models::wan_dit::WanDit;
use sdlite_runtime::models::wan_vae::WanVaeDecoder;
use sdlite_runtime::source::{DirSource, Source};
use sdlite_runtime::weights::{Params, Weights};
use sdlite_runtime::{Backend, ConvKernel, CudaBackend, CudaOptions, DType, HostTensor, Tensor};

struct Row {
    name: String,
    diffusers_s: f64,
    sdlite_s: f64,
    diffusers_gib: f64,
    sdlite_gib: f64,
    error: f32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `iters` runs of `f` after two warm-up runs, and the last output.
fn timed(c: &CudaBackend, iters: usize, mut f: impl FnMut() -> Result<HostTensor>) -> Result<(f64, HostTensor)> {
    f()?;
    f()?;
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        let out = f()?;
        c.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
        last = Some(out);
    }
    Ok((median(times), last.expect("at least one run")))
}

fn read(c: &CudaBackend, t: &Tensor<CudaBackend>) -> Result<HostTensor> {
    Ok(pollster::block_on(c.read(t))?)
}

/// The kernels the benchmarked models spend their time in, alone at full size, in TFLOP/s:
/// Wan self-attention (32,760 tokens, 12 heads of 128: one tensor as q, k and v, also
/// through the portable sm_80 kernel; distinct q, k, v in both layouts), the Wan FFN's first GEMM and one frame of the Wan VAE's convolutions. Beside
/// them, PyTorch on the same shapes as `tests/reference/bench_cuda.py` timed them in the
/// same machine session (`reference`, its diffusers.json).
fn kernel_rates(c: &CudaBackend, conv: ConvKernel, iters: usize, reference: &serde_json::Value) -> Result<()> {
    let sdpa_seconds = reference["sdpa_attention_32760"]["seconds"].as_f64();
    use sdlite_runtime::ops;
    let random = |shape: &[usize], seed: u64| crate::random(c, shape, DType::BF16, seed);
    let (s, h, d) = (32760, 12, 128);
    let q = random(&[1, h, s, d], 1)?;
    let portable = CudaBackend::new(&CudaOptions {
        hopper_attention: false,
        ..Default::default()
    })?;
    let qp = crate::random(&portable, &[1, h, s, d], DType::BF16, 1)?;
    for (b, q, kernel) in [(c, &q, "default kernel"), (&portable, &qp, "portable sm_80 kernel")] {
        let (secs, _) = timed(b, iters, || {
            ops::attention(b, q, q, q, 0.088)?;
            Ok(HostTensor::from_f32(&[0], vec![])?)
        })?;
        println!(
            "attention {s}x{h}x{d} bf16 ({kernel}): {:.2} ms, {:.0} TFLOP/s",
            secs * 1e3,
            4.0 * (s * s * h * d) as f64 / secs / 1e12
        );
    }
    // As the DiT calls it: distinct q, k and v, heads-first and in the projections' own
    // tokens-first layout.
    for (shape, tokens_first) in [([1, h, s, d], false), ([1, s, h, d], true)] {
        let (q, k, v) = (random(&shape, 11)?, random(&shape, 12)?, random(&shape, 13)?);
        let (secs, _) = timed(c, iters, || {
            if tokens_first {
                ops::attention_tokens_first(c, &q, &k, &v, 0.088)?;
            } else {
                ops::attention(c, &q, &k, &v, 0.088)?;
            }
            Ok(HostTensor::from_f32(&[0], vec![])?)
        })?;
        let layout = if tokens_first { "[b, s, h, d]" } else { "[b, h, s, d]" };
        println!(
            "attention {s}x{h}x{d} bf16 (default kernel, distinct q, k, v {layout}): {:.2} ms, {:.0} TFLOP/s",
            secs * 1e3,
            4.0 * (s * s * h * d) as f64 / secs / 1e12
        );
    }
    if let Some(secs) = sdpa_seconds {
        println!(
            "attention {s}x{h}x{d} bf16 (torch SDPA, from diffusers.json): {:.2} ms, {:.0} TFLOP/s",
            secs * 1e3,
            4.0 * (s * s * h * d) as f64 / secs / 1e12
        );
    }
    drop((qp, portable));
    let (x, w) = (random(&[s, 1536], 2)?, random(&[8960, 1536], 3)?);
    let (secs, _) = timed(c, iters, || {
        ops::linear(c, &x, &w, None)?;
        Ok(HostTensor::from_f32(&[0], vec![])?)
    })?;
    println!(
        "linear {s}x1536 -> 8960 bf16: {:.2} ms, {:.0} TFLOP/s",
        secs * 1e3,
        2.0 * (s * 1536 * 8960) as f64 / secs / 1e12
    );
    let forced = |conv| {
        CudaBackend::new(&CudaOptions {
            conv,
            ..Default::default()
        })
    };
    let (igemm, columns) = (forced(ConvKernel::ImplicitGemm)?, forced(ConvKernel::Columns)?);
    let chosen = format!("--conv {}", conv.name());
    // As bench_cuda.py's CONV_SHAPES: (input channels, output channels, height, width).
    for (c_in, c_out, h, w) in [(96, 96, 480, 832), (384, 384, 120, 208), (96, 3, 480, 832)] {
        let flops = 2.0 * (c_in * c_out * 27 * h * w) as f64;
        let name = format!("conv3d {c_in} -> {c_out} channels 3x{h}x{w} -> 1 frame bf16");
        for (b, kernel) in [
            (c, chosen.as_str()),
            (&igemm, "sm_80 implicit GEMM"),
            (&columns, "im2col + cuBLASLt"),
        ] {
            let x = crate::random(b, &[1, c_in, 3, h, w], DType::BF16, 4)?;
            let k = crate::random(b, &[c_out, c_in, 3, 3, 3], DType::BF16, 5)?;
            let (secs, _) = timed(b, iters, || {
                ops::conv3d(b, &x, &k, None, [1; 3], [0, 1, 1], [0, 1, 1], 1)?;
                Ok(HostTensor::from_f32(&[0], vec![])?)
            })?;
            println!("{name} ({kernel}): {:.2} ms, {:.0} TFLOP/s", secs * 1e3, flops / secs / 1e12);
        }
        if let Some(t) = reference[format!("conv3d_{c_in}_{c_out}_{h}x{w}")]["seconds"].as_f64() {
            println!(
                "{name} (torch cuDNN, from diffusers.json): {:.2} ms, {:.0} TFLOP/s",
                t * 1e3,
                flops / t / 1e12
            );
        }
    }
    Ok(())
}

pub fn bench_cuda(dir: &Path, iters: usize, only: Option<&str>, profile: bool, cfg_batch: bool, conv: ConvKernel) -> Result<()> {
    let c = CudaBackend::new(&CudaOptions {
        profile,
        conv,
        ..Default::default()
    })?;
    println!("device: {}", c.name());
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("diffusers.json"))
            .with_context(|| format!("{}: run tests/reference/bench_cuda.py first", dir.display()))?,
    )?;
    kernel_rates(&c, conv, iters, &reference)?;
    let tensors = Weights::open(&dir.join("tensors.safetensors"))?;
    let host = |name: &str| -> Result<HostTensor> {
        let shape = tensors
            .shape(name)
            .with_context(|| format!("tensors.safetensors has no `{name}`"))?
            .to_vec();
        Ok(tensors.load(name, &shape, DType::F32)?)
    };
    let source = DirSource(dir.to_path_buf());
    let mut rows = Vec::new();
    let cases = ["wan_dit_8190", "wan_dit_32760", "sd_unet_cfg", "wan_vae_decode"];
    for name in cases
        .into_iter()
        .filter(|n| reference.get(n).is_some() && only.is_none_or(|o| o.split(',').any(|x| x == *n)))
    {
        let dtype = if name.starts_with("sd_") { DType::F16 } else { DType::BF16 };
        // The VAE decode takes seconds: two timed runs are enough.
        let iters = if name == "wan_vae_decode" {
            iters.clamp(1, 2)
        } else {
            iters.max(1)
        };
        let input = |i: usize| -> Result<Tensor<CudaBackend>> { Ok(c.upload(&host(&format!("{name}.input{i}"))?.to_dtype(dtype))?) };
        c.release_cached();
        let weights = Arc::new(source.weights(name)?);
        let params = Params::new(&c, &weights, dtype);
        c.reset_peak();
        c.reset_profile();
        let (seconds, out) = match name {
            "sd_unet_cfg" => {
                let unet = UNet::load(&params, source.config(&format!("{name}/config.json"))?)?;
                let (x, ctx) = (input(0)?, input(2)?);
                let t = host(&format!("{name}.input1"))?.to_f32();
                timed(&c, iters, || read(&c, &unet.forward(&c, &x, &t, &ctx)?))?
            }
            "wan_vae_decode" => {
                let vae = WanVaeDecoder::load(&params, source.config(&format!("{name}/config.json"))?)?;
                let z = input(0)?;
                let (s, video) = timed(&c, iters, || Ok(pollster::block_on(vae.decode(&c, &z, |_, _| {}))?))?;
                (s, keep_frames(&video, &[0, 40, 80])?)
            }
            _ => {
                let dit = WanDit::load(&params, source.config(&format!("{name}/config.json"))?)?;
                let (x, ctx) = (input(0)?, input(2)?);
                let t = host(&format!("{name}.input1"))?.to_f32();
                if cfg_batch {
                    let twice = |t: &Tensor<CudaBackend>| sdlite_runtime::ops::concat(&c, &[t, t], 0);
                    let (x, ctx, t) = (twice(&x)?, TextContext::full(&twice(&ctx)?), t.repeat(2));
                    timed(&c, iters, || {
                        read(&c, &sdlite_runtime::ops::slice(&c, &dit.forward(&c, &x, &t, &ctx)?, 0, 0, 1)?)
                    })?
                } else {
                    timed(&c, iters, || read(&c, &dit.forward(&c, &x, &t, &TextContext::full(&ctx))?))?
                }
            }
        };
        let want = host(&format!("{name}.output"))?;
        let error = out.to_dtype(DType::F32).relative_error(&want);
        let r = &reference[name];
        let row = Row {
            name: if cfg_batch && name.starts_with("wan_dit") {
                format!("{name} (batch of 2)")
            } else {
                name.to_string()
            },
            diffusers_s: r["seconds"].as_f64().unwrap_or(f64::NAN),
            sdlite_s: seconds,
            diffusers_gib: r["peak_gib"].as_f64().unwrap_or(f64::NAN),
            sdlite_gib: c.memory().peak_bytes as f64 / (1u64 << 30) as f64,
            error,
        };
        println!(
            "{}: sdlite {:.1} ms, diffusers {:.1} ms, error {:.2e}",
            row.name,
            row.sdlite_s * 1e3,
            row.diffusers_s * 1e3,
            row.error
        );
        rows.push(row);
        if profile {
            // Per forward: the table covers timed's two warm-up runs and the timed ones.
            let runs = (iters + 2) as f64;
            let table = c.profile();
            let total: f64 = table.iter().map(|p| p.seconds).sum();
            let idle: f64 = table.iter().map(|p| p.idle_before).sum();
            println!(
                "  GPU busy {:.1} ms, idle between primitives {:.1} ms (the idle time is put on the primitive that ended it)",
                total * 1e3 / runs,
                idle * 1e3 / runs
            );
            for p in table {
                println!(
                    "  {:<36} {:>7.0} calls {:>9.1} ms {:>5.1}% {:>8.1} ms idle before",
                    p.name,
                    p.calls as f64 / runs,
                    p.seconds * 1e3 / runs,
                    100.0 * p.seconds / total,
                    p.idle_before * 1e3 / runs
                );
            }
            c.reset_profile();
        }
    }
    println!("\n| case | diffusers (ms) | sdlite cuda (ms) | speed-up | peak GiB diffusers | peak GiB sdlite | rel. error vs diffusers |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.2}x | {:.2} | {:.2} | {:.1e} |",
            r.name,
            r.diffusers_s * 1e3,
            r.sdlite_s * 1e3,
            r.diffusers_s / r.sdlite_s,
            r.diffusers_gib,
            r.sdlite_gib,
            r.error
        );
    }
    Ok(())
}

/// Frames `frames` (on the time axis) of a `[n, c, t, h, w]` video.
fn keep_frames(video: &HostTensor, frames: &[usize]) -> Result<HostTensor> {
    let [n, ch, t, h, w] = video.shape[..] else {
        anyhow::bail!("video of shape {:?}", video.shape)
    };
    let v = video.to_f32();
    let mut out = Vec::with_capacity(n * ch * frames.len() * h * w);
    for i in 0..n * ch {
        for &f in frames {
            anyhow::ensure!(f < t, "frame {f} of {t}");
            let start = (i * t + f) * h * w;
            out.extend_from_slice(&v[start..start + h * w]);
        }
    }
    Ok(HostTensor::from_f32(&[n, ch, frames.len(), h, w], out)?)
}
