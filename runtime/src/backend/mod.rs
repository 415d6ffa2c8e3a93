//! The one trait every backend implements. The CPU backend is the executable specification;
//! the wgpu backend runs the same primitives as WGSL compute shaders.

pub mod cpu;
pub mod wgpu;

use crate::error::Result;
use crate::spec::{AttentionSpec, ConvSpec, MapSpec, MatmulSpec, NormSpec, SoftmaxSpec};
use crate::tensor::{DType, HostTensor, Tensor};

/// A device that owns tensor storage and runs the primitive set. Inputs have been
/// validated by `ops` against the spec; outputs are new contiguous tensors, except `map`,
/// which writes into an output the caller allocated (so concat can fill one tensor).
///
/// Work may be queued: `read` is the point where results become visible on the host, and it
/// is async so the browser path never blocks.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// Shared handle to device memory; dropping the last handle frees (or recycles) it.
    type Storage: Clone;

    /// Human-readable adapter description, e.g. "wgpu Vulkan: NVIDIA H100".
    fn name(&self) -> String;
    fn supports(&self, dtype: DType) -> bool;
    /// The dtype activations should use for fast half-precision work on this device.
    fn half_dtype(&self) -> DType;

    fn upload(&self, host: &HostTensor) -> Result<Tensor<Self>>;
    /// Uninitialised storage, for `map` to fill.
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>;
    async fn read(&self, t: &Tensor<Self>) -> Result<HostTensor>;

    fn matmul(&self, a: &Tensor<Self>, b: &Tensor<Self>, bias: Option<&Tensor<Self>>, spec: &MatmulSpec) -> Result<Tensor<Self>>;
    fn conv(&self, x: &Tensor<Self>, w: &Tensor<Self>, bias: Option<&Tensor<Self>>, spec: &ConvSpec) -> Result<Tensor<Self>>;
    fn norm(&self, x: &Tensor<Self>, gamma: Option<&Tensor<Self>>, beta: Option<&Tensor<Self>>, spec: &NormSpec) -> Result<Tensor<Self>>;
    fn softmax(&self, x: &Tensor<Self>, spec: &SoftmaxSpec) -> Result<Tensor<Self>>;
    fn attention(&self, q: &Tensor<Self>, k: &Tensor<Self>, v: &Tensor<Self>, spec: &AttentionSpec) -> Result<Tensor<Self>>;
    fn map(&self, inputs: &[&Tensor<Self>], out: &Tensor<Self>, spec: &MapSpec) -> Result<()>;
}
