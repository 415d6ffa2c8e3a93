//! Checkpoint loading on bad input: every failure is an error naming the file and, where
//! there is one, the tensor; never a panic. Also sharded checkpoints and dtype conversion.

use std::path::{Path, PathBuf};

use sdlite_runtime::models::denoiser::DenoiserLoad;
use sdlite_runtime::models::unet::UNet;
use sdlite_runtime::source::{DirSource, MemorySource, Source};
use sdlite_runtime::weights::{Params, Weights};
use sdlite_runtime::{Backend, CpuBackend, DType, HostData};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdlite-weights-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A safetensors file from a raw header and data section.
fn write_raw(name: &str, header: &str, data: &[u8]) -> PathBuf {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    let path = temp(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// One f32 tensor `t` of shape [2, 3] holding 0..6.
fn good_file(name: &str) -> PathBuf {
    let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    write_raw(name, r#"{"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#, &data)
}

fn open_err(path: &Path) -> String {
    match Weights::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_files_are_named_errors() {
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let cases = [
        (
            write_raw(
                "trunc.safetensors",
                r#"{"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#,
                &f32s[..20],
            ),
            "truncated",
        ),
        (write_raw("json.safetensors", r#"{"t":{"dtype":"F32""#, &f32s), "not valid JSON"),
        (
            write_raw(
                "dtype.safetensors",
                r#"{"t":{"dtype":"Q4","shape":[2,3],"data_offsets":[0,24]}}"#,
                &f32s,
            ),
            "unknown dtype Q4",
        ),
        (
            write_raw(
                "offsets.safetensors",
                r#"{"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
                &f32s,
            ),
            "do not hold",
        ),
    ];
    for (path, want) in &cases {
        let err = open_err(path);
        assert!(err.contains(&path.display().to_string()) && err.contains(want), "{err}");
    }
    let huge = temp("huge.safetensors");
    std::fs::write(&huge, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, b'{']).unwrap();
    assert!(open_err(&huge).contains("exceeds"));
    let short = temp("short.safetensors");
    std::fs::write(&short, [1, 2, 3]).unwrap();
    assert!(open_err(&short).contains("too short"));
    assert!(open_err(&temp("absent.safetensors")).contains("No such file"));
}

#[test]
fn tensors_load_converted_and_checked() {
    let path = good_file("good.safetensors");
    let w = Weights::open(&path).unwrap();
    let t = w.load("t", &[2, 3], DType::BF16).unwrap();
    assert_eq!(t.data, HostData::from_f32(DType::BF16, (0..6).map(|i| i as f32).collect()));
    let missing = w.load("u", &[2, 3], DType::F32).unwrap_err().to_string();
    assert!(
        missing.contains("`u` is missing") && missing.contains("good.safetensors"),
        "{missing}"
    );
    let shape = w.load("t", &[3, 2], DType::F32).unwrap_err().to_string();
    assert!(shape.contains("[2, 3]") && shape.contains("[3, 2]"), "{shape}");
    // A 1x1 conv stored as [2, 3, 1, 1] or a linear [2, 3] is the same data.
    assert!(w.load("t", &[2, 3, 1, 1], DType::F32).is_ok());
    let ints = write_raw(
        "ints.safetensors",
        r#"{"i":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#,
        &[0; 16],
    );
    let err = Weights::open(&ints).unwrap().load("i", &[2], DType::F32).unwrap_err().to_string();
    assert!(err.contains("stored as I64"), "{err}");
}

/// Int8 tensors with float scales beside them (one per row, or one for the tensor) load under
/// their own name as `q * scale`, rounded once to the scale's dtype; a missing or misfit
/// scale is an error naming the tensor.
#[test]
fn int8_tensors_load_dequantized() {
    let q: Vec<i8> = (0..12).map(|i: i32| ((i * 97 + 31) % 255 - 127) as i8).collect();
    let row_scales = [0.013f32, -0.5, 2.0e-4];
    let row_scales = HostData::from_f32(DType::F16, row_scales.to_vec());
    let mut data: Vec<u8> = q.iter().map(|&v| v as u8).collect();
    data.extend_from_slice(row_scales.as_bytes());
    data.extend_from_slice(&[0x81, 0x7f]);
    data.extend_from_slice(&0.25f32.to_le_bytes());
    data.extend_from_slice(&[1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
    let path = write_raw(
        "int8.safetensors",
        r#"{"w":{"dtype":"I8","shape":[3,4],"data_offsets":[0,12]},
            "w_scale":{"dtype":"F16","shape":[3,1],"data_offsets":[12,18]},
            "v":{"dtype":"I8","shape":[2],"data_offsets":[18,20]},
            "v_scale":{"dtype":"F32","shape":[],"data_offsets":[20,24]},
            "b":{"dtype":"F32","shape":[2],"data_offsets":[24,32]}}"#,
        &data,
    );
    let w = Weights::open(&path).unwrap();
    let scales = row_scales.to_f32();
    let want: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v as f32 * scales[i / 4]).collect();
    assert_eq!(w.load("w", &[3, 4], DType::F16).unwrap().data, HostData::from_f32(DType::F16, want));
    assert_eq!(w.raw("w").unwrap().0, DType::F16);
    assert_eq!(w.load("v", &[2], DType::F32).unwrap().to_f32(), [-127.0 * 0.25, 127.0 * 0.25]);
    assert_eq!(w.load("b", &[2], DType::F32).unwrap().to_f32(), [1.5, -2.0]);
    let mut names: Vec<&str> = w.names().collect();
    names.sort_unstable();
    assert_eq!(names, ["b", "v", "w"]);

    let cases = [
        (r#"{"w":{"dtype":"I8","shape":[3,4],"data_offsets":[0,12]}}"#, "no `w_scale`"),
        (
            r#"{"w":{"dtype":"I8","shape":[3,4],"data_offsets":[0,12]},
                "w_scale":{"dtype":"F16","shape":[2],"data_offsets":[12,16]}}"#,
            "holds 2 values",
        ),
        (
            r#"{"w":{"dtype":"I8","shape":[3,4],"data_offsets":[0,12]},
                "w_scale":{"dtype":"I8","shape":[3],"data_offsets":[12,15]}}"#,
            "not f32/f16/bf16",
        ),
    ];
    for (k, (header, want)) in cases.iter().enumerate() {
        let path = write_raw(&format!("int8-bad-{k}.safetensors"), header, &data);
        let err = open_err(&path);
        assert!(
            err.contains(&path.display().to_string()) && err.contains("`w`") && err.contains(want),
            "{err}"
        );
    }
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let a = good_file("shard-a.safetensors");
    let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_raw(
        "shard-b.safetensors",
        r#"{"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &data,
    );
    let index = temp("model.safetensors.index.json");
    std::fs::write(&index, r#"{"weight_map":{"t":"shard-a.safetensors","v":"shard-b.safetensors"}}"#).unwrap();
    let w = Weights::open(&index).unwrap();
    assert_eq!(w.load("v", &[2], DType::F32).unwrap().to_f32(), [1.0, 2.0]);
    assert!(w.contains("t"));
    let lying = temp("lying.safetensors.index.json");
    std::fs::write(&lying, r#"{"weight_map":{"w":"shard-a.safetensors"}}"#).unwrap();
    let err = open_err(&lying);
    assert!(err.contains("`w`") && err.contains("does not hold"), "{err}");
    drop(a);
}

/// An int8 checkpoint split over shards, each tensor beside its scale (how the built-in
/// models keep every file small), loads the same from a folder on disk and from files in
/// memory (the browser); a shard missing from memory or an index that puts a tensor in the
/// wrong shard is an error naming it.
#[test]
fn sharded_int8_folders_load_from_disk_and_from_memory() {
    let folder = temp("sharded-int8");
    let component = folder.join("transformer");
    std::fs::create_dir_all(&component).unwrap();
    let mut first: Vec<u8> = [-127i8, 5, 64, 127].iter().map(|&v| v as u8).collect();
    first.extend_from_slice(HostData::from_f32(DType::F16, vec![0.5, -0.125]).as_bytes());
    let shard_header = r#"{"w":{"dtype":"I8","shape":[2,2],"data_offsets":[0,4]},
        "w_scale":{"dtype":"F16","shape":[2,1],"data_offsets":[4,8]}}"#;
    let shard_1 = write_raw("sharded-int8/transformer/m-00001-of-00002.safetensors", shard_header, &first);
    let shard_2 = write_raw(
        "sharded-int8/transformer/m-00002-of-00002.safetensors",
        r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[3.0f32, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
    );
    let index_name = "diffusion_pytorch_model.safetensors.index.json";
    let index = |b_shard: &str| {
        format!(
            r#"{{"metadata":{{"total_size":16}},"weight_map":{{"w":"m-00001-of-00002.safetensors",
            "w_scale":"m-00001-of-00002.safetensors","b":"{b_shard}"}}}}"#
        )
    };
    std::fs::write(component.join(index_name), index("m-00002-of-00002.safetensors")).unwrap();

    let mut memory = MemorySource::default();
    for file in [&shard_1, &shard_2, &component.join(index_name)] {
        let name = format!("transformer/{}", file.file_name().unwrap().to_str().unwrap());
        memory.files.insert(name, std::fs::read(file).unwrap().into());
    }
    let disk = DirSource(folder.clone()).weights("transformer").unwrap();
    for w in [&disk, &memory.weights("transformer").unwrap()] {
        assert_eq!(w.load("w", &[2, 2], DType::F32).unwrap().to_f32(), [-63.5, 2.5, -8.0, -15.875]);
        assert_eq!(w.load("b", &[2], DType::F32).unwrap().to_f32(), [3.0, 4.0]);
        let mut names: Vec<&str> = w.names().collect();
        names.sort_unstable();
        assert_eq!(names, ["b", "w"]);
    }

    let wrong = index("m-00001-of-00002.safetensors");
    memory.files.insert(format!("transformer/{index_name}"), wrong.as_bytes().into());
    let err = memory.weights("transformer").err().expect("fails").to_string();
    assert!(
        err.contains("`b`") && err.contains("m-00001-of-00002.safetensors") && err.contains("does not hold"),
        "{err}"
    );
    memory.files.remove("transformer/m-00001-of-00002.safetensors");
    let err = memory.weights("transformer").err().expect("fails").to_string();
    assert!(
        err.contains("transformer/m-00001-of-00002.safetensors") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn model_load_names_the_missing_or_misshapen_tensor() {
    let source = DirSource(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sd-tiny"));
    let config = || source.config("unet/config.json").unwrap();
    let gone = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let w = source.weights("unet").unwrap().renamed(|n| (n != gone).then(|| n.to_string()));
    let err = UNet::load(&Params::new(&CpuBackend, &w, DType::F32), config())
        .err()
        .expect("fails")
        .to_string();
    assert!(err.contains(gone) && err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    let mut wrong: sdlite_runtime::models::unet::UNetConfig = config();
    wrong.cross_attention_dim = 48;
    let err = UNet::load(&Params::new(&CpuBackend, &source.weights("unet").unwrap(), DType::F32), wrong)
        .err()
        .expect("fails")
        .to_string();
    assert!(err.contains("attn2.to_k.weight") && err.contains("[32, 48]"), "{err}");
}

/// A denoiser loaded on first use fails there with an eager load's error, naming the tensor,
/// and a later use says so instead of retrying; an eager load fails at once.
#[test]
fn deferred_denoiser_load_fails_at_first_use_naming_the_tensor() {
    use sdlite_runtime::models::denoiser::OnDemand;
    let source = DirSource(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sd-tiny"));
    let gone = "up_blocks.1.resnets.0.conv1.weight";
    let unet = |when| {
        let config = source.config("unet/config.json").unwrap();
        let w = source.weights("unet").unwrap().renamed(|n| (n != gone).then(|| n.to_string()));
        OnDemand::new(&CpuBackend, when, move |b: &CpuBackend| {
            UNet::load(&Params::new(b, &w, DType::F32), config)
        })
    };
    let eager = unet(DenoiserLoad::Now).err().expect("an eager load fails at once").to_string();
    assert!(eager.contains(gone), "{eager}");
    let deferred = unet(DenoiserLoad::OnFirstUse).expect("nothing is read before first use");
    assert!(!deferred.is_loaded());
    let first = deferred.get(&CpuBackend).err().expect("first use fails").to_string();
    assert_eq!(first, eager);
    let again = deferred.get(&CpuBackend).err().expect("second use fails").to_string();
    assert!(again.contains("failed to load earlier"), "{again}");
}

/// The tiny SD checkpoint in the original single-file layout (written by make_goldens.py and
/// checked there against diffusers' own converters) maps onto exactly the diffusers
/// folder's tensors, and the pipeline loaded from it runs the UNet like the folder's.
#[test]
fn sd_single_file_maps_onto_the_diffusers_layout() {
    use sdlite_runtime::models::clip_tokenizer::ClipTokenizer;
    use sdlite_runtime::models::sd::{SdConfigs, StableDiffusion};
    use sdlite_runtime::models::sd_single_file::component_name;
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    let folder = DirSource(data.join("sd-tiny"));
    let configs = SdConfigs::from_source(&folder).unwrap();
    let file = data.join("sd-tiny-single-file.safetensors");
    let single = Weights::open(&file).unwrap();
    let levels = configs.vae.block_out_channels.len();
    for component in ["text_encoder", "unet", "vae"] {
        let want = folder.weights(component).unwrap();
        let mut mapped = 0;
        for name in single.names() {
            let Some((c, diffusers)) = component_name(name, &configs.unet, levels) else {
                panic!("single-file key {name} maps nowhere");
            };
            if c != component {
                continue;
            }
            mapped += 1;
            // transformers 5 saves CLIP without the `text_model.` prefix that the original names carry.
            let diffusers = match diffusers.strip_prefix("text_model.") {
                Some(bare) if !want.contains(&diffusers) => bare.to_string(),
                _ => diffusers,
            };
            let shape = want
                .shape(&diffusers)
                .unwrap_or_else(|| panic!("{name} -> {diffusers}: not in the folder"))
                .to_vec();
            let round = |v: Vec<f32>| v.into_iter().map(|x| DType::F16.round(x)).collect::<Vec<_>>();
            let a = round(want.load(&diffusers, &shape, DType::F32).unwrap().to_f32());
            let b = single.load(name, &shape, DType::F32).unwrap().to_f32();
            assert_eq!(a, b, "{name} -> {diffusers}: values differ");
        }
        assert_eq!(
            mapped,
            want.names().count(),
            "{component}: every folder tensor has a single-file key"
        );
    }
    let tokenizer = ClipTokenizer::from_source(&folder, "tokenizer").unwrap();
    let sd = StableDiffusion::load_single_file(&CpuBackend, &file, configs, tokenizer, DType::F32, DenoiserLoad::Now).unwrap();
    let goldens = Weights::open(&data.join("sd-tiny-goldens.safetensors")).unwrap();
    let gold = |n: &str| goldens.load(n, goldens.shape(n).unwrap(), DType::F32).unwrap();
    let b = CpuBackend;
    let x = b.upload(&gold("unet_latent")).unwrap();
    let ctx = b.upload(&gold("text_hidden")).unwrap();
    let out = pollster::block_on(b.read(&sd.unet.get(&b).unwrap().forward(&b, &x, &[981.0, 981.0], &ctx).unwrap())).unwrap();
    let (got, want) = (out.to_f32(), gold("unet_out").to_f32());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    assert!(err <= 1e-5, "unet from the single file: relative error {err:e}");
    let folder_file = data.join("sd-tiny/unet/diffusion_pytorch_model.safetensors");
    let tokenizer = ClipTokenizer::from_source(&folder, "tokenizer").unwrap();
    let err = StableDiffusion::load_single_file(
        &CpuBackend,
        &folder_file,
        SdConfigs::from_source(&folder).unwrap(),
        tokenizer,
        DType::F32,
        DenoiserLoad::Now,
    )
    .err()
    .expect("a diffusers file is not a single-file checkpoint")
    .to_string();
    assert!(
        err.contains("no text_encoder tensors under the original Stable Diffusion key names"),
        "{err}"
    );
}

/// An SD 2.x-config checkpoint in the original single-file layout: OpenCLIP text keys with
/// fused q/k/v (split on load) give the text encoder's reference output.
#[test]
fn sd2_single_file_splits_fused_attention() {
    use sdlite_runtime::models::clip_tokenizer::ClipTokenizer;
    use sdlite_runtime::models::sd::{SdConfigs, StableDiffusion};
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    let folder = DirSource(data.join("sd-tiny"));
    let configs = SdConfigs {
        text: folder.config("sd2/text_encoder/config.json").unwrap(),
        unet: folder.config("sd2/unet/config.json").unwrap(),
        vae: folder.config("vae/config.json").unwrap(),
        scheduler: folder.config("scheduler/scheduler_config.json").unwrap(),
    };
    let tokenizer = ClipTokenizer::from_source(&folder, "tokenizer").unwrap();
    let file = data.join("sd2-tiny-single-file.safetensors");
    let sd = StableDiffusion::load_single_file(&CpuBackend, &file, configs, tokenizer, DType::F32, DenoiserLoad::Now).unwrap();
    let goldens = Weights::open(&data.join("sd-tiny-goldens.safetensors")).unwrap();
    let gold = |n: &str| goldens.load(n, goldens.shape(n).unwrap(), DType::F32).unwrap();
    let ids: Vec<Vec<u32>> = gold("sd2_text_ids")
        .to_f32()
        .chunks(77)
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect();
    let b = CpuBackend;
    let got = pollster::block_on(b.read(&sd.text_encoder.forward(&b, &ids).unwrap()))
        .unwrap()
        .to_f32();
    let want = gold("sd2_text_hidden").to_f32();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    assert!(err <= 1e-5, "text encoder from the SD 2.x single file: relative error {err:e}");
}
