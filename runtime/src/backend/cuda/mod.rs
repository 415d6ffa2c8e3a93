//! The CUDA backend: the primitives as our own CUDA C++ kernels (`kernels/`, compiled at run
//! time with NVRTC) and cuBLASLt GEMMs, for the datacenter worker.
//!
//! The CUDA libraries are loaded when a backend is created, not when the program starts, so
//! one binary runs everywhere: without a driver, `CudaBackend::new` returns an error naming
//! the missing library and every other backend still works.
//!
//! Work is queued on one stream; `read` synchronises. Tensor storage comes from an arena of
//! recycled buffers (`pool`), so after the first denoising step nothing is allocated.
//! `CudaOptions::poison` fills every new buffer with NaN bytes so a kernel that leaves an
//! output element unwritten fails the comparisons in the tests.

mod compile;
mod gemm;
mod pool;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::backend::{Backend, NormThen};
use crate::error::{Error, Result};
use crate::spec::{AttentionSpec, ConvSpec, MapOp, MapSpec, MatmulSpec, NormKind, NormSpec, SoftmaxSpec, UnaryOp, View};
use crate::tensor::{contiguous_strides, numel, DType, HostData, HostTensor, Tensor};

use compile::{Family, CONV_TMA_RING, FLASH_KEYS_PER_TILE, FLASH_SM90_STAGES, FLASH_WARPS};
use gemm::{alignment_of, natural_lda, natural_ldb, Gemm, GemmShape};
pub use pool::MemoryStats;
use pool::{rounded, Pool};

pub type CudaTensor = Tensor<CudaBackend>;

/// Scratch matrices (a convolution's column buffer, a block of attention scores) are split
/// so that one holds at most this many bytes.
const SCRATCH_BYTES: usize = 256 << 20;
/// Elements of a row one normalisation block reduces or writes.
const NORM_CHUNK: usize = 8192;
/// Longest row the one-pass, warp-per-row normalisation takes (`norm_rows`).
const NORM_ROW_MAX: usize = 4096;
/// Longest row `norm_rows8` keeps in registers (256 x NORM_ROW8_WORDS in norm.cu).
const NORM_ROW8_MAX: usize = 2048;
/// Flash-attention head sizes compiled (multiples of 16); others round up to the next.
const FLASH_HEAD_DIMS: [usize; 7] = [32, 48, 64, 80, 96, 128, 160];
const FLASH_BF16: [&str; 7] = [
    "flash_attention_bf16_d32",
    "flash_attention_bf16_d48",
    "flash_attention_bf16_d64",
    "flash_attention_bf16_d80",
    "flash_attention_bf16_d96",
    "flash_attention_bf16_d128",
    "flash_attention_bf16_d160",
];
const FLASH_F16: [&str; 7] = [
    "flash_attention_f16_d32",
    "flash_attention_f16_d48",
    "flash_attention_f16_d64",
    "flash_attention_f16_d80",
    "flash_attention_f16_d96",
    "flash_attention_f16_d128",
    "flash_attention_f16_d160",
];
/// The Hopper (wgmma, TMA) flash kernels: head sizes 64 and 128 exactly, 128 query rows and
/// 128 keys per tile, a producer and two consumer warpgroups.
const FLASH_SM90_BF16: [(usize, &str); 2] = [(64, "flash_attention_sm90_bf16_d64"), (128, "flash_attention_sm90_bf16_d128")];
const FLASH_SM90_F16: [(usize, &str); 2] = [(64, "flash_attention_sm90_f16_d64"), (128, "flash_attention_sm90_f16_d128")];
const FLASH_SM90_ROWS: usize = 128;
const FLASH_SM90_KEYS: usize = 128;

/// The implicit-GEMM convolution kernels by output channels per block (conv.cu), and the
/// output positions each block covers.
/// Each entry: (rows, element-gather kernel, row-gather kernel).
const CONV_IGEMM_BF16: &[(usize, &str, &str)] = &[
    (64, "conv_igemm_bf16_m64", "conv_igemm_rows_bf16_m64"),
    (96, "conv_igemm_bf16_m96", "conv_igemm_rows_bf16_m96"),
    (128, "conv_igemm_bf16_m128", "conv_igemm_rows_bf16_m128"),
];
const CONV_IGEMM_F16: &[(usize, &str, &str)] = &[
    (64, "conv_igemm_f16_m64", "conv_igemm_rows_f16_m64"),
    (96, "conv_igemm_f16_m96", "conv_igemm_rows_f16_m96"),
    (128, "conv_igemm_f16_m128", "conv_igemm_rows_f16_m128"),
];
const CONV_IGEMM_POSITIONS: usize = 128;

/// One flash-attention launch shape: kernel, query rows per block, threads, shared bytes,
/// and whether it reads Q, K and V through TMA tensor maps (the Hopper kernels) rather than
/// pointers.
struct FlashKernel {
    name: &'static str,
    rows: usize,
    threads: u32,
    smem: u32,
    tma: bool,
}

/// A TMA tensor map, passed to a kernel by value.
#[repr(transparent)]
struct TensorMap(drv_sys::CUtensorMap);

// SAFETY: 128 plain bytes, received by the kernel as a `__grid_constant__` TmaMap of the
// same size.
unsafe impl DeviceRepr for TensorMap {}

/// Element strides between batch items, heads and rows: `RowStrides` in attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RowStrides {
    batch: u64,
    head: u64,
    row: u64,
}
// SAFETY: plain old data laid out like `RowStrides` in attention.cu.
unsafe impl DeviceRepr for RowStrides {}

impl RowStrides {
    fn of(s: &AttentionSpec, len: usize) -> Self {
        let [batch, head, row] = s.strides(len).map(|x| x as u64);
        Self { batch, head, row }
    }
}

/// The tensor map the Hopper attention kernel reads a 16-bit tensor of `len` rows at `ptr`
/// through (in `s`'s layout): dimensions (head_dim, len, heads, batch), boxes of 64 columns
/// x `rows` rows of one head. `ptr` must be 16-byte aligned and `head_dim` a multiple of 64
/// (the caller checks both).
fn attention_tensor_map(ptr: u64, dtype: DType, s: &AttentionSpec, len: usize, rows: usize) -> Result<TensorMap> {
    let st = RowStrides::of(s, len);
    tensor_map(
        ptr,
        dtype,
        [s.head_dim, len, s.heads, s.batch],
        [st.row, st.head, st.batch].map(|e| e as usize),
        [64, rows, 1, 1],
    )
    .map_err(|e| gpu_err(&format!("attention tensor map of {len} rows, {s:?}"), e))
}

/// A 4D TMA tensor map over the 16-bit tensor at `ptr` (dimensions innermost first, element
/// strides of the outer three), with boxes of `boxes` elements in the 128-byte swizzled
/// layout wgmma reads, elements outside the tensor read as zeros. TMA wants `ptr` 16-byte
/// aligned, strides of whole 16-byte units and a box row of 64 elements (128 bytes).
fn tensor_map(ptr: u64, dtype: DType, dims: [usize; 4], strides: [usize; 3], boxes: [usize; 4]) -> std::result::Result<TensorMap, String> {
    use drv_sys::{CUtensorMapDataType as Ty, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle};
    let ty = match dtype {
        DType::BF16 => Ty::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => Ty::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => return Err("TMA tensor maps here take 16-bit tensors".into()),
    };
    let dims = dims.map(|d| d as u64);
    let strides = strides.map(|e| e as u64 * 2);
    let boxes = boxes.map(|b| b as u32);
    let steps = [1u32; 4];
    let mut map = std::mem::MaybeUninit::<drv_sys::CUtensorMap>::uninit();
    // SAFETY: every array holds `rank` (4) entries, strides `rank - 1`; `map` is written by
    // the call before it is read.
    unsafe {
        drv_sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            ty,
            4,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(|e| format!("{e:?} (dimensions {dims:?}, byte strides {strides:?}, box {boxes:?})"))?;
        Ok(TensorMap(map.assume_init()))
    }
}

#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Fill new buffers with NaN bytes (tests: unwritten outputs then fail).
    pub poison: bool,
    /// Most bytes of freed buffers kept for reuse (default 16 GiB: a full-size Wan step's
    /// activations, so the loop runs without allocating).
    pub pool_bytes: usize,
    /// Time every outermost primitive's GPU work with CUDA events into a per-primitive table
    /// (`CudaBackend::profile`), which shows where the time goes.
    pub profile: bool,
    /// Use the Hopper (wgmma) attention kernel on sm_90 devices; off runs the portable
    /// sm_80 kernel there too (tests and comparisons).
    pub hopper_attention: bool,
    /// How 16-bit convolutions are computed (tests and comparisons force one way).
    pub conv: ConvKernel,
}

/// The ways the CUDA backend convolves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvKernel {
    /// Where the column matrix would outgrow the L2 cache (`implicit_gemm_pays`), the
    /// Hopper kernel on sm_90 devices where it takes the convolution, else the implicit
    /// GEMM; column matrices elsewhere.
    #[default]
    Auto,
    /// The sm_80 implicit-GEMM kernel for every 16-bit convolution the device can run it for.
    ImplicitGemm,
    /// On sm_90 devices the Hopper kernel (TMA, wgmma) for every 16-bit convolution it takes
    /// (`tma_conv_takes`); the implicit GEMM for the rest.
    Hopper,
    /// im2col column matrices and cuBLASLt GEMMs throughout.
    Columns,
}

impl ConvKernel {
    pub const NAMES: [(&'static str, ConvKernel); 4] = [
        ("auto", ConvKernel::Auto),
        ("implicit-gemm", ConvKernel::ImplicitGemm),
        ("hopper", ConvKernel::Hopper),
        ("columns", ConvKernel::Columns),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, k)| *k == self).map_or("auto", |(n, _)| n)
    }
}

impl std::str::FromStr for ConvKernel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::NAMES.iter().find(|(n, _)| *n == s).map(|(_, k)| *k).ok_or_else(|| {
            let names: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
            Error::Invalid(format!("convolution kernel `{s}`: expected one of {}", names.join(", ")))
        })
    }
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device: 0,
            poison: false,
            pool_bytes: 16 << 30,
            profile: false,
            hopper_attention: true,
            conv: ConvKernel::Auto,
        }
    }
}

fn gpu_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Gpu(format!("CUDA {what}: {e:?}"))
}

/// Whether the CUDA driver, NVRTC and cuBLASLt libraries can be loaded on this machine.
pub fn libraries_present() -> std::result::Result<(), String> {
    // SAFETY: these only try to open the shared libraries.
    let found = unsafe {
        [
            ("libcuda (the NVIDIA driver)", cudarc::driver::sys::is_culib_present()),
            ("libnvrtc (CUDA runtime compiler)", cudarc::nvrtc::sys::is_culib_present()),
            ("libcublasLt (CUDA BLAS)", cudarc::cublaslt::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = found.iter().filter(|(_, ok)| !ok).map(|(n, _)| *n).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} not found; install the NVIDIA driver and CUDA 13 libraries",
            missing.join(", ")
        ))
    }
}

/// Device memory of one tensor; returns to the arena when the last handle drops.
pub struct CudaBuffer {
    ptr: u64,
    bytes: usize,
    slice: Option<CudaSlice<u8>>,
    pool: Arc<Mutex<Pool<CudaSlice<u8>>>>,
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if let (Some(s), Ok(mut pool)) = (self.slice.take(), self.pool.lock()) {
            drop(pool.give(self.bytes, s));
        }
    }
}

/// Seconds and calls per primitive, when `CudaOptions::profile` is on. Each outermost
/// primitive is bracketed by two timing events on the stream, so the GPU runs undisturbed
/// (no synchronisation per primitive) and nested primitives (a cast inside a matmul) count
/// towards the one that called them. Events are resolved when the table is read.
#[derive(Default)]
struct Profile {
    enabled: bool,
    depth: AtomicUsize,
    pending: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
    /// The end of the last resolved primitive: the next one's idle time starts there.
    last_end: Mutex<Option<CudaEvent>>,
    table: Mutex<HashMap<&'static str, ProfileRow>>,
}

/// One primitive's line of the profile.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProfileRow {
    pub name: &'static str,
    pub calls: u64,
    /// GPU time inside the primitive.
    pub seconds: f64,
    /// GPU time idle between the previous primitive's end and this one's start: waiting for
    /// the host to queue it (launch cost, host work, or a read's wait in between).
    pub idle_before: f64,
}

/// Times one primitive's GPU work (when profiling); `start` is absent for nested ones.
struct ProfileScope<'a> {
    backend: &'a CudaBackend,
    name: &'static str,
    start: Option<CudaEvent>,
}

impl Drop for ProfileScope<'_> {
    fn drop(&mut self) {
        let profile = &self.backend.profile;
        profile.depth.fetch_sub(1, Ordering::Relaxed);
        if let (Some(start), Ok(end)) = (self.start.take(), self.backend.timing_event()) {
            profile.pending.lock().expect("profile events").push((self.name, start, end));
        }
    }
}

pub struct CudaBackend {
    profile: Profile,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: (i32, i32),
    /// Bytes of L2 cache: convolutions whose column matrix would not fit take the implicit GEMM.
    l2_bytes: usize,
    poison: bool,
    hopper_attention: bool,
    conv_kernel: ConvKernel,
    gemm: Gemm,
    modules: Mutex<HashMap<Family, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    pool: Arc<Mutex<Pool<CudaSlice<u8>>>>,
    /// Page-locked host buffers that reads copy into, kept for the next reads.
    staging: Mutex<Vec<PinnedHostSlice<u8>>>,
}

/// Staging buffers kept for reuse: a decode reads one size over and over.
const STAGING_KEPT: usize = 4;

/// A copy to the host in flight: the device writes a page-locked staging buffer after the
/// work queued before it, and `done` marks the copy finished. The tensor is held so that its
/// memory is not reused before the copy has read it.
struct QueuedRead<'a> {
    backend: &'a CudaBackend,
    tensor: CudaTensor,
    staging: Option<PinnedHostSlice<u8>>,
    done: Option<CudaEvent>,
}

impl QueuedRead<'_> {
    fn finish(mut self) -> Result<HostTensor> {
        if let Some(done) = &self.done {
            done.synchronize().map_err(|e| gpu_err("read", e))?;
        }
        let t = &self.tensor;
        let data = match &self.staging {
            Some(s) => {
                let bytes = s.as_slice().map_err(|e| gpu_err("read", e))?;
                HostData::from_bytes(t.dtype(), &bytes[..t.numel() * t.dtype().size()])
            }
            None => HostData::zeros(t.dtype(), 0),
        };
        self.done = None;
        HostTensor::new(t.shape(), data)
    }
}

impl Drop for QueuedRead<'_> {
    /// A read dropped unawaited still waits for its copy: the staging buffer goes back to
    /// the backend, and the device must not write it after that.
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            if done.synchronize().is_err() {
                // The copy's fate is unknown: leak the buffer rather than reuse it.
                std::mem::forget(self.staging.take());
            }
        }
        if let (Some(s), Ok(mut kept)) = (self.staging.take(), self.backend.staging.lock()) {
            kept.push(s);
            if kept.len() > STAGING_KEPT {
                kept.sort_by_key(|s| std::cmp::Reverse(s.len()));
                kept.pop();
            }
        }
    }
}

fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MapParams {
    rank: u32,
    op: u32,
    unary: u32,
    total: u32,
    vec: u32,
    alpha: f32,
    beta: f32,
    out_dtype: u32,
    out_offset: u32,
    in_dtype: [u32; 3],
    in_offset: [u32; 3],
    shape: [u32; 6],
    out_stride: [u32; 6],
    in_stride: [[u32; 6]; 3],
    in_div: [[u32; 6]; 3],
}
// SAFETY: plain old data laid out like `MapParams` in elementwise.cu.
unsafe impl DeviceRepr for MapParams {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NormApply {
    row_len: u32,
    chunks: u32,
    per_block: u32,
    groups: u32,
    channels_per_group: u32,
    inner: u32,
    stride: u32,
    kind: i32,
    epilogue: i32,
    x_dtype: i32,
    out_dtype: i32,
    gamma_dtype: i32,
    beta_dtype: i32,
    mod_dtype: i32,
    eps: f32,
    rows_per_batch: u32,
    head_dim: u32,
    vec_params: u32,
}
// SAFETY: plain old data laid out like `NormApply` in norm.cu.
unsafe impl DeviceRepr for NormApply {}

/// `ConvGeometry` in conv.cu: a convolution's input, kernel, stride, front padding and
/// output sizes (t, y, x).
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvGeometry {
    ti: u32,
    hi: u32,
    wi: u32,
    kt: u32,
    kh: u32,
    kw: u32,
    st: u32,
    sh: u32,
    sw: u32,
    pt: u32,
    ph: u32,
    pw: u32,
    to: u32,
    ho: u32,
    wo: u32,
}

impl ConvGeometry {
    fn of(s: &ConvSpec) -> Self {
        let out = s.output();
        Self {
            ti: s.input[0] as u32,
            hi: s.input[1] as u32,
            wi: s.input[2] as u32,
            kt: s.kernel[0] as u32,
            kh: s.kernel[1] as u32,
            kw: s.kernel[2] as u32,
            st: s.stride[0] as u32,
            sh: s.stride[1] as u32,
            sw: s.stride[2] as u32,
            pt: s.pad_lo[0] as u32,
            ph: s.pad_lo[1] as u32,
            pw: s.pad_lo[2] as u32,
            to: out[0] as u32,
            ho: out[1] as u32,
            wo: out[2] as u32,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Im2col {
    c0: u32,
    cin_g: u32,
    g: ConvGeometry,
    p0: u32,
    np: u32,
    x_offset: u64,
    dtype: i32,
}
// SAFETY: plain old data laid out like `Im2col` in conv.cu.
unsafe impl DeviceRepr for Im2col {}

#[repr(C)]
#[derive(Clone, Copy)]
struct ConvGemm {
    cin: u32,
    cout: u32,
    groups: u32,
    g: ConvGeometry,
    n: u32,
    bias_dtype: i32,
}
// SAFETY: plain old data laid out like `ConvGemm` in conv.cu.
unsafe impl DeviceRepr for ConvGemm {}

/// Most input tensors one implicit-GEMM convolution reads its frames from (`CONV_PARTS` in
/// conv.cu).
const CONV_PARTS: usize = 4;

/// `ConvParts` in conv.cu: the device address of each input part and the first frame of
/// each, unused parts starting at the total.
#[repr(C)]
struct ConvParts {
    x: [u64; CONV_PARTS],
    first: [u32; CONV_PARTS + 1],
}
// SAFETY: plain old data laid out like `ConvParts` in conv.cu.
unsafe impl DeviceRepr for ConvParts {}

impl ConvParts {
    /// The parts a convolution's input frames lie in, in time order.
    fn of(parts: &[&CudaTensor], s: &ConvSpec) -> Result<Self> {
        let mut x = ConvParts {
            x: [0; CONV_PARTS],
            first: [s.input[0] as u32; CONV_PARTS + 1],
        };
        let mut first = 0;
        for (j, part) in parts.iter().enumerate() {
            // The kernels' offsets within one batch item of a part are 32-bit.
            u32_of(part.numel() / s.batch, "input size")?;
            x.x[j] = CudaBackend::ptr(part);
            x.first[j] = first as u32;
            first += part.shape()[2];
        }
        Ok(x)
    }
}

/// `ConvPad` in conv.cu: the input's channels (and their count rounded up to the Hopper
/// convolution's 64-channel chunks), frames, height and width, its front padding, and the
/// padded channels-last copy's frames, height and width.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvPad {
    cin: u32,
    cin_pad: u32,
    ti: u32,
    hi: u32,
    wi: u32,
    pt: u32,
    ph: u32,
    pw: u32,
    tp: u32,
    hp: u32,
    wp: u32,
}
// SAFETY: plain old data laid out like `ConvPad` in conv.cu.
unsafe impl DeviceRepr for ConvPad {}

impl ConvPad {
    fn of(s: &ConvSpec) -> Result<Self> {
        let padded = |d: usize| s.input[d] + s.pad_lo[d] + s.pad_hi[d];
        let p = Self {
            cin: u32_of(s.c_in, "input channels")?,
            cin_pad: u32_of(s.c_in.div_ceil(64) * 64, "input channels")?,
            ti: s.input[0] as u32,
            hi: s.input[1] as u32,
            wi: s.input[2] as u32,
            pt: s.pad_lo[0] as u32,
            ph: s.pad_lo[1] as u32,
            pw: s.pad_lo[2] as u32,
            tp: u32_of(padded(0), "padded frames")?,
            hp: u32_of(padded(1), "padded height")?,
            wp: u32_of(padded(2), "padded width")?,
        };
        // Positions of the padded copy per batch item, and its elements, index in 32 bits.
        u32_of(p.rows() * p.cin_pad as usize, "padded input size")?;
        Ok(p)
    }

    /// Positions (channels-last rows) of one batch item's padded copy.
    fn rows(&self) -> usize {
        (self.tp * self.hp) as usize * self.wp as usize
    }
}

/// `ConvTma` in conv.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvTma {
    cin: u32,
    chunks: u32,
    cout: u32,
    kt: u32,
    kh: u32,
    kw: u32,
    wp: u32,
    fp: u32,
    to: u32,
    ho: u32,
    wo: u32,
    bias_dtype: i32,
}
// SAFETY: plain old data laid out like `ConvTma` in conv.cu.
unsafe impl DeviceRepr for ConvTma {}

/// Output channels per block of the Hopper convolution (its two consumers' 64 each).
const CONV_TMA_CHANNELS: usize = 128;

/// The Hopper convolution's output-channel tile for `channels`: conv_tma's 128, or one of
/// conv_tma_*_c{192,96,8}, which put positions along the MMA's M (8 only for at most 8
/// channels): whichever pads the channels least, ties to the earlier.
fn conv_tma_tile(channels: usize) -> usize {
    [CONV_TMA_CHANNELS, 192, 96, 8]
        .into_iter()
        .filter(|&t| t != 8 || channels <= 8)
        .min_by_key(|t| channels.div_ceil(*t) * t)
        .unwrap_or(CONV_TMA_CHANNELS)
}

/// Output positions per block of the Hopper convolution for an output of `positions`
/// (numbered in the padded frame) per batch item: 256, which reads the input a third less
/// often per MMA, once there are 8 such tiles; 128 for small frames.
fn conv_tma_positions(positions: usize) -> usize {
    if positions >= 8 * 256 {
        256
    } else {
        128
    }
}

/// Whether the Hopper convolution (conv.cu's conv_tma) takes `s`: one group; stride 1, so a
/// tap's input positions for a run of output positions are one run of the padded copy's
/// rows; more than one tap (a 1x1x1 convolution is a plain GEMM); and weight rows of taps x
/// c_in elements that TMA can step through (whole 16-byte units).
fn tma_conv_takes(s: &ConvSpec) -> bool {
    s.groups == 1 && s.stride == [1; 3] && s.kernel_volume() > 1 && (s.kernel_volume() * s.c_in).is_multiple_of(8)
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Invalid(format!("CUDA backend: {what} = {v} exceeds the kernels' 32-bit indexing")))
}

/// Whether `map_kernel` may take its 8-wide path (see elementwise.cu): innermost dimension a
/// multiple of 8 that every 16-bit operand walks contiguously from an aligned start and
/// every other operand broadcasts.
fn vectorizable(s: &MapSpec, out_dtype: DType, inputs: &[&CudaTensor]) -> bool {
    let Some(last) = s.shape.len().checked_sub(1) else { return false };
    let aligned = |v: &View| v.offset.is_multiple_of(8) && v.strides[..last].iter().all(|st| st.is_multiple_of(8));
    s.op != MapOp::Rope
        && s.shape[last].is_multiple_of(8)
        && out_dtype.size() == 2
        && s.out.strides[last] == 1
        && aligned(&s.out)
        && inputs
            .iter()
            .zip(&s.inputs)
            .all(|(t, v)| v.div[last] <= 1 && (v.strides[last] == 0 || (v.strides[last] == 1 && t.dtype().size() == 2 && aligned(v))))
}

/// Whether rope may take `map_kernel`'s four-pair path (see elementwise.cu): 16-bit x, out
/// and tables; x and out step 2 per pair from 16-byte aligned groups of four pairs, the
/// tables 1 per pair from 8-byte aligned groups.
fn rope_vectorizable(s: &MapSpec, out_dtype: DType, inputs: &[&CudaTensor]) -> bool {
    let Some(last) = s.shape.len().checked_sub(1) else { return false };
    let fits = |v: &View, step: usize, align: usize| {
        v.strides[last] == step
            && v.div[last] <= 1
            && v.offset.is_multiple_of(align)
            && v.strides[..last].iter().all(|st| st.is_multiple_of(align))
    };
    s.op == MapOp::Rope
        && s.shape[last].is_multiple_of(4)
        && out_dtype.size() == 2
        && inputs.iter().all(|t| t.dtype().size() == 2)
        && fits(&s.out, 2, 8)
        && fits(&s.inputs[0], 2, 8)
        && s.inputs[1..].iter().all(|v| fits(v, 1, 4))
}

/// A copy that transposes the last two dimensions of a contiguous input, as (batch, input
/// rows, input columns): a permute such as channels-first to channels-last. The generic map
/// would read such an input with a stride between neighbouring threads; `transpose` goes
/// through shared-memory tiles so both sides are read and written in whole lines.
fn transposition(s: &MapSpec) -> Option<(usize, usize, usize)> {
    let ([input], MapOp::Copy) = (&s.inputs[..], s.op) else {
        return None;
    };
    let r = s.shape.len();
    if !(2..=3).contains(&r) || s.out.strides != contiguous_strides(&s.shape) || input.div.iter().chain(&s.out.div).any(|&d| d != 1) {
        return None;
    }
    let (x, y) = (s.shape[r - 2], s.shape[r - 1]);
    let batch = if r == 3 { s.shape[0] } else { 1 };
    let transposed = input.strides[r - 2] == 1 && input.strides[r - 1] == x && (r == 2 || input.strides[0] == x * y);
    (transposed && batch <= 65535).then_some((batch, y, x))
}

/// Whether a convolution should skip the column matrix: when that matrix (one batch item and
/// group) would not fit in the L2 cache, writing and re-reading it through memory costs more
/// than gathering inside the GEMM (the Wan VAE at video sizes: up to 2 GB a frame). Smaller
/// ones (the SD UNet's) stay with im2col and cuBLASLt, which splits long reductions over
/// few output tiles better than one block per tile can.
fn implicit_gemm_pays(s: &ConvSpec, dtype: DType, l2_bytes: usize) -> bool {
    let columns = s.c_in / s.groups * s.kernel_volume() * numel(&s.output());
    columns * dtype.size() > l2_bytes
}

/// Whether the implicit GEMM may gather its input 8 output positions at a time with 16-byte
/// loads (conv.cu's row variants): stride 1 along x with at most one column of "same"
/// padding, so 8 positions read 8 consecutive inputs shifted by at most one, and an output
/// width that is a multiple of 8, so that such runs never cross rows and stay aligned.
fn row_gather(s: &ConvSpec) -> bool {
    let width = s.output()[2];
    s.stride[2] == 1 && s.pad_lo[2] == s.pad_hi[2] && s.pad_lo[2] <= 1 && s.kernel[2] == 2 * s.pad_lo[2] + 1 && width.is_multiple_of(8)
}

/// Output channels per implicit-GEMM block for `channels` output channels (per group): of
/// 64, 96 and 128, the tile that pads them least, ties to the larger (which reuses each
/// gathered input for more channels).
fn conv_tile_rows(channels: usize) -> usize {
    [128, 96, 64]
        .into_iter()
        .min_by_key(|rows| channels.div_ceil(*rows) * rows)
        .unwrap_or(64)
}

fn grid_for(total: usize, threads: usize) -> u32 {
    total.div_ceil(threads).clamp(1, 1 << 20) as u32
}

impl CudaBackend {
    pub fn new(options: &CudaOptions) -> Result<Self> {
        libraries_present().map_err(Error::NoAdapter)?;
        let count = CudaContext::device_count().map_err(|e| Error::NoAdapter(format!("CUDA driver: {e:?}")))?;
        if options.device >= count.max(0) as usize {
            return Err(Error::NoAdapter(format!(
                "CUDA device {} requested, {count} present",
                options.device
            )));
        }
        let ctx = CudaContext::new(options.device).map_err(|e| Error::Device(format!("CUDA context: {e:?}")))?;
        // SAFETY: the backend uses one stream, so cross-stream events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let arch = ctx.compute_capability().map_err(|e| gpu_err("compute capability", e))?;
        let l2_bytes = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(|e| gpu_err("L2 cache size", e))?
            .max(0) as usize;
        let stream = ctx.default_stream();
        let gemm = Gemm::new(stream.clone())?;
        let name = format!(
            "cuda: {} (sm_{}{})",
            ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
            arch.0,
            arch.1
        );
        Ok(Self {
            profile: Profile {
                enabled: options.profile,
                ..Default::default()
            },
            ctx,
            stream,
            name,
            arch,
            l2_bytes,
            poison: options.poison,
            hopper_attention: options.hopper_attention,
            conv_kernel: options.conv,
            gemm,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            pool: Arc::new(Mutex::new(Pool::new(options.pool_bytes))),
            staging: Mutex::new(Vec::new()),
        })
    }

    pub fn memory(&self) -> MemoryStats {
        self.pool.lock().map(|p| p.stats()).unwrap_or_default()
    }

    /// Each primitive's calls, GPU time and the GPU's idle time before it, since the last
    /// reset, longest first; empty unless profiling.
    pub fn profile(&self) -> Vec<ProfileRow> {
        let pending = std::mem::take(&mut *self.profile.pending.lock().expect("profile events"));
        let mut table = self.profile.table.lock().expect("profile table");
        let mut last_end = self.profile.last_end.lock().expect("profile events");
        for (name, start, end) in pending {
            let e = table.entry(name).or_insert(ProfileRow {
                name,
                ..Default::default()
            });
            if let Ok(ms) = start.elapsed_ms(&end) {
                e.calls += 1;
                e.seconds += ms as f64 / 1e3;
            }
            if let Some(Ok(ms)) = last_end.as_ref().map(|l| l.elapsed_ms(&start)) {
                e.idle_before += ms as f64 / 1e3;
            }
            *last_end = Some(end);
        }
        let mut v: Vec<_> = table.values().copied().collect();
        v.sort_by(|a, b| (b.seconds + b.idle_before).total_cmp(&(a.seconds + a.idle_before)));
        v
    }

    pub fn reset_profile(&self) {
        self.profile.pending.lock().expect("profile events").clear();
        self.profile.last_end.lock().expect("profile events").take();
        self.profile.table.lock().expect("profile table").clear();
    }

    fn timing_event(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| gpu_err("profile event", e))
    }

    fn scope(&self, name: &'static str) -> Option<ProfileScope<'_>> {
        self.profile.enabled.then(|| {
            let outermost = self.profile.depth.fetch_add(1, Ordering::Relaxed) == 0;
            ProfileScope {
                backend: self,
                name,
                start: outermost.then(|| self.timing_event().ok()).flatten(),
            }
        })
    }

    /// Starts a new peak-memory measurement from what exists now.
    pub fn reset_peak(&self) {
        if let Ok(mut p) = self.pool.lock() {
            p.reset_peak();
        }
    }

    /// Frees every buffer kept for reuse (e.g. between two models).
    pub fn release_cached(&self) {
        let released = self.pool.lock().map(|mut p| p.drain()).unwrap_or_default();
        drop(released);
    }

    /// Queues `t`'s copy into a staging buffer (a kept one that is large enough, or a new
    /// one) and the event that marks it done.
    fn queue_read(&self, t: &CudaTensor) -> Result<QueuedRead<'_>> {
        self.bind()?;
        let bytes = t.numel() * t.dtype().size();
        let mut read = QueuedRead {
            backend: self,
            tensor: t.clone(),
            staging: None,
            done: None,
        };
        if bytes == 0 {
            return Ok(read);
        }
        let kept = {
            let mut kept = self.staging.lock().expect("staging buffers");
            let fit = (0..kept.len()).filter(|&i| kept[i].len() >= bytes).min_by_key(|&i| kept[i].len());
            fit.map(|i| kept.swap_remove(i))
        };
        let staging = match kept {
            Some(s) => s,
            // SAFETY: written by the copy below before anything reads it. Not write-combined:
            // the host reads it.
            None => unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes.next_power_of_two(), 0) }
                .map_err(|e| gpu_err(&format!("page-locked staging of {bytes} bytes"), e))?,
        };
        let dst = read.staging.insert(staging).as_mut_slice().map_err(|e| gpu_err("read", e))?;
        // SAFETY: the tensor holds `bytes` bytes and the staging buffer at least as many; the
        // buffer is read only after `done`, and not reused before it (QueuedRead's drop).
        unsafe { drv::memcpy_dtoh_async(&mut dst[..bytes], Self::ptr(t), self.stream.cu_stream()) }.map_err(|e| gpu_err("read", e))?;
        let done = self
            .stream
            .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(|e| gpu_err("read", e))?;
        read.done = Some(done);
        Ok(read)
    }

    /// Waits for all queued work; kernel faults surface here.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| gpu_err("synchronize", e))
    }

    fn function(&self, family: Family, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().expect("function cache").get(name) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().expect("module cache");
            match modules.get(&family) {
                Some(m) => m.clone(),
                None => {
                    let cubin = compile::cubin(family, self.arch)?;
                    let m = self
                        .ctx
                        .load_module(Ptx::from_binary(cubin))
                        .map_err(|e| gpu_err(&format!("loading {}", family.file()), e))?;
                    modules.insert(family, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| gpu_err(&format!("kernel {name} in {}", family.file()), e))?;
        if matches!(family, Family::Attention | Family::Conv) {
            // The flash and Hopper convolution kernels' tiles exceed the default 48 KiB;
            // allowing the device's opt-in maximum (less the kernel's static shared memory)
            // once covers every launch.
            let optin = self
                .ctx
                .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                .map_err(|e| gpu_err("shared memory limit", e))?;
            let fixed = f
                .get_attribute(drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(|e| gpu_err(&format!("{name} static shared memory"), e))?;
            f.set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                optin - fixed,
            )
            .map_err(|e| gpu_err(&format!("{name} shared memory"), e))?;
        }
        self.functions.lock().expect("function cache").insert(name, f.clone());
        Ok(f)
    }

    /// Makes the backend's context current on the calling thread; the raw driver and
    /// cuBLASLt calls below need it (callers may move between threads).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))
    }

    fn buffer(&self, bytes: usize) -> Result<CudaBuffer> {
        self.bind()?;
        let bytes = rounded(bytes);
        let cached = self.pool.lock().expect("cuda pool").take(bytes);
        let slice = match cached {
            Some(s) => s,
            None => {
                // SAFETY: fresh device memory; every kernel writes before reading (poisoning
                // below makes that checkable).
                let fresh = match unsafe { self.stream.alloc::<u8>(bytes) } {
                    Ok(s) => s,
                    Err(_) => {
                        let released = self.pool.lock().expect("cuda pool").drain();
                        drop(released);
                        unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| {
                            Error::Gpu(format!(
                                "out of device memory allocating {bytes} bytes ({e:?}); in use: {:?}",
                                self.memory()
                            ))
                        })?
                    }
                };
                self.pool.lock().expect("cuda pool").created(bytes);
                fresh
            }
        };
        let ptr = slice.device_ptr(&self.stream).0;
        if self.poison {
            // SAFETY: `ptr` addresses `bytes` bytes owned by `slice`.
            unsafe { drv::memset_d8_async(ptr, 0xff, bytes, self.stream.cu_stream()) }.map_err(|e| gpu_err("poison", e))?;
        }
        Ok(CudaBuffer {
            ptr,
            bytes,
            slice: Some(slice),
            pool: self.pool.clone(),
        })
    }

    fn tensor(&self, shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        let buf = self.buffer(numel(shape) * dtype.size())?;
        Ok(Tensor::from_storage(Arc::new(buf), shape.to_vec(), dtype))
    }

    fn ptr(t: &CudaTensor) -> u64 {
        t.storage().ptr
    }

    /// `out[.., j] += bias[j]` over the last `inner` elements of each of `channels` rows.
    fn add_channel_bias(&self, out: &CudaTensor, bias: &CudaTensor, outer: usize, channels: usize, inner: usize) -> Result<()> {
        let shape = vec![outer, channels, inner];
        let view = View::strided(0, vec![channels * inner, inner, 1]);
        let spec = MapSpec {
            op: MapOp::AddScaled,
            shape,
            inputs: vec![view.clone(), View::strided(0, vec![0, 1, 0])],
            out: view,
            alpha: 1.0,
            beta: 1.0,
        };
        self.map(&[out, bias], out, &spec)
    }

    fn gemm(&self, shape: &GemmShape, a: u64, b: u64, c: u64, bias: u64) -> Result<()> {
        self.gemm_onto(shape, a, b, c, bias, None)
    }

    /// `gemm`, adding `residual` (laid out like C) to the product when given.
    fn gemm_onto(&self, shape: &GemmShape, a: u64, b: u64, c: u64, bias: u64, residual: Option<u64>) -> Result<()> {
        self.bind()?;
        let s = GemmShape {
            alignment: alignment_of(&[a, b, c, bias, residual.unwrap_or(0)]),
            ..*shape
        };
        self.gemm.run(&s, a, b, c, bias, residual)
    }

    fn norm_fused(
        &self,
        x: &CudaTensor,
        gamma: Option<&CudaTensor>,
        beta: Option<&CudaTensor>,
        s: &NormSpec,
        then: Option<NormThen<'_, Self>>,
    ) -> Result<CudaTensor> {
        let _scope = self.scope(match then {
            None => "norm",
            Some(NormThen::Silu) => "norm + silu",
            Some(NormThen::Modulate { .. }) => "norm + modulate",
            Some(NormThen::Rope { .. }) => "norm + rope",
        });
        let xp = Self::ptr(x);
        // 16-byte words: 16-bit storage, 16-byte aligned (outputs, fresh allocations, always are).
        let rows8 =
            x.dtype().size() == 2 && xp.is_multiple_of(16) && s.stride == 1 && s.row_len.is_multiple_of(256) && s.row_len <= NORM_ROW8_MAX;
        // norm_rows8 rotates the four pairs of each 16-byte word with 8-byte table reads, the
        // same ones for all of a lane's words (see norm.cu); other rope shapes are composed.
        let rope_fits = |cos: &CudaTensor, sin: &CudaTensor| {
            let head_dim = 2 * cos.shape()[1];
            rows8
                && [cos, sin].iter().all(|t| t.dtype() == x.dtype() && Self::ptr(t) % 8 == 0)
                && head_dim.is_multiple_of(8)
                && 256 % head_dim == 0
        };
        let then = match then {
            Some(NormThen::Rope { cos, sin }) if !rope_fits(cos, sin) => {
                return crate::backend::norm_then_composed(self, x, gamma, beta, s, NormThen::Rope { cos, sin });
            }
            then => then,
        };
        let out = self.tensor(x.shape(), x.dtype())?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let op = Self::ptr(&out);
        let chunks = s.row_len.div_ceil(NORM_CHUNK).max(1);
        if chunks > 65535 {
            return Err(Error::Invalid(format!(
                "CUDA norm: rows of {} elements exceed the kernel's limit",
                s.row_len
            )));
        }
        let kind = match s.kind {
            NormKind::MeanVar => 0i32,
            NormKind::Rms => 1,
        };
        let (row_len, rows) = (u32_of(s.row_len, "row length")?, u32_of(s.rows, "rows")?);
        let dt = dtype_code(x.dtype()) as i32;
        let shift_cast;
        let (epilogue, mod_ptrs, mod_dtype, rows_per_batch, head_dim) = match then {
            None => (0, (0u64, 0u64), 0, 1, 0),
            Some(NormThen::Silu) => (1, (0, 0), 0, 1, 0),
            Some(NormThen::Modulate { scale, shift }) => {
                let batch = scale.numel() / s.row_len.max(1);
                shift_cast = crate::ops::cast(self, shift, scale.dtype())?;
                let per = s.rows / batch.max(1);
                (
                    2,
                    (Self::ptr(scale), Self::ptr(&shift_cast)),
                    dtype_code(scale.dtype()) as i32,
                    per.max(1),
                    0,
                )
            }
            Some(NormThen::Rope { cos, sin }) => (
                3,
                (Self::ptr(cos), Self::ptr(sin)),
                dtype_code(cos.dtype()) as i32,
                cos.shape()[0],
                2 * cos.shape()[1],
            ),
        };
        let (gp, bp) = (gamma.map_or(0, Self::ptr), beta.map_or(0, Self::ptr));
        // Parameters norm_finish8 reads 8 at a time (the rope tables are read 4 at a time).
        let modulation = if epilogue == 2 { mod_ptrs } else { (0, 0) };
        let vec_params = [gp, bp, modulation.0, modulation.1];
        let p = NormApply {
            row_len,
            chunks: chunks as u32,
            per_block: NORM_CHUNK as u32,
            groups: u32_of(s.groups, "groups")?,
            channels_per_group: u32_of(s.channels_per_group, "channels per group")?,
            inner: u32_of(s.inner, "inner")?,
            stride: u32_of(s.stride, "stride")?,
            kind,
            epilogue,
            x_dtype: dt,
            out_dtype: dtype_code(out.dtype()) as i32,
            gamma_dtype: gamma.map_or(0, |g| dtype_code(g.dtype()) as i32),
            beta_dtype: beta.map_or(0, |g| dtype_code(g.dtype()) as i32),
            mod_dtype,
            eps: s.eps,
            rows_per_batch: u32_of(rows_per_batch, "rows per batch")?,
            head_dim: head_dim as u32,
            vec_params: u32::from(s.groups == 1 && s.inner == 1 && vec_params.iter().all(|a| a % 16 == 0)),
        };
        if s.stride > 1 {
            if epilogue == 2 {
                return Err(Error::Invalid("CUDA norm: rows of stride > 1 take no modulation".into()));
            }
            // Runs of 8 rows as 16-byte words (see norm.cu): rows = batch * stride, so a run
            // never crosses a batch item.
            let words = x.dtype().size() == 2 && xp.is_multiple_of(16) && s.stride.is_multiple_of(8) && s.groups == 1;
            let (name, rows_per_block) = if words { ("norm_strided8", 256) } else { ("norm_strided", 32) };
            let f = self.function(Family::Norm, name)?;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(rows_per_block), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = self.stream.launch_builder(&f);
            l.arg(&p).arg(&rows).arg(&xp).arg(&op).arg(&gp).arg(&bp);
            // SAFETY: arguments match the kernel's signature (norm_strided8's is norm_strided's);
            // ops checked that rows * row_len elements at this stride are the tensor's.
            unsafe { l.launch(cfg) }.map_err(|e| gpu_err(name, e))?;
            return Ok(out);
        }
        if s.row_len <= NORM_ROW_MAX {
            let name = if rows8 { "norm_rows8" } else { "norm_rows" };
            let f = self.function(Family::Norm, name)?;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(8), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = self.stream.launch_builder(&f);
            l.arg(&p)
                .arg(&rows)
                .arg(&xp)
                .arg(&op)
                .arg(&gp)
                .arg(&bp)
                .arg(&mod_ptrs.0)
                .arg(&mod_ptrs.1);
            // SAFETY: arguments match the kernel's signature (norm_rows8's is norm_rows'); parameter
            // tensors were validated by ops.
            unsafe { l.launch(cfg) }.map_err(|e| gpu_err(name, e))?;
            return Ok(out);
        }
        let partial = self.tensor(&[s.rows, chunks, 2], DType::F32)?;
        let pp = Self::ptr(&partial);
        let cfg = LaunchConfig {
            grid_dim: (rows, chunks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let partial_fn = self.function(Family::Norm, "norm_partial")?;
        let mut l = self.stream.launch_builder(&partial_fn);
        l.arg(&xp)
            .arg(&dt)
            .arg(&row_len)
            .arg(&p.per_block)
            .arg(&p.chunks)
            .arg(&kind)
            .arg(&pp);
        // SAFETY: arguments match norm_partial's signature; buffers hold rows*row_len and rows*chunks*2 elements.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("norm_partial", e))?;
        let apply = self.function(Family::Norm, "norm_apply")?;
        let mut l = self.stream.launch_builder(&apply);
        l.arg(&p)
            .arg(&xp)
            .arg(&op)
            .arg(&pp)
            .arg(&gp)
            .arg(&bp)
            .arg(&mod_ptrs.0)
            .arg(&mod_ptrs.1);
        // SAFETY: arguments match norm_apply's signature; parameter tensors were validated by ops.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("norm_apply", e))?;
        Ok(out)
    }

    /// The implicit-GEMM kernel for a 16-bit convolution on sm_80 or newer, and its output
    /// channels per block, if this backend's `ConvKernel` choice takes it for `s`.
    fn conv_igemm_kernel(&self, dtype: DType, s: &ConvSpec) -> Option<(&'static str, usize)> {
        let names = match dtype {
            DType::BF16 => CONV_IGEMM_BF16,
            DType::F16 => CONV_IGEMM_F16,
            DType::F32 => return None,
        };
        let (cout_g, plane) = (s.c_out / s.groups, numel(&s.output()));
        let wanted = match self.conv_kernel {
            ConvKernel::Auto => implicit_gemm_pays(s, dtype, self.l2_bytes),
            ConvKernel::ImplicitGemm | ConvKernel::Hopper => true,
            ConvKernel::Columns => false,
        };
        if !wanted || self.arch.0 < 8 || cout_g * plane >= 1 << 32 || plane >= 1 << 31 {
            return None;
        }
        let rows = conv_tile_rows(cout_g);
        let by_rows = row_gather(s);
        names
            .iter()
            .find(|(r, _, _)| *r == rows)
            .map(|&(_, elements, row)| (if by_rows { row } else { elements }, rows))
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_igemm(
        &self,
        parts: &[&CudaTensor],
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        s: &ConvSpec,
        out: &CudaTensor,
        name: &'static str,
        rows: usize,
    ) -> Result<()> {
        let f = self.function(Family::Conv, name)?;
        let plane = numel(&s.output());
        let (cin_g, cout_g) = (s.c_in / s.groups, s.c_out / s.groups);
        let p = ConvGemm {
            cin: cin_g as u32,
            cout: cout_g as u32,
            groups: s.groups as u32,
            g: ConvGeometry::of(s),
            n: plane as u32,
            bias_dtype: bias.map_or(-1, |b| dtype_code(b.dtype()) as i32),
        };
        let x = ConvParts::of(parts, s)?;
        let cfg = LaunchConfig {
            grid_dim: (
                u32_of(plane.div_ceil(CONV_IGEMM_POSITIONS), "positions")?,
                u32_of(cout_g.div_ceil(rows), "channels")?,
                u32_of(s.batch * s.groups, "batch items x groups")?,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (wp, op) = (Self::ptr(w), Self::ptr(out));
        let bp = bias.map_or(0, Self::ptr);
        let mut l = self.stream.launch_builder(&f);
        l.arg(&p).arg(&x).arg(&wp).arg(&bp).arg(&op);
        // SAFETY: arguments match the conv_igemm kernels' signature; the tensors have the
        // spec's shapes, within which the kernel's offsets stay.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err(name, e))?;
        Ok(())
    }

    /// Whether this backend convolves `s` with the Hopper kernel.
    fn tma_conv_wanted(&self, dtype: DType, s: &ConvSpec) -> bool {
        let wanted = match self.conv_kernel {
            ConvKernel::Auto => implicit_gemm_pays(s, dtype, self.l2_bytes),
            ConvKernel::Hopper => true,
            ConvKernel::ImplicitGemm | ConvKernel::Columns => false,
        };
        wanted && dtype != DType::F32 && self.arch == (9, 0) && tma_conv_takes(s)
    }

    /// The Hopper convolution: the input's parts copied once into a padded channels-last
    /// buffer (conv_pad_input), then conv_tma reading it and the tap-major weights by TMA.
    fn conv_tma(&self, parts: &[&CudaTensor], w: &CudaTensor, bias: Option<&CudaTensor>, s: &ConvSpec, out: &CudaTensor) -> Result<()> {
        let dtype = out.dtype();
        let pad = ConvPad::of(s)?;
        let chunks = pad.cin_pad as usize / 64;
        let xp = self.tensor(&[s.batch, pad.rows(), pad.cin_pad as usize], dtype)?;
        let (x, xpp) = (ConvParts::of(parts, s)?, Self::ptr(&xp));
        let f = self.function(Family::Conv, "conv_pad_input")?;
        let cfg = LaunchConfig {
            grid_dim: (
                pad.wi.div_ceil(64),
                u32_of((pad.tp * pad.hp) as usize, "padded rows")?,
                u32_of(chunks * s.batch, "channel chunks x batch items")?,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(&f);
        l.arg(&pad).arg(&x).arg(&xpp);
        // SAFETY: arguments match conv_pad_input's signature; `xp` holds the padded copy of
        // every batch item, which the grid covers exactly.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("conv_pad_input", e))?;

        let k = s.kernel_volume() * s.c_in;
        let rows = pad.rows();
        let o = s.output();
        let positions = o[0] * pad.hp as usize * pad.wp as usize;
        let channels = conv_tma_tile(s.c_out);
        // Positions per block: conv_tma's choice, or the by-positions kernels' two
        // consumers x slices x 64 (two slices, one at 192 channels for its registers).
        let bn = match channels {
            CONV_TMA_CHANNELS => conv_tma_positions(positions),
            192 => 128,
            _ => 256,
        };
        let tw = tensor_map(
            Self::ptr(w),
            dtype,
            [k, s.c_out, 1, 1],
            [k, k * s.c_out, k * s.c_out],
            [64, channels, 1, 1],
        )
        .map_err(|e| gpu_err("convolution weight tensor map", e))?;
        let tx = tensor_map(
            xpp,
            dtype,
            [pad.cin_pad as usize, rows, s.batch, 1],
            [pad.cin_pad as usize, rows * pad.cin_pad as usize, xp.numel()],
            [64, bn, 1, 1],
        )
        .map_err(|e| gpu_err("convolution input tensor map", e))?;
        let p = ConvTma {
            cin: pad.cin,
            chunks: chunks as u32,
            cout: u32_of(s.c_out, "output channels")?,
            kt: s.kernel[0] as u32,
            kh: s.kernel[1] as u32,
            kw: s.kernel[2] as u32,
            wp: pad.wp,
            fp: pad.hp * pad.wp,
            to: o[0] as u32,
            ho: o[1] as u32,
            wo: o[2] as u32,
            bias_dtype: bias.map_or(-1, |b| dtype_code(b.dtype()) as i32),
        };
        u32_of(numel(&o), "output positions")?;
        let name = match (dtype == DType::BF16, channels, bn) {
            (true, 8, _) => "conv_tma_bf16_c8",
            (true, 96, _) => "conv_tma_bf16_c96",
            (true, 192, _) => "conv_tma_bf16_c192",
            (true, _, 256) => "conv_tma_bf16_n256",
            (true, _, _) => "conv_tma_bf16_n128",
            (false, 8, _) => "conv_tma_f16_c8",
            (false, 96, _) => "conv_tma_f16_c96",
            (false, 192, _) => "conv_tma_f16_c192",
            (false, _, 256) => "conv_tma_f16_n256",
            (false, _, _) => "conv_tma_f16_n128",
        };
        let f = self.function(Family::Conv, name)?;
        let cfg = LaunchConfig {
            grid_dim: (
                u32_of(positions.div_ceil(bn), "positions")?,
                u32_of(s.c_out.div_ceil(channels), "channels")?,
                u32_of(s.batch, "batch items")?,
            ),
            block_dim: (384, 1, 1),
            shared_mem_bytes: (CONV_TMA_RING + 1024) as u32,
        };
        let (op, bp) = (Self::ptr(out), bias.map_or(0, Self::ptr));
        let mut l = self.stream.launch_builder(&f);
        l.arg(&tw).arg(&tx).arg(&p).arg(&bp).arg(&op);
        // SAFETY: arguments match conv_tma's signature; the maps describe the weights and the
        // padded copy (kept alive until the launch is queued: the pool reuses its memory only
        // for later work on this stream), and the output has the spec's shape.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err(name, e))?;
        Ok(())
    }

    /// A convolution as column matrices (im2col) and cuBLASLt GEMMs: any dtype and device.
    fn conv_im2col(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        s: &ConvSpec,
        out: &CudaTensor,
        pointwise: bool,
    ) -> Result<()> {
        let dtype = x.dtype();
        let plane = numel(&s.output());
        let in_plane = numel(&s.input);
        let (cin_g, cout_g) = (s.c_in / s.groups, s.c_out / s.groups);
        let taps = s.kernel_volume();
        let rows = cin_g * taps;
        let es = dtype.size() as u64;
        let chunk = if pointwise {
            plane
        } else {
            let fit = (SCRATCH_BYTES / (rows * dtype.size()).max(1)) / 128 * 128;
            fit.max(128).min(plane)
        };
        let col = if pointwise {
            None
        } else {
            Some(self.tensor(&[rows * chunk], dtype)?)
        };
        let im2col = if pointwise {
            None
        } else {
            Some(self.function(Family::Conv, "im2col")?)
        };
        u32_of(in_plane * s.c_in, "input size")?;
        let geometry = ConvGeometry::of(s);
        for bi in 0..s.batch {
            for g in 0..s.groups {
                let mut p0 = 0;
                while p0 < plane {
                    let np = chunk.min(plane - p0);
                    let x_off = (bi * s.c_in * in_plane) as u64;
                    let b_ptr = match (&col, &im2col) {
                        (Some(col), Some(f)) => {
                            let p = Im2col {
                                c0: u32_of(g * cin_g, "channel")?,
                                cin_g: cin_g as u32,
                                g: geometry,
                                p0: u32_of(p0, "output position")?,
                                np: np as u32,
                                x_offset: x_off,
                                dtype: dtype_code(dtype) as i32,
                            };
                            let total = rows * np;
                            let (xp, cp) = (Self::ptr(x), Self::ptr(col));
                            let cfg = LaunchConfig {
                                grid_dim: (grid_for(total, 256), 1, 1),
                                block_dim: (256, 1, 1),
                                shared_mem_bytes: 0,
                            };
                            let mut l = self.stream.launch_builder(f);
                            l.arg(&p).arg(&xp).arg(&cp);
                            // SAFETY: arguments match im2col's signature; `col` holds rows*chunk elements.
                            unsafe { l.launch(cfg) }.map_err(|e| gpu_err("im2col", e))?;
                            cp
                        }
                        _ => Self::ptr(x) + (x_off + (g * cin_g * in_plane) as u64) * es,
                    };
                    // out[co, p0..p0+np] (ld = plane) = w_g[cout_g, rows] x B[rows, np] (ld = np or plane)
                    let ldb = if pointwise { plane } else { np };
                    let shape = GemmShape {
                        dtype,
                        c_dtype: dtype,
                        batch: 1,
                        m: cout_g,
                        n: np,
                        k: rows,
                        trans_a: false,
                        trans_b: false,
                        a_batch_stride: 0,
                        b_batch_stride: 0,
                        lda: rows,
                        ldb,
                        ldc: plane,
                        c_batch_stride: 0,
                        bias: false,
                        gelu: false,
                        alignment: 256,
                    };
                    let a_ptr = Self::ptr(w) + (g * cout_g * rows) as u64 * es;
                    let c_ptr = Self::ptr(out) + ((bi * s.c_out + g * cout_g) * plane + p0) as u64 * es;
                    self.gemm(&shape, a_ptr, b_ptr, c_ptr, 0)?;
                    p0 += np;
                }
            }
        }
        if let Some(bias) = bias {
            self.add_channel_bias(out, bias, s.batch, s.c_out, plane)?;
        }
        Ok(())
    }

    /// `out` = softmax(scale * x) over `rows` contiguous rows of `cols`, each in its own dtype.
    fn softmax_rows(&self, x: &CudaTensor, out: &CudaTensor, rows: usize, cols: usize, scale: f32) -> Result<()> {
        let f = self.function(Family::Norm, "softmax_rows")?;
        let (xp, op, x_dt, out_dt, cols) = (
            Self::ptr(x),
            Self::ptr(out),
            dtype_code(x.dtype()) as i32,
            dtype_code(out.dtype()) as i32,
            u32_of(cols, "columns")?,
        );
        let cfg = LaunchConfig {
            grid_dim: (u32_of(rows, "rows")?.max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(&f);
        l.arg(&xp).arg(&op).arg(&x_dt).arg(&out_dt).arg(&cols).arg(&scale);
        // SAFETY: arguments match softmax_rows' signature; both buffers hold rows * cols elements.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("softmax_rows", e))?;
        Ok(())
    }

    /// 16-bit attention for head sizes no flash kernel takes (the Wan VAE's one 384-wide
    /// head): per block of query rows, f32 scores from a cuBLASLt GEMM, their softmax written
    /// in the operands' dtype, and a second GEMM into those rows of the output. The score
    /// block is bounded by `SCRATCH_BYTES`.
    fn attention_by_scores(&self, q: &CudaTensor, k: &CudaTensor, v: &CudaTensor, out: &CudaTensor, s: &AttentionSpec) -> Result<()> {
        let dtype = q.dtype();
        let es = dtype.size() as u64;
        let (bh, kv, d) = (s.batch_heads(), s.kv_len, s.head_dim);
        let rows = (SCRATCH_BYTES / (bh * kv * 4).max(1)).clamp(1, s.q_len);
        let scores = self.tensor(&[bh * rows * kv], DType::F32)?;
        let probs = self.tensor(&[bh * rows * kv], dtype)?;
        let mut q0 = 0;
        while q0 < s.q_len {
            let n = rows.min(s.q_len - q0);
            let qk = GemmShape {
                dtype,
                c_dtype: DType::F32,
                batch: bh,
                m: n,
                n: kv,
                k: d,
                trans_a: false,
                trans_b: true,
                a_batch_stride: s.q_len * d,
                b_batch_stride: kv * d,
                lda: d,
                ldb: d,
                ldc: kv,
                c_batch_stride: n * kv,
                bias: false,
                gelu: false,
                alignment: 256,
            };
            self.gemm(&qk, Self::ptr(q) + (q0 * d) as u64 * es, Self::ptr(k), Self::ptr(&scores), 0)?;
            self.softmax_rows(&scores, &probs, bh * n, kv, s.scale)?;
            let pv = GemmShape {
                c_dtype: dtype,
                n: d,
                k: kv,
                trans_b: false,
                a_batch_stride: n * kv,
                lda: kv,
                ldb: d,
                ldc: d,
                c_batch_stride: s.q_len * d,
                ..qk
            };
            self.gemm(&pv, Self::ptr(&probs), Self::ptr(v), Self::ptr(out) + (q0 * d) as u64 * es, 0)?;
            q0 += n;
        }
        Ok(())
    }

    /// The copy `transposition` recognised: per batch item, the input's [rows, cols] written
    /// as [cols, rows] (casting on the way).
    fn transpose(&self, x: &CudaTensor, out: &CudaTensor, s: &MapSpec, batch: usize, rows: usize, cols: usize) -> Result<()> {
        let f = self.function(Family::Elementwise, "transpose")?;
        let tiles = u32_of(rows.div_ceil(32) * cols.div_ceil(32), "transpose tiles")?;
        let (xp, op) = (Self::ptr(x), Self::ptr(out));
        let (x_dt, out_dt) = (dtype_code(x.dtype()), dtype_code(out.dtype()));
        let (x_off, out_off) = (u32_of(s.inputs[0].offset, "input offset")?, u32_of(s.out.offset, "output offset")?);
        let (rows, cols) = (u32_of(rows, "rows")?, u32_of(cols, "columns")?);
        let cfg = LaunchConfig {
            grid_dim: (tiles, batch as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(&f);
        l.arg(&xp)
            .arg(&op)
            .arg(&x_dt)
            .arg(&out_dt)
            .arg(&x_off)
            .arg(&out_off)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: arguments match transpose's signature; map() checked both views' extents.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("transpose", e))?;
        Ok(())
    }

    /// The matmul primitive, optionally with GELU (tanh) in cuBLASLt's epilogue or a
    /// `residual` (`[batch, m, n]`, the product's dtype) added to the product; a bias it
    /// cannot fuse (another dtype) is added afterwards, so it must not come with `gelu`.
    fn matmul_epilogue(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        bias: Option<&CudaTensor>,
        s: &MatmulSpec,
        gelu: bool,
        residual: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let _scope = self.scope("matmul");
        let dtype = a.dtype();
        let b = crate::ops::cast(self, b, dtype)?;
        let out = self.tensor(&[s.batch, s.m, s.n], dtype)?;
        let fused_bias = bias.filter(|t| t.dtype() == dtype);
        let shape = GemmShape {
            dtype,
            c_dtype: dtype,
            batch: s.batch,
            m: s.m,
            n: s.n,
            k: s.k,
            trans_a: s.trans_a,
            trans_b: s.trans_b,
            a_batch_stride: s.a_batch_stride,
            b_batch_stride: s.b_batch_stride,
            lda: natural_lda(s.trans_a, s.m, s.k),
            ldb: natural_ldb(s.trans_b, s.k, s.n),
            ldc: s.n,
            c_batch_stride: s.m * s.n,
            bias: fused_bias.is_some(),
            gelu,
            alignment: 256,
        };
        let (ap, bp, cp, biasp) = (Self::ptr(a), Self::ptr(&b), Self::ptr(&out), fused_bias.map_or(0, Self::ptr));
        let rp = residual.map(Self::ptr);
        let broadcast = s.batch > 1 && (s.a_batch_stride == 0 || s.b_batch_stride == 0);
        if broadcast {
            // A shared operand: one GEMM per batch item rather than a zero batch stride.
            let es = dtype.size() as u64;
            for bi in 0..s.batch as u64 {
                let one = GemmShape { batch: 1, ..shape };
                let item = bi * (s.m * s.n) as u64 * es;
                self.gemm_onto(
                    &one,
                    ap + bi * (s.a_batch_stride as u64) * es,
                    bp + bi * (s.b_batch_stride as u64) * es,
                    cp + item,
                    biasp,
                    rp.map(|r| r + item),
                )?;
            }
        } else {
            self.gemm_onto(&shape, ap, bp, cp, biasp, rp)?;
        }
        if let Some(bias) = bias.filter(|_| fused_bias.is_none()) {
            self.add_channel_bias(&out, bias, s.batch * s.m, s.n, 1)?;
        }
        Ok(out)
    }

    /// The flash kernel for this attention, if one applies: the Hopper kernel on sm_90 for
    /// head sizes 64 and 128 when every operand is 16-byte aligned (`aligned`, as TMA
    /// needs), else the sm_80 kernel compiled for the next head size up.
    fn flash_kernel(&self, dtype: DType, s: &AttentionSpec, aligned: bool) -> Option<FlashKernel> {
        let (names, sm90) = match dtype {
            DType::BF16 => (&FLASH_BF16, &FLASH_SM90_BF16),
            DType::F16 => (&FLASH_F16, &FLASH_SM90_F16),
            DType::F32 => return None,
        };
        if !(s.head_dim.is_multiple_of(8) && s.scale > 0.0 && s.heads <= 65535 && s.batch <= 65535 && self.arch.0 >= 8) {
            return None;
        }
        if self.hopper_attention && self.arch == (9, 0) && aligned {
            if let Some(&(d, name)) = sm90.iter().find(|(d, _)| *d == s.head_dim) {
                return Some(FlashKernel {
                    name,
                    rows: FLASH_SM90_ROWS,
                    threads: 384,
                    smem: ((FLASH_SM90_ROWS + 2 * FLASH_SM90_STAGES * FLASH_SM90_KEYS) * d * 2 + 1024) as u32,
                    tma: true,
                });
            }
        }
        let i = FLASH_HEAD_DIMS.iter().position(|&d| d >= s.head_dim)?;
        Some(FlashKernel {
            name: names[i],
            rows: 16 * FLASH_WARPS,
            threads: 32 * FLASH_WARPS as u32,
            smem: ((16 * FLASH_WARPS + 4 * FLASH_KEYS_PER_TILE) * (FLASH_HEAD_DIMS[i] + 8) * 2) as u32,
            tma: false,
        })
    }
}

impl Backend for CudaBackend {
    type Storage = Arc<CudaBuffer>;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn supports(&self, dtype: DType) -> bool {
        dtype != DType::BF16 || self.arch.0 >= 8
    }

    fn half_dtype(&self) -> DType {
        if self.arch.0 >= 8 {
            DType::BF16
        } else {
            DType::F16
        }
    }

    fn upload(&self, host: &HostTensor) -> Result<CudaTensor> {
        let t = self.tensor(&host.shape, host.dtype())?;
        let bytes = host.data.as_bytes();
        if !bytes.is_empty() {
            // SAFETY: the destination holds at least `bytes.len()` bytes; pageable copies
            // return once the source has been staged, so `host` may go away after.
            unsafe { drv::memcpy_htod_async(Self::ptr(&t), bytes, self.stream.cu_stream()) }.map_err(|e| gpu_err("upload", e))?;
        }
        Ok(t)
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        self.tensor(shape, dtype)
    }

    fn read(&self, t: &CudaTensor) -> impl std::future::Future<Output = Result<HostTensor>> + use<'_> {
        let queued = self.queue_read(t);
        async move { queued?.finish() }
    }

    fn matmul(&self, a: &CudaTensor, b: &CudaTensor, bias: Option<&CudaTensor>, s: &MatmulSpec) -> Result<CudaTensor> {
        self.matmul_epilogue(a, b, bias, s, false, None)
    }

    fn matmul_then(&self, a: &CudaTensor, b: &CudaTensor, bias: Option<&CudaTensor>, s: &MatmulSpec, then: UnaryOp) -> Result<CudaTensor> {
        if then == UnaryOp::GeluTanh && bias.is_none_or(|t| t.dtype() == a.dtype()) {
            return self.matmul_epilogue(a, b, bias, s, true, None);
        }
        crate::backend::matmul_then_composed(self, a, b, bias, s, then)
    }

    /// The residual is cuBLASLt's C input (beta 1). A gate shared by every row is folded
    /// into the product: the weight's rows (output features) and the bias are scaled by it
    /// first, `h (g w)^T + g b = g (h w^T + b)`; one 16-bit rounding of `g w` stands in for
    /// the rounding of the product before the gate.
    fn matmul_residual(
        &self,
        a: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        s: &MatmulSpec,
        residual: &CudaTensor,
        gate: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let dtype = a.dtype();
        let same = |t: &CudaTensor| t.dtype() == dtype;
        let foldable =
            s.batch == 1 && s.trans_b && same(residual) && bias.is_none_or(same) && gate.is_none_or(|g| same(g) && g.numel() == s.n);
        if !foldable {
            return crate::backend::matmul_residual_composed(self, a, w, bias, s, residual, gate);
        }
        let _scope = self.scope("matmul + residual");
        let (w, bias) = match gate {
            None => (w.clone(), bias.cloned()),
            Some(g) => {
                let w = crate::ops::mul(self, &crate::ops::cast(self, w, dtype)?, &g.reshape(&[s.n, 1])?)?;
                let bias = bias.map(|t| crate::ops::mul(self, t, &g.reshape(&[s.n])?)).transpose()?;
                (w, bias)
            }
        };
        self.matmul_epilogue(a, &w, bias.as_ref(), s, false, Some(residual))?
            .reshape(residual.shape())
    }

    fn conv(&self, x: &CudaTensor, w: &CudaTensor, bias: Option<&CudaTensor>, s: &ConvSpec) -> Result<CudaTensor> {
        self.conv_frames(&[x], w, bias, s)
    }

    /// The implicit GEMM reads up to `CONV_PARTS` parts where they lie; other convolutions
    /// join the parts first.
    fn conv_frames(&self, parts: &[&CudaTensor], w: &CudaTensor, bias: Option<&CudaTensor>, s: &ConvSpec) -> Result<CudaTensor> {
        let dtype = parts[0].dtype();
        let pointwise = s.kernel_volume() == 1 && s.stride == [1; 3] && s.pad_lo == [0; 3] && s.pad_hi == [0; 3];
        let tma = self.tma_conv_wanted(dtype, s);
        let igemm = self.conv_igemm_kernel(dtype, s).filter(|_| !pointwise && !tma);
        let in_parts = (tma || igemm.is_some()) && parts.len() <= CONV_PARTS;
        if parts.len() > 1 && !in_parts {
            return crate::backend::conv_frames_composed(self, parts, w, bias, s);
        }
        let _scope = self.scope("conv");
        let w = crate::ops::cast(self, w, dtype)?;
        let out_dims = s.output();
        let out = self.tensor(&[s.batch, s.c_out, out_dims[0], out_dims[1], out_dims[2]], dtype)?;
        // Both GEMM kernels read the weights tap-major: [c_out, kt, kh, kw, c_in / groups].
        let tap_major = || crate::ops::permute(self, &w, &[0, 2, 3, 4, 1]);
        match igemm {
            _ if tma => self.conv_tma(parts, &tap_major()?, bias, s, &out)?,
            Some((name, rows)) => self.conv_igemm(parts, &tap_major()?, bias, s, &out, name, rows)?,
            None => self.conv_im2col(parts[0], &w, bias, s, &out, pointwise)?,
        }
        Ok(out)
    }

    fn norm(&self, x: &CudaTensor, gamma: Option<&CudaTensor>, beta: Option<&CudaTensor>, s: &NormSpec) -> Result<CudaTensor> {
        self.norm_fused(x, gamma, beta, s, None)
    }

    fn norm_then(
        &self,
        x: &CudaTensor,
        gamma: Option<&CudaTensor>,
        beta: Option<&CudaTensor>,
        s: &NormSpec,
        then: NormThen<'_, Self>,
    ) -> Result<CudaTensor> {
        self.norm_fused(x, gamma, beta, s, Some(then))
    }

    fn softmax(&self, x: &CudaTensor, s: &SoftmaxSpec) -> Result<CudaTensor> {
        let _scope = self.scope("softmax");
        let out = self.tensor(x.shape(), x.dtype())?;
        self.softmax_rows(x, &out, s.rows, s.cols, 1.0)?;
        Ok(out)
    }

    fn attention(&self, q: &CudaTensor, k: &CudaTensor, v: &CudaTensor, s: &AttentionSpec) -> Result<CudaTensor> {
        let _scope = self.scope("attention");
        let dtype = q.dtype();
        let (k, v) = (crate::ops::cast(self, k, dtype)?, crate::ops::cast(self, v, dtype)?);
        let (qp, kp, vp) = (Self::ptr(q), Self::ptr(&k), Self::ptr(&v));
        let flash = self.flash_kernel(dtype, s, [qp, kp, vp].iter().all(|p| p % 16 == 0));
        if flash.is_none() && s.tokens_first && q.numel() > 0 {
            // Only the flash kernels read tokens-first rows; the fallback allocates its own output.
            return crate::backend::attention_via_heads_first(self, q, &k, &v, s);
        }
        let out = self.tensor(q.shape(), dtype)?;
        let op = Self::ptr(&out);
        let (q_len, kv_len, head_dim) = (
            u32_of(s.q_len, "q_len")?,
            u32_of(s.kv_len, "kv_len")?,
            u32_of(s.head_dim, "head_dim")?,
        );
        if out.numel() == 0 {
            return Ok(out);
        }
        if let Some(fk) = flash {
            let f = self.function(Family::Attention, fk.name)?;
            let scale_log2 = s.scale * std::f32::consts::LOG2_E;
            let cfg = LaunchConfig {
                grid_dim: (
                    u32_of(s.q_len.div_ceil(fk.rows), "attention query blocks")?,
                    s.heads as u32,
                    s.batch as u32,
                ),
                block_dim: (fk.threads, 1, 1),
                shared_mem_bytes: fk.smem,
            };
            let (q_st, kv_st) = (RowStrides::of(s, s.q_len), RowStrides::of(s, s.kv_len));
            let maps = if fk.tma {
                let map = |p, len| attention_tensor_map(p, dtype, s, len, FLASH_SM90_KEYS);
                Some([map(qp, s.q_len)?, map(kp, s.kv_len)?, map(vp, s.kv_len)?])
            } else {
                None
            };
            let mut l = self.stream.launch_builder(&f);
            match &maps {
                Some([tq, tk, tv]) => l
                    .arg(tq)
                    .arg(tk)
                    .arg(tv)
                    .arg(&op)
                    .arg(&q_st)
                    .arg(&q_len)
                    .arg(&kv_len)
                    .arg(&scale_log2),
                None => l
                    .arg(&qp)
                    .arg(&kp)
                    .arg(&vp)
                    .arg(&op)
                    .arg(&q_st)
                    .arg(&kv_st)
                    .arg(&q_len)
                    .arg(&kv_len)
                    .arg(&head_dim)
                    .arg(&scale_log2),
            };
            // SAFETY: arguments match the chosen kernel's signature (tensor maps for the Hopper
            // kernels, pointers otherwise); the strides and maps describe the tensors' layout.
            unsafe { l.launch(cfg) }.map_err(|e| gpu_err(fk.name, e))?;
            return Ok(out);
        }
        if dtype != DType::F32 {
            self.attention_by_scores(q, &k, &v, &out, s)?;
            return Ok(out);
        }
        if s.head_dim > 512 {
            return Err(Error::Invalid(format!("CUDA attention: head_dim {} exceeds 512", s.head_dim)));
        }
        let f = self.function(Family::Attention, "attention_rows")?;
        let rows = s.batch_heads() * s.q_len;
        let (dt, bh, scale) = (dtype_code(dtype) as i32, u32_of(s.batch_heads(), "batch_heads")?, s.scale);
        let cfg = LaunchConfig {
            grid_dim: (u32_of(rows.div_ceil(8).max(1), "attention rows")?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(&f);
        l.arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&op)
            .arg(&dt)
            .arg(&bh)
            .arg(&q_len)
            .arg(&kv_len)
            .arg(&head_dim)
            .arg(&scale);
        // SAFETY: arguments match attention_rows' signature.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("attention_rows", e))?;
        Ok(out)
    }

    fn map(&self, inputs: &[&CudaTensor], out: &CudaTensor, s: &MapSpec) -> Result<()> {
        let _scope = self.scope(match s.op {
            MapOp::Copy => "map copy (cast, permute, concat)",
            MapOp::Unary(_) => "map unary",
            MapOp::Rope => "map rope",
            _ => "map binary/ternary",
        });
        let s = &s.collapsed();
        let total = numel(&s.shape);
        if total == 0 {
            return Ok(());
        }
        let (op, unary) = s.op.codes();
        let check = |v: &View, len: usize, what: &str, extent: usize| -> Result<()> {
            let start = vec![0; s.shape.len()];
            let (_, last) = v.span(&start, &s.shape);
            if last + extent > len || last + extent > u32::MAX as usize {
                return Err(Error::Invalid(format!("CUDA map: {what} view reaches element {last} of {len}")));
            }
            Ok(())
        };
        // Rope reads and writes pairs through input 0 and the output.
        check(&s.out, out.numel(), "output", s.op.extent())?;
        let mut p = MapParams {
            rank: s.shape.len() as u32,
            op,
            unary,
            total: u32_of(total, "map size")?,
            alpha: s.alpha,
            beta: s.beta,
            out_dtype: dtype_code(out.dtype()),
            out_offset: s.out.offset as u32,
            ..Default::default()
        };
        for (k, &d) in s.shape.iter().enumerate() {
            p.shape[k] = d as u32;
            p.out_stride[k] = s.out.strides[k] as u32;
        }
        let mut ptrs = [Self::ptr(out); 3];
        for i in 0..3 {
            p.in_div[i] = [1; 6];
            p.in_dtype[i] = p.out_dtype;
        }
        for (i, (t, v)) in inputs.iter().zip(&s.inputs).enumerate().take(3) {
            check(v, t.numel(), &format!("input {i}"), if i == 0 { s.op.extent() } else { 1 })?;
            ptrs[i] = Self::ptr(t);
            p.in_dtype[i] = dtype_code(t.dtype());
            p.in_offset[i] = v.offset as u32;
            for k in 0..s.shape.len() {
                p.in_stride[i][k] = v.strides[k] as u32;
                p.in_div[i][k] = v.div[k].max(1) as u32;
            }
        }
        if let Some((batch, rows, cols)) = transposition(s) {
            return self.transpose(inputs[0], out, s, batch, rows, cols);
        }
        // Elements per thread: 8 on the vector path, 4 pairs on rope's, else 1.
        let (vec, per_thread) = if vectorizable(s, out.dtype(), inputs) {
            (1, 8)
        } else if rope_vectorizable(s, out.dtype(), inputs) {
            (2, 4)
        } else {
            (0, 1)
        };
        p.vec = vec;
        let f = self.function(Family::Elementwise, "map_kernel")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(total / per_thread, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let optr = Self::ptr(out);
        let mut l = self.stream.launch_builder(&f);
        l.arg(&p).arg(&optr).arg(&ptrs[0]).arg(&ptrs[1]).arg(&ptrs[2]);
        // SAFETY: arguments match map_kernel's signature; every view was bounds-checked above.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("map_kernel", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Wan VAE's 3, 96 and 192 output channels take the by-positions tiles that fit them;
    /// multiples of 128 stay with conv_tma's; a few channels more than 8 do not take 8.
    #[test]
    fn hopper_convolution_tiles_pad_output_channels_least() {
        for (channels, tile) in [
            (3, 8),
            (8, 8),
            (9, 96),
            (40, 96),
            (96, 96),
            (128, 128),
            (160, 192),
            (192, 192),
            (384, 128),
            (320, 128),
        ] {
            assert_eq!(conv_tma_tile(channels), tile, "{channels} channels");
        }
    }

    #[test]
    fn convolution_kernels_parse_from_their_names() {
        for (name, kernel) in ConvKernel::NAMES {
            assert_eq!((name.parse::<ConvKernel>().unwrap(), kernel.name()), (kernel, name));
        }
        let e = "cudnn".parse::<ConvKernel>().unwrap_err().to_string();
        assert!(e.contains("`cudnn`") && e.contains("implicit-gemm"), "{e}");
    }

    /// The Wan VAE's 96- and 192-channel layers fill 96-row tiles; wider layers take 128 rows
    /// and SD's 320 channels 64, the tiles that waste no rows.
    #[test]
    fn convolution_tiles_pad_output_channels_least() {
        for (channels, rows) in [
            (3, 64),
            (40, 64),
            (96, 96),
            (192, 96),
            (320, 64),
            (384, 128),
            (640, 128),
            (200, 128),
        ] {
            assert_eq!(conv_tile_rows(channels), rows, "{channels} channels");
        }
        for (rows, elements, row) in CONV_IGEMM_BF16.iter().chain(CONV_IGEMM_F16) {
            assert!(elements.ends_with(&format!("_m{rows}")) && row.ends_with(&format!("_m{rows}")));
            assert!(row.contains("_rows_") && !elements.contains("_rows_"));
        }
    }

    /// With the H100's 50 MB of L2, the Wan VAE's convolutions at 480x832 (and at 60x104,
    /// 129 MB of columns) gather in the GEMM; the SD UNet's at 64x64 (24 MB) do not.
    #[test]
    fn implicit_gemm_takes_the_convolutions_whose_columns_outgrow_l2() {
        let conv = |c: usize, t: usize, h: usize, w: usize, k: [usize; 3]| ConvSpec {
            batch: 2,
            c_in: c,
            c_out: c,
            groups: 1,
            input: [t, h, w],
            kernel: k,
            stride: [1; 3],
            pad_lo: [0, 1, 1],
            pad_hi: [0, 1, 1],
        };
        let l2 = 50 << 20;
        assert!(implicit_gemm_pays(&conv(96, 3, 480, 832, [3; 3]), DType::BF16, l2));
        assert!(implicit_gemm_pays(&conv(384, 3, 60, 104, [3; 3]), DType::BF16, l2));
        assert!(!implicit_gemm_pays(&conv(320, 1, 64, 64, [1, 3, 3]), DType::F16, l2));
        assert!(!implicit_gemm_pays(&conv(1280, 1, 8, 8, [1, 3, 3]), DType::F16, l2));
        // The VAE's 3x3(x3) convolutions gather by rows; odd widths, wider kernels and
        // strides along x do not.
        assert!(row_gather(&conv(96, 3, 480, 832, [3; 3])));
        assert!(row_gather(&conv(96, 1, 60, 104, [1, 3, 3])));
        assert!(!row_gather(&conv(96, 1, 60, 100, [1, 3, 3])));
        let five = ConvSpec {
            pad_lo: [0, 2, 2],
            pad_hi: [0, 2, 2],
            ..conv(8, 1, 16, 16, [1, 5, 5])
        };
        assert!(!row_gather(&five));
        let strided = ConvSpec {
            stride: [1, 2, 2],
            ..conv(8, 1, 16, 32, [1, 3, 3])
        };
        assert!(!row_gather(&strided));
    }

    /// The Hopper convolution takes stride-1 single-group convolutions of several taps whose
    /// weight rows TMA can step; its padded copy holds the front and back padding of every
    /// axis, and its output positions, numbered in that copy, cover the output.
    #[test]
    fn hopper_convolution_reads_a_padded_copy() {
        let causal = ConvSpec {
            batch: 1,
            c_in: 96,
            c_out: 96,
            groups: 1,
            input: [3, 480, 832],
            kernel: [3; 3],
            stride: [1; 3],
            pad_lo: [0, 1, 1],
            pad_hi: [0, 1, 1],
        };
        assert!(tma_conv_takes(&causal));
        assert!(!tma_conv_takes(&ConvSpec {
            stride: [1, 2, 2],
            ..causal
        }));
        assert!(!tma_conv_takes(&ConvSpec { groups: 2, ..causal }));
        assert!(!tma_conv_takes(&ConvSpec {
            kernel: [1; 3],
            pad_lo: [0; 3],
            pad_hi: [0; 3],
            ..causal
        }));
        // 27 taps x 3 channels: rows of 162 bytes, not whole 16-byte units.
        assert!(!tma_conv_takes(&ConvSpec { c_in: 3, ..causal }));

        let first = ConvSpec {
            input: [1, 60, 104],
            pad_lo: [2, 1, 1],
            ..causal
        };
        let p = ConvPad::of(&first).unwrap();
        assert_eq!((p.cin, p.cin_pad), (96, 128));
        assert_eq!((p.tp, p.hp, p.wp), (3, 62, 106));
        assert_eq!(p.rows(), 3 * 62 * 106);
        // The last output position, (0, 59, 103), is row 59 * 106 + 103 of the padded copy,
        // and its last tap reads row (2 * 62 + 2) * 106 + 2 further: the copy's last row.
        let last = 59 * 106 + 103;
        assert_eq!(last + (2 * 62 + 2) * 106 + 2, p.rows() - 1);
        assert_eq!(first.output(), [1, 60, 104]);
    }

    /// Channels-first to channels-last and back (the Wan VAE's channel norms) and a weight
    /// reorder are transpositions; a plain copy, a broadcast and a three-way permute are not.
    #[test]
    fn permutes_of_the_last_two_dimensions_are_transpositions() {
        let copy = |shape: &[usize], perm: &[usize]| {
            let strides = contiguous_strides(shape);
            let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            MapSpec {
                op: MapOp::Copy,
                inputs: vec![View::strided(0, perm.iter().map(|&p| strides[p]).collect())],
                out: View::strided(0, contiguous_strides(&out_shape)),
                shape: out_shape,
                alpha: 1.0,
                beta: 0.0,
            }
            .collapsed()
        };
        assert_eq!(
            transposition(&copy(&[1, 96, 3, 60, 104], &[0, 2, 3, 4, 1])),
            Some((1, 96, 3 * 60 * 104))
        );
        assert_eq!(transposition(&copy(&[2, 3, 40, 96], &[0, 3, 1, 2])), Some((2, 120, 96)));
        assert_eq!(transposition(&copy(&[384, 384, 27], &[0, 2, 1])), Some((384, 384, 27)));
        assert_eq!(transposition(&copy(&[4, 5, 6], &[0, 1, 2])), None);
        assert_eq!(transposition(&copy(&[4, 5, 6], &[2, 0, 1])), Some((1, 4 * 5, 6)));
        assert_eq!(transposition(&copy(&[4, 5, 6], &[1, 2, 0])), Some((1, 4, 5 * 6)));
        assert_eq!(transposition(&copy(&[3, 4, 5, 6], &[3, 1, 0, 2])), None);
    }
}
