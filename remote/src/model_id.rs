//! Content identity of a denoiser: client and worker name a model by a SHA-256 over its kind,
//! its canonical config and every tensor (name, dtype, shape, and the SHA-256 of its bytes)
//! in name order. The tensors are hashed under the diffusers names, so a single-file
//! checkpoint and a diffusers folder holding the same weights have the same hash, and an
//! upload can be checked tensor by tensor as it arrives. Hashing each tensor's bytes on its
//! own lets a whole model's tensors be hashed on all cores (a 2.6 GB DiT in a fraction of a
//! second rather than seconds on one core).

#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

use sdlite_runtime::models::unet::UNetConfig;
use sdlite_runtime::models::wan_dit::{with_diffusers_names, WanDitConfig};
use sdlite_runtime::parallel::par_chunks_mut;
#[cfg(not(target_arch = "wasm32"))]
use sdlite_runtime::source::DirSource;
use sdlite_runtime::source::Source;
use sdlite_runtime::weights::Weights;
use sdlite_runtime::DType;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::frame::wire_dtype;
use crate::protocol::{DenoiserKind, ModelHash, WireDType};

/// The config as sdlite reads it, re-serialized: defaults filled in, key order fixed.
pub fn canonical_config(kind: DenoiserKind, json: &str, label: &str) -> Result<String> {
    let bad = |e: serde_json::Error| sdlite_runtime::Error::Config {
        file: label.to_string(),
        detail: e.to_string(),
    };
    Ok(match kind {
        DenoiserKind::Unet => serde_json::to_string(&serde_json::from_str::<UNetConfig>(json).map_err(bad)?),
        DenoiserKind::WanDit => serde_json::to_string(&serde_json::from_str::<WanDitConfig>(json).map_err(bad)?),
    }
    .expect("configs serialize"))
}

/// Incremental model hash: kind and config first, then tensors in strictly increasing name
/// order (which the upload path enforces).
pub struct ModelHasher {
    sha: Sha256,
    last: Option<String>,
}

impl ModelHasher {
    pub fn new(kind: DenoiserKind, config: &str) -> Self {
        let mut sha = Sha256::new();
        sha.update(b"sdlite-denoiser-v2\n");
        sha.update([kind as u8]);
        sha.update((config.len() as u64).to_le_bytes());
        sha.update(config.as_bytes());
        Self { sha, last: None }
    }

    /// Adds one tensor; `Err` names the tensor that came out of order.
    pub fn tensor(&mut self, name: &str, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<(), String> {
        self.tensor_digest(name, dtype, shape, bytes.len(), Sha256::digest(bytes).into())
    }

    /// `tensor` with the SHA-256 of the tensor's `len` bytes already taken.
    fn tensor_digest(&mut self, name: &str, dtype: DType, shape: &[usize], len: usize, digest: [u8; 32]) -> Result<(), String> {
        if self.last.as_deref().is_some_and(|last| last >= name) {
            return Err(format!("tensor `{name}` arrived out of name order"));
        }
        self.last = Some(name.to_string());
        let sha = &mut self.sha;
        sha.update((name.len() as u64).to_le_bytes());
        sha.update(name.as_bytes());
        sha.update([match wire_dtype(dtype) {
            WireDType::F32 => 0u8,
            WireDType::F16 => 1,
            WireDType::BF16 => 2,
        }]);
        sha.update((shape.len() as u64).to_le_bytes());
        shape.iter().for_each(|&d| sha.update((d as u64).to_le_bytes()));
        sha.update((len as u64).to_le_bytes());
        sha.update(digest);
        Ok(())
    }

    pub fn finish(self) -> ModelHash {
        ModelHash(self.sha.finalize().into())
    }
}

/// A denoiser's weights and config under its hash: what a worker can load and a client can
/// name or upload.
pub struct DenoiserPackage {
    pub kind: DenoiserKind,
    /// Canonical config JSON.
    pub config: String,
    pub weights: Weights,
    pub hash: ModelHash,
}

impl DenoiserPackage {
    /// `weights` under the diffusers names; `config_json` as found in `config_label`.
    pub fn new(kind: DenoiserKind, config_json: &str, config_label: &str, weights: Weights) -> Result<Self> {
        let config = canonical_config(kind, config_json, config_label)?;
        let names = sorted_names(&weights);
        let tensors = names.iter().map(|&n| weights.raw(n)).collect::<sdlite_runtime::Result<Vec<_>>>()?;
        let mut digests = vec![[0u8; 32]; names.len()];
        par_chunks_mut(&mut digests, 1, |i, d| d[0] = Sha256::digest(tensors[i].2).into());
        let mut hasher = ModelHasher::new(kind, &config);
        for ((name, (dtype, shape, bytes)), digest) in names.iter().zip(&tensors).zip(digests) {
            hasher
                .tensor_digest(name, *dtype, shape, bytes.len(), digest)
                .expect("sorted names");
        }
        Ok(Self {
            kind,
            hash: hasher.finish(),
            config,
            weights,
        })
    }

    /// The denoiser of a diffusers pipeline folder: `unet/` (Stable Diffusion) or
    /// `transformer/` (Wan2.1).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_pipeline(dir: &Path) -> Result<Self> {
        Self::from_source(&DirSource(dir.to_path_buf()))
    }

    /// The denoiser of a diffusers pipeline from any source (a folder, files in memory).
    pub fn from_source(source: &impl Source) -> Result<Self> {
        let (kind, component) = if source.exists("unet/config.json") {
            (DenoiserKind::Unet, "unet")
        } else if source.exists("transformer/config.json") {
            (DenoiserKind::WanDit, "transformer")
        } else {
            return Err(Error::Runtime(sdlite_runtime::Error::Invalid(format!(
                "{}: no unet/ or transformer/ folder with a config.json",
                source.label()
            ))));
        };
        let config_path = format!("{component}/config.json");
        let weights = source.weights(component)?;
        let weights = match kind {
            DenoiserKind::WanDit => with_diffusers_names(weights),
            DenoiserKind::Unet => weights,
        };
        Self::new(
            kind,
            &source.text(&config_path)?,
            &format!("{}/{config_path}", source.label()),
            weights,
        )
    }

    /// Bytes of all tensors as stored.
    pub fn weight_bytes(&self) -> u64 {
        sorted_names(&self.weights)
            .iter()
            .filter_map(|n| self.weights.raw(n).ok())
            .map(|(_, _, b)| b.len() as u64)
            .sum()
    }
}

pub fn sorted_names(weights: &Weights) -> Vec<&str> {
    let mut names: Vec<&str> = weights.names().collect();
    names.sort_unstable();
    names
}

#[cfg(not(target_arch = "wasm32"))]
pub use store::{ModelStore, UPLOAD_MANIFEST};

/// The worker's models on disk.
#[cfg(not(target_arch = "wasm32"))]
mod store {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use sdlite_runtime::weights::Weights;

    use super::{DenoiserPackage, ModelHash};
    use crate::error::{io_err, Error, Result};
    use crate::protocol::DenoiserKind;

    /// The file an upload's config is kept in, beside `model.safetensors`.
    pub const UPLOAD_MANIFEST: &str = "denoiser.json";

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Manifest {
        kind: DenoiserKind,
        config: String,
    }

    /// The denoisers a worker can serve: diffusers pipeline folders under its models folder, and
    /// models clients uploaded (kept as `<hash>/model.safetensors` + `denoiser.json`).
    pub struct ModelStore {
        pub dir: PathBuf,
        models: HashMap<ModelHash, DenoiserPackage>,
    }

    impl ModelStore {
        /// Hashes every model under `dir`; `report(path, hash)` for each, folders that hold no
        /// model skipped, folders that fail reported as errors.
        pub fn scan(dir: &Path, report: &mut dyn FnMut(&Path, std::result::Result<&DenoiserPackage, &Error>)) -> Result<Self> {
            std::fs::create_dir_all(dir).map_err(io_err(dir.display()))?;
            let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(io_err(dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            entries.sort();
            let mut models = HashMap::new();
            for path in entries {
                let found = if path.join("model_index.json").is_file() {
                    DenoiserPackage::from_pipeline(&path)
                } else if path.join(UPLOAD_MANIFEST).is_file() {
                    Self::open_upload(&path)
                } else {
                    continue;
                };
                report(&path, found.as_ref());
                if let Ok(p) = found {
                    models.insert(p.hash, p);
                }
            }
            Ok(Self {
                dir: dir.to_path_buf(),
                models,
            })
        }

        fn open_upload(path: &Path) -> Result<DenoiserPackage> {
            let manifest_path = path.join(UPLOAD_MANIFEST);
            let text = std::fs::read_to_string(&manifest_path).map_err(io_err(manifest_path.display()))?;
            let m: Manifest = serde_json::from_str(&text).map_err(|e| sdlite_runtime::Error::Config {
                file: manifest_path.display().to_string(),
                detail: e.to_string(),
            })?;
            let weights = Weights::open(&path.join("model.safetensors"))?;
            DenoiserPackage::new(m.kind, &m.config, &manifest_path.display().to_string(), weights)
        }

        pub fn get(&self, hash: &ModelHash) -> Option<&DenoiserPackage> {
            self.models.get(hash)
        }

        pub fn hashes(&self) -> impl Iterator<Item = &ModelHash> {
            self.models.keys()
        }

        /// Keeps an uploaded model (already checked against its hash) on disk and serves it.
        pub fn add_upload(
            &mut self,
            hash: ModelHash,
            kind: DenoiserKind,
            config: &str,
            tensors: &[(String, sdlite_runtime::HostTensor)],
        ) -> Result<()> {
            let dir = self.dir.join(hash.to_string());
            std::fs::create_dir_all(&dir).map_err(io_err(dir.display()))?;
            sdlite_runtime::weights::write_safetensors(&dir.join("model.safetensors"), tensors)?;
            let manifest = serde_json::to_string(&Manifest {
                kind,
                config: config.to_string(),
            })
            .expect("manifest serializes");
            let manifest_path = dir.join(UPLOAD_MANIFEST);
            std::fs::write(&manifest_path, manifest).map_err(io_err(manifest_path.display()))?;
            let package = Self::open_upload(&dir)?;
            if package.hash != hash {
                return Err(Error::Runtime(sdlite_runtime::Error::Invalid(format!(
                    "{}: stored upload hashes to {}, not {hash}",
                    dir.display(),
                    package.hash
                ))));
            }
            self.models.insert(hash, package);
            Ok(())
        }
    }
}
