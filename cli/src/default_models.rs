//! The models built into the binary (trained by the project: `train/`, docs/tiny-models.md)
//! and how `--model` resolves: an existing path first, then a built-in name. Built-in models
//! are written once to a cache folder, so everything downstream (offload packages, workers)
//! sees an ordinary diffusers folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

include!(concat!(env!("OUT_DIR"), "/embedded_models.rs"));

/// What `sdlite gen` runs without `--model`.
pub const DEFAULT: &str = "tiny-sd";

/// Built-in names, short and long (`tiny-sd` is `sdlite-tiny-sd`).
fn builtin(name: &str) -> Option<&'static [(&'static str, &'static [u8])]> {
    let full = if name.starts_with("sdlite-") {
        name.to_string()
    } else {
        format!("sdlite-{name}")
    };
    MODELS.iter().find(|(n, _)| *n == full).map(|(_, files)| *files)
}

pub fn names() -> Vec<String> {
    MODELS.iter().map(|(n, _)| n.trim_start_matches("sdlite-").to_string()).collect()
}

/// The folder or file `--model` names: an existing path, or a built-in model's cached copy.
pub fn resolve(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some(files) = builtin(model) else {
        let builtins = match names().join(", ") {
            none if none.is_empty() => "this build has none: it was built without models/".to_string(),
            some => some,
        };
        bail!("no model at {model}: pass a diffusers folder or a single-file checkpoint, or a built-in model ({builtins})");
    };
    // Named by content, so a build with other weights never reads a stale copy.
    let dir = cache_dir().join(format!("{}-{:016x}", model.trim_start_matches("sdlite-"), fingerprint(files)));
    for (rel, bytes) in files {
        let target = dir.join(rel);
        if !target.exists() {
            std::fs::create_dir_all(target.parent().expect("file in a folder")).with_context(|| format!("creating {}", dir.display()))?;
            // Written aside (per process: two may start at once) and renamed, so a reader
            // never sees half a file.
            let part = target.with_extension(format!("part{}", std::process::id()));
            std::fs::write(&part, bytes).with_context(|| format!("writing {}", part.display()))?;
            std::fs::rename(&part, &target).with_context(|| format!("writing {}", target.display()))?;
        }
    }
    Ok(dir)
}

/// FNV-1a over every path and byte.
fn fingerprint(files: &[(&str, &[u8])]) -> u64 {
    files
        .iter()
        .flat_map(|(rel, bytes)| rel.as_bytes().iter().chain(bytes.iter()))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// `$XDG_CACHE_HOME/sdlite/models`, `~/.cache/sdlite/models`, or the temp folder.
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("sdlite").join("models")
}
