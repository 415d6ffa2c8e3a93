//! The op set models are written in. Each op validates shapes, names the problem when they
//! do not fit, and lowers onto one backend primitive (see `spec`).

use crate::backend::{Backend, NormThen};
use crate::error::{shape_err, Error, Result};
use crate::spec::{AttentionSpec, ConvSpec, MapOp, MapSpec, MatmulSpec, NormKind, NormSpec, SoftmaxSpec, UnaryOp, View, MAX_RANK};
use crate::tensor::{contiguous_strides, numel, DType, HostData, HostTensor, Tensor};

fn check_dtype<B: Backend>(b: &B, op: &'static str, dtype: DType) -> Result<()> {
    if b.supports(dtype) {
        Ok(())
    } else {
        Err(Error::UnsupportedDType {
            op,
            dtype,
            backend: b.name(),
        })
    }
}

fn expect_rank<B: Backend>(op: &'static str, name: &str, t: &Tensor<B>, rank: usize) -> Result<()> {
    if t.rank() == rank {
        Ok(())
    } else {
        Err(shape_err(op, format!("{name} must have rank {rank}, got shape {:?}", t.shape())))
    }
}

fn expect_len<B: Backend>(op: &'static str, name: &str, t: &Tensor<B>, len: usize) -> Result<()> {
    if t.numel() == len {
        Ok(())
    } else {
        Err(shape_err(op, format!("{name} must have {len} elements, got shape {:?}", t.shape())))
    }
}

/// `x [.., in] @ w[out, in]^T + bias[out]`: a PyTorch `Linear`.
pub fn linear<B: Backend>(b: &B, x: &Tensor<B>, w: &Tensor<B>, bias: Option<&Tensor<B>>) -> Result<Tensor<B>> {
    let (spec, shape) = linear_spec(x, w, bias)?;
    b.matmul(x, w, bias, &spec)?.reshape(&shape)
}

/// `then(linear(x, w, bias))`, with the activation fused into the product where the
/// backend can (a transformer's feed-forward opening).
pub fn linear_then<B: Backend>(b: &B, x: &Tensor<B>, w: &Tensor<B>, bias: Option<&Tensor<B>>, then: UnaryOp) -> Result<Tensor<B>> {
    let (spec, shape) = linear_spec(x, w, bias)?;
    b.matmul_then(x, w, bias, &spec, then)?.reshape(&shape)
}

/// `residual + gate * linear(x, w, bias)` (no gate: 1): the closing projection of a residual
/// branch, `gate` `[batch, 1, out]` (adaLN gating) for `residual` `[batch, tokens, out]`.
/// Backends fold the sum, and a gate shared by every row, into the product where they can.
pub fn linear_residual<B: Backend>(
    b: &B,
    residual: &Tensor<B>,
    x: &Tensor<B>,
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    gate: Option<&Tensor<B>>,
) -> Result<Tensor<B>> {
    let op = "linear_residual";
    let (spec, shape) = linear_spec(x, w, bias)?;
    let rs = residual.shape();
    if rs != shape.as_slice() {
        return Err(shape_err(
            op,
            format!("residual {rs:?} differs from the projection's output {shape:?}"),
        ));
    }
    if let Some(g) = gate {
        if rs.len() != 3 || g.shape() != [rs[0], 1, rs[2]] {
            return Err(shape_err(
                op,
                format!("gate {:?} for residual {rs:?}: expected [batch, 1, features]", g.shape()),
            ));
        }
    }
    b.matmul_residual(x, w, bias, &spec, residual, gate)
}

/// The product a linear layer runs and the shape of its output.
fn linear_spec<B: Backend>(x: &Tensor<B>, w: &Tensor<B>, bias: Option<&Tensor<B>>) -> Result<(MatmulSpec, Vec<usize>)> {
    expect_rank("linear", "weight", w, 2)?;
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let Some((&last, lead)) = x.shape().split_last() else {
        return Err(shape_err("linear", "input is a scalar"));
    };
    if last != k {
        return Err(shape_err(
            "linear",
            format!("input {:?} does not end in weight's in-features {k}", x.shape()),
        ));
    }
    if let Some(bias) = bias {
        expect_len("linear", "bias", bias, n)?;
    }
    let spec = MatmulSpec {
        batch: 1,
        m: numel(lead),
        k,
        n,
        trans_a: false,
        trans_b: true,
        a_batch_stride: 0,
        b_batch_stride: 0,
    };
    Ok((spec, [lead, &[n]].concat()))
}

/// Batched matrix product. `a` is `[m, k]` or `[batch, m, k]` (`[k, m]` when `trans_a`),
/// `bm` is `[k, n]` or `[batch, k, n]` (`[n, k]` when `trans_b`); a rank-2 operand is shared
/// by every batch. Output `[batch, m, n]` (or `[m, n]` when both are rank 2).
pub fn matmul<B: Backend>(
    b: &B,
    a: &Tensor<B>,
    bm: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    trans_a: bool,
    trans_b: bool,
) -> Result<Tensor<B>> {
    let op = "matmul";
    let split = |t: &Tensor<B>, name: &str| -> Result<(usize, usize, usize)> {
        match *t.shape() {
            [r, c] => Ok((0, r, c)),
            [bt, r, c] => Ok((bt, r, c)),
            _ => Err(shape_err(op, format!("{name} must be rank 2 or 3, got {:?}", t.shape()))),
        }
    };
    let (ba, ar, ac) = split(a, "a")?;
    let (bb, br, bc) = split(bm, "b")?;
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if trans_b { (bc, br) } else { (br, bc) };
    if k != k2 {
        return Err(shape_err(
            op,
            format!("inner sizes differ: a {:?} vs b {:?}", a.shape(), bm.shape()),
        ));
    }
    if ba != 0 && bb != 0 && ba != bb {
        return Err(shape_err(op, format!("batch sizes differ: {ba} vs {bb}")));
    }
    if let Some(bias) = bias {
        expect_len(op, "bias", bias, n)?;
    }
    let batch = ba.max(bb).max(1);
    let spec = MatmulSpec {
        batch,
        m,
        k,
        n,
        trans_a,
        trans_b,
        a_batch_stride: if ba == 0 { 0 } else { m * k },
        b_batch_stride: if bb == 0 { 0 } else { k * n },
    };
    let y = b.matmul(a, bm, bias, &spec)?;
    if ba == 0 && bb == 0 {
        y.reshape(&[m, n])
    } else {
        Ok(y)
    }
}

/// 2D convolution, `x [n, c, h, w]`, `w [c_out, c/groups, kh, kw]`, symmetric padding.
pub fn conv2d<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<Tensor<B>> {
    conv2d_padded(b, x, w, bias, stride, [padding; 2], [padding; 2], groups)
}

/// 2D convolution with `pad_lo` rows/columns of zeros before and `pad_hi` after the input
/// (`[height, width]`), as the SD VAE encoder's downsampler pads right and bottom only.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_padded<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    stride: usize,
    pad_lo: [usize; 2],
    pad_hi: [usize; 2],
    groups: usize,
) -> Result<Tensor<B>> {
    expect_rank("conv2d", "input", x, 4)?;
    expect_rank("conv2d", "weight", w, 4)?;
    let (xs, ws) = (x.shape(), w.shape());
    let x5 = x.reshape(&[xs[0], xs[1], 1, xs[2], xs[3]])?;
    let w5 = w.reshape(&[ws[0], ws[1], 1, ws[2], ws[3]])?;
    let y = conv3d(
        b,
        &x5,
        &w5,
        bias,
        [1, stride, stride],
        [0, pad_lo[0], pad_lo[1]],
        [0, pad_hi[0], pad_hi[1]],
        groups,
    )?;
    let ys = y.shape().to_vec();
    y.reshape(&[ys[0], ys[1], ys[3], ys[4]])
}

/// Causal 3D convolution as in the Wan VAE: time padded by `2 * padding[0]` in front only,
/// height and width padded symmetrically.
pub fn causal_conv3d<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    stride: [usize; 3],
    padding: [usize; 3],
) -> Result<Tensor<B>> {
    let lo = [2 * padding[0], padding[1], padding[2]];
    let hi = [0, padding[1], padding[2]];
    conv3d(b, x, w, bias, stride, lo, hi, 1)
}

/// General 3D convolution, `x [n, c, t, h, w]`, `w [c_out, c/groups, kt, kh, kw]`.
#[allow(clippy::too_many_arguments)]
pub fn conv3d<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    stride: [usize; 3],
    pad_lo: [usize; 3],
    pad_hi: [usize; 3],
    groups: usize,
) -> Result<Tensor<B>> {
    conv3d_frames(b, &[x], w, bias, stride, pad_lo, pad_hi, groups)
}

/// `conv3d` of `parts` joined along time (dimension 2): a causal convolution's cached frames,
/// then its new ones. Backends that can read each part where it lies never join them.
#[allow(clippy::too_many_arguments)]
pub fn conv3d_frames<B: Backend>(
    b: &B,
    parts: &[&Tensor<B>],
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    stride: [usize; 3],
    pad_lo: [usize; 3],
    pad_hi: [usize; 3],
    groups: usize,
) -> Result<Tensor<B>> {
    let op = "conv";
    let xs = joined_shape(op, parts, 2)?;
    if let Some(p) = parts.iter().find(|p| p.dtype() != parts[0].dtype()) {
        return Err(shape_err(
            op,
            format!("input parts of dtypes {:?} and {:?}", parts[0].dtype(), p.dtype()),
        ));
    }
    if xs.len() != 5 {
        return Err(shape_err(op, format!("input must have rank 5, got shape {xs:?}")));
    }
    expect_rank(op, "weight", w, 5)?;
    let ws = w.shape();
    if groups == 0 || !xs[1].is_multiple_of(groups) || !ws[0].is_multiple_of(groups) {
        return Err(shape_err(
            op,
            format!(
                "{groups} groups do not divide input channels {} and output channels {}",
                xs[1], ws[0]
            ),
        ));
    }
    if ws[1] * groups != xs[1] {
        return Err(shape_err(
            op,
            format!(
                "weight {:?} expects {} input channels, input {:?} has {}",
                ws,
                ws[1] * groups,
                xs,
                xs[1]
            ),
        ));
    }
    if stride.contains(&0) {
        return Err(shape_err(op, "stride must be at least 1"));
    }
    for a in 0..3 {
        if xs[2 + a] + pad_lo[a] + pad_hi[a] < ws[2 + a] {
            return Err(shape_err(
                op,
                format!("kernel {:?} is larger than the padded input {:?}", &ws[2..], &xs[2..]),
            ));
        }
    }
    if let Some(bias) = bias {
        expect_len(op, "bias", bias, ws[0])?;
    }
    let spec = ConvSpec {
        batch: xs[0],
        c_in: xs[1],
        c_out: ws[0],
        groups,
        input: [xs[2], xs[3], xs[4]],
        kernel: [ws[2], ws[3], ws[4]],
        stride,
        pad_lo,
        pad_hi,
    };
    match parts {
        [x] => b.conv(x, w, bias, &spec),
        _ => b.conv_frames(parts, w, bias, &spec),
    }
}

/// Group norm over `x [n, c, ...]` with per-channel affine parameters.
pub fn group_norm<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    groups: usize,
    gamma: Option<&Tensor<B>>,
    beta: Option<&Tensor<B>>,
    eps: f32,
) -> Result<Tensor<B>> {
    let spec = group_norm_spec(x, groups, gamma, beta, eps)?;
    b.norm(x, gamma, beta, &spec)
}

/// `silu(group_norm(x))`, the opening of every resnet block, fused where the backend can.
pub fn group_norm_silu<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    groups: usize,
    gamma: Option<&Tensor<B>>,
    beta: Option<&Tensor<B>>,
    eps: f32,
) -> Result<Tensor<B>> {
    let spec = group_norm_spec(x, groups, gamma, beta, eps)?;
    b.norm_then(x, gamma, beta, &spec, NormThen::Silu)
}

fn group_norm_spec<B: Backend>(
    x: &Tensor<B>,
    groups: usize,
    gamma: Option<&Tensor<B>>,
    beta: Option<&Tensor<B>>,
    eps: f32,
) -> Result<NormSpec> {
    let op = "group_norm";
    if x.rank() < 2 {
        return Err(shape_err(op, format!("input must be [n, c, ...], got {:?}", x.shape())));
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    if groups == 0 || c % groups != 0 {
        return Err(shape_err(op, format!("{groups} groups do not divide {c} channels")));
    }
    for (name, p) in [("gamma", gamma), ("beta", beta)] {
        if let Some(p) = p {
            expect_len(op, name, p, c)?;
        }
    }
    let inner = numel(&x.shape()[2..]);
    let cpg = c / groups;
    Ok(NormSpec {
        kind: NormKind::MeanVar,
        rows: n * groups,
        row_len: cpg * inner,
        groups,
        channels_per_group: cpg,
        inner,
        stride: 1,
        eps,
    })
}

fn last_dim_norm<B: Backend>(
    b: &B,
    op: &'static str,
    kind: NormKind,
    x: &Tensor<B>,
    gamma: Option<&Tensor<B>>,
    beta: Option<&Tensor<B>>,
    eps: f32,
) -> Result<Tensor<B>> {
    let Some(&d) = x.shape().last() else {
        return Err(shape_err(op, "input is a scalar"));
    };
    for (name, p) in [("gamma", gamma), ("beta", beta)] {
        if let Some(p) = p {
            expect_len(op, name, p, d)?;
        }
    }
    b.norm(x, gamma, beta, &NormSpec::rows(kind, x.numel() / d.max(1), d, eps))
}

/// Layer norm over the last dimension.
pub fn layer_norm<B: Backend>(b: &B, x: &Tensor<B>, gamma: Option<&Tensor<B>>, beta: Option<&Tensor<B>>, eps: f32) -> Result<Tensor<B>> {
    last_dim_norm(b, "layer_norm", NormKind::MeanVar, x, gamma, beta, eps)
}

/// adaLN: `layer_norm(x) * (1 + scale) + shift` without affine parameters, for `x [n, s, d]`
/// and `scale`, `shift` of `n * d` elements (`[n, 1, d]`), fused where the backend can.
pub fn layer_norm_modulate<B: Backend>(b: &B, x: &Tensor<B>, scale: &Tensor<B>, shift: &Tensor<B>, eps: f32) -> Result<Tensor<B>> {
    let op = "layer_norm_modulate";
    expect_rank(op, "x", x, 3)?;
    let (n, d) = (x.shape()[0], x.shape()[2]);
    expect_len(op, "scale", scale, n * d)?;
    expect_len(op, "shift", shift, n * d)?;
    let spec = NormSpec::rows(NormKind::MeanVar, x.numel() / d.max(1), d, eps);
    b.norm_then(x, None, None, &spec, NormThen::Modulate { scale, shift })
}

/// RMS norm over the last dimension.
pub fn rms_norm<B: Backend>(b: &B, x: &Tensor<B>, gamma: Option<&Tensor<B>>, eps: f32) -> Result<Tensor<B>> {
    last_dim_norm(b, "rms_norm", NormKind::Rms, x, gamma, None, eps)
}

/// `rope(rms_norm(x) * gamma)` for `x [n, s, heads * head_dim]` and rope tables `cos`, `sin`
/// `[s, head_dim / 2]` (`rope3d_tables`): the RMS is taken over the whole row (all heads),
/// as Wan's q/k norms do, and the rotation is fused where the backend can.
pub fn rms_norm_rope<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    gamma: Option<&Tensor<B>>,
    eps: f32,
    cos: &Tensor<B>,
    sin: &Tensor<B>,
) -> Result<Tensor<B>> {
    let op = "rms_norm_rope";
    expect_rank(op, "x", x, 3)?;
    let (n, s, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    expect_rank(op, "cos", cos, 2)?;
    let head_dim = 2 * cos.shape()[1];
    if head_dim == 0 || d % head_dim != 0 {
        return Err(shape_err(
            op,
            format!("rows of {d} do not split into heads of {head_dim} (twice cos's columns)"),
        ));
    }
    expect_rope_tables(op, s, head_dim / 2, cos, sin)?;
    if let Some(g) = gamma {
        expect_len(op, "gamma", g, d)?;
    }
    b.norm_then(
        x,
        gamma,
        None,
        &NormSpec::rows(NormKind::Rms, n * s, d, eps),
        NormThen::Rope { cos, sin },
    )
}

/// `silu(rms_norm(x) * gamma)` with the RMS taken over the channels of `x [n, c, ...]` at
/// every position (the Wan VAE's), without a permute to channels-last and back; the SiLU is
/// fused where the backend can.
pub fn channel_rms_norm_silu<B: Backend>(b: &B, x: &Tensor<B>, gamma: &Tensor<B>, eps: f32) -> Result<Tensor<B>> {
    let op = "channel_rms_norm_silu";
    if x.rank() < 2 {
        return Err(shape_err(op, format!("input must be [n, c, ...], got {:?}", x.shape())));
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    expect_len(op, "gamma", gamma, c)?;
    let spatial = numel(&x.shape()[2..]);
    let spec = NormSpec {
        kind: NormKind::Rms,
        rows: n * spatial,
        row_len: c,
        groups: 1,
        channels_per_group: c,
        inner: 1,
        stride: spatial,
        eps,
    };
    b.norm_then(x, Some(gamma), None, &spec, NormThen::Silu)
}

/// Softmax over the last dimension.
pub fn softmax<B: Backend>(b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
    let Some(&cols) = x.shape().last() else {
        return Err(shape_err("softmax", "input is a scalar"));
    };
    b.softmax(
        x,
        &SoftmaxSpec {
            rows: x.numel() / cols.max(1),
            cols,
        },
    )
}

/// Scaled dot-product attention on `[batch, heads, seq, head_dim]` tensors (k and v share a
/// sequence length that may differ from q's). Never materialises the score matrix on GPUs.
pub fn attention<B: Backend>(b: &B, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>, scale: f32) -> Result<Tensor<B>> {
    attention_in(b, q, k, v, scale, false)
}

/// `attention` on tensors laid out `[batch, seq, heads, head_dim]`, as linear projections
/// write them (reshaped); the output is laid out the same way.
pub fn attention_tokens_first<B: Backend>(b: &B, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>, scale: f32) -> Result<Tensor<B>> {
    attention_in(b, q, k, v, scale, true)
}

fn attention_in<B: Backend>(b: &B, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>, scale: f32, tokens_first: bool) -> Result<Tensor<B>> {
    let op = "attention";
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        expect_rank(op, name, t, 4)?;
    }
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    // Positions of the head and sequence dimensions.
    let (hd, sd, layout) = if tokens_first {
        (2, 1, "[b, s, h, d]")
    } else {
        (1, 2, "[b, h, s, d]")
    };
    if ks != vs || qs[0] != ks[0] || qs[hd] != ks[hd] || qs[3] != ks[3] {
        return Err(shape_err(
            op,
            format!("q {qs:?}, k {ks:?}, v {vs:?} disagree (expected {layout} with equal b, h, d)"),
        ));
    }
    if ks[sd] == 0 && q.numel() > 0 {
        return Err(shape_err(op, format!("k {ks:?} has no keys: softmax over an empty sequence")));
    }
    let spec = AttentionSpec {
        batch: qs[0],
        heads: qs[hd],
        q_len: qs[sd],
        kv_len: ks[sd],
        head_dim: qs[3],
        scale,
        // One head lies the same either way.
        tokens_first: tokens_first && qs[hd] > 1,
    };
    b.attention(q, k, v, &spec)
}

/// Numpy-style broadcast of several shapes; returns the output shape and, per input, a view
/// with stride 0 on broadcast dimensions.
fn broadcast<B: Backend>(op: &'static str, inputs: &[&Tensor<B>]) -> Result<(Vec<usize>, Vec<View>)> {
    let rank = inputs.iter().map(|t| t.rank()).max().unwrap_or(0).max(1);
    if rank > MAX_RANK {
        return Err(shape_err(op, format!("rank {rank} exceeds the supported {MAX_RANK}")));
    }
    let padded: Vec<Vec<usize>> = inputs
        .iter()
        .map(|t| [vec![1; rank - t.rank()], t.shape().to_vec()].concat())
        .collect();
    let mut shape = vec![1; rank];
    for p in &padded {
        for (s, &d) in shape.iter_mut().zip(p) {
            if d != 1 && *s != 1 && d != *s {
                let shapes: Vec<_> = inputs.iter().map(|t| t.shape().to_vec()).collect();
                return Err(shape_err(op, format!("shapes {shapes:?} do not broadcast")));
            }
            if d != 1 {
                *s = d;
            }
        }
    }
    let views = padded
        .iter()
        .map(|p| {
            let strides = contiguous_strides(p)
                .into_iter()
                .zip(p)
                .map(|(s, &d)| if d == 1 { 0 } else { s })
                .collect();
            View::strided(0, strides)
        })
        .collect();
    Ok((shape, views))
}

fn elementwise<B: Backend>(b: &B, op: &'static str, map: MapOp, inputs: &[&Tensor<B>], alpha: f32, beta: f32) -> Result<Tensor<B>> {
    let (shape, views) = broadcast(op, inputs)?;
    let out = b.alloc(&shape, inputs[0].dtype())?;
    let spec = MapSpec {
        op: map,
        out: View::strided(0, contiguous_strides(&shape)),
        shape,
        inputs: views,
        alpha,
        beta,
    };
    b.map(inputs, &out, &spec)?;
    Ok(out)
}

pub fn unary<B: Backend>(b: &B, x: &Tensor<B>, op: UnaryOp) -> Result<Tensor<B>> {
    elementwise(b, "unary", MapOp::Unary(op), &[x], 1.0, 0.0)
}

pub fn silu<B: Backend>(b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
    unary(b, x, UnaryOp::Silu)
}

pub fn gelu_tanh<B: Backend>(b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
    unary(b, x, UnaryOp::GeluTanh)
}

pub fn gelu_erf<B: Backend>(b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
    unary(b, x, UnaryOp::GeluErf)
}

/// `alpha * x + beta`.
pub fn scale<B: Backend>(b: &B, x: &Tensor<B>, alpha: f32, beta: f32) -> Result<Tensor<B>> {
    elementwise(b, "scale", MapOp::Unary(UnaryOp::Affine), &[x], alpha, beta)
}

/// `x` limited to `[lo, hi]`.
pub fn clamp<B: Backend>(b: &B, x: &Tensor<B>, lo: f32, hi: f32) -> Result<Tensor<B>> {
    if lo > hi || lo.is_nan() || hi.is_nan() {
        return Err(shape_err("clamp", format!("the range [{lo}, {hi}] is empty")));
    }
    elementwise(b, "clamp", MapOp::Unary(UnaryOp::Clamp), &[x], lo, hi)
}

/// `alpha * x + beta * y` with broadcasting: add, subtract and blend in one op.
pub fn add_scaled<B: Backend>(b: &B, x: &Tensor<B>, y: &Tensor<B>, alpha: f32, beta: f32) -> Result<Tensor<B>> {
    elementwise(b, "add", MapOp::AddScaled, &[x, y], alpha, beta)
}

pub fn add<B: Backend>(b: &B, x: &Tensor<B>, y: &Tensor<B>) -> Result<Tensor<B>> {
    add_scaled(b, x, y, 1.0, 1.0)
}

pub fn mul<B: Backend>(b: &B, x: &Tensor<B>, y: &Tensor<B>) -> Result<Tensor<B>> {
    elementwise(b, "mul", MapOp::Mul, &[x, y], 1.0, 0.0)
}

/// adaLN modulation `x * (1 + scale) + shift`, with broadcasting.
pub fn modulate<B: Backend>(b: &B, x: &Tensor<B>, scale: &Tensor<B>, shift: &Tensor<B>) -> Result<Tensor<B>> {
    elementwise(b, "modulate", MapOp::Modulate, &[x, scale, shift], 1.0, 0.0)
}

/// Gated residual `x + y * gate`, with broadcasting: one pass instead of a product and a sum.
pub fn gated_add<B: Backend>(b: &B, x: &Tensor<B>, y: &Tensor<B>, gate: &Tensor<B>) -> Result<Tensor<B>> {
    elementwise(b, "gated_add", MapOp::GatedAdd, &[x, y, gate], 1.0, 0.0)
}

pub fn cast<B: Backend>(b: &B, x: &Tensor<B>, dtype: DType) -> Result<Tensor<B>> {
    check_dtype(b, "cast", dtype)?;
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let out = b.alloc(x.shape(), dtype)?;
    let strides = contiguous_strides(x.shape());
    let spec = MapSpec {
        op: MapOp::Copy,
        shape: x.shape().to_vec(),
        inputs: vec![View::strided(0, strides.clone())],
        out: View::strided(0, strides),
        alpha: 1.0,
        beta: 0.0,
    };
    b.map(&[x], &out, &spec)?;
    Ok(out)
}

/// Rope tables `cos` and `sin` must be `[tokens, pairs]`.
fn expect_rope_tables<B: Backend>(op: &'static str, tokens: usize, pairs: usize, cos: &Tensor<B>, sin: &Tensor<B>) -> Result<()> {
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t.shape() != [tokens, pairs] {
            return Err(shape_err(op, format!("{name} must be [{tokens}, {pairs}], got {:?}", t.shape())));
        }
    }
    Ok(())
}

/// Rotary embedding of interleaved pairs on `x [batch, seq, heads, head_dim]` with
/// `cos`, `sin` of shape `[seq, head_dim / 2]` (see `rope3d_tables` for Wan's 3D layout).
pub fn rope<B: Backend>(b: &B, x: &Tensor<B>, cos: &Tensor<B>, sin: &Tensor<B>) -> Result<Tensor<B>> {
    let op = "rope";
    expect_rank(op, "x", x, 4)?;
    let [bn, s, h, d] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    if d % 2 != 0 {
        return Err(shape_err(op, format!("head_dim {d} is odd")));
    }
    expect_rope_tables(op, s, d / 2, cos, sin)?;
    let x_view = View::strided(0, vec![s * h * d, h * d, d, 2]);
    let table = View::strided(0, vec![0, d / 2, 0, 1]);
    let out = b.alloc(x.shape(), x.dtype())?;
    let spec = MapSpec {
        op: MapOp::Rope,
        shape: vec![bn, s, h, d / 2],
        inputs: vec![x_view.clone(), table.clone(), table],
        out: x_view,
        alpha: 1.0,
        beta: 0.0,
    };
    b.map(&[x, cos, sin], &out, &spec)?;
    Ok(out)
}

/// Copies `x` through `view` into a new contiguous tensor of `shape`.
fn gather<B: Backend>(b: &B, x: &Tensor<B>, shape: Vec<usize>, view: View) -> Result<Tensor<B>> {
    let out = b.alloc(&shape, x.dtype())?;
    let spec = MapSpec {
        op: MapOp::Copy,
        out: View::strided(0, contiguous_strides(&shape)),
        shape,
        inputs: vec![view],
        alpha: 1.0,
        beta: 0.0,
    };
    b.map(&[x], &out, &spec)?;
    Ok(out)
}

/// Reorders dimensions: output dimension `i` is input dimension `perm[i]`.
pub fn permute<B: Backend>(b: &B, x: &Tensor<B>, perm: &[usize]) -> Result<Tensor<B>> {
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() || perm.iter().any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true)) {
        return Err(shape_err(
            "permute",
            format!("{perm:?} is not a permutation of {} dimensions", x.rank()),
        ));
    }
    if x.rank() > MAX_RANK {
        return Err(shape_err("permute", format!("rank {} exceeds the supported {MAX_RANK}", x.rank())));
    }
    let strides = contiguous_strides(x.shape());
    let shape = perm.iter().map(|&p| x.shape()[p]).collect();
    gather(b, x, shape, View::strided(0, perm.iter().map(|&p| strides[p]).collect()))
}

/// `len` elements of dimension `dim` starting at `start`.
pub fn slice<B: Backend>(b: &B, x: &Tensor<B>, dim: usize, start: usize, len: usize) -> Result<Tensor<B>> {
    if dim >= x.rank() || start + len > x.shape()[dim] {
        return Err(shape_err(
            "slice",
            format!("[{start}, {}) of dimension {dim} is outside {:?}", start + len, x.shape()),
        ));
    }
    if x.rank() > MAX_RANK {
        return Err(shape_err("slice", format!("rank {} exceeds the supported {MAX_RANK}", x.rank())));
    }
    let strides = contiguous_strides(x.shape());
    let mut shape = x.shape().to_vec();
    shape[dim] = len;
    gather(b, x, shape, View::strided(start * strides[dim], strides))
}

/// The shape of `parts` joined along `dim`: they must agree in every other dimension.
fn joined_shape<B: Backend>(op: &'static str, parts: &[&Tensor<B>], dim: usize) -> Result<Vec<usize>> {
    let Some(first) = parts.first() else {
        return Err(shape_err(op, "no inputs"));
    };
    if dim >= first.rank() || first.rank() > MAX_RANK {
        return Err(shape_err(op, format!("dimension {dim} is invalid for {:?}", first.shape())));
    }
    for p in parts {
        let same = p.rank() == first.rank() && (0..p.rank()).all(|i| i == dim || p.shape()[i] == first.shape()[i]);
        if !same {
            return Err(shape_err(
                op,
                format!("{:?} and {:?} differ outside dimension {dim}", first.shape(), p.shape()),
            ));
        }
    }
    let mut shape = first.shape().to_vec();
    shape[dim] = parts.iter().map(|p| p.shape()[dim]).sum();
    Ok(shape)
}

/// Joins tensors of equal shape except along `dim`.
pub fn concat<B: Backend>(b: &B, parts: &[&Tensor<B>], dim: usize) -> Result<Tensor<B>> {
    let shape = joined_shape("concat", parts, dim)?;
    let out = b.alloc(&shape, parts[0].dtype())?;
    let out_strides = contiguous_strides(&shape);
    let mut offset = 0;
    for p in parts {
        let spec = MapSpec {
            op: MapOp::Copy,
            shape: p.shape().to_vec(),
            inputs: vec![View::strided(0, contiguous_strides(p.shape()))],
            out: View::strided(offset * out_strides[dim], out_strides.clone()),
            alpha: 1.0,
            beta: 0.0,
        };
        if p.numel() > 0 {
            b.map(&[p], &out, &spec)?;
        }
        offset += p.shape()[dim];
    }
    Ok(out)
}

/// Nearest-neighbour upsampling of the last two dimensions by `factor`.
pub fn upsample_nearest<B: Backend>(b: &B, x: &Tensor<B>, factor: usize) -> Result<Tensor<B>> {
    let r = x.rank();
    if !(2..=MAX_RANK).contains(&r) || factor == 0 {
        return Err(shape_err(
            "upsample_nearest",
            format!("cannot upsample {:?} by {factor}", x.shape()),
        ));
    }
    let mut shape = x.shape().to_vec();
    shape[r - 2] *= factor;
    shape[r - 1] *= factor;
    let mut view = View::strided(0, contiguous_strides(x.shape()));
    view.div[r - 2] = factor;
    view.div[r - 1] = factor;
    gather(b, x, shape, view)
}

/// Sinusoidal timestep embedding `[timesteps.len(), dim]` as diffusers' `get_timestep_embedding`
/// computes it (f32 arguments, then sin and cos). Host-side: it is a few hundred numbers per
/// step, and GPU sin/cos lose precision on arguments near 1000.
pub fn timestep_embedding<B: Backend>(
    b: &B,
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
    max_period: f32,
    dtype: DType,
) -> Result<Tensor<B>> {
    let half = dim / 2;
    let mut values = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = -max_period.ln() * i as f32 / (half as f32 - downscale_freq_shift);
                t * exponent.exp()
            })
            .collect();
        let sin = args.iter().map(|&a| (a as f64).sin() as f32);
        let cos = args.iter().map(|&a| (a as f64).cos() as f32);
        let row: Vec<f32> = if flip_sin_to_cos {
            cos.chain(sin).collect()
        } else {
            sin.chain(cos).collect()
        };
        values.extend(row);
        values.extend(std::iter::repeat_n(0.0, dim - 2 * half));
    }
    b.upload(&HostTensor::new(&[timesteps.len(), dim], HostData::from_f32(dtype, values))?)
}

/// Wan2.1's 3D rotary tables for a `frames x height x width` token grid: the head dimension
/// splits into time, height and width parts (`d - 4*(d/6)`, `2*(d/6)`, `2*(d/6)`), each with
/// its own frequencies `theta^(-2i/part)`. Returns `cos`, `sin` as `[tokens, head_dim/2]`,
/// computed in f64 like the reference.
pub fn rope3d_tables(frames: usize, height: usize, width: usize, head_dim: usize, theta: f64) -> Result<(HostTensor, HostTensor)> {
    let hw_part = 2 * (head_dim / 6);
    let parts = [head_dim - 2 * hw_part, hw_part, hw_part];
    let half = head_dim / 2;
    let tokens = frames * height * width;
    // An angle depends only on one axis' position and frequency: each axis gets its own
    // [positions, part/2] table and every token copies its three rows (a 32,760-token grid
    // would otherwise take two million powf/sin/cos evaluations per step).
    let axis = |positions: usize, part: usize| -> (Vec<f32>, Vec<f32>) {
        let freqs: Vec<f64> = (0..part / 2).map(|i| theta.powf(-2.0 * i as f64 / part as f64)).collect();
        (0..positions)
            .flat_map(|pos| freqs.iter().map(move |f| pos as f64 * f))
            .map(|angle| (angle.cos() as f32, angle.sin() as f32))
            .unzip()
    };
    let tables = [axis(frames, parts[0]), axis(height, parts[1]), axis(width, parts[2])];
    let (mut cos, mut sin) = (Vec::with_capacity(tokens * half), Vec::with_capacity(tokens * half));
    for f in 0..frames {
        for y in 0..height {
            for x in 0..width {
                for ((part, pos), (c, s)) in parts.iter().zip([f, y, x]).zip(&tables) {
                    let row = pos * part / 2..(pos + 1) * part / 2;
                    cos.extend_from_slice(&c[row.clone()]);
                    sin.extend_from_slice(&s[row]);
                }
            }
        }
    }
    Ok((
        HostTensor::from_f32(&[tokens, half], cos)?,
        HostTensor::from_f32(&[tokens, half], sin)?,
    ))
}
