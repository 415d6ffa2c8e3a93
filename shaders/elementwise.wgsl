// elementwise.wgsl: strided elementwise work over a box of an iteration space of rank 6
// (lower ranks are padded with leading 1s): unary math, alpha*a + beta*b, a*b, adaLN
// modulate, dtype casts, copies that permute / slice / concat / upsample (nearest), and
// rotary embedding of interleaved pairs.
//
// For coordinate c (box start + local coordinate), operand t is addressed at
//   offset_t + sum_k (c[k] / div_t[k]) * stride_t[k]
// (stride 0 broadcasts, div > 1 repeats elements: nearest upsampling).
// Params, as u32 words in P.v (vec4 rows):
//   0: element count of the box, 2: alpha (f32 bits), 3: beta (f32 bits)
//   4..10: box extent per dim, 10..16: box start per dim
//   16 + 13*t: operand t (0..2 inputs, 3 = out): offset, 6 strides, 6 divisors
// Host constants: OP (one of the OP_* below), UNARY (one of the U_*).
// Workgroup: 256 threads, one element each; grid over x and y. Tensors: in0..in2, out.

struct Params {
    v: array<vec4<u32>, 17>,
}

const OP_COPY: u32 = 0u;
const OP_UNARY: u32 = 1u;
const OP_ADD_SCALED: u32 = 2u;
const OP_MUL: u32 = 3u;
const OP_MODULATE: u32 = 4u;
const OP_ROPE: u32 = 5u;
const OP_GATED_ADD: u32 = 6u;

const U_SILU: u32 = 0u;
const U_GELU_TANH: u32 = 1u;
const U_GELU_ERF: u32 = 2u;
const U_TANH: u32 = 3u;
const U_SIGMOID: u32 = 4u;
const U_AFFINE: u32 = 5u;
const U_CLAMP: u32 = 6u;

fn word(i: u32) -> u32 {
    return P.v[i >> 2u][i & 3u];
}

fn operand_index(t: u32, c: array<u32, 6>) -> u32 {
    let b = 16u + 13u * t;
    var idx = word(b);
    for (var k = 0u; k < 6u; k++) {
        idx += (c[k] / word(b + 7u + k)) * word(b + 1u + k);
    }
    return idx;
}

// tanh from one exponential of a non-positive argument: never inf/inf.
fn tanh_stable(x: f32) -> f32 {
    let e = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - e) / (1.0 + e);
}

// erf, Abramowitz & Stegun 7.1.26 refined form (|error| < 1.5e-7).
fn erf_approx(x: f32) -> f32 {
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return sign(x) * (1.0 - poly * exp(-a * a));
}

fn unary(x: f32, alpha: f32, beta: f32) -> f32 {
    switch UNARY {
        case U_SILU: { return x / (1.0 + exp(-x)); }
        case U_GELU_TANH: { return 0.5 * x * (1.0 + tanh_stable(0.7978845608028654 * (x + 0.044715 * x * x * x))); }
        case U_GELU_ERF: { return 0.5 * x * (1.0 + erf_approx(x * 0.7071067811865476)); }
        case U_TANH: { return tanh_stable(x); }
        case U_SIGMOID: { return 1.0 / (1.0 + exp(-x)); }
        case U_CLAMP: { return min(max(x, alpha), beta); }
        default: { return alpha * x + beta; }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (e >= word(0u)) {
        return;
    }
    var c: array<u32, 6>;
    var rem = e;
    for (var k = 0u; k < 6u; k++) {
        let dim = 5u - k;
        let n = word(4u + dim);
        c[dim] = word(10u + dim) + rem % n;
        rem = rem / n;
    }
    let alpha = bitcast<f32>(word(2u));
    let beta = bitcast<f32>(word(3u));
    let o = operand_index(3u, c);
    let x = in0_ld(operand_index(0u, c));
    switch OP {
        case OP_COPY: { out_st(o, x); }
        case OP_UNARY: { out_st(o, unary(x, alpha, beta)); }
        case OP_ADD_SCALED: { out_st(o, alpha * x + beta * in1_ld(operand_index(1u, c))); }
        case OP_MUL: { out_st(o, x * in1_ld(operand_index(1u, c))); }
        case OP_MODULATE: { out_st(o, x * (1.0 + in1_ld(operand_index(1u, c))) + in2_ld(operand_index(2u, c))); }
        case OP_GATED_ADD: { out_st(o, x + in1_ld(operand_index(1u, c)) * in2_ld(operand_index(2u, c))); }
        default: {
            let i = operand_index(0u, c);
            let x1 = in0_ld(i + 1u);
            let cs = in1_ld(operand_index(1u, c));
            let sn = in2_ld(operand_index(2u, c));
            out_st(o, x * cs - x1 * sn);
            out_st(o + 1u, x * sn + x1 * cs);
        }
    }
}
