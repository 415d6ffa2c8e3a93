//! sdlite's tensor runtime: contiguous tensors, a small closed op set (`ops`) lowered onto a
//! handful of primitives (`spec`), and backends that implement them: the CPU reference
//! (`backend::cpu`), WGSL compute shaders on wgpu (`backend::wgpu`), natively and in the
//! browser, and CUDA kernels with cuBLASLt for NVIDIA workers (`backend::cuda`).

pub mod backend;
pub mod error;
pub mod image;
pub mod models;
pub mod noise;
pub mod ops;
pub mod parallel;
pub mod source;
pub mod spec;
pub mod tensor;
pub mod weights;

pub use backend::cpu::CpuBackend;
#[cfg(not(target_arch = "wasm32"))]
pub use backend::cuda::{ConvKernel, CudaBackend, CudaOptions};
pub use backend::wgpu::{WgpuBackend, WgpuOptions};
pub use backend::Backend;
pub use error::{Error, Result};
pub use tensor::{DType, HostData, HostTensor, Tensor};
