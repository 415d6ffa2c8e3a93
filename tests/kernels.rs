//! Every WGSL kernel against the CPU reference on fresh random inputs (set SDLITE_TEST_SEED
//! to replay), at odd sizes that do not divide the tiles.
//!
//! Tolerances, as error relative to the largest reference magnitude (see `relative_error`):
//! f32 storage 1e-5; f16 and bf16 storage 1e-2 (inputs are rounded identically for both
//! sides, so the difference is the rounding of intermediates and outputs).
//!
//! Each case runs on four devices: the adapter with its full limits; the same adapter with
//! the other kernel variant (`WgpuOptions::software_kernels`: on lavapipe, the GPU kernels);
//! the adapter with 4 KiB bindings and 16-key attention passes, so every tensor spans many
//! chunks and every splitting path runs; and, in `default_limits_*`, exactly WebGPU's
//! default limits with tensors over 128 MiB. Where a CUDA device is present (the GPU machine; set
//! SDLITE_REQUIRE_CUDA=1 there so its absence fails), every case also runs on the CUDA
//! backend in f32, f16 and bf16.

use sdlite_runtime::spec::{MapOp, MapSpec, UnaryOp, View};
use sdlite_runtime::{ops, Backend, CpuBackend, CudaBackend, DType, Tensor, WgpuBackend};
use sdlite_tests::{
    check, cuda, cuda_hopper_conv, cuda_implicit_gemm, cuda_portable_attention, fresh_seed, gpu, gpu_default_limits, gpu_other_kernels,
    gpu_tiny_chunks, open_cuda, random, TestDevice,
};

const F32_TOL: f32 = 1e-5;
const F16_TOL: f32 = 1e-2;
const BF16_TOL: f32 = 1e-2;

/// The full-limits device in every dtype it supports, then the other kernel variant and the
/// tiny-chunk device in f32.
fn wgpu_devices() -> Vec<(&'static WgpuBackend, DType, f32, String)> {
    let mut v = Vec::new();
    if let Some(g) = gpu() {
        v.push((g, DType::F32, F32_TOL, "f32".into()));
        if g.supports(DType::F16) {
            v.push((g, DType::F16, F16_TOL, "f16".into()));
        } else {
            eprintln!("adapter has no shader-f16: f16 cases not run");
        }
    }
    if let Some(g) = gpu_other_kernels() {
        v.push((g, DType::F32, F32_TOL, format!("f32 {} kernels", g.kernel_variant())));
    }
    if let Some(g) = gpu_tiny_chunks() {
        v.push((g, DType::F32, F32_TOL, "f32 4KiB-chunks".into()));
    }
    v
}

/// The CUDA device (when this machine has one) in f32, f16 and bf16, with every new buffer
/// poisoned with NaN so an unwritten output element fails.
fn cuda_devices() -> Vec<(&'static CudaBackend, DType, f32, &'static str)> {
    let Some(c) = cuda() else { return Vec::new() };
    vec![
        (c, DType::F32, F32_TOL, "cuda f32"),
        (c, DType::F16, F16_TOL, "cuda f16"),
        (c, DType::BF16, BF16_TOL, "cuda bf16"),
    ]
}

/// Runs `cases(device, dtype, tolerance, tag, seed)` on every wgpu and CUDA device.
macro_rules! on_every_device {
    ($cases:ident) => {{
        let seed = fresh_seed();
        eprintln!("seed {seed}");
        for (g, dt, tol, tag) in wgpu_devices() {
            $cases(g, dt, tol, &tag, seed);
        }
        for (g, dt, tol, tag) in cuda_devices() {
            $cases(g, dt, tol, tag, seed);
        }
    }};
}

#[test]
fn matmul_matches_reference() {
    on_every_device!(matmul_cases);
}

fn matmul_cases<G: TestDevice>(g: &G, dt: DType, tol: f32, tag: &str, seed: u64) {
    // (batch, m, k, n) with broadcast or batched weights, all transpose combinations.
    for (i, &(batch, m, k, n)) in [(1, 1, 1, 1), (1, 7, 13, 5), (3, 65, 30, 29), (2, 130, 17, 129), (1, 300, 257, 200)]
        .iter()
        .enumerate()
    {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            if !g.fits(k * n) || (ta && !g.fits(k * m)) {
                continue;
            }
            let s = seed + i as u64;
            let a_shape = if ta { [batch, k, m] } else { [batch, m, k] };
            let b_shape = if tb { [n, k] } else { [k, n] };
            let inputs = [
                random(&a_shape, dt, 1.0, s),
                random(&b_shape, dt, 1.0, s + 1),
                random(&[n], dt, 1.0, s + 2),
            ];
            let name = format!("matmul {tag} b{batch} {m}x{k}x{n} ta={ta} tb={tb}");
            check!(g, name, tol, inputs, [ta as usize, tb as usize], |b, x, p| ops::matmul(
                b,
                &x[0],
                &x[1],
                Some(&x[2]),
                p[0] == 1,
                p[1] == 1
            ));
        }
    }
    let inputs = [random(&[4, 33, 20], dt, 1.0, seed), random(&[4, 20, 19], dt, 1.0, seed + 1)];
    check!(g, format!("matmul {tag} batched weights"), tol, inputs, [], |b, x, p| ops::matmul(
        b, &x[0], &x[1], None, false, false
    ));
    let inputs = [
        random(&[2, 9, 24], dt, 1.0, seed),
        random(&[40, 24], dt, 1.0, seed + 1),
        random(&[40], dt, 1.0, seed + 2),
    ];
    check!(g, format!("linear {tag}"), tol, inputs, [], |b, x, p| ops::linear(
        b,
        &x[0],
        &x[1],
        Some(&x[2])
    ));
    // The feed-forward opening (CUDA: GELU in cuBLASLt's epilogue), with and without bias.
    for with_bias in [true, false] {
        check!(
            g,
            format!("linear + gelu_tanh {tag} bias={with_bias}"),
            tol,
            inputs,
            [with_bias as usize],
            |b, x, p| ops::linear_then(b, &x[0], &x[1], (p[0] == 1).then_some(&x[2]), UnaryOp::GeluTanh)
        );
    }
    // A residual branch's closing projection (CUDA: the residual as cuBLASLt's C, a gate
    // shared by every row folded into the weight; two batch items' gates take the composed
    // path), with and without gate and bias.
    for (n, gated, with_bias) in [(1, true, true), (1, true, false), (1, false, true), (2, true, true)] {
        let inputs = [
            random(&[n, 9, 24], dt, 1.0, seed + 3),
            random(&[40, 24], dt, 1.0, seed + 1),
            random(&[40], dt, 1.0, seed + 2),
            random(&[n, 9, 40], dt, 1.0, seed + 4),
            random(&[n, 1, 40], dt, 1.0, seed + 5),
        ];
        check!(
            g,
            format!("linear + residual {tag} items={n} gate={gated} bias={with_bias}"),
            tol,
            inputs,
            [gated as usize, with_bias as usize],
            |b, x, p| ops::linear_residual(b, &x[3], &x[0], &x[1], (p[1] == 1).then_some(&x[2]), (p[0] == 1).then_some(&x[4]))
        );
    }
}

#[test]
fn conv_matches_reference() {
    on_every_device!(conv_cases);
    for (c, kernel) in [(cuda_implicit_gemm(), "implicit-gemm"), (cuda_hopper_conv(), "hopper")] {
        if let Some(c) = c {
            let seed = fresh_seed();
            conv_cases(c, DType::F16, F16_TOL, &format!("cuda f16 {kernel}"), seed);
            conv_cases(c, DType::BF16, BF16_TOL, &format!("cuda bf16 {kernel}"), seed);
        }
    }
}

fn conv_cases<G: TestDevice>(g: &G, dt: DType, tol: f32, tag: &str, seed: u64) {
    // (n, c_in, h, w, c_out, k, stride, padding, groups)
    for (i, &(n, ci, h, w, co, k, st, pad, gr)) in [
        (1, 3, 9, 11, 5, 3, 1, 1, 1),
        (2, 4, 17, 13, 6, 3, 2, 1, 2),
        (1, 8, 10, 10, 8, 1, 1, 0, 1),
        (1, 5, 12, 7, 3, 4, 2, 0, 1),
        (1, 6, 9, 9, 10, 3, 1, 1, 1),
        // Channel counts the 16-bit CUDA convolutions load as 16-byte rows: a tile row of
        // channels half used, output channels short of a tile, an odd number of positions.
        (1, 16, 19, 23, 40, 3, 1, 1, 1),
        // Groups of 32 input and 48 output channels, stride 2.
        (2, 64, 12, 20, 96, 3, 2, 1, 2),
        // A width of two 8-position runs: both row ends of CUDA's row gather.
        (1, 32, 9, 16, 64, 3, 1, 1, 1),
        // Two tiles of output channels, the second mostly empty, and input channels in two
        // chunks of 64, the second half empty (CUDA's Hopper kernel).
        (1, 96, 12, 20, 160, 3, 1, 1, 1),
        // Enough positions for its 256-position tiles, two batch items.
        (2, 32, 40, 50, 136, 3, 1, 1, 1),
        // Rows longer than its padded copy's 64-position blocks, by 16-byte loads (width a
        // multiple of 8) and element by element.
        (1, 16, 6, 72, 24, 3, 1, 1, 1),
        (1, 8, 5, 70, 16, 3, 1, 1, 1),
        // Its 128-channel tiles, by 256 positions and (two channel tiles) by 128; the cases
        // above with other channel counts take its by-positions tiles of 96 or 192.
        (1, 32, 40, 50, 128, 3, 1, 1, 1),
        (1, 16, 9, 9, 256, 3, 1, 1, 1),
        // Its 8-channel tile: two batch items, and exactly 8.
        (2, 16, 19, 23, 3, 3, 1, 1, 1),
        (1, 64, 30, 40, 8, 3, 1, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        if !g.fits(co * ci / gr * k * k) {
            continue;
        }
        let s = seed + 10 * i as u64;
        let inputs = [
            random(&[n, ci, h, w], dt, 1.0, s),
            random(&[co, ci / gr, k, k], dt, 0.5, s + 1),
            random(&[co], dt, 1.0, s + 2),
        ];
        let name = format!("conv2d {tag} {n}x{ci}x{h}x{w} -> {co} k{k} s{st} p{pad} g{gr}");
        check!(g, name, tol, inputs, [st, pad, gr], |b, x, p| ops::conv2d(
            b,
            &x[0],
            &x[1],
            Some(&x[2]),
            p[0],
            p[1],
            p[2]
        ));
    }
    // Causal 3D convolution as in the Wan VAE (time padded in front only).
    let inputs = [
        random(&[1, 4, 5, 7, 6], dt, 1.0, seed),
        random(&[3, 4, 3, 3, 3], dt, 0.5, seed + 1),
        random(&[3], dt, 1.0, seed + 2),
    ];
    check!(g, format!("causal_conv3d {tag}"), tol, inputs, [], |b, x, p| ops::causal_conv3d(
        b,
        &x[0],
        &x[1],
        Some(&x[2]),
        [1, 1, 1],
        [1, 1, 1]
    ));
    // Wan VAE layers in small: 48 channels in (a second, partial channel tile) to 96 out,
    // and the output layer, 96 channels to 3; and the real VAE's 384 channels in, deeper
    // (384 x 27) than one pass of the software adapters' GEMM (`rows`), which then
    // accumulates over passes.
    for (c_in, c_out, s) in [(48, 96, seed + 5), (96, 3, seed + 14), (384, 5, seed + 40)] {
        let inputs = [
            random(&[1, c_in, 3, 24, 40], dt, 1.0, s),
            random(&[c_out, c_in, 3, 3, 3], dt, 0.1, s + 1),
            random(&[c_out], dt, 1.0, s + 2),
        ];
        if g.fits(c_out * c_in * 27) {
            let name = format!("causal_conv3d {tag} {c_in} -> {c_out} channels");
            check!(g, name, tol, inputs, [], |b, x, p| {
                ops::causal_conv3d(b, &x[0], &x[1], Some(&x[2]), [1, 1, 1], [1, 1, 1])
            });
        }
    }
    // The same layer continuing a cached sequence: its input frames in two parts, read where
    // they lie (two batch items, so each part's own batch stride counts; the second output
    // frame reads both parts).
    let inputs = [
        random(&[2, 48, 2, 24, 40], dt, 1.0, seed + 10),
        random(&[2, 48, 1, 24, 40], dt, 1.0, seed + 11),
        random(&[96, 48, 3, 3, 3], dt, 0.1, seed + 12),
        random(&[96], dt, 1.0, seed + 13),
    ];
    if g.fits(96 * 48 * 27) {
        check!(
            g,
            format!("conv3d_frames {tag} 2 + 1 frames, 48 -> 96 channels"),
            tol,
            inputs,
            [],
            |b, x, p| ops::conv3d_frames(b, &[&x[0], &x[1]], &x[2], Some(&x[3]), [1, 1, 1], [1, 1, 1], [0, 1, 1], 1)
        );
    }
    // Single frames, width 11 (CUDA's element gather): three parts, and five (more than
    // CUDA reads in place, so joined first).
    let frames: Vec<_> = (0..5).map(|i| random(&[1, 16, 1, 9, 11], dt, 1.0, seed + 20 + i)).collect();
    for parts in [3, 5].into_iter().filter(|_| g.fits(24 * 16 * 27)) {
        let mut inputs = frames[..parts].to_vec();
        inputs.push(random(&[24, 16, 3, 3, 3], dt, 0.2, seed + 30));
        check!(
            g,
            format!("conv3d_frames {tag} {parts} single frames"),
            tol,
            inputs,
            [parts],
            |b, x, p| {
                ops::conv3d_frames(
                    b,
                    &x[..p[0]].iter().collect::<Vec<_>>(),
                    &x[p[0]],
                    None,
                    [1, 1, 1],
                    [2, 1, 1],
                    [0, 1, 1],
                    1,
                )
            }
        );
    }
    // The Wan VAE's time convolution (3x1x1), rows of 16.
    let inputs = [
        random(&[1, 16, 4, 3, 16], dt, 1.0, seed + 8),
        random(&[32, 16, 3, 1, 1], dt, 0.3, seed + 9),
    ];
    if g.fits(32 * 16 * 3) {
        check!(g, format!("causal_conv3d {tag} time only"), tol, inputs, [], |b, x, p| {
            ops::causal_conv3d(b, &x[0], &x[1], None, [1, 1, 1], [1, 0, 0])
        });
    }
    let inputs = [
        random(&[2, 3, 4, 6, 6], dt, 1.0, seed + 3),
        random(&[5, 3, 3, 1, 1], dt, 0.5, seed + 4),
    ];
    check!(g, format!("causal_conv3d {tag} time stride 2"), tol, inputs, [], |b, x, p| {
        ops::causal_conv3d(b, &x[0], &x[1], None, [2, 1, 1], [1, 0, 0])
    });
}

#[test]
fn norms_match_reference() {
    on_every_device!(norm_cases);
}

fn norm_cases<G: TestDevice>(g: &G, dt: DType, tol: f32, tag: &str, seed: u64) {
    let inputs = [
        random(&[2, 12, 5, 7], dt, 2.0, seed),
        random(&[12], dt, 1.0, seed + 1),
        random(&[12], dt, 1.0, seed + 2),
    ];
    check!(g, format!("group_norm {tag}"), tol, inputs, [], |b, x, p| ops::group_norm(
        b,
        &x[0],
        4,
        Some(&x[1]),
        Some(&x[2]),
        1e-6
    ));
    let inputs = [
        random(&[3, 17, 300], dt, 3.0, seed + 3),
        random(&[300], dt, 1.0, seed + 4),
        random(&[300], dt, 1.0, seed + 5),
    ];
    check!(g, format!("layer_norm {tag}"), tol, inputs, [], |b, x, p| ops::layer_norm(
        b,
        &x[0],
        Some(&x[1]),
        Some(&x[2]),
        1e-5
    ));
    check!(
        g,
        format!("layer_norm {tag} no affine"),
        tol,
        inputs,
        [],
        |b, x, p| ops::layer_norm(b, &x[0], None, None, 1e-6)
    );
    check!(g, format!("rms_norm {tag}"), tol, inputs, [], |b, x, p| ops::rms_norm(
        b,
        &x[0],
        Some(&x[1]),
        1e-6
    ));
    // Rows of 40,000 elements take the two-stage path (block moments, then apply).
    if g.fits(40_000) {
        let inputs = [
            random(&[2, 8, 100, 100], dt, 2.0, seed + 7),
            random(&[8], dt, 1.0, seed + 8),
            random(&[8], dt, 1.0, seed + 9),
        ];
        check!(
            g,
            format!("group_norm long rows {tag}"),
            tol,
            inputs,
            [],
            |b, x, p| ops::group_norm(b, &x[0], 2, Some(&x[1]), Some(&x[2]), 1e-6)
        );
        check!(g, format!("rms_norm long rows {tag}"), tol, inputs, [], |b, x, p| ops::rms_norm(
            b,
            &x[0].reshape(&[4, 40_000])?,
            None,
            1e-6
        ));
    }
    let inputs = [random(&[5, 1000], dt, 4.0, seed + 6)];
    check!(g, format!("softmax {tag}"), tol, inputs, [], |b, x, p| ops::softmax(b, &x[0]));
    // Rows around the longest that the software adapters' one-invocation-per-row kernels
    // take (20000 columns: three passes within the loop budget) and just over what three
    // passes can ever run under lavapipe's cap of 65535 loop iterations an invocation
    // (21846): a budget over the cap leaves rows unwritten.
    for (cols, s) in [(20_000, seed + 13), (21_846, seed + 14)] {
        if g.fits(cols) {
            let inputs = [random(&[3, cols], dt, 4.0, s)];
            check!(g, format!("softmax {cols} columns {tag}"), tol, inputs, [], |b, x, p| ops::softmax(
                b, &x[0]
            ));
            check!(g, format!("layer_norm {cols} columns {tag}"), tol, inputs, [], |b, x, p| {
                ops::layer_norm(b, &x[0], None, None, 1e-5)
            });
        }
    }
    // Fused forms: group norm + SiLU, layer norm + adaLN modulation per batch item.
    let inputs = [
        random(&[2, 12, 5, 7], dt, 2.0, seed + 10),
        random(&[12], dt, 1.0, seed + 11),
        random(&[12], dt, 1.0, seed + 12),
    ];
    check!(
        g,
        format!("group_norm_silu {tag}"),
        tol,
        inputs,
        [],
        |b, x, p| ops::group_norm_silu(b, &x[0], 3, Some(&x[1]), Some(&x[2]), 1e-6)
    );
    let inputs = [
        random(&[2, 33, 96], dt, 3.0, seed + 13),
        random(&[2, 1, 96], dt, 0.5, seed + 14),
        random(&[2, 1, 96], dt, 1.0, seed + 15),
    ];
    check!(g, format!("layer_norm_modulate {tag}"), tol, inputs, [], |b, x, p| {
        ops::layer_norm_modulate(b, &x[0], &x[1], &x[2], 1e-6)
    });
    // Rows of multiples of 256 (CUDA keeps 16-bit ones in registers, read as 16-byte words).
    let inputs = [
        random(&[2, 5, 512], dt, 3.0, seed + 20),
        random(&[2, 1, 512], dt, 0.5, seed + 21),
        random(&[2, 1, 512], dt, 1.0, seed + 22),
    ];
    check!(g, format!("layer_norm_modulate {tag} 512 wide"), tol, inputs, [], |b, x, p| {
        ops::layer_norm_modulate(b, &x[0], &x[1], &x[2], 1e-6)
    });
    for gamma_dt in [dt, DType::F32] {
        let inputs = [random(&[3, 7, 256], dt, 2.0, seed + 23), random(&[256], gamma_dt, 1.0, seed + 24)];
        check!(
            g,
            format!("rms_norm {tag} 256 wide, gamma {gamma_dt:?}"),
            tol,
            inputs,
            [],
            |b, x, p| ops::rms_norm(b, &x[0], Some(&x[1]), 1e-6)
        );
    }
    // Wan's q/k norm: RMS over all heads, then each head's rotary embedding. CUDA fuses the
    // two for 16-bit rows of a multiple of 256 with tables of their dtype (the first two
    // cases), and composes them otherwise.
    let cases = [(4, 64, dt), (12, 128, dt), (4, 64, DType::F32), (3, 24, dt)];
    for (i, (heads, head_dim, table_dt)) in cases.into_iter().enumerate() {
        let (cos, sin) = ops::rope3d_tables(2, 3, 5, head_dim, 10000.0).expect("tables");
        let i = i as u64;
        let inputs = [
            random(&[2, 30, heads * head_dim], dt, 2.0, seed + 30 + 2 * i),
            random(&[heads * head_dim], dt, 1.0, seed + 31 + 2 * i),
            cos.to_dtype(table_dt),
            sin.to_dtype(table_dt),
        ];
        let name = format!("rms_norm_rope {tag} {heads}x{head_dim} tables {table_dt:?}");
        check!(g, name, tol, inputs, [], |b, x, p| ops::rms_norm_rope(
            b,
            &x[0],
            Some(&x[1]),
            1e-6,
            &x[2],
            &x[3]
        ));
    }
    // The Wan VAE's norm over the channels of [n, c, t, h, w] (rows strided by t*h*w).
    // Positions in runs of 8 take the CUDA backend's 16-byte path: a partial last block, and
    // two batch items with a channel count that leaves the warps uneven shares.
    for (i, shape) in [[2, 24, 3, 5, 7], [1, 96, 2, 9, 16], [2, 20, 1, 8, 40]].iter().enumerate() {
        let inputs = [
            random(shape, dt, 2.0, seed + 16 + 2 * i as u64),
            random(&[shape[1]], dt, 1.0, seed + 17 + 2 * i as u64),
        ];
        check!(g, format!("channel_rms_norm_silu {tag} {shape:?}"), tol, inputs, [], |b, x, p| {
            ops::channel_rms_norm_silu(b, &x[0], &x[1], 1e-12)
        });
    }
}

#[test]
fn attention_matches_reference() {
    on_every_device!(attention_cases);
}

fn attention_cases<G: TestDevice>(g: &G, dt: DType, tol: f32, tag: &str, seed: u64) {
    // (batch, heads, q_len, kv_len, head_dim): SD's 40/80/160, CLIP/UMT5's 64, Wan's 128,
    // and the Wan VAE's single 384-wide head (no tile fits: the unfused path).
    for (i, &(bn, h, sq, skv, d)) in [
        (1, 1, 1, 1, 8),
        (2, 3, 37, 45, 40),
        (1, 2, 70, 19, 64),
        (1, 1, 33, 8, 80),
        (1, 2, 21, 6, 128),
        (1, 1, 9, 5, 160),
        (2, 1, 29, 31, 384),
    ]
    .iter()
    .enumerate()
    {
        if !g.fits(skv * d) || !g.fits(32 * d) {
            continue;
        }
        let s = seed + 10 * i as u64;
        let scale = 1.0 / (d as f32).sqrt();
        // Both layouts: heads-first [b, h, s, d] and tokens-first [b, s, h, d].
        for (tokens_first, seeds, label) in [(false, s, ""), (true, s + 3, "tokens-first ")] {
            let shape = |len: usize| if tokens_first { [bn, len, h, d] } else { [bn, h, len, d] };
            let inputs = [
                random(&shape(sq), dt, 1.0, seeds),
                random(&shape(skv), dt, 1.0, seeds + 1),
                random(&shape(skv), dt, 1.0, seeds + 2),
            ];
            check!(
                g,
                format!("attention {label}{tag} b{bn} h{h} q{sq} kv{skv} d{d}"),
                tol,
                inputs,
                [scale.to_bits() as usize, tokens_first as usize],
                |b, x, p| {
                    let scale = f32::from_bits(p[0] as u32);
                    if p[1] == 1 {
                        ops::attention_tokens_first(b, &x[0], &x[1], &x[2], scale)
                    } else {
                        ops::attention(b, &x[0], &x[1], &x[2], scale)
                    }
                }
            );
        }
    }
}

/// The reference reads tokens-first tensors as the heads-first attention of their permuted
/// copies, bit for bit.
#[test]
fn attention_tokens_first_is_permuted_attention() {
    let seed = fresh_seed();
    let cpu = CpuBackend;
    let swap = |t: &Tensor<CpuBackend>| ops::permute(&cpu, t, &[0, 2, 1, 3]).unwrap();
    let t = |shape: &[usize], s: u64| cpu.upload(&random(shape, DType::F32, 1.0, s)).unwrap();
    let (q, k, v) = (t(&[2, 7, 3, 16], seed), t(&[2, 5, 3, 16], seed + 1), t(&[2, 5, 3, 16], seed + 2));
    let direct = ops::attention_tokens_first(&cpu, &q, &k, &v, 0.25).unwrap();
    let permuted = swap(&ops::attention(&cpu, &swap(&q), &swap(&k), &swap(&v), 0.25).unwrap());
    let read = |x: &Tensor<CpuBackend>| pollster::block_on(cpu.read(x)).unwrap().to_f32();
    assert_eq!(read(&direct), read(&permuted), "seed {seed}");
}

#[test]
fn attention_long_sequence_matches_reference() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // Sequence over 4096: the flash kernel's online softmax runs over 100+ key tiles, the
    // software adapters' row kernel over 1024-key passes merged by attention_combine.
    let (s, d) = (4133, 64);
    let inputs = [
        random(&[1, 1, s, d], DType::F32, 1.0, seed),
        random(&[1, 1, s, d], DType::F32, 1.0, seed + 1),
        random(&[1, 1, s, d], DType::F32, 1.0, seed + 2),
    ];
    for g in [gpu(), gpu_other_kernels()].into_iter().flatten() {
        let name = format!("attention f32 seq 4133, {} kernels", g.kernel_variant());
        check!(g, name, F32_TOL, inputs.clone(), [], |b, x, p| ops::attention(
            b, &x[0], &x[1], &x[2], 0.125
        ));
    }
}

#[test]
fn elementwise_matches_reference() {
    on_every_device!(elementwise_cases);
}

fn elementwise_cases<G: TestDevice>(g: &G, dt: DType, tol: f32, tag: &str, seed: u64) {
    // An innermost size of 16 lets CUDA take its 8-wide path on 16-bit operands; 9 does not.
    for w in [9, 16] {
        elementwise_width_cases(g, dt, tol, &format!("{tag} w{w}"), seed, w);
    }
    // Rotary embedding with Wan's 3D tables: 2 frames x 3 x 4 tokens, 2 heads of 24.
    let (cos, sin) = ops::rope3d_tables(2, 3, 4, 24, 10000.0).expect("tables");
    let q = random(&[2, 24, 2, 24], dt, 1.0, seed + 5);
    check!(g, format!("rope {tag}"), tol, [q, cos, sin], [], |b, x, p| ops::rope(
        b, &x[0], &x[1], &x[2]
    ));
}

fn elementwise_width_cases<G: TestDevice>(g: &G, dt: DType, tol: f32, tag: &str, seed: u64, w: usize) {
    let x = random(&[3, 5, 7, w], dt, 6.0, seed);
    for (u, name) in [
        (UnaryOp::Silu, "silu"),
        (UnaryOp::GeluTanh, "gelu_tanh"),
        (UnaryOp::GeluErf, "gelu_erf"),
        (UnaryOp::Tanh, "tanh"),
        (UnaryOp::Sigmoid, "sigmoid"),
    ] {
        check!(
            g,
            format!("{name} {tag}"),
            tol,
            std::slice::from_ref(&x),
            [u as usize],
            |b, x, p| ops::unary(
                b,
                &x[0],
                [UnaryOp::Silu, UnaryOp::GeluTanh, UnaryOp::GeluErf, UnaryOp::Tanh, UnaryOp::Sigmoid][p[0]]
            )
        );
    }
    check!(g, format!("scale {tag}"), tol, std::slice::from_ref(&x), [], |b, x, p| ops::scale(
        b, &x[0], -0.75, 0.5
    ));
    check!(g, format!("clamp {tag}"), tol, std::slice::from_ref(&x), [], |b, x, p| ops::clamp(
        b, &x[0], -1.5, 2.0
    ));
    let y = random(&[5, 1, w], dt, 1.0, seed + 1);
    check!(g, format!("add broadcast {tag}"), tol, [x.clone(), y.clone()], [], |b, x, p| {
        ops::add(b, &x[0], &x[1])
    });
    check!(
        g,
        format!("add_scaled broadcast first {tag}"),
        tol,
        [y.clone(), x.clone()],
        [],
        |b, x, p| ops::add_scaled(b, &x[0], &x[1], 0.3, -1.7)
    );
    check!(g, format!("mul broadcast {tag}"), tol, [x.clone(), y.clone()], [], |b, x, p| {
        ops::mul(b, &x[0], &x[1])
    });
    let (sc, sh) = (random(&[3, 1, 1, w], dt, 1.0, seed + 2), random(&[3, 1, 1, w], dt, 1.0, seed + 3));
    check!(g, format!("modulate {tag}"), tol, [x.clone(), sc.clone(), sh], [], |b, x, p| {
        ops::modulate(b, &x[0], &x[1], &x[2])
    });
    check!(g, format!("gated_add {tag}"), tol, [x.clone(), x.clone(), sc], [], |b, x, p| {
        ops::gated_add(b, &x[0], &x[1], &x[2])
    });
    check!(g, format!("permute {tag}"), tol, std::slice::from_ref(&x), [], |b, x, p| {
        ops::permute(b, &x[0], &[2, 0, 3, 1])
    });
    check!(g, format!("permute heads {tag}"), tol, std::slice::from_ref(&x), [], |b, x, p| {
        ops::permute(b, &x[0], &[0, 2, 1, 3])
    });
    check!(g, format!("slice {tag}"), tol, std::slice::from_ref(&x), [], |b, x, p| ops::slice(
        b, &x[0], 2, 2, 4
    ));
    // Channels-first to channels-last and back, as the Wan VAE's channel norms permute:
    // sizes off the 32-element tiles of CUDA's transpose.
    let video = random(&[2, 40, 3, 7, 11], dt, 1.0, seed + 4);
    check!(
        g,
        format!("permute channels last {tag}"),
        tol,
        std::slice::from_ref(&video),
        [],
        |b, x, p| ops::permute(b, &x[0], &[0, 2, 3, 4, 1])
    );
    check!(g, format!("permute channels first {tag}"), tol, [video], [], |b, x, p| {
        ops::permute(b, &x[0].reshape(&[2, 3, 7, 11, 40])?, &[0, 4, 1, 2, 3])
    });
    let z = random(&[3, 5, 4, w], dt, 1.0, seed + 4);
    check!(g, format!("concat {tag}"), tol, [x.clone(), z], [], |b, x, p| ops::concat(
        b,
        &[&x[0], &x[1], &x[0]],
        2
    ));
    check!(
        g,
        format!("upsample_nearest {tag}"),
        tol,
        std::slice::from_ref(&x),
        [],
        |b, x, p| ops::upsample_nearest(b, &x[0], 2)
    );
    // Round trip through the other float dtype: both sides round identically.
    let other = if dt == DType::F32 && g.supports(DType::F16) {
        DType::F16
    } else {
        DType::F32
    };
    check!(
        g,
        format!("cast {tag} via {other:?}"),
        tol,
        std::slice::from_ref(&x),
        [(other == DType::F16) as usize],
        |b, x, p| {
            let mid = ops::cast(b, &x[0], if p[0] == 1 { DType::F16 } else { DType::F32 })?;
            ops::cast(b, &mid, x[0].dtype())
        }
    );
}

/// WebGPU's default limits, every kernel on tensors over 128 MiB (the size at which browser
/// ports fail with "binding size larger than the maximum").
#[test]
fn default_limits_tensors_over_128_mib() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let Some(g) = gpu_default_limits() else { return };
    assert_eq!(g.limits().max_storage_buffer_binding_size, 128 << 20);
    assert_eq!(g.limits().max_buffer_size, 256 << 20);
    let f = DType::F32;
    // 2.2M x 16 f32 = 141 MB in and out.
    let tall = random(&[2_200_000, 16], f, 1.0, seed);
    let mib = |t: &sdlite_runtime::HostTensor| (t.shape.iter().product::<usize>() * 4) >> 20;
    eprintln!("large operands: {} MiB", mib(&tall));
    check!(
        g,
        "big matmul",
        F32_TOL,
        [tall.clone(), random(&[16, 16], f, 1.0, seed + 1), random(&[16], f, 1.0, seed + 2)],
        [],
        |b, x, p| ops::matmul(b, &x[0], &x[1], Some(&x[2]), false, false)
    );
    check!(g, "big layer_norm", F32_TOL, std::slice::from_ref(&tall), [], |b, x, p| {
        ops::layer_norm(b, &x[0], None, None, 1e-5)
    });
    check!(g, "big softmax", F32_TOL, std::slice::from_ref(&tall), [], |b, x, p| ops::softmax(
        b, &x[0]
    ));
    check!(g, "big silu", F32_TOL, std::slice::from_ref(&tall), [], |b, x, p| ops::silu(
        b, &x[0]
    ));
    check!(
        g,
        "big add broadcast",
        F32_TOL,
        [tall.clone(), random(&[16], f, 1.0, seed + 3)],
        [],
        |b, x, p| ops::add(b, &x[0], &x[1])
    );
    check!(g, "big permute", F32_TOL, std::slice::from_ref(&tall), [], |b, x, p| ops::permute(
        b,
        &x[0],
        &[1, 0]
    ));
    check!(g, "big concat", F32_TOL, std::slice::from_ref(&tall), [], |b, x, p| ops::concat(
        b,
        &[&x[0], &x[0]],
        1
    ));
    let tokens = random(&[1, 34_375, 16, 64], f, 1.0, seed + 4); // 141 MB, [b, s, h, d]
    check!(
        g,
        "big modulate",
        F32_TOL,
        [
            tokens.clone(),
            random(&[1, 1, 16, 64], f, 1.0, seed + 5),
            random(&[1, 1, 16, 64], f, 1.0, seed + 6)
        ],
        [],
        |b, x, p| ops::modulate(b, &x[0], &x[1], &x[2])
    );
    let (cos, sin) = ops::rope3d_tables(11, 25, 125, 64, 10000.0).expect("tables");
    check!(g, "big rope", F32_TOL, [tokens, cos, sin], [], |b, x, p| ops::rope(
        b, &x[0], &x[1], &x[2]
    ));
    // 36 channels of 1000 x 1000 = 144 MB: conv in, group norm, upsample out, conv out.
    let image = random(&[1, 36, 1000, 1000], f, 1.0, seed + 7);
    check!(
        g,
        "big conv2d input",
        F32_TOL,
        [
            image.clone(),
            random(&[2, 36, 3, 3], f, 0.2, seed + 8),
            random(&[2], f, 1.0, seed + 9)
        ],
        [],
        |b, x, p| ops::conv2d(b, &x[0], &x[1], Some(&x[2]), 1, 1, 1)
    );
    check!(
        g,
        "big group_norm",
        F32_TOL,
        [image.clone(), random(&[36], f, 1.0, seed + 10), random(&[36], f, 1.0, seed + 11)],
        [],
        |b, x, p| ops::group_norm(b, &x[0], 4, Some(&x[1]), Some(&x[2]), 1e-6)
    );
    let small = random(&[1, 2, 1000, 1000], f, 1.0, seed + 12);
    check!(
        g,
        "big conv2d output",
        F32_TOL,
        [small.clone(), random(&[36, 2, 1, 1], f, 1.0, seed + 13)],
        [],
        |b, x, p| ops::conv2d(b, &x[0], &x[1], None, 1, 0, 1)
    );
    check!(
        g,
        "big upsample",
        F32_TOL,
        [random(&[1, 9, 1000, 1000], f, 1.0, seed + 14)],
        [],
        |b, x, p| ops::upsample_nearest(b, &x[0], 2)
    );
    // 16,400 heads x 32 tokens x 64 = 134.3 MB per operand; two 16-key passes, whose
    // merged scratch (277 MB) also spans chunks.
    let heads = |s| random(&[16_400, 1, 32, 64], f, 1.0, s);
    check!(
        g,
        "big attention",
        F32_TOL,
        [heads(seed + 15), heads(seed + 16), heads(seed + 17)],
        [],
        |b, x, p| ops::attention(b, &x[0], &x[1], &x[2], 0.125)
    );
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let cpu = CpuBackend;
    let t = |shape: &[usize]| cpu.upload(&random(shape, DType::F32, 1.0, 1)).unwrap();
    let err = ops::linear(&cpu, &t(&[2, 3]), &t(&[4, 5]), None).unwrap_err().to_string();
    assert!(err.contains("linear") && err.contains("in-features"), "{err}");
    let err = ops::conv2d(&cpu, &t(&[1, 3, 8, 8]), &t(&[4, 2, 3, 3]), None, 1, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("conv") && err.contains("input channels"), "{err}");
    let err = ops::attention(&cpu, &t(&[1, 2, 3, 4]), &t(&[1, 2, 5, 8]), &t(&[1, 2, 5, 8]), 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("attention"), "{err}");
    let err = ops::attention(&cpu, &t(&[1, 2, 3, 4]), &t(&[1, 2, 0, 4]), &t(&[1, 2, 0, 4]), 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no keys"), "{err}");
    let err = ops::add(&cpu, &t(&[2, 3]), &t(&[4])).unwrap_err().to_string();
    assert!(err.contains("broadcast"), "{err}");
    assert!(ops::permute(&cpu, &t(&[2, 3]), &[0, 0]).is_err());
    assert!(ops::slice(&cpu, &t(&[2, 3]), 1, 2, 2).is_err());
    assert!(t(&[2, 3]).reshape(&[7]).is_err());
}

#[test]
fn timestep_embedding_matches_formula() {
    // diffusers' get_timestep_embedding(t, 8, flip_sin_to_cos=True, shift=0): frequencies
    // 10000^(-i/4), cos half first.
    let cpu = CpuBackend;
    let e = ops::timestep_embedding(&cpu, &[0.0, 500.0], 8, true, 0.0, 10000.0, DType::F32).unwrap();
    let v = pollster::block_on(cpu.read(&e)).unwrap().to_f32();
    assert_eq!(&v[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    for i in 0..4 {
        let arg = 500.0f64 * 10000f64.powf(-(i as f64) / 4.0);
        assert!((v[8 + i] as f64 - arg.cos()).abs() < 1e-4, "cos {i}: {} vs {}", v[8 + i], arg.cos());
        assert!(
            (v[12 + i] as f64 - arg.sin()).abs() < 1e-4,
            "sin {i}: {} vs {}",
            v[12 + i],
            arg.sin()
        );
    }
}

/// Wan's 3D rotary tables: token (f, y, x) holds, per head-dimension part (time, height,
/// width), the angles `pos * theta^(-2i/part)` of its position on that axis.
#[test]
fn rope3d_tables_match_formula() {
    let (frames, height, width, head_dim) = (3, 4, 5, 28);
    let (cos, sin) = ops::rope3d_tables(frames, height, width, head_dim, 10000.0).unwrap();
    let (cos, sin) = (cos.to_f32(), sin.to_f32());
    let parts = [12, 8, 8];
    let mut k = 0;
    for f in 0..frames {
        for y in 0..height {
            for x in 0..width {
                for (part, pos) in parts.iter().zip([f, y, x]) {
                    for i in 0..part / 2 {
                        let angle = pos as f64 * 10000f64.powf(-2.0 * i as f64 / *part as f64);
                        assert_eq!(
                            (cos[k], sin[k]),
                            (angle.cos() as f32, angle.sin() as f32),
                            "token ({f}, {y}, {x}) entry {k}"
                        );
                        k += 1;
                    }
                }
            }
        }
    }
    assert_eq!(k, cos.len());
}

/// The flash kernels over many key tiles with ragged query and key tails, in both half
/// dtypes and at the head sizes of Wan (128) and the text encoders (64): the Hopper kernel
/// (on sm_90) and the portable one.
#[test]
fn cuda_flash_attention_long_sequence_matches_reference() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (c, kernel) in [(cuda(), "default"), (cuda_portable_attention(), "portable")] {
        let Some(c) = c else { return };
        for (dt, tag) in [(DType::BF16, "bf16"), (DType::F16, "f16")] {
            for d in [64, 128] {
                let inputs = [
                    random(&[1, 2, 131, d], dt, 1.0, seed),
                    random(&[1, 2, 4133, d], dt, 1.0, seed + 1),
                    random(&[1, 2, 4133, d], dt, 1.0, seed + 2),
                ];
                check!(
                    c,
                    format!("cuda {kernel} attention {tag} kv 4133 d{d}"),
                    BF16_TOL,
                    inputs,
                    [d],
                    |b, x, p| ops::attention(b, &x[0], &x[1], &x[2], 1.0 / (p[0] as f32).sqrt())
                );
                // Tokens-first, two batch items of three heads: every stride of the layout.
                let inputs = [
                    random(&[2, 131, 3, d], dt, 1.0, seed + 3),
                    random(&[2, 4133, 3, d], dt, 1.0, seed + 4),
                    random(&[2, 4133, 3, d], dt, 1.0, seed + 5),
                ];
                check!(
                    c,
                    format!("cuda {kernel} attention tokens-first {tag} b2 kv 4133 h3 d{d}"),
                    BF16_TOL,
                    inputs,
                    [d],
                    |b, x, p| ops::attention_tokens_first(b, &x[0], &x[1], &x[2], 1.0 / (p[0] as f32).sqrt())
                );
            }
        }
    }
}

/// `read` copies what the work queued before the call left, however much is queued before
/// its future is awaited: a decode overlaps the next frame's work with the last one's copy.
#[test]
fn reads_see_the_work_queued_before_them() {
    on_every_device!(read_order_cases);
    read_order_cases(&CpuBackend, DType::F32, 0.0, "cpu", fresh_seed());
}

fn read_order_cases<G: Backend>(g: &G, dt: DType, _tol: f32, tag: &str, seed: u64) {
    let before = random(&[3, 1000], dt, 1.0, seed);
    let x = g.upload(&before).unwrap();
    let y = ops::scale(g, &x, 2.0, 0.0).unwrap();
    let first = g.read(&y);
    let copy = MapSpec {
        op: MapOp::Copy,
        shape: vec![3, 1000],
        inputs: vec![View::strided(0, vec![1000, 1])],
        out: View::strided(0, vec![1000, 1]),
        alpha: 1.0,
        beta: 0.0,
    };
    g.map(&[&x], &y, &copy).unwrap();
    let second = g.read(&y);
    let (first, second) = pollster::block_on(async { (first.await.unwrap(), second.await.unwrap()) });
    let doubled: Vec<f32> = before.to_f32().iter().map(|v| 2.0 * v).collect();
    assert_eq!(first.to_f32(), doubled, "{tag}: the first read saw later work");
    assert_eq!(second, before, "{tag}: the second read missed the copy");
}

/// After one pass of a repeated workload the arena serves every allocation: a denoising
/// loop asks the driver for memory only during its first step.
#[test]
fn cuda_repeated_work_allocates_only_once() {
    // Its own backend: the shared one also serves the tests running beside this one, whose
    // allocations would count.
    let Some(c) = &open_cuda(true) else { return };
    let x = c.upload(&random(&[2, 77, 96], DType::BF16, 1.0, 1)).unwrap();
    let w = c.upload(&random(&[96, 96], DType::BF16, 1.0, 2)).unwrap();
    let step = || {
        let h = ops::linear(c, &x, &w, None).unwrap();
        let h = ops::layer_norm(c, &h, None, None, 1e-6).unwrap();
        let q = h.reshape(&[2, 77, 2, 48]).unwrap();
        let q = ops::permute(c, &q, &[0, 2, 1, 3]).unwrap();
        let o = ops::attention(c, &q, &q, &q, 0.1).unwrap();
        pollster::block_on(c.read(&ops::silu(c, &o).unwrap())).unwrap();
    };
    step();
    let after_first = c.memory().driver_allocations;
    step();
    step();
    assert_eq!(c.memory().driver_allocations, after_first, "{:?}", c.memory());
}

/// Without the CUDA libraries (every CI machine) creating the backend is an error that names
/// what is missing, never a panic; with them it must succeed.
#[test]
fn cuda_backend_reports_missing_libraries() {
    match CudaBackend::new(&sdlite_runtime::CudaOptions::default()) {
        Ok(b) => assert!(b.name().starts_with("cuda: ")),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(msg.contains("CUDA") || msg.contains("libcuda"), "{msg}");
        }
    }
}
