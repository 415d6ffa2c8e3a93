use sdlite_runtime::*;
fn main() {
    let s: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let d = 64;
    let g = pollster::block_on(WgpuBackend::new(WgpuOptions { default_limits: std::env::var("DL").is_ok(), ..Default::default() })).unwrap();
    let mut seed = 12345u64;
    let mut rnd = || { seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 };
    let hs: Vec<HostTensor> = (0..3).map(|_| HostTensor::from_f32(&[1, 1, s, d], (0..s * d).map(|_| rnd()).collect()).unwrap()).collect();
    let c = CpuBackend;
    let run = |b: &dyn Fn(&HostTensor) -> ()| {};
    let _ = run;
    let cx: Vec<_> = hs.iter().map(|h| c.upload(h).unwrap()).collect();
    let want = pollster::block_on(c.read(&ops::attention(&c, &cx[0], &cx[1], &cx[2], 0.125).unwrap())).unwrap().to_f32();
    let gx: Vec<_> = hs.iter().map(|h| g.upload(h).unwrap()).collect();
    let got = pollster::block_on(g.read(&ops::attention(&g, &gx[0], &gx[1], &gx[2], 0.125).unwrap())).unwrap().to_f32();
    let mut worst = (0f32, 0);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() { if (a - b).abs() > worst.0 { worst = ((a - b).abs(), i); } }
    println!("s={s} worst={:?} row {} col {}", worst, worst.1 / d, worst.1 % d);
}
