//! Helpers shared by the CLI's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The tiny Stable Diffusion test checkpoint.
pub fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/sd-tiny")
}

pub fn sdlite(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdlite"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("sdlite runs")
}

/// The PNG's size, pixels and `parameters` text.
pub fn read_png(path: &Path) -> (u32, u32, Vec<u8>, String) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).expect("png exists")));
    let mut reader = decoder.read_info().expect("valid png");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("one frame");
    let text = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .unwrap_or_default();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf, text)
}
