//! The wire protocol, version 2. Every request and response is one frame on its own QUIC
//! bidirectional stream:
//!
//! ```text
//! "SDLT" | header length: u32 LE | header: bincode (fixed-width LE ints) | tensor payloads
//! ```
//!
//! The header is a `Header<Envelope>` (requests) or `Header<Response>` (answers): the message
//! plus one `TensorDesc` per tensor that follows, whose bytes are the raw little-endian
//! elements in the described dtype and shape, back to back. Payloads never pass through
//! bincode, so a tensor is read from the socket straight into the buffer it is computed from.
//!
//! Every request carries the protocol version and the bearer token; a worker answers a
//! request with a wrong token with `Unauthorized`, except `Hello`, which anyone may send to
//! learn the worker's version.

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 2;
pub const MAGIC: [u8; 4] = *b"SDLT";
/// QUIC application protocol name (ALPN).
pub const ALPN: &[u8] = b"sdlite/2";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDType {
    F32,
    F16,
    BF16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDesc {
    pub dtype: WireDType,
    pub shape: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header<M> {
    pub message: M,
    pub tensors: Vec<TensorDesc>,
}

/// sha256 over a denoiser's kind, canonical config and tensors (see `model_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelHash(pub [u8; 32]);

impl std::fmt::Display for ModelHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DenoiserKind {
    /// Stable Diffusion's UNet (`UNet2DConditionModel`).
    Unet,
    /// Wan2.1's transformer (`WanTransformer3DModel`).
    WanDit,
}

/// What a job's steps compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobMode {
    /// The whole denoiser with guidance: the job's tensor is the text embeddings
    /// `[rows, seq, text_dim]`; each `Step` sends one latent and gets the guided prediction.
    Denoiser,
    /// A range of DiT blocks: the job's tensor is the projected text `[rows, seq, dim]`; each
    /// `Blocks` sends hidden tokens and modulation and gets the hidden tokens back.
    Blocks,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    pub token: String,
    pub request: Request,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Version handshake; needs no token. Answer: `Hello`.
    Hello,
    /// Tensors: the context, whose last position stands for `last_repeats` equal positions
    /// (1: each position is its own; Wan's padding travels as one). Answer: `JobOpened`.
    OpenJob {
        model: ModelHash,
        mode: JobMode,
        dtype: WireDType,
        cfg_scale: f32,
        last_repeats: u64,
    },
    /// Tensors: the model input `[1, ...]`. Answer: `Output` with the guided prediction.
    Step {
        job: u64,
        timestep: f32,
    },
    /// Tensors: hidden `[rows, tokens, dim]`, modulation `[rows, 6, dim]`. Answer: `Output`
    /// with the hidden tokens after blocks `start..end`.
    Blocks {
        job: u64,
        start: u32,
        end: u32,
        grid: [u32; 3],
    },
    CloseJob {
        job: u64,
    },
    /// Answer: `HasModel`.
    HasModel {
        model: ModelHash,
    },
    /// Starts sending a model's weights (config canonical, as `model_id` makes it).
    UploadBegin {
        model: ModelHash,
        kind: DenoiserKind,
        config: String,
    },
    /// Tensors: one weight tensor as stored. Tensors come in name order.
    UploadTensor {
        model: ModelHash,
        name: String,
    },
    /// Ends an upload: the worker checks the hash of what it received and keeps the model.
    UploadFinish {
        model: ModelHash,
    },
    /// Tensors: any; answered with the same tensors (link measurement).
    Echo,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Hello {
        version: u32,
        worker: String,
        backend: String,
    },
    JobOpened {
        job: u64,
    },
    /// Tensors: the result. `compute_us` is the worker's own time for it.
    Output {
        compute_us: u64,
    },
    HasModel(bool),
    Done,
    Failed {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    Version,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// Not a frame: bad magic, undecodable header, truncated payload.
    Malformed,
    /// A frame over the receiver's size limit.
    FrameTooLarge,
    /// A tensor whose shape, dtype or byte length does not fit the request.
    BadTensor,
    UnknownModel,
    UnknownJob,
    /// An upload whose content does not hash to the name it was sent under, or out of order.
    Upload,
    /// The model failed on the input.
    Compute,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}
