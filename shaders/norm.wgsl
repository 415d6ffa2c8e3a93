// norm.wgsl: layer norm, group norm and RMS norm over contiguous rows.
//
// Row r = x[r*row_len .. (r+1)*row_len]. MEAN_VAR: y = (x - mean) / sqrt(var + eps);
// RMS (MEAN_VAR = false): y = x / sqrt(mean(x^2) + eps). Then y * gamma[p] + beta[p] with
// p = (r % groups) * cpg + i / inner (layer/RMS norm: groups = 1, cpg = row_len, inner = 1;
// group norm: one row per (batch, group), inner = spatial size).
// Entry points (workgroup 256 threads but `rows`; rows row0 .. row0 + rows):
//   main:  short rows, one workgroup per row: moments, then write. Grid over x and y.
//   rows:  short rows on software adapters: one invocation per row, 64 rows per workgroup,
//          no barriers (see softmax.wgsl's `rows` for why). Grid over x and y.
//   stats: long rows, one workgroup per BLOCK-element block (x = block, y = row): the
//          block's (mean, M2) (M2 = sum of squared deviations; RMS: mean 0, M2 = sum x^2)
//          into stats[(row*blocks + block)*2 ..].
//   apply: same grid: merges the row's block moments (Chan et al.'s pairwise formula) and
//          normalises its block. Long rows thus spread over many workgroups, and no
//          invocation loops for long (drivers and browsers cut off long shaders).
// Moments are two-pass (mean, then deviations) with workgroup tree sums, all in f32.
// Tensors: x, gamma (optional), beta (optional), stats (f32, long rows only), out.
// Constants: MEAN_VAR, HAS_GAMMA, HAS_BETA, BLOCK.

struct Params {
    row_len: u32,
    groups: u32,
    cpg: u32,
    inner: u32,
    eps: f32,
    row0: u32,
    rows: u32,
    blocks: u32,
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

// (mean, M2) of x[base .. base + n].
fn moments(base: u32, n: u32, lid: u32) -> vec2<f32> {
    var mean = 0.0;
    if (MEAN_VAR) {
        var s = 0.0;
        for (var i = lid; i < n; i += 256u) {
            s += x_ld(base + i);
        }
        mean = workgroup_sum(s, lid) / f32(n);
    }
    var sq = 0.0;
    for (var i = lid; i < n; i += 256u) {
        let d = x_ld(base + i) - mean;
        sq += d * d;
    }
    return vec2<f32>(mean, workgroup_sum(sq, lid));
}

// Normalises elements start + first, start + first + step, .. below start + n of row `row`.
fn normalize(row: u32, start: u32, n: u32, mean: f32, inv: f32, first: u32, step: u32) {
    let base = row * P.row_len;
    let pbase = (row % P.groups) * P.cpg;
    for (var i = start + first; i < start + n; i += step) {
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

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let local_row = wid.x + wid.y * nwg.x;
    if (local_row >= P.rows) {
        return;
    }
    let row = P.row0 + local_row;
    let mm = moments(row * P.row_len, P.row_len, lid);
    normalize(row, 0u, P.row_len, mm.x, inverseSqrt(mm.y / f32(P.row_len) + P.eps), lid, 256u);
}

@compute @workgroup_size(64)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let local_row = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (local_row >= P.rows) {
        return;
    }
    let row = P.row0 + local_row;
    let base = row * P.row_len;
    let n = f32(P.row_len);
    var mean = 0.0;
    if (MEAN_VAR) {
        var s = 0.0;
        for (var i = 0u; i < P.row_len; i++) {
            s += x_ld(base + i);
        }
        mean = s / n;
    }
    var sq = 0.0;
    for (var i = 0u; i < P.row_len; i++) {
        let d = x_ld(base + i) - mean;
        sq += d * d;
    }
    normalize(row, 0u, P.row_len, mean, inverseSqrt(sq / n + P.eps), 0u, 1u);
}

fn block_len(block: u32) -> u32 {
    return min(BLOCK, P.row_len - block * BLOCK);
}

@compute @workgroup_size(256)
fn stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = P.row0 + wid.y;
    let mm = moments(row * P.row_len + wid.x * BLOCK, block_len(wid.x), lid);
    if (lid == 0u) {
        let at = (row * P.blocks + wid.x) * 2u;
        stats_st(at, mm.x);
        stats_st(at + 1u, mm.y);
    }
}

@compute @workgroup_size(256)
fn apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = P.row0 + wid.y;
    let first = row * P.blocks * 2u;
    let n = f32(P.row_len);
    var s = 0.0;
    for (var b = lid; b < P.blocks; b += 256u) {
        s += f32(block_len(b)) * stats_ld(first + 2u * b);
    }
    let mean = workgroup_sum(s, lid) / n;
    var m2 = 0.0;
    for (var b = lid; b < P.blocks; b += 256u) {
        let d = stats_ld(first + 2u * b) - mean;
        m2 += stats_ld(first + 2u * b + 1u) + f32(block_len(b)) * d * d;
    }
    let inv = inverseSqrt(workgroup_sum(m2, lid) / n + P.eps);
    normalize(row, wid.x * BLOCK, block_len(wid.x), mean, inv, lid, 256u);
}
