// softmax.wgsl: softmax over contiguous rows, out[r, i] = exp(x[r, i] - max_r) / sum_r.
//
// Workgroup: 256 threads per row (max, then sum of exponentials, then write), tree
// reductions in workgroup memory. Grid: one workgroup per row, rows row0 .. row0 + rows,
// laid out over x and y. Tensors: x, out.

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
