// elementwise.cu: the runtime's `map` primitive (spec.rs, `MapSpec`).
//
// What: for every coordinate c of an iteration space of rank <= 6, read up to three inputs
// through strided views (element = offset + sum_k (c[k] / div[k]) * stride[k]; stride 0
// broadcasts, div > 1 is nearest upsampling), apply one op in f32 and store through the
// output view. Ops: copy/cast, unary (silu, gelu tanh/erf, tanh, sigmoid, affine, clamp),
// alpha*a + beta*b, a*b, adaLN modulate a*(1+b)+c, interleaved-pair rotary embedding,
// gated residual a + b*c.
// Layout: any, described by the views; every operand has its own dtype (f32/f16/bf16).
// Limits: indices are 32-bit (the runtime refuses views that reach 2^32 elements); one
// thread per iteration element, grid-stride loop. The runtime merges dimensions first
// (`MapSpec::collapsed`), so a contiguous op runs at rank 1: the index arithmetic (integer
// division per dimension) would otherwise bound these memory-bound kernels.
// Vector path (`vec`, set by the runtime): when the innermost dimension is a multiple of 8,
// every 16-bit operand is contiguous along it (stride 1, offsets and other strides
// multiples of 8) and the others broadcast it (stride 0), one thread handles 8 elements
// with 16-byte loads and stores. Not for rope, which has its own (`vec` = 2): 16-bit x and
// out walking pairs contiguously (stride 2, 16-byte aligned groups of four pairs), 16-bit
// tables contiguous (8-byte aligned groups of four), four pairs per thread.
//
// transpose: the copies that swap the last two dimensions of a contiguous tensor (the
// runtime recognises them among permutes): out[b][c][r] = x[b][r][c] for x [batch][rows]
// [cols], through a 32x33 shared tile per block of 32x8 threads so that both the reads and
// the writes are whole lines; casts on the way. Grid: (tiles, batch).
// Limits: 32-bit element offsets; batch <= 65535.

#define OP_COPY 0
#define OP_UNARY 1
#define OP_ADD_SCALED 2
#define OP_MUL 3
#define OP_MODULATE 4
#define OP_ROPE 5
#define OP_GATED_ADD 6

#define U_SILU 0
#define U_GELU_TANH 1
#define U_GELU_ERF 2
#define U_TANH 3
#define U_SIGMOID 4
#define U_AFFINE 5
#define U_CLAMP 6

struct MapParams {
    u32 rank, op, unary, total, vec;
    float alpha, beta;
    u32 out_dtype, out_offset;
    u32 in_dtype[3], in_offset[3];
    u32 shape[6];
    u32 out_stride[6];
    u32 in_stride[3][6];
    u32 in_div[3][6];
};

__device__ __forceinline__ float apply_unary(u32 u, float x, float alpha, float beta) {
    switch (u) {
        case U_SILU: return x / (1.0f + expf(-x));
        case U_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
        case U_GELU_ERF: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
        case U_TANH: return tanhf(x);
        case U_SIGMOID: return 1.0f / (1.0f + expf(-x));
        case U_CLAMP: return fminf(fmaxf(x, alpha), beta);
        default: return alpha * x + beta;
    }
}

// Element offsets of iteration element `e` in the output and the three inputs.
__device__ __forceinline__ void locate(const MapParams& p, u32 e, u32& o, u32 (&idx)[3]) {
    u32 rest = e;
    o = p.out_offset;
    idx[0] = p.in_offset[0];
    idx[1] = p.in_offset[1];
    idx[2] = p.in_offset[2];
    for (int k = (int)p.rank - 1; k >= 0; --k) {
        u32 c = rest % p.shape[k];
        rest /= p.shape[k];
        o += c * p.out_stride[k];
        for (int i = 0; i < 3; ++i) {
            u32 d = p.in_div[i][k];
            idx[i] += (d == 1 ? c : c / d) * p.in_stride[i][k];
        }
    }
}

// Every op but rope, on one element's input values.
__device__ __forceinline__ float apply_op(const MapParams& p, float a, float b, float c) {
    switch (p.op) {
        case OP_COPY: return a;
        case OP_UNARY: return apply_unary(p.unary, a, p.alpha, p.beta);
        case OP_ADD_SCALED: return p.alpha * a + p.beta * b;
        case OP_MUL: return a * b;
        case OP_MODULATE: return a * (1.0f + b) + c;
        default: return a + b * c;
    }
}

// How many inputs the op reads.
__device__ __forceinline__ int arity(u32 op) { return op == OP_COPY || op == OP_UNARY ? 1 : op == OP_MODULATE || op == OP_GATED_ADD ? 3 : 2; }

__device__ void map_vec8(const MapParams& p, void* out, const void* const (&ins)[3]) {
    const int n = arity(p.op);
    const u32 last = p.rank - 1;
    for (u32 v = blockIdx.x * blockDim.x + threadIdx.x; v < p.total / 8; v += gridDim.x * blockDim.x) {
        u32 o, idx[3];
        locate(p, v * 8, o, idx);
        float x[3][8];
        for (int i = 0; i < n; ++i) {
            if (p.in_stride[i][last] == 0) {
                float b = load_f32(ins[i], idx[i], p.in_dtype[i]);
#pragma unroll
                for (int j = 0; j < 8; ++j) x[i][j] = b;
            } else {
                unpack8(((const uint4*)ins[i])[idx[i] / 8], p.in_dtype[i], x[i]);
            }
        }
        float r[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) r[j] = apply_op(p, x[0][j], n > 1 ? x[1][j] : 0.0f, n > 2 ? x[2][j] : 0.0f);
        ((uint4*)out)[o / 8] = pack8(r, p.out_dtype);
    }
}

// Rope on four interleaved pairs per thread: x and out as one 16-byte word, cos and sin as
// one 8-byte word each.
__device__ void map_rope4(const MapParams& p, void* out, const void* const (&ins)[3]) {
    for (u32 v = blockIdx.x * blockDim.x + threadIdx.x; v < p.total / 4; v += gridDim.x * blockDim.x) {
        u32 o, idx[3];
        locate(p, v * 4, o, idx);
        float x[8], c[4], s[4];
        unpack8(((const uint4*)ins[0])[idx[0] / 8], p.in_dtype[0], x);
        unpack4(((const uint2*)ins[1])[idx[1] / 4], p.in_dtype[1], c);
        unpack4(((const uint2*)ins[2])[idx[2] / 4], p.in_dtype[2], s);
        rotate_pairs4(x, c, s);
        ((uint4*)out)[o / 8] = pack8(x, p.out_dtype);
    }
}

extern "C" __global__ void map_kernel(MapParams p, void* out, const void* in0, const void* in1, const void* in2) {
    const void* const ins[3] = {in0, in1, in2};
    if (p.vec == 1) {
        map_vec8(p, out, ins);
        return;
    }
    if (p.vec == 2) {
        map_rope4(p, out, ins);
        return;
    }
    for (u32 e = blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += gridDim.x * blockDim.x) {
        u32 o, idx[3];
        locate(p, e, o, idx);
        float a = load_f32(ins[0], idx[0], p.in_dtype[0]);
        if (p.op == OP_ROPE) {
            float x1 = load_f32(ins[0], idx[0] + 1, p.in_dtype[0]);
            float cs = load_f32(ins[1], idx[1], p.in_dtype[1]);
            float sn = load_f32(ins[2], idx[2], p.in_dtype[2]);
            store_f32(out, o + 1, p.out_dtype, a * sn + x1 * cs);
            store_f32(out, o, p.out_dtype, a * cs - x1 * sn);
            continue;
        }
        const int n = arity(p.op);
        float b = n > 1 ? load_f32(ins[1], idx[1], p.in_dtype[1]) : 0.0f;
        float c = n > 2 ? load_f32(ins[2], idx[2], p.in_dtype[2]) : 0.0f;
        store_f32(out, o, p.out_dtype, apply_op(p, a, b, c));
    }
}

extern "C" __global__ void transpose(const void* x, void* out, u32 x_dt, u32 out_dt, u32 x_offset, u32 out_offset, u32 rows, u32 cols) {
    __shared__ float tile[32][33];
    const u32 col_tiles = (cols + 31) / 32;
    const u32 c0 = (blockIdx.x % col_tiles) * 32, r0 = (blockIdx.x / col_tiles) * 32;
    const u32 base = blockIdx.y * rows * cols;
    for (u32 j = threadIdx.y; j < 32; j += 8) {
        const u32 r = r0 + j, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[j][threadIdx.x] = load_f32(x, x_offset + base + r * cols + c, x_dt);
    }
    __syncthreads();
    for (u32 j = threadIdx.y; j < 32; j += 8) {
        const u32 c = c0 + j, r = r0 + threadIdx.x;
        if (r < rows && c < cols) store_f32(out, out_offset + base + c * rows + r, out_dt, tile[threadIdx.x][j]);
    }
}
