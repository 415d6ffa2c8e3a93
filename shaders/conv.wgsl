// conv.wgsl: 2D/3D convolution (stride, zero padding, groups) as an implicit GEMM on the
// core in gemm.wgsl (the host appends it); conv2d is t = kt = 1, the Wan VAE's causal conv3d
// pads time in front only.
//
// One dispatch handles one batch item, one group, a range of `cout` output channels and a
// range of `cin` input channels, so huge activations split into pieces that each fit a
// binding window (and deep convolutions into passes that gemm.wgsl's `rows` can loop over):
//   GEMM rows    r = output position (ot, oy, ox), M = to*ho*wo
//   GEMM columns c = output channel within the range, N = cout
//   GEMM depth   k = (input channel within the range, dt, dy, dx), K = cin*kt*kh*kw
//   A(r, k) = x[x_base + ci*t*h*w + it*h*w + iy*w + ix] (0 in the padding)
//   B(k, c) = w[w_base + c*k_full + k]   (weights [c_out, c_in/groups, kt, kh, kw])
//   out[out_base + c*M + r] = acc + bias[bias_base + c], or += acc when the input channels
//   were split and this is not the first range (ACCUMULATE pass, no bias).
// Tensors: x, w, bias (optional), out. Constants: gemm's + HAS_BIAS + KT, KH, KW (the kernel
// size: taps are decomposed by constant divisors, which CPU adapters vectorise and runtime
// ones they do not).

struct Params {
    x_base: u32,
    w_base: u32,
    out_base: u32,
    bias_base: u32,
    cin: u32,
    cout: u32,
    k_full: u32,
    accumulate: u32,
    t: u32,
    h: u32,
    w: u32,
    to: u32,
    ho: u32,
    wo: u32,
    st: u32,
    sh: u32,
    sw: u32,
    pt: u32,
    ph: u32,
    pw: u32,
}

fn gemm_dims() -> vec3<u32> {
    return vec3<u32>(P.to * P.ho * P.wo, P.cout, P.cin * KT * KH * KW);
}

// Row context: the input position (t, y, x) under kernel tap (0, 0, 0) for output row r.
// Positions inside the front padding wrap around to huge values; adding the tap offset
// in gemm_a wraps them back, so the result is exact either way.
fn gemm_a_row(z: u32, r: u32) -> vec4<u32> {
    let ot = r / (P.ho * P.wo);
    let oy = (r / P.wo) % P.ho;
    let ox = r % P.wo;
    return vec4<u32>(ot * P.st - P.pt, oy * P.sh - P.ph, ox * P.sw - P.pw, 0u);
}

fn gemm_a(z: u32, row: vec4<u32>, kk: u32) -> f32 {
    let ci = kk / (KT * KH * KW);
    let rem = kk % (KT * KH * KW);
    // One compare per axis rejects both sides of the padding (see gemm_a_row).
    let it = row.x + rem / (KH * KW);
    let iy = row.y + (rem / KW) % KH;
    let ix = row.z + rem % KW;
    if (it >= P.t || iy >= P.h || ix >= P.w) {
        return 0.0;
    }
    return x_ld(P.x_base + ((ci * P.t + it) * P.h + iy) * P.w + ix);
}

fn gemm_b(z: u32, kk: u32, c: u32) -> f32 {
    return w_ld(P.w_base + c * P.k_full + kk);
}

fn gemm_store(z: u32, r: u32, c: u32, acc: f32) {
    let i = P.out_base + c * (P.to * P.ho * P.wo) + r;
    if (P.accumulate != 0u) {
        out_st(i, out_ld(i) + acc);
    } else if (HAS_BIAS) {
        out_st(i, acc + bias_ld(P.bias_base + c));
    } else {
        out_st(i, acc);
    }
}
