// hopper.cuh: Hopper (sm_90a) building blocks, prepended to attention.cu and conv.cu:
// wgmma descriptors and instructions, TMA tensor maps and copies, mbarriers and named
// barriers. Compiled only where the device has the sm_90a feature set.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Shared-memory matrix descriptor for wgmma (PTX ISA, "Matrix Descriptor Format"): start
// address, leading and stride byte offsets (in 16-byte units) and the 128-byte swizzle
// mode. For a K-major operand the stride offset steps between 8-row groups (the leading
// offset is unused); for an MN-major one the leading offset steps between 64-element
// column blocks and the stride offset between 8-row groups along K.
__device__ __forceinline__ u64 wg_desc(u32 addr, u32 lead, u32 stride) {
    return (u64)((addr & 0x3FFFF) >> 4) | (u64)((lead >> 4) & 0x3FFF) << 16 | (u64)((stride >> 4) & 0x3FFF) << 32 | 1ull << 62;
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Waits until at most N committed groups of this warpgroup's MMAs are in flight.
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Keeps the compiler from touching accumulators across an asynchronous MMA: every use
// after the wait depends on this.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define WG_ACC128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define WG_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define WG_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_ACC4 "{%0, %1, %2, %3}"
#define WG_ACC48 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}"
#define WG_ACC96 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}"
#define WG_OUT4(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
#define WG_OUT8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_OUT32(d) WG_OUT8(d, 0), WG_OUT8(d, 8), WG_OUT8(d, 16), WG_OUT8(d, 24)
#define WG_OUT64(d) WG_OUT32(d), WG_OUT8(d, 32), WG_OUT8(d, 40), WG_OUT8(d, 48), WG_OUT8(d, 56)
#define WG_OUT48(d) WG_OUT32(d), WG_OUT8(d, 32), WG_OUT8(d, 40)
#define WG_OUT96(d) WG_OUT64(d), WG_OUT8(d, 64), WG_OUT8(d, 72), WG_OUT8(d, 80), WG_OUT8(d, 88)
#define WG_OUT128(d)                                                                                                  \
    WG_OUT64(d), WG_OUT8(d, 64), WG_OUT8(d, 72), WG_OUT8(d, 80), WG_OUT8(d, 88), WG_OUT8(d, 96), WG_OUT8(d, 104), WG_OUT8(d, 112), \
        WG_OUT8(d, 120)

// s (+)= A B^T for a 64 x N x 16 step, both operands K-major in shared memory (attention:
// S = Q K^T; convolution: weights times input positions); `accumulate` 0 overwrites s.
#define WG_KK(SHAPE, ACC, OUT, A, B, SC)                                                          \
    asm volatile("{ .reg .pred p; setp.ne.b32 p, " SC ", 0;\n"                                   \
                 "wgmma.mma_async.sync.aligned." SHAPE " " ACC ", " A ", " B ", p, 1, 1, 0, 0; }" \
                 : OUT(s)                                                                         \
                 : "l"(a), "l"(b), "r"(accumulate))
template <int N, bool BF16>
__device__ __forceinline__ void wgmma_kk(float (&s)[N / 2], u64 a, u64 b, int accumulate) {
    static_assert(N == 8 || N == 64 || N == 96 || N == 128 || N == 192 || N == 256, "no wgmma_kk instruction for this N");
    if constexpr (N == 256 && BF16) {
        WG_KK("m64n256k16.f32.bf16.bf16", WG_ACC128, WG_OUT128, "%128", "%129", "%130");
    } else if constexpr (N == 256) {
        WG_KK("m64n256k16.f32.f16.f16", WG_ACC128, WG_OUT128, "%128", "%129", "%130");
    } else if constexpr (N == 128 && BF16) {
        WG_KK("m64n128k16.f32.bf16.bf16", WG_ACC64, WG_OUT64, "%64", "%65", "%66");
    } else if constexpr (N == 128) {
        WG_KK("m64n128k16.f32.f16.f16", WG_ACC64, WG_OUT64, "%64", "%65", "%66");
    } else if constexpr (N == 192 && BF16) {
        WG_KK("m64n192k16.f32.bf16.bf16", WG_ACC96, WG_OUT96, "%96", "%97", "%98");
    } else if constexpr (N == 192) {
        WG_KK("m64n192k16.f32.f16.f16", WG_ACC96, WG_OUT96, "%96", "%97", "%98");
    } else if constexpr (N == 96 && BF16) {
        WG_KK("m64n96k16.f32.bf16.bf16", WG_ACC48, WG_OUT48, "%48", "%49", "%50");
    } else if constexpr (N == 96) {
        WG_KK("m64n96k16.f32.f16.f16", WG_ACC48, WG_OUT48, "%48", "%49", "%50");
    } else if constexpr (N == 8 && BF16) {
        WG_KK("m64n8k16.f32.bf16.bf16", WG_ACC4, WG_OUT4, "%4", "%5", "%6");
    } else if constexpr (N == 8) {
        WG_KK("m64n8k16.f32.f16.f16", WG_ACC4, WG_OUT4, "%4", "%5", "%6");
    } else if constexpr (BF16) {
        WG_KK("m64n64k16.f32.bf16.bf16", WG_ACC32, WG_OUT32, "%32", "%33", "%34");
    } else {
        WG_KK("m64n64k16.f32.f16.f16", WG_ACC32, WG_OUT32, "%32", "%33", "%34");
    }
}

// A TMA tensor map: the 128 opaque bytes of a CUtensorMap, encoded on the host
// (cuTensorMapEncodeTiled) and passed by value as a __grid_constant__ kernel parameter.
struct alignas(64) TmaMap {
    u64 opaque[16];
};

// mbarriers (shared-memory arrive/wait barriers with a phase bit) and named barriers.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count)); }
// Makes the initialised mbarriers visible to the TMA unit (the async proxy).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// A producer/consumer ring of `stages` stages: full[i] completes on its one producer arrival
// and the bytes of its copies, empty[i] on `consumers` arrivals; barriers 8 bytes apart.
// Made visible to the TMA unit.
__device__ __forceinline__ void mbar_init_ring(u32 full, u32 empty, int stages, u32 consumers) {
    for (int i = 0; i < stages; ++i) {
        mbar_init(full + 8 * i, 1);
        mbar_init(empty + 8 * i, consumers);
    }
    mbar_init_fence();
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("{ .reg .b64 state; mbarrier.arrive.shared::cta.b64 state, [%0]; }" ::"r"(bar) : "memory");
}
// Arrives on `bar` and tells it `bytes` more of copies will land in this phase.
__device__ __forceinline__ void mbar_expect_bytes(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{ .reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void named_sync(u32 id, u32 threads) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ void named_arrive(u32 id, u32 threads) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory"); }

// One TMA copy: the box of `map` at element coordinates (c0 innermost, c1, c2, c3) into
// shared memory at `dst`, its bytes counted on mbarrier `bar` when they land. Elements
// outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load(u32 dst, const TmaMap& map, u32 c0, u32 c1, u32 c2, u32 c3, u32 bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
                 "l"(&map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
                 : "memory");
}

#endif
