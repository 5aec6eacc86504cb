//! The worker's end of the NCCL weight path (GPU workers only).
//!
//! `InitWeightSync` joins the trainer's communicator (trainer rank 0 is NCCL rank 0)
//! and allocates one staging bucket on the worker's device. In an `UpdateWeights` call,
//! each `NcclBucket` message announces one broadcast: the worker receives it into the
//! staging bucket (a blocking NCCL call, on a blocking thread) and copies the listed
//! segments into device staging tensors of the update ([`WeightAssembler::stage`] checks
//! name, shape and dtype, so the commit path is the one of every other update: the old
//! weights serve until the commit is applied). A failed or timed-out broadcast aborts the
//! communicator; the update is rejected and the trainer re-forms it at its next push.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nccl_comm::bucket::{self, Segment};
use nccl_comm::{Group, UniqueId};
use proto::v1 as pb;
use tch::{Device, Kind, Tensor};

use crate::error::EngineError;
use crate::weights::{WeightAssembler, WireDType};

/// The largest staging bucket a trainer may ask for (elements; 1 GiB of bf16).
pub use nccl_comm::bucket::MAX_BUCKET_ELEMENTS;

struct Member {
    session: u64,
    group: Group,
    /// `[bucket_elements]` of `dtype` on the worker's device, reused by every bucket.
    staging: Tensor,
    dtype: WireDType,
}

/// The communicator this worker holds, if any (one at a time: a new `InitWeightSync`
/// replaces it).
#[derive(Clone)]
pub struct NcclSync {
    device: Device,
    member: Arc<Mutex<Option<Member>>>,
    /// The held communicator's cancel flag, reachable without its lock (a receive holds
    /// the lock while it waits on NCCL).
    cancel: Arc<Mutex<Option<Arc<AtomicBool>>>>,
}

impl std::fmt::Debug for NcclSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclSync")
            .field("device", &self.device)
            .finish()
    }
}

fn sync_err(m: impl Into<String>) -> EngineError {
    EngineError::WeightSync(m.into())
}

fn wire_dtype(dtype: i32) -> Option<WireDType> {
    match pb::Dtype::try_from(dtype) {
        Ok(pb::Dtype::Float32) => Some(WireDType::F32),
        Ok(pb::Dtype::Bfloat16) => Some(WireDType::BF16),
        Ok(pb::Dtype::Float16) => Some(WireDType::F16),
        _ => None,
    }
}

/// The tensors an update has received over NCCL so far: `(staging tensor, elements
/// filled)` by name.
#[derive(Default)]
pub struct NcclFill {
    tensors: HashMap<String, (Tensor, usize)>,
}

impl NcclFill {
    /// Every tensor that was started is complete (the assembler checks that every
    /// parameter was staged).
    pub fn check_complete(&self) -> Result<(), EngineError> {
        for (name, (t, filled)) in &self.tensors {
            if *filled != t.numel() {
                return Err(EngineError::InvalidArgument(format!(
                    "tensor {name}: {filled} of its {} elements arrived over NCCL",
                    t.numel()
                )));
            }
        }
        Ok(())
    }
}

impl NcclSync {
    /// For a worker whose model lives on `device`.
    pub fn new(device: Device) -> NcclSync {
        NcclSync {
            device,
            member: Arc::new(Mutex::new(None)),
            cancel: Arc::new(Mutex::new(None)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Member>> {
        self.member.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates an `InitWeightSync` request and joins the communicator (blocks until
    /// every member joined; call from a blocking thread). Refused on a CPU worker.
    pub fn join(
        &self,
        req: &pb::InitWeightSyncRequest,
    ) -> Result<pb::InitWeightSyncResponse, EngineError> {
        let Some(index) = nccl_comm::cuda_index(self.device) else {
            return Err(sync_err(
                "this worker runs on the cpu; NCCL weight pushes need a CUDA worker \
                 (use rollout.weight_transport = \"grpc\" or \"auto\")",
            ));
        };
        let invalid = |m: String| EngineError::InvalidArgument(format!("InitWeightSync: {m}"));
        if req.world_size < 2 || req.rank == 0 || req.rank >= req.world_size {
            return Err(invalid(format!(
                "rank {} of world_size {}: a worker's rank is in 1..world_size",
                req.rank, req.world_size
            )));
        }
        if req.bucket_elements == 0 || req.bucket_elements > MAX_BUCKET_ELEMENTS {
            return Err(invalid(format!(
                "bucket_elements = {}; allowed 1..={MAX_BUCKET_ELEMENTS}",
                req.bucket_elements
            )));
        }
        let Some(dtype) = wire_dtype(req.dtype) else {
            return Err(invalid(format!("dtype {} is not a float dtype", req.dtype)));
        };
        if req.timeout_ms == 0 {
            return Err(invalid("timeout_ms must be positive".into()));
        }
        let id = UniqueId::from_bytes(&req.nccl_id).map_err(|e| invalid(e.to_string()))?;
        nccl_comm::probe(index).map_err(|e| sync_err(e.to_string()))?;
        // The old communicator (if any) goes first: a device holds one member per job. A
        // receive still waiting on it (its push was abandoned) is cancelled, not waited for.
        if let Some(c) = self.cancel.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.store(true, Ordering::SeqCst);
        }
        *self.lock() = None;
        let staging = Tensor::f_empty([req.bucket_elements as i64], (dtype.kind(), self.device))
            .map_err(|e| sync_err(format!("allocating the staging bucket: {e}")))?;
        let timeout = Duration::from_millis(req.timeout_ms as u64);
        let group = Group::join_bounded(
            &id,
            req.world_size as usize,
            req.rank as usize,
            index,
            timeout,
        )
        .map_err(|e| sync_err(e.to_string()))?;
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = Some(group.cancel_flag());
        *self.lock() = Some(Member {
            session: req.session,
            group,
            staging,
            dtype,
        });
        tracing::info!(
            session = req.session,
            rank = req.rank,
            world_size = req.world_size,
            "joined the NCCL weight-sync communicator"
        );
        Ok(pb::InitWeightSyncResponse {
            session: req.session,
            rank: req.rank,
            device: format!("cuda:{index}"),
        })
    }

    /// Receives one broadcast bucket and copies its segments into the update's staging
    /// tensors (allocated through `asm` on the worker's device at a tensor's first
    /// segment). Blocks on NCCL: call from a blocking thread. Any failure aborts the
    /// communicator (the trainer's broadcast fails too and it falls back).
    pub fn receive(
        &self,
        msg: &pb::NcclBucket,
        asm: &mut WeightAssembler,
        fill: &mut NcclFill,
    ) -> Result<(), EngineError> {
        let mut guard = self.lock();
        let Some(m) = guard.as_mut() else {
            return Err(sync_err(
                "an NcclBucket, but this worker has joined no communicator (InitWeightSync first)",
            ));
        };
        if m.session != msg.session {
            return Err(sync_err(format!(
                "an NcclBucket of session {}, but this worker's communicator is session {}",
                msg.session, m.session
            )));
        }
        let segments: Vec<Segment> = msg
            .segments
            .iter()
            .map(|s| Segment {
                name: s.name.clone(),
                shape: s.shape.clone(),
                tensor_offset: s.tensor_offset as usize,
                bucket_offset: s.bucket_offset as usize,
                len: s.num_elements as usize,
            })
            .collect();
        let capacity = m.staging.numel();
        // Checked before the broadcast: a bad layout must not leave the trainer waiting,
        // so the communicator is aborted (the trainer's broadcast fails at once).
        let checked = segments.iter().try_for_each(|s| {
            bucket::check_segment(s, capacity)
                .map_err(|e| EngineError::InvalidArgument(e.to_string()))
        });
        if let Err(e) = checked {
            m.group
                .abort("broadcast", format!("bad bucket layout: {e}"));
            return Err(e);
        }
        let count = segments
            .iter()
            .map(|s| s.bucket_offset + s.len)
            .max()
            .unwrap_or(0);
        let dtype = nccl_comm::nccl_dtype(m.dtype.kind()).expect("float wire dtypes map");
        // SAFETY: `staging` is a contiguous device tensor of `capacity >= count` elements
        // of `dtype`, held (under the lock) until the call returns.
        unsafe { m.group.broadcast_raw(m.staging.data_ptr(), count, dtype, 0) }
            .map_err(|e| sync_err(e.to_string()))?;
        for seg in &segments {
            let entry = match fill.tensors.get_mut(&seg.name) {
                Some(e) => e,
                None => {
                    let numel = seg
                        .numel()
                        .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
                    let bytes = (numel * m.dtype.size()) as u64;
                    let empty =
                        Tensor::f_empty(seg.shape.as_slice(), (m.dtype.kind(), self.device))
                            .map_err(|e| sync_err(format!("allocating {}: {e}", seg.name)))?;
                    let t = asm.stage_reusing(
                        &seg.name,
                        Some(m.dtype),
                        &seg.shape,
                        bytes,
                        Some(empty),
                    )?;
                    fill.tensors.entry(seg.name.clone()).or_insert((t, 0))
                }
            };
            if seg.tensor_offset != entry.1 {
                return Err(EngineError::InvalidArgument(format!(
                    "tensor {}: segment at element {} but {} arrived so far (segments come in order)",
                    seg.name, seg.tensor_offset, entry.1
                )));
            }
            bucket::unpack(&m.staging, seg, &entry.0)
                .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
            entry.1 += seg.len;
        }
        Ok(())
    }

    /// The session of the communicator held, if any.
    pub fn session(&self) -> Option<u64> {
        self.lock().as_ref().map(|m| m.session)
    }

    /// Kind of the buckets of the communicator held.
    pub fn kind(&self) -> Option<Kind> {
        self.lock().as_ref().map(|m| m.dtype.kind())
    }
}
