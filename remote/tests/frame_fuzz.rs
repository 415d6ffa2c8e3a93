//! The frame decoder against random bytes and against valid frames with random damage: it
//! must return a frame or an error, never panic, hang or allocate past its limit. Each run
//! uses a fresh seed (printed; `SDLITE_FUZZ_SEED` replays, `SDLITE_FUZZ_CASES` sets the count).

use rand::{Rng, SeedableRng};
use sdlite_remote::frame::{read_frame, write_frame, TensorRef};
use sdlite_remote::protocol::{Envelope, ModelHash, Request, PROTOCOL_VERSION};
use sdlite_runtime::DType;

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

#[test]
fn frame_decoder_survives_random_and_damaged_input() {
    let seed = env("SDLITE_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let cases = env("SDLITE_FUZZ_CASES").unwrap_or(1_000_000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let valid: Vec<Vec<u8>> = [
        Request::Hello,
        Request::Step { job: 42, timestep: 981.0 },
        Request::UploadTensor {
            model: ModelHash([9; 32]),
            name: "conv_in.weight".into(),
        },
    ]
    .into_iter()
    .map(|request| {
        let mut out = vec![];
        let values = [1u8; 24];
        let t = TensorRef {
            dtype: DType::F16,
            shape: &[3, 4],
            bytes: &values,
        };
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            token: "t".into(),
            request,
        };
        pollster::block_on(write_frame(&mut out, &envelope, &[t])).unwrap();
        out
    })
    .collect();
    let (mut decoded, mut refused) = (0u64, 0u64);
    for case in 0..cases {
        let bytes: Vec<u8> = if case % 2 == 0 {
            let n = rng.random_range(0..64);
            let mut b: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if rng.random_bool(0.5) {
                b.splice(0..0, *b"SDLT");
            }
            b
        } else {
            let mut b = valid[rng.random_range(0..valid.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                if b.is_empty() {
                    break;
                }
                match rng.random_range(0..3) {
                    0 => {
                        let i = rng.random_range(0..b.len());
                        b[i] = rng.random();
                    }
                    1 => b.truncate(rng.random_range(0..b.len())),
                    _ => {
                        let i = rng.random_range(0..=b.len());
                        b.insert(i, rng.random());
                    }
                }
            }
            b
        };
        let mut reader = bytes.as_slice();
        match pollster::block_on(read_frame::<_, Envelope>(&mut reader, 1 << 16)) {
            Ok(_) => decoded += 1,
            Err(_) => refused += 1,
        }
    }
    eprintln!("frame decoder: {cases} inputs (seed {seed}): {decoded} decoded, {refused} refused, no panic");
    assert_eq!(decoded + refused, cases);
    assert!(refused > cases / 2, "damage should mostly be caught");
}
