//! The offloading denoiser. The pipeline keeps the sampler and the latent; each step this
//! `Denoiser` sends the model input to the worker(s) holding the job and returns their guided
//! prediction. When a worker fails (gone, frozen past the idle timeout, refusing), the step is
//! repeated on another worker (the job reopened there with the conditioning the client kept),
//! and when none is left, on the local backend; the sampler never sees the difference, so the
//! result equals an uninterrupted run's on the same backend kind.
//!
//! Layouts: the whole guided denoiser on one worker (per step the latent goes out and the
//! guided prediction comes back: twice the latent on the wire), the two guidance branches on
//! two workers (CFG-parallel), or a range of DiT blocks (hidden tokens out and back).

use std::ops::Range;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sdlite_runtime::models::denoiser::{
    batch_input, guided_prediction, is_guided, Denoiser, DenoiserModel, HostText, OnDemand, TextContext,
};
use sdlite_runtime::models::guide;
use sdlite_runtime::models::wan_dit::WanDit;
use sdlite_runtime::{Backend, DType, HostData, HostTensor};

use crate::address::WorkerAddress;
use crate::channel::Channel;
use crate::client::{ClientOptions, WorkerLink};
use crate::error::{Error, Result};
use crate::model_id::DenoiserPackage;
use crate::protocol::JobMode;

/// `--offload`: where the denoiser runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OffloadMode {
    Off,
    /// Measure the first step here and remotely, keep the faster.
    Auto,
    Denoiser,
    /// DiT blocks `A..B` remotely, the rest here.
    Blocks(Range<usize>),
}

impl FromStr for OffloadMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            "denoiser" => Ok(Self::Denoiser),
            _ => {
                let range = s
                    .strip_prefix("blocks=")
                    .and_then(|r| r.split_once(".."))
                    .and_then(|(a, b)| Some(a.parse::<usize>().ok()?..b.parse::<usize>().ok()?))
                    .filter(|r| r.start < r.end);
                range
                    .map(Self::Blocks)
                    .ok_or_else(|| format!("`{s}`: expected off, auto, denoiser or blocks=A..B (A < B, block indices)"))
            }
        }
    }
}

/// Cancels remote work: closes every worker connection (the workers drop the jobs and skip
/// their queued steps) and makes the next step fail with `Cancelled`.
#[derive(Clone, Default)]
pub struct Canceller {
    flag: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<quinn::Connection>>>,
}

impl Canceller {
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        for c in self.connections.lock().expect("connections").iter() {
            c.close(2u32.into(), b"cancelled by the client");
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

struct Slot {
    address: WorkerAddress,
    link: Option<Arc<WorkerLink>>,
    failed: Option<String>,
    jobs: usize,
}

pub type Log = Arc<dyn Fn(String) + Send + Sync>;

/// The workers a client may use, connected on first use; one that fails is not used again.
pub struct Pool {
    runtime: tokio::runtime::Runtime,
    options: ClientOptions,
    slots: Vec<Slot>,
    canceller: Canceller,
    log: Log,
}

impl Pool {
    pub fn new(addresses: Vec<WorkerAddress>, options: ClientOptions, log: Log) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(crate::error::io_err("tokio runtime"))?;
        let slots = addresses
            .into_iter()
            .map(|address| Slot {
                address,
                link: None,
                failed: None,
                jobs: 0,
            })
            .collect();
        Ok(Self {
            runtime,
            options,
            slots,
            canceller: Canceller::default(),
            log,
        })
    }

    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Bytes sent and received over all connections so far.
    pub fn traffic(&self) -> (u64, u64) {
        self.slots.iter().filter_map(|s| s.link.as_ref()).fold((0, 0), |(s, r), l| {
            (
                s + l.traffic.sent.load(Ordering::Relaxed),
                r + l.traffic.received.load(Ordering::Relaxed),
            )
        })
    }

    /// Workers not known to have failed, least loaded first.
    fn candidates(&self) -> Vec<usize> {
        let mut c: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].failed.is_none()).collect();
        c.sort_by_key(|&i| self.slots[i].jobs);
        c
    }

    fn link(&mut self, i: usize) -> Result<Arc<WorkerLink>> {
        if let Some(link) = &self.slots[i].link {
            return Ok(link.clone());
        }
        let link = Arc::new(self.runtime.block_on(WorkerLink::connect(&self.slots[i].address, &self.options))?);
        self.canceller
            .connections
            .lock()
            .expect("connections")
            .push(link.connection.clone());
        (self.log)(format!("connected to {} ({}, {})", link.address.label(), link.worker, link.backend));
        self.slots[i].link = Some(link.clone());
        Ok(link)
    }

    fn fail(&mut self, i: usize, why: &Error) {
        let slot = &mut self.slots[i];
        if let Some(link) = slot.link.take() {
            link.connection.close(3u32.into(), b"failed");
        }
        slot.failed = Some(why.to_string());
        (self.log)(format!("worker {} is out: {why}", slot.address.label()));
    }

    /// Why each failed worker is out, for the final error.
    fn failures(&self) -> String {
        let reasons: Vec<String> = self
            .slots
            .iter()
            .filter_map(|s| s.failed.as_ref().map(|f| format!("{}: {f}", s.address.label())))
            .collect();
        if reasons.is_empty() {
            "no workers given".into()
        } else {
            reasons.join("; ")
        }
    }
}

/// One job's placement on a worker: which context rows it holds.
struct Placement {
    slot: usize,
    link: Arc<WorkerLink>,
    job: u64,
}

struct JobInputs<B: Backend> {
    text: TextContext<B>,
    text_host: HostText,
    cfg_scale: f32,
    /// The DiT's projected text, for block jobs (read on the first step).
    projected: Option<HostText>,
}

/// What an offloaded run did, for the summary line and the benchmark.
#[derive(Clone, Debug, Default)]
pub struct OffloadStats {
    pub remote_steps: usize,
    pub local_steps: usize,
    pub retries: usize,
    /// Time from sending a step to having its answer, summed over remote steps.
    pub remote_time: Duration,
    /// The workers' own compute time for those steps (the slowest placement per step).
    pub worker_compute: Duration,
}

/// A `Denoiser` that runs the model on the pool's workers.
pub struct OffloadDenoiser<'a, B: Backend, M> {
    pool: &'a mut Pool,
    package: &'a DenoiserPackage,
    local: &'a OnDemand<B, M>,
    blocks: Option<(&'a WanDit<B>, Range<usize>)>,
    dtype: DType,
    /// Split the guidance branches over two workers when two are available.
    pub cfg_parallel: bool,
    /// Send the weights to a worker that lacks them.
    pub upload: bool,
    /// Continue on the local backend when no worker is left (otherwise fail).
    pub fallback: bool,
    undecided_auto: bool,
    local_only: bool,
    job: Option<JobInputs<B>>,
    placements: Vec<Placement>,
    pub stats: OffloadStats,
}

impl<'a, B: Backend, M: DenoiserModel<B>> OffloadDenoiser<'a, B, M> {
    /// The whole denoiser remotely (`mode` Denoiser or Auto); `local` is the model for
    /// fallback and for auto's comparison, loaded only if one of them happens.
    pub fn whole(pool: &'a mut Pool, package: &'a DenoiserPackage, local: &'a OnDemand<B, M>, dtype: DType, auto: bool) -> Self {
        Self {
            pool,
            package,
            local,
            blocks: None,
            dtype,
            cfg_parallel: true,
            upload: true,
            fallback: true,
            undecided_auto: auto,
            local_only: false,
            job: None,
            placements: vec![],
            stats: OffloadStats::default(),
        }
    }
}

impl<'a, B: Backend> OffloadDenoiser<'a, B, WanDit<B>> {
    /// DiT blocks `range` remotely, the rest on `dit` here (loaded now).
    pub fn blocks(
        b: &B,
        pool: &'a mut Pool,
        package: &'a DenoiserPackage,
        local: &'a OnDemand<B, WanDit<B>>,
        range: Range<usize>,
        dtype: DType,
    ) -> Result<Self> {
        let dit = local.get(b)?;
        if range.end > dit.num_blocks() {
            return Err(Error::Runtime(sdlite_runtime::Error::Invalid(format!(
                "--offload blocks={}..{}: the model has {} blocks",
                range.start,
                range.end,
                dit.num_blocks()
            ))));
        }
        let mut d = Self::whole(pool, package, local, dtype, false);
        d.blocks = Some((dit, range));
        d.cfg_parallel = false;
        Ok(d)
    }
}

/// Rows `rows` of a host tensor.
fn host_rows(t: &HostTensor, rows: Range<usize>) -> HostTensor {
    let per_row = t.data.as_bytes().len() / t.shape[0].max(1);
    let bytes = &t.data.as_bytes()[rows.start * per_row..rows.end * per_row];
    let mut shape = t.shape.clone();
    shape[0] = rows.len();
    HostTensor::new(&shape, HostData::from_bytes(t.data.dtype(), bytes)).expect("row slice of a valid tensor")
}

fn runtime_err(e: Error) -> sdlite_runtime::Error {
    match e {
        Error::Cancelled => sdlite_runtime::Error::Cancelled,
        Error::Runtime(e) => e,
        e => sdlite_runtime::Error::Offload(e.to_string()),
    }
}

impl<B: Backend, M: DenoiserModel<B>> OffloadDenoiser<'_, B, M> {
    fn log(&self, line: String) {
        (self.pool.log)(line)
    }

    fn close_placements(&mut self) {
        for p in self.placements.drain(..) {
            self.pool.slots[p.slot].jobs -= 1;
            let link = p.link.clone();
            self.pool.handle().spawn(async move { link.close_job(p.job).await });
        }
    }

    /// Opens the job on a worker, sending the weights first when it lacks them.
    fn open(&mut self, link: &WorkerLink, mode: JobMode, text: &HostText, cfg_scale: f32) -> Result<u64> {
        let (package, dtype, upload) = (self.package, self.dtype, self.upload);
        let log = self.pool.log.clone();
        let label = link.address.label();
        let mut announced = false;
        let mut last = Instant::now();
        let mut progress = |sent: u64, total: u64| {
            if !std::mem::replace(&mut announced, true) {
                let gib = total as f64 / (1u64 << 30) as f64;
                log(format!("{label} lacks model {}: uploading {gib:.2} GiB once", package.hash));
            }
            if last.elapsed() > Duration::from_secs(5) {
                last = Instant::now();
                log(format!("upload: {:.0}%", 100.0 * sent as f64 / total.max(1) as f64));
            }
        };
        self.pool
            .block_on(link.open_job_or_upload(package, mode, dtype, cfg_scale, text, upload, &mut progress))
    }

    /// Places the job on workers; false when no worker would take it.
    fn place(&mut self, mode: JobMode) -> Result<bool> {
        let job = self.job.as_ref().expect("begin before predict");
        let text = match mode {
            JobMode::Denoiser => job.text_host.clone(),
            JobMode::Blocks => job.projected.clone().expect("projected text read before placing"),
        };
        let cfg_scale = job.cfg_scale;
        let rows = text.states.shape[0];
        loop {
            let candidates = self.pool.candidates();
            if candidates.is_empty() {
                return Ok(false);
            }
            let split = self.cfg_parallel && rows == 2 && candidates.len() >= 2;
            // Row ranges, one per worker: both rows together, or one each.
            #[expect(clippy::single_range_in_vec_init, reason = "a list of one row range, not of the rows")]
            let groups = if split { vec![0..1, 1..2] } else { vec![0..rows] };
            let mut failed = false;
            for (g, rows) in groups.into_iter().enumerate() {
                let slot = candidates[g];
                let (part, cfg) = if split {
                    let states = host_rows(&text.states, rows.clone());
                    let last_repeats = text.last_repeats;
                    (HostText { states, last_repeats }, 1.0)
                } else {
                    (text.clone(), cfg_scale)
                };
                let opened = self
                    .pool
                    .link(slot)
                    .and_then(|link| Ok((self.open(&link, mode, &part, cfg)?, link)));
                match opened {
                    Ok((job, link)) => {
                        self.pool.slots[slot].jobs += 1;
                        self.placements.push(Placement { slot, link, job });
                    }
                    Err(Error::Cancelled) => return Err(Error::Cancelled),
                    Err(e) => {
                        self.pool.fail(slot, &e);
                        failed = true;
                        break;
                    }
                }
            }
            if !failed {
                if split {
                    self.log("CFG-parallel: negative prompt and prompt on two workers".into());
                }
                return Ok(true);
            }
            self.close_placements();
        }
    }

    /// The remote result, or `None` when the step has to run here. Retries on other workers.
    fn remote<T>(
        &mut self,
        step: usize,
        mode: JobMode,
        mut attempt: impl FnMut(&Pool, &[Placement]) -> std::result::Result<(T, Duration), (usize, Error)>,
    ) -> Result<Option<T>> {
        loop {
            if self.pool.canceller.is_cancelled() {
                return Err(Error::Cancelled);
            }
            if self.local_only {
                return Ok(None);
            }
            if self.placements.is_empty() && !self.place(mode)? {
                if !self.fallback {
                    return Err(Error::Runtime(sdlite_runtime::Error::Offload(format!(
                        "no worker could take step {}: {}",
                        step + 1,
                        self.pool.failures()
                    ))));
                }
                self.log(format!("no worker left; continuing on the local backend from step {}", step + 1));
                self.local_only = true;
                return Ok(None);
            }
            let start = Instant::now();
            match attempt(self.pool, &self.placements) {
                Ok((out, compute)) => {
                    self.stats.remote_steps += 1;
                    self.stats.remote_time += start.elapsed();
                    self.stats.worker_compute += compute;
                    return Ok(Some(out));
                }
                Err(_) if self.pool.canceller.is_cancelled() => return Err(Error::Cancelled),
                Err((slot, e)) => {
                    self.log(format!(
                        "step {} failed on {}; repeating it elsewhere",
                        step + 1,
                        self.pool.slots[slot].address.label()
                    ));
                    self.pool.fail(slot, &e);
                    self.close_placements();
                    self.stats.retries += 1;
                }
            }
        }
    }

    async fn predict_whole(&mut self, b: &B, step: usize, input: &HostTensor, timestep: f32) -> Result<Vec<f32>> {
        let started = Instant::now();
        let remote = self.remote(step, JobMode::Denoiser, |pool, placements| {
            let tasks: Vec<_> = placements
                .iter()
                .map(|p| {
                    let (link, job, input) = (p.link.clone(), p.job, input.clone());
                    (p.slot, pool.handle().spawn(async move { link.step(job, &input, timestep).await }))
                })
                .collect();
            let mut outs = vec![];
            let mut compute = Duration::ZERO;
            for (slot, task) in tasks {
                let out = pool
                    .block_on(task)
                    .unwrap_or_else(|e| {
                        Err(Error::Connection {
                            worker: String::new(),
                            detail: e.to_string(),
                        })
                    })
                    .map_err(|e| (slot, e))?;
                compute = compute.max(out.compute);
                outs.extend_from_slice(&out.tensor.data.to_f32());
            }
            Ok((outs, compute))
        })?;
        let cfg_scale = self.job.as_ref().expect("begun").cfg_scale;
        let pred = match remote {
            Some(outs) if self.placements.len() == 2 => guide(outs, true, cfg_scale),
            Some(out) => out,
            None => {
                self.stats.local_steps += 1;
                return self.local_prediction(b, input, timestep).await;
            }
        };
        if std::mem::take(&mut self.undecided_auto) {
            let remote_time = started.elapsed();
            // Loading is not part of a step's time.
            self.local.get(b)?;
            let here = Instant::now();
            self.local_prediction(b, input, timestep).await?;
            let local_time = here.elapsed();
            let (sent, received) = self.pool.traffic();
            let offload = remote_time < local_time;
            self.log(format!(
                "auto: step 1 took {:.3} s here and {:.3} s through the worker(s) ({:.3} s of it their compute, {:.1} MB on the wire): {}",
                local_time.as_secs_f64(),
                remote_time.as_secs_f64(),
                self.stats.worker_compute.as_secs_f64(),
                (sent + received) as f64 / 1e6,
                if offload { "offloading the denoiser" } else { "running locally" }
            ));
            if !offload {
                self.local_only = true;
                self.close_placements();
            }
        }
        Ok(pred)
    }

    async fn local_prediction(&self, b: &B, input: &HostTensor, timestep: f32) -> Result<Vec<f32>> {
        let job = self.job.as_ref().expect("begun");
        if !self.local.is_loaded() {
            self.log("loading the denoiser's weights here".into());
        }
        Ok(guided_prediction(b, self.local.get(b)?, &job.text, job.cfg_scale, self.dtype, input, timestep).await?)
    }
}

impl<B: Backend, M: DenoiserModel<B>> OffloadDenoiser<'_, B, M> {
    async fn predict_blocks(&mut self, b: &B, step: usize, input: &HostTensor, timestep: f32) -> Result<Vec<f32>> {
        let (dit, range) = self.blocks.clone().expect("block offload");
        let (text, cfg_scale) = {
            let job = self.job.as_ref().expect("begun");
            (job.text.clone(), job.cfg_scale)
        };
        let rows = text.rows();
        let x = batch_input(b, input, rows, self.dtype)?;
        let mut state = dit.embed(b, &x, &vec![timestep; rows], &text)?;
        state.hidden = dit.run_blocks(b, state.hidden, &state.blocks, 0..range.start)?;
        if self.job.as_ref().expect("begun").projected.is_none() {
            let projected = dit.project_text(b, &text)?.read(b).await?;
            self.job.as_mut().expect("begun").projected = Some(projected);
        }
        let hidden = b.read(&state.hidden).await?;
        let modulation = b.read(&state.blocks.modulation).await?;
        let grid = state.grid;
        let r = range.clone();
        let remote = self.remote(step, JobMode::Blocks, |pool, placements| {
            let p = &placements[0];
            pool.block_on(p.link.blocks(p.job, &hidden, &modulation, r.clone(), grid))
                .map(|o| (o.tensor, o.compute))
                .map_err(|e| (p.slot, e))
        })?;
        state.hidden = match remote {
            Some(h) => b.upload(&h)?,
            None => {
                self.stats.local_steps += 1;
                dit.run_blocks(b, state.hidden, &state.blocks, range.clone())?
            }
        };
        state.hidden = dit.run_blocks(b, state.hidden, &state.blocks, range.end..dit.num_blocks())?;
        let pred = b.read(&dit.head(b, &state)?).await?.to_f32();
        Ok(guide(pred, is_guided(rows, cfg_scale), cfg_scale))
    }
}

impl<B: Backend, M: DenoiserModel<B>> Denoiser<B> for OffloadDenoiser<'_, B, M> {
    async fn begin(&mut self, b: &B, text: &TextContext<B>, cfg_scale: f32) -> sdlite_runtime::Result<()> {
        self.close_placements();
        let text_host = text.read(b).await?;
        self.job = Some(JobInputs {
            text: text.clone(),
            text_host,
            cfg_scale,
            projected: None,
        });
        Ok(())
    }

    async fn predict(&mut self, b: &B, step: usize, input: &HostTensor, timestep: f32) -> sdlite_runtime::Result<Vec<f32>> {
        let prediction = if self.blocks.is_some() {
            self.predict_blocks(b, step, input, timestep).await
        } else {
            self.predict_whole(b, step, input, timestep).await
        };
        prediction.map_err(runtime_err)
    }
}

impl<B: Backend, M> Drop for OffloadDenoiser<'_, B, M> {
    fn drop(&mut self) {
        for p in self.placements.drain(..) {
            let link = p.link.clone();
            let _ = self
                .pool
                .block_on(async move { tokio::time::timeout(Duration::from_secs(2), link.close_job(p.job)).await });
        }
    }
}
