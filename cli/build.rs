//! Embeds the default models (`models/<name>/`, trained by `train/`) into the binary, so
//! `sdlite gen` works from any directory without downloads: writes `embedded_models.rs`, a
//! table of every file of every model folder as `include_bytes!`.

use std::path::{Path, PathBuf};

fn files(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("models folder")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, base, out);
        } else {
            out.push(p.strip_prefix(base).expect("inside").to_path_buf());
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("models");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut models: Vec<_> = std::fs::read_dir(&root)
        .expect("models/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    models.sort();
    let mut code = String::from(
        "/// A model's files: path inside its folder, contents.\npub type ModelFiles = &'static [(&'static str, &'static [u8])];\n\npub static MODELS: &[(&str, ModelFiles)] = &[\n",
    );
    for m in models {
        let name = m.file_name().expect("name").to_string_lossy().to_string();
        let mut list = Vec::new();
        files(&m, &m, &mut list);
        code += &format!("    ({name:?}, &[\n");
        for f in list {
            println!("cargo:rerun-if-changed={}", m.join(&f).display());
            let rel = f.to_string_lossy().replace('\\', "/");
            code += &format!(
                "        ({rel:?}, include_bytes!({:?})),\n",
                m.join(&f).canonicalize().expect("file")
            );
        }
        code += "    ]),\n";
    }
    code += "];\n";
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("embedded_models.rs");
    std::fs::write(out, code).expect("write embedded_models.rs");
}
