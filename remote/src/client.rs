//! One client connection to a worker: every call opens a stream, sends one frame and reads one
//! answer, under a timeout. A worker that dies or freezes is noticed by QUIC's idle timeout
//! (keep-alives run underneath), one that answers nothing by the request timeout.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdlite_runtime::{DType, HostTensor};

use crate::address::WorkerAddress;
use crate::error::{Error, Result};
use crate::frame::{read_frame, wire_dtype, write_frame, Frame, TensorRef, DEFAULT_MAX_FRAME_BYTES};
use crate::model_id::{sorted_names, DenoiserPackage};
use crate::protocol::{Envelope, ErrorCode, JobMode, ModelHash, Request, Response, PROTOCOL_VERSION};
use crate::tls::{client_config, LinkOptions, Trust};

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub token: String,
    /// CA roots for addresses without a pinned fingerprint.
    pub roots: Option<Trust>,
    pub link: LinkOptions,
    /// Longest wait for one answer (a step of a large model on a slow worker included).
    pub request_timeout: Duration,
    pub max_frame_bytes: u64,
}

impl ClientOptions {
    pub fn new(token: String) -> Self {
        Self {
            token,
            roots: None,
            link: LinkOptions::default(),
            request_timeout: Duration::from_secs(600),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Bytes on the wire, both directions, frames included.
#[derive(Debug, Default)]
pub struct Traffic {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// A result tensor and the worker's compute time for it.
pub struct Output {
    pub tensor: HostTensor,
    pub compute: Duration,
}

pub struct WorkerLink {
    pub address: WorkerAddress,
    pub connection: quinn::Connection,
    pub worker: String,
    pub backend: String,
    pub traffic: Arc<Traffic>,
    token: String,
    timeout: Duration,
    max_frame_bytes: u64,
}

impl WorkerLink {
    /// Connects, checks the certificate, and exchanges versions.
    pub async fn connect(address: &WorkerAddress, options: &ClientOptions) -> Result<Self> {
        let label = address.label();
        let conn_err = |detail: String| Error::Connection {
            worker: label.clone(),
            detail,
        };
        let trust = match (&address.pin, &options.roots) {
            (Some(pin), _) => Trust::Pinned(*pin),
            (None, Some(roots)) => roots.clone(),
            (None, None) => {
                return Err(Error::Address {
                    address: address.to_string(),
                    detail: "no #sha256= fingerprint to pin and no CA roots to check the worker's certificate against".into(),
                })
            }
        };
        let config = client_config(&trust, &options.link)?;
        let addr = tokio::net::lookup_host((address.host.as_str(), address.port))
            .await
            .map_err(|e| conn_err(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| conn_err("the host name resolves to no address".into()))?;
        let local: std::net::SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .expect("literal address");
        let endpoint = quinn::Endpoint::client(local).map_err(|e| conn_err(format!("cannot open a UDP socket: {e}")))?;
        let connecting = endpoint
            .connect_with(config, addr, &address.host)
            .map_err(|e| conn_err(e.to_string()))?;
        let connection = tokio::time::timeout(options.link.idle_timeout, connecting)
            .await
            .map_err(|_| conn_err("no answer to the QUIC handshake".into()))?
            .map_err(|e| conn_err(e.to_string()))?;
        let mut link = Self {
            address: address.clone(),
            connection,
            worker: String::new(),
            backend: String::new(),
            traffic: Arc::default(),
            token: options.token.clone(),
            timeout: options.request_timeout,
            max_frame_bytes: options.max_frame_bytes,
        };
        match link.call(Request::Hello, &[]).await?.message {
            Response::Hello { version, worker, backend } if version == PROTOCOL_VERSION => {
                link.worker = worker;
                link.backend = backend;
                Ok(link)
            }
            Response::Hello { version, .. } => Err(Error::Refused {
                worker: label,
                code: ErrorCode::Version,
                message: format!("the worker speaks protocol {version}, this client {PROTOCOL_VERSION}"),
            }),
            other => Err(conn_err(format!("unexpected answer to Hello: {other:?}"))),
        }
    }

    /// One request and its answer; a `Failed` answer becomes `Error::Refused`.
    pub async fn call(&self, request: Request, tensors: &[TensorRef<'_>]) -> Result<Frame<Response>> {
        let label = self.address.label();
        let exchange = async {
            let (mut send, mut recv) = self.connection.open_bi().await.map_err(|e| Error::Connection {
                worker: label.clone(),
                detail: e.to_string(),
            })?;
            let envelope = Envelope {
                version: PROTOCOL_VERSION,
                token: self.token.clone(),
                request,
            };
            let sent = write_frame(&mut send, &envelope, tensors).await?;
            let _ = send.finish();
            self.traffic.sent.fetch_add(sent, Ordering::Relaxed);
            let frame = read_frame::<_, Response>(&mut recv, self.max_frame_bytes).await?;
            self.traffic.received.fetch_add(frame.bytes, Ordering::Relaxed);
            Ok(frame)
        };
        let result = tokio::time::timeout(self.timeout, exchange).await.unwrap_or(Err(Error::Timeout {
            worker: label.clone(),
            secs: self.timeout.as_secs(),
        }));
        match result {
            Ok(Frame {
                message: Response::Failed { code, message },
                ..
            }) => Err(Error::Refused {
                worker: label,
                code,
                message,
            }),
            Ok(frame) => Ok(frame),
            // A stream error on a closed connection is the connection's fault: say why it closed.
            Err(e) => match self.connection.close_reason() {
                Some(reason) => Err(Error::Connection {
                    worker: label,
                    detail: reason.to_string(),
                }),
                None => Err(e),
            },
        }
    }

    fn output(&self, frame: Frame<Response>) -> Result<Output> {
        match (frame.message, frame.tensors.len()) {
            (Response::Output { compute_us }, 1) => Ok(Output {
                tensor: frame.tensors.into_iter().next().expect("one tensor"),
                compute: Duration::from_micros(compute_us),
            }),
            (other, n) => Err(Error::Connection {
                worker: self.address.label(),
                detail: format!("unexpected answer {other:?} with {n} tensors"),
            }),
        }
    }

    pub async fn open_job(&self, model: ModelHash, mode: JobMode, dtype: DType, cfg_scale: f32, context: &HostTensor) -> Result<u64> {
        let request = Request::OpenJob {
            model,
            mode,
            dtype: wire_dtype(dtype),
            cfg_scale,
        };
        match self.call(request, &[context.into()]).await?.message {
            Response::JobOpened { job } => Ok(job),
            other => Err(Error::Connection {
                worker: self.address.label(),
                detail: format!("unexpected answer to OpenJob: {other:?}"),
            }),
        }
    }

    pub async fn step(&self, job: u64, input: &HostTensor, timestep: f32) -> Result<Output> {
        let frame = self.call(Request::Step { job, timestep }, &[input.into()]).await?;
        let out = self.output(frame)?;
        if out.tensor.shape != input.shape {
            return Err(Error::Connection {
                worker: self.address.label(),
                detail: format!("answered a {:?} step with {:?}", input.shape, out.tensor.shape),
            });
        }
        Ok(out)
    }

    pub async fn blocks(
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
        let out = self.output(self.call(request, &[hidden.into(), modulation.into()]).await?)?;
        if out.tensor.shape != hidden.shape {
            return Err(Error::Connection {
                worker: self.address.label(),
                detail: format!("answered hidden {:?} with {:?}", hidden.shape, out.tensor.shape),
            });
        }
        Ok(out)
    }

    pub async fn close_job(&self, job: u64) -> Result<()> {
        self.call(Request::CloseJob { job }, &[]).await.map(|_| ())
    }

    pub async fn has_model(&self, model: ModelHash) -> Result<bool> {
        match self.call(Request::HasModel { model }, &[]).await?.message {
            Response::HasModel(has) => Ok(has),
            other => Err(Error::Connection {
                worker: self.address.label(),
                detail: format!("unexpected answer to HasModel: {other:?}"),
            }),
        }
    }

    /// Sends the package's weights, tensor by tensor in name order; `progress(sent, total)`.
    pub async fn upload(&self, package: &DenoiserPackage, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
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
            let tensor = TensorRef { dtype, shape, bytes };
            self.call(
                Request::UploadTensor {
                    model,
                    name: name.to_string(),
                },
                &[tensor],
            )
            .await?;
            sent += bytes.len() as u64;
            progress(sent, total);
        }
        self.call(Request::UploadFinish { model }, &[]).await.map(|_| ())
    }

    /// Round-trip time of sending `payload` and getting it back.
    pub async fn echo(&self, payload: &HostTensor) -> Result<Duration> {
        let start = Instant::now();
        self.call(Request::Echo, &[payload.into()]).await?;
        Ok(start.elapsed())
    }
}
