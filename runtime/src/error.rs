use crate::tensor::DType;

/// Every failure the runtime reports. Messages name the tensor, op or limit involved so a
/// user can act on them; no runtime path panics on bad input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: dtype {dtype:?} is not supported by the {backend} backend")]
    UnsupportedDType { op: &'static str, dtype: DType, backend: String },
    #[error("host data for a tensor of shape {shape:?} needs {expected} elements, got {got}")]
    DataLength { shape: Vec<usize>, expected: usize, got: usize },
    #[error(
        "{op}: {what} ({elems} elements) is too large for one dispatch window under the adapter's binding limit of {limit_bytes} bytes"
    )]
    TooLarge {
        op: &'static str,
        what: String,
        elems: usize,
        limit_bytes: u64,
    },
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),
    #[error("GPU device request failed: {0}")]
    Device(String),
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("reading a tensor back from the GPU failed: {0}")]
    Readback(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape { op, detail: detail.into() }
}
