//! The CPU backend: the executable specification of every primitive. Plain loops, f32
//! arithmetic with f64 accumulation for reductions, storage in the tensor's dtype (results
//! are rounded to it), threads across independent rows.

use std::sync::{Arc, RwLock};

use crate::backend::Backend;
use crate::error::Result;
use crate::parallel::par_chunks_mut;
use crate::spec::{AttentionSpec, ConvSpec, MapOp, MapSpec, MatmulSpec, NormKind, NormSpec, SoftmaxSpec, UnaryOp, View};
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

pub fn unary(op: UnaryOp, x: f32, alpha: f32, beta: f32) -> f32 {
    match op {
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        UnaryOp::GeluErf => 0.5 * x * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2) as f32),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Affine => alpha * x + beta,
        UnaryOp::Clamp => x.max(alpha).min(beta),
    }
}

/// `batches` matrices of `rows x cols` (the i-th starting at `i * stride`), each transposed,
/// packed one after another.
fn transposed_batches(v: &[f32], batches: usize, rows: usize, cols: usize, stride: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; batches * rows * cols];
    for (bi, tb) in t.chunks_mut(rows * cols).enumerate() {
        let src = &v[bi * stride..][..rows * cols];
        for (r, row) in src.chunks(cols).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                tb[c * rows + r] = x;
            }
        }
    }
    t
}

/// Output rows a matrix product computes per pass over B.
const MATMUL_ROWS: usize = 4;

/// `o[r][j] += a[r] * b[j]` for the `MATMUL_ROWS` rows of `o` (each `b.len()` long): one read
/// of `b` for all of them, each element's sum in the order a row at a time would take.
fn add_scaled_rows(o: &mut [f32], a: [f32; MATMUL_ROWS], b: &[f32]) {
    let n = b.len();
    let (o0, rest) = o.split_at_mut(n);
    let (o1, rest) = rest.split_at_mut(n);
    let (o2, o3) = rest.split_at_mut(n);
    for ((((x0, x1), x2), x3), &bj) in o0.iter_mut().zip(o1.iter_mut()).zip(o2.iter_mut()).zip(o3.iter_mut()).zip(b) {
        *x0 += a[0] * bj;
        *x1 += a[1] * bj;
        *x2 += a[2] * bj;
        *x3 += a[3] * bj;
    }
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
        // B row-major ([k, n] per batch) either way, so every output row accumulates over
        // contiguous rows of B (vectorisable); each element still sums over k in order.
        let (bv, b_stride) = if s.trans_b {
            let batches = if s.b_batch_stride == 0 { 1 } else { s.batch };
            (
                transposed_batches(&Self::values(b), batches, s.n, s.k, s.b_batch_stride),
                if batches == 1 { 0 } else { s.k * s.n },
            )
        } else {
            (Self::values(b), s.b_batch_stride)
        };
        let biasv = bias.map(Self::values);
        let mut out = vec![0.0f32; s.batch * s.m * s.n];
        let a_at = |row: usize, kk: usize| {
            let (bi, i) = (row / s.m, row % s.m);
            av[bi * s.a_batch_stride + if s.trans_a { kk * s.m + i } else { i * s.k + kk }]
        };
        // Four output rows of one batch share each pass over B, which reads B a quarter as
        // often (B, not A, is what does not fit in cache: a linear layer's whole weight).
        par_chunks_mut(&mut out, MATMUL_ROWS * s.n, |piece, o| {
            let first = piece * MATMUL_ROWS;
            let rows = o.len() / s.n;
            let b0 = |row: usize| (row / s.m) * b_stride;
            if rows == MATMUL_ROWS && b0(first) == b0(first + rows - 1) {
                for kk in 0..s.k {
                    let a = std::array::from_fn(|r| a_at(first + r, kk));
                    add_scaled_rows(o, a, &bv[b0(first) + kk * s.n..][..s.n]);
                }
            } else {
                for (r, o) in o.chunks_mut(s.n).enumerate() {
                    for kk in 0..s.k {
                        let a = a_at(first + r, kk);
                        for (oj, bk) in o.iter_mut().zip(&bv[b0(first + r) + kk * s.n..][..s.n]) {
                            *oj += a * bk;
                        }
                    }
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
        let mut out = vec![0.0f32; s.batch * s.c_out * plane];
        // Whole output rows accumulate one tap at a time, so the inner loop runs over
        // contiguous memory; every output element still sums its terms in the order
        // (input channel, dt, dy, dx), then the bias, as the direct dot product would.
        let (stride_x, pad_x) = (s.stride[2], s.pad_lo[2]);
        par_chunks_mut(&mut out, plane, |bc, o| {
            let (bi, co) = (bc / s.c_out, bc % s.c_out);
            let g = co / cout_g;
            for ci in 0..cin_g {
                let xc = (bi * s.c_in + g * cin_g + ci) * ti * hi * wi;
                let wc = (co * cin_g + ci) * kt * kh * kw;
                for (tap, &weight) in wv[wc..wc + kt * kh * kw].iter().enumerate() {
                    let (dt, dy, dx) = (tap / (kh * kw), (tap / kw) % kh, tap % kw);
                    // Output columns whose input column `ox * stride + dx - pad` is inside.
                    let first = (pad_x.saturating_sub(dx)).div_ceil(stride_x);
                    let end = ((wi + pad_x).saturating_sub(dx)).div_ceil(stride_x).min(wo);
                    for ot in 0..to {
                        let Some(it) = (ot * s.stride[0] + dt).checked_sub(s.pad_lo[0]).filter(|&v| v < ti) else {
                            continue;
                        };
                        for oy in 0..ho {
                            let Some(iy) = (oy * s.stride[1] + dy).checked_sub(s.pad_lo[1]).filter(|&v| v < hi) else {
                                continue;
                            };
                            let x_row = &xv[xc + (it * hi + iy) * wi..][..wi];
                            let o_row = &mut o[(ot * ho + oy) * wo..][..wo];
                            if first >= end {
                                continue;
                            }
                            if stride_x == 1 {
                                // Contiguous on both sides: the compiler vectorises this.
                                let x_run = &x_row[first + dx - pad_x..][..end - first];
                                for (op, &xv) in o_row[first..end].iter_mut().zip(x_run) {
                                    *op += weight * xv;
                                }
                            } else {
                                for (ox, op) in o_row.iter_mut().enumerate().take(end).skip(first) {
                                    *op += weight * x_row[ox * stride_x + dx - pad_x];
                                }
                            }
                        }
                    }
                }
            }
            if let Some(bb) = &biasv {
                o.iter_mut().for_each(|op| *op += bb[co]);
            }
        });
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
        // Contiguous rows are written a row at a time, strided ones a channel plane
        // (`stride` elements of one index i) at a time.
        let mut out = vec![0.0f32; s.rows * len];
        let piece = if stride == 1 { len } else { stride };
        par_chunks_mut(&mut out, piece, |c, o| {
            for (j, oi) in o.iter_mut().enumerate() {
                let e = c * piece + j;
                let (r, i) = ((e / (len * stride)) * stride + e % stride, (e / stride) % len);
                let (mean, denom) = moments[r];
                let p = (r % s.groups) * s.channels_per_group + i / s.inner;
                let y = ((xv[e] as f64 - mean) / denom) as f32;
                *oi = y * gv.as_ref().map_or(1.0, |g| g[p]) + bv.as_ref().map_or(0.0, |b| b[p]);
            }
        });
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
        // K transposed per head ([d, kv_len]), so each query's scores accumulate over
        // contiguous memory; every score still sums its d products in order.
        let mut kt = vec![0.0f32; s.batch_heads() * d * s.kv_len];
        for (bh, kh) in kt.chunks_mut(d * s.kv_len).enumerate() {
            for j in 0..s.kv_len {
                for (dd, &x) in kv[row(kst, bh, j)..][..d].iter().enumerate() {
                    kh[dd * s.kv_len + j] = x;
                }
            }
        }
        // Output rows in (batch, head, row) order, placed into q's layout at the end.
        let mut rows = vec![0.0f32; s.batch_heads() * s.q_len * d];
        par_chunks_mut(&mut rows, d, |i, o| {
            let (bh, r) = (i / s.q_len, i % s.q_len);
            let qr = &qv[row(qst, bh, r)..][..d];
            let mut scores = vec![0.0f64; s.kv_len];
            for (dd, &qd) in qr.iter().enumerate() {
                let k_row = &kt[(bh * d + dd) * s.kv_len..][..s.kv_len];
                for (sc, &kd) in scores.iter_mut().zip(k_row) {
                    *sc += qd as f64 * kd as f64;
                }
            }
            let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(s.scale as f64 * b));
            let mut acc = vec![0.0f64; d];
            let mut l = 0.0f64;
            for (j, &sc) in scores.iter().enumerate() {
                let p = (s.scale as f64 * sc - m).exp();
                l += p;
                for (a, &vd) in acc.iter_mut().zip(&vv[row(kst, bh, j)..][..d]) {
                    *a += p * vd as f64;
                }
            }
            for (od, a) in o.iter_mut().zip(&acc) {
                *od = (a / l) as f32;
            }
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
            let mut c = vec![0usize; s.shape.len()];
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
            let base: Vec<usize> = s.inputs.iter().map(|v| v.index(&c)).collect();
            for x in 0..inner {
                let at = |i: usize, extra: usize| ins[i][base[i] + step(&s.inputs[i], x) + extra];
                match s.op {
                    MapOp::Copy => o[x] = at(0, 0),
                    MapOp::Unary(u) => o[x] = unary(u, at(0, 0), s.alpha, s.beta),
                    MapOp::AddScaled => o[x] = s.alpha * at(0, 0) + s.beta * at(1, 0),
                    MapOp::Mul => o[x] = at(0, 0) * at(1, 0),
                    MapOp::Modulate => o[x] = at(0, 0) * (1.0 + at(1, 0)) + at(2, 0),
                    MapOp::GatedAdd => o[x] = at(0, 0) + at(1, 0) * at(2, 0),
                    MapOp::Rope => {
                        let (x0, x1, cs, sn) = (at(0, 0), at(0, 1), at(1, 0), at(2, 0));
                        o[2 * x] = x0 * cs - x1 * sn;
                        o[2 * x + 1] = x0 * sn + x1 * cs;
                    }
                }
            }
        });
        let mut dst = out.storage.write().expect("cpu storage lock");
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
