//! The NCCL backend, through cudarc's bindings loaded at run time.
//!
//! Nothing CUDA-related is linked: cudarc opens libcuda and libnccl with dlopen on
//! first use and panics if they are missing, so [`probe`] checks for both libraries
//! and a device before any other call and turns their absence into
//! [`CommError::NcclUnavailable`]. cudarc looks for `libnccl.so`, while PyTorch's
//! nvidia-nccl wheel ships `libnccl.so.2`; `scripts/setup.sh` adds the link, and its
//! directory must be on the library path (see docs/collectives.md).
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

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cudarc::driver::{sys as cu, CudaContext, CudaStream};
use cudarc::nccl::{result as nc, sys as ncs};
use tch::{Device, Tensor};

use super::comm::{check_root, check_shard, Communicator, Dtype, ReduceOp};
use super::error::CommError;
use super::rendezvous::Rendezvous;
use super::shard::ShardLayout;

/// Checks that libcuda, libnccl and CUDA device `device_index` are usable, without
/// touching any cudarc entry point that would panic if a library is missing.
pub fn probe(device_index: usize) -> Result<(), CommError> {
    // SAFETY: is_culib_present only attempts to dlopen the library.
    if !unsafe { cu::is_culib_present() } {
        return Err(CommError::NcclUnavailable(
            "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this \
             machine; use the ring backend for CPU tensors"
                .into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { ncs::is_culib_present() } {
        return Err(CommError::NcclUnavailable(
            "libnccl.so was not found on the library path; scripts/setup.sh links it next \
             to the wheel's libnccl.so.2 in <venv>/lib/python3.*/site-packages/nvidia/nccl/lib, \
             which must be on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let count = CudaContext::device_count().map_err(|e| {
        CommError::NcclUnavailable(format!("CUDA driver initialisation failed: {e:?}"))
    })?;
    if device_index >= count.max(0) as usize {
        return Err(CommError::NcclUnavailable(format!(
            "CUDA device {device_index} requested but {count} visible"
        )));
    }
    Ok(())
}

/// An NCCL communicator handle. NCCL allows a communicator to be used from any
/// thread as long as calls are not concurrent; `&mut self` on every collective
/// guarantees that.
struct CommHandle(ncs::ncclComm_t);

// SAFETY: see the type's doc comment; the handle is only used through `&mut NcclComm`.
unsafe impl Send for CommHandle {}

/// The NCCL communicator for CUDA tensors on one device.
pub struct NcclComm {
    rank: usize,
    world_size: usize,
    device_index: usize,
    timeout: Duration,
    comm: CommHandle,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    poisoned: Option<String>,
    _rdzv: Rendezvous,
}

fn nccl_err(op: &'static str) -> impl Fn(nc::NcclError) -> CommError {
    move |e| CommError::Nccl {
        op,
        detail: format!("{:?}", e.0),
    }
}

fn driver_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CommError {
    move |e| CommError::Nccl {
        op,
        detail: format!("CUDA driver: {e:?}"),
    }
}

fn nccl_dtype(dtype: Dtype) -> ncs::ncclDataType_t {
    match dtype {
        Dtype::F32 => ncs::ncclDataType_t::ncclFloat32,
        Dtype::Bf16 => ncs::ncclDataType_t::ncclBfloat16,
        Dtype::F16 => ncs::ncclDataType_t::ncclFloat16,
        Dtype::I64 => ncs::ncclDataType_t::ncclInt64,
    }
}

fn nccl_op(op: ReduceOp) -> ncs::ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncs::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => ncs::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => ncs::ncclRedOp_t::ncclMax,
    }
}

impl NcclComm {
    /// Creates the communicator on CUDA device `device_index`: rank 0 makes the NCCL
    /// unique id and publishes it in the store as `nccl/id`; every rank joins.
    /// Call [`probe`] first (the factory does).
    pub fn connect(rdzv: Rendezvous, device_index: usize) -> Result<NcclComm, CommError> {
        let (rank, world_size, timeout) = (rdzv.env.rank, rdzv.env.world_size, rdzv.timeout);
        let id = if rank == 0 {
            let id = nc::get_uniqueid().map_err(nccl_err("get_uniqueid"))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&b| b as u8).collect();
            rdzv.store.set("nccl/id", &bytes)?;
            id
        } else {
            let bytes = rdzv.store.get("nccl/id", timeout)?;
            if bytes.len() != 128 {
                return Err(CommError::Store {
                    addr: "nccl/id".into(),
                    detail: format!("expected a 128-byte NCCL id, got {} bytes", bytes.len()),
                });
            }
            let mut id = ncs::ncclUniqueId { internal: [0; 128] };
            for (dst, src) in id.internal.iter_mut().zip(&bytes) {
                *dst = *src as std::ffi::c_char;
            }
            id
        };
        // The primary context, which PyTorch's runtime API also uses.
        let ctx = CudaContext::new(device_index).map_err(driver_err("context"))?;
        let stream = ctx.new_stream().map_err(driver_err("stream"))?;
        let mut comm: ncs::ncclComm_t = std::ptr::null_mut();
        // Blocking init: it returns once all ranks joined. The store rendezvous has
        // already seen every rank arrive, which leaves NCCL's own bootstrap timeout
        // to cover a rank dying in between.
        // SAFETY: `comm` is a valid out-pointer; `id` came from rank 0's get_uniqueid.
        unsafe { nc::comm_init_rank(&mut comm, world_size as i32, id, rank as i32) }
            .map_err(nccl_err("comm_init_rank"))?;
        Ok(NcclComm {
            rank,
            world_size,
            device_index,
            timeout,
            comm: CommHandle(comm),
            ctx,
            stream,
            poisoned: None,
            _rdzv: rdzv,
        })
    }

    /// Checks a tensor argument: on this communicator's device, supported dtype.
    fn check(&self, op: &'static str, tensor: &Tensor) -> Result<Dtype, CommError> {
        if let Some(reason) = &self.poisoned {
            return Err(CommError::Poisoned(reason.clone()));
        }
        let dtype = Dtype::of(op, tensor)?;
        if tensor.device() != Device::Cuda(self.device_index) {
            return Err(CommError::invalid(
                op,
                format!(
                    "the NCCL backend needs tensors on cuda:{}, got {:?}",
                    self.device_index,
                    tensor.device()
                ),
            ));
        }
        Ok(dtype)
    }

    /// Runs one NCCL call on our stream between the two host sync points, bounded
    /// by the timeout.
    fn launch(
        &mut self,
        op: &'static str,
        call: impl FnOnce(ncs::ncclComm_t, ncs::cudaStream_t) -> Result<nc::NcclStatus, nc::NcclError>,
    ) -> Result<(), CommError> {
        self.ctx.bind_to_thread().map_err(driver_err(op))?;
        // Sync point 1: inputs written by PyTorch's streams are complete.
        tch::Cuda::synchronize(self.device_index as i64);
        let stream: ncs::cudaStream_t = self.stream.cu_stream().cast();
        call(self.comm.0, stream).map_err(nccl_err(op))?;
        // Sync point 2: poll until our stream drained, the comm failed, or timeout.
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: the stream belongs to our context, bound to this thread above.
            let status = unsafe { cu::cuStreamQuery(self.stream.cu_stream()) };
            match status {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(self.abort(op, format!("CUDA stream error {other:?}"))),
            }
            let mut async_err = ncs::ncclResult_t::ncclSuccess;
            // SAFETY: valid communicator and out-pointer.
            unsafe { ncs::ncclCommGetAsyncError(self.comm.0, &mut async_err) };
            if !matches!(
                async_err,
                ncs::ncclResult_t::ncclSuccess | ncs::ncclResult_t::ncclInProgress
            ) {
                return Err(self.abort(op, format!("asynchronous NCCL error {async_err:?}")));
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

    fn abort(&mut self, op: &'static str, detail: String) -> CommError {
        // SAFETY: aborting a valid communicator; it is never used again (poisoned).
        unsafe {
            let _ = nc::comm_abort(self.comm.0);
        }
        self.comm.0 = std::ptr::null_mut();
        self.poisoned = Some(format!("NCCL {op}: {detail}"));
        CommError::Nccl { op, detail }
    }

    fn contiguous(op: &'static str, t: &Tensor) -> Result<Tensor, CommError> {
        t.f_reshape([-1])
            .and_then(|f| f.f_contiguous())
            .map_err(CommError::torch(op))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.comm.0.is_null() {
            // SAFETY: valid communicator, not used after this.
            unsafe {
                let _ = nc::comm_destroy(self.comm.0);
            }
        }
    }
}

impl Communicator for NcclComm {
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        let dtype = self.check("all_reduce", tensor)?;
        dtype.check_reduce("all_reduce", op)?;
        let n = tensor.numel();
        if n == 0 {
            return Ok(());
        }
        let work = Self::contiguous("all_reduce", tensor)?;
        let ptr = work.data_ptr();
        // SAFETY: `work` is a contiguous CUDA buffer of n elements of `dtype` that
        // outlives the call (launch waits for completion); in place is allowed.
        self.launch("all_reduce", |comm, stream| unsafe {
            nc::all_reduce(ptr, ptr, n, nccl_dtype(dtype), nccl_op(op), comm, stream)
        })?;
        if work.data_ptr() != tensor.data_ptr() {
            tensor
                .f_copy_(
                    &work
                        .f_view_as(tensor)
                        .map_err(CommError::torch("all_reduce"))?,
                )
                .map_err(CommError::torch("all_reduce"))?;
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        let dtype = self.check("reduce_scatter", input)?;
        dtype.check_reduce("reduce_scatter", op)?;
        let layout = ShardLayout::new(input.numel(), self.world_size);
        let opts = (dtype.kind(), input.device());
        let torch = CommError::torch("reduce_scatter");
        // NCCL needs equal shards: pad to padded_len (the padding is never returned).
        let padded = Tensor::f_zeros([layout.padded_len as i64], opts).map_err(torch)?;
        padded
            .f_narrow(0, 0, layout.len as i64)
            .and_then(|mut head| head.f_copy_(&input.f_reshape([-1])?))
            .map_err(CommError::torch("reduce_scatter"))?;
        let out = Tensor::f_empty([layout.shard_len as i64], opts)
            .map_err(CommError::torch("reduce_scatter"))?;
        if layout.shard_len > 0 {
            let (send, recv) = (padded.data_ptr(), out.data_ptr());
            // SAFETY: padded holds world_size * shard_len elements, out shard_len.
            self.launch("reduce_scatter", |comm, stream| unsafe {
                nc::reduce_scatter(
                    send,
                    recv,
                    layout.shard_len,
                    nccl_dtype(dtype),
                    nccl_op(op),
                    comm,
                    stream,
                )
            })?;
        }
        let mine = layout.range(self.rank).len() as i64;
        out.f_narrow(0, 0, mine)
            .and_then(|t| t.f_contiguous())
            .map_err(CommError::torch("reduce_scatter"))
    }

    fn all_gather(&mut self, shard: &Tensor, len: usize) -> Result<Tensor, CommError> {
        let dtype = self.check("all_gather", shard)?;
        let layout = ShardLayout::new(len, self.world_size);
        check_shard("all_gather", shard, &layout, self.rank)?;
        let opts = (dtype.kind(), shard.device());
        let send = Tensor::f_zeros([layout.shard_len as i64], opts)
            .map_err(CommError::torch("all_gather"))?;
        let mine = layout.range(self.rank).len() as i64;
        send.f_narrow(0, 0, mine)
            .and_then(|mut head| head.f_copy_(&shard.f_reshape([-1])?))
            .map_err(CommError::torch("all_gather"))?;
        let out = Tensor::f_empty([layout.padded_len as i64], opts)
            .map_err(CommError::torch("all_gather"))?;
        if layout.shard_len > 0 {
            let (sp, rp) = (send.data_ptr(), out.data_ptr());
            // SAFETY: send holds shard_len elements, out world_size * shard_len.
            self.launch("all_gather", |comm, stream| unsafe {
                nc::all_gather(sp, rp, layout.shard_len, nccl_dtype(dtype), comm, stream)
            })?;
        }
        // Each rank's block starts at rank * shard_len, exactly where ShardLayout
        // puts it, so dropping the tail padding yields the flat result.
        out.f_narrow(0, 0, len as i64)
            .and_then(|t| t.f_contiguous())
            .map_err(CommError::torch("all_gather"))
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        let dtype = self.check("broadcast", tensor)?;
        check_root("broadcast", root, self.world_size)?;
        let n = tensor.numel();
        if n == 0 {
            return Ok(());
        }
        let work = Self::contiguous("broadcast", tensor)?;
        let ptr = work.data_ptr();
        // SAFETY: contiguous CUDA buffer of n elements; in place is allowed.
        self.launch("broadcast", |comm, stream| unsafe {
            nc::broadcast(ptr, ptr, n, nccl_dtype(dtype), root as i32, comm, stream)
        })?;
        if work.data_ptr() != tensor.data_ptr() {
            tensor
                .f_copy_(
                    &work
                        .f_view_as(tensor)
                        .map_err(CommError::torch("broadcast"))?,
                )
                .map_err(CommError::torch("broadcast"))?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let mut token = Tensor::f_ones([1], (tch::Kind::Float, Device::Cuda(self.device_index)))
            .map_err(CommError::torch("barrier"))?;
        self.all_reduce(&mut token, ReduceOp::Sum)
    }
}
