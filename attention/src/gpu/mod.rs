//! The CUDA backend: paged decode attention on an NVIDIA GPU.
//!
//! - [`Gpu::open`] loads the driver (`libcuda`) at run time through `cudarc`'s dynamic loading, so
//!   the binary builds and runs on machines without CUDA and says plainly why when there is no
//!   driver or no device ([`GpuError`]).
//! - Kernels are CUDA C (`kernels.cu`), compiled by NVRTC for the device's architecture at first
//!   use, one variant per shape, codec and page size, and cached on disk ([`cache_dir`]) per
//!   source, options and driver version: the second process to use a shape loads its PTX instead
//!   of compiling it, and a cached file the driver refuses is compiled again.
//! - Pages live in device memory ([`DevicePages`]) in exactly the byte layout the cache nodes
//!   store (`core/src/layout.rs`); a decode takes, per sequence, the query, its pages in order
//!   (all but the last full) and the tokens to skip (a window), like [`crate::BatchItem`].
//! - GQA/MHA/MQA is memory-bound: each block streams one KV head's rows of one range of tokens
//!   once for all the query heads of its group (`gqa_mma` on tensor cores for bf16/fp8 pages,
//!   `gqa_decode` on CUDA cores for the rest). MLA is compute-bound at 128 heads and runs on tensor
//!   cores: `mla_wgmma` (Hopper's warpgroup MMA, compiled for `sm_90a`; bf16 pages, and fp8 pages
//!   of 512 + 64 widened to bf16 through registers), else `mla_decode` (`mma.sync`, f32
//!   accumulation; fp8/int8 latents widened to bf16 in shared memory, exactly). Long contexts are split over blocks (split-K) and merged by
//!   `merge_partials` with the exact log-sum-exp rule of [`crate::merge`].
//!
//! Precision, per path (checked against the float64 reference in `tests/gpu.rs`):
//! - GQA accumulates in f32: on CUDA cores from f32 operands, like the CPU; on tensor cores from
//!   the query and P split into two bf16 parts each (products exact to 2^-17). ≤ 1e-5 relative L2
//!   (measured 3–5e-7 and 3–6e-6 on the H200).
//! - MLA multiplies bf16 (f16 pages: f16) operands with f32 accumulation: the query goes in
//!   rounded to bf16 (exact for the bf16 queries a bf16 engine sends; the softmax scale is applied
//!   to the f32 scores after the product) and the probabilities P are rounded to bf16 for P·V.
//!   bf16 and fp8 pages are exact in bf16 (fp8 scales are powers of two): ≤ 2e-3 relative L2
//!   (measured 5e-4); f16 pages in f16: measured 6e-5; int8 pages (a per-row f32 scale) are
//!   rounded to bf16 when widened: ≤ 1e-2. A full-f32 query is rounded too: ≤ 1e-2 (4e-3
//!   measured on random data).
//!
//! A page holding NaN or infinity yields `NonFiniteResult` for its sequence, as on the CPU.

use crate::{AttentionError, AttnShape};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
    PinnedHostSlice, PushKernelArg, sys,
};
use kvcache_core::{Codec, PageLayout};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const SOURCE: &str = include_str!("kernels.cu");
const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Why the GPU backend could not run.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No NVIDIA driver library on this machine.
    #[error("no CUDA driver: libcuda could not be loaded (is the NVIDIA driver installed and on the library path?)")]
    NoDriver,
    /// The driver loaded but reports no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice {
        /// Asked for.
        ordinal: usize,
        /// Present.
        count: i32,
    },
    /// NVRTC is needed to compile a kernel that is not in the disk cache.
    #[error(
        "NVRTC (libnvrtc) could not be loaded to compile a kernel: install the CUDA runtime compiler or put it on LD_LIBRARY_PATH"
    )]
    NoCompiler,
    /// A kernel failed to compile (a bug: the log says where).
    #[error("kernel compilation failed: {0}")]
    Compile(String),
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// The shape or codec has no GPU kernel.
    #[error("not supported on the GPU: {0}")]
    Unsupported(String),
    /// The request needs more device memory than the caller's bound allows.
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    /// The request itself is wrong (as on the CPU).
    #[error(transparent)]
    Attention(#[from] AttentionError),
}

/// Where compiled kernels are cached: `$KVCACHE_CUDA_CACHE`, else `$XDG_CACHE_HOME/kvcache/cuda`,
/// else `$HOME/.cache/kvcache/cuda`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KVCACHE_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("kvcache/cuda"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kvcache/cuda"))
}

fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// One GPU, its stream and its compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    cc: (i32, i32),
    sms: usize,
    smem_optin: usize,
    cache: Option<PathBuf>,
    /// The driver's CUDA version (`cuDriverGetVersion`, e.g. 13000), part of the PTX cache key.
    driver: i32,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    /// The buffers [`Gpu::decode_batch`] reuses from call to call.
    workspace: Mutex<Workspace>,
}

/// Buffers kept between [`Gpu::decode_batch`] calls, grown as batches need: the batch's inputs
/// (page table, work list, queries) packed into one pinned host buffer and sent in one copy,
/// the outputs read back into another in one copy, and the device buffers behind them. A call
/// makes no allocation once the largest batch shape has been seen, and copies from and to
/// pinned memory run at the bus's rate (pageable copies go through the driver's bounce
/// buffers).
#[derive(Default)]
struct Workspace {
    host_in: Option<PinnedHostSlice<u8>>,
    host_out: Option<PinnedHostSlice<u8>>,
    dev_in: Option<CudaSlice<u8>>,
    dev_part: Option<CudaSlice<u8>>,
    dev_out: Option<CudaSlice<u8>>,
}

/// Device addresses of a batch's arrays, as the kernels take them.
#[derive(Clone, Copy)]
struct Args {
    page_ptrs: u64,
    seq_page0: u64,
    seq_tokens: u64,
    work: u64,
    seq_work0: u64,
    q: u64,
    part_o: u64,
    part_lse: u64,
    out: u64,
    lse: u64,
}

/// A batch laid out for the kernels, on the host: per sequence its first page in the table,
/// its tokens and attended range, and the split-K work items.
struct BatchLayout {
    kernel: Kernel,
    page_ptrs: Vec<u64>,
    seq_page0: Vec<i32>,
    seq_tokens: Vec<i32>,
    work: Vec<i32>,
    seq_work0: Vec<i32>,
    attended: Vec<usize>,
    n_work: usize,
}

/// Offsets of consecutive arrays of `sizes` bytes in one buffer, each 256-byte aligned, and the
/// total.
fn pack(sizes: &[usize]) -> (Vec<usize>, usize) {
    let mut at = 0;
    let offs = sizes
        .iter()
        .map(|&n| {
            let o = at;
            at = (at + n).next_multiple_of(256);
            o
        })
        .collect();
    (offs, at.max(256))
}

/// `bytes` as `n` values of `T` (a plain number type, any bit pattern valid).
fn cast_mut<T: Copy>(bytes: &mut [u8], n: usize) -> &mut [T] {
    assert!(bytes.len() >= n * std::mem::size_of::<T>());
    assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    // SAFETY: in bounds and aligned (checked); T is u64, i32 or f32 here, valid for any bits.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), n) }
}

fn cast<T: Copy>(bytes: &[u8], n: usize) -> &[T] {
    assert!(bytes.len() >= n * std::mem::size_of::<T>());
    assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    // SAFETY: as in `cast_mut`.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) }
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.describe())
    }
}

impl Gpu {
    /// Open device `ordinal` (`cuda:N`). Fails with [`GpuError::NoDriver`] or
    /// [`GpuError::NoDevice`] on a machine without one, never by panicking.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, GpuError> {
        Self::open_with_cache(ordinal, cache_dir())
    }

    /// [`Gpu::open`] caching compiled kernels in `cache` (`None`: compile in every process).
    pub fn open_with_cache(ordinal: usize, cache: Option<PathBuf>) -> Result<Arc<Gpu>, GpuError> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        cudarc::driver::result::init()?;
        let count = CudaContext::device_count()?;
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let name = ctx.name()?;
        let cc = ctx.compute_capability()?;
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let smem_optin =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let mut driver = 0i32;
        // SAFETY: the driver library is loaded (checked above) and initialized; one out int.
        unsafe { sys::cuDriverGetVersion(&mut driver) }.result()?;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            name,
            cc,
            sms,
            smem_optin,
            cache,
            driver,
            modules: Mutex::new(HashMap::new()),
            workspace: Mutex::new(Workspace::default()),
        }))
    }

    /// "NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB)".
    pub fn describe(&self) -> String {
        let mem = self.ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
        format!("{} (sm_{}{}, {} SMs, {mem:.1} GiB)", self.name, self.cc.0, self.cc.1, self.sms)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Streaming multiprocessors.
    pub fn sms(&self) -> usize {
        self.sms
    }

    /// The stream every call of this backend runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The module compiled with `defines`, from memory, the disk cache or NVRTC.
    /// `arch_specific` compiles for the architecture-specific target (`sm_90a`: Hopper's `wgmma`),
    /// whose code runs only on that exact architecture.
    fn module(&self, defines: &[(&str, i64)], arch_specific: bool) -> Result<Arc<CudaModule>, GpuError> {
        let suffix = if arch_specific { "a" } else { "" };
        let arch = format!("sm_{}{}{suffix}", self.cc.0, self.cc.1);
        let mut opts: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
        opts.push(format!("--gpu-architecture={arch}"));
        opts.push("--std=c++17".into());
        opts.push("-lineinfo".into());
        let key = opts.join(" ");
        if let Some(m) = self.modules.lock().expect("module map").get(&key) {
            return Ok(m.clone());
        }
        let header = format!("// kvcache kernel: {key}\n");
        // One file per driver version too: a cache directory shared by machines (a volume) never
        // hands one driver the PTX another's NVRTC wrote for it.
        let file = self.cache.as_ref().map(|d| {
            let driver = self.driver.to_le_bytes();
            d.join(format!("{:016x}.ptx", fnv64(&[SOURCE.as_bytes(), key.as_bytes(), &driver])))
        });
        let cached = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).filter(|s| s.starts_with(&header));
        if let Some(text) = cached {
            // A cached file this driver refuses (written by a newer NVRTC, or damaged) is compiled
            // again and replaced, not an error.
            if let Ok(m) = self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(text)) {
                self.modules.lock().expect("module map").insert(key, m.clone());
                return Ok(m);
            }
        }
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::NoCompiler);
        }
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(
            SOURCE,
            cudarc::nvrtc::CompileOptions { options: opts.clone(), ..Default::default() },
        )
        .map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                GpuError::Compile(format!("{key}: {}", log.to_string_lossy()))
            }
            other => GpuError::Compile(format!("{key}: {other:?}")),
        })?;
        let text = format!("{header}{}", ptx.to_src());
        if let Some(f) = &file {
            // A cache that cannot be written only costs the next process a compile.
            let _ = f.parent().map(std::fs::create_dir_all);
            let tmp = f.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &text).is_ok() {
                let _ = std::fs::rename(&tmp, f);
            }
        }
        let m = self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(text))?;
        self.modules.lock().expect("module map").insert(key, m.clone());
        Ok(m)
    }

    fn function(&self, defines: &[(&str, i64)], name: &str) -> Result<CudaFunction, GpuError> {
        // Every batch looks its kernels up first: bind the device's context to this thread
        // (a blocking pool's, possibly new), which the lookups and the raw copies after it need.
        self.ctx.bind_to_thread()?;
        Ok(self.module(defines, false)?.load_function(name)?)
    }

    /// `count` zeroed page slots of one full page of `layout` each (256-byte aligned).
    pub fn alloc_slots(&self, layout: &PageLayout, count: usize) -> Result<DevicePages, GpuError> {
        let slot = layout.page_bytes().next_multiple_of(256);
        let buf = self.stream.alloc_zeros::<u8>((count * slot).max(256))?;
        let base = {
            let (ptr, _sync) = buf.device_ptr(&self.stream);
            ptr
        };
        let pages = (0..count).map(|i| PageRef { ptr: base + (i * slot) as u64, len: 0, tokens: 0 }).collect();
        Ok(DevicePages { buf, pages, layout: *layout, slot })
    }

    /// Write a stored payload of `tokens` tokens into slot `index` (its planes spread a full page
    /// apart, see [`spread`]).
    pub fn write_page(
        &self,
        pages: &mut DevicePages,
        index: usize,
        payload: &[u8],
        tokens: usize,
    ) -> Result<(), GpuError> {
        self.write_page_with(pages, index, payload, tokens, &mut Vec::new())
    }

    /// [`Gpu::write_page`] staging through `host`, a buffer the caller keeps between calls.
    pub fn write_page_with(
        &self,
        pages: &mut DevicePages,
        index: usize,
        payload: &[u8],
        tokens: usize,
        host: &mut Vec<u8>,
    ) -> Result<(), GpuError> {
        let l = pages.layout;
        let expected = l.payload_bytes(tokens);
        if payload.len() != expected || tokens > l.page_tokens || index >= pages.pages.len() {
            return Err(AttentionError::PageLength { index, got: payload.len(), expected, tokens }.into());
        }
        host.resize(l.page_bytes(), 0);
        spread(&l, payload, tokens, host);
        let at = index * pages.slot;
        let mut dst = pages.buf.slice_mut(at..at + host.len());
        self.stream.memcpy_htod(&host[..], &mut dst)?;
        pages.pages[index].len = payload.len();
        pages.pages[index].tokens = tokens;
        Ok(())
    }

    /// Page-lock `len` bytes of host memory at `ptr` with the driver, so that
    /// [`Gpu::write_pages_staged`] copies full pages out of it by DMA, with no staging copy.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must stay mapped (and not be unmapped or remapped) until the returned
    /// region drops.
    pub unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<HostRegion, GpuError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the caller vouches for the range; PORTABLE: usable from every context.
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE) }.result()?;
        Ok(HostRegion { ctx: self.ctx.clone(), ptr: ptr as usize, len })
    }

    /// Two pinned host buffers of about `bytes` each (at least one page slot), for
    /// [`Gpu::write_pages_staged`].
    pub fn staging(&self, layout: &PageLayout, bytes: usize) -> Result<Staging, GpuError> {
        let slot = layout.page_bytes().next_multiple_of(256);
        let per = (bytes / slot).max(1);
        let bufs = (0..2)
            .map(|_| {
                // SAFETY: u8 has no invalid bit patterns; the buffer is zeroed before any use.
                let mut b = unsafe { self.ctx.alloc_pinned::<u8>(per * slot) }?;
                b.as_mut_slice()?.fill(0);
                Ok(b)
            })
            .collect::<Result<Vec<_>, DriverError>>()?;
        Ok(Staging { bufs, done: vec![None, None], next: 0, layout: *layout, per })
    }

    /// Write stored payloads into slots of `pages` (each spread a full page apart, see
    /// [`spread`]), through `staging`'s two pinned buffers: a buffer's pages are spread on up to
    /// eight threads, then copied to their slots asynchronously (one copy per run of
    /// consecutive slots) while the host fills the other buffer. The copies are ordered before
    /// anything launched on the stream afterwards. Every write is checked before any is made.
    ///
    /// With `direct`, a full page (its stored layout is the slot's) that lies in that registered
    /// region goes up by DMA straight from it: the caller keeps such payloads alive and
    /// unchanged until the stream is next waited for. Returns how many went up that way.
    pub fn write_pages_staged(
        &self,
        pages: &mut DevicePages,
        writes: &[PageWrite],
        staging: &mut Staging,
        direct: Option<&HostRegion>,
    ) -> Result<usize, GpuError> {
        // Raw copies below: this thread may never have called the device before.
        self.ctx.bind_to_thread()?;
        let l = pages.layout;
        for w in writes {
            let expected = l.payload_bytes(w.tokens);
            if w.payload.len() != expected || w.tokens > l.page_tokens || w.index >= pages.pages.len() {
                return Err(AttentionError::PageLength {
                    index: w.index,
                    got: w.payload.len(),
                    expected,
                    tokens: w.tokens,
                }
                .into());
            }
        }
        if staging.layout != l {
            return Err(GpuError::Unsupported("staging buffers of another page layout".into()));
        }
        let slot = pages.slot;
        let whole = |w: &PageWrite| w.tokens == l.page_tokens && direct.is_some_and(|r| r.contains(w.payload));
        let mut dma = 0;
        for w in writes.iter().filter(|w| whole(w)) {
            // SAFETY: the slot holds a full page (checked in range above) and the payload is one
            // full page's bytes, page-locked in `direct`, kept alive by the caller until the
            // stream is waited for.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(pages.pages[w.index].ptr, w.payload, self.stream.cu_stream())
            }?;
            pages.pages[w.index].len = w.payload.len();
            pages.pages[w.index].tokens = w.tokens;
            dma += 1;
        }
        if dma == writes.len() {
            return Ok(dma);
        }
        let staged: Vec<PageWrite>;
        let writes = if dma > 0 {
            staged = writes.iter().filter(|w| !whole(w)).copied().collect();
            &staged[..]
        } else {
            writes
        };
        for chunk in writes.chunks(staging.per) {
            let k = staging.next;
            staging.next = 1 - k;
            // The copies out of this buffer two rounds ago have run.
            if let Some(e) = &staging.done[k] {
                e.synchronize()?;
            }
            let buf = &mut staging.bufs[k];
            let host = buf.as_mut_slice()?;
            let parts: Vec<(&mut [u8], &PageWrite)> = host.chunks_mut(slot).zip(chunk).collect();
            let threads = crate::par::threads_for(chunk.len() * slot);
            crate::par::for_each(parts, threads, |(dst, w)| spread(&l, w.payload, w.tokens, dst));
            let host = buf.as_slice()?;
            let mut i = 0;
            while i < chunk.len() {
                let mut j = i + 1;
                while j < chunk.len() && chunk[j].index == chunk[j - 1].index + 1 {
                    j += 1;
                }
                let dst = pages.pages[chunk[i].index].ptr;
                // SAFETY: slots i..j are consecutive in `pages` (one allocation, `slot` bytes
                // apart, checked in range above), so `dst` has (j - i) × slot bytes; the pinned
                // source is not written again before this buffer's event has completed.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(dst, &host[i * slot..j * slot], self.stream.cu_stream())
                }?;
                i = j;
            }
            match &staging.done[k] {
                Some(e) => e.record(&self.stream)?,
                None => staging.done[k] = Some(self.stream.record_event(None)?),
            }
            for w in chunk {
                pages.pages[w.index].len = w.payload.len();
                pages.pages[w.index].tokens = w.tokens;
            }
        }
        Ok(dma)
    }

    /// Buffers for [`Gpu::append_rows`] in `layout`, sized for `rows` token rows at first
    /// (grown when a step appends more).
    pub fn row_staging(&self, layout: &PageLayout, rows: usize) -> Result<RowStaging, GpuError> {
        let mut st = RowStaging { host: None, dev: None, layout: *layout };
        self.grow_rows(&mut st, rows.max(1))?;
        Ok(st)
    }

    fn grow_rows(&self, st: &mut RowStaging, rows: usize) -> Result<(), GpuError> {
        let l = st.layout;
        let need = pack(&[rows * l.planes * 8, rows * l.planes * l.row_bytes]).1;
        if st.host.as_ref().is_none_or(|h| h.len() < need) {
            // The previous step's copy may still read the old buffer: let it finish first.
            self.stream.synchronize()?;
            // SAFETY: u8 has no invalid bit patterns; the bytes copied are written first.
            st.host = Some(unsafe { self.ctx.alloc_pinned::<u8>(need + need / 2) }?);
            st.dev = Some(self.stream.alloc_zeros::<u8>(need + need / 2)?);
        }
        Ok(())
    }

    /// Append one token to each page of `appends` (slot `index` of `pages` holding `at` tokens
    /// gets the token's compact payload `rows` after them), in place: the rows and their
    /// addresses go up in one copy and a kernel scatters them (one row per plane), ordered
    /// before anything launched on the stream afterwards. The rest of each page is not copied
    /// again. Refused whole, before anything is written, if any append does not fit its slot.
    pub fn append_rows(
        &self,
        pages: &mut DevicePages,
        appends: &[RowAppend],
        staging: &mut RowStaging,
    ) -> Result<(), GpuError> {
        self.ctx.bind_to_thread()?;
        let l = pages.layout;
        let expected = l.payload_bytes(1);
        let mut held: HashMap<usize, usize> = HashMap::new();
        for a in appends {
            let now = held.get(&a.index).copied().or_else(|| pages.pages.get(a.index).map(|p| p.tokens));
            if a.rows.len() != expected || now != Some(a.at) || a.at >= l.page_tokens || staging.layout != l {
                return Err(AttentionError::PageLength {
                    index: a.index,
                    got: a.rows.len(),
                    expected,
                    tokens: a.at + 1,
                }
                .into());
            }
            held.insert(a.index, a.at + 1);
        }
        if appends.is_empty() {
            return Ok(());
        }
        self.grow_rows(staging, appends.len())?;
        let (rb, full, n) = (l.row_bytes, l.page_tokens * l.row_bytes, appends.len() * l.planes);
        let (offs, len) = pack(&[n * 8, n * rb]);
        let (Some(host), Some(dev)) = (&mut staging.host, &mut staging.dev) else { unreachable!("grown above") };
        // The previous step's copy out of this buffer has run: the stream was waited for since
        // (the step's decode reads back), and growing waits too.
        self.stream.synchronize()?;
        let base = {
            let (b, _sync) = pages.buf.device_ptr(&self.stream);
            b
        };
        {
            let h = host.as_mut_slice()?;
            let (addrs, data) = h.split_at_mut(offs[1]);
            let addrs = cast_mut::<u64>(&mut addrs[offs[0]..], n);
            let mut r = 0;
            for a in appends {
                for p in 0..l.planes {
                    addrs[r] = base + (a.index * pages.slot + p * full + a.at * rb) as u64;
                    data[r * rb..(r + 1) * rb].copy_from_slice(&a.rows[p * rb..(p + 1) * rb]);
                    r += 1;
                }
            }
        }
        let (d, _sync) = dev.device_ptr_mut(&self.stream);
        let src = &host.as_slice()?[..len];
        // SAFETY: `d` holds at least `len` bytes; the pinned bytes are not written again before
        // the stream is waited for (above, at the next call).
        unsafe { cudarc::driver::result::memcpy_htod_async(d, src, self.stream.cu_stream()) }?;
        let f = self.function(&[("KV_MERGE", 1)], "scatter_rows")?;
        let (dst, rows, words, count) = (d + offs[0] as u64, d + offs[1] as u64, (rb / 4) as i32, n as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&dst).arg(&rows).arg(&words).arg(&count);
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: every address is a row inside a slot of `pages` (checked above: the slot holds
        // `at` < page_tokens tokens), row_bytes is a multiple of 4 (every codec's row), and the
        // sources are the `n` rows just copied.
        unsafe { b.launch(cfg) }?;
        for a in appends {
            let p = &mut pages.pages[a.index];
            p.tokens = a.at + 1;
            p.len = l.payload_bytes(a.at + 1);
        }
        Ok(())
    }

    /// Copy pages to the device: one allocation, one slot per page.
    pub fn upload_pages(&self, layout: &PageLayout, pages: &[crate::KvPage]) -> Result<DevicePages, GpuError> {
        let mut dp = self.alloc_slots(layout, pages.len())?;
        let mut host = vec![0u8; pages.len() * dp.slot];
        for (i, p) in pages.iter().enumerate() {
            let expected = layout.payload_bytes(p.tokens);
            if p.payload.len() != expected || p.tokens > layout.page_tokens {
                return Err(
                    AttentionError::PageLength { index: i, got: p.payload.len(), expected, tokens: p.tokens }.into()
                );
            }
            spread(layout, p.payload, p.tokens, &mut host[i * dp.slot..i * dp.slot + layout.page_bytes()]);
            dp.pages[i].len = p.payload.len();
            dp.pages[i].tokens = p.tokens;
        }
        if !host.is_empty() {
            let mut dst = dp.buf.slice_mut(..host.len());
            self.stream.memcpy_htod(&host, &mut dst)?;
        }
        Ok(dp)
    }

    /// `count` full pages, each a copy of `fill` (one full page's payload), for benchmarks whose
    /// working set is far larger than what the host should build.
    pub fn alloc_pages(&self, layout: &PageLayout, count: usize, fill: &[u8]) -> Result<DevicePages, GpuError> {
        let mut dp = self.alloc_slots(layout, count)?;
        if fill.len() != layout.page_bytes() {
            return Err(GpuError::Unsupported(format!(
                "fill page is {} bytes, expected {}",
                fill.len(),
                layout.page_bytes()
            )));
        }
        let stride = dp.slot;
        let per_chunk = ((64usize << 20) / stride).clamp(1, count.max(1));
        let mut pattern = vec![0u8; per_chunk * stride];
        for i in 0..per_chunk {
            pattern[i * stride..i * stride + fill.len()].copy_from_slice(fill);
        }
        let mut done = 0;
        while done < count {
            let n = per_chunk.min(count - done);
            let mut dst = dp.buf.slice_mut(done * stride..(done + n) * stride);
            self.stream.memcpy_htod(&pattern[..n * stride], &mut dst)?;
            done += n;
        }
        for p in &mut dp.pages {
            p.len = fill.len();
            p.tokens = layout.page_tokens;
        }
        self.stream.synchronize()?;
        Ok(dp)
    }

    /// Lay a batch out for the kernels: check every item, build the page table and the split-K
    /// work list.
    fn lay_out(&self, shape: &AttnShape, items: &[GpuItem]) -> Result<BatchLayout, GpuError> {
        let qs: Vec<Query> = items.iter().map(|it| it.q).collect();
        let n_pages = items.iter().map(|it| it.pages.len()).sum();
        self.lay_out_with(shape, &qs, n_pages, |i| items[i].skip, |i, ptrs| check_pages(shape, items[i].pages, ptrs))
    }

    /// [`Gpu::lay_out`] for sequences whose pages are slots of `pages`: the table is read
    /// straight from the slots' addresses, no page handle built per page.
    fn lay_out_slots(
        &self,
        shape: &AttnShape,
        pages: &DevicePages,
        items: &[SlotSeq],
    ) -> Result<BatchLayout, GpuError> {
        if pages.layout != shape.layout {
            return Err(
                AttentionError::Shape("the page slots are in another page layout than the query's".into()).into()
            );
        }
        let qs: Vec<Query> = items.iter().map(|it| it.q).collect();
        let n_pages = items.iter().map(|it| it.slots.len()).sum();
        self.lay_out_with(
            shape,
            &qs,
            n_pages,
            |i| items[i].skip,
            |i, ptrs| slot_pages(shape, pages, items[i].slots, ptrs),
        )
    }

    /// Check the queries (over threads when they are many), let `pages` append each item's page
    /// addresses to the table (returning its tokens, or why not), and split the work.
    fn lay_out_with(
        &self,
        shape: &AttnShape,
        qs: &[Query],
        n_pages: usize,
        skip: impl Fn(usize) -> usize,
        mut pages: impl FnMut(usize, &mut Vec<u64>) -> Result<usize, AttentionError>,
    ) -> Result<BatchLayout, GpuError> {
        let kernel = Kernel::for_shape(self, shape)?;
        let mut page_ptrs = Vec::with_capacity(n_pages.max(1));
        let (mut seq_page0, mut seq_tokens) = (Vec::with_capacity(qs.len()), Vec::with_capacity(qs.len()));
        let mut ranges = Vec::with_capacity(qs.len());
        // Checking reads every query value: spread over threads when the batch's are many.
        let qbytes = qs.len() * shape.q_len() * 2;
        crate::par::map(qs, crate::par::threads_for(qbytes), |q| check_query(shape, q))
            .into_iter()
            .collect::<Result<(), _>>()?;
        for i in 0..qs.len() {
            seq_page0.push(i32::try_from(page_ptrs.len()).map_err(|_| GpuError::Unsupported("too many pages".into()))?);
            let total = pages(i, &mut page_ptrs)?;
            let skip = skip(i);
            if skip > total {
                return Err(AttentionError::Shape(format!("window skips {skip} of {total} tokens")).into());
            }
            seq_tokens.push(i32::try_from(total).map_err(|_| GpuError::Unsupported("sequence too long".into()))?);
            ranges.push((skip, total));
        }
        if page_ptrs.is_empty() {
            page_ptrs.push(0);
        }
        let slots = self.sms * kernel.blocks_per_sm;
        let (work, seq_work0) = split_work(&ranges, kernel.blocks_per_item, slots, kernel.min_chunk, kernel.align);
        let n_work = seq_work0.last().copied().unwrap_or(0) as usize;
        let attended = ranges.iter().map(|(s, t)| t - s).collect();
        Ok(BatchLayout { kernel, page_ptrs, seq_page0, seq_tokens, work, seq_work0, attended, n_work })
    }

    /// Plan a batch: check it, upload queries and page tables, size the split-K work. The plan
    /// can be launched many times ([`Gpu::launch`]) and read back ([`Gpu::results`]).
    pub fn plan<'p>(&self, shape: &AttnShape, items: &[GpuItem<'p>]) -> Result<Plan<'p>, GpuError> {
        let b = self.lay_out(shape, items)?;
        let mut q = vec![0f32; items.len() * shape.q_len()];
        for (dst, item) in q.chunks_exact_mut(shape.q_len()).zip(items) {
            item.q.widen_into(dst);
        }
        let s = &self.stream;
        let n_work = b.n_work;
        Ok(Plan {
            kernel: b.kernel,
            attended: b.attended,
            batch: items.len(),
            heads: shape.q_heads,
            dv: shape.v_width,
            n_work,
            qscale: shape.scale * LOG2E,
            page_ptrs: s.clone_htod(&b.page_ptrs)?,
            seq_page0: s.clone_htod(&b.seq_page0)?,
            seq_tokens: s.clone_htod(&b.seq_tokens)?,
            work: s.clone_htod(&b.work)?,
            seq_work0: s.clone_htod(&b.seq_work0)?,
            q: s.clone_htod(&q)?,
            part_o: s.alloc_zeros::<f32>((n_work * shape.q_heads * shape.v_width).max(1))?,
            part_lse: s.alloc_zeros::<f32>((n_work * shape.q_heads).max(1))?,
            out: s.alloc_zeros::<f32>((items.len() * shape.out_len()).max(1))?,
            lse: s.alloc_zeros::<f32>((items.len() * shape.q_heads).max(1))?,
            _pages: PhantomData,
        })
    }

    /// Enqueue a planned batch (the decode and the merge kernels) on the stream.
    pub fn launch(&self, plan: &mut Plan) -> Result<(), GpuError> {
        if plan.batch == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let args = {
            let (page_ptrs, _a) = plan.page_ptrs.device_ptr(s);
            let (seq_page0, _b) = plan.seq_page0.device_ptr(s);
            let (seq_tokens, _c) = plan.seq_tokens.device_ptr(s);
            let (work, _d) = plan.work.device_ptr(s);
            let (seq_work0, _e) = plan.seq_work0.device_ptr(s);
            let (q, _f) = plan.q.device_ptr(s);
            let (part_o, _g) = plan.part_o.device_ptr_mut(s);
            let (part_lse, _h) = plan.part_lse.device_ptr_mut(s);
            let (out, _i) = plan.out.device_ptr_mut(s);
            let (lse, _j) = plan.lse.device_ptr_mut(s);
            Args { page_ptrs, seq_page0, seq_tokens, work, seq_work0, q, part_o, part_lse, out, lse }
        };
        // SAFETY: every address is a live buffer of the plan, sized for its batch and work items;
        // every page pointer comes from a live `DevicePages` checked against the layout in `plan`.
        unsafe { self.enqueue(&plan.kernel, &args, plan.batch, plan.heads, plan.dv, plan.n_work, plan.qscale) }
    }

    /// Enqueue the decode and merge kernels on `args`.
    ///
    /// # Safety
    /// `args` must address live device buffers laid out for this batch: the page table, work
    /// list and queries as [`Gpu::lay_out`] builds them, partials of `n_work × heads × dv` (and
    /// `× heads`) f32, outputs of `batch × heads × dv` (and `× heads`) f32.
    #[allow(clippy::too_many_arguments)]
    unsafe fn enqueue(
        &self,
        k: &Kernel,
        args: &Args,
        batch: usize,
        heads: usize,
        dv: usize,
        n_work: usize,
        qscale: f32,
    ) -> Result<(), GpuError> {
        let (heads, dv_i) = (heads as i32, dv as i32);
        {
            let mut b = self.stream.launch_builder(&k.decode);
            b.arg(&args.page_ptrs).arg(&args.seq_page0).arg(&args.seq_tokens).arg(&args.work).arg(&args.q).arg(&qscale);
            if k.mla {
                b.arg(&heads);
            }
            b.arg(&args.part_o).arg(&args.part_lse);
            let cfg = LaunchConfig {
                grid_dim: (n_work as u32, k.grid_y, k.grid_z),
                block_dim: (k.threads, 1, 1),
                shared_mem_bytes: k.smem as u32,
            };
            // SAFETY: the arguments match the kernel's signature (pointers passed as their
            // 64-bit addresses); the caller vouches for the buffers.
            unsafe { b.launch(cfg) }?;
        }
        let mut b = self.stream.launch_builder(&k.merge);
        b.arg(&args.part_o)
            .arg(&args.part_lse)
            .arg(&args.seq_work0)
            .arg(&heads)
            .arg(&dv_i)
            .arg(&args.out)
            .arg(&args.lse);
        let cfg = LaunchConfig {
            // Sequences with many partials split each head's dims over blocks (see the kernel).
            grid_dim: (batch as u32, heads as u32, if n_work >= 8 * batch { dv.div_ceil(32) as u32 } else { 1 }),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; partial buffers are sized n_work × heads × dv.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Wait for the stream and copy a plan's outputs back: `out [batch][q_heads][v_width]`, `lse
    /// [batch][q_heads]`, and per sequence `Ok` or `NonFiniteResult`.
    pub fn results(&self, plan: &Plan) -> Result<GpuOutput, GpuError> {
        let out = self.stream.clone_dtoh(&plan.out)?;
        let lse = self.stream.clone_dtoh(&plan.lse)?;
        let (ol, hl) = (plan.heads * plan.dv, plan.heads);
        Ok(output(&out[..plan.batch * ol], &lse[..plan.batch * hl], &plan.attended, ol, hl))
    }

    /// Check, lay out, launch and read back one batch, through buffers kept between calls
    /// (one pinned copy in, one out; no allocation once the batch shape has been seen).
    pub fn decode_batch(&self, shape: &AttnShape, items: &[GpuItem]) -> Result<GpuOutput, GpuError> {
        let (ol, hl) = (shape.out_len(), shape.q_heads);
        let b = self.lay_out(shape, items)?;
        let qs: Vec<Query> = items.iter().map(|it| it.q).collect();
        self.run_batch(
            shape,
            b,
            &qs,
            false,
            || {},
            |out, lse, attended| output(cast::<f32>(out, attended.len() * ol), lse, attended, ol, hl),
        )
    }

    /// [`Gpu::decode_batch`] answering per sequence: its output (f32, or with `bf16_out` rounded
    /// to bf16 on the device and read back as the little-endian bytes that travel) and LSE, or
    /// `NonFiniteResult`; each copied once out of the pinned read-back buffer.
    pub fn decode_batch_each(
        &self,
        shape: &AttnShape,
        items: &[GpuItem],
        bf16_out: bool,
    ) -> Result<Vec<SeqOutput>, GpuError> {
        let b = self.lay_out(shape, items)?;
        let qs: Vec<Query> = items.iter().map(|it| it.q).collect();
        self.run_batch(
            shape,
            b,
            &qs,
            bf16_out,
            || {},
            |out, lse, attended| each_output(shape, bf16_out, out, lse, attended),
        )
    }

    /// [`Gpu::decode_batch_each`] for sequences whose pages are slots of `pages` (a worker's page
    /// cache): the page table is laid out from the slots' device addresses directly, with the
    /// same checks (every slot in range, all but a sequence's last page full).
    pub fn decode_slots_each(
        &self,
        shape: &AttnShape,
        pages: &DevicePages,
        items: &[SlotSeq],
        bf16_out: bool,
    ) -> Result<Vec<SeqOutput>, GpuError> {
        self.decode_slots_each_with(shape, pages, items, bf16_out, || {})
    }

    /// [`Gpu::decode_slots_each`], running `meanwhile` on the calling thread once the batch is
    /// enqueued and before its results are waited for: host work that overlaps the kernels.
    /// (It runs whenever the batch gets that far, whatever the kernels' answers.)
    pub fn decode_slots_each_with(
        &self,
        shape: &AttnShape,
        pages: &DevicePages,
        items: &[SlotSeq],
        bf16_out: bool,
        meanwhile: impl FnOnce(),
    ) -> Result<Vec<SeqOutput>, GpuError> {
        let b = self.lay_out_slots(shape, pages, items)?;
        let qs: Vec<Query> = items.iter().map(|it| it.q).collect();
        self.run_batch(shape, b, &qs, bf16_out, meanwhile, |out, lse, attended| {
            each_output(shape, bf16_out, out, lse, attended)
        })
    }

    /// Lay out, upload, launch and read back a batch through the workspace, and hand the
    /// outputs (`[batch][q_heads][v_width]` as f32, or bf16 with `bf16_out`; and the f32 LSEs
    /// `[batch][q_heads]`, straight from the pinned buffer) and each sequence's attended tokens
    /// to `answer`. When every query is bf16 the bytes go up as they came and are widened on
    /// the device. `meanwhile` runs once everything is enqueued, before the stream is waited for.
    fn run_batch<R>(
        &self,
        shape: &AttnShape,
        b: BatchLayout,
        items: &[Query],
        bf16_out: bool,
        meanwhile: impl FnOnce(),
        answer: impl FnOnce(&[u8], &[f32], &[usize]) -> R,
    ) -> Result<R, GpuError> {
        // The copies below are raw driver calls, which take the thread's current context: the
        // caller's thread (a blocking pool's, possibly new) may never have had it.
        self.ctx.bind_to_thread()?;
        let batch = items.len();
        if batch == 0 {
            meanwhile();
            return Ok(answer(&[], &[], &[]));
        }
        let (heads, dv, ql) = (shape.q_heads, shape.v_width, shape.q_len());
        let (ol, hl) = (heads * dv, heads);
        let (f, i, u) = (4usize, 4usize, 8usize);
        let bf16_in = items.iter().all(|q| matches!(q, Query::Bf16(_)));
        // Inputs: what is copied up (tables, then the queries as they are sent), then, for bf16
        // queries, their f32 widening (device only).
        let (in_offs, in_len) = pack(&[
            b.page_ptrs.len() * u,
            b.seq_page0.len() * i,
            b.seq_tokens.len() * i,
            b.work.len() * i,
            b.seq_work0.len() * i,
            batch * ql * if bf16_in { 2 } else { f },
            if bf16_in { batch * ql * f } else { 0 },
        ]);
        let copy_in = in_offs[6];
        let (part_offs, part_len) = pack(&[b.n_work * ol * f, b.n_work * hl * f]);
        // Outputs: what is read back (LSEs, then the outputs as they travel), then, for bf16
        // outputs, the f32 outputs before rounding (device only).
        let (out_offs, out_len) = pack(&[
            batch * hl * f,
            batch * ol * if bf16_out { 2 } else { f },
            if bf16_out { batch * ol * f } else { 0 },
        ]);
        let copy_out = out_offs[2];
        let mut guard = self.workspace.lock().expect("workspace");
        let ws = &mut *guard;
        let s = &self.stream;
        // Grown by half again over the need, so that slowly growing batches do not reallocate
        // every call.
        let grow = |n: usize| n + n / 2;
        if ws.host_in.as_ref().is_none_or(|h| h.len() < copy_in) {
            // SAFETY: u8 has no invalid bit patterns; every byte used is written before a copy.
            ws.host_in = Some(unsafe { self.ctx.alloc_pinned::<u8>(grow(copy_in)) }?);
        }
        if ws.host_out.as_ref().is_none_or(|h| h.len() < copy_out) {
            // SAFETY: as above; the copy back fills the bytes read.
            ws.host_out = Some(unsafe { self.ctx.alloc_pinned::<u8>(grow(copy_out)) }?);
        }
        if ws.dev_in.as_ref().is_none_or(|d| d.len() < in_len) {
            ws.dev_in = Some(s.alloc_zeros::<u8>(grow(in_len))?);
        }
        if ws.dev_part.as_ref().is_none_or(|d| d.len() < part_len) {
            ws.dev_part = Some(s.alloc_zeros::<u8>(grow(part_len))?);
        }
        if ws.dev_out.as_ref().is_none_or(|d| d.len() < out_len) {
            ws.dev_out = Some(s.alloc_zeros::<u8>(grow(out_len))?);
        }
        let (Some(host_in), Some(host_out), Some(dev_in), Some(dev_part), Some(dev_out)) =
            (&mut ws.host_in, &mut ws.host_out, &mut ws.dev_in, &mut ws.dev_part, &mut ws.dev_out)
        else {
            unreachable!("allocated above");
        };
        {
            let h = host_in.as_mut_slice()?;
            cast_mut::<u64>(&mut h[in_offs[0]..], b.page_ptrs.len()).copy_from_slice(&b.page_ptrs);
            cast_mut::<i32>(&mut h[in_offs[1]..], batch).copy_from_slice(&b.seq_page0);
            cast_mut::<i32>(&mut h[in_offs[2]..], batch).copy_from_slice(&b.seq_tokens);
            cast_mut::<i32>(&mut h[in_offs[3]..], b.work.len()).copy_from_slice(&b.work);
            cast_mut::<i32>(&mut h[in_offs[4]..], b.seq_work0.len()).copy_from_slice(&b.seq_work0);
            let threads = crate::par::threads_for(batch * ql * 2);
            if bf16_in {
                let q = &mut h[in_offs[5]..in_offs[5] + batch * ql * 2];
                crate::par::for_each(q.chunks_exact_mut(ql * 2).zip(items).collect(), threads, |(dst, q)| {
                    if let Query::Bf16(b) = q {
                        dst.copy_from_slice(b);
                    }
                });
            } else {
                let q = cast_mut::<f32>(&mut h[in_offs[5]..], batch * ql);
                crate::par::for_each(q.chunks_exact_mut(ql).zip(items).collect(), threads, |(dst, q)| {
                    q.widen_into(dst)
                });
            }
        }
        let (din, _a) = dev_in.device_ptr_mut(s);
        let (dpart, _b) = dev_part.device_ptr_mut(s);
        let (dout, _c) = dev_out.device_ptr_mut(s);
        let at = |base: u64, off: usize| base + off as u64;
        let args = Args {
            page_ptrs: at(din, in_offs[0]),
            seq_page0: at(din, in_offs[1]),
            seq_tokens: at(din, in_offs[2]),
            work: at(din, in_offs[3]),
            seq_work0: at(din, in_offs[4]),
            q: at(din, if bf16_in { in_offs[6] } else { in_offs[5] }),
            part_o: at(dpart, part_offs[0]),
            part_lse: at(dpart, part_offs[1]),
            out: at(dout, if bf16_out { out_offs[2] } else { out_offs[1] }),
            lse: at(dout, out_offs[0]),
        };
        let hin = &host_in.as_slice()?[..copy_in];
        // SAFETY: `din` holds at least `in_len` ≥ `copy_in` bytes and the host bytes are pinned
        // and stay untouched until the stream is waited for below (the workspace lock is held
        // throughout).
        unsafe { cudarc::driver::result::memcpy_htod_async(din, hin, s.cu_stream()) }?;
        let n = batch * ql;
        if bf16_in {
            // SAFETY: `n` bf16 values at in_offs[5] (just copied) widen into the f32 region.
            unsafe { self.convert("widen_bf16", at(din, in_offs[5]), args.q, n) }?;
        }
        // SAFETY: the buffers were laid out above for this batch (`lay_out`, `pack`).
        unsafe { self.enqueue(&b.kernel, &args, batch, heads, dv, b.n_work, shape.scale * LOG2E) }?;
        if bf16_out {
            // SAFETY: the merged f32 outputs round into the bf16 region read back.
            unsafe { self.convert("round_bf16", args.out, at(dout, out_offs[1]), batch * ol) }?;
        }
        let hout = &mut host_out.as_mut_slice()?[..copy_out];
        // SAFETY: `dout` holds at least `copy_out` bytes; the host buffer is read only after the
        // stream is waited for.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(hout, dout, s.cu_stream()) }?;
        meanwhile();
        s.synchronize()?;
        let hout = &host_out.as_slice()?[..copy_out];
        let lse = cast::<f32>(&hout[out_offs[0]..], batch * hl);
        Ok(answer(&hout[out_offs[1]..copy_out], lse, &b.attended))
    }

    /// Enqueue a conversion kernel (`widen_bf16` or `round_bf16`) over `n` values.
    ///
    /// # Safety
    /// `src` and `dst` must address live device buffers of `n` values of the kernel's types.
    unsafe fn convert(&self, name: &str, src: u64, dst: u64, n: usize) -> Result<(), GpuError> {
        let f = self.function(&[("KV_MERGE", 1)], name)?;
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&src).arg(&dst).arg(&n64);
        let blocks = n.div_ceil(256).clamp(1, self.sms * 8) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the caller vouches for the buffers; the kernel takes (in, out, n).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Wait for everything enqueued on the stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// Measured HBM read bandwidth (bytes/s): a streaming read of `bytes` (several times the L2),
    /// best of `reps` timed passes.
    pub fn read_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64, GpuError> {
        let f = self.function(&[("KV_MERGE", 1)], "read_bandwidth")?;
        let n = bytes / 16;
        let src = self.stream.alloc_zeros::<u8>(n * 16)?;
        let mut sink = self.stream.alloc_zeros::<u32>(1)?;
        let n64 = n as u64;
        let mut best = 0f64;
        for r in 0..reps + 1 {
            let t = std::time::Instant::now();
            let mut b = self.stream.launch_builder(&f);
            b.arg(&src).arg(&n64).arg(&mut sink);
            let cfg =
                LaunchConfig { grid_dim: (self.sms as u32 * 8, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: `src` holds n 16-byte words, `sink` one word.
            unsafe { b.launch(cfg) }?;
            self.stream.synchronize()?;
            if r > 0 {
                best = best.max((n * 16) as f64 / t.elapsed().as_secs_f64());
            }
        }
        Ok(best)
    }
}

impl Gpu {
    /// Measured bf16 tensor-core rate (flop/s): a cuBLAS `n×n×n` bf16 GEMM with f32
    /// accumulation on random data, best of `reps` timed products after a warm-up. The MLA
    /// kernel's peak fraction is against this.
    pub fn gemm_peak(&self, n: usize, reps: usize) -> Result<f64, GpuError> {
        use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::Unsupported(
                "cuBLAS (libcublas) could not be loaded: no tensor-core baseline".into(),
            ));
        }
        let blas = CudaBlas::new(self.stream.clone()).map_err(|e| GpuError::Unsupported(format!("cuBLAS: {e:?}")))?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let host: Vec<half::bf16> = (0..n * n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                half::bf16::from_f32((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            })
            .collect();
        let a = self.stream.clone_htod(&host)?;
        let b = self.stream.clone_htod(&host)?;
        let mut c = self.stream.alloc_zeros::<half::bf16>(n * n)?;
        let ni = n as i32;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: ni,
            n: ni,
            k: ni,
            alpha: half::bf16::ONE,
            lda: ni,
            ldb: ni,
            beta: half::bf16::ZERO,
            ldc: ni,
        };
        let mut best = 0f64;
        for r in 0..reps + 2 {
            let t = std::time::Instant::now();
            // SAFETY: a, b and c hold n×n elements each.
            unsafe { blas.gemm(cfg, &a, &b, &mut c) }
                .map_err(|e| GpuError::Unsupported(format!("cuBLAS gemm: {e:?}")))?;
            self.stream.synchronize()?;
            if r >= 2 {
                best = best.max(2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64());
            }
        }
        Ok(best)
    }
}

/// A batch's answer from its outputs: per sequence `Ok`, or `NonFiniteResult` when an output
/// is not finite (an LSE of −∞ is the answer of attending to nothing, and only of that).
fn output(out: &[f32], lse: &[f32], attended: &[usize], ol: usize, hl: usize) -> GpuOutput {
    let status = attended
        .iter()
        .enumerate()
        .map(|(i, &n)| finite(&out[i * ol..(i + 1) * ol], &lse[i * hl..(i + 1) * hl], n))
        .collect();
    GpuOutput { out: out.to_vec(), lse: lse.to_vec(), status }
}

/// One sequence's outputs are an answer: finite, or an LSE of −∞ from attending to nothing.
fn finite(o: &[f32], l: &[f32], attended: usize) -> Result<(), AttentionError> {
    let o_ok = kvcache_core::codec::first_non_finite_f32(o).is_none();
    if o_ok && l.iter().all(|x| x.is_finite() || attended == 0 && *x == f32::NEG_INFINITY) {
        Ok(())
    } else {
        Err(AttentionError::NonFiniteResult)
    }
}

/// One sequence's answer from [`Gpu::decode_batch_each`]: `(out, lse)` or why not.
pub type SeqOutput = Result<(Output, Vec<f32>), AttentionError>;

/// Device memory holding page slots of one layout; the [`DeviceRef`]s it hands out live no
/// longer than it does.
pub struct DevicePages {
    buf: CudaSlice<u8>,
    pages: Vec<PageRef>,
    layout: PageLayout,
    slot: usize,
}

/// Spread a stored payload of `tokens` tokens (planes `tokens` rows apart) into a full page's
/// bytes `dst` (planes `page_tokens` rows apart), the layout of device slots: appending a token
/// then writes its rows in place. For MLA (one plane) it is a copy.
pub fn spread(layout: &PageLayout, payload: &[u8], tokens: usize, dst: &mut [u8]) {
    let plane = tokens * layout.row_bytes;
    let full = layout.page_tokens * layout.row_bytes;
    for i in 0..layout.planes {
        dst[i * full..i * full + plane].copy_from_slice(&payload[i * plane..(i + 1) * plane]);
    }
}

#[derive(Debug, Clone, Copy)]
struct PageRef {
    ptr: u64,
    len: usize,
    tokens: usize,
}

impl DevicePages {
    /// Pages in upload order.
    pub fn pages(&self) -> Vec<DeviceRef<'_>> {
        self.pages
            .iter()
            .map(|&p| DeviceRef { ptr: p.ptr, len: p.len, tokens: p.tokens, layout: self.layout, _pages: PhantomData })
            .collect()
    }

    /// Slot `i` (panics past [`DevicePages::len`]).
    pub fn page(&self, i: usize) -> DeviceRef<'_> {
        let p = self.pages[i];
        DeviceRef { ptr: p.ptr, len: p.len, tokens: p.tokens, layout: self.layout, _pages: PhantomData }
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

/// Pinned host buffers that page uploads are staged through ([`Gpu::staging`]): two, each
/// `per` page slots, and the event each one's last copies recorded.
pub struct Staging {
    bufs: Vec<PinnedHostSlice<u8>>,
    done: Vec<Option<cudarc::driver::CudaEvent>>,
    next: usize,
    layout: PageLayout,
    per: usize,
}

/// Host memory page-locked with the driver ([`Gpu::register_host`]); unregistered on drop.
pub struct HostRegion {
    ctx: Arc<CudaContext>,
    ptr: usize,
    len: usize,
}

impl HostRegion {
    /// Whether `b` lies wholly inside the region.
    pub fn contains(&self, b: &[u8]) -> bool {
        let p = b.as_ptr() as usize;
        p >= self.ptr && p + b.len() <= self.ptr + self.len
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: registered at `ptr` by `register_host`, still mapped (its contract).
            let _ = unsafe { sys::cuMemHostUnregister(self.ptr as *mut std::ffi::c_void) };
        }
    }
}

/// One page for [`Gpu::write_pages_staged`]: slot `index` gets the stored payload of `tokens`
/// tokens.
#[derive(Debug, Clone, Copy)]
pub struct PageWrite<'a> {
    /// The slot.
    pub index: usize,
    /// The stored (compact) payload.
    pub payload: &'a [u8],
    /// Tokens in it.
    pub tokens: usize,
}

/// The buffers [`Gpu::append_rows`] stages rows through (pinned host and device, grown as
/// steps need; [`Gpu::row_staging`]).
pub struct RowStaging {
    host: Option<PinnedHostSlice<u8>>,
    dev: Option<CudaSlice<u8>>,
    layout: PageLayout,
}

/// One token appended in place by [`Gpu::append_rows`]: slot `index`, holding `at` tokens, gets
/// `rows` (the token's compact payload, all planes).
#[derive(Debug, Clone, Copy)]
pub struct RowAppend<'a> {
    /// The slot.
    pub index: usize,
    /// Tokens the slot holds now (where the rows go).
    pub at: usize,
    /// The token's compact payload.
    pub rows: &'a [u8],
}

/// One page in device memory: its address, payload bytes and tokens.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRef<'a> {
    ptr: u64,
    len: usize,
    /// Tokens in the payload.
    pub tokens: usize,
    layout: PageLayout,
    _pages: PhantomData<&'a DevicePages>,
}

/// A query `[q_heads][qk_width]`: f32 values, or bf16 as it travels (little-endian bytes),
/// widened exactly on the device.
#[derive(Debug, Clone, Copy)]
pub enum Query<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values, two little-endian bytes each.
    Bf16(&'a [u8]),
}

impl Query<'_> {
    /// Write the values as f32 into `dst` (exact).
    fn widen_into(&self, dst: &mut [f32]) {
        match self {
            Query::F32(q) => dst.copy_from_slice(q),
            Query::Bf16(b) => {
                for (d, c) in dst.iter_mut().zip(b.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        }
    }
}

/// A sequence's output from [`Gpu::decode_batch_each`], as asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 values (rounded on the device), two little-endian bytes each.
    Bf16(Vec<u8>),
}

impl Output {
    /// The values as f32 (bf16 widened exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Output::F32(v) => v.clone(),
            Output::Bf16(b) => {
                let mut v = vec![0f32; b.len() / 2];
                Query::Bf16(b).widen_into(&mut v);
                v
            }
        }
    }
}

/// One sequence of a GPU batch, as [`crate::BatchItem`].
#[derive(Debug, Clone, Copy)]
pub struct GpuItem<'a> {
    /// Query `[q_heads][qk_width]`.
    pub q: Query<'a>,
    /// Pages in order; all but the last hold `page_tokens` tokens.
    pub pages: &'a [DeviceRef<'a>],
    /// Tokens at the start the query does not attend to (a window).
    pub skip: usize,
}

/// One sequence of [`Gpu::decode_slots_each`]: its pages named by slot of one [`DevicePages`].
#[derive(Debug, Clone, Copy)]
pub struct SlotSeq<'a> {
    /// Query `[q_heads][qk_width]`.
    pub q: Query<'a>,
    /// Slots in page order; all but the last hold `page_tokens` tokens.
    pub slots: &'a [usize],
    /// Tokens at the start the query does not attend to (a window).
    pub skip: usize,
}

/// What a batch answered.
#[derive(Debug, Clone)]
pub struct GpuOutput {
    /// `[batch][q_heads][v_width]`.
    pub out: Vec<f32>,
    /// `[batch][q_heads]`, natural log.
    pub lse: Vec<f32>,
    /// Per sequence: `Ok`, or `NonFiniteResult` (its slot is then not meaningful).
    pub status: Vec<Result<(), AttentionError>>,
}

/// A checked, uploaded batch ready to launch.
pub struct Plan<'p> {
    kernel: Kernel,
    attended: Vec<usize>,
    batch: usize,
    heads: usize,
    dv: usize,
    n_work: usize,
    qscale: f32,
    page_ptrs: CudaSlice<u64>,
    seq_page0: CudaSlice<i32>,
    seq_tokens: CudaSlice<i32>,
    work: CudaSlice<i32>,
    seq_work0: CudaSlice<i32>,
    q: CudaSlice<f32>,
    part_o: CudaSlice<f32>,
    part_lse: CudaSlice<f32>,
    out: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    _pages: PhantomData<&'p DevicePages>,
}

impl Plan<'_> {
    /// Work items (blocks along the grid's x axis).
    pub fn work_items(&self) -> usize {
        self.n_work
    }

    /// Which kernel runs: "gqa-mma" (tensor cores), "gqa" (CUDA cores), "mla-wgmma" (Hopper's
    /// warpgroup tensor cores) or "mla-mma".
    pub fn kernel_name(&self) -> &'static str {
        self.kernel.name
    }
}

struct Kernel {
    decode: CudaFunction,
    merge: CudaFunction,
    mla: bool,
    /// What `Plan::kernel_name` reports.
    name: &'static str,
    grid_y: u32,
    grid_z: u32,
    threads: u32,
    smem: usize,
    blocks_per_item: usize,
    blocks_per_sm: usize,
    min_chunk: usize,
    align: usize,
}

fn codec_id(c: Codec) -> i64 {
    match c {
        Codec::Bf16 => 0,
        Codec::F16 => 1,
        Codec::Fp8E4m3 => 2,
        Codec::Int8 => 3,
    }
}

impl Kernel {
    fn for_shape(gpu: &Gpu, shape: &AttnShape) -> Result<Kernel, GpuError> {
        let l = &shape.layout;
        if shape.kv_groups == 0 || !shape.q_heads.is_multiple_of(shape.kv_groups) {
            return Err(AttentionError::Shape(format!(
                "{} query heads over {} KV groups",
                shape.q_heads, shape.kv_groups
            ))
            .into());
        }
        if l.shape.width != shape.qk_width {
            return Err(AttentionError::Shape("layout row width does not match the query width".into()).into());
        }
        let merge = gpu.function(&[("KV_MERGE", 1)], "merge_partials")?;
        let common = [("KV_CODEC", codec_id(l.codec)), ("KV_ROW", l.row_bytes as i64), ("KV_PT", l.page_tokens as i64)];
        if shape.latent {
            let (dl, dr) = (shape.v_width, shape.qk_width - shape.v_width);
            if dl != 512 || !dr.is_multiple_of(16) || dr == 0 {
                return Err(GpuError::Unsupported(format!(
                    "MLA with a {dl}-wide latent and {dr}-wide rope key (the tensor-core kernel takes 512 + a multiple of 16)"
                )));
            }
            let mut defs = common.to_vec();
            defs.push(("KV_DL", dl as i64));
            defs.push(("KV_DR", dr as i64));
            // bf16 pages (rows a multiple of 192 wide) and fp8 pages of 512 + 64 (DeepSeek-V3's;
            // widened to bf16 on the way into shared memory) run on Hopper's warpgroup tensor
            // cores (`mla_wgmma`, compiled for sm_90a); every other codec or GPU, or
            // `KVCACHE_GPU_MLA=mma`, on `mma.sync`.
            let wg_codec = match l.codec {
                Codec::Bf16 => (dl + dr).is_multiple_of(192),
                Codec::Fp8E4m3 => dr == 64 && l.row_bytes.is_multiple_of(16),
                _ => false,
            };
            let wgmma = gpu.cc == (9, 0) && wg_codec && std::env::var("KVCACHE_GPU_MLA").map_or(true, |v| v != "mma");
            let (decode, name, hb, bn, smem) = if wgmma {
                defs.push(("KV_WG", 1));
                let decode = gpu.module(&defs, true)?.load_function("mla_wgmma")?;
                // The query, two K tiles, P (64 × 64 bf16), three floats per head, six mbarriers,
                // and 1 KiB to align the swizzled operands.
                let width = dl + dr;
                let smem = 3 * 64 * width * 2 + 64 * 64 * 2 + 3 * 4 * 64 + 48 + 1024;
                (decode, "mla-wgmma", 64usize, 64usize, smem)
            } else {
                let decode = gpu.function(&defs, "mla_decode")?;
                let (hb, bn, srow, prow) = (64usize, 32usize, dl + dr + 8, 40usize);
                let direct = matches!(l.codec, Codec::Bf16 | Codec::F16);
                let k_tiles = if direct { 2 } else { 1 };
                let raw = if direct { 0 } else { 2 * bn * l.row_bytes.next_multiple_of(16) };
                let smem = 2 * (hb * srow + k_tiles * bn * srow + hb * prow) + 4 * 4 * hb + raw;
                (decode, "mla-mma", hb, bn, smem)
            };
            if smem > gpu.smem_optin {
                return Err(GpuError::Unsupported(format!(
                    "MLA kernel needs {smem} B of shared memory per block, the device allows {}",
                    gpu.smem_optin
                )));
            }
            decode.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
            let grid_y = shape.q_heads.div_ceil(hb) as u32;
            let blocks_per_sm = decode.occupancy_max_active_blocks_per_multiprocessor(256, smem, None)?.max(1) as usize;
            return Ok(Kernel {
                decode,
                merge,
                mla: true,
                name,
                grid_y,
                grid_z: 1,
                threads: 256,
                smem,
                blocks_per_item: grid_y as usize,
                blocks_per_sm,
                min_chunk: 128,
                align: bn,
            });
        }
        let d = shape.qk_width;
        if shape.v_width != d || l.shape.tail != 0 {
            return Err(GpuError::Unsupported("GQA with different K and V widths".into()));
        }
        let g = shape.group();
        // bf16 and fp8 pages with head dims a multiple of 16 up to 128 run on the tensor cores
        // (`gqa_mma`; fp8 widened to bf16 exactly: its tile scales are powers of two); everything
        // else on the CUDA cores (`gqa_decode`). `KVCACHE_GPU_GQA=simt` forces the latter (for
        // comparing the two).
        let simt = std::env::var("KVCACHE_GPU_GQA").is_ok_and(|v| v == "simt");
        let tensor_codec = l.codec == Codec::Bf16 || l.codec == Codec::Fp8E4m3 && l.shape.tail == 0;
        let tensor = tensor_codec && d.is_multiple_of(16) && d <= 128 && l.page_tokens >= 16 && !simt;
        // Per kernel: query heads per block, shared memory, tokens a work item is a multiple of.
        let (gc, smem, align, name) = if tensor {
            // Four warps, each with a 2-stage ring of 16-token K and V tiles (bf16 rows padded by
            // 8; fp8: raw rows, and one bf16 tile they are widened into): ≤ 68 KiB, three blocks
            // per SM (NSTG and TB in kernels.cu).
            let (tb, stages) = (16usize, 2usize);
            let tile = 2 * tb * (d + 8) * 2;
            let smem = 4 * if l.codec == Codec::Bf16 { stages * tile } else { stages * 2 * tb * l.row_bytes + tile };
            (g.min(8), smem, 4 * tb, "gqa_mma")
        } else {
            let lanes_ok = d.is_multiple_of(8) && ((d / 8).is_power_of_two() && d / 8 <= 32 || d.is_multiple_of(256));
            if !lanes_ok {
                return Err(GpuError::Unsupported(format!(
                    "head dim {d} (the GPU kernel takes 8, 16, 32, 64, 128 or a multiple of 256; bf16 and fp8 \
                     pages also any multiple of 16 up to 128)"
                )));
            }
            let lanes = (d / 8).min(32);
            let (e, tpw) = (d / lanes, 32 / lanes);
            let gc = (1..=g).rev().find(|c| g.is_multiple_of(*c) && c * e <= 32).unwrap_or(1);
            // The block's (warp, slot) softmax states, merged in shared memory at the end.
            let nstate = 4 * tpw;
            (gc, 4 * (2 * nstate * gc + nstate * gc * d), 4 * tpw * 4, "gqa_decode")
        };
        let mut defs = common.to_vec();
        defs.push(("KV_D", d as i64));
        defs.push(("KV_KV", shape.kv_groups as i64));
        defs.push(("KV_G", g as i64));
        defs.push(("KV_GC", gc as i64));
        if tensor {
            defs.push(("KV_MMA", 1));
        }
        let decode = gpu.function(&defs, name)?;
        if smem > 48 << 10 {
            if smem > gpu.smem_optin {
                return Err(GpuError::Unsupported(format!("the GQA kernel needs {smem} B of shared memory")));
            }
            decode.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
        }
        let grid_z = g.div_ceil(gc) as u32;
        let blocks_per_sm = decode.occupancy_max_active_blocks_per_multiprocessor(128, smem, None)?.max(1) as usize;
        Ok(Kernel {
            decode,
            merge,
            mla: false,
            name: if tensor { "gqa-mma" } else { "gqa" },
            grid_y: shape.kv_groups as u32,
            grid_z,
            threads: 128,
            smem,
            blocks_per_item: shape.kv_groups * grid_z as usize,
            blocks_per_sm,
            min_chunk: 256,
            align,
        })
    }
}

fn check_query(shape: &AttnShape, q: &Query) -> Result<(), AttentionError> {
    match *q {
        Query::F32(q) => crate::kernel::check_query(shape, q),
        Query::Bf16(b) => {
            if b.len() != shape.q_len() * 2 {
                return Err(AttentionError::QueryLength {
                    got: b.len() / 2,
                    expected: shape.q_len(),
                    heads: shape.q_heads,
                    width: shape.qk_width,
                });
            }
            if kvcache_core::codec::first_non_finite_bf16(b).is_some() {
                return Err(AttentionError::NonFiniteQuery);
            }
            Ok(())
        }
    }
}

/// Page `index` of a sequence holds `tokens` tokens: every page but the last holds a full page.
fn check_tokens(shape: &AttnShape, index: usize, last: bool, tokens: usize) -> Result<(), AttentionError> {
    let pt = shape.layout.page_tokens;
    if tokens > pt || (!last && tokens != pt) {
        return Err(AttentionError::Shape(format!(
            "page {index} holds {tokens} tokens: every page but the last must hold {pt}"
        )));
    }
    Ok(())
}

/// Check a sequence's pages against the query's layout and append their addresses: its tokens.
fn check_pages(shape: &AttnShape, pages: &[DeviceRef], ptrs: &mut Vec<u64>) -> Result<usize, AttentionError> {
    let mut total = 0;
    for (index, p) in pages.iter().enumerate() {
        let expected = shape.layout.payload_bytes(p.tokens);
        if p.layout != shape.layout && p.len == expected {
            return Err(AttentionError::Shape(format!("page {index} is in another page layout than the query's")));
        }
        if p.len != expected || p.tokens == 0 {
            return Err(AttentionError::PageLength { index, got: p.len, expected, tokens: p.tokens });
        }
        check_tokens(shape, index, index + 1 == pages.len(), p.tokens)?;
        ptrs.push(p.ptr);
        total += p.tokens;
    }
    Ok(total)
}

/// The pages of a sequence named by slot of `pages` (in the query's layout, checked by the
/// caller): append their addresses, return its tokens. A slot past the slab, an empty slot or a
/// page short of full before the last is refused.
fn slot_pages(
    shape: &AttnShape,
    pages: &DevicePages,
    slots: &[usize],
    ptrs: &mut Vec<u64>,
) -> Result<usize, AttentionError> {
    let mut total = 0;
    for (index, &s) in slots.iter().enumerate() {
        let Some(p) = pages.pages.get(s) else {
            return Err(AttentionError::Shape(format!("page {index} names slot {s} of {}", pages.pages.len())));
        };
        if p.tokens == 0 {
            let expected = shape.layout.payload_bytes(1);
            return Err(AttentionError::PageLength { index, got: p.len, expected, tokens: 0 });
        }
        check_tokens(shape, index, index + 1 == slots.len(), p.tokens)?;
        ptrs.push(p.ptr);
        total += p.tokens;
    }
    Ok(total)
}

/// Per sequence of a read-back batch: its output as it travels and LSE, or why not.
fn each_output(shape: &AttnShape, bf16_out: bool, out: &[u8], lse: &[f32], attended: &[usize]) -> Vec<SeqOutput> {
    let (ol, hl) = (shape.out_len(), shape.q_heads);
    let idx: Vec<(usize, usize)> = attended.iter().copied().enumerate().collect();
    let threads = crate::par::threads_for(out.len());
    crate::par::map(&idx, threads, |&(i, n)| {
        let l = &lse[i * hl..(i + 1) * hl];
        if bf16_out {
            let o = &out[i * ol * 2..(i + 1) * ol * 2];
            let bad = kvcache_core::codec::first_non_finite_bf16(o).is_some();
            let ok = if bad { Err(AttentionError::NonFiniteResult) } else { finite(&[], l, n) };
            ok.map(|()| (Output::Bf16(o.to_vec()), l.to_vec()))
        } else {
            let o = &cast::<f32>(out, attended.len() * ol)[i * ol..(i + 1) * ol];
            finite(o, l, n).map(|()| (Output::F32(o.to_vec()), l.to_vec()))
        }
    })
}

/// Split each sequence's attended range `[skip, total)` into work items of whole multiples of
/// `align` tokens (at least `min_chunk` where the sequence is longer), sized so that the grid
/// fills the device's `slots` (resident blocks) in nearly whole waves: the fewest waves whose
/// last one is at least 90% full. Returns `(work as [b, t0, t1, 0] quads, first item of each
/// sequence plus the end)`. Every sequence gets at least one item (an empty one when it attends
/// to nothing, which answers zeros and an LSE of −∞).
fn split_work(
    ranges: &[(usize, usize)],
    blocks_per_item: usize,
    slots: usize,
    min_chunk: usize,
    align: usize,
) -> (Vec<i32>, Vec<i32>) {
    let tokens: usize = ranges.iter().map(|(s, t)| t - s).sum::<usize>().max(1);
    let bpi = blocks_per_item.max(1);
    let slots = slots.max(1);
    let per_seq = |wanted: usize| -> Vec<usize> {
        ranges
            .iter()
            .map(|&(skip, total)| {
                let n = total - skip;
                let k = (n * wanted / tokens).clamp(1, (n / min_chunk.max(1)).max(1));
                let per = n.div_ceil(k).next_multiple_of(align).max(align);
                n.div_ceil(per).max(1)
            })
            .collect()
    };
    let mut best: Option<(f64, Vec<usize>)> = None;
    for waves in 1..=8 {
        let ks = per_seq(waves * slots / bpi);
        let blocks = ks.iter().sum::<usize>() * bpi;
        let fill = blocks as f64 / (blocks.div_ceil(slots) * slots) as f64;
        if best.as_ref().is_none_or(|(f, _)| fill > *f + 1e-9) {
            best = Some((fill, ks));
        }
        if fill >= 0.9 {
            break;
        }
    }
    let ks = best.map(|b| b.1).unwrap_or_default();
    let mut work = Vec::new();
    let mut starts = Vec::with_capacity(ranges.len() + 1);
    for (b, (&(skip, total), &k)) in ranges.iter().zip(&ks).enumerate() {
        starts.push((work.len() / 4) as i32);
        let n = total - skip;
        let per = n.div_ceil(k).next_multiple_of(align).max(align);
        let mut t = skip;
        loop {
            let end = (t + per).min(total);
            work.extend_from_slice(&[b as i32, t as i32, end as i32, 0]);
            t = end;
            if t >= total {
                break;
            }
        }
    }
    starts.push((work.len() / 4) as i32);
    (work, starts)
}

#[cfg(test)]
mod tests {
    use super::split_work;

    #[test]
    fn split_covers_every_token_once() {
        let ranges = [(0, 131072), (100, 4096), (5, 5), (0, 1), (37, 70000)];
        for (bpi, target) in [(8, 528), (2, 132), (64, 64), (1, 100000)] {
            let (work, starts) = split_work(&ranges, bpi, target, 256, 32);
            assert_eq!(starts.len(), ranges.len() + 1);
            for (b, &(skip, total)) in ranges.iter().enumerate() {
                let items: Vec<&[i32]> =
                    work.chunks(4).skip(starts[b] as usize).take((starts[b + 1] - starts[b]) as usize).collect();
                assert!(!items.is_empty());
                let mut t = skip as i32;
                for it in items {
                    assert_eq!(it[0], b as i32);
                    assert_eq!(it[1], t);
                    assert!(it[2] >= it[1] && it[2] <= total as i32);
                    t = it[2];
                }
                assert_eq!(t, total as i32);
            }
        }
    }
}
