// elementwise.cu: the runtime's `map` primitive (spec.rs, `MapSpec`).
//
// What: for every coordinate c of an iteration space of rank <= 6, read up to three inputs
// through strided views (element = offset + sum_k (c[k] / div[k]) * stride[k]; stride 0
// broadcasts, div > 1 is nearest upsampling), apply one op in f32 and store through the
// output view. Ops: copy/cast, unary (silu, gelu tanh/erf, tanh, sigmoid, affine),
// alpha*a + beta*b, a*b, adaLN modulate a*(1+b)+c, interleaved-pair rotary embedding,
// gated residual a + b*c.
// Layout: any, described by the views; every operand has its own dtype (f32/f16/bf16).
// Limits: indices are 32-bit (the runtime refuses views that reach 2^32 elements); one
// thread per iteration element, grid-stride loop. The runtime merges dimensions first
// (`MapSpec::collapsed`), so a contiguous op runs at rank 1: the index arithmetic (integer
// division per dimension) would otherwise bound these memory-bound kernels.

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

struct MapParams {
    u32 rank, op, unary, total;
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
        default: return alpha * x + beta;
    }
}

extern "C" __global__ void map_kernel(MapParams p, void* out, const void* in0, const void* in1, const void* in2) {
    const void* ins[3] = {in0, in1, in2};
    for (u32 e = blockIdx.x * blockDim.x + threadIdx.x; e < p.total; e += gridDim.x * blockDim.x) {
        u32 rest = e, o = p.out_offset;
        u32 idx[3] = {p.in_offset[0], p.in_offset[1], p.in_offset[2]};
        for (int k = (int)p.rank - 1; k >= 0; --k) {
            u32 c = rest % p.shape[k];
            rest /= p.shape[k];
            o += c * p.out_stride[k];
            for (int i = 0; i < 3; ++i) {
                u32 d = p.in_div[i][k];
                idx[i] += (d == 1 ? c : c / d) * p.in_stride[i][k];
            }
        }
        float a = load_f32(ins[0], idx[0], p.in_dtype[0]);
        float r;
        switch (p.op) {
            case OP_COPY: r = a; break;
            case OP_UNARY: r = apply_unary(p.unary, a, p.alpha, p.beta); break;
            case OP_ADD_SCALED: r = p.alpha * a + p.beta * load_f32(ins[1], idx[1], p.in_dtype[1]); break;
            case OP_MUL: r = a * load_f32(ins[1], idx[1], p.in_dtype[1]); break;
            case OP_MODULATE:
                r = a * (1.0f + load_f32(ins[1], idx[1], p.in_dtype[1])) + load_f32(ins[2], idx[2], p.in_dtype[2]);
                break;
            case OP_GATED_ADD:
                r = a + load_f32(ins[1], idx[1], p.in_dtype[1]) * load_f32(ins[2], idx[2], p.in_dtype[2]);
                break;
            default: {
                float x1 = load_f32(ins[0], idx[0] + 1, p.in_dtype[0]);
                float cs = load_f32(ins[1], idx[1], p.in_dtype[1]);
                float sn = load_f32(ins[2], idx[2], p.in_dtype[2]);
                store_f32(out, o + 1, p.out_dtype, a * sn + x1 * cs);
                r = a * cs - x1 * sn;
            }
        }
        store_f32(out, o, p.out_dtype, r);
    }
}
