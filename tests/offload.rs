//! Remote offload on loopback: workers and clients in one process, over real QUIC with TLS
//! (and WebTransport, the browser's way in, with the page's denoiser).
//! Offloaded output must equal the local run's on the same backend kind, through worker
//! deaths, and bad peers and bad frames must be refused while good ones keep being served.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sdlite_remote::channel::Channel;
use sdlite_remote::channel_denoiser::{ChannelDenoiser, ChannelStats};
use sdlite_remote::client::{ClientOptions, WorkerLink};
use sdlite_remote::engine::ModelEngine;
use sdlite_remote::frame::{read_frame, write_frame, Frame, TensorRef};
use sdlite_remote::model_id::{DenoiserPackage, ModelStore};
use sdlite_remote::offload::{OffloadDenoiser, Pool};
use sdlite_remote::protocol::{Envelope, ErrorCode, JobMode, ModelHash, Request, Response, PROTOCOL_VERSION};
use sdlite_remote::tls::{Identity, LinkOptions};
use sdlite_remote::worker::{start_worker, RunningWorker, WorkerOptions, WEBTRANSPORT_PATH};
use sdlite_remote::{Error, WorkerAddress};
use sdlite_runtime::models::denoiser::{DenoiserLoad, HostText};
use sdlite_runtime::models::flow_schedulers::FlowSampler;
use sdlite_runtime::models::schedulers::Sampler;
use sdlite_runtime::models::sd::{SdRequest, StableDiffusion};
use sdlite_runtime::models::wan::{Wan, WanRequest};
use sdlite_runtime::models::Phase;
use sdlite_runtime::source::DirSource;
use sdlite_runtime::{CpuBackend, DType, HostTensor};

const TOKEN: &str = "test-token";

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A fresh models folder holding the tiny pipelines (linked), or nothing.
fn models_dir(with_models: bool) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sdlite-offload-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if with_models {
        for (link, target) in [("sd", "sd-tiny"), ("wan", "wan-tiny")] {
            std::os::unix::fs::symlink(data().join(target), dir.join(link)).unwrap();
        }
    }
    dir
}

struct TestWorker {
    running: RunningWorker,
    address: WorkerAddress,
}

fn start(models: &Path, token: &str) -> TestWorker {
    start_with(models, token, |_| {})
}

fn start_with(models: &Path, token: &str, configure: impl FnOnce(&mut WorkerOptions)) -> TestWorker {
    let store = ModelStore::scan(models, &mut |p, r| {
        eprintln!("worker model {}: {:?}", p.display(), r.map(|m| m.hash))
    })
    .unwrap();
    let identity = Identity::generate(&["localhost".into()]).unwrap();
    let mut options = WorkerOptions::new(token.into());
    options.link = link_options();
    configure(&mut options);
    let running = runtime()
        .block_on(start_worker(
            "127.0.0.1:0".parse().unwrap(),
            &identity,
            options,
            move || Ok(ModelEngine::new(CpuBackend, store, 2)),
            Arc::new(|l| eprintln!("worker: {l}")),
        ))
        .unwrap();
    let address = WorkerAddress {
        host: "127.0.0.1".into(),
        port: running.local_addr.port(),
        pin: Some(running.fingerprint),
    };
    TestWorker { running, address }
}

fn link_options() -> LinkOptions {
    LinkOptions {
        idle_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_millis(500),
        max_streams: 8,
    }
}

fn client_options(token: &str) -> ClientOptions {
    let mut o = ClientOptions::new(token.into());
    o.link = link_options();
    o.request_timeout = Duration::from_secs(60);
    o
}

fn pool(workers: &[&TestWorker], token: &str) -> Pool {
    let addresses = workers.iter().map(|w| w.address.clone()).collect();
    Pool::new(addresses, client_options(token), Arc::new(|l| eprintln!("client: {l}"))).unwrap()
}

fn sd_request() -> SdRequest {
    SdRequest {
        prompt: "a red circle".into(),
        negative_prompt: "blurry".into(),
        steps: 4,
        cfg_scale: 7.5,
        seed: 7,
        width: 16,
        height: 16,
        sampler: Sampler::EulerAncestral,
        init_latent: None,
    }
}

fn wan_request() -> WanRequest {
    WanRequest {
        prompt: "a green square moving right".into(),
        negative_prompt: "static".into(),
        steps: 3,
        cfg_scale: 5.0,
        seed: 3,
        width: 48,
        height: 32,
        frames: 5,
        sampler: FlowSampler::UniPc,
        shift: None,
        init_latent: None,
    }
}

fn sd(unet: DenoiserLoad) -> StableDiffusion<CpuBackend> {
    StableDiffusion::load_with(&CpuBackend, &DirSource(data().join("sd-tiny")), DType::F32, unet).unwrap()
}

fn wan(transformer: DenoiserLoad) -> Wan<CpuBackend> {
    Wan::load_with(&CpuBackend, &DirSource(data().join("wan-tiny")), DType::F32, transformer).unwrap()
}

fn sd_local() -> HostTensor {
    pollster::block_on(sd(DenoiserLoad::Now).generate(&CpuBackend, &sd_request(), &mut |_, _, _| {}))
        .unwrap()
        .image
}

/// SD through `pool`, the UNet loaded here only if a step runs here; `on_step(step)` runs
/// after each denoising step.
fn sd_offloaded(
    pool: &mut Pool,
    configure: impl FnOnce(&mut OffloadDenoiser<CpuBackend, sdlite_runtime::models::unet::UNet<CpuBackend>>),
    on_step: &mut dyn FnMut(usize),
) -> sdlite_runtime::Result<HostTensor> {
    let sd = sd(DenoiserLoad::OnFirstUse);
    let package = DenoiserPackage::from_pipeline(&data().join("sd-tiny")).unwrap();
    let mut d = OffloadDenoiser::whole(pool, &package, &sd.unet, DType::F32, false);
    configure(&mut d);
    let out = pollster::block_on(sd.generate_with(&CpuBackend, &sd_request(), &mut d, &mut |phase, done, _| {
        if phase == Phase::Denoise && done > 0 {
            on_step(done)
        }
    }))?;
    assert_eq!(d.stats.local_steps + d.stats.remote_steps, sd_request().steps);
    assert_eq!(
        sd.unet.is_loaded(),
        d.stats.local_steps > 0,
        "the UNet is loaded exactly when a step ran here"
    );
    Ok(out.image)
}

#[test]
fn sd_offloaded_equals_local() {
    let models = models_dir(true);
    let w = start(&models, TOKEN);
    let mut p = pool(&[&w], TOKEN);
    let remote = sd_offloaded(&mut p, |_| {}, &mut |_| {}).unwrap();
    assert_eq!(remote, sd_local(), "offloaded image differs from the local one");
    let (sent, received) = p.traffic();
    eprintln!("sd: {sent} bytes sent, {received} received");
}

#[test]
fn wan_offloaded_equals_local_whole_and_blocks() {
    let models = models_dir(true);
    let w = start(&models, TOKEN);
    let local = pollster::block_on(wan(DenoiserLoad::Now).generate(&CpuBackend, &wan_request(), &mut |_, _, _| {}))
        .unwrap()
        .video;
    let wan = wan(DenoiserLoad::OnFirstUse);
    let package = DenoiserPackage::from_pipeline(&data().join("wan-tiny")).unwrap();
    let mut p = pool(&[&w], TOKEN);
    let mut whole = OffloadDenoiser::whole(&mut p, &package, &wan.transformer, DType::F32, false);
    let out = pollster::block_on(wan.generate_with(&CpuBackend, &wan_request(), &mut whole, &mut |_, _, _| {})).unwrap();
    assert_eq!(whole.stats.remote_steps, 3);
    drop(whole);
    assert_eq!(out.video, local, "whole-denoiser offload differs");
    assert!(!wan.transformer.is_loaded(), "a whole-denoiser offload loaded the DiT here");
    let mut blocks = OffloadDenoiser::blocks(&CpuBackend, &mut p, &package, &wan.transformer, 1..2, DType::F32).unwrap();
    let out = pollster::block_on(wan.generate_with(&CpuBackend, &wan_request(), &mut blocks, &mut |_, _, _| {})).unwrap();
    assert_eq!(blocks.stats.remote_steps, 3);
    drop(blocks);
    assert_eq!(out.video, local, "block offload differs");
    let bad = OffloadDenoiser::blocks(&CpuBackend, &mut p, &package, &wan.transformer, 1..3, DType::F32)
        .err()
        .unwrap();
    assert!(bad.to_string().contains("2 blocks"), "{bad}");
}

#[test]
fn cfg_parallel_over_two_workers_matches_local() {
    let models = models_dir(true);
    let (a, b) = (start(&models, TOKEN), start(&models, TOKEN));
    let mut p = pool(&[&a, &b], TOKEN);
    let remote = sd_offloaded(&mut p, |_| {}, &mut |_| {}).unwrap();
    let local = sd_local();
    // Each branch alone is a batch of one, locally they run as a batch of two: the CPU
    // backend computes every row the same way, so the image is the same to the bit.
    assert_eq!(remote, local);
    let (sent_a, sent_b) = p.traffic();
    assert!(sent_a > 0 && sent_b > 0);
}

#[test]
fn killed_worker_mid_job_finishes_on_another_with_identical_output() {
    let models = models_dir(true);
    let (a, b) = (start(&models, TOKEN), start(&models, TOKEN));
    let mut p = pool(&[&a, &b], TOKEN);
    let image = sd_offloaded(&mut p, |d| d.cfg_parallel = false, &mut |step| {
        if step == 2 {
            a.running.close();
        }
    })
    .unwrap();
    assert_eq!(image, sd_local());
}

#[test]
fn no_worker_left_falls_back_to_local_or_fails_loudly() {
    let models = models_dir(true);
    let a = start(&models, TOKEN);
    let mut p = pool(&[&a], TOKEN);
    let image = sd_offloaded(&mut p, |_| {}, &mut |step| {
        if step == 1 {
            a.running.close();
        }
    })
    .unwrap();
    assert_eq!(image, sd_local());
    let b = start(&models, TOKEN);
    let mut p = pool(&[&b], TOKEN);
    let err = sd_offloaded(&mut p, |d| d.fallback = false, &mut |step| {
        if step == 1 {
            b.running.close();
        }
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("no worker could take step 2"), "{err}");
}

#[test]
fn wrong_token_and_wrong_fingerprint_are_refused() {
    let models = models_dir(true);
    let w = start(&models, TOKEN);
    let mut p = pool(&[&w], "not-the-token");
    let err = sd_offloaded(&mut p, |d| d.fallback = false, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("Unauthorized"), "{err}");

    let mut wrong = w.address.clone();
    wrong.pin = Some([7; 32]);
    let err = runtime()
        .block_on(WorkerLink::connect(&wrong, &client_options(TOKEN)))
        .err()
        .expect("a wrong pin must not connect")
        .to_string();
    assert!(err.contains("not the pinned"), "{err}");
}

#[test]
fn worker_without_the_model_receives_it_once() {
    let w = start(&models_dir(false), TOKEN);
    let package = DenoiserPackage::from_pipeline(&data().join("sd-tiny")).unwrap();
    let link = runtime().block_on(WorkerLink::connect(&w.address, &client_options(TOKEN))).unwrap();
    let ctx = HostText {
        states: HostTensor::from_f32(&[1, 4, 8], vec![0.0; 32]).unwrap(),
        last_repeats: 1,
    };
    let err = runtime()
        .block_on(link.open_job(package.hash, JobMode::Denoiser, DType::F32, 1.0, &ctx))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: ErrorCode::UnknownModel,
                ..
            }
        ),
        "{err}"
    );
    let mut p = pool(&[&w], TOKEN);
    assert_eq!(sd_offloaded(&mut p, |_| {}, &mut |_| {}).unwrap(), sd_local());
    assert!(runtime().block_on(link.has_model(package.hash)).unwrap());
}

/// Sends raw bytes as one request on a fresh stream and returns the worker's answer.
async fn raw_request(conn: &quinn::Connection, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    read_frame::<_, Response>(&mut recv, 1 << 20).await.unwrap().message
}

async fn encode(request: Request, version: u32, token: &str, tensors: &[TensorRef<'_>]) -> Vec<u8> {
    let mut out = vec![];
    let envelope = Envelope {
        version,
        token: token.into(),
        request,
    };
    write_frame(&mut out, &envelope, tensors).await.unwrap();
    out
}

#[test]
fn bad_frames_get_protocol_errors_and_the_worker_keeps_serving() {
    let w = start(&models_dir(true), TOKEN);
    let link = runtime().block_on(WorkerLink::connect(&w.address, &client_options(TOKEN))).unwrap();
    let conn = link.connection.clone();
    let code = |r: Response| match r {
        Response::Failed { code, .. } => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    runtime().block_on(async {
        let has = Request::HasModel { model: ModelHash([0; 32]) };
        assert_eq!(code(raw_request(&conn, b"GET / HTTP/1.1\r\n\r\n").await), ErrorCode::Malformed);
        assert_eq!(code(raw_request(&conn, b"SDLT").await), ErrorCode::Malformed);
        assert_eq!(
            code(raw_request(&conn, &[b'S', b'D', b'L', b'T', 0xff, 0xff, 0xff, 0x7f]).await),
            ErrorCode::FrameTooLarge
        );
        assert_eq!(
            code(raw_request(&conn, &encode(has.clone(), PROTOCOL_VERSION + 1, TOKEN, &[]).await).await),
            ErrorCode::Version
        );
        assert_eq!(
            code(raw_request(&conn, &encode(has.clone(), PROTOCOL_VERSION, "", &[]).await).await),
            ErrorCode::Unauthorized
        );
        // A tensor whose header claims more elements than the frame carries.
        let mut lying = encode(
            Request::Echo,
            PROTOCOL_VERSION,
            TOKEN,
            &[TensorRef {
                dtype: DType::F32,
                shape: &[4],
                bytes: &[0; 16],
            }],
        )
        .await;
        lying.truncate(lying.len() - 8);
        assert_eq!(code(raw_request(&conn, &lying).await), ErrorCode::Malformed);
        // A tensor over the frame limit is refused from its header alone: an echo of two
        // values whose header is patched to claim 2^29 (2 GiB of f32).
        let mut huge = encode(
            Request::Echo,
            PROTOCOL_VERSION,
            TOKEN,
            &[TensorRef {
                dtype: DType::F32,
                shape: &[2],
                bytes: &[0; 8],
            }],
        )
        .await;
        let dim_at = huge.len() - 8 - 8;
        assert_eq!(huge[dim_at..dim_at + 8], 2u64.to_le_bytes());
        huge[dim_at..dim_at + 8].copy_from_slice(&(1u64 << 29).to_le_bytes());
        assert_eq!(code(raw_request(&conn, &huge).await), ErrorCode::FrameTooLarge);
        assert_eq!(
            code(
                raw_request(
                    &conn,
                    &encode(Request::Step { job: 9, timestep: 0.0 }, PROTOCOL_VERSION, TOKEN, &[]).await
                )
                .await
            ),
            ErrorCode::UnknownJob
        );
        let open = |model: ModelHash, last_repeats: u64| Request::OpenJob {
            model,
            mode: JobMode::Denoiser,
            dtype: sdlite_remote::protocol::WireDType::F32,
            cfg_scale: 1.0,
            last_repeats,
        };
        let ctx = HostTensor::from_f32(&[3, 4, 8], vec![0.0; 96]).unwrap();
        assert_eq!(
            code(
                raw_request(
                    &conn,
                    &encode(open(ModelHash([1; 32]), 1), PROTOCOL_VERSION, TOKEN, &[(&ctx).into()]).await
                )
                .await
            ),
            ErrorCode::BadTensor
        );
        // A text position standing for none, and the UNet (which attends to each position
        // as given) asked to read one as several.
        let sd = DenoiserPackage::from_pipeline(&data().join("sd-tiny")).unwrap().hash;
        let sd_text = HostTensor::from_f32(&[1, 4, 32], vec![0.0; 128]).unwrap();
        for last_repeats in [0, 3] {
            let request = encode(open(sd, last_repeats), PROTOCOL_VERSION, TOKEN, &[(&sd_text).into()]).await;
            assert_eq!(code(raw_request(&conn, &request).await), ErrorCode::BadTensor, "{last_repeats}");
        }
        // Still serving, on the same connection and on new ones.
        assert!(!link.has_model(ModelHash([0; 32])).await.unwrap());
        let again = WorkerLink::connect(&w.address, &client_options(TOKEN)).await.unwrap();
        assert_eq!(again.echo(&ctx).await.map(|_| ()).ok(), Some(()));
    });
}

/// What the page does, natively: a WebTransport session pinned by certificate hash (with the
/// browser's rules for such certificates, which wtransport's client enforces too), one
/// bidirectional stream per request.
struct WebTransportLink {
    connection: wtransport::Connection,
    token: String,
}

impl WebTransportLink {
    async fn connect(w: &TestWorker, path: &str, token: &str) -> Result<Self, String> {
        let wt = w.running.webtransport.as_ref().expect("WebTransport enabled");
        let hash = *wt.fingerprint.lock().unwrap();
        let config = wtransport::ClientConfig::builder()
            .with_bind_default()
            .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(hash)])
            .build();
        let url = format!("https://127.0.0.1:{}{path}", wt.local_addr.port());
        let endpoint = wtransport::Endpoint::client(config).map_err(|e| e.to_string())?;
        let connection = endpoint.connect(url).await.map_err(|e| e.to_string())?;
        Ok(Self {
            connection,
            token: token.into(),
        })
    }
}

impl Channel for WebTransportLink {
    fn label(&self) -> String {
        "webtransport".into()
    }

    fn token(&self) -> &str {
        &self.token
    }

    async fn exchange(&self, envelope: &Envelope, tensors: &[TensorRef<'_>]) -> sdlite_remote::Result<Frame<Response>> {
        let gone = |e: String| Error::Connection {
            worker: self.label(),
            detail: e,
        };
        let opening = self.connection.open_bi().await.map_err(|e| gone(e.to_string()))?;
        let (mut send, mut recv) = opening.await.map_err(|e| gone(e.to_string()))?;
        write_frame(&mut send, envelope, tensors).await?;
        // Like the page: end the request without waiting for acknowledgements (the worker
        // answers as soon as it has read the frame and may stop the stream before the FIN).
        let _ = send.quic_stream_mut().finish();
        read_frame(&mut recv, 1 << 30).await
    }
}

/// SD with the page's denoiser over `link`, its UNet deferred as the page loads it; `on_step`
/// runs after each denoising step. Also says whether the UNet was loaded in the end.
fn sd_over_channel(link: WebTransportLink, on_step: &mut dyn FnMut(usize)) -> (HostTensor, ChannelStats, Vec<String>, bool) {
    let sd = sd(DenoiserLoad::OnFirstUse);
    let package = DenoiserPackage::from_pipeline(&data().join("sd-tiny")).unwrap();
    let lines = std::sync::Mutex::new(vec![]);
    let log = |l: String| lines.lock().unwrap().push(l);
    let mut d = ChannelDenoiser::new(Some((link, &package)), &sd.unet, DType::F32, &log);
    let image = runtime().block_on(async {
        let out = sd
            .generate_with(&CpuBackend, &sd_request(), &mut d, &mut |phase, done, _| {
                if phase == Phase::Denoise && done > 0 {
                    on_step(done)
                }
            })
            .await
            .unwrap();
        d.finish().await;
        out.image
    });
    let stats = d.stats.clone();
    drop(d);
    (image, stats, lines.into_inner().unwrap(), sd.unet.is_loaded())
}

#[test]
fn browser_sessions_over_webtransport_upload_step_and_fall_back() {
    let w = start_with(&models_dir(false), TOKEN, |o| {
        o.webtransport = Some("127.0.0.1:0".parse().unwrap());
    });
    let local = sd_local();

    let err = runtime()
        .block_on(WebTransportLink::connect(&w, "/elsewhere", TOKEN))
        .err()
        .expect("only the sdlite path is served");
    assert!(err.contains("rejected"), "{err}");

    // A wrong token: the worker refuses the job and the steps run here.
    let link = runtime()
        .block_on(WebTransportLink::connect(&w, WEBTRANSPORT_PATH, "wrong"))
        .unwrap();
    let (image, stats, log, loaded) = sd_over_channel(link, &mut |_| {});
    assert_eq!(image, local);
    assert_eq!((stats.remote_steps, stats.local_steps), (0, 4), "{log:?}");
    assert!(loaded, "the steps ran here without the UNet?");
    assert!(stats.failure.unwrap_or_default().contains("Unauthorized"), "{log:?}");

    // The worker lacks the model: it is uploaded, then every step runs there.
    let link = runtime().block_on(WebTransportLink::connect(&w, WEBTRANSPORT_PATH, TOKEN)).unwrap();
    let (image, stats, log, loaded) = sd_over_channel(link, &mut |_| {});
    assert_eq!(image, local, "the worker's image differs from the local one");
    assert_eq!((stats.remote_steps, stats.local_steps), (4, 0), "{log:?}");
    assert!(!loaded, "every step ran on the worker, yet the page loaded its UNet");
    assert!(log.iter().any(|l| l.contains("uploading")), "{log:?}");

    // The worker dies after step 2: the rest runs here, to the same image.
    let link = runtime().block_on(WebTransportLink::connect(&w, WEBTRANSPORT_PATH, TOKEN)).unwrap();
    let (image, stats, log, loaded) = sd_over_channel(link, &mut |step| {
        if step == 2 {
            w.running.close();
        }
    });
    assert_eq!(image, local);
    assert_eq!((stats.remote_steps, stats.local_steps), (2, 2), "{log:?}");
    assert!(loaded);
    assert!(log.iter().any(|l| l.contains("failed at step 3")), "{log:?}");
}
