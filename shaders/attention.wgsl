// attention.wgsl: scaled dot-product attention, flash style: tiled over keys with an online
// softmax, so the score matrix never exists in memory at any sequence length.
//
// out[bh, i, :] = sum_j softmax_j(scale * q[bh, i, :] . k[bh, j, :]) * v[bh, j, :]
// Layout: q [batch_heads, q_len, D]; k, v [batch_heads, kv_len, D], row-major.
// Keys are processed in at most NS splits of kv_count keys (split s handles keys kv0 ..
// kv0 + kv_count), bounding the work of one invocation: drivers and browsers cut off or
// reset long-running shaders. Each split writes row (bh, i) of `out` at
// ((bh*q_len + i)*NS + s)*ROW: with one split ROW = D and out is the result; with several,
// ROW = D + 2 and out is scratch holding (o / l, m, l) per split for
// attention_combine.wgsl to merge.
// Host constants: D (head dim), WG threads, BR query rows and BC keys per tile, TPR = WG / BR
// threads per query row, SPT = BC / TPR scores and OPT = ceil(D / TPR) output columns per
// thread, KS = D + 1 (padded shared row stride against bank conflicts), QLOADS and
// KVLOADS = tile elements per thread (constant trip counts, so compilers unroll the loads).
// Entry points:
//   main: workgroup WG (128) threads; grid: x = query tiles, y = heads (bh0 .. bh0 + grid.y).
//   rows: for software adapters (lavapipe), which run a workgroup's invocations as SIMD
//         lanes of one CPU thread, so barriers are switches between lane groups and
//         per-lane reads of workgroup memory are gathers: one invocation per query row
//         (64 rows per workgroup, grid as main's with 64-row tiles), keys one at a time with
//         the same online softmax, no workgroup memory; every lane reads the same key and
//         value, so those loads are broadcasts. Private arrays of 2 * D floats.
// Shared memory: (BR*D + BC*KS + BR*BC + WG) floats; the host picks the largest tile that
// fits the device limit (16 KiB by default) while keeping SPT + OPT, the per-thread arrays,
// small (software rasterisers run invocations on small stacks). K and V share one tile.
// Numerics: f32 throughout; masked keys score -1e30 so exp() gives exactly 0.
// Tensors: q, k, v, out.

struct Params {
    q_len: u32,
    kv_len: u32,
    scale: f32,
    bh0: u32,
    row0: u32,
    rows: u32,
    kv0: u32,
    kv_count: u32,
    split: u32,
    ns: u32,
}

const NEG: f32 = -1e30;

var<workgroup> q_tile: array<f32, BR * D>;
var<workgroup> kv_tile: array<f32, BC * KS>;
var<workgroup> p_tile: array<f32, BR * BC>;
var<workgroup> red: array<f32, WG>;

// Keys (or values) j0 .. j0 + BC of one head into kv_tile, zero past kv_end.
fn load_kv_tile(values: bool, kv_base: u32, j0: u32, kv_end: u32, lid: u32) {
    for (var e = 0u; e < KVLOADS; e++) {
        let i = lid + e * WG;
        let j = j0 + i / D;
        if (i < BC * D) {
            var v = 0.0;
            if (j < kv_end) {
                let at = kv_base + j * D + i % D;
                if (values) {
                    v = v_ld(at);
                } else {
                    v = k_ld(at);
                }
            }
            kv_tile[(i / D) * KS + i % D] = v;
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let bh = P.bh0 + wid.y;
    let r0 = P.row0 + wid.x * BR;
    let row_end = P.row0 + P.rows;
    let tr = lid / TPR;
    let tc = lid % TPR;
    let q_base = bh * P.q_len * D;
    let kv_base = bh * P.kv_len * D;

    for (var e = 0u; e < QLOADS; e++) {
        let i = lid + e * WG;
        let r = r0 + i / D;
        var v = 0.0;
        if (i < BR * D && r < row_end) {
            v = q_ld(q_base + r * D + i % D);
        }
        if (i < BR * D) {
            q_tile[i] = v;
        }
    }

    var m = NEG;
    var l = 0.0;
    var o: array<f32, OPT>;
    for (var t = 0u; t < OPT; t++) {
        o[t] = 0.0;
    }

    let kv_end = P.kv0 + P.kv_count;
    for (var j0 = P.kv0; j0 < kv_end; j0 += BC) {
        workgroupBarrier();
        load_kv_tile(false, kv_base, j0, kv_end, lid);
        workgroupBarrier();

        var s: array<f32, SPT>;
        var s_max = NEG;
        for (var t = 0u; t < SPT; t++) {
            let jj = tc + t * TPR;
            var acc = 0.0;
            for (var d = 0u; d < D; d++) {
                acc = fma(q_tile[tr * D + d], kv_tile[jj * KS + d], acc);
            }
            acc *= P.scale;
            if (j0 + jj >= kv_end) {
                acc = NEG;
            }
            s[t] = acc;
            s_max = max(s_max, acc);
        }
        red[lid] = s_max;
        workgroupBarrier();

        var tile_max = NEG;
        for (var u = 0u; u < TPR; u++) {
            tile_max = max(tile_max, red[tr * TPR + u]);
        }
        let m_new = max(m, tile_max);
        let alpha = exp(m - m_new);
        var p_sum = 0.0;
        for (var t = 0u; t < SPT; t++) {
            let p = exp(s[t] - m_new);
            p_tile[tr * BC + tc + t * TPR] = p;
            p_sum += p;
        }
        workgroupBarrier();

        red[lid] = p_sum;
        load_kv_tile(true, kv_base, j0, kv_end, lid);
        workgroupBarrier();

        var tile_sum = 0.0;
        for (var u = 0u; u < TPR; u++) {
            tile_sum += red[tr * TPR + u];
        }
        l = l * alpha + tile_sum;
        m = m_new;
        for (var t = 0u; t < OPT; t++) {
            let d = tc + t * TPR;
            var acc = o[t] * alpha;
            if (d < D) {
                for (var jj = 0u; jj < BC; jj++) {
                    acc = fma(p_tile[tr * BC + jj], kv_tile[jj * KS + d], acc);
                }
            }
            o[t] = acc;
        }
    }

    let r = r0 + tr;
    if (r < row_end) {
        let o_base = row_base(bh, r);
        for (var t = 0u; t < OPT; t++) {
            let d = tc + t * TPR;
            if (d < D) {
                out_st(o_base + d, o[t] / l);
            }
        }
        if (tc == 0u) {
            store_split_stats(o_base, m, l);
        }
    }
}

// Where row r of head bh goes in `out` for this split.
fn row_base(bh: u32, r: u32) -> u32 {
    return ((bh * P.q_len + r) * P.ns + P.split) * ROW;
}

// A split's running max and sum, for attention_combine.wgsl, when there are several.
fn store_split_stats(o_base: u32, m: f32, l: f32) {
    if (ROW > D) {
        out_st(o_base + D, m);
        out_st(o_base + D + 1u, l);
    }
}

@compute @workgroup_size(64)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let bh = P.bh0 + wid.y;
    let r = P.row0 + wid.x * 64u + lid;
    if (r >= P.row0 + P.rows) {
        return;
    }
    let q_base = (bh * P.q_len + r) * D;
    let kv_base = bh * P.kv_len * D;
    var q: array<f32, D>;
    var o: array<f32, D>;
    for (var d = 0u; d < D; d++) {
        q[d] = q_ld(q_base + d);
        o[d] = 0.0;
    }
    var m = NEG;
    var l = 0.0;
    for (var j = P.kv0; j < P.kv0 + P.kv_count; j++) {
        let at = kv_base + j * D;
        var s = 0.0;
        for (var d = 0u; d < D; d++) {
            s = fma(q[d], k_ld(at + d), s);
        }
        s *= P.scale;
        let m_new = max(m, s);
        let alpha = exp(m - m_new);
        let p = exp(s - m_new);
        l = l * alpha + p;
        for (var d = 0u; d < D; d++) {
            o[d] = fma(p, v_ld(at + d), o[d] * alpha);
        }
        m = m_new;
    }
    let o_base = row_base(bh, r);
    for (var d = 0u; d < D; d++) {
        out_st(o_base + d, o[d] / l);
    }
    store_split_stats(o_base, m, l);
}
