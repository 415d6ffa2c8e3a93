// norm.wgsl: layer norm, group norm and RMS norm over contiguous rows.
//
// Row r = x[r*row_len .. (r+1)*row_len]. MEAN_VAR: y = (x - mean) / sqrt(var + eps);
// RMS (MEAN_VAR = false): y = x / sqrt(mean(x^2) + eps). Then y * gamma[p] + beta[p] with
// p = (r % groups) * cpg + i / inner (layer/RMS norm: groups = 1, cpg = row_len, inner = 1;
// group norm: one row per (batch, group), inner = spatial size).
// Workgroup: 256 threads per row, two passes (mean, then variance about it) and a third to
// write; tree reductions in workgroup memory. Grid: one workgroup per row, rows row0 ..
// row0 + rows, laid out over x and y to stay under the 65535-per-dimension limit.
// Tensors: x, gamma (optional), beta (optional), out. Constants: MEAN_VAR, HAS_GAMMA, HAS_BETA.

struct Params {
    row_len: u32,
    groups: u32,
    cpg: u32,
    inner: u32,
    eps: f32,
    row0: u32,
    rows: u32,
}

var<workgroup> red: array<f32, 256>;

fn workgroup_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let local_row = wid.x + wid.y * nwg.x;
    if (local_row >= P.rows) {
        return;
    }
    let row = P.row0 + local_row;
    let base = row * P.row_len;
    let n = f32(P.row_len);

    var mean = 0.0;
    if (MEAN_VAR) {
        var s = 0.0;
        for (var i = lid; i < P.row_len; i += 256u) {
            s += x_ld(base + i);
        }
        mean = workgroup_sum(s, lid) / n;
    }
    var sq = 0.0;
    for (var i = lid; i < P.row_len; i += 256u) {
        let d = x_ld(base + i) - mean;
        sq += d * d;
    }
    let inv = inverseSqrt(workgroup_sum(sq, lid) / n + P.eps);

    let pbase = (row % P.groups) * P.cpg;
    for (var i = lid; i < P.row_len; i += 256u) {
        var y = (x_ld(base + i) - mean) * inv;
        let p = pbase + i / P.inner;
        if (HAS_GAMMA) {
            y *= gamma_ld(p);
        }
        if (HAS_BETA) {
            y += beta_ld(p);
        }
        out_st(base + i, y);
    }
}
