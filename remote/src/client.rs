//! One client connection to a worker over QUIC: every request (`channel::Channel`) opens a
//! stream, sends one frame and reads one answer, under a timeout. A worker that dies or freezes
//! is noticed by QUIC's idle timeout (keep-alives run underneath), one that answers nothing by
//! the request timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdlite_runtime::HostTensor;

use crate::address::WorkerAddress;
use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::frame::{read_frame, write_frame, Frame, TensorRef, DEFAULT_MAX_FRAME_BYTES};
use crate::protocol::{Envelope, Request, Response};
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
        let info = link.hello().await?;
        link.worker = info.worker;
        link.backend = info.backend;
        Ok(link)
    }

    /// Round-trip time of sending `payload` and getting it back.
    pub async fn echo(&self, payload: &HostTensor) -> Result<Duration> {
        let start = Instant::now();
        self.call(Request::Echo, &[payload.into()]).await?;
        Ok(start.elapsed())
    }
}

impl Channel for WorkerLink {
    fn label(&self) -> String {
        self.address.label()
    }

    fn token(&self) -> &str {
        &self.token
    }

    /// One stream per request, under the request timeout.
    async fn exchange(&self, envelope: &Envelope, tensors: &[TensorRef<'_>]) -> Result<Frame<Response>> {
        let label = self.address.label();
        let exchange = async {
            let (mut send, mut recv) = self.connection.open_bi().await.map_err(|e| Error::Connection {
                worker: label.clone(),
                detail: e.to_string(),
            })?;
            let sent = write_frame(&mut send, envelope, tensors).await?;
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
        // A stream error on a closed connection is the connection's fault: say why it closed.
        match (result, self.connection.close_reason()) {
            (Err(_), Some(reason)) => Err(Error::Connection {
                worker: label,
                detail: reason.to_string(),
            }),
            (result, _) => result,
        }
    }
}
