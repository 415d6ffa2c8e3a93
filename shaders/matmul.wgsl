// matmul.wgsl: batched matrix product with optional transposes and bias, on the GEMM core
// in gemm.wgsl (the host appends it).
//
// out[b, r, c] = sum_k A(b, r, k) * B(b, k, c) + bias[c], out [batch, m, n] row-major.
// A(b, r, k) = a[b*a_bs + (TRANS_A ? k*m + r : r*k_dim + k)]
// B(b, k, c) = b[b*b_bs + (TRANS_B ? c*k_dim + k : k*n + c)]
// One dispatch covers batches batch0 .. batch0 + grid.z and output rows row0 .. row0 + rows:
// the host splits larger problems so every operand stays inside its binding window.
// Tensors: a, b, bias (optional), out. Constants: TRANS_A, TRANS_B, HAS_BIAS + gemm's.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    row0: u32,
    rows: u32,
    batch0: u32,
    a_bs: u32,
    b_bs: u32,
}

fn gemm_dims() -> vec3<u32> {
    return vec3<u32>(P.rows, P.n, P.k);
}

// Row context: x = where row r of A starts (its element at k = 0).
fn gemm_a_row(z: u32, r: u32) -> vec4<u32> {
    let base = (P.batch0 + z) * P.a_bs;
    let row = P.row0 + r;
    if (TRANS_A) {
        return vec4<u32>(base + row, 0u, 0u, 0u);
    }
    return vec4<u32>(base + row * P.k, 0u, 0u, 0u);
}

fn gemm_a(z: u32, row: vec4<u32>, kk: u32) -> f32 {
    if (TRANS_A) {
        return a_ld(row.x + kk * P.m);
    }
    return a_ld(row.x + kk);
}

fn gemm_b(z: u32, kk: u32, c: u32) -> f32 {
    let base = (P.batch0 + z) * P.b_bs;
    if (TRANS_B) {
        return b_ld(base + c * P.k + kk);
    }
    return b_ld(base + kk * P.n + c);
}

fn gemm_store(z: u32, r: u32, c: u32, acc: f32) {
    var v = acc;
    if (HAS_BIAS) {
        v += bias_ld(c);
    }
    out_st(((P.batch0 + z) * P.m + P.row0 + r) * P.n + c, v);
}
