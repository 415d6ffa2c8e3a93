//! The one trait every backend implements. The CPU backend is the executable specification;
//! the wgpu backend runs the same primitives as WGSL compute shaders.

pub mod cpu;
#[cfg(not(target_arch = "wasm32"))]
pub mod cuda;
pub mod wgpu;

use crate::error::Result;
use crate::spec::{AttentionSpec, ConvSpec, MapOp, MapSpec, MatmulSpec, NormSpec, SoftmaxSpec, UnaryOp, View};
use crate::tensor::{contiguous_strides, DType, HostTensor, Tensor};

/// What a fused normalisation (`Backend::norm_then`) applies after the affine parameters.
pub enum NormThen<'a, B: Backend + ?Sized> {
    Silu,
    /// adaLN modulation `y * (1 + scale) + shift`; `scale` and `shift` hold `[batch, row_len]`
    /// and the rows of the input are split evenly over the batch.
    Modulate {
        scale: &'a Tensor<B>,
        shift: &'a Tensor<B>,
    },
    /// Rotary embedding (`ops::rope`) of every head of `2 * cos.shape()[1]` elements; row r
    /// is token `r % cos.shape()[0]`, whose angles are row `r % cos.shape()[0]` of the tables.
    Rope {
        cos: &'a Tensor<B>,
        sin: &'a Tensor<B>,
    },
}

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

    /// Human-readable adapter description, e.g. "wgpu Vulkan: NVIDIA H100, gpu kernels".
    fn name(&self) -> String;
    fn supports(&self, dtype: DType) -> bool;
    /// The dtype activations should use for fast half-precision work on this device.
    fn half_dtype(&self) -> DType;

    fn upload(&self, host: &HostTensor) -> Result<Tensor<Self>>;
    /// Uninitialised storage, for `map` to fill.
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>;
    /// Queues a copy of `t` to the host after the work queued so far; the future yields it.
    /// Work queued before the future is awaited may run while the copy is in flight, which
    /// keeps a device busy while the host takes the results of earlier work.
    fn read(&self, t: &Tensor<Self>) -> impl std::future::Future<Output = Result<HostTensor>> + use<'_, Self>;

    fn matmul(&self, a: &Tensor<Self>, b: &Tensor<Self>, bias: Option<&Tensor<Self>>, spec: &MatmulSpec) -> Result<Tensor<Self>>;
    fn conv(&self, x: &Tensor<Self>, w: &Tensor<Self>, bias: Option<&Tensor<Self>>, spec: &ConvSpec) -> Result<Tensor<Self>>;
    fn norm(&self, x: &Tensor<Self>, gamma: Option<&Tensor<Self>>, beta: Option<&Tensor<Self>>, spec: &NormSpec) -> Result<Tensor<Self>>;
    fn softmax(&self, x: &Tensor<Self>, spec: &SoftmaxSpec) -> Result<Tensor<Self>>;
    fn attention(&self, q: &Tensor<Self>, k: &Tensor<Self>, v: &Tensor<Self>, spec: &AttentionSpec) -> Result<Tensor<Self>>;
    fn map(&self, inputs: &[&Tensor<Self>], out: &Tensor<Self>, spec: &MapSpec) -> Result<()>;

    /// `conv` of `parts` joined along time (dimension 2), validated by `ops`: `spec.input[0]`
    /// counts the frames of all of them. Backends whose kernels read each part where it lies
    /// override it; joining the parts, then `conv`, is its specification.
    fn conv_frames(&self, parts: &[&Tensor<Self>], w: &Tensor<Self>, bias: Option<&Tensor<Self>>, spec: &ConvSpec) -> Result<Tensor<Self>>
    where
        Self: Sized,
    {
        conv_frames_composed(self, parts, w, bias, spec)
    }

    /// `norm` followed by `then`, validated by `ops`. Backends that can fuse the two in one
    /// pass override it; this composition of the primitives is its specification.
    fn norm_then(
        &self,
        x: &Tensor<Self>,
        gamma: Option<&Tensor<Self>>,
        beta: Option<&Tensor<Self>>,
        spec: &NormSpec,
        then: NormThen<'_, Self>,
    ) -> Result<Tensor<Self>>
    where
        Self: Sized,
    {
        norm_then_composed(self, x, gamma, beta, spec, then)
    }

    /// `matmul` (bias included) followed by the elementwise `then`, validated by `ops`.
    /// Backends that apply the activation in the product's epilogue override it; this
    /// composition of the primitives is its specification.
    fn matmul_then(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        spec: &MatmulSpec,
        then: UnaryOp,
    ) -> Result<Tensor<Self>>
    where
        Self: Sized,
    {
        matmul_then_composed(self, a, b, bias, spec, then)
    }

    /// `residual + gate * matmul(a, b, bias)` (no gate: 1), validated by `ops`: the closing
    /// projection of a residual branch, `gate` `[batch, 1, n]` for `residual` `[batch, rows,
    /// n]`. Backends that fold the sum (and the gate) into the product override it; this
    /// composition of the primitives is its specification.
    #[allow(clippy::too_many_arguments)]
    fn matmul_residual(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        spec: &MatmulSpec,
        residual: &Tensor<Self>,
        gate: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>
    where
        Self: Sized,
    {
        matmul_residual_composed(self, a, b, bias, spec, residual, gate)
    }
}

/// `Backend::conv_frames` as a composition of primitives (its default, and the fallback of
/// backends that read the parts in place only for some convolutions).
pub(crate) fn conv_frames_composed<B: Backend>(
    b: &B,
    parts: &[&Tensor<B>],
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    spec: &ConvSpec,
) -> Result<Tensor<B>> {
    b.conv(&crate::ops::concat(b, parts, 2)?, w, bias, spec)
}

/// `Backend::norm_then` as a composition of primitives (its default, and the fallback of
/// backends that fuse only some cases).
pub(crate) fn norm_then_composed<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    gamma: Option<&Tensor<B>>,
    beta: Option<&Tensor<B>>,
    spec: &NormSpec,
    then: NormThen<'_, B>,
) -> Result<Tensor<B>> {
    let y = b.norm(x, gamma, beta, spec)?;
    let (scale, shift) = match then {
        NormThen::Silu => return unary(b, &y, UnaryOp::Silu),
        NormThen::Rope { cos, sin } => {
            let (tokens, head_dim) = (cos.shape()[0], 2 * cos.shape()[1]);
            let heads = y.reshape(&[spec.rows / tokens, tokens, spec.row_len / head_dim, head_dim])?;
            return crate::ops::rope(b, &heads, cos, sin)?.reshape(y.shape());
        }
        NormThen::Modulate { scale, shift } => (scale, shift),
    };
    let out = b.alloc(y.shape(), y.dtype())?;
    let batch = scale.numel() / spec.row_len.max(1);
    let shape = vec![batch, spec.rows / batch.max(1), spec.row_len];
    let per_batch = View::strided(0, vec![spec.row_len, 0, 1]);
    let spec = MapSpec {
        op: MapOp::Modulate,
        inputs: vec![flat(&shape), per_batch.clone(), per_batch],
        out: flat(&shape),
        shape,
        alpha: 1.0,
        beta: 0.0,
    };
    b.map(&[&y, scale, shift], &out, &spec)?;
    Ok(out)
}

/// `Backend::matmul_then` as a composition of primitives (its default, and the fallback of
/// backends that fuse only some activations).
pub(crate) fn matmul_then_composed<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    spec: &MatmulSpec,
    then: UnaryOp,
) -> Result<Tensor<B>> {
    unary(b, &b.matmul(x, w, bias, spec)?, then)
}

/// `Backend::matmul_residual` as a composition of primitives (its default, and the
/// fallback of backends that fold only some cases).
pub(crate) fn matmul_residual_composed<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    spec: &MatmulSpec,
    residual: &Tensor<B>,
    gate: Option<&Tensor<B>>,
) -> Result<Tensor<B>> {
    let y = b.matmul(x, w, bias, spec)?.reshape(residual.shape())?;
    match gate {
        Some(g) => crate::ops::gated_add(b, residual, &y, g),
        None => crate::ops::add(b, residual, &y),
    }
}

/// The contiguous view of a tensor of `shape`.
fn flat(shape: &[usize]) -> View {
    View::strided(0, contiguous_strides(shape))
}

/// `op` applied to every element of `y`, into a new tensor.
fn unary<B: Backend>(b: &B, y: &Tensor<B>, op: UnaryOp) -> Result<Tensor<B>> {
    let out = b.alloc(y.shape(), y.dtype())?;
    let shape = vec![y.numel()];
    let spec = MapSpec {
        op: MapOp::Unary(op),
        inputs: vec![flat(&shape)],
        out: flat(&shape),
        shape,
        alpha: 1.0,
        beta: 0.0,
    };
    b.map(&[y], &out, &spec)?;
    Ok(out)
}

/// Tokens-first attention for kernels that read heads-first rows only: q, k and v are
/// permuted to `[batch, heads, len, head_dim]`, and the output back.
pub(crate) fn attention_via_heads_first<B: Backend>(
    b: &B,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    s: &AttentionSpec,
) -> Result<Tensor<B>> {
    let swap = |t: &Tensor<B>| crate::ops::permute(b, t, &[0, 2, 1, 3]);
    let out = b.attention(&swap(q)?, &swap(k)?, &swap(v)?, &s.heads_first())?;
    swap(&out)
}
