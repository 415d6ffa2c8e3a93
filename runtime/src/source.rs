//! Where a model's files come from: a folder on disk (native), or files held in memory (the
//! browser, where the user picks them or they arrive over the network). Models load through
//! `Source` so the same loading code serves both.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{config_err, Error, Result};
use crate::weights::{SafetensorsFile, Weights, FOLDER_FILES};

pub trait Source {
    /// A short description for messages: the folder path or "files in memory".
    fn label(&self) -> String;
    fn exists(&self, path: &str) -> bool;
    fn text(&self, path: &str) -> Result<String>;
    fn bytes(&self, path: &str) -> Result<Vec<u8>>;
    /// The weights of a component folder (`unet`, `vae`, `text_encoder` ...).
    fn weights(&self, component: &str) -> Result<Weights>;

    /// A reference `config.json`, parsed into the model's config struct; unknown keys are
    /// ignored and missing ones take the reference defaults.
    fn config<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T>
    where
        Self: Sized,
    {
        let text = self.text(path)?;
        serde_json::from_str(&text).map_err(|e| config_err(&format!("{}/{path}", self.label()), e.to_string()))
    }
}

/// A diffusers folder on disk; weights are memory-mapped.
#[cfg(not(target_arch = "wasm32"))]
pub struct DirSource(pub std::path::PathBuf);

#[cfg(not(target_arch = "wasm32"))]
impl Source for DirSource {
    fn label(&self) -> String {
        self.0.display().to_string()
    }

    fn exists(&self, path: &str) -> bool {
        self.0.join(path).exists()
    }

    fn text(&self, path: &str) -> Result<String> {
        let full = self.0.join(path);
        std::fs::read_to_string(&full).map_err(|source| Error::Io {
            path: full.display().to_string(),
            source,
        })
    }

    fn bytes(&self, path: &str) -> Result<Vec<u8>> {
        let full = self.0.join(path);
        std::fs::read(&full).map_err(|source| Error::Io {
            path: full.display().to_string(),
            source,
        })
    }

    fn weights(&self, component: &str) -> Result<Weights> {
        Weights::open(&self.0.join(component))
    }
}

/// Files held in memory, keyed by their path inside the model folder (`unet/config.json`).
#[derive(Default)]
pub struct MemorySource {
    /// Shared with the weights opened from them, so a file is held once.
    pub files: HashMap<String, Arc<[u8]>>,
}

impl Source for MemorySource {
    fn label(&self) -> String {
        "files in memory".into()
    }

    fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    fn text(&self, path: &str) -> Result<String> {
        String::from_utf8(self.bytes(path)?).map_err(|_| config_err(path, "not UTF-8 text"))
    }

    fn bytes(&self, path: &str) -> Result<Vec<u8>> {
        self.files
            .get(path)
            .map(|b| b.to_vec())
            .ok_or_else(|| Error::Invalid(format!("model file {path} is missing")))
    }

    fn weights(&self, component: &str) -> Result<Weights> {
        let found = FOLDER_FILES
            .iter()
            .map(|f| format!("{component}/{f}"))
            .find(|p| self.files.contains_key(p));
        let Some(path) = found else {
            return Err(Error::Invalid(format!("no weights for {component} among the files given")));
        };
        if path.ends_with(".index.json") {
            let shard_file = |shard: &str| {
                let shard_path = format!("{component}/{shard}");
                let bytes = self
                    .files
                    .get(&shard_path)
                    .ok_or_else(|| Error::Invalid(format!("model file {shard_path} (a shard {path} names) is missing")))?;
                SafetensorsFile::shared(shard_path, bytes.clone())
            };
            return Weights::from_index(path.clone(), &self.text(&path)?, shard_file);
        }
        Weights::from_bytes(&path, self.files[&path].clone())
    }
}
