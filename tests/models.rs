//! Parity of the Stable Diffusion components with the reference implementation: the tiny
//! checkpoint and golden outputs under `tests/data` come from `tests/reference/make_goldens.py`
//! (diffusers + transformers in float32). Every component runs on the CPU reference and on
//! the wgpu backend.
//!
//! Tolerances are relative to the largest golden magnitude: 1e-5 for each f32 component and
//! sampler (rounding differs from PyTorch's only in summation order), 1e-4 for the whole
//! pipeline, where guidance at scale 7.5 multiplies the denoiser's differences.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use sdlite_runtime::models::clip_text::ClipTextEncoder;
use sdlite_runtime::models::clip_tokenizer::ClipTokenizer;
use sdlite_runtime::models::denoiser::TextContext;
use sdlite_runtime::models::flow_schedulers::{FlowSampler, FlowScheduler, FlowSchedulerConfig};
use sdlite_runtime::models::schedulers::{Prediction, Sampler, Scheduler, SchedulerConfig};
use sdlite_runtime::models::sd::{SdRequest, StableDiffusion};
use sdlite_runtime::models::sd_vae::{VaeDecoder, VaeEncoder};
use sdlite_runtime::models::sentencepiece::SentencePiece;
use sdlite_runtime::models::umt5::Umt5Encoder;
use sdlite_runtime::models::unet::UNet;
use sdlite_runtime::models::wan::{Wan, WanRequest};
use sdlite_runtime::models::wan_dit::WanDit;
use sdlite_runtime::models::wan_vae::WanVaeDecoder;
use sdlite_runtime::source::{DirSource, Source};
use sdlite_runtime::weights::{Params, Weights};
use sdlite_runtime::{Backend, CpuBackend, DType, HostTensor, WgpuBackend};
use sdlite_tests::{gpu, relative_error};

const MODEL_TOL: f32 = 1e-5;
const SAMPLER_TOL: f32 = 1e-5;
const PIPELINE_TOL: f32 = 1e-4;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

fn sd_root() -> PathBuf {
    data().join("sd-tiny")
}

fn sd_source() -> DirSource {
    DirSource(sd_root())
}

fn goldens() -> &'static Weights {
    static G: OnceLock<Weights> = OnceLock::new();
    G.get_or_init(|| Weights::open(&data().join("sd-tiny-goldens.safetensors")).expect("goldens"))
}

fn wan_goldens() -> &'static Weights {
    static G: OnceLock<Weights> = OnceLock::new();
    G.get_or_init(|| Weights::open(&data().join("wan-tiny-goldens.safetensors")).expect("goldens"))
}

fn golden(name: &str) -> HostTensor {
    let g = if name.starts_with("dit_") || name.starts_with("flow_") || name.starts_with("wan_") || name.starts_with("umt5_") {
        wan_goldens()
    } else {
        goldens()
    };
    let shape = g.shape(name).unwrap_or_else(|| panic!("golden `{name}` missing")).to_vec();
    g.load(name, &shape, DType::F32).expect("golden loads")
}

fn golden_ids() -> &'static serde_json::Value {
    static J: OnceLock<serde_json::Value> = OnceLock::new();
    J.get_or_init(|| serde_json::from_str(&std::fs::read_to_string(data().join("goldens.json")).expect("goldens.json")).expect("json"))
}

fn ids(key: &str) -> Vec<Vec<u32>> {
    serde_json::from_value(golden_ids()[key].clone()).expect("id lists")
}

fn prompts() -> Vec<String> {
    serde_json::from_value(golden_ids()["prompts"].clone()).expect("prompts")
}

fn assert_close(what: &str, got: &HostTensor, want: &HostTensor, tol: f32) {
    let err = relative_error(got, want);
    eprintln!("{what}: relative error {err:.2e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

/// Runs `$f::<B>(backend)` on the CPU reference and on wgpu, comparing each with `$want`.
macro_rules! on_backends {
    ($name:expr, $want:expr, $f:ident) => {{
        let want = $want;
        let got = $f(&CpuBackend);
        assert_close(&format!("{} (cpu)", $name), &got, &want, MODEL_TOL);
        if let Some(g) = gpu() {
            let got = $f::<WgpuBackend>(g);
            assert_close(&format!("{} (wgpu)", $name), &got, &want, MODEL_TOL);
        }
    }};
}

fn read<B: Backend>(b: &B, t: &sdlite_runtime::Tensor<B>) -> HostTensor {
    pollster::block_on(b.read(t)).expect("read back")
}

fn upload<B: Backend>(b: &B, h: &HostTensor) -> sdlite_runtime::Tensor<B> {
    b.upload(h).expect("upload")
}

#[test]
fn clip_tokenizer_matches_reference_on_tiny_vocab() {
    let tok = ClipTokenizer::from_source(&sd_source(), "tokenizer").expect("tokenizer loads");
    for (prompt, want) in prompts().iter().zip(ids("tiny_vocab_ids")) {
        assert_eq!(tok.encode(prompt), want, "prompt {prompt:?}");
    }
}

/// The real CLIP vocabulary (49408 tokens), fetched from PyPI by `scripts/fetch-vocab.sh`.
#[test]
fn clip_tokenizer_matches_reference_on_real_vocab() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/reference/clip-vocab");
    if !dir.join("vocab.json").is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI=true but the real CLIP vocabulary is missing: run scripts/fetch-vocab.sh"
        );
        eprintln!("SKIPPED: no real CLIP vocabulary; run scripts/fetch-vocab.sh");
        return;
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("vocab file");
    for (pad, key) in [("<|endoftext|>", "clip_vocab_ids"), ("!", "clip_vocab_ids_pad_bang")] {
        let tok = ClipTokenizer::new(&read("vocab.json"), &read("merges.txt"), "<|endoftext|>", 77)
            .and_then(|t| t.with_pad(pad))
            .expect("tokenizer");
        for (prompt, want) in prompts().iter().zip(ids(key)) {
            assert_eq!(tok.encode(prompt), want, "prompt {prompt:?} (pad {pad})");
        }
    }
}

fn text_hidden<B: Backend>(b: &B) -> HostTensor {
    let w = Arc::new(sd_source().weights("text_encoder").expect("weights"));
    let cfg = sd_source().config("text_encoder/config.json").expect("config");
    let te = ClipTextEncoder::load(b, cfg, w, DType::F32).expect("text encoder loads");
    let ids: Vec<Vec<u32>> = ids("tiny_vocab_ids")[..2].to_vec();
    read(b, &te.forward(b, &ids).expect("text encoder runs"))
}

#[test]
fn clip_text_encoder_matches_reference() {
    on_backends!("text encoder", golden("text_hidden"), text_hidden);
}

fn unet_out<B: Backend>(b: &B) -> HostTensor {
    let w = sd_source().weights("unet").expect("weights");
    let unet = UNet::load(
        &Params::new(b, &w, DType::F32),
        sd_source().config("unet/config.json").expect("config"),
    )
    .expect("unet loads");
    let x = upload(b, &golden("unet_latent"));
    let ctx = upload(b, &golden("text_hidden"));
    read(b, &unet.forward(b, &x, &[981.0, 981.0], &ctx).expect("unet runs"))
}

#[test]
fn unet_matches_reference() {
    on_backends!("unet", golden("unet_out"), unet_out);
}

fn vae_decoded<B: Backend>(b: &B) -> HostTensor {
    let w = sd_source().weights("vae").expect("weights");
    let vae = VaeDecoder::load(
        &Params::new(b, &w, DType::F32),
        sd_source().config("vae/config.json").expect("config"),
    )
    .expect("vae loads");
    read(b, &vae.forward(b, &upload(b, &golden("vae_latent"))).expect("decode runs"))
}

fn vae_encoded<B: Backend>(b: &B) -> HostTensor {
    let w = sd_source().weights("vae").expect("weights");
    let vae = VaeEncoder::load(
        &Params::new(b, &w, DType::F32),
        sd_source().config("vae/config.json").expect("config"),
    )
    .expect("vae loads");
    read(b, &vae.forward(b, &upload(b, &golden("vae_image"))).expect("encode runs"))
}

#[test]
fn vae_matches_reference() {
    on_backends!("vae decode", golden("vae_decoded"), vae_decoded);
    on_backends!("vae encode", golden("vae_encoded_mean"), vae_encoded);
}

/// Each sampler for epsilon and (SD 2.x 768) v-prediction models.
#[test]
fn samplers_match_reference() {
    let cfg: SchedulerConfig = sd_source().config("scheduler/scheduler_config.json").expect("config");
    let mut v_cfg = cfg.clone();
    v_cfg.prediction_type = Prediction::VPrediction;
    for (prefix, cfg) in [("sched_", cfg), ("sched_v_", v_cfg)] {
        let start = golden(&format!("{prefix}start")).to_f32();
        let noise = golden(&format!("{prefix}noise")).to_f32();
        for name in Sampler::NAMES {
            let mut s = Scheduler::new(Sampler::parse(name).unwrap(), cfg.clone(), 5).expect("scheduler");
            let want_t = golden(&format!("{prefix}{name}_timesteps")).to_f32();
            assert_eq!(s.timesteps(), &want_t[..], "{name} timesteps");
            let sigma = s.init_noise_sigma();
            let mut x: Vec<f32> = start.iter().map(|v| v * sigma).collect();
            for i in 0..want_t.len() {
                let t = s.timesteps()[i];
                let scale = s.input_scale(i);
                let eps: Vec<f32> = x.iter().map(|v| (v * scale).tanh() * 0.5 + 0.01 * t / 1000.0).collect();
                let z = &noise[i * x.len()..(i + 1) * x.len()];
                x = s.step(i, &eps, &x, Some(z)).expect("step");
            }
            let got = HostTensor::from_f32(&[1, 4, 4, 4], x).unwrap();
            assert_close(
                &format!("sampler {prefix}{name}"),
                &got,
                &golden(&format!("{prefix}{name}_final")),
                SAMPLER_TOL,
            );
        }
    }
}

fn sd2_text_hidden<B: Backend>(b: &B) -> HostTensor {
    let w = Arc::new(sd_source().weights("sd2/text_encoder").expect("weights"));
    let cfg = sd_source().config("sd2/text_encoder/config.json").expect("config");
    let te = ClipTextEncoder::load(b, cfg, w, DType::F32).expect("text encoder loads");
    let ids: Vec<Vec<u32>> = golden("sd2_text_ids")
        .to_f32()
        .chunks(77)
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect();
    read(b, &te.forward(b, &ids).expect("text encoder runs"))
}

fn sd2_unet_out<B: Backend>(b: &B) -> HostTensor {
    let w = sd_source().weights("sd2/unet").expect("weights");
    let unet = UNet::load(
        &Params::new(b, &w, DType::F32),
        sd_source().config("sd2/unet/config.json").expect("config"),
    )
    .expect("unet loads");
    let x = upload(b, &golden("sd2_unet_latent"));
    let ctx = upload(b, &golden("sd2_text_hidden"));
    read(b, &unet.forward(b, &x, &[500.0, 500.0], &ctx).expect("unet runs"))
}

/// SD 2.x's config paths: GELU CLIP, linear projections and per-block head counts.
#[test]
fn sd2_config_paths_match_reference() {
    on_backends!("sd2 text encoder", golden("sd2_text_hidden"), sd2_text_hidden);
    on_backends!("sd2 unet", golden("sd2_unet_out"), sd2_unet_out);
}

fn pipeline<B: Backend>(b: &B) -> (HostTensor, HostTensor) {
    let sd = StableDiffusion::load(b, &sd_source(), DType::F32).expect("pipeline loads");
    let p = prompts();
    let req = SdRequest {
        prompt: p[1].clone(),
        negative_prompt: p[0].clone(),
        steps: 2,
        cfg_scale: 7.5,
        seed: 0,
        width: 16,
        height: 16,
        sampler: Sampler::Ddim,
        init_latent: Some(golden("pipeline_init_latent").to_f32()),
    };
    let out = pollster::block_on(sd.generate(b, &req, &mut |_, _, _| {})).expect("generates");
    (out.latent, out.image)
}

#[test]
fn sd_pipeline_matches_reference() {
    let want_latent = golden("pipeline_latent");
    // The reference image is in [-1, 1] before the pipeline's clamp to [0, 1].
    let img = golden("pipeline_image");
    let pixels = img.to_f32().into_iter().map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)).collect();
    let want_image = HostTensor::from_f32(&img.shape[1..], pixels).unwrap();
    let check = |what: &str, (latent, image): (HostTensor, HostTensor)| {
        assert_close(&format!("pipeline latent ({what})"), &latent, &want_latent, PIPELINE_TOL);
        assert_close(&format!("pipeline image ({what})"), &image, &want_image, PIPELINE_TOL);
    };
    check("cpu", pipeline(&CpuBackend));
    if let Some(g) = gpu() {
        check("wgpu", pipeline::<WgpuBackend>(g));
    }
}

fn wan_source() -> DirSource {
    DirSource(data().join("wan-tiny"))
}

fn dit_out<B: Backend>(b: &B) -> HostTensor {
    let w = wan_source().weights("transformer").expect("weights");
    let dit = WanDit::load(
        &Params::new(b, &w, DType::F32),
        wan_source().config("transformer/config.json").expect("config"),
    )
    .expect("dit loads");
    let x = upload(b, &golden("dit_latent"));
    let ctx = upload(b, &golden("dit_context"));
    // A forward on a grid of one frame first: the rotary tables it leaves cached must not
    // serve the golden's grid.
    let first_frame = sdlite_runtime::ops::slice(b, &x, 2, 0, 1).expect("slice");
    let ctx = TextContext::full(&ctx);
    dit.forward(b, &first_frame, &[500.0], &ctx).expect("dit runs on one frame");
    read(b, &dit.forward(b, &x, &[500.0], &ctx).expect("dit runs"))
}

#[test]
fn wan_dit_matches_reference() {
    on_backends!("wan dit", golden("dit_out"), dit_out);
}

/// A Wan text context as the pipeline pads it: per batch row, random prompt rows (of
/// `lens`), then zero rows up to `seq`.
fn padded_context(lens: &[usize], seq: usize, width: usize, seed: u64) -> HostTensor {
    let values = sdlite_tests::random(&[lens.len(), seq, width], DType::F32, 1.0, seed).to_f32();
    let kept = values
        .chunks(width)
        .enumerate()
        .flat_map(|(i, row)| {
            let keep = (i % seq) < lens[i / seq];
            row.iter().map(move |&v| if keep { v } else { 0.0 })
        })
        .collect();
    HostTensor::from_f32(&[lens.len(), seq, width], kept).expect("context")
}

/// The DiT in `dtype` on the pipeline's text as it hands it over (the prompts' positions and
/// one zero position standing for the rest) against the DiT on the whole padded text, on fresh
/// random text.
fn dit_compact_and_full<B: Backend>(b: &B, dtype: DType, seed: u64) -> (HostTensor, HostTensor) {
    let w = wan_source().weights("transformer").expect("weights");
    let config: sdlite_runtime::models::wan_dit::WanDitConfig = wan_source().config("transformer/config.json").expect("config");
    let text_dim = config.text_dim;
    let dit = WanDit::load(&Params::new(b, &w, dtype), config).expect("dit loads");
    let x = golden("dit_latent");
    let x = HostTensor::from_f32(&[2, x.shape[1], x.shape[2], x.shape[3], x.shape[4]], x.to_f32().repeat(2)).expect("x");
    let x = upload(b, &x.to_dtype(dtype));
    let (longest, positions) = (7, 40);
    let full = upload(b, &padded_context(&[3, longest], positions, text_dim, seed).to_dtype(dtype));
    let compact = TextContext {
        states: sdlite_runtime::ops::slice(b, &full, 1, 0, longest + 1).expect("slice"),
        last_repeats: positions - longest,
    };
    let want = read(
        b,
        &dit.forward(b, &x, &[500.0, 500.0], &TextContext::full(&full)).expect("dit runs"),
    );
    let got = read(b, &dit.forward(b, &x, &[500.0, 500.0], &compact).expect("dit runs compact"));
    (got, want)
}

/// f32 attends to the compact text with ln(repeats) on the last key's scores; half dtypes
/// repeat the last position back.
#[test]
fn wan_dit_compact_text_matches_padded_text() {
    let seed = sdlite_tests::fresh_seed();
    let (got, want) = dit_compact_and_full(&CpuBackend, DType::F32, seed);
    assert_close(&format!("compact text (cpu, seed {seed})"), &got, &want, MODEL_TOL);
    let (got, want) = dit_compact_and_full(&CpuBackend, DType::BF16, seed);
    assert_close(&format!("compact text (cpu bf16, seed {seed})"), &got, &want, MODEL_TOL);
    if let Some(g) = gpu() {
        let (got, want) = dit_compact_and_full::<WgpuBackend>(g, DType::F32, seed);
        assert_close(&format!("compact text (wgpu, seed {seed})"), &got, &want, MODEL_TOL);
    }
}

#[test]
fn flow_samplers_match_reference() {
    let start = golden("flow_start").to_f32();
    for (name, sampler) in [("flow_euler", FlowSampler::Euler), ("flow_unipc", FlowSampler::UniPc)] {
        let mut s = FlowScheduler::new(sampler, &FlowSchedulerConfig::default(), 6).expect("scheduler");
        let want_t = golden(&format!("{name}_timesteps")).to_f32();
        let got_t = HostTensor::from_f32(&[want_t.len()], s.timesteps().to_vec()).unwrap();
        assert_close(
            &format!("{name} timesteps"),
            &got_t,
            &golden(&format!("{name}_timesteps")),
            SAMPLER_TOL,
        );
        let mut x = start.clone();
        for i in 0..want_t.len() {
            let t = s.timesteps()[i];
            let v: Vec<f32> = x.iter().map(|&x| x.tanh() * 0.5 - 0.3 * x + 0.001 * t).collect();
            x = s.step(i, &v, &x).expect("step");
        }
        let got = HostTensor::from_f32(&[1, 4, 2, 4, 4], x).unwrap();
        assert_close(&format!("sampler {name}"), &got, &golden(&format!("{name}_final")), SAMPLER_TOL);
    }
}

fn wan_vae_decoded<B: Backend>(b: &B) -> HostTensor {
    let w = wan_source().weights("vae").expect("weights");
    let vae = WanVaeDecoder::load(
        &Params::new(b, &w, DType::F32),
        wan_source().config("vae/config.json").expect("config"),
    )
    .expect("vae loads");
    let z = upload(b, &golden("wan_vae_latent"));
    pollster::block_on(vae.decode(b, &z, |_, _| {})).expect("decode runs")
}

/// Frame-by-frame decoding with the causal cache equals the reference's decode.
#[test]
fn wan_vae_matches_reference() {
    on_backends!("wan vae decode", golden("wan_vae_decoded"), wan_vae_decoded);
}

fn sentencepiece() -> SentencePiece {
    let path = data().join("wan-tiny/tokenizer/spiece.model");
    SentencePiece::from_model_bytes(&path.display().to_string(), &std::fs::read(&path).expect("spiece.model")).expect("parses")
}

/// Against the sentencepiece library and transformers' UMT5 tokenizer on a unigram model the
/// library fitted (make_goldens.py).
#[test]
fn sentencepiece_matches_library_and_reference_tokenizer() {
    let sp = sentencepiece();
    for ((prompt, lib), padded) in prompts().iter().zip(ids("spm_library_ids")).zip(ids("umt5_ids")) {
        assert_eq!(sp.encode_text(prompt), lib, "prompt {prompt:?} (sentencepiece library)");
        assert_eq!(sp.encode_padded(prompt, 512).0, padded, "prompt {prompt:?} (UMT5 tokenizer)");
    }
}

fn umt5_hidden<B: Backend>(b: &B) -> HostTensor {
    let w = Arc::new(wan_source().weights("text_encoder").expect("weights"));
    let te = Umt5Encoder::load(b, wan_source().config("text_encoder/config.json").expect("config"), w, DType::F32).expect("loads");
    let rows = ids("umt5_hidden_ids");
    let lens: Vec<usize> = rows.iter().map(|r| r.iter().take_while(|&&t| t != 0).count()).collect();
    read(b, &te.forward(b, &rows, &lens).expect("encoder runs"))
}

#[test]
fn umt5_encoder_matches_reference() {
    on_backends!("umt5 encoder", golden("umt5_hidden"), umt5_hidden);
}

fn wan_pipeline<B: Backend>(b: &B) -> HostTensor {
    let wan = Wan::load(b, &wan_source(), DType::F32).expect("pipeline loads");
    let p = prompts();
    let req = WanRequest {
        prompt: p[1].clone(),
        negative_prompt: p[0].clone(),
        steps: 2,
        cfg_scale: 5.0,
        seed: 0,
        width: 48,
        height: 32,
        frames: 5,
        sampler: FlowSampler::UniPc,
        shift: None,
        init_latent: Some(golden("wan_pipeline_init_latent").to_f32()),
    };
    pollster::block_on(wan.generate(b, &req, &mut |_, _, _| {}))
        .expect("generates")
        .latent
}

#[test]
fn wan_pipeline_matches_reference() {
    let want = golden("wan_pipeline_latent");
    assert_close("wan pipeline latent (cpu)", &wan_pipeline(&CpuBackend), &want, PIPELINE_TOL);
    if let Some(g) = gpu() {
        assert_close("wan pipeline latent (wgpu)", &wan_pipeline::<WgpuBackend>(g), &want, PIPELINE_TOL);
    }
}

/// Every value of `t` is finite, and the output is not flat (a black image).
fn assert_finite_and_alive(what: &str, t: &HostTensor) {
    let v = t.to_f32();
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    assert_eq!(bad, 0, "{what}: {bad} of {} values are not finite", v.len());
    let (lo, hi) = v.iter().fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    assert!(hi - lo > 1e-3, "{what}: output is flat ({lo}..{hi})");
}

/// Inputs far outside the training range (latents x40, text x40) through the UNet, the DiT
/// and both VAEs in half precision: nothing overflows to inf or NaN.
fn half_precision_run<B: Backend>(b: &B, dtype: DType) {
    let big = |name: &str, scale: f32| {
        let g = golden(name);
        let v = g.to_f32().into_iter().map(|x| x * scale).collect();
        upload(b, &HostTensor::new(&g.shape, sdlite_runtime::HostData::from_f32(dtype, v)).unwrap())
    };
    let tag = format!("{} {dtype:?}", b.name());
    let sd = StableDiffusion::load(b, &sd_source(), dtype).expect("sd loads");
    let unet = sd
        .unet
        .get(b)
        .expect("unet loads")
        .forward(b, &big("unet_latent", 40.0), &[981.0, 981.0], &big("text_hidden", 40.0))
        .expect("unet");
    assert_finite_and_alive(&format!("unet ({tag})"), &read(b, &unet));
    let image = sd.vae_decoder.forward(b, &big("vae_latent", 40.0)).expect("vae");
    assert_finite_and_alive(&format!("sd vae ({tag})"), &read(b, &image));
    let wan = Wan::load(b, &wan_source(), dtype).expect("wan loads");
    let v = wan
        .transformer
        .get(b)
        .expect("dit loads")
        .forward(b, &big("dit_latent", 40.0), &[999.0], &TextContext::full(&big("dit_context", 40.0)))
        .expect("dit");
    assert_finite_and_alive(&format!("wan dit ({tag})"), &read(b, &v));
    let video = pollster::block_on(wan.vae.decode(b, &big("wan_vae_latent", 40.0), |_, _| {})).expect("wan vae");
    assert_finite_and_alive(&format!("wan vae ({tag})"), &video);
}

#[test]
fn half_precision_stays_finite_with_large_activations() {
    half_precision_run(&CpuBackend, DType::BF16);
    half_precision_run(&CpuBackend, DType::F16);
    if let Some(g) = gpu() {
        if g.supports(DType::F16) {
            half_precision_run(g, DType::F16);
        } else {
            eprintln!("{}: no shader-f16, f16 run skipped", g.name());
        }
    }
}

/// The full-size architectures against `tests/reference/full_size.py`'s outputs, on the GPU
/// adapter in f32 (run on a machine with a GPU: `SDLITE_FULL_SIZE=DIR models --ignored`).
#[test]
#[ignore]
fn full_size_matches_reference_on_gpu() {
    let dir = PathBuf::from(std::env::var("SDLITE_FULL_SIZE").expect("SDLITE_FULL_SIZE names the folder full_size.py wrote"));
    let g = gpu().expect("a GPU adapter");
    let goldens = Weights::open(&dir.join("goldens.safetensors")).expect("goldens");
    let gold = |name: &str| {
        let shape = goldens.shape(name).expect("golden").to_vec();
        goldens.load(name, &shape, DType::F32).expect("loads")
    };
    let mut failures = Vec::new();
    let mut check = |what: &str, got: &HostTensor, want: &HostTensor| {
        let err = relative_error(got, want);
        eprintln!("{what}: relative error {err:.2e} (tolerance 1e-4)");
        if err > 1e-4 {
            failures.push(format!("{what}: {err:e}"));
        }
    };
    let time = |what: &str, f: &mut dyn FnMut() -> HostTensor| {
        f();
        let start = std::time::Instant::now();
        let out = f();
        eprintln!("{what}: sdlite wgpu {:.3} s (f32)", start.elapsed().as_secs_f64());
        out
    };
    let sd = DirSource(dir.join("sd15"));
    let te = ClipTextEncoder::load(
        g,
        sd.config("text_encoder/config.json").expect("config"),
        Arc::new(sd.weights("text_encoder").expect("weights")),
        DType::F32,
    )
    .expect("clip loads");
    let ids: Vec<Vec<u32>> = gold("sd_text_ids")
        .to_f32()
        .chunks(77)
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect();
    let got = time("clip text", &mut || read(g, &te.forward(g, &ids).expect("runs")));
    check("full-size clip text", &got, &gold("sd_text_hidden"));
    let w = sd.weights("unet").expect("weights");
    let unet = UNet::load(&Params::new(g, &w, DType::F32), sd.config("unet/config.json").expect("config")).expect("unet loads");
    let (x, ctx) = (upload(g, &gold("sd_unet_latent")), upload(g, &gold("sd_text_hidden")));
    let got = time("sd unet 64x64 batch 2", &mut || {
        read(g, &unet.forward(g, &x, &[981.0, 981.0], &ctx).expect("runs"))
    });
    check("full-size sd unet", &got, &gold("sd_unet_out"));
    let w = sd.weights("vae").expect("weights");
    let vae = VaeDecoder::load(&Params::new(g, &w, DType::F32), sd.config("vae/config.json").expect("config")).expect("vae loads");
    let z = upload(g, &gold("sd_vae_latent"));
    let got = time("sd vae decode 512", &mut || read(g, &vae.forward(g, &z).expect("runs")));
    check("full-size sd vae", &got, &gold("sd_vae_decoded"));
    let wan = DirSource(dir.join("wan"));
    let w = wan.weights("transformer").expect("weights");
    let dit = WanDit::load(
        &Params::new(g, &w, DType::F32),
        wan.config("transformer/config.json").expect("config"),
    )
    .expect("dit loads");
    let (x, ctx) = (upload(g, &gold("wan_dit_latent")), upload(g, &gold("wan_dit_context")));
    let got = time("wan dit 1950 tokens", &mut || {
        read(g, &dit.forward(g, &x, &[500.0], &TextContext::full(&ctx)).expect("runs"))
    });
    check("full-size wan dit", &got, &gold("wan_dit_out"));
    let w = wan.weights("vae").expect("weights");
    let vae = WanVaeDecoder::load(&Params::new(g, &w, DType::F32), wan.config("vae/config.json").expect("config")).expect("loads");
    let z = upload(g, &gold("wan_vae_latent"));
    let got = time("wan vae decode 9x240x416", &mut || {
        pollster::block_on(vae.decode(g, &z, |_, _| {})).expect("runs")
    });
    check("full-size wan vae", &got, &gold("wan_vae_decoded"));
    assert!(failures.is_empty(), "full-size differences: {failures:?}");
}

fn dit_out_original_names<B: Backend>(b: &B) -> HostTensor {
    let w = sdlite_runtime::models::wan_dit::with_diffusers_names(
        Weights::open(&data().join("wan-tiny-dit-original.safetensors")).expect("weights"),
    );
    let dit = WanDit::load(
        &Params::new(b, &w, DType::F32),
        wan_source().config("transformer/config.json").expect("config"),
    )
    .expect("dit loads from the original key names");
    let x = upload(b, &golden("dit_latent"));
    let ctx = TextContext::full(&upload(b, &golden("dit_context")));
    read(b, &dit.forward(b, &x, &[500.0], &ctx).expect("dit runs"))
}

/// The DiT from a checkpoint with the original Wan release's key names (checked against
/// diffusers' converter in make_goldens.py) computes what the diffusers-named one does.
#[test]
fn wan_dit_loads_original_key_names() {
    on_backends!("wan dit (original names)", golden("dit_out"), dit_out_original_names);
}

fn wan_vae_original_names<B: Backend>(b: &B) -> HostTensor {
    let config: sdlite_runtime::models::wan_vae::WanVaeConfig = wan_source().config("vae/config.json").expect("config");
    let w = sdlite_runtime::models::wan_vae::with_diffusers_names(
        Weights::open(&data().join("wan-tiny-vae-original.safetensors")).expect("weights"),
        &config,
    );
    let vae = WanVaeDecoder::load(&Params::new(b, &w, DType::F32), config).expect("vae loads from the original key names");
    pollster::block_on(vae.decode(b, &upload(b, &golden("wan_vae_latent")), |_, _| {})).expect("decode runs")
}

/// The VAE decoder from the original Wan release's key names (checked against diffusers'
/// converter in make_goldens.py) decodes what the diffusers-named one does.
#[test]
fn wan_vae_loads_original_key_names() {
    on_backends!("wan vae (original names)", golden("wan_vae_decoded"), wan_vae_original_names);
}
