//! The models, each one readable file composed from `ops`, with a config struct that mirrors
//! the reference config (read from the checkpoint's `config.json`), plus their tokenizers,
//! schedulers and pipelines.

pub mod clip_text;
pub mod clip_tokenizer;
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
