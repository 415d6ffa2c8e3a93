// attention.cu: the runtime's `attention` primitive (spec.rs, `AttentionSpec`):
// out = softmax(scale * q k^T) v for q [batch_heads, q_len, head_dim] and k, v
// [batch_heads, kv_len, head_dim], contiguous, no mask.
//
// flash_attention_{bf16,f16}_d{D}: FlashAttention-2 style, no score matrix in memory.
// A block of WARPS warps owns 16*WARPS query rows (16 per warp, Q kept in registers) and
// walks the keys in tiles of FA_BN (set by the runtime), double-buffered in shared memory with cp.async. Per tile
// each warp computes S = Q K^T with mma.sync.m16n8k16 (bf16 or f16 in, f32 accumulate,
// operands fetched with ldmatrix, V with ldmatrix.trans), updates the running row max and
// sum (online softmax in base 2), rounds P to the input dtype in registers (the
// accumulator layout of two n8 tiles is the A layout of one k16 step) and accumulates
// O += P V with mma.sync. Shared rows are padded by 16 bytes so ldmatrix is free of bank
// conflicts. Tail keys are masked to -inf and tail rows/columns are zero-filled.
// Limits: head_dim a multiple of 8, at most D (the instantiation, a multiple of 16 up to
// 160); sm_80 or newer (cp.async, bf16 mma). Lengths up to 2^31.
//
// attention_rows: any dtype and head_dim <= 512, one warp per query row, f32 throughout.
// The fallback for f32 and odd head sizes; slow, exact to f32 rounding.

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two f32 values as one register of two 16-bit values, `lo` in the low half.
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Copies rows [row0, row0 + rows) of a [len, head_dim] matrix into shared rows of STRIDE
// elements, zero-filling rows past `len` and columns past `head_dim`.
template <int D, int STRIDE, int THREADS>
__device__ __forceinline__ void load_tile(u16* dst, const u16* src, u32 row0, u32 rows, u32 len, u32 head_dim) {
    constexpr int CHUNKS = D / 8;
    for (int i = threadIdx.x; i < (int)rows * CHUNKS; i += THREADS) {
        int r = i / CHUNKS, c = i % CHUNKS;
        bool valid = row0 + r < len && c * 8 < (int)head_dim;
        const u16* g = valid ? src + (u64)(row0 + r) * head_dim + c * 8 : src;
        cp_async16(smem_addr(dst + r * STRIDE + c * 8), g, valid);
    }
}

template <int D, int WARPS, bool BF16>
__device__ void flash_attention(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u16* __restrict__ out,
                                u32 q_len, u32 kv_len, u32 head_dim, float scale_log2) {
    constexpr int BM = 16 * WARPS, BN = FA_BN, STRIDE = D + 8, THREADS = 32 * WARPS;
    extern __shared__ __align__(16) u16 smem[];
    u16* qs = smem;
    u16* ks = qs + BM * STRIDE;
    u16* vs = ks + 2 * BN * STRIDE;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 bh = blockIdx.y;
    const u32 q0 = blockIdx.x * BM;
    const u16* qb = q + bh * q_len * head_dim;
    const u16* kb = k + bh * kv_len * head_dim;
    const u16* vb = v + bh * kv_len * head_dim;

    load_tile<D, STRIDE, THREADS>(qs, qb, q0, BM, q_len, head_dim);
    load_tile<D, STRIDE, THREADS>(ks, kb, 0, BN, kv_len, head_dim);
    load_tile<D, STRIDE, THREADS>(vs, vb, 0, BN, kv_len, head_dim);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        ldmatrix_x4(qf[kk], smem_addr(qs + (warp * 16 + (lane & 15)) * STRIDE + kk * 16 + (lane >> 4) * 8));
    }

    float o[D / 8][4];
#pragma unroll
    for (int t = 0; t < D / 8; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.0f, 0.0f};

    const u32 tiles = (kv_len + BN - 1) / BN;
    for (u32 j = 0; j < tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < tiles) {
            load_tile<D, STRIDE, THREADS>(ks + (buf ^ 1) * BN * STRIDE, kb, (j + 1) * BN, BN, kv_len, head_dim);
            load_tile<D, STRIDE, THREADS>(vs + (buf ^ 1) * BN * STRIDE, vb, (j + 1) * BN, BN, kv_len, head_dim);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u16* kt = ks + buf * BN * STRIDE;
        const u16* vt = vs + buf * BN * STRIDE;

        float s[BN / 8][4];
#pragma unroll
        for (int t = 0; t < BN / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 b[4];
                int mi = lane >> 3;
                ldmatrix_x4(b, smem_addr(kt + (np * 16 + (mi >> 1) * 8 + (lane & 7)) * STRIDE + kk * 16 + (mi & 1) * 8));
                mma16816<BF16>(s[2 * np], qf[kk], b[0], b[1]);
                mma16816<BF16>(s[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }

        if ((j + 1) * BN > kv_len) {
#pragma unroll
            for (int t = 0; t < BN / 8; ++t) {
                u32 col = j * BN + t * 8 + 2 * (lane & 3);
                if (col >= kv_len) s[t][0] = s[t][2] = NEG_INF;
                if (col + 1 >= kv_len) s[t][1] = s[t][3] = NEG_INF;
            }
        }

#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = NEG_INF;
#pragma unroll
            for (int t = 0; t < BN / 8; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(row_max[r], mx * scale_log2);
            float alpha = fast_exp2(row_max[r] - m_new);
            row_max[r] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int t = 0; t < BN / 8; ++t) {
                s[t][2 * r] = fast_exp2(s[t][2 * r] * scale_log2 - m_new);
                s[t][2 * r + 1] = fast_exp2(s[t][2 * r + 1] * scale_log2 - m_new);
                sum += s[t][2 * r] + s[t][2 * r + 1];
            }
            row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
            for (int t = 0; t < D / 8; ++t) {
                o[t][2 * r] *= alpha;
                o[t][2 * r + 1] *= alpha;
            }
        }

#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 a[4] = {pack2<BF16>(s[2 * kk][0], s[2 * kk][1]), pack2<BF16>(s[2 * kk][2], s[2 * kk][3]),
                        pack2<BF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<BF16>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 b[4];
                int mi = lane >> 3;
                ldmatrix_x4_trans(b, smem_addr(vt + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * STRIDE + dp * 16 + (mi >> 1) * 8));
                mma16816<BF16>(o[2 * dp], a, b[0], b[1]);
                mma16816<BF16>(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
        u32 row = q0 + warp * 16 + (lane >> 2) + 8 * r;
        if (row >= q_len) continue;
        float inv = 1.0f / row_sum[r];
        u32* dst = (u32*)(out + (bh * q_len + row) * head_dim);
#pragma unroll
        for (int t = 0; t < D / 8; ++t) {
            u32 col = t * 8 + 2 * (lane & 3);
            if (col < head_dim) dst[col / 2] = pack2<BF16>(o[t][2 * r] * inv, o[t][2 * r + 1] * inv);
        }
    }
}

#define FLASH_INSTANCE(D, WARPS)                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) flash_attention_bf16_d##D(const u16* q, const u16* k, const u16* v,       \
                                                                                         u16* out, u32 q_len, u32 kv_len, u32 head_dim, \
                                                                                         float scale_log2) {                            \
        flash_attention<D, WARPS, true>(q, k, v, out, q_len, kv_len, head_dim, scale_log2);                                            \
    }                                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) flash_attention_f16_d##D(const u16* q, const u16* k, const u16* v,        \
                                                                                        u16* out, u32 q_len, u32 kv_len, u32 head_dim,  \
                                                                                        float scale_log2) {                             \
        flash_attention<D, WARPS, false>(q, k, v, out, q_len, kv_len, head_dim, scale_log2);                                           \
    }

FLASH_INSTANCE(32, FA_WARPS)
FLASH_INSTANCE(48, FA_WARPS)
FLASH_INSTANCE(64, FA_WARPS)
FLASH_INSTANCE(80, FA_WARPS)
FLASH_INSTANCE(96, FA_WARPS)
FLASH_INSTANCE(128, FA_WARPS)
FLASH_INSTANCE(160, FA_WARPS)

extern "C" __global__ void attention_rows(const void* q, const void* k, const void* v, void* out, int dt, u32 batch_heads, u32 q_len,
                                          u32 kv_len, u32 head_dim, float scale) {
    const int lane = threadIdx.x & 31;
    u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (u64)batch_heads * q_len) return;
    u64 bh = row / q_len;
    float qr[16], acc[16];
    for (int i = 0; i < 16; ++i) {
        u32 d = lane + 32 * i;
        qr[i] = d < head_dim ? load_f32(q, row * head_dim + d, dt) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (u32 j = 0; j < kv_len; ++j) {
        u64 kr = (bh * kv_len + j) * head_dim;
        float dot = 0.0f;
        for (int i = 0; i < 16; ++i) {
            u32 d = lane + 32 * i;
            if (d < head_dim) dot += qr[i] * load_f32(k, kr + d, dt);
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float sc = dot * scale;
        float m_new = fmaxf(m, sc);
        float alpha = expf(m - m_new), p = expf(sc - m_new);
        l = l * alpha + p;
        for (int i = 0; i < 16; ++i) {
            u32 d = lane + 32 * i;
            acc[i] = acc[i] * alpha + (d < head_dim ? p * load_f32(v, kr + d, dt) : 0.0f);
        }
        m = m_new;
    }
    for (int i = 0; i < 16; ++i) {
        u32 d = lane + 32 * i;
        if (d < head_dim) store_f32(out, row * head_dim + d, dt, acc[i] / l);
    }
}
