//! Kernel sources (`kernels/*.cu`) compiled at run time with NVRTC for the device's exact
//! architecture, and the resulting cubins cached on disk by a hash of source, options and
//! compiler version, so a worker compiles each family once per machine.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::error::{Error, Result};

const COMMON: &str = include_str!("../../../../kernels/common.cuh");
const MMA: &str = include_str!("../../../../kernels/mma.cuh");
const HOPPER: &str = include_str!("../../../../kernels/hopper.cuh");

/// One kernel file and the macros it is compiled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Elementwise,
    Norm,
    Attention,
    Conv,
}

/// Warps per flash-attention block (16 query rows each) and keys per tile: 8 x 128 measured
/// fastest on the H100 at 32,760 tokens (see docs/bench.md).
pub(crate) const FLASH_WARPS: usize = 8;
pub(crate) const FLASH_KEYS_PER_TILE: usize = 128;
/// Key and value tiles the Hopper attention kernel's producer keeps in flight (2 and 3
/// measured the same on the H100 at 32,760 tokens; 2 leaves shared memory free).
pub(crate) const FLASH_SM90_STAGES: usize = 2;
/// Shared memory of the Hopper convolution's ring of weight and input tiles: 6 stages of a
/// 128-position tile, 4 of a 256-position one.
pub(crate) const CONV_TMA_RING: usize = 192 << 10;

impl Family {
    #[cfg(test)]
    pub const ALL: [Family; 4] = [Family::Elementwise, Family::Norm, Family::Attention, Family::Conv];

    pub fn file(self) -> &'static str {
        match self {
            Family::Elementwise => "elementwise.cu",
            Family::Norm => "norm.cu",
            Family::Attention => "attention.cu",
            Family::Conv => "conv.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Family::Elementwise => include_str!("../../../../kernels/elementwise.cu"),
            Family::Norm => include_str!("../../../../kernels/norm.cu"),
            Family::Attention => include_str!("../../../../kernels/attention.cu"),
            Family::Conv => include_str!("../../../../kernels/conv.cu"),
        }
    }

    /// The translation unit NVRTC sees: the shared prelude, the tensor-core helpers (warp
    /// MMAs, then Hopper's warpgroup MMAs and TMA) for the families that use them, then the
    /// family's file.
    pub fn source(self) -> String {
        let (mma, hopper) = match self {
            Family::Attention | Family::Conv => (MMA, HOPPER),
            Family::Elementwise | Family::Norm => ("", ""),
        };
        format!("{COMMON}\n{mma}\n{hopper}\n#line 1 \"{}\"\n{}", self.file(), self.body())
    }

    /// NVRTC options for a device of compute capability `arch`. Hopper compiles as sm_90a,
    /// which enables the warpgroup instructions the attention file uses there.
    pub fn options(self, arch: (i32, i32)) -> Vec<String> {
        let suffix = if arch == (9, 0) { "a" } else { "" };
        vec![
            format!("--gpu-architecture=sm_{}{}{suffix}", arch.0, arch.1),
            "--std=c++17".into(),
            format!("-DFA_WARPS={FLASH_WARPS}"),
            format!("-DFA_BN={FLASH_KEYS_PER_TILE}"),
            format!("-DSM90_STAGES={FLASH_SM90_STAGES}"),
            format!("-DCONV_TMA_RING={CONV_TMA_RING}"),
        ]
    }
}

/// FNV-1a over the inputs, each followed by its length so that moving bytes between two
/// inputs changes the hash. Names cache files.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for &b in p.iter().chain(&(p.len() as u64).to_le_bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

pub(crate) fn cache_key(source: &str, options: &[String], compiler: (i32, i32)) -> String {
    let opts = options.join(" ");
    let ver = format!("{}.{}", compiler.0, compiler.1);
    format!("{:016x}", fnv1a(&[source.as_bytes(), opts.as_bytes(), ver.as_bytes()]))
}

/// Where cubins are kept: `$SDLITE_CUDA_CACHE`, else `$XDG_CACHE_HOME/sdlite/cuda`, else
/// `~/.cache/sdlite/cuda`; none when no home is known (then nothing is cached).
pub(crate) fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SDLITE_CUDA_CACHE") {
        return Some(d.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("sdlite").join("cuda"))
}

fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Gpu(format!("NVRTC version: {e:?}")))?;
    Ok((major, minor))
}

/// The cubin for `family` on a device of compute capability `arch`, from the cache or
/// freshly compiled (and then cached; a cache that cannot be written is skipped).
pub(crate) fn cubin(family: Family, arch: (i32, i32)) -> Result<Vec<u8>> {
    let source = family.source();
    let options = family.options(arch);
    let key = cache_key(&source, &options, nvrtc_version()?);
    let path = cache_dir().map(|d| d.join(format!("{}-sm{}{}-{key}.cubin", family.file(), arch.0, arch.1)));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    let bytes = compile(family, &source, &options)?;
    if let Some(p) = &path {
        let tmp = p.with_extension("tmp");
        let written = p.parent().map(std::fs::create_dir_all).transpose().is_ok()
            && std::fs::write(&tmp, &bytes).is_ok()
            && std::fs::rename(&tmp, p).is_ok();
        if !written {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(bytes)
}

fn compile(family: Family, source: &str, options: &[String]) -> Result<Vec<u8>> {
    let src = CString::new(source).map_err(|_| Error::Gpu(format!("{}: source contains a NUL byte", family.file())))?;
    let name = CString::new(family.file()).expect("file names have no NUL");
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| Error::Gpu(format!("NVRTC {}: {e:?}", family.file())))?;
    // SAFETY: `prog` is live until destroyed at the end of this function.
    let out = unsafe {
        match nvrtc::compile_program(prog, options) {
            Err(e) => {
                let log = nvrtc::get_program_log(prog).ok();
                let log = log
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(Error::Gpu(format!("NVRTC could not compile {} ({e:?}):\n{log}", family.file())))
            }
            Ok(()) => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|_| {
                        let mut buf = vec![0u8; size];
                        nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _).result().map(|_| buf)
                    })
                    .map_err(|e| Error::Gpu(format!("NVRTC cubin of {}: {e:?}", family.file())))
            }
        }
    };
    // SAFETY: destroyed once.
    unsafe {
        let _ = nvrtc::destroy_program(prog);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_every_input() {
        let opts = vec!["--gpu-architecture=sm_90".to_string()];
        let base = cache_key("a", &opts, (13, 0));
        assert_eq!(base, cache_key("a", &opts, (13, 0)));
        assert_ne!(base, cache_key("b", &opts, (13, 0)));
        assert_ne!(base, cache_key("a", &["--gpu-architecture=sm_80".to_string()], (13, 0)));
        assert_ne!(base, cache_key("a", &opts, (13, 1)));
    }

    /// Every family compiles for the architectures the worker targets (A100 and H100). Needs
    /// only libnvrtc, no GPU: CI installs it and sets SDLITE_REQUIRE_NVRTC=1; elsewhere its
    /// absence skips with a note.
    #[test]
    fn every_family_compiles_with_nvrtc() {
        // SAFETY: only tries to open the library.
        if !unsafe { nvrtc_sys::is_culib_present() } {
            assert!(
                std::env::var_os("SDLITE_REQUIRE_NVRTC").is_none(),
                "SDLITE_REQUIRE_NVRTC is set but libnvrtc was not found"
            );
            eprintln!("libnvrtc not found: kernel compilation not checked");
            return;
        }
        for arch in [(8, 0), (9, 0)] {
            for f in Family::ALL {
                let cubin = compile(f, &f.source(), &f.options(arch)).unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    cubin.starts_with(b"\x7fELF"),
                    "{} for sm_{}{}: not an ELF cubin",
                    f.file(),
                    arch.0,
                    arch.1
                );
            }
        }
    }

    /// Every family's source starts with the prelude and names its file for NVRTC's messages.
    #[test]
    fn sources_carry_the_prelude_and_their_file_name() {
        for f in Family::ALL {
            let s = f.source();
            assert!(s.starts_with(COMMON));
            assert!(s.contains(&format!("#line 1 \"{}\"", f.file())));
            assert!(f.options((9, 0)).contains(&"--gpu-architecture=sm_90a".to_string()));
            assert!(f.options((8, 9)).contains(&"--gpu-architecture=sm_89".to_string()));
        }
    }
}
