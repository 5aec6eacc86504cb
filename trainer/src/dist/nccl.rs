//! The NCCL backend of [`Communicator`]: the collectives on CUDA tensors, over the
//! runtime-loaded NCCL group of the `nccl-comm` crate (shared with the rollout workers'
//! weight broadcast), which does the probing, the host sync points around each call and
//! the timeouts (a stalled collective aborts and poisons the communicator).

use nccl_comm::{result as nc, Group, NcclError, NcclStatus, UniqueId};
use tch::{Device, Tensor};

use super::comm::{check_root, check_shard, Communicator, Dtype, ReduceOp};
use super::error::CommError;
use super::rendezvous::Rendezvous;
use super::shard::ShardLayout;

/// Checks that libcuda, libnccl and CUDA device `device_index` are usable, without
/// touching any cudarc entry point that would panic if a library is missing.
pub fn probe(device_index: usize) -> Result<(), CommError> {
    nccl_comm::probe(device_index).map_err(|e| match e {
        NcclError::Unavailable(why) => {
            CommError::NcclUnavailable(format!("{why}; use the ring backend for CPU tensors"))
        }
        other => other.into(),
    })
}

impl From<NcclError> for CommError {
    fn from(e: NcclError) -> CommError {
        match e {
            NcclError::Unavailable(why) => CommError::NcclUnavailable(why),
            NcclError::Call { op, detail } => CommError::Nccl { op, detail },
            NcclError::Poisoned(why) => CommError::Poisoned(why),
            e @ NcclError::BadId { .. } => CommError::Store {
                addr: "nccl/id".into(),
                detail: e.to_string(),
            },
        }
    }
}

/// The NCCL communicator for CUDA tensors on one device.
pub struct NcclComm {
    rank: usize,
    world_size: usize,
    device_index: usize,
    group: Group,
    _rdzv: Rendezvous,
}

fn nccl_dtype(dtype: Dtype) -> nccl_comm::ncclDataType_t {
    use nccl_comm::ncclDataType_t as T;
    match dtype {
        Dtype::F32 => T::ncclFloat32,
        Dtype::Bf16 => T::ncclBfloat16,
        Dtype::F16 => T::ncclFloat16,
        Dtype::I64 => T::ncclInt64,
    }
}

fn nccl_op(op: ReduceOp) -> nccl_comm::ncclRedOp_t {
    use nccl_comm::ncclRedOp_t as R;
    match op {
        ReduceOp::Sum => R::ncclSum,
        ReduceOp::Avg => R::ncclAvg,
        ReduceOp::Max => R::ncclMax,
    }
}

impl NcclComm {
    /// Creates the communicator on CUDA device `device_index`: rank 0 makes the NCCL
    /// unique id and publishes it in the store as `nccl/id`; every rank joins.
    /// Call [`probe`] first (the factory does).
    pub fn connect(rdzv: Rendezvous, device_index: usize) -> Result<NcclComm, CommError> {
        let (rank, world_size, timeout) = (rdzv.env.rank, rdzv.env.world_size, rdzv.timeout);
        let id = if rank == 0 {
            let id = UniqueId::new()?;
            rdzv.store.set("nccl/id", &id.to_bytes())?;
            id
        } else {
            UniqueId::from_bytes(&rdzv.store.get("nccl/id", timeout)?)?
        };
        // Blocking init: it returns once all ranks joined. The store rendezvous has
        // already seen every rank arrive, which leaves NCCL's own bootstrap timeout
        // to cover a rank dying in between.
        let group = Group::join(&id, world_size, rank, device_index, timeout)?;
        Ok(NcclComm {
            rank,
            world_size,
            device_index,
            group,
            _rdzv: rdzv,
        })
    }

    /// Checks a tensor argument: on this communicator's device, supported dtype.
    fn check(&self, op: &'static str, tensor: &Tensor) -> Result<Dtype, CommError> {
        if let Some(reason) = self.group.poisoned() {
            return Err(CommError::Poisoned(reason.to_string()));
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

    /// Runs one NCCL call between the group's host sync points, bounded by its timeout.
    fn launch(
        &mut self,
        op: &'static str,
        call: impl FnOnce(
            nccl_comm::ncclComm_t,
            nccl_comm::cudaStream_t,
        ) -> Result<NcclStatus, nc::NcclError>,
    ) -> Result<(), CommError> {
        Ok(self.group.launch(op, call)?)
    }

    fn contiguous(op: &'static str, t: &Tensor) -> Result<Tensor, CommError> {
        t.f_reshape([-1])
            .and_then(|f| f.f_contiguous())
            .map_err(CommError::torch(op))
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
