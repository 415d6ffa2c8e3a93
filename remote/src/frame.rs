//! Frame encoding and decoding (layout in `protocol`). The decoder trusts nothing: the header
//! length, the header itself and every tensor's size are checked against the limits before
//! anything is allocated, and a short stream is an error, never a hang past the stream's end.

use half::{bf16, f16};
use sdlite_runtime::{DType, HostData, HostTensor};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{frame_err, Result};
use crate::protocol::{ErrorCode, Header, TensorDesc, WireDType, MAGIC};

#[cfg(target_endian = "big")]
compile_error!("the wire format sends tensors as little-endian bytes straight from memory");

/// Headers are small (names, shapes, ids); this bounds what the bincode decoder may allocate.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// The default limit on a whole frame: the hidden tokens of the full-size Wan2.1 DiT at 81
/// frames 480x832, two rows in f32 (402 MB), fit.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 1 << 30;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_HEADER_BYTES>()
}

/// A tensor to send, borrowed from wherever it lives.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl<'a> From<&'a HostTensor> for TensorRef<'a> {
    fn from(t: &'a HostTensor) -> Self {
        Self {
            dtype: t.data.dtype(),
            shape: &t.shape,
            bytes: t.data.as_bytes(),
        }
    }
}

pub fn wire_dtype(d: DType) -> WireDType {
    match d {
        DType::F32 => WireDType::F32,
        DType::F16 => WireDType::F16,
        DType::BF16 => WireDType::BF16,
    }
}

pub fn runtime_dtype(d: WireDType) -> DType {
    match d {
        WireDType::F32 => DType::F32,
        WireDType::F16 => DType::F16,
        WireDType::BF16 => DType::BF16,
    }
}

/// The header of a frame, encoded; `write_frame` sends it and then the payloads.
fn encode_header<M: Serialize>(message: &M, tensors: &[TensorRef<'_>]) -> Result<Vec<u8>> {
    let header = Header {
        message,
        tensors: tensors
            .iter()
            .map(|t| TensorDesc {
                dtype: wire_dtype(t.dtype),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            })
            .collect(),
    };
    let bytes = bincode::serde::encode_to_vec(&header, bincode_config())
        .map_err(|e| frame_err(ErrorCode::FrameTooLarge, format!("header does not encode: {e}")))?;
    for t in tensors {
        let expected = t.shape.iter().product::<usize>() * t.dtype.size();
        if expected != t.bytes.len() {
            return Err(frame_err(
                ErrorCode::BadTensor,
                format!("tensor {:?} {:?} has {} bytes, not {expected}", t.dtype, t.shape, t.bytes.len()),
            ));
        }
    }
    Ok(bytes)
}

/// Writes one frame; returns its size in bytes.
pub async fn write_frame<W: AsyncWrite + Unpin, M: Serialize>(w: &mut W, message: &M, tensors: &[TensorRef<'_>]) -> Result<u64> {
    let header = encode_header(message, tensors)?;
    let io = |e: std::io::Error| frame_err(ErrorCode::Malformed, format!("sending a frame: {e}"));
    let mut prefix = MAGIC.to_vec();
    prefix.extend_from_slice(&(header.len() as u32).to_le_bytes());
    w.write_all(&prefix).await.map_err(io)?;
    w.write_all(&header).await.map_err(io)?;
    let mut total = (prefix.len() + header.len()) as u64;
    for t in tensors {
        w.write_all(t.bytes).await.map_err(io)?;
        total += t.bytes.len() as u64;
    }
    Ok(total)
}

/// A decoded frame.
#[derive(Debug)]
pub struct Frame<M> {
    pub message: M,
    pub tensors: Vec<HostTensor>,
    /// Bytes the frame took on the wire.
    pub bytes: u64,
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    r.read_exact(buf).await.map(|_| ()).map_err(|e| {
        let detail = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format!("stream ended inside the {what}")
        } else {
            format!("reading the {what}: {e}")
        };
        frame_err(ErrorCode::Malformed, detail)
    })
}

fn typed_zeros(dtype: DType, n: usize) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(vec![0.0; n]),
        DType::F16 => HostData::F16(vec![f16::ZERO; n]),
        DType::BF16 => HostData::BF16(vec![bf16::ZERO; n]),
    }
}

fn bytes_mut(data: &mut HostData) -> &mut [u8] {
    match data {
        HostData::F32(v) => bytemuck::cast_slice_mut(v),
        HostData::F16(v) => bytemuck::cast_slice_mut(v),
        HostData::BF16(v) => bytemuck::cast_slice_mut(v),
    }
}

/// Reads one frame of at most `max_bytes`.
pub async fn read_frame<R: AsyncRead + Unpin, M: DeserializeOwned>(r: &mut R, max_bytes: u64) -> Result<Frame<M>> {
    let mut prefix = [0u8; 8];
    read_exact(r, &mut prefix, "frame prefix").await?;
    if prefix[..4] != MAGIC {
        return Err(frame_err(
            ErrorCode::Malformed,
            format!("bad magic {:02x?} (not an sdlite peer?)", &prefix[..4]),
        ));
    }
    let header_len = u32::from_le_bytes(prefix[4..].try_into().expect("4 bytes")) as usize;
    if header_len > MAX_HEADER_BYTES || header_len as u64 + 8 > max_bytes {
        return Err(frame_err(
            ErrorCode::FrameTooLarge,
            format!("header of {header_len} bytes is over the limit ({MAX_HEADER_BYTES} bytes, frame {max_bytes})"),
        ));
    }
    let mut header = vec![0u8; header_len];
    read_exact(r, &mut header, "header").await?;
    let (decoded, used): (Header<M>, usize) = bincode::serde::decode_from_slice(&header, bincode_config())
        .map_err(|e| frame_err(ErrorCode::Malformed, format!("header does not decode: {e}")))?;
    if used != header_len {
        return Err(frame_err(
            ErrorCode::Malformed,
            format!("header has {} trailing bytes", header_len - used),
        ));
    }
    let mut total = 8 + header_len as u64;
    let mut sizes = Vec::with_capacity(decoded.tensors.len());
    for (i, desc) in decoded.tensors.iter().enumerate() {
        let dtype = runtime_dtype(desc.dtype);
        let elems = desc.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let bytes = elems.and_then(|n| n.checked_mul(dtype.size() as u64));
        match bytes.and_then(|b| total.checked_add(b)) {
            Some(t) if t <= max_bytes => total = t,
            _ => {
                return Err(frame_err(
                    ErrorCode::FrameTooLarge,
                    format!(
                        "tensor {i} {:?} {:?} takes the frame over its {max_bytes}-byte limit",
                        desc.dtype, desc.shape
                    ),
                ))
            }
        }
        let shape: Vec<usize> = desc.shape.iter().map(|&d| d as usize).collect();
        sizes.push((dtype, shape, elems.expect("checked above") as usize));
    }
    let mut tensors = Vec::with_capacity(sizes.len());
    for (i, (dtype, shape, n)) in sizes.into_iter().enumerate() {
        let mut data = typed_zeros(dtype, n);
        read_exact(r, bytes_mut(&mut data), &format!("payload of tensor {i}")).await?;
        tensors.push(HostTensor::new(&shape, data).map_err(|e| frame_err(ErrorCode::BadTensor, e.to_string()))?);
    }
    Ok(Frame {
        message: decoded.message,
        tensors,
        bytes: total,
    })
}
