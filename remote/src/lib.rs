//! Remote offload for sdlite: the edge keeps the tokenizer, text encoder, sampler and VAE and
//! sends the denoiser (or a range of DiT blocks) to workers over QUIC.
//!
//! - `protocol` / `frame`: the versioned wire format (bincode headers, raw tensor payloads,
//!   size limits);
//! - `tls`, `address`: TLS 1.3 with pinned self-signed certificates or CA roots;
//! - `model_id`: content hashes that prove client and worker run the same weights;
//! - `engine`, `worker`: `sdlite worker`;
//! - `client`, `offload`: the connection to a worker, the pool, and the `Denoiser` that offloads
//!   with retries, CFG-parallel and local fallback.

pub mod address;
pub mod client;
pub mod engine;
pub mod error;
pub mod frame;
pub mod model_id;
pub mod offload;
pub mod protocol;
pub mod tls;
pub mod worker;

pub use address::WorkerAddress;
pub use error::{Error, Result};
