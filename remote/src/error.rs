use crate::protocol::ErrorCode;

/// Every failure of the offload layer. Protocol violations carry the code the worker answers
/// with, so a peer learns exactly what it did wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame that breaks the protocol (ours to decode or the peer's answer).
    #[error("{code}: {detail}")]
    Frame { code: ErrorCode, detail: String },
    /// The worker answered with an error.
    #[error("worker {worker} refused: {code}: {message}")]
    Refused { worker: String, code: ErrorCode, message: String },
    /// The connection or a stream failed (worker gone, stalled past the idle timeout, reset).
    #[error("worker {worker}: {detail}")]
    Connection { worker: String, detail: String },
    #[error("worker {worker} did not answer within {secs} s")]
    Timeout { worker: String, secs: u64 },
    #[error("bad worker address `{address}`: {detail}")]
    Address { address: String, detail: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Runtime(#[from] sdlite_runtime::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn frame_err(code: ErrorCode, detail: impl Into<String>) -> Error {
    Error::Frame {
        code,
        detail: detail.into(),
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn io_err(path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_string();
    move |source| Error::Io { path, source }
}
