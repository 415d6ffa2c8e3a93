// gemm.wgsl: the register-tiled GEMM core shared by matmul.wgsl and conv.wgsl.
//
// Computes C[z] = A[z] (M x K) * B[z] (K x N) for one dispatch, where the including family
// file supplies the operands through:
//   fn gemm_dims() -> vec3<u32>                 // M, N, K of this dispatch
//   fn gemm_a_row(z: u32, r: u32) -> vec4<u32>  // what gemm_a needs of row r, any r
//   fn gemm_a(z: u32, row: vec4<u32>, k: u32) -> f32
//                                               // A(r, k) for row = gemm_a_row(z, r),
//                                               // called only with r < M, k < K
//   fn gemm_b(z: u32, k: u32, c: u32) -> f32    // called only with k < K, c < N
//   fn gemm_store(z: u32, r: u32, c: u32, acc: f32)
// The host prepends these constants:
//   TILE (64 or 128): BM = BN = TILE output rows/columns per workgroup
//   TM = TILE / 16: each of the 16 x 16 threads owns a TM x TM block of outputs, as groups
//       of 4 rows / columns at g*64 + t*4 (g < TM/4, t = ty / tx), so its operands are read
//       from shared memory as vec4s that are contiguous across a warp (conflict free)
//   BK: depth of one K step; PAD: 4 to skew the shared arrays against bank conflicts, else 0
//   A_K_FAST / B_K_FAST: whether consecutive k are adjacent in memory for A / B, which picks
//       the thread-to-element mapping of the tile loads so global reads coalesce. Without
//       A_K_FAST a thread loads the same A row at every K step (WG is a multiple of TILE),
//       so its gemm_a_row (a convolution's output position: divisions by runtime sizes,
//       which CPU adapters run one lane at a time) is computed once.
//   RM, ROWS_WG: output rows per invocation of `rows` (its columns are one vec4), and its
//       invocations per workgroup
// Entry points (accumulation in f32 whatever the storage dtype):
//   main: 256 threads per workgroup; grid: x = N tiles, y = M tiles, z = batch. Shared
//         memory: 2 * BK * (TILE + PAD) floats (16 KiB at TILE=128, BK=16, PAD=0: WebGPU's
//         default limit), stored as vec4s.
//   rows: for software adapters (see softmax.wgsl's `rows` for why): one invocation per RM
//         output rows and 4 columns, ROWS_WG invocations per workgroup, no workgroup memory
//         or barriers; the invocations of a workgroup share their columns, so every B read is
//         the same for all of them. Grid: x = N / 4, y = M / (ROWS_WG * RM), z = batch. An
//         invocation runs K * (RM + 5) loop iterations at most (when its short loops are not
//         unrolled); the host keeps that within lavapipe's cap.

const WG: u32 = 256u;
const AS: u32 = TILE + PAD;
const G: u32 = TM / 4u;

var<workgroup> a_tile: array<vec4<f32>, BK * AS / 4u>;
var<workgroup> b_tile: array<vec4<f32>, BK * AS / 4u>;

// Row (or column) of output group g, lane j, for thread coordinate t.
fn owned(g: u32, t: u32, j: u32) -> u32 {
    return g * 64u + t * 4u + j;
}

// (row or column, k) of tile element e: consecutive threads take consecutive k when the
// operand is k-contiguous in memory, so global reads coalesce either way.
fn tile_coord(e: u32, k_fast: bool) -> vec2<u32> {
    if (k_fast) {
        return vec2<u32>(e / BK, e % BK);
    }
    return vec2<u32>(e % TILE, e / TILE);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let dims = gemm_dims();
    let m = dims.x;
    let n = dims.y;
    let k = dims.z;
    let z = wid.z;
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let tx = lid % 16u;
    let ty = lid / 16u;

    var acc: array<array<f32, TM>, TM>;
    for (var i = 0u; i < TM; i++) {
        for (var j = 0u; j < TM; j++) {
            acc[i][j] = 0.0;
        }
    }

    var fixed_row = vec4<u32>();
    if (!A_K_FAST) {
        fixed_row = gemm_a_row(z, row0 + lid % TILE);
    }
    for (var k0 = 0u; k0 < k; k0 += BK) {
        for (var e = lid; e < TILE * BK; e += WG) {
            let ac = tile_coord(e, A_K_FAST);
            var v = 0.0;
            let r = row0 + ac.x;
            if (r < m && k0 + ac.y < k) {
                var row = fixed_row;
                if (A_K_FAST) {
                    row = gemm_a_row(z, r);
                }
                v = gemm_a(z, row, k0 + ac.y);
            }
            let ai = ac.y * AS + ac.x;
            a_tile[ai >> 2u][ai & 3u] = v;

            let bc = tile_coord(e, B_K_FAST);
            var w = 0.0;
            if (col0 + bc.x < n && k0 + bc.y < k) {
                w = gemm_b(z, k0 + bc.y, col0 + bc.x);
            }
            let bi = bc.y * AS + bc.x;
            b_tile[bi >> 2u][bi & 3u] = w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<vec4<f32>, G>;
            var b: array<vec4<f32>, G>;
            for (var g = 0u; g < G; g++) {
                a[g] = a_tile[(kk * AS + owned(g, ty, 0u)) >> 2u];
                b[g] = b_tile[(kk * AS + owned(g, tx, 0u)) >> 2u];
            }
            for (var i = 0u; i < TM; i++) {
                let av = a[i / 4u][i % 4u];
                for (var j = 0u; j < TM; j++) {
                    acc[i][j] = fma(av, b[j / 4u][j % 4u], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < TM; i++) {
        let r = row0 + owned(i / 4u, ty, i % 4u);
        for (var j = 0u; j < TM; j++) {
            let c = col0 + owned(j / 4u, tx, j % 4u);
            if (r < m && c < n) {
                gemm_store(z, r, c, acc[i][j]);
            }
        }
    }
}

@compute @workgroup_size(ROWS_WG)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let dims = gemm_dims();
    let z = wid.z;
    let r0 = (wid.y * ROWS_WG + lid) * RM;
    let c0 = wid.x * 4u;
    if (r0 >= dims.x) {
        return;
    }
    // Rows past M repeat the reads of row M - 1 and are not stored.
    var ctx: array<vec4<u32>, RM>;
    for (var i = 0u; i < RM; i++) {
        ctx[i] = gemm_a_row(z, min(r0 + i, dims.x - 1u));
    }
    var acc: array<vec4<f32>, RM>;
    for (var kk = 0u; kk < dims.z; kk++) {
        var b = vec4<f32>();
        for (var j = 0u; j < 4u; j++) {
            if (c0 + j < dims.y) {
                b[j] = gemm_b(z, kk, c0 + j);
            }
        }
        for (var i = 0u; i < RM; i++) {
            acc[i] = fma(vec4<f32>(gemm_a(z, ctx[i], kk)), b, acc[i]);
        }
    }
    for (var i = 0u; i < RM; i++) {
        for (var j = 0u; j < 4u; j++) {
            if (r0 + i < dims.x && c0 + j < dims.y) {
                gemm_store(z, r0 + i, c0 + j, acc[i][j]);
            }
        }
    }
}
