//! `sdlite worker`, the offload options of `sdlite gen`, and `sdlite bench-offload`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sdlite_remote::channel::Channel;
use sdlite_remote::client::{ClientOptions, WorkerLink};
use sdlite_remote::engine::{Engine, Failure, ModelEngine};
use sdlite_remote::model_id::{DenoiserPackage, ModelStore};
use sdlite_remote::offload::{OffloadMode, OffloadStats, Pool};
use sdlite_remote::protocol::{DenoiserKind, ErrorCode, JobMode, ModelHash};
use sdlite_remote::tls::{hex, load_or_create_token, Identity, Trust};
use sdlite_remote::worker::{start_worker, WorkerOptions, WEBTRANSPORT_PATH};
use sdlite_remote::WorkerAddress;
use sdlite_runtime::models::denoiser::{DenoiserLoad, HostText};
use sdlite_runtime::{CpuBackend, CudaBackend, CudaOptions, DType, HostTensor};

use crate::gen::BackendKind;
use crate::DeviceArgs;

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// Address and UDP port to listen on.
    #[arg(long, default_value = "0.0.0.0:4433")]
    listen: SocketAddr,
    #[arg(long, value_enum, default_value_t = BackendKind::Wgpu)]
    backend: BackendKind,
    /// Folder of models to serve: diffusers pipeline folders, and where uploads are kept.
    #[arg(long)]
    models: PathBuf,
    /// Where the certificate, key and token live (default: MODELS/.sdlite-worker).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Bearer token clients must send (default: the one in the state folder, made on first start).
    #[arg(long, env = "SDLITE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Host names for the certificate made on first start.
    #[arg(long = "host-name", default_values_t = ["localhost".to_string()])]
    host_names: Vec<String>,
    /// Also accept browsers (the demo page) over WebTransport on this address and UDP port, with
    /// a short-lived certificate made at start and renewed every 12 days (its hash is printed).
    #[arg(long)]
    webtransport: Option<SocketAddr>,
    /// Denoisers kept loaded at once.
    #[arg(long, default_value_t = 2)]
    max_loaded: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    let state = args.state_dir.clone().unwrap_or_else(|| args.models.join(".sdlite-worker"));
    let (identity, made) = Identity::load_or_create(&state, &args.host_names)?;
    if made {
        eprintln!("made a self-signed certificate in {}", state.display());
    }
    let token = match args.token.clone() {
        Some(t) => t,
        None => {
            let (t, made) = load_or_create_token(&state)?;
            if made {
                eprintln!("made a token in {}/token: {t}", state.display());
            } else {
                eprintln!("token: in {}/token", state.display());
            }
            t
        }
    };
    let store = ModelStore::scan(&args.models, &mut |path, found| match found {
        Ok(p) => eprintln!("model {} {:?}: {}", p.hash, p.kind, path.display()),
        Err(e) => eprintln!("skipping {}: {e}", path.display()),
    })?;
    let runtime = tokio::runtime::Runtime::new()?;
    let log: Arc<dyn Fn(String) + Send + Sync> = Arc::new(|line| eprintln!("{line}"));
    let (backend, device, max_loaded) = (args.backend, args.device, args.max_loaded);
    let mut options = WorkerOptions::new(token);
    options.webtransport = args.webtransport;
    let running = runtime.block_on(start_worker(
        args.listen,
        &identity,
        options,
        move || -> std::result::Result<Box<dyn Engine>, String> {
            Ok(match backend {
                BackendKind::Cpu => Box::new(ModelEngine::new(CpuBackend, store, max_loaded)),
                BackendKind::Wgpu => Box::new(ModelEngine::new(device.open().map_err(|e| format!("{e:#}"))?, store, max_loaded)),
                BackendKind::Cuda => Box::new(ModelEngine::new(
                    CudaBackend::new(&CudaOptions::default()).map_err(|e| e.to_string())?,
                    store,
                    max_loaded,
                )),
            })
        },
        log,
    ))?;
    let port = running.local_addr.port();
    println!("listening on {} with {}", running.local_addr, running.backend);
    println!("fingerprint sha256={}", hex(&running.fingerprint));
    println!(
        "clients: sdlite gen --worker quic://HOST:{port}#sha256={} --token TOKEN ...",
        hex(&running.fingerprint)
    );
    if let Some(wt) = &running.webtransport {
        let hash = hex(&*wt.fingerprint.lock().expect("fingerprint"));
        println!("webtransport https://{}{WEBTRANSPORT_PATH} sha256={hash}", wt.local_addr);
        println!(
            "browsers: worker https://HOST:{}{WEBTRANSPORT_PATH}, certificate sha256={hash}, and the token",
            wt.local_addr.port()
        );
    }
    runtime.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    running.close();
    Ok(())
}

#[derive(clap::Args)]
pub struct OffloadArgs {
    /// A worker, `quic://host:port#sha256=FINGERPRINT` (as `sdlite worker` prints); repeat for a pool.
    #[arg(long = "worker")]
    workers: Vec<String>,
    /// A file with one worker address per line (# comments).
    #[arg(long)]
    workers_file: Option<PathBuf>,
    /// off, auto (measure the first step both ways), denoiser (the default with workers), or
    /// blocks=A..B (Wan DiT blocks A..B remotely).
    #[arg(long)]
    offload: Option<String>,
    /// The workers' bearer token.
    #[arg(long, env = "SDLITE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificates (PEM) for worker addresses without a fingerprint.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Never send the weights to a worker that lacks them.
    #[arg(long)]
    no_upload: bool,
    /// Fail instead of finishing on this machine when no worker is left.
    #[arg(long)]
    no_fallback: bool,
    /// Keep both guidance branches on one worker even when two are available.
    #[arg(long)]
    no_cfg_parallel: bool,
    /// Longest wait for one step's answer, in seconds.
    #[arg(long, default_value_t = 600)]
    worker_timeout: u64,
}

/// A configured offload for one `sdlite gen`.
pub struct Offload {
    pub pool: Pool,
    pub mode: OffloadMode,
    pub upload: bool,
    pub fallback: bool,
    pub cfg_parallel: bool,
}

impl OffloadArgs {
    /// `None` when everything runs here.
    pub fn setup(&self) -> Result<Option<Offload>> {
        let mut addresses = self.workers.clone();
        if let Some(file) = &self.workers_file {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            // One address per line; `#` starts a comment only at the beginning of a line, since
            // it also starts an address's fingerprint.
            addresses.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        let mode: OffloadMode = match &self.offload {
            Some(m) => m.parse().map_err(|e: String| anyhow::anyhow!("--offload {e}"))?,
            None if addresses.is_empty() => OffloadMode::Off,
            None => OffloadMode::Denoiser,
        };
        if mode == OffloadMode::Off {
            return Ok(None);
        }
        if addresses.is_empty() {
            bail!("--offload needs at least one --worker quic://host:port#sha256=... (or --workers-file)");
        }
        let addresses = addresses.iter().map(|a| WorkerAddress::parse(a)).collect::<Result<Vec<_>, _>>()?;
        let Some(token) = self.token.clone() else {
            bail!("offloading needs the workers' token: --token or SDLITE_TOKEN (sdlite worker prints where it keeps it)");
        };
        let mut options = ClientOptions::new(token);
        options.request_timeout = Duration::from_secs(self.worker_timeout);
        if let Some(ca) = &self.ca {
            options.roots = Some(Trust::roots_from_file(ca)?);
        }
        let pool = Pool::new(addresses, options, Arc::new(|line| eprintln!("offload: {line}")))?;
        let canceller = pool.canceller();
        pool.handle().spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                canceller.cancel();
                eprintln!("\ncancelled: the workers' jobs are closed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                std::process::exit(130);
            }
        });
        Ok(Some(Offload {
            pool,
            mode,
            upload: !self.no_upload,
            fallback: !self.no_fallback,
            cfg_parallel: !self.no_cfg_parallel,
        }))
    }
}

/// When the pipeline loads its own denoiser: a client that offloads the whole denoiser needs
/// it only on fallback (or for auto's first-step timing); split DiT blocks run partly here.
pub fn denoiser_load(offload: &Option<Offload>) -> DenoiserLoad {
    match offload.as_ref().map(|o| &o.mode) {
        Some(OffloadMode::Denoiser | OffloadMode::Auto) => DenoiserLoad::OnFirstUse,
        _ => DenoiserLoad::Now,
    }
}

/// The denoiser package of the model being run, hashed (timed, since it reads every weight).
pub fn package(make: impl FnOnce() -> sdlite_remote::Result<DenoiserPackage>) -> Result<DenoiserPackage> {
    let start = Instant::now();
    let p = make()?;
    eprintln!(
        "denoiser {} ({:.2} GiB, hashed in {:.1} s)",
        p.hash,
        p.weight_bytes() as f64 / (1u64 << 30) as f64,
        start.elapsed().as_secs_f64()
    );
    Ok(p)
}

pub fn report(stats: &OffloadStats, pool: &Pool) {
    let (sent, received) = pool.traffic();
    let steps = stats.remote_steps.max(1) as f64;
    eprintln!(
        "offload: {} step(s) remote, {} here, {} retried; per remote step {:.3} s seen here, {:.3} s worker compute; {:.2} MB sent, {:.2} MB received",
        stats.remote_steps,
        stats.local_steps,
        stats.retries,
        stats.remote_time.as_secs_f64() / steps,
        stats.worker_compute.as_secs_f64() / steps,
        sent as f64 / 1e6,
        received as f64 / 1e6
    );
}

/// Stands in for a worker's model in `bench-offload`: answers each step after a fixed compute
/// time with a tensor of the right shape, so the link's cost at full size can be measured
/// without the full-size model.
struct SimulatedEngine {
    compute: Duration,
}

impl Engine for SimulatedEngine {
    fn describe(&self) -> String {
        format!("simulated compute of {:?} per call", self.compute)
    }
    fn has_model(&self, _: &ModelHash) -> bool {
        true
    }
    fn open_job(&mut self, _: ModelHash, _: JobMode, _: DType, _: f32, _: HostText) -> Result<u64, Failure> {
        Ok(1)
    }
    fn step(&mut self, _: u64, input: HostTensor, _: f32) -> Result<HostTensor, Failure> {
        std::thread::sleep(self.compute);
        Ok(input)
    }
    fn blocks(
        &mut self,
        _: u64,
        hidden: HostTensor,
        _: HostTensor,
        _: std::ops::Range<usize>,
        _: [usize; 3],
    ) -> Result<HostTensor, Failure> {
        std::thread::sleep(self.compute);
        Ok(hidden)
    }
    fn close_job(&mut self, _: u64) {}
    fn add_model(&mut self, _: ModelHash, _: DenoiserKind, _: &str, _: &[(String, HostTensor)]) -> Result<(), Failure> {
        Err((ErrorCode::Upload, "simulated".into()))
    }
}

/// `sdlite bench-offload`: traffic and overhead of offloading full-size Wan2.1-1.3B steps at
/// 81x480x832 over loopback, against a worker whose compute time per step is given.
pub fn bench_offload(step_ms: u64, steps: usize) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let identity = Identity::generate(&["localhost".into()])?;
    let compute = Duration::from_millis(step_ms);
    let running = runtime.block_on(start_worker(
        "127.0.0.1:0".parse()?,
        &identity,
        WorkerOptions::new("bench".into()),
        move || Ok(SimulatedEngine { compute }),
        Arc::new(|_| {}),
    ))?;
    let address = WorkerAddress {
        host: "127.0.0.1".into(),
        port: running.local_addr.port(),
        pin: Some(running.fingerprint),
    };
    let link = runtime.block_on(WorkerLink::connect(&address, &ClientOptions::new("bench".into())))?;
    // Wan2.1-1.3B at 81 frames 480x832: latent [1, 16, 21, 60, 104]; DiT tokens 21*30*52 = 32,760
    // of width 1536; UMT5 text [2, 512, 4096]; guidance doubles the rows.
    let latent = HostTensor::from_f32(&[1, 16, 21, 60, 104], vec![0.5; 16 * 21 * 60 * 104])?;
    let hidden = HostTensor::from_f32(&[2, 32760, 1536], vec![0.5; 2 * 32760 * 1536])?;
    let modulation = HostTensor::from_f32(&[2, 6, 1536], vec![0.5; 2 * 6 * 1536])?;
    let context = HostText {
        states: HostTensor::from_f32(&[2, 512, 4096], vec![0.5; 2 * 512 * 4096])?,
        last_repeats: 1,
    };
    let latent_bytes = latent.data.as_bytes().len() as f64;
    println!(
        "offload over loopback, full-size Wan2.1-1.3B 81x480x832, simulated worker compute {step_ms} ms per step, {steps} steps (latent {:.1} MB)",
        latent_bytes / 1e6
    );
    println!(
        "{:>10} | {:>14} | {:>10} | {:>12} | {:>12} | {:>9}",
        "layout", "bytes/step MB", "x latent", "step seen ms", "overhead ms", "overhead"
    );
    for mode in [JobMode::Denoiser, JobMode::Blocks] {
        let job = runtime.block_on(link.open_job(ModelHash([0; 32]), mode, DType::F32, 5.0, &context))?;
        let before =
            link.traffic.sent.load(std::sync::atomic::Ordering::Relaxed) + link.traffic.received.load(std::sync::atomic::Ordering::Relaxed);
        let (mut seen, mut worker) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..steps {
            let start = Instant::now();
            let out = match mode {
                JobMode::Denoiser => runtime.block_on(link.step(job, &latent, 500.0))?,
                JobMode::Blocks => runtime.block_on(link.blocks(job, &hidden, &modulation, 0..30, [21, 30, 52]))?,
            };
            seen += start.elapsed();
            worker += out.compute;
        }
        let after =
            link.traffic.sent.load(std::sync::atomic::Ordering::Relaxed) + link.traffic.received.load(std::sync::atomic::Ordering::Relaxed);
        let per_step = (after - before) as f64 / steps as f64;
        let overhead = (seen.saturating_sub(worker)).as_secs_f64() / steps as f64;
        let compute = worker.as_secs_f64() / steps as f64;
        println!(
            "{:>10} | {:>14.1} | {:>10.2} | {:>12.1} | {:>12.1} | {:>8.2}%",
            format!("{mode:?}").to_lowercase(),
            per_step / 1e6,
            per_step / latent_bytes,
            seen.as_secs_f64() * 1e3 / steps as f64,
            overhead * 1e3,
            100.0 * overhead / compute
        );
    }
    running.close();
    Ok(())
}
