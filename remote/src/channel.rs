//! The requests a client makes of a worker, over any transport that carries one request frame
//! and one answer frame per exchange: a QUIC stream (`client::WorkerLink`) or, in the browser,
//! a WebTransport stream. Both ends of every request are here once, so the native client and
//! the page cannot drift apart.

use std::ops::Range;
use std::time::Duration;

use sdlite_runtime::models::denoiser::HostText;
use sdlite_runtime::{DType, HostTensor};

use crate::error::{Error, Result};
use crate::frame::{wire_dtype, Frame, TensorRef};
use crate::model_id::{sorted_names, DenoiserPackage};
use crate::protocol::{Envelope, ErrorCode, JobMode, ModelHash, Request, Response, PROTOCOL_VERSION};

/// A result tensor and the worker's compute time for it.
pub struct Output {
    pub tensor: HostTensor,
    pub compute: Duration,
}

/// What the worker said about itself in answer to `Hello`.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub worker: String,
    pub backend: String,
}

/// A link to one worker. Implementors carry frames; the provided methods are the protocol.
// The browser's futures are not `Send` (they wait on JavaScript promises), so the trait cannot
// promise it; native callers still get `Send` futures from their concrete implementation.
#[allow(async_fn_in_trait)]
pub trait Channel {
    /// The worker, for messages.
    fn label(&self) -> String;

    /// The bearer token sent with every request.
    fn token(&self) -> &str;

    /// Sends one request frame and reads the answer frame.
    async fn exchange(&self, envelope: &Envelope, tensors: &[TensorRef<'_>]) -> Result<Frame<Response>>;

    /// One request and its answer; a `Failed` answer becomes `Error::Refused`.
    async fn call(&self, request: Request, tensors: &[TensorRef<'_>]) -> Result<Frame<Response>> {
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            token: self.token().to_string(),
            request,
        };
        match self.exchange(&envelope, tensors).await? {
            Frame {
                message: Response::Failed { code, message },
                ..
            } => Err(Error::Refused {
                worker: self.label(),
                code,
                message,
            }),
            frame => Ok(frame),
        }
    }

    /// Exchanges versions; an error when the worker speaks another protocol.
    async fn hello(&self) -> Result<WorkerInfo> {
        match self.call(Request::Hello, &[]).await?.message {
            Response::Hello { version, worker, backend } if version == PROTOCOL_VERSION => Ok(WorkerInfo { worker, backend }),
            Response::Hello { version, .. } => Err(Error::Refused {
                worker: self.label(),
                code: ErrorCode::Version,
                message: format!("the worker speaks protocol {version}, this client {PROTOCOL_VERSION}"),
            }),
            other => Err(unexpected(self, "Hello", &other)),
        }
    }

    async fn open_job(&self, model: ModelHash, mode: JobMode, dtype: DType, cfg_scale: f32, text: &HostText) -> Result<u64> {
        let request = Request::OpenJob {
            model,
            mode,
            dtype: wire_dtype(dtype),
            cfg_scale,
            last_repeats: text.last_repeats as u64,
        };
        match self.call(request, &[(&text.states).into()]).await?.message {
            Response::JobOpened { job } => Ok(job),
            other => Err(unexpected(self, "OpenJob", &other)),
        }
    }

    /// Opens a job, first sending the weights when the worker lacks them and `upload` allows
    /// it; `progress(sent, total)` follows the upload.
    #[allow(clippy::too_many_arguments)]
    async fn open_job_or_upload(
        &self,
        package: &DenoiserPackage,
        mode: JobMode,
        dtype: DType,
        cfg_scale: f32,
        text: &HostText,
        upload: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        match self.open_job(package.hash, mode, dtype, cfg_scale, text).await {
            Err(Error::Refused {
                code: ErrorCode::UnknownModel,
                ..
            }) if upload => {
                self.upload(package, progress).await?;
                self.open_job(package.hash, mode, dtype, cfg_scale, text).await
            }
            other => other,
        }
    }

    /// One guided prediction: the worker's answer must have the input's shape.
    async fn step(&self, job: u64, input: &HostTensor, timestep: f32) -> Result<Output> {
        let frame = self.call(Request::Step { job, timestep }, &[input.into()]).await?;
        let out = output(self, frame)?;
        if out.tensor.shape != input.shape {
            return Err(Error::Connection {
                worker: self.label(),
                detail: format!("answered a {:?} step with {:?}", input.shape, out.tensor.shape),
            });
        }
        Ok(out)
    }

    async fn blocks(
        &self,
        job: u64,
        hidden: &HostTensor,
        modulation: &HostTensor,
        range: Range<usize>,
        grid: [usize; 3],
    ) -> Result<Output> {
        let request = Request::Blocks {
            job,
            start: range.start as u32,
            end: range.end as u32,
            grid: grid.map(|g| g as u32),
        };
        let out = output(self, self.call(request, &[hidden.into(), modulation.into()]).await?)?;
        if out.tensor.shape != hidden.shape {
            return Err(Error::Connection {
                worker: self.label(),
                detail: format!("answered hidden {:?} with {:?}", hidden.shape, out.tensor.shape),
            });
        }
        Ok(out)
    }

    async fn close_job(&self, job: u64) -> Result<()> {
        self.call(Request::CloseJob { job }, &[]).await.map(|_| ())
    }

    async fn has_model(&self, model: ModelHash) -> Result<bool> {
        match self.call(Request::HasModel { model }, &[]).await?.message {
            Response::HasModel(has) => Ok(has),
            other => Err(unexpected(self, "HasModel", &other)),
        }
    }

    /// Sends the package's weights, tensor by tensor in name order; `progress(sent, total)`.
    async fn upload(&self, package: &DenoiserPackage, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let model = package.hash;
        let begin = Request::UploadBegin {
            model,
            kind: package.kind,
            config: package.config.clone(),
        };
        self.call(begin, &[]).await?;
        let total = package.weight_bytes();
        let mut sent = 0;
        for name in sorted_names(&package.weights) {
            let (dtype, shape, bytes) = package.weights.raw(name)?;
            let request = Request::UploadTensor {
                model,
                name: name.to_string(),
            };
            self.call(request, &[TensorRef { dtype, shape, bytes }]).await?;
            sent += bytes.len() as u64;
            progress(sent, total);
        }
        self.call(Request::UploadFinish { model }, &[]).await.map(|_| ())
    }
}

fn unexpected<C: Channel + ?Sized>(channel: &C, request: &str, answer: &Response) -> Error {
    Error::Connection {
        worker: channel.label(),
        detail: format!("unexpected answer to {request}: {answer:?}"),
    }
}

fn output<C: Channel + ?Sized>(channel: &C, frame: Frame<Response>) -> Result<Output> {
    match (frame.message, frame.tensors.len()) {
        (Response::Output { compute_us }, 1) => Ok(Output {
            tensor: frame.tensors.into_iter().next().expect("one tensor"),
            compute: Duration::from_micros(compute_us),
        }),
        (other, n) => Err(Error::Connection {
            worker: channel.label(),
            detail: format!("unexpected answer {other:?} with {n} tensors"),
        }),
    }
}
