// common.cuh: what every kernel file starts with (prepended by the runtime before NVRTC
// compiles it). Storage dtypes and their f32 conversions are written in PTX so that no
// CUDA header has to be found at run time. Dtype codes match the runtime's `dtype_code`.
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// One 16-bit value (the low half of `bits`) of dtype `dt` (f16 or bf16), as f32; and back.
__device__ __forceinline__ float half_to_f32(u32 bits, int dt) { return dt == DT_F16 ? f16_to_f32((u16)bits) : bf16_to_f32((u16)bits); }
__device__ __forceinline__ u32 f32_to_half(float v, int dt) { return dt == DT_F16 ? f32_to_f16(v) : f32_to_bf16(v); }

// The eight 16-bit values of a 16-byte word, in memory order.
__device__ __forceinline__ void unpack8(uint4 w, int dt, float (&v)[8]) {
    const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = half_to_f32(words[j / 2] >> (16 * (j & 1)), dt);
}
// The four 16-bit values of an 8-byte word, in memory order.
__device__ __forceinline__ void unpack4(uint2 w, int dt, float (&v)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = half_to_f32((j < 2 ? w.x : w.y) >> (16 * (j & 1)), dt);
}
// Rotary embedding of four interleaved pairs (x[2j], x[2j+1]) by angles with cosines c[j] and sines s[j].
__device__ __forceinline__ void rotate_pairs4(float (&x)[8], const float (&c)[4], const float (&s)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float x0 = x[2 * j], x1 = x[2 * j + 1];
        x[2 * j] = x0 * c[j] - x1 * s[j];
        x[2 * j + 1] = x0 * s[j] + x1 * c[j];
    }
}
__device__ __forceinline__ uint4 pack8(const float (&v)[8], int dt) {
    u32 words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) words[j] = f32_to_half(v[2 * j], dt) | (f32_to_half(v[2 * j + 1], dt) << 16);
    return make_uint4(words[0], words[1], words[2], words[3]);
}

// Elements i0 .. i0 + 8 of a buffer of dtype `dt`, as f32: one 16-byte load (16-bit dtypes)
// or two (f32). The buffer is 16-byte aligned and i0 a multiple of 8.
__device__ __forceinline__ void load8(const void* p, u64 i0, int dt, float (&v)[8]) {
    if (dt == DT_F32) {
        const float4 a = ((const float4*)p)[i0 / 4], b = ((const float4*)p)[i0 / 4 + 1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
        unpack8(((const uint4*)p)[i0 / 8], dt, v);
    }
}

// Element `i` of a buffer of dtype `dt`, as f32.
__device__ __forceinline__ float load_f32(const void* p, u64 i, int dt) {
    if (dt == DT_F32) return ((const float*)p)[i];
    u16 h = ((const u16*)p)[i];
    return dt == DT_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

// Rounds `v` to dtype `dt` (nearest, ties to even) and stores it as element `i`.
__device__ __forceinline__ void store_f32(void* p, u64 i, int dt, float v) {
    if (dt == DT_F32) {
        ((float*)p)[i] = v;
    } else {
        ((u16*)p)[i] = f32_to_half(v, dt);
    }
}

// Sum over a thread block of up to 1024 threads; every thread gets the total. `scratch`
// holds 32 values; the call ends with a barrier so it may be reused at once.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = lane < warps ? scratch[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    __syncthreads();
    return t;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : NEG_INF;
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    __syncthreads();
    return t;
}
