//! Remote offload for sdlite: the edge keeps the tokenizer, text encoder, sampler and VAE and
//! sends the denoiser (or a range of DiT blocks) to workers over QUIC, or from a browser over
//! WebTransport.
//!
//! - `protocol` / `frame`: the versioned wire format (bincode headers, raw tensor payloads,
//!   size limits);
//! - `channel`: the requests a client makes, over any transport that carries one frame each
//!   way (a QUIC stream natively, a WebTransport stream in the browser); `channel_denoiser`:
//!   the denoiser that steps on one worker and finishes locally if it fails (the page's);
//! - `model_id`: content hashes that prove client and worker run the same weights;
//! - `tls`, `address`: TLS 1.3 with pinned self-signed certificates or CA roots;
//! - `engine`, `worker`: `sdlite worker`;
//! - `client`, `offload`: the QUIC connection to a worker, the pool, and the `Denoiser` that
//!   offloads with retries, CFG-parallel and local fallback.
//!
//! Those build for wasm32 as well; the rest needs sockets and threads.

pub mod channel;
pub mod channel_denoiser;
pub mod error;
pub mod frame;
pub mod model_id;
pub mod protocol;

#[cfg(not(target_arch = "wasm32"))]
pub mod address;
#[cfg(not(target_arch = "wasm32"))]
pub mod client;
#[cfg(not(target_arch = "wasm32"))]
pub mod engine;
#[cfg(not(target_arch = "wasm32"))]
pub mod offload;
#[cfg(not(target_arch = "wasm32"))]
pub mod tls;
#[cfg(not(target_arch = "wasm32"))]
pub mod worker;

#[cfg(not(target_arch = "wasm32"))]
pub use address::WorkerAddress;
pub use error::{Error, Result};
