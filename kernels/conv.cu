// conv.cu: the gather half of the runtime's `conv` primitive (spec.rs, `ConvSpec`); the
// product itself is a cuBLASLt GEMM issued by the runtime.
//
// im2col: for one batch item and one group, writes the column matrix
// col[ci * K + kk][p - p0] for input channels ci < cin_g, kernel taps kk < K = kt*kh*kw
// (row-major over t, y, x) and output positions p in [p0, p0 + np) (row-major over the
// output's t, y, x), reading x[batch][c0 + ci][it][iy][ix] or zero where the tap falls in
// the padding. The GEMM w[c_out_g, cin_g*K] x col then yields output rows of the chunk.
// Chunking over p bounds the column buffer for video-sized inputs.
// Layout: x is NCTHW contiguous; col is row-major [cin_g*K, np], same dtype as x.
// Limits: 32-bit indices within one batch item; one thread per column element.

struct Im2col {
    u32 c0, cin_g, ti, hi, wi, kt, kh, kw, st, sh, sw, pt, ph, pw, to, ho, wo, p0, np;
    u64 x_offset;
    int dtype;
};

extern "C" __global__ void im2col(Im2col p, const void* x, void* col) {
    const u32 K = p.kt * p.kh * p.kw;
    const u32 total = p.cin_g * K * p.np;
    const u32 plane = p.ti * p.hi * p.wi;
    for (u32 e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
        u32 pp = e % p.np, rk = e / p.np;
        u32 kk = rk % K, ci = rk / K;
        u32 pos = p.p0 + pp;
        u32 ox = pos % p.wo, oy = (pos / p.wo) % p.ho, ot = pos / (p.wo * p.ho);
        u32 dx = kk % p.kw, dy = (kk / p.kw) % p.kh, dt = kk / (p.kw * p.kh);
        int it = (int)(ot * p.st + dt) - (int)p.pt;
        int iy = (int)(oy * p.sh + dy) - (int)p.ph;
        int ix = (int)(ox * p.sw + dx) - (int)p.pw;
        float v = 0.0f;
        if (it >= 0 && it < (int)p.ti && iy >= 0 && iy < (int)p.hi && ix >= 0 && ix < (int)p.wi) {
            v = load_f32(x, p.x_offset + (u64)(p.c0 + ci) * plane + ((u32)it * p.hi + (u32)iy) * p.wi + (u32)ix, p.dtype);
        }
        store_f32(col, e, p.dtype, v);
    }
}
