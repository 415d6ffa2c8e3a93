//! The models, each one readable file composed from `ops`, with a config struct that mirrors
//! the reference config (read from the checkpoint's `config.json`), plus their tokenizers,
//! schedulers and pipelines.

pub mod clip_text;
pub mod clip_tokenizer;
pub mod denoiser;
pub mod flow_schedulers;
pub mod nn;
pub mod schedulers;
pub mod sd;
pub mod sd_single_file;
pub mod sd_vae;
pub mod sentencepiece;
pub mod umt5;
pub mod unet;
pub mod wan;
pub mod wan_dit;
pub mod wan_vae;

/// Where a generation is, for progress bars: `progress(phase, done, total)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    EncodeText,
    Denoise,
    Decode,
}

/// What a request leaves unset: the reference pipeline's defaults, overridden by what a
/// folder's `model_index.json` sets under `_sdlite_defaults` (the built-in models set their
/// native size and clip length there; diffusers ignores keys that start with an underscore).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestDefaults {
    pub width: usize,
    pub height: usize,
    /// 1 for picture models.
    pub frames: usize,
    pub cfg_scale: f32,
}

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsOverride {
    width: Option<usize>,
    height: Option<usize>,
    frames: Option<usize>,
    cfg_scale: Option<f32>,
}

impl RequestDefaults {
    /// `base` with the overrides of the folder's `model_index.json`, if it has any.
    pub fn with_overrides(self, source: &impl crate::source::Source) -> crate::error::Result<Self> {
        if !source.exists("model_index.json") {
            return Ok(self);
        }
        let index: serde_json::Value = source.config("model_index.json")?;
        let o: DefaultsOverride = match index.get("_sdlite_defaults") {
            None => DefaultsOverride::default(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| crate::error::Error::Invalid(format!("{}/model_index.json: _sdlite_defaults: {e}", source.label())))?,
        };
        Ok(Self {
            width: o.width.unwrap_or(self.width),
            height: o.height.unwrap_or(self.height),
            frames: o.frames.unwrap_or(self.frames),
            cfg_scale: o.cfg_scale.unwrap_or(self.cfg_scale),
        })
    }
}

/// The starting latent: the caller's when given (it must have the shape's size), seeded
/// standard-normal noise otherwise.
fn initial_latent(given: Option<&Vec<f32>>, shape: &[usize], seed: u64) -> crate::error::Result<Vec<f32>> {
    let n: usize = shape.iter().product();
    match given {
        Some(l) if l.len() == n => Ok(l.clone()),
        Some(l) => Err(crate::error::Error::Invalid(format!(
            "initial latent has {} values, {shape:?} needs {n}",
            l.len()
        ))),
        None => Ok(crate::noise::gaussian(seed, n)),
    }
}

/// Classifier-free guidance on a denoiser output for the batch (negative, positive):
/// `uncond + scale * (cond - uncond)`; without guidance the single row passes through.
pub fn guide(pred: Vec<f32>, guided: bool, scale: f32) -> Vec<f32> {
    if !guided {
        return pred;
    }
    let (uncond, cond) = pred.split_at(pred.len() / 2);
    uncond.iter().zip(cond).map(|(u, c)| u + scale * (c - u)).collect()
}

/// Stops a generation whose latent overflowed, naming the step and dtype.
fn check_finite(latent: &[f32], step: usize, dtype: crate::tensor::DType) -> crate::error::Result<()> {
    if latent.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    Err(crate::error::Error::Invalid(format!(
        "the latent became non-finite at step {step} (dtype {dtype:?}); try f32"
    )))
}

#[cfg(test)]
mod tests {
    use super::RequestDefaults;
    use crate::source::MemorySource;

    fn folder(index: &str) -> MemorySource {
        MemorySource {
            files: [("model_index.json".to_string(), index.as_bytes().into())].into(),
        }
    }

    #[test]
    fn model_index_overrides_request_defaults() {
        let base = RequestDefaults {
            width: 832,
            height: 480,
            frames: 81,
            cfg_scale: 5.0,
        };
        let plain = folder(r#"{"_class_name": "WanPipeline"}"#);
        assert_eq!(base.with_overrides(&plain).unwrap(), base);
        let tiny = folder(r#"{"_sdlite_defaults": {"width": 64, "height": 64, "frames": 17}}"#);
        let want = RequestDefaults {
            width: 64,
            height: 64,
            frames: 17,
            cfg_scale: 5.0,
        };
        assert_eq!(base.with_overrides(&tiny).unwrap(), want);
        for bad in [r#"{"_sdlite_defaults": {"width": "64"}}"#, r#"{"_sdlite_defaults": {"fps": 8}}"#] {
            let err = base.with_overrides(&folder(bad)).unwrap_err().to_string();
            assert!(err.contains("model_index.json: _sdlite_defaults"), "{err}");
        }
    }
}
