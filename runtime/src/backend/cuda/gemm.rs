//! GEMMs through cuBLASLt. The runtime's matrices are row-major; cuBLASLt's are
//! column-major, so `C[m, n] = op(A) op(B)` is issued as `C^T[n, m] = op(B)^T op(A)^T`, which
//! needs no data movement: a row-major matrix read column-major is its transpose. The bias
//! (one value per output column) then lands on cuBLASLt's rows, which is what its `BIAS`
//! epilogue adds, so linear layers get their bias fused.
//!
//! Descriptors and the chosen algorithm are built once per shape and kept: the denoising
//! loop repeats the same shapes, and the heuristic query costs more than a small GEMM.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{Error, Result};
use crate::tensor::DType;

/// cuBLASLt's workspace for Hopper (what NVIDIA recommends there; older GPUs use less).
const WORKSPACE_BYTES: usize = 32 << 20;

/// One GEMM in the runtime's row-major terms: `C[bi] (ldc) = op(A[bi]) op(B[bi]) (+ bias)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GemmShape {
    /// Storage of A and B; C is `c_dtype` (f32 for attention scores from 16-bit operands).
    pub dtype: DType,
    pub c_dtype: DType,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub a_batch_stride: usize,
    pub b_batch_stride: usize,
    /// Elements between consecutive stored rows of A and of B (the natural values are
    /// `natural_lda`/`natural_ldb`; larger ones address a column block of a wider matrix).
    pub lda: usize,
    pub ldb: usize,
    /// Elements between consecutive rows of C (>= n) and between batch items of C.
    pub ldc: usize,
    pub c_batch_stride: usize,
    pub bias: bool,
    /// GELU (tanh approximation) on each output element, after the bias.
    pub gelu: bool,
    /// Largest power of two (<= 256) dividing every operand's byte address.
    pub alignment: u32,
}

/// The column-major problem cuBLASLt sees for a row-major `GemmShape`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColumnMajor {
    /// cuBLASLt's A is our B and its B is our A.
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a_rows: u64,
    pub a_cols: u64,
    pub lda: i64,
    pub b_rows: u64,
    pub b_cols: u64,
    pub ldb: i64,
    pub ldc: i64,
}

pub(crate) fn natural_lda(trans_a: bool, m: usize, k: usize) -> usize {
    if trans_a {
        m
    } else {
        k
    }
}

pub(crate) fn natural_ldb(trans_b: bool, k: usize, n: usize) -> usize {
    if trans_b {
        k
    } else {
        n
    }
}

impl GemmShape {
    pub fn column_major(&self) -> ColumnMajor {
        let (m, n, k) = (self.m as u64, self.n as u64, self.k as u64);
        let (a_rows, a_cols) = if self.trans_b { (k, n) } else { (n, k) };
        let (b_rows, b_cols) = if self.trans_a { (m, k) } else { (k, m) };
        let (lda, ldb) = (self.ldb as i64, self.lda as i64);
        ColumnMajor {
            trans_a: self.trans_b,
            trans_b: self.trans_a,
            m: n,
            n: m,
            k,
            a_rows,
            a_cols,
            lda,
            b_rows,
            b_cols,
            ldb,
            ldc: self.ldc as i64,
        }
    }
}

pub(crate) fn alignment_of(ptrs: &[u64]) -> u32 {
    ptrs.iter()
        .map(|&p| if p == 0 { 256 } else { 1u64 << p.trailing_zeros().min(8) })
        .min()
        .unwrap_or(256) as u32
}

fn data_type(dtype: DType) -> sys::cudaDataType {
    match dtype {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

fn lt_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Gpu(format!("cuBLASLt {what}: {e:?}"))
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the handles were created by this plan and are destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

fn set_desc<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<()> {
    // SAFETY: `value` lives for the call and has the attribute's size.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, value as *const T as *const c_void, size_of::<T>()) }
        .map_err(|e| lt_err("descriptor", e))
}

fn layout(dtype: DType, rows: u64, cols: u64, ld: i64, batch: usize, stride: usize) -> Result<sys::cublasLtMatrixLayout_t> {
    let l = lt::create_matrix_layout(data_type(dtype), rows, cols, ld).map_err(|e| lt_err("layout", e))?;
    if batch > 1 {
        let count = batch as i32;
        let stride = stride as i64;
        // SAFETY: `l` is a live layout; values outlive the calls and have the attributes' sizes.
        unsafe {
            lt::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &count as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(|e| lt_err("layout", e))?;
            lt::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &stride as *const i64 as *const c_void,
                size_of::<i64>(),
            )
            .map_err(|e| lt_err("layout", e))?;
        }
    }
    Ok(l)
}

pub(crate) struct Gemm {
    handle: sys::cublasLtHandle_t,
    /// Owns the memory `workspace_ptr` points at.
    _workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<GemmShape, Plan>>,
}

// SAFETY: the handle is used under the plans lock or from the backend's one stream; cuBLASLt
// handles may be shared between threads.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl Gemm {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
        // SAFETY: the workspace is scratch for cuBLASLt; its contents never matter.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(|e| Error::Gpu(format!("cuBLASLt workspace: {e:?}")))?;
        let workspace_ptr = workspace.device_ptr(&stream).0;
        Ok(Self {
            handle,
            _workspace: workspace,
            workspace_ptr,
            stream,
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, s: &GemmShape) -> Result<Plan> {
        let cm = s.column_major();
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
            .map_err(|e| lt_err("descriptor", e))?;
        let a = layout(s.dtype, cm.a_rows, cm.a_cols, cm.lda, s.batch, s.b_batch_stride)?;
        let b = layout(s.dtype, cm.b_rows, cm.b_cols, cm.ldb, s.batch, s.a_batch_stride)?;
        let c = layout(s.c_dtype, cm.m, cm.n, cm.ldc, s.batch, s.c_batch_stride)?;
        let mut plan = Plan {
            desc,
            layouts: [a, b, c],
            // SAFETY: an all-zero algorithm is a valid placeholder until the heuristic fills it.
            algo: unsafe { std::mem::zeroed() },
        };
        let op = |t: bool| if t { 1i32 } else { 0i32 };
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &op(cm.trans_a),
        )?;
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &op(cm.trans_b),
        )?;
        // cuBLASLt's GELU is the tanh approximation, applied to the f32 result before rounding.
        let epilogue = match (s.bias, s.gelu) {
            (false, false) => None,
            (true, false) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
            (false, true) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU),
            (true, true) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS),
        };
        if let Some(epilogue) = epilogue {
            set_desc(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        }
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let heuristic = (|| {
            fn set<T>(pref: sys::cublasLtMatmulPreference_t, attr: sys::cublasLtMatmulPreferenceAttributes_t, v: T) -> Result<()> {
                // SAFETY: `pref` is live; `T` is the attribute's type (u64 workspace, u32 alignments).
                unsafe { lt::set_matmul_pref_attribute(pref, attr, &v as *const T as *const c_void, size_of::<T>()) }
                    .map_err(|e| lt_err("preference", e))
            }
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            set(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, WORKSPACE_BYTES as u64)?;
            for attr in [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                set(pref, attr, s.alignment)?;
            }
            // SAFETY: every handle passed is live.
            unsafe { lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref) }
                .map_err(|e| lt_err(&format!("no algorithm for {s:?}"), e))
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        plan.algo = heuristic?.algo;
        Ok(plan)
    }

    /// Runs `s` on device pointers `a`, `b`, `c` (and `bias` when `s.bias`), queued on the
    /// backend's stream; with `residual` (laid out like C), C = product + residual.
    pub fn run(&self, s: &GemmShape, a: u64, b: u64, c: u64, bias: u64, residual: Option<u64>) -> Result<()> {
        let mut plans = self.plans.lock().map_err(|_| Error::Gpu("cuBLASLt plan cache poisoned".into()))?;
        if !plans.contains_key(s) {
            let plan = self.plan(s)?;
            plans.insert(*s, plan);
        }
        let plan = &plans[s];
        if s.bias {
            set_desc(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias,
            )?;
        }
        let (alpha, beta) = (1.0f32, if residual.is_some() { 1.0f32 } else { 0.0 });
        // SAFETY: pointers address live device buffers of the sizes `s` describes (the
        // backend checked them); the plan's handles are live while the lock is held.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                plan.layouts[0],
                a as *const c_void,
                plan.layouts[1],
                residual.unwrap_or(c) as *const c_void,
                plan.layouts[2],
                c as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                self.workspace_ptr as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err(&format!("matmul {s:?}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(trans_a: bool, trans_b: bool) -> GemmShape {
        GemmShape {
            dtype: DType::BF16,
            c_dtype: DType::BF16,
            batch: 1,
            m: 3,
            n: 5,
            k: 7,
            trans_a,
            trans_b,
            a_batch_stride: 0,
            b_batch_stride: 0,
            lda: natural_lda(trans_a, 3, 7),
            ldb: natural_ldb(trans_b, 7, 5),
            ldc: 5,
            c_batch_stride: 15,
            bias: false,
            gelu: false,
            alignment: 256,
        }
    }

    /// The column-major problem must describe the same product: evaluate both on small
    /// integer matrices with plain loops and compare.
    #[test]
    fn column_major_mapping_computes_the_row_major_product() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let s = shape(ta, tb);
            let (m, n, k) = (s.m, s.n, s.k);
            let a: Vec<i64> = (0..m * k).map(|i| (i as i64 * 7 % 11) - 5).collect();
            let b: Vec<i64> = (0..k * n).map(|i| (i as i64 * 5 % 13) - 6).collect();
            let a_at = |i: usize, kk: usize| if ta { a[kk * m + i] } else { a[i * k + kk] };
            let b_at = |kk: usize, j: usize| if tb { b[j * k + kk] } else { b[kk * n + j] };
            let cm = s.column_major();
            // Column-major element (r, c) of a matrix with leading dimension ld is data[c*ld + r].
            let col = |data: &[i64], ld: i64, r: u64, c: u64| data[(c as i64 * ld + r as i64) as usize];
            let op_a = |r: u64, c: u64| if cm.trans_a { col(&b, cm.lda, c, r) } else { col(&b, cm.lda, r, c) };
            let op_b = |r: u64, c: u64| if cm.trans_b { col(&a, cm.ldb, c, r) } else { col(&a, cm.ldb, r, c) };
            assert_eq!((cm.m, cm.n, cm.k), (n as u64, m as u64, k as u64));
            let mut out = vec![0i64; m * n];
            for r in 0..cm.m {
                for c in 0..cm.n {
                    let v: i64 = (0..cm.k).map(|kk| op_a(r, kk) * op_b(kk, c)).sum();
                    out[(c as i64 * cm.ldc + r as i64) as usize] = v;
                }
            }
            for i in 0..m {
                for j in 0..n {
                    let want: i64 = (0..k).map(|kk| a_at(i, kk) * b_at(kk, j)).sum();
                    assert_eq!(out[i * n + j], want, "trans_a {ta} trans_b {tb} at ({i}, {j})");
                }
            }
            // The stored shapes must match the buffers: rows*cols == element count.
            assert_eq!(cm.a_rows * cm.a_cols, (k * n) as u64);
            assert_eq!(cm.b_rows * cm.b_cols, (m * k) as u64);
        }
    }

    #[test]
    fn alignment_is_the_weakest_operand() {
        assert_eq!(alignment_of(&[0x1000, 0x2000]), 256);
        assert_eq!(alignment_of(&[0x1000, 0x2002]), 2);
        assert_eq!(alignment_of(&[0x1010, 0]), 16);
    }
}
