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
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file that cannot be read as safetensors, or a tensor in it that does not
    /// fit what the model needs.
    #[error("{file}: {detail}")]
    Checkpoint { file: String, detail: String },
    #[error("{file}: tensor `{tensor}` is missing")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: tensor `{tensor}` has shape {got:?}, the model expects {expected:?}")]
    TensorShape {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{file}: {detail}")]
    Config { file: String, detail: String },
    #[error("tokenizer {file}: {detail}")]
    Tokenizer { file: String, detail: String },
    #[error("{0}")]
    Invalid(String),
    /// A denoiser that runs elsewhere failed and nothing could take its work over.
    #[error("offload: {0}")]
    Offload(String),
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape { op, detail: detail.into() }
}

pub(crate) fn checkpoint_err(file: &str, detail: impl Into<String>) -> Error {
    Error::Checkpoint {
        file: file.to_string(),
        detail: detail.into(),
    }
}

pub(crate) fn config_err(file: &str, detail: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_string(),
        detail: detail.into(),
    }
}
