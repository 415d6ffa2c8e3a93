//! Shared helpers for the cross-backend tests: seeded random inputs, the wgpu and CUDA
//! backends under test, and a comparison of one op body on the CPU reference and on a device.

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use sdlite_runtime::{
    Backend, ConvKernel, CpuBackend, CudaBackend, CudaOptions, DType, HostData, HostTensor, Result, Tensor, WgpuBackend, WgpuOptions,
};

/// Uniform random values in [-scale, scale), stored as `dtype`.
pub fn random(shape: &[usize], dtype: DType, scale: f32, seed: u64) -> HostTensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    HostTensor::new(shape, HostData::from_f32(dtype, values)).expect("shape matches data")
}

/// A fresh seed per call, so every run sees new inputs; printed on failure for replay.
pub fn fresh_seed() -> u64 {
    std::env::var("SDLITE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
}

fn open(options: WgpuOptions) -> Option<WgpuBackend> {
    match pollster::block_on(WgpuBackend::new(options)) {
        Ok(b) => {
            eprintln!("testing on {}", b.name());
            Some(b)
        }
        // In CI a missing adapter is a failure, never a silent skip.
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI=true but no wgpu adapter: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: no wgpu adapter ({e}); install mesa-vulkan-drivers for lavapipe");
            None
        }
    }
}

/// The adapter with everything it grants.
pub fn gpu() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    B.get_or_init(|| open(WgpuOptions::default())).as_ref()
}

/// The adapter with everything it grants, running the other kernel variant from `gpu()`'s
/// (`WgpuOptions::software_kernels`: the GPU kernels on lavapipe, the software-adapter
/// ones on a GPU), so every machine tests both.
pub fn gpu_other_kernels() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    B.get_or_init(|| {
        let software = gpu()?.software_kernels();
        open(WgpuOptions {
            software_kernels: Some(!software),
            ..Default::default()
        })
    })
    .as_ref()
}

/// The adapter with tiny chunks (4 KiB bindings) and attention passes of at most 16 keys,
/// so every op's splitting paths run on small inputs.
pub fn gpu_tiny_chunks() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    B.get_or_init(|| {
        open(WgpuOptions {
            max_chunk_bytes: Some(4096),
            attention_keys_per_pass: Some(16),
            ..Default::default()
        })
    })
    .as_ref()
}

/// The adapter with exactly WebGPU's default limits (128 MiB bindings, 256 MiB buffers,
/// 16 KiB workgroup memory), as most browsers grant, with the GPU kernels browsers run;
/// attention passes of at most 16 keys, so the split-merging kernel also runs on tensors
/// over 128 MiB.
pub fn gpu_default_limits() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    B.get_or_init(|| {
        open(WgpuOptions {
            default_limits: true,
            attention_keys_per_pass: Some(16),
            software_kernels: Some(false),
            ..Default::default()
        })
    })
    .as_ref()
}

/// The CUDA device with every new buffer poisoned (NaN bytes), or none on a machine without
/// CUDA, which is every CI machine; with SDLITE_REQUIRE_CUDA=1 (the GPU machine) a missing
/// device is a failure instead.
pub fn cuda() -> Option<&'static CudaBackend> {
    static B: OnceLock<Option<CudaBackend>> = OnceLock::new();
    B.get_or_init(|| open_cuda(true)).as_ref()
}

/// The same device running the portable sm_80 attention kernel even on Hopper, so that
/// kernel stays tested there too.
pub fn cuda_portable_attention() -> Option<&'static CudaBackend> {
    static B: OnceLock<Option<CudaBackend>> = OnceLock::new();
    B.get_or_init(|| open_cuda(false)).as_ref()
}

/// The same device convolving every 16-bit case through its implicit-GEMM kernel, which by
/// default it keeps for convolutions larger than test sizes.
pub fn cuda_implicit_gemm() -> Option<&'static CudaBackend> {
    static B: OnceLock<Option<CudaBackend>> = OnceLock::new();
    B.get_or_init(|| open_cuda_with(true, ConvKernel::ImplicitGemm)).as_ref()
}

/// The same device convolving every 16-bit case its Hopper kernel takes through that kernel
/// (sm_90 devices; elsewhere as `cuda_implicit_gemm`).
pub fn cuda_hopper_conv() -> Option<&'static CudaBackend> {
    static B: OnceLock<Option<CudaBackend>> = OnceLock::new();
    B.get_or_init(|| open_cuda_with(true, ConvKernel::Hopper)).as_ref()
}

/// A CUDA backend of the caller's own, for tests that count what the backend does: None
/// without a device, a panic then if SDLITE_REQUIRE_CUDA is set.
pub fn open_cuda(hopper_attention: bool) -> Option<CudaBackend> {
    open_cuda_with(hopper_attention, ConvKernel::Auto)
}

fn open_cuda_with(hopper_attention: bool, conv: ConvKernel) -> Option<CudaBackend> {
    match CudaBackend::new(&CudaOptions {
        poison: true,
        hopper_attention,
        conv,
        ..Default::default()
    }) {
        Ok(b) => {
            eprintln!("testing on {} (Hopper attention {hopper_attention})", b.name());
            Some(b)
        }
        Err(e) if std::env::var_os("SDLITE_REQUIRE_CUDA").is_some() => panic!("SDLITE_REQUIRE_CUDA is set but: {e}"),
        Err(e) => {
            eprintln!("no CUDA device ({e}): CUDA cases not run");
            None
        }
    }
}

/// A backend under test, and which operand sizes it can run without splitting.
pub trait TestDevice: Backend + Sized {
    /// Whether an operand range of `elems` f32 elements that a kernel cannot split (a weight
    /// matrix, one head's keys, one query tile) fits one dispatch.
    fn fits(&self, _elems: usize) -> bool {
        true
    }
}

/// wgpu: always at real binding sizes, but not always with 4 KiB chunks.
impl TestDevice for WgpuBackend {
    fn fits(&self, elems: usize) -> bool {
        elems <= self.chunk_bytes() as usize / 4
    }
}

impl TestDevice for CudaBackend {}

/// See `HostTensor::relative_error`; shapes must agree.
pub fn relative_error(got: &HostTensor, want: &HostTensor) -> f32 {
    assert_eq!(got.shape, want.shape, "shapes differ");
    got.relative_error(want)
}

pub type Body<B> = fn(&B, &[Tensor<B>], &[usize]) -> Result<Tensor<B>>;

/// Runs one op body on the CPU reference and on `gpu` with the same inputs and asserts the
/// relative error is at most `tol`. Returns the error.
pub fn compare<G: Backend>(
    gpu: &G,
    name: &str,
    tol: f32,
    inputs: &[HostTensor],
    params: &[usize],
    cpu_body: Body<CpuBackend>,
    gpu_body: Body<G>,
) -> f32 {
    let cpu = CpuBackend;
    let xs: Vec<_> = inputs.iter().map(|h| cpu.upload(h).expect("cpu upload")).collect();
    let want = cpu_body(&cpu, &xs, params).unwrap_or_else(|e| panic!("{name}: cpu failed: {e}"));
    let want = pollster::block_on(cpu.read(&want)).expect("cpu read");
    let gs: Vec<_> = inputs.iter().map(|h| gpu.upload(h).expect("gpu upload")).collect();
    let got = gpu_body(gpu, &gs, params).unwrap_or_else(|e| panic!("{name}: {} failed: {e}", gpu.name()));
    let got = pollster::block_on(gpu.read(&got)).unwrap_or_else(|e| panic!("{name}: {} read failed: {e}", gpu.name()));
    let err = relative_error(&got, &want);
    eprintln!("{name}: relative error {err:.2e} (tolerance {tol:.0e})");
    assert!(
        err <= tol,
        "{name}: {} differs from the CPU reference: relative error {err:e} > {tol:e}",
        gpu.name()
    );
    err
}

/// `check!(gpu, "name", tol, inputs, params, |b, x, p| body)`: `body` is compiled once per
/// backend, so it may only use its three arguments.
#[macro_export]
macro_rules! check {
    ($gpu:expr, $name:expr, $tol:expr, $inputs:expr, $params:expr, |$b:ident, $x:ident, $p:ident| $body:expr) => {{
        #[allow(unused_variables)]
        fn body<B: sdlite_runtime::Backend>(
            $b: &B,
            $x: &[sdlite_runtime::Tensor<B>],
            $p: &[usize],
        ) -> sdlite_runtime::Result<sdlite_runtime::Tensor<B>> {
            $body
        }
        $crate::compare($gpu, &$name, $tol, &$inputs, &$params, body::<sdlite_runtime::CpuBackend>, body)
    }};
}
