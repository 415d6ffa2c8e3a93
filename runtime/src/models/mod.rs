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
