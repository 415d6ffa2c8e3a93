//! The browser demo in real headless Chromium (WebGPU on SwiftShader), served by `sdlite
//! serve`: the tiny checkpoints generate in the tab a picture (SD) and a video (Wan) equal
//! to `sdlite gen --backend wgpu`'s, the picture again with the denoiser on a loopback
//! `sdlite worker` over WebTransport (uploading the model to it) and once more with that
//! worker killed mid-job (the page finishes on WebGPU), cancel stops a run, a second visit loads the model from Cache Storage, a
//! damaged checkpoint and a browser without WebGPU get messages. Needs the built page (scripts/build-web.sh),
//! Debian's `chromium` and `npm ci` in tests/web; scripts/test.sh provides all three. Without
//! them the test is skipped, except under CI=true where that is a failure.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{model, read_png, sdlite, Logged};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn wan_model() -> PathBuf {
    root().join("tests/data/wan-tiny")
}

/// What is missing to run the browser test, if anything.
fn missing() -> Option<String> {
    let root = root();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    [
        (root.join("target/web/site/index.html"), "the built page: run scripts/build-web.sh"),
        (PathBuf::from(chromium), "chromium: apt-get install chromium"),
        (
            root.join("tests/web/node_modules/playwright-core"),
            "playwright-core: (cd tests/web && npm ci)",
        ),
    ]
    .into_iter()
    .find(|(p, _)| !p.exists())
    .map(|(_, what)| what.to_string())
}

/// The models the page is offered: the tiny checkpoint, and a copy whose UNet weights are cut
/// short.
fn models(dir: &std::path::Path) -> PathBuf {
    let models = dir.join("models");
    let _ = std::fs::remove_dir_all(&models);
    for name in ["sd-tiny", "broken-sd"] {
        copy_dir(&model(), &models.join(name));
    }
    copy_dir(&wan_model(), &models.join("wan-tiny"));
    let unet = models.join("broken-sd/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    models
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `sdlite serve` on a free loopback port; returns it and its URL.
fn serve(models: &std::path::Path) -> (Logged, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdlite"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--site"])
        .arg(root().join("target/web/site"))
        .arg("--models")
        .arg(models);
    let server = Logged::spawn(cmd);
    let line = server.stdout.recv().expect("serve prints its address");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in `{line}`"))
        .to_string();
    (server, url)
}

const WORKER_TOKEN: &str = "web-test-token";

/// `sdlite worker` (CPU, no models: the page uploads its own) accepting WebTransport on a free
/// loopback port; returns it, its session URL and certificate hash.
fn worker(dir: &std::path::Path) -> (Logged, String, String) {
    let models = dir.join("worker-models");
    let _ = std::fs::remove_dir_all(&models);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdlite"));
    cmd.args(["worker", "--backend", "cpu", "--listen", "127.0.0.1:0"])
        .args(["--webtransport", "127.0.0.1:0", "--models"])
        .arg(&models)
        .env("SDLITE_TOKEN", WORKER_TOKEN);
    let worker = Logged::spawn(cmd);
    let line = worker
        .stdout
        .iter()
        .find(|l| l.starts_with("webtransport "))
        .expect("the worker prints its WebTransport address");
    let mut words = line.split_whitespace().skip(1);
    let url = words.next().expect("URL").to_string();
    let hash = words.next().and_then(|h| h.strip_prefix("sha256=")).expect("sha256=").to_string();
    (worker, url, hash)
}

#[test]
fn the_page_generates_like_the_native_backend() {
    if let Some(what) = missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI=true but the browser test cannot run: missing {what}"
        );
        eprintln!("browser test skipped: missing {what}");
        return;
    }
    let out = root().join("target/web-test");
    std::fs::create_dir_all(&out).unwrap();

    let native = out.join("native.png");
    let model = model();
    let gen = sdlite(&[
        "gen",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red star on a yellow background",
        "--steps",
        "4",
        "--cfg-scale",
        "5",
        "--seed",
        "7",
        "--sampler",
        "euler",
        "--backend",
        "wgpu",
        "--out",
        native.to_str().unwrap(),
    ]);
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let (w, h, rgb, _) = read_png(&native);
    let frames_dir = out.join("native-frames");
    let _ = std::fs::remove_dir_all(&frames_dir);
    let wan = wan_model();
    let gen = sdlite(&[
        "gen",
        "--model",
        wan.to_str().unwrap(),
        "--prompt",
        "a green square moving right",
        "--steps",
        "3",
        "--cfg-scale",
        "5",
        "--seed",
        "7",
        "--width",
        "48",
        "--height",
        "32",
        "--frames",
        "9",
        "--backend",
        "wgpu",
        "--out",
        out.join("native-video.png").to_str().unwrap(),
        "--frames-dir",
        frames_dir.to_str().unwrap(),
    ]);
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));

    let (_server, url) = serve(&models(&out));
    let (worker, worker_url, worker_hash) = worker(&out);
    let request = serde_json::json!({
        "model": "sd-tiny",
        "form": {"prompt": "a red star on a yellow background", "steps": 4, "guidance": 5, "seed": 7, "width": 0, "height": 0},
        "sampler": "euler",
        "cancelSteps": 40,
        "worker": {"url": worker_url, "sha256": worker_hash, "token": WORKER_TOKEN, "pid": worker.child.id()},
        "broken": "broken-sd",
        "wan": {
            "model": "wan-tiny",
            "form": {"prompt": "a green square moving right", "steps": 3, "guidance": 5, "seed": 7, "width": 48, "height": 32, "frames": 9},
            "sampler": "unipc",
        },
    });
    let run = Command::new("node")
        .current_dir(root().join("tests/web"))
        .args(["page.mjs", &url, out.to_str().unwrap(), &request.to_string()])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "page driver failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("driver prints JSON");
    eprintln!("adapter: {}", report["adapter"]);
    eprintln!(
        "screenshots: {}, {} and {}",
        out.join("page.png").display(),
        out.join("worker.png").display(),
        out.join("no-webgpu.png").display()
    );
    eprintln!(
        "page load to first step {:.1} s, to the picture {:.1} s",
        report["msToFirstStep"].as_f64().unwrap_or(f64::NAN) / 1e3,
        report["msLoadToResult"].as_f64().unwrap_or(f64::NAN) / 1e3
    );

    // The same model, request and shaders on another WebGPU implementation: the picture
    // must match the native backend's to within one level per channel.
    let result = &report["result"];
    assert_eq!(result["error"], serde_json::Value::Null, "generation failed in the page: {report}");
    assert_eq!(
        (result["width"].as_u64(), result["height"].as_u64()),
        (Some(w as u64), Some(h as u64))
    );
    let worst = largest_difference(&rgb, &result["frames"][0]);
    eprintln!("largest pixel difference to the native wgpu backend: picture {worst}");
    assert!(worst <= 1, "browser and native pictures differ by up to {worst} levels");

    // On the worker: every step there, the same picture (its CPU backend and the page's
    // WebGPU agree to rounding); then killed mid-job: two steps there, the rest here.
    let remote = &report["remote"];
    assert_eq!(remote["error"], serde_json::Value::Null, "offloaded generation failed: {report}");
    assert_eq!(
        (remote["remoteSteps"].as_u64(), remote["localSteps"].as_u64()),
        (Some(4), Some(0)),
        "{report}"
    );
    let worst = largest_difference(&rgb, &remote["frames"][0]);
    eprintln!("largest pixel difference to the native wgpu backend: on the worker {worst}");
    assert!(worst <= 1, "the worker's picture differs by up to {worst} levels");
    let log = report["workerLog"].to_string();
    assert!(log.contains("uploading"), "the page should have sent the model: {log}");
    let fallback = &report["fallback"];
    assert_eq!(
        fallback["error"],
        serde_json::Value::Null,
        "generation with a dying worker failed: {report}"
    );
    assert_eq!(
        (fallback["remoteSteps"].as_u64(), fallback["localSteps"].as_u64()),
        (Some(2), Some(2)),
        "{report}"
    );
    assert!(fallback["workerFailure"].is_string(), "{report}");
    assert!(log.contains("failed at step 3"), "{log}");
    let worst = largest_difference(&rgb, &fallback["frames"][0]);
    eprintln!("largest pixel difference to the native wgpu backend: worker killed mid-job {worst}");
    assert!(worst <= 1, "the picture after the worker's death differs by up to {worst} levels");

    let video = &report["video"];
    assert_eq!(
        video["error"],
        serde_json::Value::Null,
        "video generation failed in the page: {report}"
    );
    assert_eq!(video["frames"].as_array().map(Vec::len), Some(9));
    assert_eq!(report["videoVisible"], true);
    let worst = (0..9)
        .map(|f| {
            let (fw, fh, frame, _) = read_png(&frames_dir.join(format!("frame-{f:04}.png")));
            assert_eq!((fw, fh), (48, 32));
            largest_difference(&frame, &video["frames"][f])
        })
        .max()
        .unwrap();
    eprintln!("largest pixel difference to the native wgpu backend: video {worst}");
    assert!(worst <= 1, "browser and native videos differ by up to {worst} levels");
    assert_eq!(report["downloadVisible"], true, "no download link: {report}");

    assert_eq!(report["cancel"]["error"], "cancelled", "cancel did not stop the run: {report}");
    assert_eq!(report["cancel"]["finished"], false);

    let files = report["firstLoad"]["cached"].as_u64().unwrap_or(0) + report["firstLoad"]["fetched"].as_u64().unwrap_or(0);
    assert!(files > 0);
    assert_eq!(report["secondLoad"]["fetched"], 0, "the second visit downloaded again: {report}");
    assert_eq!(report["secondLoad"]["cached"].as_u64(), Some(files));

    let broken = report["broken"].as_str().unwrap_or("");
    assert!(
        broken.contains("broken-sd") && broken.contains("unet"),
        "damaged checkpoint message: {broken}"
    );

    let plain = &report["withoutWebgpu"];
    assert_eq!(plain["ready"], "no-webgpu", "{report}");
    assert!(plain["message"].as_str().unwrap_or("").contains("WebGPU"), "{report}");
}

/// The largest difference of one channel between native RGB pixels and the page's RGBA
/// (base64 JSON string).
fn largest_difference(rgb: &[u8], page: &serde_json::Value) -> u8 {
    let rgba = decode_base64(page.as_str().expect("base64 pixels"));
    assert_eq!(rgb.len() / 3, rgba.len() / 4, "pixel counts differ");
    rgb.chunks_exact(3)
        .zip(rgba.chunks_exact(4))
        .flat_map(|(n, b)| (0..3).map(move |c| n[c].abs_diff(b[c])))
        .max()
        .expect("pixels")
}

fn decode_base64(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    } as u32;
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | value(c) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
