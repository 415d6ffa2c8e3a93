//! The wgpu backend: the primitives as WGSL compute shaders (`shaders/`), natively on
//! Vulkan / Metal / DX12 and in the browser on WebGPU.
//!
//! Large tensors: a tensor is stored as consecutive chunk buffers, each no larger than one
//! storage binding may be (WebGPU's default is 128 MiB). A kernel sees every tensor through
//! a *window* of two adjacent chunks (`lo`, `hi`) and reads or writes it by global element
//! index through accessor functions generated here (`NAME_ld`, `NAME_st`), which also
//! convert between the storage dtype and f32. Each op's planner (`kernels.rs`) splits its
//! dispatches so that every tensor range a dispatch touches fits one window.
//!
//! Work is queued: dispatches accumulate in one command encoder and are submitted in
//! batches; `read` submits, copies to staging buffers and awaits the mapping without
//! blocking, so the same code runs on wasm32.

mod kernels;
mod plan;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor, Tensor};

/// Bytes of uniform data a batch of dispatches may use before it is submitted.
const UNIFORM_ARENA_BYTES: u64 = 1 << 20;
/// Dispatches recorded before the pending batch is submitted, so the GPU starts early.
const DISPATCHES_PER_SUBMIT: usize = 128;

/// How to set up the wgpu backend.
#[derive(Clone, Debug)]
pub struct WgpuOptions {
    /// Request exactly WebGPU's default limits (128 MiB bindings, 256 MiB buffers, 16 KiB
    /// workgroup memory), as most browsers grant, instead of everything the adapter offers.
    pub default_limits: bool,
    /// Cap on the bytes of one chunk (one binding). Lower than the device limit only to
    /// exercise the splitting paths on small tensors.
    pub max_chunk_bytes: Option<u64>,
    /// Use f16 storage when the adapter has `shader-f16`.
    pub allow_f16: bool,
    /// Most bytes of freed tensor buffers kept for reuse (default 2 GiB). Reuse makes a
    /// denoising loop allocation-free after its first step; a small pool lowers the peak
    /// device memory of work whose tensor sizes keep changing (the streaming video decode).
    pub pool_bytes: u64,
    /// Cap on the keys one attention pass handles before the sequence is split (default:
    /// 1024 on CPU adapters, 16384 on GPUs). Lower only to exercise the split path.
    pub attention_keys_per_pass: Option<usize>,
    /// Use the kernel variants shaped for software adapters, which run a workgroup's
    /// invocations as SIMD lanes of one CPU thread (lavapipe, SwiftShader): softmax,
    /// short-row norms and attention one row per invocation without workgroup barriers,
    /// convolutions as blocks of four output positions by four channels per invocation
    /// (gemm.wgsl's `rows`), larger matrix-product tiles. Default: when the adapter is a
    /// CPU; set to compare or test the variants.
    pub software_kernels: Option<bool>,
    pub power_preference: wgpu::PowerPreference,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        Self {
            default_limits: false,
            max_chunk_bytes: None,
            allow_f16: true,
            pool_bytes: 2 << 30,
            attention_keys_per_pass: None,
            software_kernels: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
        }
    }
}

/// Device memory of one tensor: `chunks[i]` holds elements `i*chunk_elems ..`.
pub struct GpuStorage {
    chunks: Vec<wgpu::Buffer>,
    chunk_elems: usize,
    len: usize,
    pool: Arc<Mutex<BufferPool>>,
}

impl Drop for GpuStorage {
    fn drop(&mut self) {
        if let Ok(mut pool) = self.pool.lock() {
            for b in self.chunks.drain(..) {
                pool.give(b);
            }
        }
    }
}

/// Recycles storage buffers by exact size: a denoising loop allocates the same sizes every
/// step, so after the first step it allocates nothing.
struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
    /// Most bytes kept for reuse; freed buffers beyond it are released.
    limit: u64,
    /// Bytes of every tensor buffer that exists (in use or pooled), and their high-water mark.
    device_bytes: u64,
    peak_bytes: u64,
}

impl BufferPool {
    fn created(&mut self, size: u64) {
        self.device_bytes += size;
        self.peak_bytes = self.peak_bytes.max(self.device_bytes);
    }

    fn take(&mut self, size: u64) -> Option<wgpu::Buffer> {
        let b = self.free.get_mut(&size)?.pop()?;
        self.bytes -= size;
        Some(b)
    }

    fn give(&mut self, b: wgpu::Buffer) {
        if self.bytes + b.size() <= self.limit {
            self.bytes += b.size();
            self.free.entry(b.size()).or_default().push(b);
        } else {
            self.device_bytes -= b.size();
        }
    }
}

pub(crate) struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Dispatches recorded but not yet submitted.
struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
    uniform_cursor: u64,
}

pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    f16: bool,
    chunk_bytes: u64,
    attention_keys_per_pass: usize,
    software_kernels: bool,
    pipelines: Mutex<HashMap<String, Arc<Pipeline>>>,
    pool: Arc<Mutex<BufferPool>>,
    pending: Mutex<Pending>,
    uniforms: wgpu::Buffer,
    /// Bound as the `hi` half of a window that has no second chunk (separate buffers for
    /// read-only and writable slots, which may not alias within one dispatch).
    dummy_read: wgpu::Buffer,
    dummy_write: wgpu::Buffer,
    errors: Arc<Mutex<Vec<String>>>,
}

pub type WgpuTensor = Tensor<WgpuBackend>;

impl WgpuBackend {
    /// Finds an adapter (on native: the `WGPU_BACKEND` environment variable may name one of
    /// vulkan, metal, dx12, gl) and opens a device.
    pub async fn new(options: WgpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(&wgpu::InstanceDescriptor::from_env_or_default());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: options.power_preference,
                force_fallback_adapter: false,
                compatible_surface: None,
            })
            .await
            .map_err(|e| Error::NoAdapter(e.to_string()))?;
        let adapter_limits = adapter.limits();
        let mut limits = if options.default_limits {
            wgpu::Limits::default()
        } else {
            adapter_limits.clone()
        };
        // The generated bindings need eight storage buffers per stage: WebGPU's default.
        limits.max_storage_buffers_per_shader_stage = limits.max_storage_buffers_per_shader_stage.max(8);
        let f16 = options.allow_f16 && adapter.features().contains(wgpu::Features::SHADER_F16);
        let required_features = if f16 { wgpu::Features::SHADER_F16 } else { wgpu::Features::empty() };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("sdlite"),
                required_features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Device(e.to_string()))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));

        // One chunk is one binding; cap at 1 GiB so window indices stay far from u32 overflow.
        let binding = limits.max_storage_buffer_binding_size as u64;
        let mut chunk_bytes = binding.min(limits.max_buffer_size).min(1 << 30);
        if let Some(cap) = options.max_chunk_bytes {
            chunk_bytes = chunk_bytes.min(cap);
        }
        let chunk_bytes = (chunk_bytes / 256 * 256).max(256);

        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffer = |label, size, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let uniforms = buffer(
            "sdlite uniforms",
            UNIFORM_ARENA_BYTES,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let dummy_read = buffer("sdlite dummy read", 256, storage);
        let dummy_write = buffer("sdlite dummy write", 256, storage);
        let info = adapter.get_info();
        // Software adapters (lavapipe) stop shader loops after 65535 iterations, and GPU
        // watchdogs reset long shaders, so long key sequences run in passes.
        let software = info.device_type == wgpu::DeviceType::Cpu;
        let default_keys = if software { 1024 } else { 16384 };
        Ok(Self {
            attention_keys_per_pass: options.attention_keys_per_pass.unwrap_or(default_keys).max(1),
            software_kernels: options.software_kernels.unwrap_or(software),
            info,
            limits,
            f16,
            chunk_bytes,
            pipelines: Mutex::default(),
            pool: Arc::new(Mutex::new(BufferPool {
                free: HashMap::new(),
                bytes: 0,
                limit: options.pool_bytes,
                device_bytes: 0,
                peak_bytes: 0,
            })),
            pending: Mutex::new(Pending {
                encoder: None,
                dispatches: 0,
                uniform_cursor: 0,
            }),
            uniforms,
            dummy_read,
            dummy_write,
            errors,
            device,
            queue,
        })
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Whether the kernel variants for software adapters are in use (`WgpuOptions`).
    pub fn software_kernels(&self) -> bool {
        self.software_kernels
    }

    /// The kernel variant in use, by name: "software" or "gpu".
    pub fn kernel_variant(&self) -> &'static str {
        if self.software_kernels {
            "software"
        } else {
            "gpu"
        }
    }

    /// Bytes of one storage chunk (= the largest binding this backend uses).
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Tensor memory on the device now (in use or pooled for reuse) and its high-water mark
    /// since the last `reset_peak_memory`, in bytes.
    pub fn memory(&self) -> (u64, u64) {
        let pool = self.pool.lock().expect("pool lock");
        (pool.device_bytes, pool.peak_bytes)
    }

    pub fn reset_peak_memory(&self) {
        let mut pool = self.pool.lock().expect("pool lock");
        pool.peak_bytes = pool.device_bytes;
    }

    fn take_errors(&self) -> Result<()> {
        let mut errors = self.errors.lock().expect("error sink lock");
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Gpu(std::mem::take(&mut *errors).join("; ")))
        }
    }

    fn new_storage(&self, len: usize, dtype: DType) -> Result<Arc<GpuStorage>> {
        if len >= u32::MAX as usize {
            return Err(Error::TooLarge {
                op: "alloc",
                what: "tensor".into(),
                elems: len,
                limit_bytes: u32::MAX as u64,
            });
        }
        let chunk_elems = self.chunk_bytes as usize / dtype.size();
        let n_chunks = len.div_ceil(chunk_elems).max(1);
        let mut pool = self.pool.lock().expect("pool lock");
        let chunks = (0..n_chunks)
            .map(|i| {
                let elems = (len - (i * chunk_elems).min(len)).min(chunk_elems);
                let size = ((elems * dtype.size()) as u64).next_multiple_of(4).max(4);
                pool.take(size).unwrap_or_else(|| {
                    pool.created(size);
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("sdlite tensor"),
                        size,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                })
            })
            .collect();
        Ok(Arc::new(GpuStorage {
            chunks,
            chunk_elems,
            len,
            pool: self.pool.clone(),
        }))
    }

    fn new_tensor(&self, shape: &[usize], dtype: DType) -> Result<WgpuTensor> {
        if !crate::backend::Backend::supports(self, dtype) {
            return Err(Error::UnsupportedDType {
                op: "alloc",
                dtype,
                backend: crate::backend::Backend::name(self),
            });
        }
        let storage = self.new_storage(crate::tensor::numel(shape), dtype)?;
        Ok(Tensor::from_storage(storage, shape.to_vec(), dtype))
    }

    /// The compiled pipeline for `key`, built from `source` on first use. `tensors` lists
    /// the tensor parameters in binding order as (writable, bound as a lo/hi pair).
    fn pipeline(&self, key: &str, entry: &str, source: impl FnOnce() -> String, tensors: &[(bool, bool)]) -> Arc<Pipeline> {
        let mut cache = self.pipelines.lock().expect("pipeline cache lock");
        if let Some(p) = cache.get(key) {
            return p.clone();
        }
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(key),
            source: wgpu::ShaderSource::Wgsl(source().into()),
        };
        // SAFETY: every storage index a kernel forms lies inside the window the host planner
        // checked for that dispatch (`plan::window`), and workgroup/private array indices are
        // bounded by the kernel's constants; the cross-backend tests run each kernel under
        // heavy splitting. Without this, naga's injected loop counters and index clamps stop
        // drivers from unrolling the tile loops (over 10x slower on an H100).
        let module = unsafe {
            self.device
                .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
        };
        let uniform = |binding| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![uniform(0), uniform(1)];
        for &(write, pair) in tensors {
            for _ in 0..1 + usize::from(pair) {
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: entries.len() as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: !write },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                });
            }
        }
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(key),
            entries: &entries,
        });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(key),
            bind_group_layouts: &[&layout],
            push_constant_ranges: &[],
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        let p = Arc::new(Pipeline { pipeline, layout });
        cache.insert(key.to_string(), p.clone());
        p
    }

    /// Records one dispatch. `windows[i]` = (tensor, first chunk of its window, writable).
    fn dispatch(&self, p: &Pipeline, windows: &[(&GpuStorage, usize, bool)], params: &[u32], groups: [u32; 3]) {
        let align = self.limits.min_uniform_buffer_offset_alignment as u64;
        let mut win_words = [0u32; 16];
        for (i, (st, chunk, _)) in windows.iter().enumerate() {
            win_words[2 * i] = (chunk * st.chunk_elems) as u32;
            win_words[2 * i + 1] = st.chunk_elems as u32;
        }
        let win_bytes: &[u8] = bytemuck::cast_slice(&win_words);
        // Uniform structs are sized in multiples of 16 bytes.
        let mut param_bytes = bytemuck::cast_slice::<u32, u8>(params).to_vec();
        param_bytes.resize(param_bytes.len().next_multiple_of(16).max(16), 0);
        let win_slot = (win_bytes.len() as u64).next_multiple_of(align);
        let need = win_slot + (param_bytes.len() as u64).next_multiple_of(align);

        let mut pending = self.pending.lock().expect("pending lock");
        if pending.uniform_cursor + need > UNIFORM_ARENA_BYTES || pending.dispatches >= DISPATCHES_PER_SUBMIT {
            self.submit(&mut pending);
        }
        let win_at = pending.uniform_cursor;
        let params_at = win_at + win_slot;
        pending.uniform_cursor += need;
        self.queue.write_buffer(&self.uniforms, win_at, win_bytes);
        self.queue.write_buffer(&self.uniforms, params_at, &param_bytes);

        let uniform = |binding, offset, size: usize| wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.uniforms,
                offset,
                size: wgpu::BufferSize::new(size as u64),
            }),
        };
        let mut entries = vec![uniform(0, win_at, win_bytes.len()), uniform(1, params_at, param_bytes.len())];
        for (st, chunk, write) in windows {
            entries.push(wgpu::BindGroupEntry {
                binding: entries.len() as u32,
                resource: st.chunks[*chunk].as_entire_binding(),
            });
            if st.chunks.len() > 1 {
                let dummy = if *write { &self.dummy_write } else { &self.dummy_read };
                let hi = st.chunks.get(chunk + 1).unwrap_or(dummy);
                entries.push(wgpu::BindGroupEntry {
                    binding: entries.len() as u32,
                    resource: hi.as_entire_binding(),
                });
            }
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.layout,
            entries: &entries,
        });
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("sdlite") })
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            pass.set_pipeline(&p.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        pending.dispatches += 1;
    }

    fn submit(&self, pending: &mut Pending) {
        if let Some(encoder) = pending.encoder.take() {
            self.queue.submit([encoder.finish()]);
        }
        pending.dispatches = 0;
        pending.uniform_cursor = 0;
    }

    /// Submits all queued work.
    pub fn flush(&self) {
        let mut pending = self.pending.lock().expect("pending lock");
        self.submit(&mut pending);
    }

    /// Waits until the GPU has finished all submitted work (native only; benchmarks use it).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn wait_idle(&self) -> Result<()> {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(e.to_string()))?;
        self.take_errors()
    }

    fn upload_host(&self, host: &HostTensor) -> Result<WgpuTensor> {
        let dtype = host.dtype();
        let t = self.new_tensor(&host.shape, dtype)?;
        let bytes = host.data.as_bytes();
        let chunk_bytes = t.storage.chunk_elems * dtype.size();
        // Queue writes land before the next submit, so flush first: earlier dispatches may
        // still use recycled buffers that this upload overwrites.
        self.flush();
        for (i, buf) in t.storage.chunks.iter().enumerate() {
            let part = &bytes[(i * chunk_bytes).min(bytes.len())..((i + 1) * chunk_bytes).min(bytes.len())];
            if part.len().is_multiple_of(4) {
                self.queue.write_buffer(buf, 0, part);
            } else {
                let mut padded = part.to_vec();
                padded.resize(part.len().next_multiple_of(4), 0);
                self.queue.write_buffer(buf, 0, &padded);
            }
        }
        Ok(t)
    }

    /// Queues the copy into staging buffers and asks for their mapping now; the future
    /// waits for them.
    fn read_host(&self, t: &WgpuTensor) -> impl std::future::Future<Output = Result<HostTensor>> + use<'_> {
        let mut staging = Vec::new();
        {
            let mut pending = self.pending.lock().expect("pending lock");
            let encoder = pending.encoder.get_or_insert_with(|| {
                self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("sdlite read"),
                })
            });
            for chunk in &t.storage.chunks {
                let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("sdlite staging"),
                    size: chunk.size(),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                encoder.copy_buffer_to_buffer(chunk, 0, &buf, 0, chunk.size());
                staging.push(buf);
            }
            self.submit(&mut pending);
        }
        let receivers: Vec<_> = staging
            .iter()
            .map(|buf| {
                let (tx, rx) = futures_channel::oneshot::channel();
                buf.map_async(wgpu::MapMode::Read, .., move |r| {
                    let _ = tx.send(r);
                });
                rx
            })
            .collect();
        let (shape, dtype, len) = (t.shape.clone(), t.dtype, t.storage.len);
        async move {
            #[cfg(not(target_arch = "wasm32"))]
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::Readback(e.to_string()))?;
            for rx in receivers {
                rx.await
                    .map_err(|_| Error::Readback("the device dropped the mapping request".into()))?
                    .map_err(|e| Error::Readback(e.to_string()))?;
            }
            self.take_errors()?;
            let size = dtype.size();
            let mut bytes = Vec::with_capacity(len * size);
            for buf in &staging {
                let need = (len * size - bytes.len()).min(buf.size() as usize);
                bytes.extend_from_slice(&buf.get_mapped_range(..)[..need]);
                buf.unmap();
            }
            HostTensor::new(&shape, HostData::from_bytes(dtype, &bytes))
        }
    }
}
