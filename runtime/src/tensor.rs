//! Tensors: a shape, a dtype and backend-owned contiguous storage.

use half::{bf16, f16};

use crate::backend::Backend;
use crate::error::{shape_err, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Rounds an f32 to the nearest value this dtype can store.
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a contiguous tensor.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Element data living in host memory, in the dtype it is stored as.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn from_f32(dtype: DType, values: Vec<f32>) -> Self {
        match dtype {
            DType::F32 => HostData::F32(values),
            DType::F16 => HostData::F16(values.into_iter().map(f16::from_f32).collect()),
            DType::BF16 => HostData::BF16(values.into_iter().map(bf16::from_f32).collect()),
        }
    }

    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            HostData::F32(v) => std::borrow::Cow::Borrowed(v),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect::<Vec<_>>().into(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect::<Vec<_>>().into(),
        }
    }

    /// `len` zeros.
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => HostData::F32(vec![0.0; len]),
            DType::F16 => HostData::F16(vec![f16::ZERO; len]),
            DType::BF16 => HostData::BF16(vec![bf16::ZERO; len]),
        }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice_mut(v),
            HostData::F16(v) => bytemuck::cast_slice_mut(v),
            HostData::BF16(v) => bytemuck::cast_slice_mut(v),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
        }
    }

    /// Decodes little-endian bytes of the given dtype.
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Self {
        match dtype {
            DType::F32 => HostData::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => HostData::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => HostData::BF16(bytemuck::pod_collect_to_vec(bytes)),
        }
    }

    pub fn convert(&self, dtype: DType) -> HostData {
        if dtype == self.dtype() {
            return self.clone();
        }
        HostData::from_f32(dtype, self.to_f32().into_owned())
    }
}

/// A tensor in host memory: what goes into `Backend::upload` and comes out of `Backend::read`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn new(shape: &[usize], data: HostData) -> Result<Self> {
        let expected = numel(shape);
        if data.len() != expected {
            return Err(Error::DataLength {
                shape: shape.to_vec(),
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            shape: shape.to_vec(),
            data,
        })
    }

    pub fn from_f32(shape: &[usize], values: Vec<f32>) -> Result<Self> {
        Self::new(shape, HostData::F32(values))
    }

    /// Zeros of `shape`.
    pub fn zeros(shape: &[usize], dtype: DType) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            data: HostData::zeros(dtype, numel(shape)),
        }
    }

    /// Overwrites indices `start..start + part.shape[dim]` of dimension `dim` with `part`,
    /// which agrees with this tensor in dtype and every other dimension.
    pub fn set_slice(&mut self, dim: usize, start: usize, part: &HostTensor) -> Result<()> {
        let fits = part.shape.len() == self.shape.len()
            && dim < self.shape.len()
            && (0..self.shape.len()).all(|i| i == dim || part.shape[i] == self.shape[i])
            && start + part.shape[dim] <= self.shape[dim];
        if !fits || part.dtype() != self.dtype() {
            return Err(shape_err(
                "set_slice",
                format!(
                    "a {:?} {:?} part does not fit {:?} {:?} at {start} of dimension {dim}",
                    part.dtype(),
                    part.shape,
                    self.dtype(),
                    self.shape
                ),
            ));
        }
        // One run of bytes per index of the dimensions before `dim`.
        let size = self.dtype().size();
        let (run, part_run) = (numel(&self.shape[dim..]) * size, numel(&part.shape[dim..]) * size);
        let offset = start * numel(&self.shape[dim + 1..]) * size;
        let src = part.data.as_bytes();
        let dst = self.data.as_bytes_mut();
        for o in 0..numel(&self.shape[..dim]) {
            let at = o * run + offset;
            dst[at..at + part_run].copy_from_slice(&src[o * part_run..(o + 1) * part_run]);
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.data.to_f32().into_owned()
    }

    /// Largest absolute difference from `want` divided by `want`'s largest magnitude: the
    /// error relative to the tensor's scale. NaN or infinity anywhere, or differing shapes,
    /// count as infinite error.
    pub fn relative_error(&self, want: &HostTensor) -> f32 {
        if self.shape != want.shape {
            return f32::INFINITY;
        }
        let (g, w) = (self.to_f32(), want.to_f32());
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
        let mut worst = 0f32;
        for (a, b) in g.iter().zip(&w) {
            if !a.is_finite() || !b.is_finite() {
                return f32::INFINITY;
            }
            worst = worst.max((a - b).abs());
        }
        worst / scale
    }

    pub fn to_dtype(&self, dtype: DType) -> HostTensor {
        HostTensor {
            shape: self.shape.clone(),
            data: self.data.convert(dtype),
        }
    }
}

/// A contiguous, row-major tensor owned by backend `B`. Cloning is cheap (shared storage);
/// reshaping is free; every other op produces a new tensor.
pub struct Tensor<B: Backend + ?Sized> {
    pub(crate) storage: B::Storage,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
}

impl<B: Backend + ?Sized> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Self {
            storage: self.storage.clone(),
            shape: self.shape.clone(),
            dtype: self.dtype,
        }
    }
}

impl<B: Backend + ?Sized> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype)
    }
}

impl<B: Backend + ?Sized> Tensor<B> {
    /// Wraps backend storage; backends call this for the tensors they create.
    pub fn from_storage(storage: B::Storage, shape: Vec<usize>, dtype: DType) -> Self {
        Self { storage, shape, dtype }
    }

    pub fn storage(&self) -> &B::Storage {
        &self.storage
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The same storage seen with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return Err(crate::error::shape_err(
                "reshape",
                format!("cannot view {:?} ({} elements) as {:?}", self.shape, self.numel(), shape),
            ));
        }
        Ok(Self {
            storage: self.storage.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn counting(shape: &[usize], from: f32, dtype: DType) -> HostTensor {
        let values = (0..numel(shape)).map(|i| from + i as f32).collect();
        HostTensor::new(shape, HostData::from_f32(dtype, values)).unwrap()
    }

    #[test]
    fn slices_set_on_the_host_agree_with_the_device_concat() {
        let b = CpuBackend;
        for dim in 0..3 {
            let mut second = vec![2, 3, 4];
            second[dim] = 5;
            let parts = [counting(&[2, 3, 4], 0.0, DType::BF16), counting(&second, 100.0, DType::BF16)];
            let on_device: Vec<_> = parts.iter().map(|p| b.upload(p).unwrap()).collect();
            let want = pollster::block_on(b.read(&crate::ops::concat(&b, &on_device.iter().collect::<Vec<_>>(), dim).unwrap())).unwrap();
            let mut got = HostTensor::zeros(&want.shape, DType::BF16);
            got.set_slice(dim, parts[0].shape[dim], &parts[1]).unwrap();
            got.set_slice(dim, 0, &parts[0]).unwrap();
            assert_eq!(got, want, "dimension {dim}");
        }
    }

    #[test]
    fn set_slice_refuses_parts_that_do_not_fit() {
        let mut t = HostTensor::zeros(&[2, 3], DType::F32);
        let part = counting(&[2, 2], 0.0, DType::F32);
        assert!(t.set_slice(1, 2, &part).is_err(), "past the end");
        assert!(t.set_slice(0, 0, &part).is_err(), "other dimension differs");
        assert!(t.set_slice(2, 0, &part).is_err(), "no such dimension");
        assert!(t.set_slice(1, 0, &counting(&[2, 2], 0.0, DType::F16)).is_err(), "dtype");
        assert!(t.set_slice(1, 0, &counting(&[2, 2, 1], 0.0, DType::F32)).is_err(), "rank");
        t.set_slice(1, 1, &part).unwrap();
        assert_eq!(t.to_f32(), vec![0.0, 0.0, 1.0, 0.0, 2.0, 3.0]);
    }
}
