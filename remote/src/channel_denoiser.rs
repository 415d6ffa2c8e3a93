//! A `Denoiser` that sends every step to one worker over a `Channel` and, when the worker fails
//! (gone, refusing, answering nonsense), repeats that step and runs the rest on the local
//! model: the sampler sees the same predictions either way, so the result is the local run's
//! up to the backends' rounding. It needs no threads or timers, which is what the browser has;
//! the native pool with retries over several workers and CFG-parallel is `offload`.

use sdlite_runtime::models::denoiser::{Denoiser, DenoiserModel, HostText, LocalDenoiser, OnDemand, TextContext};
use sdlite_runtime::{Backend, DType, HostTensor};

use crate::channel::Channel;
use crate::error::Error;
use crate::model_id::DenoiserPackage;
use crate::protocol::JobMode;

/// Steps done where, and why the worker was given up, for the caller's summary.
#[derive(Clone, Debug, Default)]
pub struct ChannelStats {
    pub remote_steps: usize,
    pub local_steps: usize,
    /// The error that ended remote work, if one did.
    pub failure: Option<String>,
}

pub struct ChannelDenoiser<'a, C, B: Backend, M> {
    /// The worker and the weights it must run; `None` when there is none or once it failed.
    remote: Option<(C, &'a DenoiserPackage)>,
    local: LocalDenoiser<'a, B, M>,
    dtype: DType,
    /// Send the weights to a worker that lacks them.
    pub upload: bool,
    log: &'a dyn Fn(String),
    job: Option<(HostText, f32)>,
    opened: Option<u64>,
    pub stats: ChannelStats,
}

impl<'a, C: Channel, B: Backend, M: DenoiserModel<B>> ChannelDenoiser<'a, C, B, M> {
    /// `remote`: the worker and `local`'s weights under their hash (`None`: every step here);
    /// `log` receives one line per event (connection, upload, failure).
    pub fn new(remote: Option<(C, &'a DenoiserPackage)>, local: &'a OnDemand<B, M>, dtype: DType, log: &'a dyn Fn(String)) -> Self {
        Self {
            remote,
            local: LocalDenoiser::new(local, dtype),
            dtype,
            upload: true,
            log,
            job: None,
            opened: None,
            stats: ChannelStats::default(),
        }
    }

    /// Closes the worker's job, if one is open (the worker also drops it when the session ends).
    pub async fn finish(&mut self) {
        if let (Some((channel, _)), Some(job)) = (&self.remote, self.opened.take()) {
            let _ = channel.close_job(job).await;
        }
    }

    /// The worker's prediction for this step.
    async fn remote(&mut self, input: &HostTensor, timestep: f32) -> Result<Vec<f32>, Error> {
        let (channel, package) = self.remote.as_ref().expect("called with a worker");
        let job = match self.opened {
            Some(job) => job,
            None => {
                let info = channel.hello().await?;
                (self.log)(format!("worker {}: {} on {}", channel.label(), info.worker, info.backend));
                let (text, cfg_scale) = self.job.as_ref().expect("begin before predict");
                let log = self.log;
                let mut announced = false;
                let mut progress = |sent: u64, total: u64| {
                    if !std::mem::replace(&mut announced, true) {
                        log(format!("the worker lacks this model: uploading {:.1} MB", total as f64 / 1e6));
                    }
                    if sent == total {
                        log("upload done".into());
                    }
                };
                let job = channel
                    .open_job_or_upload(package, JobMode::Denoiser, self.dtype, *cfg_scale, text, self.upload, &mut progress)
                    .await?;
                self.opened = Some(job);
                job
            }
        };
        Ok(channel.step(job, input, timestep).await?.tensor.data.to_f32().into_owned())
    }
}

impl<C: Channel, B: Backend, M: DenoiserModel<B>> Denoiser<B> for ChannelDenoiser<'_, C, B, M> {
    async fn begin(&mut self, b: &B, text: &TextContext<B>, cfg_scale: f32) -> sdlite_runtime::Result<()> {
        self.finish().await;
        self.local.begin(b, text, cfg_scale).await?;
        self.job = Some((text.read(b).await?, cfg_scale));
        Ok(())
    }

    async fn predict(&mut self, b: &B, step: usize, input: &HostTensor, timestep: f32) -> sdlite_runtime::Result<Vec<f32>> {
        if self.remote.is_some() {
            match self.remote(input, timestep).await {
                Ok(prediction) => {
                    self.stats.remote_steps += 1;
                    return Ok(prediction);
                }
                Err(e) => {
                    (self.log)(format!(
                        "the worker failed at step {}: {e}; continuing here from that step",
                        step + 1
                    ));
                    self.stats.failure = Some(e.to_string());
                    self.remote = None;
                    self.opened = None;
                }
            }
        }
        self.stats.local_steps += 1;
        self.local.predict(b, step, input, timestep).await
    }
}
