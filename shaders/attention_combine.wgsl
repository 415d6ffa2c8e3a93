// attention_combine.wgsl: merges the key splits of attention.wgsl into the final output.
//
// partial [rows, NS, D + 2]: per row and split, (o_s / l_s, m_s, l_s) where m_s is the
// split's running max score and l_s its sum of exp(score - m_s). With M = max_s m_s:
//   out[row, d] = sum_s exp(m_s - M) * l_s * o_s[d] / sum_s exp(m_s - M) * l_s
// out [rows, D]. One thread per output element of rows row0 .. row0 + rows; workgroup 256,
// grid over x and y. Tensors: partial, out. Constant: D.

struct Params {
    row0: u32,
    rows: u32,
    ns: u32,
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (e >= P.rows * D) {
        return;
    }
    let row = P.row0 + e / D;
    let d = e % D;
    let base = row * P.ns * (D + 2u);
    var mx = -3.4e38;
    for (var s = 0u; s < P.ns; s++) {
        mx = max(mx, partial_ld(base + s * (D + 2u) + D));
    }
    var num = 0.0;
    var den = 0.0;
    for (var s = 0u; s < P.ns; s++) {
        let at = base + s * (D + 2u);
        let w = exp(partial_ld(at + D) - mx) * partial_ld(at + D + 1u);
        num += w * partial_ld(at + d);
        den += w;
    }
    out_st(row * D + d, num / den);
}
