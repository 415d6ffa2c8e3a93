//! Checkpoint reading: safetensors files (single, sharded with an index, or a diffusers
//! component folder), memory-mapped on native targets so that loading a model holds at most
//! one tensor in RAM beyond the backend's copy, and `Params`, the scoped view models load
//! their weights through (converted to the compute dtype on the way to the backend).
//!
//! Every failure names the file and, where there is one, the tensor.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{checkpoint_err, Error, Result};
use crate::tensor::{numel, DType, HostData, HostTensor, Tensor};

/// Headers larger than this are refused before they are parsed (the format's own limit).
pub const MAX_HEADER_BYTES: usize = 100 << 20;

enum Bytes {
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
    /// A file held in memory by its source too (the browser's picked files): the weights and
    /// the source share one copy.
    Shared(Arc<[u8]>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
            Bytes::Shared(v) => v,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One safetensors file: its bytes and the parsed header.
pub(crate) struct SafetensorsFile {
    name: String,
    bytes: Bytes,
    data_start: usize,
    entries: HashMap<String, Entry>,
}

fn dtype_of(code: &str) -> Option<DType> {
    match code {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        _ => None,
    }
}

fn element_size(code: &str) -> Option<usize> {
    Some(match code {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

impl SafetensorsFile {
    fn parse(name: String, bytes: Bytes) -> Result<Self> {
        let err = |detail: String| checkpoint_err(&name, detail);
        if bytes.len() < 8 {
            return Err(err(format!("{} bytes is too short for a safetensors file", bytes.len())));
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if header_len > MAX_HEADER_BYTES as u64 {
            return Err(err(format!(
                "header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"
            )));
        }
        let data_start = 8 + header_len as usize;
        if data_start > bytes.len() {
            return Err(err(format!(
                "truncated: header claims {header_len} bytes but the file has {}",
                bytes.len()
            )));
        }
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..data_start]).map_err(|e| err(format!("header is not valid JSON: {e}")))?;
        let data_len = bytes.len() - data_start;
        let mut entries = HashMap::new();
        for (tensor, info) in header {
            if tensor == "__metadata__" {
                continue;
            }
            let terr = |detail: &str| err(format!("tensor `{tensor}`: {detail}"));
            let dtype = info["dtype"].as_str().ok_or_else(|| terr("no dtype"))?.to_string();
            let shape: Vec<usize> = info["shape"]
                .as_array()
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| terr("shape is not a list of sizes"))?;
            let offsets: Vec<usize> = info["data_offsets"]
                .as_array()
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .filter(|v: &Vec<usize>| v.len() == 2)
                .ok_or_else(|| terr("data_offsets is not a [begin, end] pair"))?;
            let (start, end) = (offsets[0], offsets[1]);
            let size = element_size(&dtype).ok_or_else(|| terr(&format!("unknown dtype {dtype}")))?;
            let expected = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
            if end < start || Some(end - start) != expected {
                return Err(terr(&format!(
                    "data_offsets [{start}, {end}] do not hold {shape:?} elements of {dtype}"
                )));
            }
            if end > data_len {
                return Err(terr(&format!(
                    "data ends at byte {end} but the file holds {data_len} data bytes (truncated file?)"
                )));
            }
            entries.insert(tensor, Entry { dtype, shape, start, end });
        }
        Ok(Self {
            name,
            bytes,
            data_start,
            entries,
        })
    }

    /// A file held in memory by its source too.
    pub(crate) fn shared(name: String, bytes: Arc<[u8]>) -> Result<Self> {
        Self::parse(name, Bytes::Shared(bytes))
    }

    /// Tensors stored as int8 with float scales beside them (`x` as I8 and `x_scale` holding
    /// one value per row of `x`, or one for all of it: the channel-wise layout of
    /// compressed-tensors checkpoints) become `x` in the scale's dtype, each element
    /// `q * scale` computed in f32 and rounded once. Every reader (loads, hashes, uploads to
    /// a worker) then sees an ordinary float checkpoint. Such a file is held in memory, not
    /// mapped: the dequantized tensors need bytes of their own.
    fn dequantize_int8(mut self) -> Result<Self> {
        let mut quantized: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dtype == "I8")
            .map(|(n, _)| n.clone())
            .collect();
        if quantized.is_empty() {
            return Ok(self);
        }
        quantized.sort_unstable();
        let data = &self.bytes[self.data_start..];
        let mut owned = data.to_vec();
        for name in quantized {
            let err = |detail: String| checkpoint_err(&self.name, format!("tensor `{name}`: {detail}"));
            let scale_name = format!("{name}_scale");
            let Some(scale) = self.entries.remove(&scale_name) else {
                return Err(err(format!("is int8, but the file has no `{scale_name}` to scale it by")));
            };
            let scale_dtype =
                dtype_of(&scale.dtype).ok_or_else(|| err(format!("its scale `{scale_name}` is {}, not f32/f16/bf16", scale.dtype)))?;
            let scales = HostData::from_bytes(scale_dtype, &data[scale.start..scale.end])
                .to_f32()
                .into_owned();
            let q = &self.entries[&name];
            let rows = q.shape.first().copied().unwrap_or(1);
            let per_scale = match scales.len() {
                1 => q.end - q.start,
                n if n == rows => (q.end - q.start) / rows.max(1),
                n => {
                    return Err(err(format!(
                        "its scale `{scale_name}` holds {n} values; it needs one per row ({rows}) or one"
                    )))
                }
            };
            let values = data[q.start..q.end]
                .iter()
                .enumerate()
                .map(|(i, &b)| b as i8 as f32 * scales[i / per_scale])
                .collect();
            let start = owned.len();
            owned.extend_from_slice(HostData::from_f32(scale_dtype, values).as_bytes());
            let shape = q.shape.clone();
            self.entries.insert(
                name,
                Entry {
                    dtype: scale.dtype,
                    shape,
                    start,
                    end: owned.len(),
                },
            );
        }
        Ok(Self {
            bytes: Bytes::Owned(owned),
            data_start: 0,
            ..self
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn open(path: &std::path::Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a checkpoint changed by another process while we read
        // it is outside what any loader can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.display().to_string(), Bytes::Mapped(map))
    }

    fn load(&self, tensor: &str, entry: &Entry, dtype: DType) -> Result<HostTensor> {
        let stored = dtype_of(&entry.dtype).ok_or_else(|| {
            checkpoint_err(
                &self.name,
                format!("tensor `{tensor}` is stored as {}, not f32/f16/bf16", entry.dtype),
            )
        })?;
        let raw = &self.bytes[self.data_start + entry.start..self.data_start + entry.end];
        let data = HostData::from_bytes(stored, raw);
        HostTensor::new(&entry.shape, if stored == dtype { data } else { data.convert(dtype) })
    }
}

/// All tensors of one model component, possibly spread over several files.
pub struct Weights {
    label: String,
    files: Vec<SafetensorsFile>,
    owner: HashMap<String, usize>,
    /// Set for `Weights::synthetic`: every tensor asked for exists, with seeded values.
    synthetic: Option<u64>,
}

/// File names a diffusers / transformers component folder may hold its weights in,
/// most preferred first.
pub const FOLDER_FILES: [&str; 8] = [
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors.index.json",
    "model.fp16.safetensors",
];

impl Weights {
    fn from_files(label: String, files: Vec<SafetensorsFile>) -> Result<Self> {
        let files = files
            .into_iter()
            .map(SafetensorsFile::dequantize_int8)
            .collect::<Result<Vec<_>>>()?;
        let mut owner = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.entries.keys() {
                if let Some(prev) = owner.insert(name.clone(), i) {
                    return Err(checkpoint_err(
                        &label,
                        format!("tensor `{name}` appears in both {} and {}", files[prev].name, f.name),
                    ));
                }
            }
        }
        Ok(Self {
            label,
            files,
            owner,
            synthetic: None,
        })
    }

    /// Weights that hold whatever tensor a model asks for, with seeded values of a sensible
    /// scale (norm scales near 1, other tensors uniform in +-1/sqrt(fan-in)): full-size
    /// architectures for benchmarks and memory measurements without checkpoint files.
    pub fn synthetic(seed: u64) -> Self {
        Self {
            label: format!("synthetic weights (seed {seed})"),
            files: vec![],
            owner: HashMap::new(),
            synthetic: Some(seed),
        }
    }

    fn synthesize(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
        let n = numel(shape);
        let name_hash = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let noise = crate::noise::gaussian(seed ^ name_hash, n);
        let is_scale = name.ends_with("gamma") || (name.contains("norm") && name.ends_with("weight"));
        if is_scale {
            return noise.iter().map(|z| 1.0 + 0.05 * z).collect();
        }
        let fan_in = if shape.len() > 1 { n / shape[0] } else { shape[0] };
        let std = 1.0 / (fan_in.max(1) as f32).sqrt();
        noise.iter().map(|z| z * std).collect()
    }

    /// One safetensors file held in memory (the browser path: a file the user picked), shared
    /// with whoever else holds it.
    pub fn from_bytes(name: &str, bytes: Arc<[u8]>) -> Result<Self> {
        Self::from_files(name.to_string(), vec![SafetensorsFile::shared(name.to_string(), bytes)?])
    }

    /// A sharded checkpoint: its `.safetensors.index.json` (text `index`, named `label`) and
    /// its shards, opened by `open_shard` from the file names the index gives. Each tensor
    /// must be in the shard the index names (int8 tensors and their scales included, as
    /// stored).
    pub(crate) fn from_index(label: String, index: &str, open_shard: impl Fn(&str) -> Result<SafetensorsFile>) -> Result<Self> {
        let index: serde_json::Value = serde_json::from_str(index).map_err(|e| checkpoint_err(&label, format!("not valid JSON: {e}")))?;
        let map = index["weight_map"]
            .as_object()
            .ok_or_else(|| checkpoint_err(&label, "no `weight_map` object"))?;
        let placed = map
            .iter()
            .map(|(tensor, shard)| {
                let shard = shard
                    .as_str()
                    .ok_or_else(|| checkpoint_err(&label, format!("tensor `{tensor}`: its shard is not a file name")))?;
                Ok((tensor, shard))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut shards: Vec<&str> = placed.iter().map(|&(_, shard)| shard).collect();
        shards.sort_unstable();
        shards.dedup();
        let files = shards.iter().map(|s| open_shard(s)).collect::<Result<Vec<_>>>()?;
        for (tensor, shard) in placed {
            let i = shards.binary_search(&shard).expect("every shard is listed");
            if !files[i].entries.contains_key(tensor) {
                return Err(checkpoint_err(
                    &label,
                    format!("index names tensor `{tensor}` in {}, which does not hold it", shards[i]),
                ));
            }
        }
        Self::from_files(label, files)
    }

    /// A `.safetensors` file, a sharded checkpoint's `.safetensors.index.json`, or a
    /// diffusers component folder (`unet/`, `vae/`, `text_encoder/`, `transformer/` ...).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let label = path.display().to_string();
        if path.is_dir() {
            let found = FOLDER_FILES.iter().map(|f| path.join(f)).find(|p| p.is_file());
            let Some(file) = found else {
                return Err(checkpoint_err(
                    &label,
                    format!("no weights in this folder (looked for {})", FOLDER_FILES.join(", ")),
                ));
            };
            return Self::open(&file);
        }
        if label.ends_with(".index.json") {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: label.clone(),
                source,
            })?;
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            return Self::from_index(label, &text, |shard| SafetensorsFile::open(&dir.join(shard)));
        }
        Self::from_files(label, vec![SafetensorsFile::open(path)?])
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.owner.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let f = &self.files[*self.owner.get(name)?];
        Some(&f.entries[name].shape)
    }

    fn entry(&self, name: &str) -> Result<(&SafetensorsFile, &Entry)> {
        let Some(&i) = self.owner.get(name) else {
            return Err(Error::MissingTensor {
                file: self.label.clone(),
                tensor: name.to_string(),
            });
        };
        Ok((&self.files[i], &self.files[i].entries[name]))
    }

    /// Tensor `name` as `dtype`, checked against `expected` (its shape in the model).
    pub fn load(&self, name: &str, expected: &[usize], dtype: DType) -> Result<HostTensor> {
        if let Some(seed) = self.synthetic {
            return HostTensor::new(expected, HostData::from_f32(dtype, Self::synthesize(seed, name, expected)));
        }
        let (file, entry) = self.entry(name)?;
        if entry.shape != expected {
            // A trailing or leading 1 (conv 1x1 vs linear, scalar vs [1]) is the same data.
            let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
            if numel(&entry.shape) != numel(expected) || squeeze(&entry.shape) != squeeze(expected) {
                return Err(Error::TensorShape {
                    file: file.name.clone(),
                    tensor: name.to_string(),
                    expected: expected.to_vec(),
                    got: entry.shape.clone(),
                });
            }
        }
        let t = file.load(name, entry, dtype)?;
        HostTensor::new(expected, t.data)
    }

    /// Tensor `name` as stored: dtype, shape and little-endian bytes, borrowed from the file
    /// (what content hashes and weight uploads read).
    pub fn raw(&self, name: &str) -> Result<(DType, &[usize], &[u8])> {
        let (file, entry) = self.entry(name)?;
        let dtype = dtype_of(&entry.dtype).ok_or_else(|| {
            checkpoint_err(
                &file.name,
                format!("tensor `{name}` is stored as {}, not f32/f16/bf16", entry.dtype),
            )
        })?;
        Ok((
            dtype,
            &entry.shape,
            &file.bytes[file.data_start + entry.start..file.data_start + entry.end],
        ))
    }

    /// Rows `rows` of the 2-D tensor `name` (an embedding table) as `dtype`, read straight
    /// from the file so the table itself never has to be resident.
    pub fn load_rows(&self, name: &str, rows: &[u32], dtype: DType) -> Result<HostTensor> {
        let (file, entry) = self.entry(name)?;
        let stored = dtype_of(&entry.dtype).filter(|_| entry.shape.len() == 2).ok_or_else(|| {
            checkpoint_err(
                &file.name,
                format!("tensor `{name}` ({} {:?}) is not an f32/f16/bf16 table", entry.dtype, entry.shape),
            )
        })?;
        let (count, width) = (entry.shape[0], entry.shape[1]);
        let row_bytes = width * stored.size();
        let base = file.data_start + entry.start;
        let mut values = Vec::with_capacity(rows.len() * width);
        for &r in rows {
            if r as usize >= count {
                return Err(checkpoint_err(
                    &file.name,
                    format!("token id {r} is outside `{name}`, which has {count} rows"),
                ));
            }
            let at = base + r as usize * row_bytes;
            values.extend_from_slice(&HostData::from_bytes(stored, &file.bytes[at..at + row_bytes]).to_f32());
        }
        HostTensor::new(&[rows.len(), width], HostData::from_f32(dtype, values))
    }

    /// Replaces tensor `name` by `parts.len()` tensors holding equal consecutive row ranges of
    /// it (a fused q/k/v projection becoming three). Rows are contiguous, so this only
    /// re-points byte ranges.
    pub fn split_rows(&mut self, name: &str, parts: &[String]) -> Result<()> {
        let Some(&i) = self.owner.get(name) else {
            return Err(Error::MissingTensor {
                file: self.label.clone(),
                tensor: name.to_string(),
            });
        };
        let file = &mut self.files[i];
        let entry = file.entries.remove(name).expect("owner and entries agree");
        let rows = entry.shape.first().copied().unwrap_or(0);
        if parts.is_empty() || rows % parts.len() != 0 {
            return Err(checkpoint_err(
                &file.name,
                format!("tensor `{name}` {:?} does not split into {} equal parts", entry.shape, parts.len()),
            ));
        }
        let part_bytes = (entry.end - entry.start) / parts.len();
        self.owner.remove(name);
        for (k, part) in parts.iter().enumerate() {
            let mut shape = entry.shape.clone();
            shape[0] = rows / parts.len();
            let start = entry.start + k * part_bytes;
            file.entries.insert(
                part.clone(),
                Entry {
                    dtype: entry.dtype.clone(),
                    shape,
                    start,
                    end: start + part_bytes,
                },
            );
            self.owner.insert(part.clone(), i);
        }
        Ok(())
    }

    /// The same tensors under other names: `rename(stored) -> Some(new)` keeps a tensor
    /// (single-file checkpoints use other key names than diffusers folders).
    pub fn renamed(mut self, rename: impl Fn(&str) -> Option<String>) -> Self {
        for f in &mut self.files {
            f.entries = std::mem::take(&mut f.entries)
                .into_iter()
                .filter_map(|(k, v)| rename(&k).map(|n| (n, v)))
                .collect();
        }
        let files = std::mem::take(&mut self.files);
        let owner = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.entries.keys().map(move |k| (k.clone(), i)))
            .collect();
        Self {
            files,
            owner,
            label: self.label,
            synthetic: self.synthetic,
        }
    }
}

/// Writes `tensors` as one safetensors file, in the order given.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_safetensors(path: &std::path::Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let code = match t.data.dtype() {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        };
        let end = offset + t.data.as_bytes().len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": code, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let header = serde_json::to_vec(&header).expect("a JSON map serializes");
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for (_, t) in tensors {
        out.write_all(t.data.as_bytes()).map_err(io)?;
    }
    out.flush().map_err(io)
}

/// `name` with its first matching prefix `from` replaced by `to` (checkpoint key
/// conversions), or `None` when no prefix matches.
pub fn replace_prefix(name: &str, renames: &[(&str, &str)]) -> Option<String> {
    renames
        .iter()
        .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
}

/// The weights of one module, seen from its prefix: `p.at("down_blocks").at(0).get("conv1.weight", ..)`
/// reads `down_blocks.0.conv1.weight`, converts it to the compute dtype and uploads it.
pub struct Params<'a, B: Backend> {
    pub backend: &'a B,
    pub weights: &'a Weights,
    pub dtype: DType,
    prefix: String,
}

impl<'a, B: Backend> Params<'a, B> {
    pub fn new(backend: &'a B, weights: &'a Weights, dtype: DType) -> Self {
        Self {
            backend,
            weights,
            dtype,
            prefix: String::new(),
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn at(&self, name: impl std::fmt::Display) -> Self {
        Self {
            backend: self.backend,
            weights: self.weights,
            dtype: self.dtype,
            prefix: self.full(&name.to_string()),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.full(name))
    }

    pub fn full_name(&self, name: &str) -> String {
        self.full(name)
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor<B>> {
        self.backend.upload(&self.weights.load(&self.full(name), shape, self.dtype)?)
    }

    /// Tensors whose shape the model reads from the checkpoint (config-free sizes).
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        let full = self.full(name);
        self.weights
            .shape(&full)
            .map(<[usize]>::to_vec)
            .ok_or_else(|| Error::MissingTensor {
                file: self.weights.label.clone(),
                tensor: full,
            })
    }
}
