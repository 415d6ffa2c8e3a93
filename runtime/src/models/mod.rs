//! The models, each one readable file composed from `ops`, with a config struct that mirrors
//! the reference config (read from the checkpoint's `config.json`), plus their tokenizers,
//! schedulers and pipelines.

pub mod clip_text;
pub mod clip_tokenizer;
pub mod nn;
pub mod schedulers;
pub mod sd;
pub mod sd_vae;
pub mod unet;

use crate::error::{config_err, Error, Result};

/// A reference `config.json`, parsed into the model's config struct; unknown keys are
/// ignored and missing ones take the reference defaults.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_config<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_config(&path.display().to_string(), &text)
}

pub fn parse_config<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| config_err(file, e.to_string()))
}
