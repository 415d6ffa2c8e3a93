//! The closed set of primitives every backend implements, each described by a spec whose
//! sizes are already validated by `ops`. Layouts are stated here once; the CPU backend is
//! the executable definition of each.

/// Highest tensor rank the strided `map` primitive addresses.
pub const MAX_RANK: usize = 6;

/// `out[bi] = op(A[bi]) x op(B[bi]) (+ bias)`, out `[batch, m, n]` contiguous.
/// A element (i, kk) of batch `bi` sits at `bi*a_batch_stride + (trans_a ? kk*m + i : i*k + kk)`;
/// B element (kk, j) at `bi*b_batch_stride + (trans_b ? j*k + kk : kk*n + j)`.
/// A batch stride of 0 broadcasts one matrix over the batch. `bias` has `n` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct MatmulSpec {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub a_batch_stride: usize,
    pub b_batch_stride: usize,
}

/// 3D convolution over `x [batch, c_in, t, h, w]` with `w [c_out, c_in/groups, kt, kh, kw]`,
/// zero padding `pad_lo` before and `pad_hi` after each spatial axis, no dilation;
/// out `[batch, c_out, to, ho, wo]`. Conv2d is `t = kt = 1`; the Wan VAE's causal conv3d
/// pads time only in front (`pad_lo[0] = 2*p, pad_hi[0] = 0`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConvSpec {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub groups: usize,
    pub input: [usize; 3],
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub pad_lo: [usize; 3],
    pub pad_hi: [usize; 3],
}

impl ConvSpec {
    pub fn output(&self) -> [usize; 3] {
        std::array::from_fn(|a| (self.input[a] + self.pad_lo[a] + self.pad_hi[a] - self.kernel[a]) / self.stride[a] + 1)
    }

    pub fn kernel_volume(&self) -> usize {
        self.kernel.iter().product()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// (x - mean) / sqrt(var + eps): layer norm and group norm.
    MeanVar,
    /// x / sqrt(mean(x^2) + eps).
    Rms,
}

/// Normalises `rows` segments of `row_len` elements, then applies the optional affine
/// parameters. Element `i` of row `r` lies at
/// `(r / stride) * row_len * stride + r % stride + i * stride`
/// and uses parameter index `(r % groups) * channels_per_group + i / inner`:
/// layer/RMS norm is `groups = 1, channels_per_group = row_len, inner = 1, stride = 1`;
/// group norm over `[n, c, spatial]` is `rows = n*groups, row_len = (c/groups)*spatial,
/// inner = spatial, stride = 1`; a norm over the channels of `[n, c, spatial]` (the Wan
/// VAE's) is `rows = n*spatial, row_len = c, groups = 1, channels_per_group = c, inner = 1,
/// stride = spatial`. Rows of stride > 1 take no modulation (`NormThen::Modulate`).
#[derive(Clone, Debug, PartialEq)]
pub struct NormSpec {
    pub kind: NormKind,
    pub rows: usize,
    pub row_len: usize,
    pub groups: usize,
    pub channels_per_group: usize,
    pub inner: usize,
    pub stride: usize,
    pub eps: f32,
}

impl NormSpec {
    /// Layer or RMS norm of `rows` contiguous rows of `row_len` elements.
    pub fn rows(kind: NormKind, rows: usize, row_len: usize, eps: f32) -> Self {
        NormSpec {
            kind,
            rows,
            row_len,
            groups: 1,
            channels_per_group: row_len,
            inner: 1,
            stride: 1,
            eps,
        }
    }
}

/// Softmax over each of `rows` contiguous rows of `cols` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxSpec {
    pub rows: usize,
    pub cols: usize,
}

/// `out = softmax(scale * q k^T) v` for each batch item and head, over q's `q_len` rows and
/// k's and v's `kv_len` rows of `head_dim` elements; out laid out like q. No mask.
///
/// The tensors lie heads-first, `[batch, heads, len, head_dim]`, or with `tokens_first`
/// as `[batch, len, heads, head_dim]`: the layout the q/k/v projections write, so models
/// need no permutes around attention.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionSpec {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub tokens_first: bool,
}

impl AttentionSpec {
    pub fn batch_heads(&self) -> usize {
        self.batch * self.heads
    }

    /// Element strides `[batch, head, row]` of a tensor of `len` rows in this layout.
    pub fn strides(&self, len: usize) -> [usize; 3] {
        let (h, d) = (self.heads, self.head_dim);
        if self.tokens_first {
            [len * h * d, d, h * d]
        } else {
            [h * len * d, len * d, d]
        }
    }

    /// The same attention over heads-first tensors.
    pub fn heads_first(&self) -> Self {
        Self {
            tokens_first: false,
            ..self.clone()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Silu,
    GeluTanh,
    GeluErf,
    Tanh,
    Sigmoid,
    /// `alpha * x + beta`
    Affine,
    /// `x` limited to `[alpha, beta]`
    Clamp,
}

/// What `map` computes for each element of its iteration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapOp {
    /// out = in0 (also converts dtype)
    Copy,
    Unary(UnaryOp),
    /// out = alpha * in0 + beta * in1
    AddScaled,
    /// out = in0 * in1
    Mul,
    /// adaLN: out = in0 * (1 + in1) + in2
    Modulate,
    /// Gated residual: out = in0 + in1 * in2
    GatedAdd,
    /// Rotary embedding of interleaved pairs: each iteration element is a pair starting at
    /// in0's index (x0, x1 at +0, +1), in1 = cos, in2 = sin:
    /// out(+0) = x0*cos - x1*sin, out(+1) = x0*sin + x1*cos.
    Rope,
}

impl MapOp {
    pub fn arity(self) -> usize {
        match self {
            MapOp::Copy | MapOp::Unary(_) => 1,
            MapOp::AddScaled | MapOp::Mul => 2,
            MapOp::Modulate | MapOp::GatedAdd | MapOp::Rope => 3,
        }
    }

    /// `(op, unary)` codes the GPU kernels switch on (elementwise.wgsl, elementwise.cu).
    pub fn codes(self) -> (u32, u32) {
        match self {
            MapOp::Copy => (0, 0),
            MapOp::Unary(u) => (
                1,
                match u {
                    UnaryOp::Silu => 0,
                    UnaryOp::GeluTanh => 1,
                    UnaryOp::GeluErf => 2,
                    UnaryOp::Tanh => 3,
                    UnaryOp::Sigmoid => 4,
                    UnaryOp::Affine => 5,
                    UnaryOp::Clamp => 6,
                },
            ),
            MapOp::AddScaled => (2, 0),
            MapOp::Mul => (3, 0),
            MapOp::Modulate => (4, 0),
            MapOp::Rope => (5, 0),
            MapOp::GatedAdd => (6, 0),
        }
    }

    /// Extra elements read or written past each addressed index.
    pub fn extent(self) -> usize {
        if self == MapOp::Rope {
            2
        } else {
            1
        }
    }
}

/// How one operand of `map` is addressed: element at iteration coordinate `c` is
/// `offset + sum_k (c[k] / div[k]) * strides[k]` (`div` > 1 only on inputs: nearest upsampling).
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub offset: usize,
    pub strides: Vec<usize>,
    pub div: Vec<usize>,
}

impl View {
    pub fn strided(offset: usize, strides: Vec<usize>) -> Self {
        let div = vec![1; strides.len()];
        Self { offset, strides, div }
    }

    /// Index of the element at coordinate `c`.
    pub fn index(&self, c: &[usize]) -> usize {
        self.offset
            + c.iter()
                .zip(&self.strides)
                .zip(&self.div)
                .map(|((c, s), d)| c / d * s)
                .sum::<usize>()
    }

    /// First and last indices touched over the box `start[k] .. start[k] + len[k]` (len > 0).
    pub fn span(&self, start: &[usize], len: &[usize]) -> (usize, usize) {
        let last: Vec<usize> = start.iter().zip(len).map(|(s, l)| s + l - 1).collect();
        (self.index(start), self.index(&last))
    }
}

/// Elementwise work over an iteration space of `shape` (rank <= MAX_RANK): for every
/// coordinate, read `inputs[i]` through its view and write `out` through its view.
/// Covers unary and binary math with broadcasting (stride 0), casts, permute, slice,
/// concat (one map per part into one output), nearest upsample and rotary embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct MapSpec {
    pub op: MapOp,
    pub shape: Vec<usize>,
    pub inputs: Vec<View>,
    pub out: View,
    pub alpha: f32,
    pub beta: f32,
}

impl MapSpec {
    /// The same iteration with size-1 dimensions dropped and neighbouring dimensions merged
    /// wherever every operand steps through the pair as through one dimension (outer stride =
    /// inner stride x inner size, no upsampling divisor): the elements are visited in the same
    /// order at the same indices, with fewer index computations per element.
    pub fn collapsed(&self) -> MapSpec {
        let views: Vec<&View> = self.inputs.iter().chain(std::iter::once(&self.out)).collect();
        let mut shape: Vec<usize> = Vec::new();
        let mut strides: Vec<Vec<usize>> = vec![Vec::new(); views.len()];
        let mut divs: Vec<Vec<usize>> = vec![Vec::new(); views.len()];
        for (k, &size) in self.shape.iter().enumerate() {
            if size == 1 {
                continue;
            }
            let merge = !shape.is_empty()
                && views
                    .iter()
                    .enumerate()
                    .all(|(i, v)| v.div[k] == 1 && divs[i].last() == Some(&1) && strides[i].last() == Some(&(v.strides[k] * size)));
            if merge {
                *shape.last_mut().expect("merge needs a previous dimension") *= size;
                for (i, v) in views.iter().enumerate() {
                    *strides[i].last_mut().expect("same length as shape") = v.strides[k];
                }
            } else {
                shape.push(size);
                for (i, v) in views.iter().enumerate() {
                    strides[i].push(v.strides[k]);
                    divs[i].push(v.div[k]);
                }
            }
        }
        if shape.is_empty() {
            shape.push(1);
            for i in 0..views.len() {
                strides[i].push(0);
                divs[i].push(1);
            }
        }
        let mut made: Vec<View> = views
            .iter()
            .zip(strides.into_iter().zip(divs))
            .map(|(v, (strides, div))| View {
                offset: v.offset,
                strides,
                div,
            })
            .collect();
        let out = made.pop().expect("the output view");
        MapSpec {
            op: self.op,
            shape,
            inputs: made,
            out,
            alpha: self.alpha,
            beta: self.beta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indices(s: &MapSpec) -> Vec<Vec<usize>> {
        let total: usize = s.shape.iter().product();
        let mut c = vec![0usize; s.shape.len()];
        let mut out = Vec::new();
        for _ in 0..total {
            out.push(s.inputs.iter().chain(std::iter::once(&s.out)).map(|v| v.index(&c)).collect());
            for k in (0..c.len()).rev() {
                c[k] += 1;
                if c[k] < s.shape[k] {
                    break;
                }
                c[k] = 0;
            }
        }
        out
    }

    /// Collapsing keeps every operand's index sequence and merges what it can: a contiguous
    /// add becomes one dimension; a permute, a broadcast and an upsample keep their structure.
    #[test]
    fn collapsing_keeps_every_index() {
        let contiguous = |shape: &[usize]| {
            let mut st = vec![1; shape.len()];
            for i in (0..shape.len().saturating_sub(1)).rev() {
                st[i] = st[i + 1] * shape[i + 1];
            }
            st
        };
        let spec = |shape: Vec<usize>, inputs: Vec<View>, out: View| MapSpec {
            op: MapOp::AddScaled,
            shape,
            inputs,
            out,
            alpha: 1.0,
            beta: 1.0,
        };
        let shape = vec![2, 1, 3, 4, 5];
        let cases = [
            (
                spec(
                    shape.clone(),
                    vec![View::strided(0, contiguous(&shape)), View::strided(0, contiguous(&shape))],
                    View::strided(0, contiguous(&shape)),
                ),
                1,
            ),
            // broadcast of a per-channel bias over [2, 1, 3, 4*5]
            (
                spec(
                    shape.clone(),
                    vec![View::strided(0, contiguous(&shape)), View::strided(0, vec![0, 0, 1, 0, 0])],
                    View::strided(0, contiguous(&shape)),
                ),
                3,
            ),
            // permute [2, 3, 4, 5] -> read through swapped strides
            (
                spec(
                    vec![2, 3, 4, 5],
                    vec![View::strided(7, vec![60, 5, 15, 1])],
                    View::strided(0, vec![60, 20, 5, 1]),
                ),
                4,
            ),
            // nearest upsample by 2 on the last two axes
            (
                spec(
                    vec![2, 3, 4, 4],
                    vec![View {
                        offset: 0,
                        strides: vec![12, 4, 2, 1],
                        div: vec![1, 1, 2, 2],
                    }],
                    View::strided(0, vec![48, 16, 4, 1]),
                ),
                3,
            ),
        ];
        for (i, (s, rank)) in cases.iter().enumerate() {
            let c = s.collapsed();
            assert_eq!(c.shape.iter().product::<usize>(), s.shape.iter().product::<usize>(), "case {i}");
            assert_eq!(indices(&c), indices(s), "case {i}");
            assert_eq!(c.shape.len(), *rank, "case {i}: {:?}", c.shape);
        }
    }
}
