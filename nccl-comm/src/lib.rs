//! NCCL for the trainer's collectives and for the weight broadcast to GPU rollout
//! workers, through cudarc's bindings loaded at run time.
//!
//! Nothing CUDA-related is linked: cudarc opens libcuda and libnccl with dlopen on
//! first use and panics if they are missing, so [`probe`] checks for both libraries
//! and a device before any other call and turns their absence into
//! [`NcclError::Unavailable`]. cudarc looks for `libnccl.so`, while PyTorch's
//! nvidia-nccl wheel ships `libnccl.so.2`; `scripts/setup.sh` adds the link, and its
//! directory must be on the library path (see docs/collectives.md).
//!
//! Data flow: one side makes a [`UniqueId`] and hands its 128 bytes to the others (the
//! trainer's store for its ranks, the `InitWeightSync` RPC for rollout workers); every
//! member calls [`Group::join`] with the same id, world size and its own rank; the
//! collectives then go through [`Group::launch`], which brackets each call with host
//! sync points and bounds it by a timeout. [`bucket`] packs named tensors into one
//! reused flat buffer and back (pure tensor code, tested on the CPU).
//!
//! Streams: tch exposes no handle to PyTorch's current CUDA stream, so NCCL runs on
//! a stream of our own and every collective is bracketed by host-side syncs:
//! `torch.cuda.synchronize(device)` before (the inputs are complete, sync point 1)
//! and polling our stream to completion after (sync point 2), so later tensor ops on
//! any stream see the results. That costs overlap, not correctness.
//!
//! Timeouts: collectives are enqueued and then polled (`cuStreamQuery`, plus
//! `ncclCommGetAsyncError`) until they finish or the timeout passes; on timeout the
//! communicator is aborted (`ncclCommAbort`) and poisoned instead of hanging. NCCL
//! cannot say which peer is missing, so the error says which collective stalled.

pub mod bucket;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub use cudarc::nccl::result::NcclStatus;
pub use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t};
pub use cudarc::nccl::{result, sys};

use cudarc::driver::{sys as cu, CudaContext, CudaStream};
use cudarc::nccl::{result as nc, sys as ncs};
use tch::Kind;

/// Why an NCCL operation could not run or did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NcclError {
    /// libcuda, libnccl or the CUDA device is missing.
    #[error("NCCL unavailable: {0}")]
    Unavailable(String),
    /// An NCCL or CUDA driver call failed or did not complete in time.
    #[error("NCCL {op}: {detail}")]
    Call { op: &'static str, detail: String },
    /// The communicator was aborted by an earlier failure and cannot be used.
    #[error("the NCCL communicator was aborted earlier ({0}); it must be formed again")]
    Poisoned(String),
    /// A unique id of the wrong length arrived.
    #[error("an NCCL unique id has {expected} bytes, got {found}")]
    BadId { expected: usize, found: usize },
}

/// Checks that libcuda, libnccl and CUDA device `device_index` are usable, without
/// touching any cudarc entry point that would panic if a library is missing.
pub fn probe(device_index: usize) -> Result<(), NcclError> {
    // SAFETY: is_culib_present only attempts to dlopen the library.
    if !unsafe { cu::is_culib_present() } {
        return Err(NcclError::Unavailable(
            "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this \
             machine"
                .into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { ncs::is_culib_present() } {
        return Err(NcclError::Unavailable(
            "libnccl.so was not found on the library path; scripts/setup.sh links it next \
             to the wheel's libnccl.so.2 in <venv>/lib/python3.*/site-packages/nvidia/nccl/lib, \
             which must be on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| NcclError::Unavailable(format!("CUDA driver initialisation failed: {e:?}")))?;
    if device_index >= count.max(0) as usize {
        return Err(NcclError::Unavailable(format!(
            "CUDA device {device_index} requested but {count} visible"
        )));
    }
    Ok(())
}

/// The NCCL datatype of a tensor kind NCCL carries here.
pub fn nccl_dtype(kind: Kind) -> Option<ncclDataType_t> {
    Some(match kind {
        Kind::Float => ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => ncclDataType_t::ncclBfloat16,
        Kind::Half => ncclDataType_t::ncclFloat16,
        Kind::Int64 => ncclDataType_t::ncclInt64,
        _ => return None,
    })
}

/// The 128-byte token every member of one communicator joins with.
#[derive(Clone)]
pub struct UniqueId(ncs::ncclUniqueId);

/// Bytes of a [`UniqueId`] on the wire.
pub const UNIQUE_ID_BYTES: usize = 128;

impl UniqueId {
    /// A fresh id (call [`probe`] first).
    pub fn new() -> Result<UniqueId, NcclError> {
        nc::get_uniqueid()
            .map(UniqueId)
            .map_err(call_err("get_uniqueid"))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|&b| b as u8).collect()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<UniqueId, NcclError> {
        if bytes.len() != UNIQUE_ID_BYTES {
            return Err(NcclError::BadId {
                expected: UNIQUE_ID_BYTES,
                found: bytes.len(),
            });
        }
        let mut id = ncs::ncclUniqueId { internal: [0; 128] };
        for (dst, src) in id.internal.iter_mut().zip(bytes) {
            *dst = *src as std::ffi::c_char;
        }
        Ok(UniqueId(id))
    }
}

fn call_err(op: &'static str) -> impl Fn(nc::NcclError) -> NcclError {
    move |e| NcclError::Call {
        op,
        detail: format!("{:?}", e.0),
    }
}

fn driver_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> NcclError {
    move |e| NcclError::Call {
        op,
        detail: format!("CUDA driver: {e:?}"),
    }
}

/// An NCCL communicator handle. NCCL allows a communicator to be used from any
/// thread as long as calls are not concurrent; `&mut self` on every call guarantees it.
struct CommHandle(ncs::ncclComm_t);

// SAFETY: see the type's doc comment; the handle is only used through `&mut Group`.
unsafe impl Send for CommHandle {}

/// One member of an NCCL communicator on one CUDA device, with its own stream.
pub struct Group {
    rank: usize,
    world_size: usize,
    device_index: usize,
    timeout: Duration,
    comm: CommHandle,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    poisoned: Option<String>,
    /// Set from another thread to abort the call in progress (and the communicator).
    cancel: Arc<AtomicBool>,
}

impl Group {
    /// Joins the communicator `id` as `rank` of `world_size` on CUDA device
    /// `device_index`. Blocks until every member joined, at most `timeout` (then the
    /// join is aborted); `timeout` also bounds every later call. Call [`probe`] first.
    pub fn join_bounded(
        id: &UniqueId,
        world_size: usize,
        rank: usize,
        device_index: usize,
        timeout: Duration,
    ) -> Result<Group, NcclError> {
        Self::init(id, world_size, rank, device_index, timeout, false)
    }

    /// As [`join_bounded`](Self::join_bounded), with NCCL's blocking init: it returns
    /// once all members joined, NCCL's own bootstrap timeout covering one that dies (the
    /// trainer's ranks, which a store rendezvous has already seen arrive).
    pub fn join(
        id: &UniqueId,
        world_size: usize,
        rank: usize,
        device_index: usize,
        timeout: Duration,
    ) -> Result<Group, NcclError> {
        Self::init(id, world_size, rank, device_index, timeout, true)
    }

    fn init(
        id: &UniqueId,
        world_size: usize,
        rank: usize,
        device_index: usize,
        timeout: Duration,
        blocking: bool,
    ) -> Result<Group, NcclError> {
        if rank >= world_size {
            return Err(NcclError::Call {
                op: "comm_init_rank",
                detail: format!("rank {rank} is outside a world of {world_size}"),
            });
        }
        // The primary context, which PyTorch's runtime API also uses.
        let ctx = CudaContext::new(device_index).map_err(driver_err("context"))?;
        let stream = ctx.new_stream().map_err(driver_err("stream"))?;
        let mut comm: ncs::ncclComm_t = std::ptr::null_mut();
        if blocking {
            // SAFETY: `comm` is a valid out-pointer; `id` came from one get_uniqueid.
            unsafe { nc::comm_init_rank(&mut comm, world_size as i32, id.0, rank as i32) }
                .map_err(call_err("comm_init_rank"))?;
        } else {
            // Non-blocking init (NCCL_CONFIG_INITIALIZER with blocking = 0), polled until
            // every member joined or `timeout` passed: a member that never comes (a worker
            // that refused) aborts the join instead of hanging it.
            const UNDEF: i32 = i32::MIN;
            let mut config = ncs::ncclConfig_t {
                size: std::mem::size_of::<ncs::ncclConfig_t>(),
                magic: 0xcafebeef,
                version: 22800,
                blocking: 0,
                cgaClusterSize: UNDEF,
                minCTAs: UNDEF,
                maxCTAs: UNDEF,
                netName: std::ptr::null(),
                splitShare: UNDEF,
                trafficClass: UNDEF,
                commName: std::ptr::null(),
                collnetEnable: UNDEF,
                CTAPolicy: UNDEF,
                shrinkShare: UNDEF,
                nvlsCTAs: UNDEF,
                nChannelsPerNetPeer: UNDEF,
                nvlinkCentricSched: UNDEF,
            };
            ctx.bind_to_thread().map_err(driver_err("comm_init_rank"))?;
            // SAFETY: valid out-pointer and config; `id` came from one get_uniqueid.
            let started = unsafe {
                ncs::ncclCommInitRankConfig(
                    &mut comm,
                    world_size as i32,
                    id.0,
                    rank as i32,
                    &mut config,
                )
            };
            if !matches!(
                started,
                ncs::ncclResult_t::ncclSuccess | ncs::ncclResult_t::ncclInProgress
            ) {
                return Err(NcclError::Call {
                    op: "comm_init_rank",
                    detail: format!("{started:?}"),
                });
            }
            let deadline = Instant::now() + timeout;
            loop {
                let mut state = ncs::ncclResult_t::ncclInProgress;
                // SAFETY: valid communicator (being initialised) and out-pointer.
                unsafe { ncs::ncclCommGetAsyncError(comm, &mut state) };
                match state {
                    ncs::ncclResult_t::ncclSuccess => break,
                    ncs::ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    other => {
                        // SAFETY: aborting the communicator being initialised; never used again.
                        unsafe {
                            let _ = nc::comm_abort(comm);
                        }
                        let detail = if other == ncs::ncclResult_t::ncclInProgress {
                            format!(
                            "not every one of the {world_size} members joined within {timeout:?}"
                        )
                        } else {
                            format!("{other:?}")
                        };
                        return Err(NcclError::Call {
                            op: "comm_init_rank",
                            detail,
                        });
                    }
                }
            }
        }
        Ok(Group {
            rank,
            world_size,
            device_index,
            timeout,
            comm: CommHandle(comm),
            ctx,
            stream,
            poisoned: None,
            cancel: Arc::default(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn device_index(&self) -> usize {
        self.device_index
    }

    /// A flag that, once set (from any thread), makes the call in progress or the next
    /// one abort the communicator: how a caller that learns a member is gone (its gRPC
    /// call ended) stops a broadcast that would otherwise wait for the timeout.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Why the communicator was aborted, if it was.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Runs one NCCL call on our stream between the two host sync points, bounded
    /// by the timeout; a failure or timeout aborts and poisons the communicator.
    pub fn launch(
        &mut self,
        op: &'static str,
        call: impl FnOnce(ncclComm_t, cudaStream_t) -> Result<NcclStatus, nc::NcclError>,
    ) -> Result<(), NcclError> {
        if let Some(reason) = &self.poisoned {
            return Err(NcclError::Poisoned(reason.clone()));
        }
        self.ctx.bind_to_thread().map_err(driver_err(op))?;
        // Sync point 1: inputs written by PyTorch's streams are complete.
        tch::Cuda::synchronize(self.device_index as i64);
        let stream: ncs::cudaStream_t = self.stream.cu_stream().cast();
        call(self.comm.0, stream).map_err(call_err(op))?;
        // Sync point 2: poll until our stream drained, the comm failed, or timeout. A
        // non-blocking communicator may still be enqueueing (ncclInProgress): the stream
        // is only looked at once NCCL reports success.
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut async_err = ncs::ncclResult_t::ncclSuccess;
            // SAFETY: valid communicator and out-pointer.
            unsafe { ncs::ncclCommGetAsyncError(self.comm.0, &mut async_err) };
            match async_err {
                ncs::ncclResult_t::ncclSuccess => {
                    // SAFETY: the stream belongs to our context, bound to this thread above.
                    let status = unsafe { cu::cuStreamQuery(self.stream.cu_stream()) };
                    match status {
                        cu::CUresult::CUDA_SUCCESS => return Ok(()),
                        cu::CUresult::CUDA_ERROR_NOT_READY => {}
                        other => return Err(self.abort(op, format!("CUDA stream error {other:?}"))),
                    }
                }
                ncs::ncclResult_t::ncclInProgress => {}
                other => return Err(self.abort(op, format!("asynchronous NCCL error {other:?}"))),
            }
            if self.cancel.load(Ordering::SeqCst) {
                return Err(self.abort(op, "cancelled: a member is gone".into()));
            }
            if Instant::now() >= deadline {
                let timeout = self.timeout;
                return Err(self.abort(
                    op,
                    format!(
                        "did not complete within {timeout:?}: a peer died, stalled or called \
                         a different collective (NCCL cannot tell which)"
                    ),
                ));
            }
            thread::sleep(Duration::from_micros(50));
        }
    }

    /// `ncclBroadcast` of `count` elements of `dtype` at `ptr` (device memory on this
    /// group's device) from `root`, in place.
    ///
    /// # Safety
    /// `ptr` must point to at least `count` elements of `dtype` on this group's device,
    /// valid until this returns.
    pub unsafe fn broadcast_raw(
        &mut self,
        ptr: *mut std::ffi::c_void,
        count: usize,
        dtype: ncclDataType_t,
        root: usize,
    ) -> Result<(), NcclError> {
        if root >= self.world_size {
            return Err(NcclError::Call {
                op: "broadcast",
                detail: format!("root {root} is outside a world of {}", self.world_size),
            });
        }
        if count == 0 {
            return Ok(());
        }
        self.launch("broadcast", |comm, stream| unsafe {
            nc::broadcast(ptr, ptr, count, dtype, root as i32, comm, stream)
        })
    }

    /// Aborts the communicator (every member's pending and later calls fail) and
    /// poisons this handle; returns the error that says why.
    pub fn abort(&mut self, op: &'static str, detail: String) -> NcclError {
        if !self.comm.0.is_null() {
            // SAFETY: aborting a valid communicator; it is never used again (poisoned).
            unsafe {
                let _ = nc::comm_abort(self.comm.0);
            }
            self.comm.0 = std::ptr::null_mut();
        }
        self.poisoned = Some(format!("NCCL {op}: {detail}"));
        NcclError::Call { op, detail }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.comm.0.is_null() {
            // SAFETY: valid communicator, not used after this.
            unsafe {
                let _ = nc::comm_destroy(self.comm.0);
            }
        }
    }
}

/// The CUDA device index of `device`, or `None` for the CPU.
pub fn cuda_index(device: tch::Device) -> Option<usize> {
    match device {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    }
}
