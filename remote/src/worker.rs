//! The worker: a QUIC endpoint (and, for browsers, a WebTransport one) that answers one request
//! per bidirectional stream and runs the compute on one thread that owns the engine (and so the
//! device). Both endpoints speak the same frames with the same token rule; a WebTransport
//! stream is a QUIC stream behind an HTTP/3 session, so past the session handshake one code
//! path serves both. Requests wait in a bounded
//! queue for that thread, so a busy worker slows its clients down instead of buffering without
//! end; QUIC's per-connection stream limit bounds what each client can have in flight.
//!
//! Nothing a peer sends stops the worker: a bad frame, token or tensor gets an error answer on
//! its stream and the connection, and every other one, keeps being served. A connection that
//! closes takes its jobs with it; its queued steps are dropped unrun.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sdlite_runtime::models::denoiser::HostText;
use sdlite_runtime::HostTensor;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, Failure};
use crate::error::{Error, Result};
use crate::frame::{read_frame, runtime_dtype, write_frame, Frame, TensorRef, DEFAULT_MAX_FRAME_BYTES};
use crate::model_id::{canonical_config, ModelHasher};
use crate::protocol::{DenoiserKind, Envelope, ErrorCode, ModelHash, Request, Response, PROTOCOL_VERSION};
use crate::tls::{server_config, webtransport_config, Identity, LinkOptions};

/// The path of the WebTransport session URL: `https://HOST:PORT/sdlite`.
pub const WEBTRANSPORT_PATH: &str = "/sdlite";

/// How long the WebTransport certificate is used before a fresh one replaces it: browsers pin
/// certificates by hash only when they are valid for two weeks at most.
pub const WEBTRANSPORT_RENEWAL: Duration = Duration::from_secs(12 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The bearer token every request but `Hello` must carry.
    pub token: String,
    pub max_frame_bytes: u64,
    /// Bytes of weights one connection may stage for an upload.
    pub max_upload_bytes: u64,
    /// Requests waiting for the compute thread, over all connections.
    pub queue: usize,
    pub link: LinkOptions,
    pub name: String,
    /// Where to accept WebTransport sessions (browsers), if anywhere.
    pub webtransport: Option<SocketAddr>,
}

impl WorkerOptions {
    pub fn new(token: String) -> Self {
        Self {
            token,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_upload_bytes: 32 << 30,
            queue: 16,
            link: LinkOptions::default(),
            name: "sdlite worker".into(),
            webtransport: None,
        }
    }
}

type Work<E> = Box<dyn FnOnce(&mut E) + Send>;

/// The compute thread's inbox.
struct Compute<E> {
    tx: mpsc::Sender<Work<E>>,
}

impl<E: Engine> Compute<E> {
    async fn run<R: Send + 'static>(&self, f: impl FnOnce(&mut E) -> R + Send + 'static) -> Option<R> {
        let (done, result) = oneshot::channel();
        let work: Work<E> = Box::new(move |e| {
            let _ = done.send(f(e));
        });
        self.tx.send(work).await.ok()?;
        result.await.ok()
    }
}

/// A running worker; dropping it does not stop it, `close` does.
pub struct RunningWorker {
    pub endpoint: quinn::Endpoint,
    pub local_addr: SocketAddr,
    pub fingerprint: [u8; 32],
    pub backend: String,
    pub webtransport: Option<RunningWebTransport>,
}

/// The WebTransport endpoint: browsers connect to `https://HOST:PORT/sdlite` pinning
/// `fingerprint` (`serverCertificateHashes`), which changes when the certificate is renewed.
pub struct RunningWebTransport {
    pub local_addr: SocketAddr,
    pub fingerprint: Arc<Mutex<[u8; 32]>>,
    endpoint: Arc<wtransport::Endpoint<wtransport::endpoint::endpoint_side::Server>>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl RunningWorker {
    /// Closes every connection at once (clients see the worker gone) and stops accepting.
    pub fn close(&self) {
        if let Some(wt) = &self.webtransport {
            // The accept loop must stop first: wtransport's accept panics on a closed endpoint.
            wt.tasks.iter().for_each(|t| t.abort());
            wt.endpoint.close(0u32.into(), b"worker shutting down");
        }
        self.endpoint.close(0u32.into(), b"worker shutting down");
    }
}

/// Starts a worker on `listen` inside the current tokio runtime. `make_engine` runs on the new
/// compute thread; `log` receives one line per event worth an operator's attention.
pub async fn start_worker<E: Engine>(
    listen: SocketAddr,
    identity: &Identity,
    options: WorkerOptions,
    make_engine: impl FnOnce() -> std::result::Result<E, String> + Send + 'static,
    log: Arc<dyn Fn(String) + Send + Sync>,
) -> Result<RunningWorker> {
    let (tx, mut rx) = mpsc::channel::<Work<E>>(options.queue.max(1));
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("sdlite-compute".into())
        .spawn(move || {
            let mut engine = match make_engine() {
                Ok(e) => {
                    let _ = ready_tx.send(Ok(e.describe()));
                    e
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Some(work) = rx.blocking_recv() {
                work(&mut engine);
            }
        })
        .map_err(|e| Error::Connection {
            worker: listen.to_string(),
            detail: format!("cannot start the compute thread: {e}"),
        })?;
    let backend = ready_rx
        .await
        .map_err(|_| Error::Cancelled)?
        .map_err(|e| Error::Runtime(sdlite_runtime::Error::Invalid(e)))?;
    let endpoint = quinn::Endpoint::server(server_config(identity, &options.link)?, listen).map_err(|e| Error::Connection {
        worker: listen.to_string(),
        detail: format!("cannot listen: {e}"),
    })?;
    let local_addr = endpoint.local_addr().map_err(crate::error::io_err(listen))?;
    let shared = Arc::new(Shared {
        compute: Compute { tx },
        options,
        backend: backend.clone(),
        log,
    });
    let webtransport = match shared.options.webtransport {
        Some(addr) => Some(start_webtransport(addr, shared.clone()).await?),
        None => None,
    };
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let peer = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => serve_connection(Session::Quic(conn), shared).await,
                    Err(e) => (shared.log)(format!("{peer}: handshake failed: {e}")),
                }
            });
        }
    });
    Ok(RunningWorker {
        fingerprint: identity.fingerprint(),
        endpoint,
        local_addr,
        backend,
        webtransport,
    })
}

/// Listens for WebTransport sessions on `addr` with a fresh short-lived certificate, renewed
/// every `WEBTRANSPORT_RENEWAL` (existing sessions keep theirs).
async fn start_webtransport<E: Engine>(addr: SocketAddr, shared: Arc<Shared<E>>) -> Result<RunningWebTransport> {
    let link = shared.options.link;
    let identity = Identity::short_lived(&["localhost".to_string()])?;
    let endpoint = wtransport::Endpoint::server(webtransport_config(addr, &identity, &link)?).map_err(|e| Error::Connection {
        worker: addr.to_string(),
        detail: format!("cannot listen for WebTransport: {e}"),
    })?;
    let endpoint = Arc::new(endpoint);
    let local_addr = endpoint.local_addr().map_err(crate::error::io_err(addr))?;
    let fingerprint = Arc::new(Mutex::new(identity.fingerprint()));
    let renew = {
        let (endpoint, fingerprint, log) = (endpoint.clone(), fingerprint.clone(), shared.log.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WEBTRANSPORT_RENEWAL).await;
                let renewed = Identity::short_lived(&["localhost".to_string()])
                    .and_then(|id| Ok((webtransport_config(local_addr, &id, &link)?, id.fingerprint())));
                match renewed {
                    Ok((config, hash)) => match endpoint.reload_config(config, false) {
                        Ok(()) => {
                            *fingerprint.lock().expect("fingerprint") = hash;
                            log(format!("WebTransport certificate renewed: sha256={}", crate::tls::hex(&hash)));
                        }
                        Err(e) => log(format!("WebTransport certificate renewal failed: {e}")),
                    },
                    Err(e) => log(format!("WebTransport certificate renewal failed: {e}")),
                }
            }
        })
    };
    let accept = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            loop {
                let incoming = endpoint.accept().await;
                let shared = shared.clone();
                tokio::spawn(async move {
                    let peer = incoming.remote_address();
                    let request = match incoming.await {
                        Ok(r) => r,
                        Err(e) => return (shared.log)(format!("{peer}: WebTransport handshake failed: {e}")),
                    };
                    if request.path().split('?').next() != Some(WEBTRANSPORT_PATH) {
                        (shared.log)(format!("{peer}: no WebTransport service at {}", request.path()));
                        return request.not_found().await;
                    }
                    match request.accept().await {
                        Ok(conn) => serve_connection(Session::WebTransport(conn), shared).await,
                        Err(e) => (shared.log)(format!("{peer}: WebTransport session failed: {e}")),
                    }
                });
            }
        })
    };
    Ok(RunningWebTransport {
        local_addr,
        fingerprint,
        endpoint,
        tasks: vec![renew.abort_handle(), accept.abort_handle()],
    })
}

/// A client's connection: native QUIC, or a browser's WebTransport session.
enum Session {
    Quic(quinn::Connection),
    WebTransport(wtransport::Connection),
}

/// One request's stream pair.
enum Streams {
    Quic(quinn::SendStream, quinn::RecvStream),
    WebTransport(wtransport::SendStream, wtransport::RecvStream),
}

impl Session {
    /// The QUIC connection underneath, for the peer's address and whether it is still open.
    fn quic(&self) -> &quinn::Connection {
        match self {
            Session::Quic(c) => c,
            Session::WebTransport(c) => c.quic_connection(),
        }
    }

    async fn accept(&self) -> Option<Streams> {
        match self {
            Session::Quic(c) => c.accept_bi().await.ok().map(|(s, r)| Streams::Quic(s, r)),
            Session::WebTransport(c) => c.accept_bi().await.ok().map(|(s, r)| Streams::WebTransport(s, r)),
        }
    }
}

impl Streams {
    /// The QUIC streams underneath: past the WebTransport stream header (which wtransport has
    /// read or written by now) the bytes are the same frames as on a native stream.
    fn quic(&mut self) -> (&mut quinn::SendStream, &mut quinn::RecvStream) {
        match self {
            Streams::Quic(s, r) => (s, r),
            Streams::WebTransport(s, r) => (s.quic_stream_mut(), r.quic_stream_mut()),
        }
    }
}

struct Shared<E> {
    compute: Compute<E>,
    options: WorkerOptions,
    backend: String,
    log: Arc<dyn Fn(String) + Send + Sync>,
}

/// An upload in progress on one connection.
struct Staging {
    model: ModelHash,
    kind: DenoiserKind,
    config: String,
    hasher: ModelHasher,
    tensors: Vec<(String, HostTensor)>,
    bytes: u64,
}

#[derive(Default)]
struct ConnState {
    jobs: HashSet<u64>,
    upload: Option<Staging>,
}

async fn serve_connection<E: Engine>(session: Session, shared: Arc<Shared<E>>) {
    let peer = session.quic().remote_address();
    let state = Arc::new(Mutex::new(ConnState::default()));
    while let Some(mut streams) = session.accept().await {
        let (shared, state, conn) = (shared.clone(), state.clone(), session.quic().clone());
        tokio::spawn(async move {
            let (send, recv) = streams.quic();
            handle_stream(send, recv, &shared, &state, &conn).await
        });
    }
    let jobs: Vec<u64> = state.lock().expect("connection state").jobs.drain().collect();
    if !jobs.is_empty() {
        (shared.log)(format!("{peer}: disconnected, dropping {} job(s)", jobs.len()));
    }
    for job in jobs {
        shared.compute.run(move |e| e.close_job(job)).await;
    }
}

/// What goes back on a stream.
struct Answer {
    response: Response,
    tensors: Vec<HostTensor>,
}

impl Answer {
    fn plain(response: Response) -> Self {
        Self { response, tensors: vec![] }
    }

    fn failed((code, message): Failure) -> Self {
        Self::plain(Response::Failed { code, message })
    }
}

async fn handle_stream<E: Engine>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    shared: &Shared<E>,
    state: &Mutex<ConnState>,
    conn: &quinn::Connection,
) {
    let answer = match read_frame::<_, Envelope>(recv, shared.options.max_frame_bytes).await {
        Ok(frame) => dispatch(frame, shared, state, conn).await,
        Err(Error::Frame { code, detail }) => {
            (shared.log)(format!("{}: refused a frame: {code}: {detail}", conn.remote_address()));
            let _ = recv.stop(1u32.into());
            Answer::failed((code, detail))
        }
        Err(e) => Answer::failed((ErrorCode::Malformed, e.to_string())),
    };
    let refs: Vec<TensorRef> = answer.tensors.iter().map(TensorRef::from).collect();
    if write_frame(send, &answer.response, &refs).await.is_ok() {
        let _ = send.finish();
    }
}

fn tokens_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn expect_tensors(tensors: &[HostTensor], n: usize, what: &str) -> std::result::Result<(), Failure> {
    if tensors.len() == n {
        Ok(())
    } else {
        Err((
            ErrorCode::BadTensor,
            format!("{what} takes {n} tensor(s), the frame has {}", tensors.len()),
        ))
    }
}

async fn dispatch<E: Engine>(frame: Frame<Envelope>, shared: &Shared<E>, state: &Mutex<ConnState>, conn: &quinn::Connection) -> Answer {
    let Frame { message, mut tensors, .. } = frame;
    if message.request == Request::Hello {
        return Answer::plain(Response::Hello {
            version: PROTOCOL_VERSION,
            worker: shared.options.name.clone(),
            backend: shared.backend.clone(),
        });
    }
    if message.version != PROTOCOL_VERSION {
        return Answer::failed((
            ErrorCode::Version,
            format!(
                "this worker speaks protocol {PROTOCOL_VERSION}, the request is version {}",
                message.version
            ),
        ));
    }
    if !tokens_equal(&message.token, &shared.options.token) {
        (shared.log)(format!("{}: refused a request with a wrong token", conn.remote_address()));
        return Answer::failed((ErrorCode::Unauthorized, "missing or wrong token".into()));
    }
    let owns = |job: u64| state.lock().expect("connection state").jobs.contains(&job);
    let unknown_job = |job: u64| Answer::failed((ErrorCode::UnknownJob, format!("no job {job} on this connection")));
    let live = conn.clone();
    let result: std::result::Result<Answer, Failure> = async {
        match message.request {
            Request::Hello => unreachable!("answered above"),
            Request::OpenJob {
                model,
                mode,
                dtype,
                cfg_scale,
                last_repeats,
            } => {
                expect_tensors(&tensors, 1, "OpenJob")?;
                let last_repeats = usize::try_from(last_repeats)
                    .map_err(|_| (ErrorCode::BadTensor, format!("a text position standing for {last_repeats}")))?;
                let text = HostText {
                    states: tensors.remove(0),
                    last_repeats,
                };
                let job = shared
                    .compute
                    .run(move |e| e.open_job(model, mode, runtime_dtype(dtype), cfg_scale, text))
                    .await
                    .ok_or((ErrorCode::Compute, "the compute thread is gone".to_string()))??;
                state.lock().expect("connection state").jobs.insert(job);
                (shared.log)(format!(
                    "{}: job {job:016x} opened ({mode:?}, model {model})",
                    conn.remote_address()
                ));
                Ok(Answer::plain(Response::JobOpened { job }))
            }
            Request::Step { job, timestep } => {
                if !owns(job) {
                    return Ok(unknown_job(job));
                }
                expect_tensors(&tensors, 1, "Step")?;
                let input = tensors.remove(0);
                run_timed(shared, live, move |e| e.step(job, input, timestep)).await
            }
            Request::Blocks { job, start, end, grid } => {
                if !owns(job) {
                    return Ok(unknown_job(job));
                }
                expect_tensors(&tensors, 2, "Blocks")?;
                let modulation = tensors.pop().expect("two tensors");
                let hidden = tensors.pop().expect("two tensors");
                let grid = grid.map(|g| g as usize);
                run_timed(shared, live, move |e| {
                    e.blocks(job, hidden, modulation, start as usize..end as usize, grid)
                })
                .await
            }
            Request::CloseJob { job } => {
                if state.lock().expect("connection state").jobs.remove(&job) {
                    shared.compute.run(move |e| e.close_job(job)).await;
                }
                Ok(Answer::plain(Response::Done))
            }
            Request::HasModel { model } => {
                let has = shared.compute.run(move |e| e.has_model(&model)).await.unwrap_or(false);
                Ok(Answer::plain(Response::HasModel(has)))
            }
            Request::UploadBegin { model, kind, config } => {
                let canonical = canonical_config(kind, &config, "uploaded config").map_err(|e| (ErrorCode::Upload, e.to_string()))?;
                state.lock().expect("connection state").upload = Some(Staging {
                    model,
                    kind,
                    hasher: ModelHasher::new(kind, &canonical),
                    config: canonical,
                    tensors: vec![],
                    bytes: 0,
                });
                Ok(Answer::plain(Response::Done))
            }
            Request::UploadTensor { model, name } => {
                expect_tensors(&tensors, 1, "UploadTensor")?;
                let t = tensors.remove(0);
                let mut st = state.lock().expect("connection state");
                let staging = st
                    .upload
                    .as_mut()
                    .filter(|s| s.model == model)
                    .ok_or((ErrorCode::Upload, format!("no upload of {model} begun on this connection")))?;
                staging.bytes += t.data.as_bytes().len() as u64;
                if staging.bytes > shared.options.max_upload_bytes {
                    st.upload = None;
                    return Err((
                        ErrorCode::Upload,
                        format!("upload over this worker's limit of {} bytes", shared.options.max_upload_bytes),
                    ));
                }
                staging
                    .hasher
                    .tensor(&name, t.data.dtype(), &t.shape, t.data.as_bytes())
                    .map_err(|e| (ErrorCode::Upload, e))?;
                staging.tensors.push((name, t));
                Ok(Answer::plain(Response::Done))
            }
            Request::UploadFinish { model } => {
                let staging = state
                    .lock()
                    .expect("connection state")
                    .upload
                    .take()
                    .filter(|s| s.model == model)
                    .ok_or((ErrorCode::Upload, format!("no upload of {model} begun on this connection")))?;
                let got = staging.hasher.finish();
                if got != model {
                    return Err((ErrorCode::Upload, format!("the uploaded weights hash to {got}, not {model}")));
                }
                let count = staging.tensors.len();
                shared
                    .compute
                    .run(move |e| e.add_model(model, staging.kind, &staging.config, &staging.tensors))
                    .await
                    .ok_or((ErrorCode::Compute, "the compute thread is gone".to_string()))??;
                (shared.log)(format!(
                    "{}: stored uploaded model {model} ({count} tensors)",
                    conn.remote_address()
                ));
                Ok(Answer::plain(Response::Done))
            }
            Request::Echo => Ok(Answer {
                response: Response::Output { compute_us: 0 },
                tensors: std::mem::take(&mut tensors),
            }),
        }
    }
    .await;
    result.unwrap_or_else(Answer::failed)
}

/// Runs `f` on the compute thread unless the connection closed while it waited, and answers
/// with its output and the compute time.
async fn run_timed<E: Engine>(
    shared: &Shared<E>,
    conn: quinn::Connection,
    f: impl FnOnce(&mut E) -> std::result::Result<HostTensor, Failure> + Send + 'static,
) -> std::result::Result<Answer, Failure> {
    let result = shared
        .compute
        .run(move |e| {
            if conn.close_reason().is_some() {
                return Err((ErrorCode::Compute, "the client went away".to_string()));
            }
            let start = Instant::now();
            f(e).map(|t| (t, start.elapsed().as_micros() as u64))
        })
        .await
        .ok_or((ErrorCode::Compute, "the compute thread is gone".to_string()))??;
    Ok(Answer {
        response: Response::Output { compute_us: result.1 },
        tensors: vec![result.0],
    })
}
