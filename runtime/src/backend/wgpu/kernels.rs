//! The primitives on the wgpu backend: WGSL source assembly (binding glue + the kernel
//! family files in `shaders/`), tile configuration, and per-op dispatch planning.

use std::fmt::Write as _;

use super::plan::{grid_1d, split_boxes, split_ranges, window, IterBox, MAX_GRID};
use super::{GpuStorage, WgpuBackend, WgpuTensor};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::spec::{AttentionSpec, ConvSpec, MapSpec, MatmulSpec, NormKind, NormSpec, SoftmaxSpec, MAX_RANK};
use crate::tensor::{DType, HostTensor};

const GEMM: &str = include_str!("../../../../shaders/gemm.wgsl");
const MATMUL: &str = include_str!("../../../../shaders/matmul.wgsl");
const CONV: &str = include_str!("../../../../shaders/conv.wgsl");
const ATTENTION: &str = include_str!("../../../../shaders/attention.wgsl");
const ATTENTION_COMBINE: &str = include_str!("../../../../shaders/attention_combine.wgsl");
const NORM: &str = include_str!("../../../../shaders/norm.wgsl");
const SOFTMAX: &str = include_str!("../../../../shaders/softmax.wgsl");
const ELEMENTWISE: &str = include_str!("../../../../shaders/elementwise.wgsl");

/// Loop iterations one invocation of a software-adapter kernel may run, in all its loops
/// together: lavapipe ends an invocation after 65535 of them (nested loops count), so the
/// `rows` kernels size their work to stay under this, with a margin.
const SOFTWARE_LOOP_BUDGET: usize = 60_000;

/// Output rows per invocation of gemm.wgsl's `rows` entry point (its RM; the columns are
/// one vec4) and invocations per workgroup (its ROWS_WG), so a workgroup covers
/// GEMM_ROWS_BLOCK: ROWS_WG * RM rows and 4 columns.
const GEMM_ROWS_RM: usize = 4;
const GEMM_ROWS_WG: usize = 64;
const GEMM_ROWS_BLOCK: (usize, usize) = (GEMM_ROWS_WG * GEMM_ROWS_RM, 4);

/// One tensor parameter of a kernel, in binding order.
struct Arg<'a> {
    name: &'static str,
    tensor: Option<&'a WgpuTensor>,
    write: bool,
}

fn read<'a>(name: &'static str, tensor: Option<&'a WgpuTensor>) -> Arg<'a> {
    Arg {
        name,
        tensor,
        write: false,
    }
}

fn write<'a>(name: &'static str, tensor: &'a WgpuTensor) -> Arg<'a> {
    Arg {
        name,
        tensor: Some(tensor),
        write: true,
    }
}

fn wgsl_type(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// A kernel instance: its family's WGSL files, constants and tensor parameters.
struct Kernel<'a> {
    sources: &'a [&'a str],
    entry: &'static str,
    consts: Vec<(&'static str, String)>,
    args: Vec<Arg<'a>>,
}

impl Kernel<'_> {
    fn key(&self) -> String {
        let mut key = format!("{:p} {}", self.sources[0], self.entry);
        for (name, value) in &self.consts {
            let _ = write!(key, " {name}={value}");
        }
        for a in &self.args {
            let _ = write!(
                key,
                " {}:{:?}:{}:{}",
                a.name,
                a.tensor.map(|t| t.dtype),
                a.write,
                a.tensor.map_or(0, |t| t.storage.chunks.len().min(2))
            );
        }
        key
    }

    /// The glue every family file relies on: constants, the window uniform `WIN`, the
    /// family's `Params` uniform `P`, and for each tensor `NAME` its two window bindings,
    /// `NAME_ld(i) -> f32`, `NAME_st(i, v)` (writable tensors) and `HAS_NAME`. An absent
    /// optional tensor gets `HAS_NAME = false` and a loader returning 0.
    fn source(&self) -> String {
        let mut s = String::new();
        if self.args.iter().any(|a| a.tensor.is_some_and(|t| t.dtype == DType::F16)) {
            s.push_str("enable f16;\n");
        }
        for (name, value) in &self.consts {
            let ty = if value == "true" || value == "false" { "bool" } else { "u32" };
            let suffix = if ty == "u32" { "u" } else { "" };
            let _ = writeln!(s, "const {name}: {ty} = {value}{suffix};");
        }
        s.push_str("@group(0) @binding(0) var<uniform> WIN: array<vec4<u32>, 4>;\n");
        s.push_str("@group(0) @binding(1) var<uniform> P: Params;\n");
        let (mut slot, mut binding) = (0u32, 2u32);
        for a in &self.args {
            let n = a.name;
            let upper = n.to_uppercase();
            let Some(t) = a.tensor else {
                let _ = writeln!(
                    s,
                    "const HAS_{upper}: bool = false;\nfn {n}_ld(i: u32) -> f32 {{ return 0.0; }}\nfn {n}_st(i: u32, v: f32) {{}}"
                );
                continue;
            };
            let ty = wgsl_type(t.dtype);
            let access = if a.write { "read_write" } else { "read" };
            let (base, split) = if slot % 2 == 0 { ("x", "y") } else { ("z", "w") };
            let win = format!("WIN[{}u]", slot / 2);
            let _ = writeln!(
                s,
                "const HAS_{upper}: bool = true;\n@group(0) @binding({binding}) var<storage, {access}> {n}_lo: array<{ty}>;"
            );
            if t.storage.chunks.len() > 1 {
                let _ = writeln!(
                    s,
                    "@group(0) @binding({}) var<storage, {access}> {n}_hi: array<{ty}>;\n\
                     fn {n}_ld(i: u32) -> f32 {{ let j = i - {win}.{base}; let s = {win}.{split}; \
                     if (j < s) {{ return f32({n}_lo[j]); }} return f32({n}_hi[j - s]); }}",
                    binding + 1
                );
                if a.write {
                    let _ = writeln!(
                        s,
                        "fn {n}_st(i: u32, v: f32) {{ let j = i - {win}.{base}; let s = {win}.{split}; \
                         if (j < s) {{ {n}_lo[j] = {ty}(v); }} else {{ {n}_hi[j - s] = {ty}(v); }} }}"
                    );
                }
                binding += 2;
            } else {
                // A single-chunk tensor needs one binding; its window always starts at 0.
                let _ = writeln!(s, "fn {n}_ld(i: u32) -> f32 {{ return f32({n}_lo[i]); }}");
                if a.write {
                    let _ = writeln!(s, "fn {n}_st(i: u32, v: f32) {{ {n}_lo[i] = {ty}(v); }}");
                }
                binding += 1;
            }
            slot += 1;
        }
        for src in self.sources {
            s.push_str(src);
        }
        s
    }
}

/// Inclusive element range `(first, last)` a dispatch touches in one tensor.
type Span = (usize, usize);

impl WgpuBackend {
    /// Runs `kernel` once per planned dispatch. `spans` gives, for each present tensor in
    /// binding order, the range the dispatch touches.
    fn run(&self, op: &'static str, kernel: &Kernel, dispatches: impl IntoIterator<Item = (Vec<Span>, Vec<u32>, [u32; 3])>) -> Result<()> {
        let present: Vec<(&GpuStorage, bool)> = kernel
            .args
            .iter()
            .filter_map(|a| a.tensor.map(|t| (&*t.storage, a.write)))
            .collect();
        let layout: Vec<(bool, bool)> = present.iter().map(|(st, w)| (*w, st.chunks.len() > 1)).collect();
        let p = self.pipeline(&kernel.key(), kernel.entry, || kernel.source(), &layout);
        for (spans, params, groups) in dispatches {
            let mut windows = Vec::with_capacity(present.len());
            for (&(st, w), &(first, last)) in present.iter().zip(&spans) {
                let chunk = window(st, first, last).ok_or_else(|| Error::TooLarge {
                    op,
                    what: format!("elements {first}..={last} of one operand"),
                    elems: last + 1 - first,
                    limit_bytes: self.chunk_bytes,
                })?;
                windows.push((st, chunk, w));
            }
            self.dispatch(&p, &windows, &params, groups);
        }
        Ok(())
    }

    /// Whether every span fits a window of its tensor.
    fn fits(tensors: &[&GpuStorage], spans: &[Span]) -> bool {
        tensors.iter().zip(spans).all(|(st, &(a, b))| window(st, a, b).is_some())
    }

    /// Attention as matmul, softmax, matmul over blocks of query rows, each block's scores
    /// kept under 64 MiB: for head dims whose tiles do not fit workgroup memory.
    fn attention_unfused(&self, q: &WgpuTensor, k: &WgpuTensor, v: &WgpuTensor, s: &AttentionSpec) -> Result<WgpuTensor> {
        use crate::ops;
        let (bh, d) = (s.batch_heads(), s.head_dim);
        let q3 = q.reshape(&[bh, s.q_len, d])?;
        let (k3, v3) = (k.reshape(&[bh, s.kv_len, d])?, v.reshape(&[bh, s.kv_len, d])?);
        let rows = ((64usize << 20) / (4 * bh * s.kv_len)).clamp(1, s.q_len);
        let mut parts = Vec::new();
        for r0 in (0..s.q_len).step_by(rows) {
            let n = rows.min(s.q_len - r0);
            // Scaling q first keeps half-precision scores in range.
            let qb = ops::scale(self, &ops::slice(self, &q3, 1, r0, n)?, s.scale, 0.0)?;
            let probs = ops::softmax(self, &ops::matmul(self, &qb, &k3, None, false, true)?)?;
            parts.push(ops::matmul(self, &probs, &v3, None, false, false)?);
        }
        ops::concat(self, &parts.iter().collect::<Vec<_>>(), 1)?.reshape(q.shape())
    }

    fn too_large(&self, op: &'static str, what: &str, elems: usize) -> Error {
        Error::TooLarge {
            op,
            what: what.into(),
            elems,
            limit_bytes: self.chunk_bytes,
        }
    }

    fn check(&self, op: &'static str, tensors: &[&WgpuTensor]) -> Result<()> {
        for t in tensors {
            if !self.supports(t.dtype) {
                return Err(Error::UnsupportedDType {
                    op,
                    dtype: t.dtype,
                    backend: self.name(),
                });
            }
        }
        Ok(())
    }

    /// The entry point of a row-wise kernel (softmax.wgsl, norm.wgsl) for rows of `len`
    /// elements and the rows one workgroup takes: `rows` (an invocation per row) for short
    /// rows on software adapters, else `main` (a workgroup per row).
    fn row_entry(&self, len: usize) -> (&'static str, usize) {
        // The `rows` entry points make three passes over a row (softmax adds one loop
        // iteration per 128 columns, within the budget's margin).
        if self.software_kernels && 3 * len <= SOFTWARE_LOOP_BUDGET {
            ("rows", 64)
        } else {
            ("main", 1)
        }
    }

    /// GEMM tile: 128 when that still gives enough workgroups to fill a GPU, else 64 (on
    /// software adapters: 128 unless its padding doubles the work, as a CPU core has few
    /// workgroups to fill and gains from the larger register block); the deepest K step
    /// (and bank-conflict padding) that fits the workgroup memory limit.
    fn gemm_consts(&self, m: usize, n: usize) -> Vec<(&'static str, String)> {
        let padded = |t: usize| m.next_multiple_of(t) * n.next_multiple_of(t);
        let large = if self.software_kernels {
            padded(128) < 2 * padded(64)
        } else {
            m.div_ceil(128) * n.div_ceil(128) >= 64
        };
        let tile = if large { 128 } else { 64 };
        let limit = self.limits.max_compute_workgroup_storage_size as usize;
        let (bk, pad) = [(16, 4), (16, 0), (8, 4), (8, 0)]
            .into_iter()
            .find(|(bk, pad)| 2 * bk * (tile + pad) * 4 <= limit)
            .unwrap_or((8, 0));
        vec![
            ("TILE", tile.to_string()),
            ("TM", (tile / 16).to_string()),
            ("BK", bk.to_string()),
            ("PAD", pad.to_string()),
            ("RM", GEMM_ROWS_RM.to_string()),
            ("ROWS_WG", GEMM_ROWS_WG.to_string()),
        ]
    }
}

fn flag(v: bool) -> String {
    v.to_string()
}

impl Backend for WgpuBackend {
    type Storage = std::sync::Arc<GpuStorage>;

    fn name(&self) -> String {
        format!(
            "wgpu {:?}: {}, {} kernels",
            self.info.backend,
            self.info.name,
            self.kernel_variant()
        )
    }

    fn supports(&self, dtype: DType) -> bool {
        match dtype {
            DType::F32 => true,
            DType::F16 => self.f16,
            DType::BF16 => false,
        }
    }

    fn half_dtype(&self) -> DType {
        if self.f16 {
            DType::F16
        } else {
            DType::F32
        }
    }

    fn upload(&self, host: &HostTensor) -> Result<WgpuTensor> {
        if self.supports(host.dtype()) {
            return self.upload_host(host);
        }
        // bf16 weights (and f16 without shader-f16) are widened once on upload.
        let dtype = if self.f16 { DType::F16 } else { DType::F32 };
        self.upload_host(&HostTensor {
            shape: host.shape.clone(),
            data: host.data.convert(dtype),
        })
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<WgpuTensor> {
        self.new_tensor(shape, dtype)
    }

    fn read(&self, t: &WgpuTensor) -> impl std::future::Future<Output = Result<HostTensor>> + use<'_> {
        self.read_host(t)
    }

    fn matmul(&self, a: &WgpuTensor, b: &WgpuTensor, bias: Option<&WgpuTensor>, s: &MatmulSpec) -> Result<WgpuTensor> {
        let op = "matmul";
        self.check(op, &[a, b])?;
        let out = self.new_tensor(&[s.batch, s.m, s.n], a.dtype)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let mut consts = self.gemm_consts(s.m, s.n);
        let tile: usize = consts[0].1.parse().expect("tile constant");
        consts.extend([
            ("A_K_FAST", flag(!s.trans_a)),
            ("B_K_FAST", flag(s.trans_b)),
            ("TRANS_A", flag(s.trans_a)),
            ("TRANS_B", flag(s.trans_b)),
        ]);
        let kernel = Kernel {
            entry: "main",
            sources: &[MATMUL, GEMM],
            consts,
            args: vec![read("a", Some(a)), read("b", Some(b)), read("bias", bias), write("out", &out)],
        };
        let tensors: Vec<&GpuStorage> = kernel.args.iter().filter_map(|a| a.tensor.map(|t| &*t.storage)).collect();
        let k_last = s.k.saturating_sub(1);
        // Spans for batches b0..b1 and rows r0..r1 (full rows when several batches).
        let spans = |b0: usize, b1: usize, r0: usize, r1: usize| -> Vec<Span> {
            let a_span = if s.trans_a {
                (b0 * s.a_batch_stride + r0, (b1 - 1) * s.a_batch_stride + k_last * s.m + r1 - 1)
            } else {
                (b0 * s.a_batch_stride + r0 * s.k, (b1 - 1) * s.a_batch_stride + r1 * s.k - 1)
            };
            let mut v = vec![a_span, (b0 * s.b_batch_stride, (b1 - 1) * s.b_batch_stride + s.k * s.n - 1)];
            if bias.is_some() {
                v.push((0, s.n - 1));
            }
            v.push((b0 * s.m * s.n + r0 * s.n, (b1 - 1) * s.m * s.n + r1 * s.n - 1));
            v
        };
        let m_tiles = s.m.div_ceil(tile);
        let n_tiles = s.n.div_ceil(tile) as u32;
        let params = |b0: usize, r0: usize, rows: usize| -> Vec<u32> {
            [s.m, s.n, s.k, r0, rows, b0, s.a_batch_stride, s.b_batch_stride]
                .map(|v| v as u32)
                .to_vec()
        };
        let mut dispatches = Vec::new();
        let whole = (m_tiles <= MAX_GRID)
            .then(|| split_ranges(s.batch, MAX_GRID, |b0, b1| Self::fits(&tensors, &spans(b0, b1, 0, s.m))))
            .flatten();
        if let Some(ranges) = whole {
            for (b0, b1) in ranges {
                dispatches.push((
                    spans(b0, b1, 0, s.m),
                    params(b0, 0, s.m),
                    [n_tiles, m_tiles as u32, (b1 - b0) as u32],
                ));
            }
        } else {
            // One batch at a time, in row ranges of any length: the kernel takes any row0.
            for bi in 0..s.batch {
                let ranges = split_ranges(s.m, MAX_GRID * tile, |r0, r1| Self::fits(&tensors, &spans(bi, bi + 1, r0, r1)))
                    .ok_or_else(|| self.too_large(op, "one row with its weight matrix", s.k * s.n))?;
                for (r0, r1) in ranges {
                    dispatches.push((
                        spans(bi, bi + 1, r0, r1),
                        params(bi, r0, r1 - r0),
                        [n_tiles, (r1 - r0).div_ceil(tile) as u32, 1],
                    ));
                }
            }
        }
        self.run(op, &kernel, dispatches)?;
        Ok(out)
    }

    fn conv(&self, x: &WgpuTensor, w: &WgpuTensor, bias: Option<&WgpuTensor>, s: &ConvSpec) -> Result<WgpuTensor> {
        let op = "conv";
        self.check(op, &[x, w])?;
        let [to, ho, wo] = s.output();
        let out = self.new_tensor(&[s.batch, s.c_out, to, ho, wo], x.dtype)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let plane = to * ho * wo;
        let in_plane: usize = s.input.iter().product();
        let kvol = s.kernel_volume();
        let (cin_g, cout_g) = (s.c_in / s.groups, s.c_out / s.groups);
        let k_full = cin_g * kvol;
        let mut consts = self.gemm_consts(plane, cout_g);
        let tile: usize = consts[0].1.parse().expect("tile constant");
        consts.extend([("A_K_FAST", flag(false)), ("B_K_FAST", flag(true))]);
        consts.extend([("KT", s.kernel[0]), ("KH", s.kernel[1]), ("KW", s.kernel[2])].map(|(k, v)| (k, v.to_string())));
        // Software adapters take gemm.wgsl's `rows`, with few enough input channels a
        // dispatch that its K * (RM + 5) loop iterations stay within the loop budget (more
        // channels accumulate in passes).
        let rows_cin = SOFTWARE_LOOP_BUDGET / (GEMM_ROWS_RM + 5) / kvol;
        let (entry, (row_block, col_block), cin_max) = if self.software_kernels && rows_cin > 0 {
            ("rows", GEMM_ROWS_BLOCK, rows_cin)
        } else {
            ("main", (tile, tile), usize::MAX)
        };
        let kernel = Kernel {
            entry,
            sources: &[CONV, GEMM],
            consts,
            args: vec![read("x", Some(x)), read("w", Some(w)), read("bias", bias), write("out", &out)],
        };
        let (xs, ws, os) = (&*x.storage, &*w.storage, &*out.storage);
        let m_tiles = plane.div_ceil(row_block);
        if m_tiles > MAX_GRID {
            return Err(self.too_large(op, "one output channel plane", plane));
        }
        let mut dispatches = Vec::new();
        for bi in 0..s.batch {
            for g in 0..s.groups {
                let xb = (bi * s.c_in + g * cin_g) * in_plane;
                let ob = (bi * s.c_out + g * cout_g) * plane;
                let wb = g * cout_g * k_full;
                let x_span = |c0: usize, c1: usize| (xb + c0 * in_plane, xb + c1 * in_plane - 1);
                let o_span = |n0: usize, n1: usize| (ob + n0 * plane, ob + n1 * plane - 1);
                let w_span =
                    |n0: usize, n1: usize, c0: usize, c1: usize| (wb + n0 * k_full + c0 * kvol, wb + (n1 - 1) * k_full + c1 * kvol - 1);
                let c_ranges = split_ranges(cin_g, cin_max, |c0, c1| window(xs, x_span(c0, c1).0, x_span(c0, c1).1).is_some())
                    .ok_or_else(|| self.too_large(op, "one input channel plane", in_plane))?;
                let n_ranges = split_ranges(cout_g, MAX_GRID * col_block, |n0, n1| {
                    window(os, o_span(n0, n1).0, o_span(n0, n1).1).is_some()
                })
                .ok_or_else(|| self.too_large(op, "one output channel plane", plane))?;
                for &(n0, n1) in &n_ranges {
                    for (ci, &(c0, c1)) in c_ranges.iter().enumerate() {
                        let wsp = w_span(n0, n1, c0, c1);
                        if window(ws, wsp.0, wsp.1).is_none() {
                            return Err(self.too_large(op, "the weights of one dispatch", wsp.1 + 1 - wsp.0));
                        }
                        let mut spans = vec![x_span(c0, c1), wsp];
                        if bias.is_some() {
                            let bb = g * cout_g;
                            spans.push((bb + n0, bb + n1 - 1));
                        }
                        spans.push(o_span(n0, n1));
                        let params = [
                            xb + c0 * in_plane,
                            wb + n0 * k_full + c0 * kvol,
                            ob + n0 * plane,
                            g * cout_g + n0,
                            c1 - c0,
                            n1 - n0,
                            k_full,
                            usize::from(ci > 0),
                            s.input[0],
                            s.input[1],
                            s.input[2],
                            to,
                            ho,
                            wo,
                            s.stride[0],
                            s.stride[1],
                            s.stride[2],
                            s.pad_lo[0],
                            s.pad_lo[1],
                            s.pad_lo[2],
                        ]
                        .map(|v| v as u32)
                        .to_vec();
                        dispatches.push((spans, params, [(n1 - n0).div_ceil(col_block) as u32, m_tiles as u32, 1]));
                    }
                }
            }
        }
        self.run(op, &kernel, dispatches)?;
        Ok(out)
    }

    fn norm(&self, x: &WgpuTensor, gamma: Option<&WgpuTensor>, beta: Option<&WgpuTensor>, s: &NormSpec) -> Result<WgpuTensor> {
        let op = "norm";
        self.check(op, &[x])?;
        if s.stride > 1 {
            // The shader walks contiguous rows: strided ones (a channel norm) go through a
            // transposed copy and back.
            let outer = s.rows / s.stride;
            let rows = crate::ops::permute(self, &x.reshape(&[outer, s.row_len, s.stride])?, &[0, 2, 1])?;
            let y = self.norm(&rows, gamma, beta, &NormSpec { stride: 1, ..s.clone() })?;
            return crate::ops::permute(self, &y, &[0, 2, 1])?.reshape(x.shape());
        }
        let out = self.new_tensor(&x.shape, x.dtype)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        // Rows longer than a few blocks are spread over one workgroup per block.
        const BLOCK: usize = 4096;
        let blocks = s.row_len.div_ceil(BLOCK);
        let stats = if blocks > 4 {
            Some(self.new_tensor(&[s.rows * blocks * 2], DType::F32)?)
        } else {
            None
        };
        let consts = vec![("MEAN_VAR", flag(s.kind == NormKind::MeanVar)), ("BLOCK", BLOCK.to_string())];
        let args = vec![
            read("x", Some(x)),
            read("gamma", gamma),
            read("beta", beta),
            Arg {
                name: "stats",
                tensor: stats.as_ref(),
                write: true,
            },
            write("out", &out),
        ];
        let mut kernel = Kernel {
            entry: "main",
            sources: &[NORM],
            consts,
            args,
        };
        let params_len = (s.groups - 1) * s.channels_per_group + (s.row_len - 1) / s.inner;
        let spans = |r0: usize, r1: usize| {
            let mut v = vec![(r0 * s.row_len, r1 * s.row_len - 1)];
            v.extend(gamma.iter().chain(beta.iter()).map(|_| (0, params_len)));
            if stats.is_some() {
                v.push((r0 * blocks * 2, r1 * blocks * 2 - 1));
            }
            v.push((r0 * s.row_len, r1 * s.row_len - 1));
            v
        };
        let tensors: Vec<&GpuStorage> = kernel.args.iter().filter_map(|a| a.tensor.map(|t| &*t.storage)).collect();
        let max_rows = if stats.is_some() { MAX_GRID } else { MAX_GRID * MAX_GRID };
        let ranges = split_ranges(s.rows, max_rows, |r0, r1| Self::fits(&tensors, &spans(r0, r1)))
            .ok_or_else(|| self.too_large(op, "one row", s.row_len))?;
        let params = |r0: usize, r1: usize| {
            vec![
                s.row_len as u32,
                s.groups as u32,
                s.channels_per_group as u32,
                s.inner as u32,
                s.eps.to_bits(),
                r0 as u32,
                (r1 - r0) as u32,
                blocks as u32,
            ]
        };
        if stats.is_none() {
            let rows_per_group;
            (kernel.entry, rows_per_group) = self.row_entry(s.row_len);
            self.run(
                op,
                &kernel,
                ranges
                    .into_iter()
                    .map(|(r0, r1)| (spans(r0, r1), params(r0, r1), grid_1d((r1 - r0).div_ceil(rows_per_group)))),
            )?;
            return Ok(out);
        }
        for entry in ["stats", "apply"] {
            kernel.entry = entry;
            self.run(
                op,
                &kernel,
                ranges
                    .iter()
                    .map(|&(r0, r1)| (spans(r0, r1), params(r0, r1), [blocks as u32, (r1 - r0) as u32, 1])),
            )?;
        }
        Ok(out)
    }

    fn softmax(&self, x: &WgpuTensor, s: &SoftmaxSpec) -> Result<WgpuTensor> {
        let op = "softmax";
        self.check(op, &[x])?;
        let out = self.new_tensor(&x.shape, x.dtype)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let (entry, rows_per_group) = self.row_entry(s.cols);
        let kernel = Kernel {
            entry,
            sources: &[SOFTMAX],
            consts: vec![],
            args: vec![read("x", Some(x)), write("out", &out)],
        };
        let spans = |r0: usize, r1: usize| vec![(r0 * s.cols, r1 * s.cols - 1); 2];
        let tensors = [&*x.storage, &*out.storage];
        let ranges = split_ranges(s.rows, MAX_GRID * MAX_GRID, |r0, r1| Self::fits(&tensors, &spans(r0, r1)))
            .ok_or_else(|| self.too_large(op, "one row", s.cols))?;
        let dispatches = ranges.into_iter().map(|(r0, r1)| {
            let grid = grid_1d((r1 - r0).div_ceil(rows_per_group));
            (spans(r0, r1), vec![s.cols as u32, r0 as u32, (r1 - r0) as u32], grid)
        });
        self.run(op, &kernel, dispatches)?;
        Ok(out)
    }

    fn attention(&self, q: &WgpuTensor, k: &WgpuTensor, v: &WgpuTensor, s: &AttentionSpec) -> Result<WgpuTensor> {
        let op = "attention";
        self.check(op, &[q, k, v])?;
        if s.tokens_first {
            // The shader reads each head's rows as one contiguous block.
            return crate::backend::attention_via_heads_first(self, q, k, v, s);
        }
        let out = self.new_tensor(&q.shape, q.dtype)?;
        if out.numel() == 0 || s.kv_len == 0 {
            return Ok(out);
        }
        let d = s.head_dim;
        let limit = self.limits.max_compute_workgroup_storage_size as usize;
        const WG: usize = 128;
        let tile = [(32, 32), (16, 32), (16, 16), (8, 16)]
            .into_iter()
            .find(|&(br, bc)| (br * d + bc * (d + 1) + br * bc + WG) * 4 <= limit && bc * br / WG + d.div_ceil(WG / br) <= 40);
        // Head dims too wide for a tile in workgroup memory (the Wan VAE's 384-channel
        // attention) take the unfused path.
        let Some((br, bc)) = tile else {
            return self.attention_unfused(q, k, v, s);
        };
        // Software adapters take one query row per invocation (attention.wgsl's `rows`),
        // which keeps 2 * D floats per invocation and runs 2 * D + 1 loop iterations a key,
        // so fewer keys a pass.
        let rows_kernel = self.software_kernels && d <= 128;
        let (entry, tile_rows) = if rows_kernel { ("rows", 64) } else { ("main", br) };
        let max_keys = if rows_kernel {
            self.attention_keys_per_pass.min(SOFTWARE_LOOP_BUDGET / (2 * d + 1))
        } else {
            self.attention_keys_per_pass
        };
        let kv_count = s.kv_len.div_ceil(s.kv_len.div_ceil(max_keys)).next_multiple_of(bc);
        let ns = s.kv_len.div_ceil(kv_count);
        let row_len = if ns > 1 { d + 2 } else { d };
        let scratch = if ns > 1 {
            Some(self.new_tensor(&[s.batch_heads() * s.q_len * ns * row_len], DType::F32)?)
        } else {
            None
        };
        let target = scratch.as_ref().unwrap_or(&out);
        let tpr = WG / br;
        let consts = vec![
            ("D", d.to_string()),
            ("WG", WG.to_string()),
            ("BR", br.to_string()),
            ("BC", bc.to_string()),
            ("TPR", tpr.to_string()),
            ("SPT", (bc / tpr).to_string()),
            ("OPT", d.div_ceil(tpr).to_string()),
            ("KS", (d + 1).to_string()),
            ("QLOADS", (br * d).div_ceil(WG).to_string()),
            ("KVLOADS", (bc * d).div_ceil(WG).to_string()),
            ("ROW", row_len.to_string()),
        ];
        let kernel = Kernel {
            entry,
            sources: &[ATTENTION],
            consts,
            args: vec![read("q", Some(q)), read("k", Some(k)), read("v", Some(v)), write("out", target)],
        };
        let tensors = [&*q.storage, &*k.storage, &*v.storage, &*target.storage];
        let (qn, kn) = (s.q_len * d, s.kv_len * d);
        let q_tiles = s.q_len.div_ceil(tile_rows);
        let mut dispatches = Vec::new();
        for split in 0..ns {
            let kv0 = split * kv_count;
            let keys = kv_count.min(s.kv_len - kv0);
            // Heads h0..h1, query rows r0..r1 (all rows when several heads).
            let spans = |h0: usize, h1: usize, r0: usize, r1: usize| {
                let qs = (h0 * qn + r0 * d, (h1 - 1) * qn + r1 * d - 1);
                let ks = (h0 * kn + kv0 * d, (h1 - 1) * kn + (kv0 + keys) * d - 1);
                let os = (
                    ((h0 * s.q_len + r0) * ns + split) * row_len,
                    (((h1 - 1) * s.q_len + r1 - 1) * ns + split) * row_len + row_len - 1,
                );
                vec![qs, ks, ks, os]
            };
            let params = |h0: usize, r0: usize, rows: usize| {
                let mut p = vec![
                    s.q_len as u32,
                    s.kv_len as u32,
                    s.scale.to_bits(),
                    h0 as u32,
                    r0 as u32,
                    rows as u32,
                ];
                p.extend([kv0, keys, split, ns].map(|v| v as u32));
                p
            };
            let whole = (q_tiles <= MAX_GRID)
                .then(|| split_ranges(s.batch_heads(), MAX_GRID, |h0, h1| Self::fits(&tensors, &spans(h0, h1, 0, s.q_len))))
                .flatten();
            if let Some(ranges) = whole {
                for (h0, h1) in ranges {
                    dispatches.push((
                        spans(h0, h1, 0, s.q_len),
                        params(h0, 0, s.q_len),
                        [q_tiles as u32, (h1 - h0) as u32, 1],
                    ));
                }
                continue;
            }
            for h in 0..s.batch_heads() {
                let ranges = split_ranges(s.q_len, MAX_GRID * tile_rows, |r0, r1| {
                    Self::fits(&tensors, &spans(h, h + 1, r0, r1))
                })
                .ok_or_else(|| self.too_large(op, "one query row with the keys and values of its head", 2 * keys * d))?;
                for (r0, r1) in ranges {
                    dispatches.push((
                        spans(h, h + 1, r0, r1),
                        params(h, r0, r1 - r0),
                        [(r1 - r0).div_ceil(tile_rows) as u32, 1, 1],
                    ));
                }
            }
        }
        self.run(op, &kernel, dispatches)?;

        if let Some(scratch) = &scratch {
            let kernel = Kernel {
                entry: "main",
                sources: &[ATTENTION_COMBINE],
                consts: vec![("D", d.to_string())],
                args: vec![read("partial", Some(scratch)), write("out", &out)],
            };
            let tensors = [&*scratch.storage, &*out.storage];
            let rows = s.batch_heads() * s.q_len;
            let spans = |a: usize, b: usize| vec![(a * ns * row_len, b * ns * row_len - 1), (a * d, b * d - 1)];
            let ranges = split_ranges(rows, usize::MAX, |a, b| Self::fits(&tensors, &spans(a, b)))
                .ok_or_else(|| self.too_large(op, "one row of split results", ns * row_len))?;
            let dispatches = ranges.into_iter().map(|(a, b)| {
                (
                    spans(a, b),
                    vec![a as u32, (b - a) as u32, ns as u32],
                    grid_1d(((b - a) * d).div_ceil(256)),
                )
            });
            self.run(op, &kernel, dispatches)?;
        }
        Ok(out)
    }

    fn map(&self, inputs: &[&WgpuTensor], out: &WgpuTensor, s: &MapSpec) -> Result<()> {
        let op = "map";
        self.check(op, inputs)?;
        self.check(op, &[out])?;
        if s.shape.iter().product::<usize>() == 0 {
            return Ok(());
        }
        let (op_code, unary_code) = s.op.codes();
        let names = ["in0", "in1", "in2"];
        let mut args: Vec<Arg> = (0..3).map(|i| read(names[i], inputs.get(i).copied())).collect();
        args.push(write("out", out));
        let kernel = Kernel {
            entry: "main",
            sources: &[ELEMENTWISE],
            consts: vec![("OP", op_code.to_string()), ("UNARY", unary_code.to_string())],
            args,
        };

        // Pad to rank 6 with leading unit axes.
        let lead = MAX_RANK - s.shape.len();
        let pad = |v: &[usize], fill: usize| [vec![fill; lead], v.to_vec()].concat();
        let shape = pad(&s.shape, 1);
        let views: Vec<crate::spec::View> = s
            .inputs
            .iter()
            .chain(std::iter::once(&s.out))
            .map(|v| crate::spec::View {
                offset: v.offset,
                strides: pad(&v.strides, 0),
                div: pad(&v.div, 1),
            })
            .collect();
        let operands: Vec<&GpuStorage> = inputs.iter().chain(std::iter::once(&out)).map(|t| &*t.storage).collect();
        let extra = s.op.extent() - 1;
        let spans = |bx: &IterBox| -> Vec<Span> {
            views
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let (a, b) = v.span(&bx.start, &bx.len);
                    // Rope reads its pair from x (input 0) and writes a pair to out.
                    let e = if i == 0 || i == views.len() - 1 { extra } else { 0 };
                    (a, b + e)
                })
                .collect()
        };
        let boxes = split_boxes(&shape, 1 << 31, &|bx| Self::fits(&operands, &spans(bx)))
            .ok_or_else(|| self.too_large(op, "a single element window", 1))?;
        let dispatches = boxes.into_iter().map(|bx| {
            let mut w = vec![0u32; 16 + 13 * 4];
            w[0] = bx.elems() as u32;
            w[2] = s.alpha.to_bits();
            w[3] = s.beta.to_bits();
            for k in 0..MAX_RANK {
                w[4 + k] = bx.len[k] as u32;
                w[10 + k] = bx.start[k] as u32;
            }
            for t in 0..4 {
                let b = 16 + 13 * t;
                let view = if t < inputs.len() {
                    Some(&views[t])
                } else if t == 3 {
                    views.last()
                } else {
                    None
                };
                for k in 0..MAX_RANK {
                    w[b + 7 + k] = 1;
                }
                if let Some(v) = view {
                    w[b] = v.offset as u32;
                    for k in 0..MAX_RANK {
                        w[b + 1 + k] = v.strides[k] as u32;
                        w[b + 7 + k] = v.div[k] as u32;
                    }
                }
            }
            (spans(&bx), w, grid_1d(bx.elems().div_ceil(256)))
        });
        self.run(op, &kernel, dispatches)
    }
}
