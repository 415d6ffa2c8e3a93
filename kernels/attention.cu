// attention.cu: the runtime's `attention` primitive (spec.rs, `AttentionSpec`):
// out = softmax(scale * q k^T) v per batch item and head, for q of q_len rows and k, v of
// kv_len rows of head_dim elements, no mask. Three kernels; the runtime picks. The flash
// kernels take each tensor's strides (`RowStrides`: between batch items, heads and rows; the
// elements of a row are contiguous), so they read and write heads-first [batch, heads, len,
// head_dim] and tokens-first [batch, len, heads, head_dim] tensors alike; blockIdx.y is the
// head, blockIdx.z the batch item. attention_rows takes heads-first tensors only.
//
// flash_attention_sm90_{bf16,f16}_d{64,128} (Hopper, compiled only for sm_90a):
// FlashAttention-3 style, producer and consumers. A block of three warpgroups owns 128
// query rows. Warpgroup 0 is the producer: it gives up most of its registers (setmaxnreg)
// and one of its threads issues TMA copies of Q and of every K and V tile of 128 keys into
// SM90_STAGES-deep rings in shared memory, in the 128-byte swizzled layout wgmma reads (Q
// and K as K-major operands, V read MN-major, so one layout serves all three), with
// mbarriers marking a stage full (its bytes landed) and empty (both consumers' MMAs on it
// retired). Warpgroups 1 and 2 consume, 64 query rows each, and never issue a load or
// wait on a block-wide barrier in the loop. Per tile a consumer issues S = Q K^T
// (`wgmma.mma_async` m64n128k16, both operands in shared memory) together with O += P V
// for the previous tile (P from registers: the accumulator layout of S is the A-fragment
// layout of P), runs the online softmax of S while P V is still in flight, then rescales
// O. The two consumers take turns issuing their MMAs (named barriers), so one's softmax
// overlaps the other's tensor-core work. Limits: head_dim exactly 64 or 128; Q, K and V
// 16-byte aligned (the runtime encodes their tensor maps and falls back to the sm_80
// kernel when it cannot).
//
// flash_attention_{bf16,f16}_d{D} (sm_80 or newer): FlashAttention-2 style on warp MMAs.
// A block of WARPS warps owns 16*WARPS query rows (16 per warp, Q kept in registers) and
// walks the keys in tiles of FA_BN (set by the runtime), double-buffered in shared memory
// with cp.async. Per tile each warp computes S = Q K^T with mma.sync.m16n8k16 (operands
// fetched with ldmatrix, V with ldmatrix.trans), updates the online softmax and
// accumulates O += P V with mma.sync. Shared rows are padded by 16 bytes so ldmatrix is
// free of bank conflicts. Limits: head_dim a multiple of 8, at most D (a multiple of 16 up
// to 160).
//
// Both flash kernels: bf16 or f16 in, f32 accumulate, online softmax in base 2, no score
// matrix in memory; tail keys are masked to -inf, tail rows and columns zero-filled.
// Lengths up to 2^31.
//
// attention_rows: any dtype and head_dim <= 512, one warp per query row, f32 throughout.
// The f32 path; slow, exact to f32 rounding. (16-bit head sizes no flash kernel takes go
// through two cuBLASLt GEMMs and softmax_rows instead; see the runtime.)

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Element strides of a tensor: between batch items, heads and rows (RowStrides in the
// runtime).
struct RowStrides {
    u64 batch, head, row;
};

// This block's (batch item, head) slice of a tensor.
__device__ __forceinline__ u64 head_offset(const RowStrides& st) { return blockIdx.z * st.batch + blockIdx.y * st.head; }

// Both flash kernels keep scores and outputs in the MMA accumulator layout: a warp holds
// 16 rows; for n8 tile t, elements 4t + 2r and 4t + 2r + 1 of a thread's array are row
// (lane / 4 + 8r), columns 8t + 2 (lane % 4) + {0, 1}. Each thread thus owns two rows and
// shares them with the three other lanes of its quad.

// One key tile of the online softmax: masks keys past `kv_len` (the tile starts at key
// `key0`), turns scores `s` into unnormalised probabilities against the running row maxima,
// updates the running sums and returns in `alpha` the factor by which outputs accumulated
// so far must be rescaled (`rescale`; split off so the Hopper kernel can apply it once its
// in-flight MMA into the outputs has finished).
template <int BN>
__device__ __forceinline__ void online_softmax(float (&s)[BN / 2], float (&row_max)[2], float (&row_sum)[2], float (&alpha)[2], u32 key0,
                                               u32 kv_len, float scale_log2, int lane) {
    if (key0 + BN > kv_len) {
#pragma unroll
        for (int t = 0; t < BN / 8; ++t) {
            u32 col = key0 + t * 8 + 2 * (lane & 3);
            if (col >= kv_len) s[4 * t] = s[4 * t + 2] = NEG_INF;
            if (col + 1 >= kv_len) s[4 * t + 1] = s[4 * t + 3] = NEG_INF;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = NEG_INF;
#pragma unroll
        for (int t = 0; t < BN / 8; ++t) mx = fmaxf(mx, fmaxf(s[4 * t + 2 * r], s[4 * t + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float m_new = fmaxf(row_max[r], mx * scale_log2);
        alpha[r] = fast_exp2(row_max[r] - m_new);
        row_max[r] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int t = 0; t < BN / 8; ++t) {
            s[4 * t + 2 * r] = fast_exp2(s[4 * t + 2 * r] * scale_log2 - m_new);
            s[4 * t + 2 * r + 1] = fast_exp2(s[4 * t + 2 * r + 1] * scale_log2 - m_new);
            sum += s[4 * t + 2 * r] + s[4 * t + 2 * r + 1];
        }
        row_sum[r] = row_sum[r] * alpha[r] + sum;
    }
}

template <int D>
__device__ __forceinline__ void rescale(float (&o)[D / 2], const float (&alpha)[2]) {
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
        o[4 * t] *= alpha[0];
        o[4 * t + 1] *= alpha[0];
        o[4 * t + 2] *= alpha[1];
        o[4 * t + 3] *= alpha[1];
    }
}

// Probabilities of keys 16kk..16kk+15 as the A fragment of a k16 MMA step: the accumulator
// layout of two n8 tiles is the A layout of one k16 step.
template <bool BF16>
__device__ __forceinline__ void probabilities(u32 (&a)[4], const float* s, int kk) {
    a[0] = pack2<BF16>(s[8 * kk], s[8 * kk + 1]);
    a[1] = pack2<BF16>(s[8 * kk + 2], s[8 * kk + 3]);
    a[2] = pack2<BF16>(s[8 * kk + 4], s[8 * kk + 5]);
    a[3] = pack2<BF16>(s[8 * kk + 6], s[8 * kk + 7]);
}

// Normalises and stores a warp's 16 output rows starting at query row `row0` into `out`
// (this head's rows, `row_stride` elements apart; columns past `head_dim`, the padding of a
// kernel compiled for a larger D, are dropped).
template <int D, bool BF16>
__device__ __forceinline__ void store_rows(const float (&o)[D / 2], float (&row_sum)[2], u16* out, u64 row_stride, u32 row0, u32 q_len,
                                           u32 head_dim, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
        u32 row = row0 + (lane >> 2) + 8 * r;
        if (row >= q_len) continue;
        float inv = 1.0f / row_sum[r];
        u32* dst = (u32*)(out + row * row_stride);
#pragma unroll
        for (int t = 0; t < D / 8; ++t) {
            u32 col = t * 8 + 2 * (lane & 3);
            if (col < head_dim) dst[col / 2] = pack2<BF16>(o[4 * t + 2 * r] * inv, o[4 * t + 2 * r + 1] * inv);
        }
    }
}

// Copies rows [row0, row0 + rows) of a [len, head_dim] matrix whose rows lie `row_stride`
// elements apart into shared rows of STRIDE elements, zero-filling rows past `len` and
// columns past `head_dim`.
template <int D, int STRIDE, int THREADS>
__device__ __forceinline__ void load_tile(u16* dst, const u16* src, u64 row_stride, u32 row0, u32 rows, u32 len, u32 head_dim) {
    constexpr int CHUNKS = D / 8;
    for (int i = threadIdx.x; i < (int)rows * CHUNKS; i += THREADS) {
        int r = i / CHUNKS, c = i % CHUNKS;
        bool valid = row0 + r < len && c * 8 < (int)head_dim;
        const u16* g = valid ? src + (row0 + r) * row_stride + c * 8 : src;
        cp_async16(smem_addr(dst + r * STRIDE + c * 8), g, valid);
    }
}

template <int D, int WARPS, bool BF16>
__device__ void flash_attention(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u16* __restrict__ out,
                                RowStrides q_st, RowStrides kv_st, u32 q_len, u32 kv_len, u32 head_dim, float scale_log2) {
    constexpr int BM = 16 * WARPS, BN = FA_BN, STRIDE = D + 8, THREADS = 32 * WARPS;
    extern __shared__ __align__(16) u16 smem[];
    u16* qs = smem;
    u16* ks = qs + BM * STRIDE;
    u16* vs = ks + 2 * BN * STRIDE;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 q0 = blockIdx.x * BM;
    const u16* qb = q + head_offset(q_st);
    const u16* kb = k + head_offset(kv_st);
    const u16* vb = v + head_offset(kv_st);

    load_tile<D, STRIDE, THREADS>(qs, qb, q_st.row, q0, BM, q_len, head_dim);
    load_tile<D, STRIDE, THREADS>(ks, kb, kv_st.row, 0, BN, kv_len, head_dim);
    load_tile<D, STRIDE, THREADS>(vs, vb, kv_st.row, 0, BN, kv_len, head_dim);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        ldmatrix_x4(qf[kk], smem_addr(qs + (warp * 16 + (lane & 15)) * STRIDE + kk * 16 + (lane >> 4) * 8));
    }

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.0f, 0.0f};

    const u32 tiles = (kv_len + BN - 1) / BN;
    for (u32 j = 0; j < tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < tiles) {
            load_tile<D, STRIDE, THREADS>(ks + (buf ^ 1) * BN * STRIDE, kb, kv_st.row, (j + 1) * BN, BN, kv_len, head_dim);
            load_tile<D, STRIDE, THREADS>(vs + (buf ^ 1) * BN * STRIDE, vb, kv_st.row, (j + 1) * BN, BN, kv_len, head_dim);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u16* kt = ks + buf * BN * STRIDE;
        const u16* vt = vs + buf * BN * STRIDE;

        float s[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) s[i] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 b[4];
                int mi = lane >> 3;
                ldmatrix_x4(b, smem_addr(kt + (np * 16 + (mi >> 1) * 8 + (lane & 7)) * STRIDE + kk * 16 + (mi & 1) * 8));
                mma16816<BF16>(&s[8 * np], qf[kk], b[0], b[1]);
                mma16816<BF16>(&s[8 * np + 4], qf[kk], b[2], b[3]);
            }
        }

        float alpha[2];
        online_softmax<BN>(s, row_max, row_sum, alpha, j * BN, kv_len, scale_log2, lane);
        rescale<D>(o, alpha);

#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 a[4];
            probabilities<BF16>(a, s, kk);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 b[4];
                int mi = lane >> 3;
                ldmatrix_x4_trans(b, smem_addr(vt + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * STRIDE + dp * 16 + (mi >> 1) * 8));
                mma16816<BF16>(&o[8 * dp], a, b[0], b[1]);
                mma16816<BF16>(&o[8 * dp + 4], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }

    store_rows<D, BF16>(o, row_sum, out + head_offset(q_st), q_st.row, q0 + warp * 16, q_len, head_dim, lane);
}

#define FLASH_INSTANCE(D, WARPS)                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) flash_attention_bf16_d##D(                                          \
            const u16* q, const u16* k, const u16* v, u16* out, RowStrides q_st, RowStrides kv_st, u32 q_len, u32 kv_len, u32 head_dim,    \
            float scale_log2) {                                                                                                         \
        flash_attention<D, WARPS, true>(q, k, v, out, q_st, kv_st, q_len, kv_len, head_dim, scale_log2);                                   \
    }                                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) flash_attention_f16_d##D(                                           \
            const u16* q, const u16* k, const u16* v, u16* out, RowStrides q_st, RowStrides kv_st, u32 q_len, u32 kv_len, u32 head_dim,    \
            float scale_log2) {                                                                                                         \
        flash_attention<D, WARPS, false>(q, k, v, out, q_st, kv_st, q_len, kv_len, head_dim, scale_log2);                                  \
    }

FLASH_INSTANCE(32, FA_WARPS)
FLASH_INSTANCE(48, FA_WARPS)
FLASH_INSTANCE(64, FA_WARPS)
FLASH_INSTANCE(80, FA_WARPS)
FLASH_INSTANCE(96, FA_WARPS)
FLASH_INSTANCE(128, FA_WARPS)
FLASH_INSTANCE(160, FA_WARPS)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// o += P V for a 64 x D x 16 step: P from registers, V MN-major in shared memory.
#define WG_PV(SHAPE, ACC, OUT, A, B, ONE)                                                        \
    asm volatile("{ .reg .pred p; setp.ne.b32 p, " ONE ", 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned." SHAPE " " ACC ", " A ", " B ", p, 1, 1, 1; }"  \
                 : OUT(o)                                                                        \
                 : "r"(p[0]), "r"(p[1]), "r"(p[2]), "r"(p[3]), "l"(b), "r"(1))
template <int D, bool BF16>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 2], const u32 (&p)[4], u64 b) {
    if constexpr (D == 128 && BF16) {
        WG_PV("m64n128k16.f32.bf16.bf16", WG_ACC64, WG_OUT64, "{%64, %65, %66, %67}", "%68", "%69");
    } else if constexpr (D == 128) {
        WG_PV("m64n128k16.f32.f16.f16", WG_ACC64, WG_OUT64, "{%64, %65, %66, %67}", "%68", "%69");
    } else if constexpr (BF16) {
        WG_PV("m64n64k16.f32.bf16.bf16", WG_ACC32, WG_OUT32, "{%32, %33, %34, %35}", "%36", "%37");
    } else {
        WG_PV("m64n64k16.f32.f16.f16", WG_ACC32, WG_OUT32, "{%32, %33, %34, %35}", "%36", "%37");
    }
}

// Producer/consumer flash attention; see the top of the file. Q, K and V come as tensor
// maps over (D, len, heads, batch) with boxes of 64 columns x TILE rows x 1 head x 1 item,
// 128-byte swizzle: one box is one column block of a tile in the layout wgmma reads. The
// output lies like Q, with strides `os`.
template <int D, int STAGES, bool BF16>
__device__ void flash_attention_sm90(const TmaMap& tq, const TmaMap& tk, const TmaMap& tv, u16* __restrict__ out, RowStrides os,
                                     u32 q_len, u32 kv_len, float scale_log2) {
    constexpr int TILE = 128, CONSUMERS = 256;
    constexpr u32 TILE_BYTES = TILE * D * 2, BLOCK_BYTES = TILE * 128;
    extern __shared__ __align__(16) unsigned char smem_bytes[];
    // q_full: Q landed; full[kind][stage]: the K (kind 0) or V (kind 1) tile in that stage
    // landed; empty[kind][stage]: every consumer thread is done reading it.
    __shared__ __align__(8) u64 barriers[1 + 4 * STAGES];
    // The swizzle pattern is a function of the address, so tiles start on 1024-byte
    // boundaries (the launch reserves 1 KiB for this). Tile j of K or V lives in stage
    // j % STAGES.
    const u32 qs = (smem_addr(smem_bytes) + 1023) & ~1023u, ks = qs + TILE_BYTES, vs = ks + STAGES * TILE_BYTES;
    const u32 q_full = smem_addr(barriers), full = q_full + 8, empty = full + 16 * STAGES;
    auto bar = [](u32 base, int kind, u32 j) { return base + 8 * (kind * STAGES + j % STAGES); };
    // Phase parity of tile j's use of its stage.
    auto parity = [](u32 j) { return (j / STAGES) & 1; };

    const u32 head = blockIdx.y, item = blockIdx.z, q0 = blockIdx.x * TILE;
    const u32 tiles = (kv_len + TILE - 1) / TILE;
    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        mbar_init_ring(full, empty, 2 * STAGES, CONSUMERS);
    }
    __syncthreads();

    // Warpgroup 0 produces: one thread issues every copy, the rest of the group idles with
    // its registers handed to the consumers.
    if (threadIdx.x < 128) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
        if (threadIdx.x == 0) {
            auto load = [&](const TmaMap& map, u32 dst, u32 row0, u32 b) {
#pragma unroll
                for (int c = 0; c < D / 64; ++c) tma_load(dst + c * BLOCK_BYTES, map, c * 64, row0, head, item, b);
            };
            // K (kind 0) or V (kind 1) tile j, once the consumers released the tile STAGES
            // before it in the same stage.
            auto load_tile = [&](int kind, u32 j) {
                if (j >= STAGES) mbar_wait(bar(empty, kind, j), parity(j) ^ 1);
                mbar_expect_bytes(bar(full, kind, j), TILE_BYTES);
                load(kind ? tv : tk, (kind ? vs : ks) + (j % STAGES) * TILE_BYTES, j * TILE, bar(full, kind, j));
            };
            mbar_expect_bytes(q_full, TILE_BYTES);
            load(tq, qs, q0, q_full);
            // In the order the consumers take them: K_j with V_{j-1}.
            load_tile(0, 0);
            for (u32 j = 1; j < tiles; ++j) {
                load_tile(0, j);
                load_tile(1, j - 1);
            }
            load_tile(1, tiles - 1);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");

    // Consumer warpgroups 1 and 2 own 64 query rows each.
    const int cg = (threadIdx.x >> 7) - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const u32 qw = qs + cg * 64 * 128;
    auto acquire = [&](int kind, u32 j) { mbar_wait(bar(full, kind, j), parity(j)); };
    auto release = [&](int kind, u32 j) { mbar_arrive(bar(empty, kind, j)); };
    // The two consumers take turns issuing MMAs (named barriers 1 and 2), so one's softmax
    // runs while the other's MMAs occupy the tensor cores.
    auto my_turn = [&] { named_sync(1 + cg, CONSUMERS); };
    auto your_turn = [&] { named_arrive(2 - cg, CONSUMERS); };

    float o[D / 2], alpha[2];
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    // P of the previous key tile, as A fragments.
    u32 p[TILE / 16][4];

    // S = Q K_j^T into `s`, issued asynchronously.
    auto issue_scores = [&](float (&s)[TILE / 2], u32 j) {
        const u32 kt = ks + (j % STAGES) * TILE_BYTES;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            // k16 step kk: column block kk / 4, 32 bytes further per step inside a block.
            const u32 block = kk >> 2, col = (kk & 3) * 32;
            wgmma_kk<TILE, BF16>(s, wg_desc(qw + block * BLOCK_BYTES + col, 16, 1024), wg_desc(kt + block * BLOCK_BYTES + col, 16, 1024),
                                 kk > 0);
        }
        wg_commit();
    };
    // O += P_{j-1} V_{j-1}, issued asynchronously.
    auto issue_values = [&](u32 j) {
        const u32 vt = vs + ((j - 1) % STAGES) * TILE_BYTES;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) wgmma_pv<D, BF16>(o, p[kk], wg_desc(vt + kk * 16 * 128, BLOCK_BYTES, 1024));
        wg_commit();
    };
    auto keep_probabilities = [&](const float (&s)[TILE / 2]) {
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) probabilities<BF16>(p[kk], s, kk);
    };

    mbar_wait(q_full, 0);
    if (cg == 1) your_turn();
    {
        float s[TILE / 2];
        acquire(0, 0);
        my_turn();
        issue_scores(s, 0);
        your_turn();
        wg_wait<0>();
        fence_regs(s);
        release(0, 0);
        online_softmax<TILE>(s, row_max, row_sum, alpha, 0, kv_len, scale_log2, lane);
        keep_probabilities(s);
    }

    // Step j overlaps the softmax of key tile j (CUDA cores) with O += P_{j-1} V_{j-1}
    // (tensor cores) and, across consumers, with the other's MMAs. No branch may separate
    // an MMA from its wait (ptxas would serialise the MMAs), hence the last tile's P V
    // after the loop.
    for (u32 j = 1; j < tiles; ++j) {
        float s[TILE / 2];
        acquire(0, j);
        acquire(1, j - 1);
        my_turn();
        issue_scores(s, j);
        issue_values(j);
        your_turn();
        wg_wait<1>();
        fence_regs(s);
        release(0, j);
        online_softmax<TILE>(s, row_max, row_sum, alpha, j * TILE, kv_len, scale_log2, lane);
        wg_wait<0>();
        fence_regs(o);
        release(1, j - 1);
        rescale<D>(o, alpha);
        keep_probabilities(s);
    }
    acquire(1, tiles - 1);
    my_turn();
    issue_values(tiles);
    your_turn();
    wg_wait<0>();
    fence_regs(o);
    // Consumer 1 signalled once more than consumer 0 waited.
    if (cg == 0) my_turn();

    store_rows<D, BF16>(o, row_sum, out + head_offset(os), os.row, q0 + cg * 64 + warp * 16, q_len, D, lane);
}

// Three warpgroups: the producer and two consumers. SM90_STAGES is set by the runtime.
#define FLASH_SM90_INSTANCE(D)                                                                                                    \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                                          \
        flash_attention_sm90_bf16_d##D(const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,                      \
                                       const __grid_constant__ TmaMap tv, u16* out, RowStrides os, u32 q_len, u32 kv_len,        \
                                       float scale_log2) {                                                                        \
        flash_attention_sm90<D, SM90_STAGES, true>(tq, tk, tv, out, os, q_len, kv_len, scale_log2);                               \
    }                                                                                                                             \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                                          \
        flash_attention_sm90_f16_d##D(const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,                       \
                                      const __grid_constant__ TmaMap tv, u16* out, RowStrides os, u32 q_len, u32 kv_len,         \
                                      float scale_log2) {                                                                         \
        flash_attention_sm90<D, SM90_STAGES, false>(tq, tk, tv, out, os, q_len, kv_len, scale_log2);                              \
    }

FLASH_SM90_INSTANCE(64)
FLASH_SM90_INSTANCE(128)

#endif

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
