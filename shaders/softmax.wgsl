// softmax.wgsl: softmax over contiguous rows, out[r, i] = exp(x[r, i] - max_r) / sum_r.
//
// Entry points (rows row0 .. row0 + rows; workgroups laid out over x and y):
//   main: 256 threads per row (max, then sum of exponentials, then write), tree reductions
//         in workgroup memory; one workgroup per row.
//   rows: one invocation per row, 64 rows per workgroup, no barriers. For software adapters
//         (lavapipe, SwiftShader), which run a workgroup's invocations as SIMD lanes of one
//         CPU thread and every workgroupBarrier as a switch between lane groups, so a tree
//         reduction costs far more than the arithmetic. Rows of at most 20000 columns: the
//         three passes (and the sum's 157 blocks) stay under the 65535 loop iterations after
//         which lavapipe ends an invocation (SOFTWARE_LOOP_BUDGET in kernels.rs).
// Tensors: x, out.

struct Params {
    cols: u32,
    row0: u32,
    rows: u32,
}

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let local_row = wid.x + wid.y * nwg.x;
    if (local_row >= P.rows) {
        return;
    }
    let base = (P.row0 + local_row) * P.cols;

    var mx = -3.4e38;
    for (var i = lid; i < P.cols; i += 256u) {
        mx = max(mx, x_ld(base + i));
    }
    red[lid] = mx;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    mx = red[0];
    workgroupBarrier();

    var sum = 0.0;
    for (var i = lid; i < P.cols; i += 256u) {
        sum += exp(x_ld(base + i) - mx);
    }
    red[lid] = sum;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / red[0];

    for (var i = lid; i < P.cols; i += 256u) {
        out_st(base + i, exp(x_ld(base + i) - mx) * inv);
    }
}

@compute @workgroup_size(64)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let local_row = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (local_row >= P.rows) {
        return;
    }
    let base = (P.row0 + local_row) * P.cols;
    var mx = -3.4e38;
    for (var i = 0u; i < P.cols; i++) {
        mx = max(mx, x_ld(base + i));
    }
    // Sums by blocks of 128 and then the block sums, so the rounding error grows with
    // about sqrt(128) + sqrt(cols / 128) instead of sqrt(cols) (3e-6 at 20000 columns).
    var sum = 0.0;
    for (var b = 0u; b < P.cols; b += 128u) {
        var part = 0.0;
        for (var i = b; i < min(b + 128u, P.cols); i++) {
            part += exp(x_ld(base + i) - mx);
        }
        sum += part;
    }
    let inv = 1.0 / sum;
    for (var i = 0u; i < P.cols; i++) {
        out_st(base + i, exp(x_ld(base + i) - mx) * inv);
    }
}
