// conv.cu: the runtime's `conv` primitive (spec.rs, `ConvSpec`); the runtime picks the
// kernel.
//
// conv_tma_{bf16,f16}_n{128,256} (Hopper; it and conv_pad_input are compiled only for
// sm_90a), after conv_pad_input: a stride-1 convolution as one GEMM whose K runs over taps
// and input channels, reading a channels-last copy of the input with its padding written
// out as zeros, xp[item][tp][yp][xp][c] (c < cin_pad, a multiple of 64). Output
// positions are numbered in the padded frame, q = ((ot * hp) + oy) * wp + ox; the input row
// a tap (dt, dy, dx) reads for position q is q + (dt * hp + dy) * wp + dx, so the B tile of
// a tap is one run of consecutive rows: a single 2D box, and no position test in the loop.
// Positions with ox >= wo or oy >= ho are computed and dropped (the border, a few percent).
// A block of three warpgroups owns 128 output channels x BN positions (BN 128 or 256, the
// _n128/_n256 instances): warpgroup 0 produces (one thread issues TMA copies of the weight
// tile, 128 channels x 64 of K, and of the input tile, BN rows x 64 channels, 128-byte
// swizzled, into a ring of CONV_TMA_RING bytes of stages guarded by mbarriers), warpgroups
// 1 and 2 consume, 64 output channels each, with `wgmma.mma_async` m64nBNk16 (weights and
// input both K-major in shared memory, f32 accumulators), keeping one group of MMAs in
// flight. The wider tile reads less per MMA from L2 (85 against 64 FLOP a byte); the
// narrower one makes twice the blocks for small frames. K runs over taps, then 64-channel
// chunks; a chunk past c_in reads the next tap's weights against zero input channels, so
// c_in needs no padding in the weights. Bias in the epilogue, which writes NCTHW.
// conv_tma_{bf16,f16}_c{8,96,192}: the same with the GEMM's roles swapped, positions along
// the MMA's M and a tile of 8, 96 or 192 output channels along its N (m64nNk16), for
// channel counts that 128-channel tiles would pad (the Wan VAE's 3, 96 and 192): the
// runtime picks the tile that pads the output channels least.
// Layout: weights [cout][kt*kh*kw][cin] (taps * cin a multiple of 8: TMA's 16-byte row
// pitch), out [batch][cout][to][ho][wo], 16-bit. Limits: groups 1, stride 1, padded input
// rows (tp * hp * wp) < 2^31 per item.
//
// conv_igemm[_rows]_{bf16,f16}_m{64,96,128} (sm_80 or newer): implicit-GEMM convolution on warp
// MMAs. The product out[co][p] = sum over taps and input channels of w[co][tap][ci] *
// x[ci][shifted p] is a GEMM whose B operand is gathered straight from the input while tiles
// are loaded, so no column matrix is ever written. A K tile is one tap and BK input
// channels, which makes its padding test and source offset one computation per output
// position rather than one per element; the taps of a channel block come one after the
// other, so their gathers, shifted copies of one small input window, hit the L1 cache. A
// block of 8 warps (2 along the output channels, 4 along positions) owns BM = 32*MT output
// channels x 128 positions; each warp 16*MT x 32, with mma.sync m16n8k16 (bf16/f16 in, f32
// accumulate). Per K tile (32 channels) the weights come by cp.async (16-byte rows when
// c_in % 8 == 0, else element by element), the input into registers while the previous tile
// is multiplied, both double-buffered in shared memory with rows padded by 16 bytes so
// ldmatrix (.trans for the position-major B tile) is free of bank conflicts. Bias is added
// in the epilogue. MT = 2, 3, 4 (BM 64, 96, 128) lets 96- and 192-channel layers fill their
// tiles. The input comes by coalesced 2-byte loads, or, in the conv_igemm_rows_* variants,
// 8 positions of an output row at a time by 16-byte loads (stride 1 along x, "same" width
// padding of at most one column, output width a multiple of 8: the Wan VAE's 3x3(x3)
// convolutions), which needs far fewer instructions: the element path is bound by
// instruction issue (ncu: issue slots 65% busy, integer pipe the busiest), not by the
// tensor cores. Grid: (position tiles, channel tiles, batch items x groups).
// Layout: x [batch][groups][cin][ti][hi][wi], w [groups][cout][kt*kh*kw][cin] (the runtime
// permutes the weights), out [batch][groups][cout][n = to*ho*wo], all contiguous, 16-bit;
// bias [groups][cout], any dtype, or none; cin and cout per group. The input may come in up
// to CONV_PARTS tensors that follow each other in time (`ConvParts`: a causal convolution's
// cached frames and its new ones), each contiguous in that layout with its own frame count,
// so the frames are never copied into one tensor.
// Limits: 32-bit offsets within one batch item and group of a part; positions < 2^31.
//
// im2col: any dtype and device; the gather half of a column-matrix convolution whose
// product is a cuBLASLt GEMM issued by the runtime. Writes col[ci * K + kk][p - p0] for
// input channels ci < cin_g, kernel taps kk < K = kt*kh*kw (row-major over t, y, x) and
// output positions p in [p0, p0 + np) (row-major over the output's t, y, x), reading
// x[batch][c0 + ci][it][iy][ix] or zero where the tap falls in the padding. The GEMM
// w[c_out_g, cin_g*K] x col then yields output rows of the chunk; chunking over p bounds
// the column buffer for video-sized inputs.
// Layout: x is NCTHW contiguous; col is row-major [cin_g*K, np], same dtype as x.
// Limits: 32-bit indices within one batch item; one thread per column element.

// Input size, kernel, stride, front padding and output size (t, y, x), as both kernels take them.
struct ConvGeometry {
    u32 ti, hi, wi, kt, kh, kw, st, sh, sw, pt, ph, pw, to, ho, wo;
};

struct ConvGemm {
    u32 cin, cout, groups;
    ConvGeometry g;
    u32 n;
    int bias_dtype;  // -1: no bias
};

// The input's frames [first[j], first[j + 1]) lie in x[j]; parts not used start at ti.
#define CONV_PARTS 4
struct ConvParts {
    const u16* x[CONV_PARTS];
    u32 first[CONV_PARTS + 1];
};

// Channel 0 of input frame `it` (0 <= it < ti) of batch item (and group) `item`, where its
// part holds it, and in `plane` that part's distance between channels; `frame` is hi * wi
// and `cin` the channels of an item.
__device__ __forceinline__ const u16* part_frame(const ConvParts& parts, u32 item, u32 cin, u32 frame, int it, u32& plane) {
    int j = 0;
#pragma unroll
    for (int k = 1; k < CONV_PARTS; ++k) j += it >= (int)parts.first[k];
    plane = (parts.first[j + 1] - parts.first[j]) * frame;
    return parts.x[j] + (u64)item * cin * plane + (u32)(it - (int)parts.first[j]) * frame;
}

#if __CUDA_ARCH__ >= 800

#define IG_BN 128
#define IG_BK 32
#define IG_A_STRIDE (IG_BK + 8)
#define IG_B_STRIDE (IG_BN + 8)
#define IG_THREADS 256
// Input rows one thread gathers per K tile: its column, every other channel of the tile.
#define IG_B_ROWS (IG_BK * IG_BN / IG_THREADS)

template <int MT, bool BF16, bool ROWS>
__device__ void conv_igemm(const ConvGemm& p, const ConvParts& parts, const u16* __restrict__ w, const void* __restrict__ bias,
                           u16* __restrict__ out) {
    constexpr int BM = 32 * MT;
    __shared__ __align__(16) u16 as[2][BM * IG_A_STRIDE];
    __shared__ __align__(16) u16 bs[2][IG_BK * IG_B_STRIDE];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int warp_m = warp >> 2, warp_n = warp & 3;
    const u32 n0 = blockIdx.x * IG_BN, m0 = blockIdx.y * BM;
    const u32 taps = p.g.kt * p.g.kh * p.g.kw, frame = p.g.hi * p.g.wi;
    const u32 chunks = (p.cin + IG_BK - 1) / IG_BK, tiles = taps * chunks;
    const u32 group = blockIdx.z % p.groups;
    out += (u64)blockIdx.z * p.cout * p.n;
    w += (u64)group * p.cout * taps * p.cin;
    const u32 bias0 = group * p.cout;

    // Gathers of a K tile into registers (`gather`), stored to shared memory once the previous
    // tile's MMAs are issued (`store_b`). Element path: a thread owns one output position
    // (the corner of its receptive field) and every other channel of the tile. Row path: a
    // thread owns 8 consecutive positions of one output row and 2 channels, and reads them
    // as one aligned 16-byte load plus the neighbouring word, realigned with byte permutes
    // when the tap shifts the window by one element.
    constexpr int B_REGS = ROWS ? 8 : IG_B_ROWS;
    const int col = ROWS ? (tid % (IG_BN / 8)) * 8 : tid % IG_BN;
    const int row0 = ROWS ? tid / (IG_BN / 8) : tid / IG_BN;
    const u32 n = n0 + col;
    const bool n_ok = n < p.n;
    int bt = 0, by = 0, bx = 0;
    if (n_ok) {
        const u32 ox = n % p.g.wo, oy = (n / p.g.wo) % p.g.ho, ot = n / (p.g.wo * p.g.ho);
        bt = (int)(ot * p.g.st) - (int)p.g.pt;
        by = (int)(oy * p.g.sh) - (int)p.g.ph;
        bx = (int)(ox * p.g.sw) - (int)p.g.pw;
    }
    u32 staged[B_REGS];

    auto frame_of = [&](int it, u32& plane) { return part_frame(parts, blockIdx.z, p.cin, frame, it, plane); };
    auto gather = [&](u32 j) {
        const u32 tap = j % taps, c0 = (j / taps) * IG_BK;
        const int dx = tap % p.g.kw, dy = (tap / p.g.kw) % p.g.kh, dt = tap / (p.g.kw * p.g.kh);
        const int it = bt + dt, iy = by + dy, ix = bx + dx;
        u32 plane = 0;
        if (ROWS) {
            // bx + pw is the first position of the 8, a multiple of 8; the shift is dx - pw.
            const int shift = dx - (int)p.g.pw, x0 = bx + (int)p.g.pw;
            const bool ok = n_ok && it >= 0 && it < (int)p.g.ti && iy >= 0 && iy < (int)p.g.hi;
            const u16* row = ok ? frame_of(it, plane) + (u32)iy * p.g.wi + (u32)x0 : nullptr;
            const bool side = shift > 0 ? x0 + 8 < (int)p.g.wi : x0 > 0;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const u32 ci = c0 + row0 + (IG_BK / 2) * i;
                uint4 a = make_uint4(0, 0, 0, 0);
                u32 edge = 0;
                if (ok && ci < p.cin) {
                    const u16* src = row + ci * plane;
                    a = *(const uint4*)src;
                    if (shift != 0 && side) edge = shift > 0 ? *(const u32*)(src + 8) : *(const u32*)(src - 2);
                }
                u32* o = &staged[4 * i];
                if (shift == 0) {
                    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w;
                } else if (shift > 0) {
                    o[0] = __byte_perm(a.x, a.y, 0x5432), o[1] = __byte_perm(a.y, a.z, 0x5432);
                    o[2] = __byte_perm(a.z, a.w, 0x5432), o[3] = __byte_perm(a.w, edge, 0x5432);
                } else {
                    o[0] = __byte_perm(edge, a.x, 0x5432), o[1] = __byte_perm(a.x, a.y, 0x5432);
                    o[2] = __byte_perm(a.y, a.z, 0x5432), o[3] = __byte_perm(a.z, a.w, 0x5432);
                }
            }
        } else {
            const bool ok = n_ok && it >= 0 && it < (int)p.g.ti && iy >= 0 && iy < (int)p.g.hi && ix >= 0 && ix < (int)p.g.wi;
            const u16* src = ok ? frame_of(it, plane) + (u32)iy * p.g.wi + (u32)ix : nullptr;
#pragma unroll
            for (int i = 0; i < IG_B_ROWS; ++i) {
                const u32 ci = c0 + row0 + 2 * i;
                staged[i] = ok && ci < p.cin ? src[ci * plane] : 0u;
            }
        }
    };
    auto store_b = [&](int buf) {
        if (ROWS) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                *(uint4*)&bs[buf][(row0 + (IG_BK / 2) * i) * IG_B_STRIDE + col] =
                    make_uint4(staged[4 * i], staged[4 * i + 1], staged[4 * i + 2], staged[4 * i + 3]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < IG_B_ROWS; ++i) bs[buf][(row0 + 2 * i) * IG_B_STRIDE + col] = (u16)staged[i];
        }
    };
    auto load_a = [&](u32 j, int buf) {
        const u32 tap = j % taps, c0 = (j / taps) * IG_BK;
        if ((p.cin & 7) == 0) {
            for (int c = tid; c < BM * IG_BK / 8; c += IG_THREADS) {
                const int r = c / (IG_BK / 8), q = c % (IG_BK / 8);
                const u32 m = m0 + r, ci = c0 + q * 8;
                const bool ok = m < p.cout && ci < p.cin;
                const u16* g = ok ? w + ((u64)m * taps + tap) * p.cin + ci : w;
                cp_async16(smem_addr(&as[buf][r * IG_A_STRIDE + q * 8]), g, ok);
            }
        } else {
            for (int e = tid; e < BM * IG_BK; e += IG_THREADS) {
                const int r = e / IG_BK, c = e % IG_BK;
                const u32 m = m0 + r, ci = c0 + c;
                as[buf][r * IG_A_STRIDE + c] = m < p.cout && ci < p.cin ? w[((u64)m * taps + tap) * p.cin + ci] : (u16)0;
            }
        }
    };

    float acc[MT][4][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][t][e] = 0.0f;

    load_a(0, 0);
    cp_async_commit();
    gather(0);
    store_b(0);
    cp_async_wait<0>();
    __syncthreads();
    for (u32 j = 0; j < tiles; ++j) {
        const int buf = j & 1;
        const bool more = j + 1 < tiles;
        if (more) {
            load_a(j + 1, buf ^ 1);
            cp_async_commit();
            gather(j + 1);
        }
        const u16* at = as[buf];
        const u16* bt_ = bs[buf];
#pragma unroll
        for (int ks = 0; ks < IG_BK / 16; ++ks) {
            u32 a[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                ldmatrix_x4(a[i], smem_addr(at + (warp_m * 16 * MT + i * 16 + (lane & 15)) * IG_A_STRIDE + ks * 16 + (lane >> 4) * 8));
            }
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                u32 b[4];
                const int mi = lane >> 3;
                ldmatrix_x4_trans(b, smem_addr(bt_ + (ks * 16 + (mi & 1) * 8 + (lane & 7)) * IG_B_STRIDE + warp_n * 32 + np * 16 + (mi >> 1) * 8));
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma16816<BF16>(acc[i][2 * np], a[i], b[0], b[1]);
                    mma16816<BF16>(acc[i][2 * np + 1], a[i], b[2], b[3]);
                }
            }
        }
        if (more) {
            store_b(buf ^ 1);
            cp_async_wait<0>();
        }
        __syncthreads();
    }

    // Accumulator layout: for m16 tile i and n8 tile t, elements 2r and 2r + 1 are output
    // channel lane / 4 + 8r, positions 2 (lane % 4) + {0, 1}.
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const u32 m = m0 + warp_m * 16 * MT + i * 16 + (lane >> 2) + 8 * r;
            if (m >= p.cout) continue;
            const float b = p.bias_dtype >= 0 ? load_f32(bias, bias0 + m, p.bias_dtype) : 0.0f;
            u16* row = out + m * p.n;
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const u32 c = n0 + warp_n * 32 + t * 8 + 2 * (lane & 3);
                const float v0 = acc[i][t][2 * r] + b, v1 = acc[i][t][2 * r + 1] + b;
                if (c + 1 < p.n && (p.n & 1) == 0) {
                    *(u32*)(row + c) = pack2<BF16>(v0, v1);
                } else {
                    const int dt = BF16 ? DT_BF16 : DT_F16;
                    if (c < p.n) store_f32(row, c, dt, v0);
                    if (c + 1 < p.n) store_f32(row, c + 1, dt, v1);
                }
            }
        }
    }
}

#define CONV_IGEMM_ONE(NAME, MT, BF16, ROWS)                                                                            \
    extern "C" __global__ void __launch_bounds__(IG_THREADS, 2) NAME(ConvGemm p, ConvParts x, const u16* w, const void* bias, \
                                                                    u16* out) {                                            \
        conv_igemm<MT / 32, BF16, ROWS>(p, x, w, bias, out);                                                               \
    }
#define CONV_IGEMM(MT)                                                      \
    CONV_IGEMM_ONE(conv_igemm_bf16_m##MT, MT, true, false)                  \
    CONV_IGEMM_ONE(conv_igemm_f16_m##MT, MT, false, false)                  \
    CONV_IGEMM_ONE(conv_igemm_rows_bf16_m##MT, MT, true, true)              \
    CONV_IGEMM_ONE(conv_igemm_rows_f16_m##MT, MT, false, true)

CONV_IGEMM(64)
CONV_IGEMM(96)
CONV_IGEMM(128)

#endif

// Sizes conv_pad_input and conv_tma share: the input's channels (and their padded count),
// the input's frames, the front padding, and the padded input's frames, height, width.
struct ConvPad {
    u32 cin, cin_pad, ti, hi, wi, pt, ph, pw, tp, hp, wp;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The input (NCTHW, in parts) as conv_tma reads it: channels-last, every element of the
// padded copy written (zeros in the border and in channels past cin). A block takes 64
// channels x 64 input positions of one padded row, transposed through shared memory: it
// reads 8 positions of a channel per 16-byte load where rows allow (wi a multiple of 8,
// so every row starts 16-byte aligned), else one at a time, and writes 8 channels of a
// position per 16-byte store. The first and last blocks of a row also write the row's
// left and right border; rows in the padding come out all zero.
extern "C" __global__ void __launch_bounds__(256) conv_pad_input(ConvPad p, ConvParts parts, u16* xp) {
    __shared__ __align__(16) u16 tile[64][64 + 8];
    const u32 chunks = p.cin_pad / 64, row = blockIdx.y, ix0 = blockIdx.x * 64;
    const u32 c0 = (blockIdx.z % chunks) * 64, item = blockIdx.z / chunks;
    const int it = (int)(row / p.hp) - (int)p.pt, iy = (int)(row % p.hp) - (int)p.ph;
    const bool row_ok = it >= 0 && it < (int)p.ti && iy >= 0 && iy < (int)p.hi;
    u32 plane = 0;
    const u16* src = row_ok ? part_frame(parts, item, p.cin, p.hi * p.wi, it, plane) + (u32)iy * p.wi : nullptr;
    if (p.wi % 8 == 0) {
        for (int i = threadIdx.x; i < 64 * 8; i += 256) {
            const u32 c = i / 8, x = (i % 8) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (row_ok && c0 + c < p.cin && ix0 + x < p.wi) v = *(const uint4*)(src + (u64)(c0 + c) * plane + ix0 + x);
            const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 8; ++j) tile[x + j][c] = (u16)(w[j / 2] >> (16 * (j & 1)));
        }
    } else {
        for (int i = threadIdx.x; i < 64 * 64; i += 256) {
            const u32 c = i / 64, x = i % 64;
            tile[x][c] = row_ok && c0 + c < p.cin && ix0 + x < p.wi ? src[(u64)(c0 + c) * plane + ix0 + x] : (u16)0;
        }
    }
    __syncthreads();
    u16* out = xp + ((u64)item * p.tp * p.hp + row) * p.wp * p.cin_pad + c0;
    for (int i = threadIdx.x; i < 64 * 8; i += 256) {
        const u32 x = i / 8, c = (i % 8) * 8;
        if (ix0 + x < p.wi) *(uint4*)(out + (u64)(p.pw + ix0 + x) * p.cin_pad + c) = *(const uint4*)&tile[x][c];
    }
    // The border columns: [0, left) by the first block, [wp - right, wp) by the last.
    const u32 left = blockIdx.x == 0 ? p.pw : 0, right = blockIdx.x + 1 == gridDim.x ? p.wp - p.pw - p.wi : 0;
    for (u32 i = threadIdx.x; i < (left + right) * 8; i += 256) {
        const u32 k = i / 8, x = k < left ? k : p.wp - right + (k - left);
        *(uint4*)(out + (u64)x * p.cin_pad + (i % 8) * 8) = make_uint4(0, 0, 0, 0);
    }
}

struct ConvTma {
    u32 cin, chunks, cout, kt, kh, kw;
    u32 wp, fp;  // the padded input's width and frame (hp * wp positions)
    u32 to, ho, wo;
    int bias_dtype;  // -1: no bias
};

// The producer warpgroup of conv_tma and conv_tma_by_positions: its first thread walks K (taps,
// then 64-channel chunks) and copies each stage's weight tile (output channels from m0) and
// input tile (positions from n0, shifted by the tap) by TMA into the ring, a stage of
// STAGE_BYTES holding W_BYTES of weights, then the input.
template <int STAGES, u32 STAGE_BYTES, u32 W_BYTES>
__device__ void conv_tma_produce(const TmaMap& tw, const TmaMap& tx, const ConvTma& p, u32 ring, u32 full, u32 empty, u32 m0, u32 n0, u32 item) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (threadIdx.x != 0) return;
    const u32 tiles = p.kt * p.kh * p.kw * p.chunks;
    for (u32 j = 0; j < tiles; ++j) {
        const u32 st = j % STAGES, tap = j / p.chunks, c0 = (j % p.chunks) * 64;
        const u32 dx = tap % p.kw, dy = (tap / p.kw) % p.kh, dt = tap / (p.kw * p.kh);
        if (j >= STAGES) mbar_wait(empty + 8 * st, ((j / STAGES) & 1) ^ 1);
        mbar_expect_bytes(full + 8 * st, STAGE_BYTES);
        tma_load(ring + st * STAGE_BYTES, tw, tap * p.cin + c0, m0, 0, 0, full + 8 * st);
        tma_load(ring + st * STAGE_BYTES + W_BYTES, tx, c0, n0 + dt * p.fp + dy * p.wp + dx, item, 0, full + 8 * st);
    }
}

// The block conv_tma and conv_tma_by_positions share: a ring of STAGES stages of
// STAGE_BYTES (W_BYTES of weights, then the input) in dynamic shared memory with its full
// and empty barriers, and warpgroup 0 producing into it. Returns false in the producer's
// threads, which are then done, and true in the two consumer warpgroups' (their registers
// raised), with the ring's and the barriers' shared addresses.
template <int STAGES, u32 STAGE_BYTES, u32 W_BYTES>
__device__ __forceinline__ bool conv_tma_block(const TmaMap& tw, const TmaMap& tx, const ConvTma& p, u32 m0, u32 n0, u32& ring, u32& full,
                                               u32& empty) {
    extern __shared__ __align__(16) unsigned char smem_bytes[];
    // full[s]: stage s's tiles landed; empty[s]: both consumers' MMAs on it retired.
    __shared__ __align__(8) u64 barriers[2 * STAGES];
    // Swizzled tiles start on 1024-byte boundaries (the launch reserves 1 KiB for this).
    ring = (smem_addr(smem_bytes) + 1023) & ~1023u;
    full = smem_addr(barriers);
    empty = full + 8 * STAGES;
    if (threadIdx.x == 0) mbar_init_ring(full, empty, STAGES, 256);
    __syncthreads();
    if (threadIdx.x < 128) {
        conv_tma_produce<STAGES, STAGE_BYTES, W_BYTES>(tw, tx, p, ring, full, empty, m0, n0, blockIdx.z);
        return false;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
    return true;
}

// A consumer's walk over K: for each stage, once it has landed, mma(stage address) queues
// its MMAs; a stage is handed back to the producer once the next one's MMAs are queued
// (one group in flight).
template <int STAGES, u32 STAGE_BYTES, class Mma>
__device__ __forceinline__ void conv_tma_walk(const ConvTma& p, u32 ring, u32 full, u32 empty, Mma mma) {
    const u32 tiles = p.kt * p.kh * p.kw * p.chunks;
    for (u32 j = 0; j < tiles; ++j) {
        const u32 st = j % STAGES;
        mbar_wait(full + 8 * st, (j / STAGES) & 1);
        wg_fence();
        mma(ring + st * STAGE_BYTES);
        wg_commit();
        if (j > 0) {
            wg_wait<1>();
            mbar_arrive(empty + 8 * ((j - 1) % STAGES));
        }
    }
    wg_wait<0>();
}

template <int BN, bool BF16>
__device__ void conv_tma(const TmaMap& tw, const TmaMap& tx, const ConvTma& p, const void* __restrict__ bias, u16* __restrict__ out) {
    constexpr int BM = 128;
    constexpr u32 A_BYTES = BM * 128, STAGE_BYTES = A_BYTES + BN * 128;
    constexpr int STAGES = CONV_TMA_RING / STAGE_BYTES;
    const u32 n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, item = blockIdx.z;
    u32 ring, full, empty;
    if (!conv_tma_block<STAGES, STAGE_BYTES, A_BYTES>(tw, tx, p, m0, n0, ring, full, empty)) return;

    const int cg = (threadIdx.x >> 7) - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
    conv_tma_walk<STAGES, STAGE_BYTES>(p, ring, full, empty, [&](u32 stage) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            wgmma_kk<BN, BF16>(acc, wg_desc(stage + cg * 64 * 128 + kk * 32, 16, 1024), wg_desc(stage + A_BYTES + kk * 32, 16, 1024), 1);
    });
    fence_regs(acc);

    // Accumulator layout: elements 4t + 2r + {0, 1} are output channel warp * 16 + lane / 4
    // + 8r of this consumer's 64, positions 8t + 2 (lane % 4) + {0, 1} of the tile.
    const int dtc = BF16 ? DT_BF16 : DT_F16;
    const u32 plane = p.ho * p.wo, volume = p.to * plane;
    out += (u64)item * p.cout * volume;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const u32 m = m0 + cg * 64 + warp * 16 + (lane >> 2) + 8 * r;
        if (m >= p.cout) continue;
        const float bv = p.bias_dtype >= 0 ? load_f32(bias, m, p.bias_dtype) : 0.0f;
        u16* row = out + (u64)m * volume;
#pragma unroll
        for (int t = 0; t < BN / 8; ++t) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const u32 q = n0 + t * 8 + 2 * (lane & 3) + e, ot = q / p.fp, oy = (q % p.fp) / p.wp, ox = q % p.wp;
                if (ot < p.to && oy < p.ho && ox < p.wo) store_f32(row, ot * plane + oy * p.wo + ox, dtc, acc[4 * t + 2 * r + e] + bv);
            }
        }
    }
}

#define CONV_TMA_INSTANCE(NAME, BN, BF16)                                                                                      \
    extern "C" __global__ void __launch_bounds__(384, 1) NAME(const __grid_constant__ TmaMap tw, const __grid_constant__ TmaMap tx, \
                                                              ConvTma p, const void* bias, u16* out) {                         \
        conv_tma<BN, BF16>(tw, tx, p, bias, out);                                                                              \
    }
CONV_TMA_INSTANCE(conv_tma_bf16_n128, 128, true)
CONV_TMA_INSTANCE(conv_tma_f16_n128, 128, false)
CONV_TMA_INSTANCE(conv_tma_bf16_n256, 256, true)
CONV_TMA_INSTANCE(conv_tma_f16_n256, 256, false)

// conv_tma with the GEMM's roles swapped: positions along the MMA's M (64-row slices of the
// input tile, SLICES per consumer) and N output channels along its N (m64nNk16), so a
// channel count that 128-row tiles would pad (3 of the VAE's RGB output, its 96 and 192)
// fills the tile. The weight tile is N rows from m0 = blockIdx.y * N.
template <int N, int SLICES, bool BF16>
__device__ void conv_tma_by_positions(const TmaMap& tw, const TmaMap& tx, const ConvTma& p, const void* __restrict__ bias, u16* __restrict__ out) {
    constexpr int BN = 2 * 64 * SLICES;
    constexpr u32 W_BYTES = N * 128, STAGE_BYTES = W_BYTES + BN * 128;
    static_assert(W_BYTES % 1024 == 0, "swizzled tiles start on 1024-byte boundaries");
    constexpr int STAGES = CONV_TMA_RING / STAGE_BYTES;
    const u32 n0 = blockIdx.x * BN, m0 = blockIdx.y * N, item = blockIdx.z;
    u32 ring, full, empty;
    if (!conv_tma_block<STAGES, STAGE_BYTES, W_BYTES>(tw, tx, p, m0, n0, ring, full, empty)) return;

    const int cg = (threadIdx.x >> 7) - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    float acc[SLICES][N / 2];
#pragma unroll
    for (int s = 0; s < SLICES; ++s) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) acc[s][i] = 0.0f;
    }
    conv_tma_walk<STAGES, STAGE_BYTES>(p, ring, full, empty, [&](u32 w) {
        const u32 x = w + W_BYTES + cg * SLICES * 64 * 128;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
            for (int s = 0; s < SLICES; ++s) wgmma_kk<N, BF16>(acc[s], wg_desc(x + s * 64 * 128 + kk * 32, 16, 1024), wg_desc(w + kk * 32, 16, 1024), 1);
        }
    });
#pragma unroll
    for (int s = 0; s < SLICES; ++s) fence_regs(acc[s]);

    // Accumulator layout (m64nN): elements 4t + 2r + {0, 1} are position warp * 16 + lane / 4
    // + 8r of the slice, output channels 8t + 2 (lane % 4) + {0, 1} of the tile.
    const int dtc = BF16 ? DT_BF16 : DT_F16;
    const u32 plane = p.ho * p.wo, volume = p.to * plane;
    out += (u64)item * p.cout * volume;
#pragma unroll
    for (int s = 0; s < SLICES; ++s) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const u32 q = n0 + (cg * SLICES + s) * 64 + warp * 16 + (lane >> 2) + 8 * r, ot = q / p.fp, oy = (q % p.fp) / p.wp, ox = q % p.wp;
            if (ot >= p.to || oy >= p.ho || ox >= p.wo) continue;
            const u32 at = ot * plane + oy * p.wo + ox;
#pragma unroll
            for (int t = 0; t < N / 8; ++t) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const u32 m = m0 + 8 * t + 2 * (lane & 3) + e;
                    if (m < p.cout) store_f32(out + (u64)m * volume, at, dtc, acc[s][4 * t + 2 * r + e] + (p.bias_dtype >= 0 ? load_f32(bias, m, p.bias_dtype) : 0.0f));
                }
            }
        }
    }
}

#define CONV_TMA_BY_POSITIONS(N, SLICES)                                                                                           \
    extern "C" __global__ void __launch_bounds__(384, 1) conv_tma_bf16_c##N(const __grid_constant__ TmaMap tw, const __grid_constant__ TmaMap tx, \
                                                                          ConvTma p, const void* bias, u16* out) {             \
        conv_tma_by_positions<N, SLICES, true>(tw, tx, p, bias, out);                                                          \
    }                                                                                                                          \
    extern "C" __global__ void __launch_bounds__(384, 1) conv_tma_f16_c##N(const __grid_constant__ TmaMap tw, const __grid_constant__ TmaMap tx, \
                                                                         ConvTma p, const void* bias, u16* out) {              \
        conv_tma_by_positions<N, SLICES, false>(tw, tx, p, bias, out);                                                         \
    }
CONV_TMA_BY_POSITIONS(8, 2)
CONV_TMA_BY_POSITIONS(96, 2)
CONV_TMA_BY_POSITIONS(192, 1)

#endif

struct Im2col {
    u32 c0, cin_g;
    ConvGeometry g;
    u32 p0, np;
    u64 x_offset;
    int dtype;
};

extern "C" __global__ void im2col(Im2col p, const void* x, void* col) {
    const u32 K = p.g.kt * p.g.kh * p.g.kw;
    const u32 total = p.cin_g * K * p.np;
    const u32 plane = p.g.ti * p.g.hi * p.g.wi;
    for (u32 e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
        u32 pp = e % p.np, rk = e / p.np;
        u32 kk = rk % K, ci = rk / K;
        u32 pos = p.p0 + pp;
        u32 ox = pos % p.g.wo, oy = (pos / p.g.wo) % p.g.ho, ot = pos / (p.g.wo * p.g.ho);
        u32 dx = kk % p.g.kw, dy = (kk / p.g.kw) % p.g.kh, dt = kk / (p.g.kw * p.g.kh);
        int it = (int)(ot * p.g.st + dt) - (int)p.g.pt;
        int iy = (int)(oy * p.g.sh + dy) - (int)p.g.ph;
        int ix = (int)(ox * p.g.sw + dx) - (int)p.g.pw;
        float v = 0.0f;
        if (it >= 0 && it < (int)p.g.ti && iy >= 0 && iy < (int)p.g.hi && ix >= 0 && ix < (int)p.g.wi) {
            v = load_f32(x, p.x_offset + (u64)(p.c0 + ci) * plane + ((u32)it * p.g.hi + (u32)iy) * p.g.wi + (u32)ix, p.dtype);
        }
        store_f32(col, e, p.dtype, v);
    }
}
