//! `sdlite gen` end to end on the tiny test checkpoints (Stable Diffusion and Wan), on the
//! CPU reference and on wgpu (lavapipe in CI), plus the errors a user sees for bad requests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{model, read_png, sdlite};

fn gen(backend: &str, out: &Path, seed: &str) -> Output {
    let model = model();
    sdlite(&[
        "gen",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red star on a yellow background",
        "--steps",
        "3",
        "--seed",
        seed,
        "--backend",
        backend,
        "--out",
        out.to_str().unwrap(),
    ])
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sdlite-gen-test-{}-{name}", std::process::id()))
}

#[test]
fn gen_writes_a_png_and_repeats_with_the_same_seed() {
    let (a, b, c) = (temp("a.png"), temp("b.png"), temp("c.png"));
    for (path, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let out = gen("cpu", path, seed);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (w, h, pa, text) = read_png(&a);
    assert_eq!((w, h), (16, 16));
    assert!(text.contains("Seed: 7") && text.contains("a red star"), "parameters chunk: {text}");
    assert_eq!(pa, read_png(&b).2, "same seed, same backend, same picture");
    assert_ne!(pa, read_png(&c).2, "another seed gives another picture");
}

#[test]
fn gen_runs_on_wgpu_like_on_cpu() {
    let (cpu, gpu) = (temp("cpu.png"), temp("gpu.png"));
    let out = gen("wgpu", &gpu, "5");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("CI").is_none() && err.contains("adapter"),
            "wgpu generation failed: {err}"
        );
        eprintln!("SKIPPED: no wgpu adapter");
        return;
    }
    assert!(gen("cpu", &cpu, "5").status.success());
    let (a, b) = (read_png(&cpu).2, read_png(&gpu).2);
    // f32 on both; pixels may round differently by one level where a value sits on a boundary.
    let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(worst <= 1, "cpu and wgpu pictures differ by up to {worst} levels");
}

#[test]
fn gen_explains_bad_requests() {
    let model = model();
    let m = model.to_str().unwrap();
    let wan = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/wan-tiny");
    let w = wan.to_str().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    let (sd1, sd2, tok) = (
        data.join("sd-tiny-single-file.safetensors"),
        data.join("sd2-tiny-single-file.safetensors"),
        data.join("sd-tiny/tokenizer"),
    );
    let (sd1, sd2, tok) = (sd1.to_str().unwrap(), sd2.to_str().unwrap(), tok.to_str().unwrap());
    let cases: [(&[&str], &str); 7] = [
        (
            &["gen", "--model", sd1, "--prompt", "x", "--backend", "cpu"],
            "pass --tokenizer DIR",
        ),
        (
            &["gen", "--model", sd2, "--tokenizer", tok, "--prompt", "x", "--backend", "cpu"],
            "pass --prediction v",
        ),
        (
            &["gen", "--model", w, "--prompt", "x", "--frames", "8", "--backend", "cpu"],
            "8 frames is not a length",
        ),
        (
            &["gen", "--model", w, "--prompt", "x", "--sampler", "ddim", "--backend", "cpu"],
            "unknown sampler `ddim`",
        ),
        (&["gen", "--model", "/no/such/model", "--prompt", "x"], "no model at /no/such/model"),
        (
            &["gen", "--model", m, "--prompt", "x", "--sampler", "plms"],
            "unknown sampler `plms`",
        ),
        (
            &["gen", "--model", m, "--prompt", "x", "--width", "18", "--backend", "cpu"],
            "18x16 is not a size this model takes",
        ),
    ];
    for (args, want) in cases {
        let out = sdlite(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: expected `{want}` in:\n{err}"
        );
    }
}

fn gen_video(backend: &str, out: &Path, frames_dir: &Path) -> Output {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/wan-tiny");
    sdlite(&[
        "gen",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a green square moving right",
        "--width",
        "48",
        "--height",
        "32",
        "--frames",
        "9",
        "--steps",
        "3",
        "--seed",
        "4",
        "--backend",
        backend,
        "--out",
        out.to_str().unwrap(),
        "--frames-dir",
        frames_dir.to_str().unwrap(),
    ])
}

/// Frame count, size and the first frame's pixels of an animated PNG.
fn read_apng(path: &Path) -> (u32, u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).expect("video exists")));
    let mut reader = decoder.read_info().expect("valid png");
    let frames = reader.info().animation_control.expect("animated").num_frames;
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("first frame");
    buf.truncate(info.buffer_size());
    (frames, info.width, info.height, buf)
}

#[test]
fn gen_writes_a_wan_video_on_cpu_and_wgpu() {
    let (cpu, cpu_frames) = (temp("cpu.apng.png"), temp("cpu-frames"));
    let out = gen_video("cpu", &cpu, &cpu_frames);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (frames, w, h, first) = read_apng(&cpu);
    assert_eq!((frames, w, h), (9, 48, 32));
    assert_eq!(std::fs::read_dir(&cpu_frames).unwrap().count(), 9, "one PNG per frame");
    assert_eq!(read_png(&cpu_frames.join("frame-0000.png")).2, first, "frame files match the video");
    let (gpu, gpu_frames) = (temp("gpu.apng.png"), temp("gpu-frames"));
    let out = gen_video("wgpu", &gpu, &gpu_frames);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("CI").is_none() && err.contains("adapter"),
            "wgpu video failed: {err}"
        );
        eprintln!("SKIPPED: no wgpu adapter");
        return;
    }
    let worst = first.iter().zip(&read_apng(&gpu).3).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "cpu and wgpu videos differ by up to {worst} levels");
}
