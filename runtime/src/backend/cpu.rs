//! The CPU backend: the executable specification of every primitive. Plain loops, f32
//! arithmetic with f64 accumulation for reductions, storage in the tensor's dtype (results
//! are rounded to it), threads across independent rows. The hot loops (matrix product,
//! convolution, attention) keep small tiles of sums in registers and run at the widest vector
//! width the CPU has, each sum still taken in the plain loop's order, so the bits do not
//! depend on the machine.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};

use crate::backend::Backend;
use crate::error::Result;
use crate::parallel::par_chunks_mut;
use crate::spec::{AttentionSpec, ConvSpec, MapOp, MapSpec, MatmulSpec, NormKind, NormSpec, SoftmaxSpec, UnaryOp, View, MAX_RANK};
use crate::tensor::{numel, DType, HostData, HostTensor, Tensor};

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

pub type CpuTensor = Tensor<CpuBackend>;

impl CpuBackend {
    fn values(t: &CpuTensor) -> Vec<f32> {
        t.storage.read().expect("cpu storage lock").to_f32().into_owned()
    }

    fn make(shape: Vec<usize>, dtype: DType, values: Vec<f32>) -> CpuTensor {
        Tensor::from_storage(Arc::new(RwLock::new(HostData::from_f32(dtype, values))), shape, dtype)
    }
}

#[inline]
pub fn unary(op: UnaryOp, x: f32, alpha: f32, beta: f32) -> f32 {
    match op {
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        // 0.5 x (1 + tanh u) written as x / (1 + e^(-2u)): one exponential instead of tanh
        // (which costs two), and no cancellation where tanh u nears -1.
        UnaryOp::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            x / (1.0 + (-2.0 * c * (x + 0.044715 * x * x * x)).exp())
        }
        UnaryOp::GeluErf => 0.5 * x * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2) as f32),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Affine => alpha * x + beta,
        UnaryOp::Clamp => x.max(alpha).min(beta),
    }
}

/// Output rows one tile of the matrix product covers.
const MATMUL_ROWS: usize = 4;

/// Columns of a matrix product tile: 4 x 16 sums fit the registers of AVX2 and of NEON.
const MATMUL_COLS: usize = 16;

/// Output positions one convolution product covers (whole matrix product strips).
const CONV_BLOCK: usize = 4 * MATMUL_COLS;

/// f64 sums one attention tile keeps in registers.
const ATTENTION_TILE: usize = 16;

/// B `[k, n]` (`[n, k]` when `trans`) of each of `batches` matrices (the i-th starting at
/// `i * stride`) as column strips `[strips][k][MATMUL_COLS]`, zero past column n: a tile of
/// the product then reads its B strip front to back.
fn packed_strips(v: &[f32], batches: usize, k: usize, n: usize, stride: usize, trans: bool) -> Vec<f32> {
    let strips = n.div_ceil(MATMUL_COLS);
    let mut packed = vec![0.0f32; batches * strips * k * MATMUL_COLS];
    for (bi, pb) in packed.chunks_mut(strips * k * MATMUL_COLS).enumerate() {
        let src = &v[bi * stride..];
        for (t, strip) in pb.chunks_mut(k * MATMUL_COLS).enumerate() {
            for (kk, row) in strip.chunks_mut(MATMUL_COLS).enumerate() {
                for (c, x) in row.iter_mut().enumerate().take(n.saturating_sub(t * MATMUL_COLS)) {
                    let j = t * MATMUL_COLS + c;
                    *x = src[if trans { j * k + kk } else { kk * n + j }];
                }
            }
        }
    }
    packed
}

/// `o[r * stride + j] = sum over k of a[k][r] * b[k][j]` for the `ROWS` rows of `o` and the
/// `cols` columns of `b`, `a` packed `[k][ROWS]` and `b` as `packed_strips`. The sums of a strip's columns of every
/// row stay in registers through the whole of k (one read of each B element serves all the
/// rows, and nothing is stored until the end), each element still summing over k in order as
/// the dot product does.
#[inline(always)]
fn matmul_tile<const ROWS: usize>(o: &mut [f32], stride: usize, a: &[[f32; ROWS]], b: &[f32], cols: usize) {
    let k = a.len();
    for (t, strip) in b.chunks_exact(k * MATMUL_COLS).enumerate() {
        let mut acc = [[0.0f32; MATMUL_COLS]; ROWS];
        for (ak, bk) in a.iter().zip(strip.chunks_exact(MATMUL_COLS)) {
            let bk: &[f32; MATMUL_COLS] = bk.try_into().expect("a whole strip row");
            for (acc, &ar) in acc.iter_mut().zip(ak) {
                for (s, &bj) in acc.iter_mut().zip(bk) {
                    *s += ar * bj;
                }
            }
        }
        let (j0, width) = (t * MATMUL_COLS, MATMUL_COLS.min(cols - t * MATMUL_COLS));
        for (r, acc) in acc.iter().enumerate() {
            o[r * stride + j0..][..width].copy_from_slice(&acc[..width]);
        }
    }
}

/// `o[e] = sum over j of p[j] * v[j * step + e] / l` for the elements `e` of `o` from `first`
/// on, `N` at a time while `N` fit (returns where it stopped), each summing over j in order; a
/// compile-time `N` keeps the sums in registers.
#[inline(always)]
fn weighted_tiles<const N: usize>(p: &[f64], v: &[f32], step: usize, l: f64, o: &mut [f32], first: usize) -> usize {
    let mut first = first;
    while first + N <= o.len() {
        let mut acc = [0.0f64; N];
        for (j, &pj) in p.iter().enumerate() {
            let row: &[f32; N] = v[j * step + first..][..N].try_into().expect("a whole tile");
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += pj * x as f64;
            }
        }
        for (od, a) in o[first..][..N].iter_mut().zip(&acc) {
            *od = (a / l) as f32;
        }
        first += N;
    }
    first
}

/// Runs `f` inside a function compiled for the widest vector instructions this CPU has, so
/// the loops inlined into it use them (callers mark `f` `#[inline(always)]`). Rust never
/// fuses a multiply and an add by itself, so every width computes the same bits.
#[inline(always)]
fn on_widest_vectors<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has just been found to support the function's target feature.
            return unsafe { avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// erf in double precision (Rust's std has none): the Maclaurin series near zero and the
/// continued fraction for erfc in the tails, both far below f32 resolution.
fn erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series: erf x = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = x;
        let mut sum = x;
        let x2 = x * x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc, evaluated backwards.
        let a = x.abs();
        let mut f = 0.0;
        for k in (1..=60).rev() {
            f = (k as f64 / 2.0) / (a + f);
        }
        let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
        (1.0 - erfc).copysign(x)
    }
}

impl Backend for CpuBackend {
    type Storage = Arc<RwLock<HostData>>;

    fn name(&self) -> String {
        "cpu (reference)".into()
    }

    fn supports(&self, _dtype: DType) -> bool {
        true
    }

    fn half_dtype(&self) -> DType {
        DType::BF16
    }

    fn upload(&self, host: &HostTensor) -> Result<CpuTensor> {
        Ok(Tensor::from_storage(
            Arc::new(RwLock::new(host.data.clone())),
            host.shape.clone(),
            host.dtype(),
        ))
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<CpuTensor> {
        Ok(Self::make(shape.to_vec(), dtype, vec![0.0; numel(shape)]))
    }

    fn read(&self, t: &CpuTensor) -> impl std::future::Future<Output = Result<HostTensor>> + use<'_> {
        std::future::ready(HostTensor::new(&t.shape, t.storage.read().expect("cpu storage lock").clone()))
    }

    fn matmul(&self, a: &CpuTensor, b: &CpuTensor, bias: Option<&CpuTensor>, s: &MatmulSpec) -> Result<CpuTensor> {
        let av = Self::values(a);
        let batches = if s.b_batch_stride == 0 { 1 } else { s.batch };
        let bv = packed_strips(&Self::values(b), batches, s.k, s.n, s.b_batch_stride, s.trans_b);
        let per_batch = s.n.div_ceil(MATMUL_COLS) * s.k * MATMUL_COLS;
        let b_stride = if batches == 1 { 0 } else { per_batch };
        let biasv = bias.map(Self::values);
        let mut out = vec![0.0f32; s.batch * s.m * s.n];
        let a_at = |row: usize, kk: usize| {
            let (bi, i) = (row / s.m, row % s.m);
            av[bi * s.a_batch_stride + if s.trans_a { kk * s.m + i } else { i * s.k + kk }]
        };
        // Four output rows of one batch share each pass over B, which reads B a quarter as
        // often (B, not A, is what does not fit in cache: a linear layer's whole weight), and
        // keep their sums in registers (`matmul_tile`).
        par_chunks_mut(&mut out, MATMUL_ROWS * s.n, |piece, o| {
            let first = piece * MATMUL_ROWS;
            let rows = o.len() / s.n;
            let b = |row: usize| &bv[(row / s.m) * b_stride..][..per_batch];
            if rows == MATMUL_ROWS && (first / s.m) == (first + rows - 1) / s.m {
                let a: Vec<[f32; MATMUL_ROWS]> = (0..s.k).map(|kk| std::array::from_fn(|r| a_at(first + r, kk))).collect();
                on_widest_vectors(
                    #[inline(always)]
                    || matmul_tile(o, s.n, &a, b(first), s.n),
                );
            } else {
                for (r, o) in o.chunks_mut(s.n).enumerate() {
                    let a: Vec<[f32; 1]> = (0..s.k).map(|kk| [a_at(first + r, kk)]).collect();
                    on_widest_vectors(
                        #[inline(always)]
                        || matmul_tile(o, s.n, &a, b(first + r), s.n),
                    );
                }
            }
            if let Some(bb) = &biasv {
                for o in o.chunks_mut(s.n) {
                    o.iter_mut().zip(bb).for_each(|(oj, b)| *oj += b);
                }
            }
        });
        Ok(Self::make(vec![s.batch, s.m, s.n], a.dtype, out))
    }

    fn conv(&self, x: &CpuTensor, w: &CpuTensor, bias: Option<&CpuTensor>, s: &ConvSpec) -> Result<CpuTensor> {
        let (xv, wv) = (Self::values(x), Self::values(w));
        let biasv = bias.map(Self::values);
        let [ti, hi, wi] = s.input;
        let [kt, kh, kw] = s.kernel;
        let [to, ho, wo] = s.output();
        let (cin_g, cout_g) = (s.c_in / s.groups, s.c_out / s.groups);
        let plane = to * ho * wo;
        let taps = kt * kh * kw;
        // A matrix product per (batch, group) and block of output positions: the weights
        // `[c_out, c_in * taps]` by the block's input patches, gathered as column strips (a
        // zero term where a tap falls in the padding), so every output element sums its terms
        // in the order (input channel, dt, dy, dx), then the bias, as the direct dot product
        // would.
        let depth = cin_g * taps;
        let blocks = plane.div_ceil(CONV_BLOCK);
        let mut tiles = vec![0.0f32; s.batch * s.groups * blocks * cout_g * CONV_BLOCK];
        par_chunks_mut(&mut tiles, cout_g * CONV_BLOCK, |job, o| {
            let (bg, p0) = (job / blocks, job % blocks * CONV_BLOCK);
            let (bi, g) = (bg / s.groups, bg % s.groups);
            let cols = CONV_BLOCK.min(plane - p0);
            let mut patches = vec![0.0f32; cols.div_ceil(MATMUL_COLS) * depth * MATMUL_COLS];
            for (t, strip) in patches.chunks_mut(depth * MATMUL_COLS).enumerate() {
                for c in 0..MATMUL_COLS.min(cols - t * MATMUL_COLS) {
                    let p = p0 + t * MATMUL_COLS + c;
                    let out_at = [p / (ho * wo), p / wo % ho, p % wo];
                    for tap in 0..taps {
                        let tap_at = [tap / (kh * kw), tap / kw % kh, tap % kw];
                        let at: [Option<usize>; 3] = std::array::from_fn(|a| {
                            (out_at[a] * s.stride[a] + tap_at[a])
                                .checked_sub(s.pad_lo[a])
                                .filter(|&i| i < s.input[a])
                        });
                        let [Some(it), Some(iy), Some(ix)] = at else { continue };
                        for ci in 0..cin_g {
                            let xc = (bi * s.c_in + g * cin_g + ci) * ti * hi * wi;
                            strip[(ci * taps + tap) * MATMUL_COLS + c] = xv[xc + (it * hi + iy) * wi + ix];
                        }
                    }
                }
            }
            let weights = |co: usize| &wv[(g * cout_g + co) * depth..][..depth];
            let mut rows = o.chunks_exact_mut(MATMUL_ROWS * CONV_BLOCK);
            for (i, o) in rows.by_ref().enumerate() {
                let w: [&[f32]; MATMUL_ROWS] = std::array::from_fn(|r| weights(i * MATMUL_ROWS + r));
                let a: Vec<[f32; MATMUL_ROWS]> = (0..depth).map(|kk| std::array::from_fn(|r| w[r][kk])).collect();
                on_widest_vectors(
                    #[inline(always)]
                    || matmul_tile(o, CONV_BLOCK, &a, &patches, cols),
                );
            }
            let done = cout_g - cout_g % MATMUL_ROWS;
            for (i, o) in rows.into_remainder().chunks_exact_mut(CONV_BLOCK).enumerate() {
                let a: Vec<[f32; 1]> = weights(done + i).iter().map(|&w| [w]).collect();
                on_widest_vectors(
                    #[inline(always)]
                    || matmul_tile(o, CONV_BLOCK, &a, &patches, cols),
                );
            }
        });
        let mut out = vec![0.0f32; s.batch * s.c_out * plane];
        for (job, tile) in tiles.chunks(cout_g * CONV_BLOCK).enumerate() {
            let (bg, p0) = (job / blocks, job % blocks * CONV_BLOCK);
            let cols = CONV_BLOCK.min(plane - p0);
            for (co, row) in tile.chunks(CONV_BLOCK).enumerate() {
                let channel = bg % s.groups * cout_g + co;
                let dst = &mut out[(bg / s.groups * s.c_out + channel) * plane + p0..][..cols];
                match &biasv {
                    Some(bb) => dst.iter_mut().zip(row).for_each(|(d, &v)| *d = v + bb[channel]),
                    None => dst.copy_from_slice(&row[..cols]),
                }
            }
        }
        Ok(Self::make(vec![s.batch, s.c_out, to, ho, wo], x.dtype, out))
    }

    fn norm(&self, x: &CpuTensor, gamma: Option<&CpuTensor>, beta: Option<&CpuTensor>, s: &NormSpec) -> Result<CpuTensor> {
        let xv = Self::values(x);
        let (gv, bv) = (gamma.map(Self::values), beta.map(Self::values));
        let (len, stride) = (s.row_len, s.stride.max(1));
        let at = |r: usize, i: usize| (r / stride) * len * stride + r % stride + i * stride;
        // Per row: the mean (0 for RMS) and the denominator.
        let mut moments = vec![(0.0f64, 1.0f64); s.rows];
        par_chunks_mut(&mut moments, 1, |r, m| {
            let row = (0..len).map(|i| xv[at(r, i)] as f64);
            let n = len as f64;
            m[0] = match s.kind {
                NormKind::MeanVar => {
                    let mean = row.clone().sum::<f64>() / n;
                    let var = row.map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                    (mean, (var + s.eps as f64).sqrt())
                }
                NormKind::Rms => (0.0, (row.map(|v| v.powi(2)).sum::<f64>() / n + s.eps as f64).sqrt()),
            };
        });
        let affine = |p: usize| (gv.as_ref().map_or(1.0, |g| g[p]), bv.as_ref().map_or(0.0, |b| b[p]));
        let normed = |x: f32, (mean, denom): (f64, f64), (g, b): (f32, f32)| ((x as f64 - mean) / denom) as f32 * g + b;
        let mut out = vec![0.0f32; s.rows * len];
        if stride == 1 {
            // A row at a time, its parameters per run of `inner` elements.
            par_chunks_mut(&mut out, len, |r, o| {
                let x = &xv[r * len..][..len];
                for (ch, (o, x)) in o.chunks_mut(s.inner.max(1)).zip(x.chunks(s.inner.max(1))).enumerate() {
                    let params = affine((r % s.groups) * s.channels_per_group + ch);
                    o.iter_mut().zip(x).for_each(|(o, &x)| *o = normed(x, moments[r], params));
                }
            });
        } else {
            // A channel plane at a time: index `c % len` of `stride` consecutive rows.
            par_chunks_mut(&mut out, stride, |c, o| {
                let (i, first) = (c % len, c / len * stride);
                let x = &xv[c * stride..][..stride];
                for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                    let r = first + j;
                    *o = normed(x, moments[r], affine((r % s.groups) * s.channels_per_group + i / s.inner));
                }
            });
        }
        Ok(Self::make(x.shape.clone(), x.dtype, out))
    }

    fn softmax(&self, x: &CpuTensor, s: &SoftmaxSpec) -> Result<CpuTensor> {
        let xv = Self::values(x);
        let mut out = vec![0.0f32; s.rows * s.cols];
        par_chunks_mut(&mut out, s.cols, |r, o| {
            let row = &xv[r * s.cols..(r + 1) * s.cols];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
            for (oi, &v) in o.iter_mut().zip(row) {
                *oi = (((v - m) as f64).exp() / sum) as f32;
            }
        });
        Ok(Self::make(x.shape.clone(), x.dtype, out))
    }

    fn attention(&self, q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, s: &AttentionSpec) -> Result<CpuTensor> {
        let (qv, kv, vv) = (Self::values(q), Self::values(k), Self::values(v));
        let (d, heads) = (s.head_dim, s.heads);
        let (qst, kst) = (s.strides(s.q_len), s.strides(s.kv_len));
        // Row `r` of (batch, head) `bh` of a tensor with strides `st`.
        let row = |st: [usize; 3], bh: usize, r: usize| (bh / heads) * st[0] + (bh % heads) * st[1] + r * st[2];
        // K transposed per head ([d, keys], keys padded with zeros to whole tiles), so each
        // query's scores accumulate over contiguous memory; every score still sums its d
        // products in order.
        let keys = s.kv_len.next_multiple_of(ATTENTION_TILE);
        let mut kt = vec![0.0f32; s.batch_heads() * d * keys];
        for (bh, kh) in kt.chunks_mut(d * keys).enumerate() {
            for j in 0..s.kv_len {
                for (dd, &x) in kv[row(kst, bh, j)..][..d].iter().enumerate() {
                    kh[dd * keys + j] = x;
                }
            }
        }
        // Output rows in (batch, head, row) order, placed into q's layout at the end.
        let mut rows = vec![0.0f32; s.batch_heads() * s.q_len * d];
        // Scores and sums in f64, at the vector width the CPU has, `ATTENTION_TILE` keys (for
        // the scores) or output elements (for the sums) at a time held in registers through
        // their whole sum, each in the order of the plain loop.
        par_chunks_mut(&mut rows, d, |i, o| {
            on_widest_vectors(
                #[inline(always)]
                || {
                    let (bh, r) = (i / s.q_len, i % s.q_len);
                    let qr = &qv[row(qst, bh, r)..][..d];
                    let kh = &kt[bh * d * keys..][..d * keys];
                    let mut scores = vec![0.0f64; keys];
                    for (t, tile) in scores.chunks_exact_mut(ATTENTION_TILE).enumerate() {
                        let mut acc = [0.0f64; ATTENTION_TILE];
                        for (dd, &qd) in qr.iter().enumerate() {
                            let k_row: &[f32; ATTENTION_TILE] = kh[dd * keys + t * ATTENTION_TILE..][..ATTENTION_TILE]
                                .try_into()
                                .expect("a whole tile");
                            for (a, &kd) in acc.iter_mut().zip(k_row) {
                                *a += qd as f64 * kd as f64;
                            }
                        }
                        tile.copy_from_slice(&acc);
                    }
                    scores.truncate(s.kv_len);
                    let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(s.scale as f64 * b));
                    // The exponential in f32: f64's costs several times as much, and rounding
                    // its argument to f32 is far below any tolerance the scores are held to.
                    let p: Vec<f64> = scores.iter().map(|&sc| ((s.scale as f64 * sc - m) as f32).exp() as f64).collect();
                    let l = p.iter().fold(0.0f64, |l, &pj| l + pj);
                    let v = &vv[row(kst, bh, 0)..];
                    let done = weighted_tiles::<ATTENTION_TILE>(&p, v, kst[2], l, o, 0);
                    let done = weighted_tiles::<4>(&p, v, kst[2], l, o, done);
                    weighted_tiles::<1>(&p, v, kst[2], l, o, done);
                },
            )
        });
        let out = if s.tokens_first {
            let mut out = vec![0.0f32; rows.len()];
            for (i, r) in rows.chunks(d).enumerate() {
                out[row(qst, i / s.q_len, i % s.q_len)..][..d].copy_from_slice(r);
            }
            out
        } else {
            rows
        };
        Ok(Self::make(q.shape.clone(), q.dtype, out))
    }

    fn map(&self, inputs: &[&CpuTensor], out: &CpuTensor, s: &MapSpec) -> Result<()> {
        // Rows of the innermost (merged) dimension are computed in parallel into a contiguous
        // buffer, then written through the output view.
        let s = s.collapsed();
        let ins: Vec<Vec<f32>> = inputs.iter().map(|t| Self::values(t)).collect();
        let width = s.op.extent();
        let (outer, inner) = s.shape.split_at(s.shape.len() - 1);
        let inner = inner[0];
        let row_start = |row: usize| {
            let mut c = [0usize; MAX_RANK];
            let mut r = row;
            for (k, &size) in outer.iter().enumerate().rev() {
                c[k] = r % size;
                r /= size;
            }
            c
        };
        let last = s.shape.len() - 1;
        let step = |v: &View, x: usize| x / v.div[last] * v.strides[last];
        let mut buf = vec![0.0f32; numel(&s.shape) * width];
        par_chunks_mut(&mut buf, inner * width, |row, o| {
            let c = row_start(row);
            // Each input's row as contiguous values (input 0 with `width` per element): the
            // input itself where it is laid out so, else gathered through its view.
            let rows: [Cow<[f32]>; 3] = std::array::from_fn(|i| match (s.inputs.get(i), ins.get(i)) {
                (Some(v), Some(values)) => {
                    let (base, per) = (v.index(&c), if i == 0 { width } else { 1 });
                    if v.div[last] == 1 && v.strides[last] == per {
                        Cow::Borrowed(&values[base..][..inner * per])
                    } else {
                        let at = |x: usize| base + step(v, x);
                        Cow::Owned((0..inner).flat_map(|x| &values[at(x)..][..per]).copied().collect())
                    }
                }
                _ => Cow::Borrowed(&[][..]),
            });
            let (alpha, beta) = (s.alpha, s.beta);
            fn each(o: &mut [f32], f: impl Fn(usize) -> f32) {
                o.iter_mut().enumerate().for_each(|(x, o)| *o = f(x));
            }
            match s.op {
                MapOp::Copy => o.copy_from_slice(&rows[0]),
                MapOp::Unary(u) => each(o, |x| unary(u, rows[0][x], alpha, beta)),
                MapOp::AddScaled => each(o, |x| alpha * rows[0][x] + beta * rows[1][x]),
                MapOp::Mul => each(o, |x| rows[0][x] * rows[1][x]),
                MapOp::Modulate => each(o, |x| rows[0][x] * (1.0 + rows[1][x]) + rows[2][x]),
                MapOp::GatedAdd => each(o, |x| rows[0][x] + rows[1][x] * rows[2][x]),
                MapOp::Rope => {
                    for (x, pair) in o.chunks_exact_mut(2).enumerate() {
                        let (x0, x1, cs, sn) = (rows[0][2 * x], rows[0][2 * x + 1], rows[1][x], rows[2][x]);
                        pair[0] = x0 * cs - x1 * sn;
                        pair[1] = x0 * sn + x1 * cs;
                    }
                }
            }
        });
        let mut dst = out.storage.write().expect("cpu storage lock");
        // An output written whole and in order takes the buffer as it is.
        let mut row_major = vec![width; s.shape.len()];
        for k in (0..last).rev() {
            row_major[k] = row_major[k + 1] * s.shape[k + 1];
        }
        if s.out.offset == 0 && s.out.div.iter().all(|&d| d == 1) && s.out.strides == row_major && numel(&out.shape) == buf.len() {
            *dst = HostData::from_f32(out.dtype, buf);
            return Ok(());
        }
        let mut values = dst.to_f32().into_owned();
        let dense = s.out.div[last] == 1 && s.out.strides[last] == width;
        for (row, computed) in buf.chunks(inner * width).enumerate() {
            let o = s.out.index(&row_start(row));
            if dense {
                values[o..o + computed.len()].copy_from_slice(computed);
                continue;
            }
            for (x, pair) in computed.chunks(width).enumerate() {
                let at = o + step(&s.out, x);
                values[at..at + width].copy_from_slice(pair);
            }
        }
        *dst = HostData::from_f32(out.dtype, values);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ops, HostTensor};

    /// The convolution as a product over gathered patches gives exactly each output's direct
    /// sum over (input channel, dt, dy, dx) in order, taps in the padding left out, then the
    /// bias: 2D and 3D, strides, asymmetric padding, groups, channel counts off the
    /// 4-row tiles, and position counts off the 16-column strips and 64-position blocks.
    #[test]
    fn conv_is_the_direct_sum_bit_for_bit() {
        let b = CpuBackend;
        // (batch, c_in, c_out, groups, input, kernel, stride, pad_lo, pad_hi, bias)
        for (i, &(batch, c_in, c_out, groups, input, kernel, stride, pad_lo, pad_hi, with_bias)) in [
            (1, 3, 5, 1, [1, 9, 11], [1, 3, 3], [1, 1, 1], [0, 1, 1], [0, 1, 1], true),
            (2, 4, 6, 2, [1, 17, 13], [1, 3, 3], [1, 2, 2], [0, 1, 1], [0, 1, 1], false),
            (1, 4, 7, 1, [5, 7, 6], [3, 3, 3], [1, 1, 1], [2, 1, 1], [0, 1, 1], true),
            (1, 6, 9, 3, [3, 10, 21], [2, 1, 4], [1, 1, 3], [1, 0, 2], [0, 0, 1], true),
        ]
        .iter()
        .enumerate()
        {
            let s = ConvSpec {
                batch,
                c_in,
                c_out,
                groups,
                input,
                kernel,
                stride,
                pad_lo,
                pad_hi,
            };
            let (cin_g, cout_g, taps) = (c_in / groups, c_out / groups, s.kernel_volume());
            let x = crate::noise::gaussian(i as u64, batch * c_in * input.iter().product::<usize>());
            let w = crate::noise::gaussian(i as u64 + 100, c_out * cin_g * taps);
            let bias = crate::noise::gaussian(i as u64 + 200, c_out);
            let up = |shape: &[usize], v: &[f32]| b.upload(&HostTensor::from_f32(shape, v.to_vec()).unwrap()).unwrap();
            let got = b
                .conv(
                    &up(&[batch, c_in, input[0], input[1], input[2]], &x),
                    &up(&[c_out, cin_g, kernel[0], kernel[1], kernel[2]], &w),
                    with_bias.then(|| up(&[c_out], &bias)).as_ref(),
                    &s,
                )
                .unwrap();
            let got = pollster::block_on(b.read(&got)).unwrap().to_f32();
            let out = s.output();
            let [it, ih, iw] = input;
            for (at, &g) in got.iter().enumerate() {
                let (n, co, p) = (
                    at / (c_out * out.iter().product::<usize>()),
                    at / out.iter().product::<usize>() % c_out,
                    at % out.iter().product::<usize>(),
                );
                let o = [p / (out[1] * out[2]), p / out[2] % out[1], p % out[2]];
                let mut sum = 0.0f32;
                for ci in 0..cin_g {
                    for tap in 0..taps {
                        let d = [tap / (kernel[1] * kernel[2]), tap / kernel[2] % kernel[1], tap % kernel[2]];
                        let pos: Vec<Option<usize>> = (0..3)
                            .map(|a| (o[a] * stride[a] + d[a]).checked_sub(pad_lo[a]).filter(|&v| v < input[a]))
                            .collect();
                        if let [Some(t), Some(y), Some(xx)] = pos[..] {
                            let c = co / cout_g * cin_g + ci;
                            sum += w[(co * cin_g + ci) * taps + tap] * x[(((n * c_in + c) * it + t) * ih + y) * iw + xx];
                        }
                    }
                }
                if with_bias {
                    sum += bias[co];
                }
                assert_eq!(g, sum, "case {i} at {at}");
            }
        }
    }

    /// The row-blocked product gives, bit for bit, each element's plain dot product over k in
    /// order, then the bias: for row counts that leave a partial block, blocks that straddle
    /// two batch items of batched weights, and every transpose combination.
    #[test]
    fn matmul_is_the_plain_dot_product_bit_for_bit() {
        let b = CpuBackend;
        for (batch, m, k, n, batched_b) in [
            (1, 9, 17, 5, false),
            (3, 6, 11, 13, true),
            (2, 4, 33, 70, false),
            (5, 3, 8, 4, true),
        ] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let seed = (batch * 1000 + m * 100 + k * 10 + n) as u64 + 2 * ta as u64 + tb as u64;
                let a_shape = if ta { [batch, k, m] } else { [batch, m, k] };
                let b_rows = if tb { [n, k] } else { [k, n] };
                let b_shape = if batched_b {
                    vec![batch, b_rows[0], b_rows[1]]
                } else {
                    b_rows.to_vec()
                };
                let a = crate::noise::gaussian(seed, batch * m * k);
                let w = crate::noise::gaussian(seed + 1, crate::tensor::numel(&b_shape));
                let bias = crate::noise::gaussian(seed + 2, n);
                let up = |shape: &[usize], v: &[f32]| b.upload(&HostTensor::from_f32(shape, v.to_vec()).unwrap()).unwrap();
                let got = ops::matmul(&b, &up(&a_shape, &a), &up(&b_shape, &w), Some(&up(&[n], &bias)), ta, tb).unwrap();
                let got = pollster::block_on(b.read(&got)).unwrap().to_f32();
                for bi in 0..batch {
                    for i in 0..m {
                        for j in 0..n {
                            let wb = if batched_b { bi * k * n } else { 0 };
                            let mut sum = 0.0f32;
                            for kk in 0..k {
                                let x = a[bi * m * k + if ta { kk * m + i } else { i * k + kk }];
                                sum += x * w[wb + if tb { j * k + kk } else { kk * n + j }];
                            }
                            sum += bias[j];
                            let at = (bi * m + i) * n + j;
                            assert_eq!(got[at].to_bits(), sum.to_bits(), "b{batch} {m}x{k}x{n} ta={ta} tb={tb} at {at}");
                        }
                    }
                }
            }
        }
    }
}
