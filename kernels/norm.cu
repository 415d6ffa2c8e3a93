// norm.cu: the runtime's `norm` and `softmax` primitives (spec.rs, `NormSpec`, `SoftmaxSpec`).
//
// norm_partial + norm_apply: layer, RMS and group norm over `rows` contiguous rows of
// `row_len` elements, then the optional affine parameters (index
// (row % groups) * channels_per_group + i / inner), and optionally SiLU (the fused group
// norm + SiLU of the UNet and VAE resnets) or adaLN modulation x*(1+scale)+shift with
// per-(batch, channel) tensors (the fused norm + modulate of DiT blocks).
// A row is split into chunks so that a few huge rows (group norm of a video VAE) still fill
// the GPU: norm_partial writes, per (row, chunk), the sums of (x - x[row, 0]) and its
// square in f32 (the shift keeps the variance from cancelling); norm_apply first reduces a
// row's chunks in f64, then normalises its own part of the row. Grids are (rows, chunks).
// norm_rows: the same for rows of at most NORM_ROW_MAX elements in one pass, one warp per
// row (8 rows per block of 256): the whole row's statistics stay in registers, and the
// second read of x hits the cache. The many short rows of a transformer (q/k RMS norm,
// adaLN layer norm) take this path.
// norm_rows8: norm_rows for 16-bit rows of a multiple of 256 elements, at most
// 256 * NORM_ROW8_WORDS: each lane reads its part of the row once, as 16-byte words, and
// keeps it in registers for the second pass. It alone has the rope epilogue (Wan's q/k RMS
// norm, then the rotary embedding, in one pass): a word's 8 elements are 4 interleaved
// pairs of one head, rotated by 4 consecutive entries of the 16-bit cos/sin tables
// [rows_per_batch tokens][head_dim / 2] (8-byte aligned), token row % rows_per_batch.
// head_dim must be a multiple of 8 dividing 256: then all of a lane's words sit at the same
// place in their heads, so a lane reads its table entries once, together with the row.
// norm_strided: rows whose elements lie `stride` apart (a norm over the channels of
// [n, c, spatial], the Wan VAE's RMS norm) in place of a permute to channels-last and back.
// A block of 256 threads owns 32 neighbouring rows (positions): the lane picks the row, so
// a warp reads 32 neighbours in one channel plane at once, and the 8 warps split the
// channels and combine their sums in shared memory (the VAE's small frames at 384 channels
// would leave a thread-per-row kernel a few blocks of long serial loops). Two passes over
// the rows. No modulation epilogue.
// norm_strided8: norm_strided for 16-bit x and out whose rows come in runs of 8 contiguous,
// 16-byte aligned elements (stride a multiple of 8, groups 1): a lane owns 8 neighbouring
// rows and reads a channel's 8 elements as one 16-byte word, so a warp moves 512 bytes per
// load where norm_strided moves 64 in 2-byte loads. A block owns 256 rows; per-lane work
// is norm_strided's (each warp still walks an eighth of the channels), so the 8x fewer
// blocks cost nothing at the VAE's small frames.
// softmax_rows: softmax(scale * row), one block per row: max, f64 sum of exponentials,
// write (in its own dtype: attention writes 16-bit probabilities from f32 scores).
// Layout: contiguous rows, or rows of stride > 1 (norm_strided); any storage dtypes, f32
// arithmetic. Limits: row_len < 2^32.

#define NORM_MEANVAR 0
#define NORM_RMS 1

// 16-byte words per lane in norm_rows8: rows of up to 2,048 elements.
#define NORM_ROW8_WORDS 8

#define EPI_NONE 0
#define EPI_SILU 1
#define EPI_MODULATE 2
#define EPI_ROPE 3

extern "C" __global__ void norm_partial(const void* x, int dt, u32 row_len, u32 chunk, u32 chunks, int kind, float2* partial) {
    __shared__ double scratch[32];
    u32 row = blockIdx.x, c = blockIdx.y;
    u64 base = (u64)row * row_len;
    float shift = kind == NORM_MEANVAR ? load_f32(x, base, dt) : 0.0f;
    u32 lo = c * chunk, hi = min(row_len, lo + chunk);
    float s = 0.0f, s2 = 0.0f;
    for (u32 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float v = load_f32(x, base + i, dt) - shift;
        s += v;
        s2 += v * v;
    }
    double ts = block_sum(s, scratch);
    double ts2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) partial[(u64)row * chunks + c] = make_float2((float)ts, (float)ts2);
}

struct NormApply {
    u32 row_len, chunks, per_block, groups, channels_per_group, inner, stride;
    int kind, epilogue, x_dtype, out_dtype, gamma_dtype, beta_dtype, mod_dtype;
    float eps;
    // Modulation tensors are [batch, row_len] (one row of scale and shift per batch item);
    // rows_per_batch rows of x share a batch item. Rope: the tables (in the scale and
    // shift slots) have rows_per_batch rows of head_dim / 2 angles.
    u32 rows_per_batch, head_dim;
    // Parameter index = element index (groups 1, inner 1) and every parameter tensor 16-byte
    // aligned: norm_rows8 reads them 8 elements at a time.
    u32 vec_params;
};

// Mean (0 for RMS) and reciprocal standard deviation of a row of `n` elements from the sums
// of (x - shift) and its square; `shift` is x[row, 0] for layer/group norm, else 0.
__device__ __forceinline__ void norm_stats(int kind, double n, double s, double s2, float shift, float eps, float& mean, float& rstd) {
    if (kind == NORM_MEANVAR) {
        double m = s / n;
        double var = fmax(s2 / n - m * m, 0.0);
        mean = (float)(m + (double)shift);
        rstd = (float)(1.0 / sqrt(var + (double)eps));
    } else {
        mean = 0.0f;
        rstd = (float)(1.0 / sqrt(s2 / n + (double)eps));
    }
}

// Normalises, applies the affine parameters and the epilogue to element i of `row`, and
// stores it.
// Where element i of `row` lies (see NormSpec).
__device__ __forceinline__ u64 norm_at(const NormApply& p, u32 row, u32 i) {
    if (p.stride == 1) return (u64)row * p.row_len + i;
    return ((u64)(row / p.stride) * p.row_len + i) * p.stride + row % p.stride;
}

// Applies the affine parameters and the epilogue to the normalised element i of `row`.
__device__ __forceinline__ float norm_finish(const NormApply& p, const void* gamma, const void* beta, const void* mod_scale,
                                             const void* mod_shift, u32 row, u32 i, float y) {
    u32 pi = (row % p.groups) * p.channels_per_group + (p.inner == 1 ? i : i / p.inner);
    if (gamma) y *= load_f32(gamma, pi, p.gamma_dtype);
    if (beta) y += load_f32(beta, pi, p.beta_dtype);
    if (p.epilogue == EPI_SILU) {
        y = y / (1.0f + expf(-y));
    } else if (p.epilogue == EPI_MODULATE) {
        u64 m = (u64)(row / p.rows_per_batch) * p.row_len + i;
        y = y * (1.0f + load_f32(mod_scale, m, p.mod_dtype)) + load_f32(mod_shift, m, p.mod_dtype);
    }
    return y;
}

// norm_finish for elements i0 .. i0 + 8 of `row`, when p.vec_params: parameters by 16-byte
// loads, where one per element made norm_rows8 bound by instruction issue.
__device__ __forceinline__ void norm_finish8(const NormApply& p, const void* gamma, const void* beta, const void* mod_scale,
                                             const void* mod_shift, u32 row, u32 i0, float (&y)[8]) {
    float a[8], b[8];
    if (gamma) {
        load8(gamma, i0, p.gamma_dtype, a);
#pragma unroll
        for (int j = 0; j < 8; ++j) y[j] *= a[j];
    }
    if (beta) {
        load8(beta, i0, p.beta_dtype, a);
#pragma unroll
        for (int j = 0; j < 8; ++j) y[j] += a[j];
    }
    if (p.epilogue == EPI_SILU) {
#pragma unroll
        for (int j = 0; j < 8; ++j) y[j] = y[j] / (1.0f + expf(-y[j]));
    } else if (p.epilogue == EPI_MODULATE) {
        const u64 m = (u64)(row / p.rows_per_batch) * p.row_len + i0;
        load8(mod_scale, m, p.mod_dtype, a);
        load8(mod_shift, m, p.mod_dtype, b);
#pragma unroll
        for (int j = 0; j < 8; ++j) y[j] = y[j] * (1.0f + a[j]) + b[j];
    }
}

// Normalises, finishes and stores element i of `row`.
__device__ __forceinline__ void norm_store(const NormApply& p, const void* x, void* out, const void* gamma, const void* beta,
                                           const void* mod_scale, const void* mod_shift, u32 row, u32 i, float mean, float rstd) {
    const u64 at = norm_at(p, row, i);
    const float y = (load_f32(x, at, p.x_dtype) - mean) * rstd;
    store_f32(out, at, p.out_dtype, norm_finish(p, gamma, beta, mod_scale, mod_shift, row, i, y));
}

extern "C" __global__ void norm_apply(NormApply p, const void* x, void* out, const float2* partial, const void* gamma, const void* beta,
                                      const void* mod_scale, const void* mod_shift) {
    __shared__ double scratch[32];
    __shared__ float stats[2];
    u32 row = blockIdx.x;
    double s = 0.0, s2 = 0.0;
    for (u32 c = threadIdx.x; c < p.chunks; c += blockDim.x) {
        float2 v = partial[(u64)row * p.chunks + c];
        s += v.x;
        s2 += v.y;
    }
    s = block_sum(s, scratch);
    s2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
        float shift = p.kind == NORM_MEANVAR ? load_f32(x, (u64)row * p.row_len, p.x_dtype) : 0.0f;
        norm_stats(p.kind, (double)p.row_len, s, s2, shift, p.eps, stats[0], stats[1]);
    }
    __syncthreads();
    float mean = stats[0], rstd = stats[1];
    u32 lo = blockIdx.y * p.per_block, hi = min(p.row_len, lo + p.per_block);
    for (u32 i = lo + threadIdx.x; i < hi; i += blockDim.x) norm_store(p, x, out, gamma, beta, mod_scale, mod_shift, row, i, mean, rstd);
}

// Sums of a warp's partial moments, in f64.
__device__ __forceinline__ void warp_moments(float s, float s2, double& ds, double& ds2) {
    ds = s;
    ds2 = s2;
    for (int o = 16; o > 0; o >>= 1) {
        ds += __shfl_xor_sync(0xffffffffu, ds, o);
        ds2 += __shfl_xor_sync(0xffffffffu, ds2, o);
    }
}

extern "C" __global__ void norm_rows(NormApply p, u32 rows, const void* x, void* out, const void* gamma, const void* beta, const void* mod_scale,
                                     const void* mod_shift) {
    const u32 row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const u64 base = (u64)row * p.row_len;
    const float shift = p.kind == NORM_MEANVAR ? load_f32(x, base, p.x_dtype) : 0.0f;
    float s = 0.0f, s2 = 0.0f;
    for (u32 i = lane; i < p.row_len; i += 32) {
        float v = load_f32(x, base + i, p.x_dtype) - shift;
        s += v;
        s2 += v * v;
    }
    double ds, ds2;
    warp_moments(s, s2, ds, ds2);
    float mean, rstd;
    norm_stats(p.kind, (double)p.row_len, ds, ds2, shift, p.eps, mean, rstd);
    for (u32 i = lane; i < p.row_len; i += 32) norm_store(p, x, out, gamma, beta, mod_scale, mod_shift, row, i, mean, rstd);
}

extern "C" __global__ void norm_strided(NormApply p, u32 rows, const void* x, void* out, const void* gamma, const void* beta) {
    __shared__ float part[2][8][32];
    __shared__ float stats[2][32];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, row = blockIdx.x * 32 + lane;
    const bool live = row < rows;
    const float shift = live && p.kind == NORM_MEANVAR ? load_f32(x, norm_at(p, row, 0), p.x_dtype) : 0.0f;
    float s = 0.0f, s2 = 0.0f;
    for (u32 i = warp; live && i < p.row_len; i += 8) {
        const float v = load_f32(x, norm_at(p, row, i), p.x_dtype) - shift;
        s += v;
        s2 += v * v;
    }
    part[0][warp][lane] = s;
    part[1][warp][lane] = s2;
    __syncthreads();
    if (warp == 0) {
        double ts = 0.0, ts2 = 0.0;
        for (int w = 0; w < 8; ++w) {
            ts += part[0][w][lane];
            ts2 += part[1][w][lane];
        }
        norm_stats(p.kind, (double)p.row_len, ts, ts2, shift, p.eps, stats[0][lane], stats[1][lane]);
    }
    __syncthreads();
    if (!live) return;
    for (u32 i = warp; i < p.row_len; i += 8) norm_store(p, x, out, gamma, beta, nullptr, nullptr, row, i, stats[0][lane], stats[1][lane]);
}

extern "C" __global__ void norm_strided8(NormApply p, u32 rows, const u16* x, u16* out, const void* gamma, const void* beta) {
    __shared__ float part[2][8][8][32];
    __shared__ float stats[2][8][32];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, row0 = (blockIdx.x * 32 + lane) * 8;
    const bool live = row0 < rows;
    float shift[8] = {}, s[8] = {}, s2[8] = {}, v[8];
    if (live && p.kind == NORM_MEANVAR) load8(x, norm_at(p, row0, 0), p.x_dtype, shift);
    for (u32 i = warp; live && i < p.row_len; i += 8) {
        load8(x, norm_at(p, row0, i), p.x_dtype, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float d = v[j] - shift[j];
            s[j] += d;
            s2[j] += d * d;
        }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        part[0][warp][j][lane] = s[j];
        part[1][warp][j][lane] = s2[j];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            double ts = 0.0, ts2 = 0.0;
            for (int w = 0; w < 8; ++w) {
                ts += part[0][w][j][lane];
                ts2 += part[1][w][j][lane];
            }
            norm_stats(p.kind, (double)p.row_len, ts, ts2, shift[j], p.eps, stats[0][j][lane], stats[1][j][lane]);
        }
    }
    __syncthreads();
    if (!live) return;
    float mean[8], rstd[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) mean[j] = stats[0][j][lane], rstd[j] = stats[1][j][lane];
    for (u32 i = warp; i < p.row_len; i += 8) {
        const u64 at = norm_at(p, row0, i);
        load8(x, at, p.x_dtype, v);
        const u32 pi = p.inner == 1 ? i : i / p.inner;
        const float g = gamma ? load_f32(gamma, pi, p.gamma_dtype) : 1.0f, b = beta ? load_f32(beta, pi, p.beta_dtype) : 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float y = (v[j] - mean[j]) * rstd[j] * g + b;
            if (p.epilogue == EPI_SILU) y = y / (1.0f + expf(-y));
            v[j] = y;
        }
        ((uint4*)out)[at / 8] = pack8(v, p.out_dtype);
    }
}

extern "C" __global__ void norm_rows8(NormApply p, u32 rows, const u16* x, u16* out, const void* gamma, const void* beta, const void* mod_scale,
                                      const void* mod_shift) {
    const u32 row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const uint4* src = (const uint4*)(x + (u64)row * p.row_len);
    uint4* dst = (uint4*)(out + (u64)row * p.row_len);
    const u32 words = p.row_len / 256;
    const float shift = p.kind == NORM_MEANVAR ? load_f32(x, (u64)row * p.row_len, p.x_dtype) : 0.0f;
    // Every word's load is issued before the first is used: predicated, not behind a branch,
    // so their latencies overlap.
    uint4 raw[NORM_ROW8_WORDS];
#pragma unroll
    for (int w = 0; w < NORM_ROW8_WORDS; ++w) raw[w] = w < (int)words ? src[w * 32 + lane] : make_uint4(0, 0, 0, 0);
    float cs[4], sn[4];
    if (p.epilogue == EPI_ROPE) {
        const u64 t = ((u64)(row % p.rows_per_batch) * p.head_dim + (lane * 8) % p.head_dim) / 2;
        unpack4(((const uint2*)mod_scale)[t / 4], p.mod_dtype, cs);
        unpack4(((const uint2*)mod_shift)[t / 4], p.mod_dtype, sn);
    }
    float v[NORM_ROW8_WORDS][8];
    float s = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int w = 0; w < NORM_ROW8_WORDS; ++w) {
        if (w >= (int)words) break;
        unpack8(raw[w], p.x_dtype, v[w]);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float d = v[w][j] - shift;
            s += d;
            s2 += d * d;
        }
    }
    double ds, ds2;
    warp_moments(s, s2, ds, ds2);
    float mean, rstd;
    norm_stats(p.kind, (double)p.row_len, ds, ds2, shift, p.eps, mean, rstd);
#pragma unroll
    for (int w = 0; w < NORM_ROW8_WORDS; ++w) {
        if (w >= (int)words) break;
        const u32 i0 = (w * 32 + lane) * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) v[w][j] = (v[w][j] - mean) * rstd;
        if (p.vec_params) {
            norm_finish8(p, gamma, beta, mod_scale, mod_shift, row, i0, v[w]);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) v[w][j] = norm_finish(p, gamma, beta, mod_scale, mod_shift, row, i0 + j, v[w][j]);
        }
        if (p.epilogue == EPI_ROPE) rotate_pairs4(v[w], cs, sn);
        dst[w * 32 + lane] = pack8(v[w], p.out_dtype);
    }
}

extern "C" __global__ void softmax_rows(const void* x, void* out, int x_dt, int out_dt, u32 cols, float scale) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    u64 base = (u64)blockIdx.x * cols;
    float m = NEG_INF;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, scale * load_f32(x, base + i, x_dt));
    m = block_max(m, fscratch);
    double s = 0.0;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) s += exp((double)(scale * load_f32(x, base + i, x_dt) - m));
    s = block_sum(s, dscratch);
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) {
        store_f32(out, base + i, out_dt, (float)(exp((double)(scale * load_f32(x, base + i, x_dt) - m)) / s));
    }
}
