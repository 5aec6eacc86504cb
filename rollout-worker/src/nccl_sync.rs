//! The worker's end of the NCCL weight path (GPU workers only).
//!
//! `InitWeightSync` joins the trainer's communicator (trainer rank 0 is NCCL rank 0)
//! and allocates one staging bucket on the worker's device. In an `UpdateWeights` call,
//! each `NcclBucket` message announces one broadcast: the worker receives it into the
//! staging bucket (a blocking NCCL call, on a blocking thread) and copies the listed
//! segments into device staging tensors of the update ([`WeightAssembler::stage_reusing`]
//! checks name, shape and dtype, so the commit path is the one of every other update: the
//! old weights serve until the commit is applied). A failed or timed-out broadcast aborts
//! the communicator; the update is rejected and the trainer re-forms it at its next push.
//!
//! Device memory: the staging tensors of an update come back ([`Spares`]) once the engine
//! has applied or dropped it, and the next update receives into them, so after the first
//! push no push allocates on the device. What comes back is never what the engine
//! serves: a parameter that took over its staging storage (a swap) gives its old storage
//! in exchange, and one converted by a copy leaves the staging tensor unused. Between
//! pushes the worker so holds one copy of the model in the wire dtype besides the served
//! one (memory the caching allocator would otherwise keep reserved for the next push).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nccl_comm::bucket::{self, Segment};
use nccl_comm::{Group, UniqueId};
use proto::v1 as pb;
use tch::{Device, Kind, Tensor};

use crate::error::EngineError;
use crate::weights::{Recycle, StagedWeights, WeightAssembler, WireDType};

/// The largest staging bucket a trainer may ask for (elements; 1 GiB of bf16).
pub use nccl_comm::bucket::MAX_BUCKET_ELEMENTS;

struct Member {
    session: u64,
    group: Group,
    /// `[bucket_elements]` of `dtype` on the worker's device, reused by every bucket.
    staging: Tensor,
    dtype: WireDType,
}

/// The device staging tensors of the NCCL updates the engine has applied or dropped, by
/// name: the next update receives into them instead of fresh allocations. A tensor comes
/// back only through [`Spares::recycler`], when its update's [`StagedWeights`] is
/// dropped, so none is storage the engine serves.
#[derive(Clone, Default)]
pub struct Spares(Arc<Mutex<HashMap<String, Tensor>>>);

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tensor>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The spare for `name`, if any (it leaves the set: one update at a time fills it).
    pub fn take(&self, name: &str) -> Option<Tensor> {
        self.lock().remove(name)
    }

    /// Takes back the tensors of a [`StagedWeights`] when it is dropped.
    pub fn recycler(&self) -> Recycle {
        let spares = self.clone();
        Box::new(move |tensors| spares.lock().extend(tensors))
    }

    /// Spare tensors held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The communicator this worker holds, if any (one at a time: a new `InitWeightSync`
/// replaces it).
#[derive(Clone)]
pub struct NcclSync {
    device: Device,
    member: Arc<Mutex<Option<Member>>>,
    /// Staging tensors to receive the next update into (kept across communicators).
    spares: Spares,
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
/// filled)` by name. Dropped unfinished (the update failed; the engine never saw its
/// tensors), it gives them back to the spares they came from.
#[derive(Default)]
pub struct NcclFill {
    tensors: HashMap<String, (Tensor, usize)>,
    /// Where the tensors go back if the update fails; `None` once handed to the engine.
    spares: Option<Spares>,
}

impl Drop for NcclFill {
    fn drop(&mut self) {
        if let Some(spares) = self.spares.take() {
            let tensors = self.tensors.drain().map(|(name, (t, _))| (name, t));
            spares.lock().extend(tensors);
        }
    }
}

impl NcclFill {
    /// Copies `seg` out of `bucket` (`[capacity]` of `dtype`) into its tensor's staging
    /// tensor, which `seg` must continue. At the tensor's first segment that tensor is
    /// staged through `asm` on `device`: the spare of that name when it fits, else a
    /// fresh allocation.
    pub fn unpack(
        &mut self,
        bucket: &Tensor,
        seg: &Segment,
        dtype: WireDType,
        device: Device,
        asm: &mut WeightAssembler,
        spares: &Spares,
    ) -> Result<(), EngineError> {
        self.spares.get_or_insert_with(|| spares.clone());
        if !self.tensors.contains_key(&seg.name) {
            let numel = seg
                .numel()
                .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
            let bytes = (numel * dtype.size()) as u64;
            let spare = spares.take(&seg.name);
            let t = asm.stage_reusing(&seg.name, Some(dtype), &seg.shape, bytes, spare, device)?;
            self.tensors.insert(seg.name.clone(), (t, 0));
        }
        let entry = self.tensors.get_mut(&seg.name).expect("inserted above");
        if seg.tensor_offset != entry.1 {
            return Err(EngineError::InvalidArgument(format!(
                "tensor {}: segment at element {} but {} arrived so far (segments come in order)",
                seg.name, seg.tensor_offset, entry.1
            )));
        }
        bucket::unpack(bucket, seg, &entry.0)
            .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        entry.1 += seg.len;
        Ok(())
    }

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
            spares: Spares::default(),
            cancel: Arc::new(Mutex::new(None)),
        }
    }

    /// The update received over NCCL into `asm` (every tensor `fill` started complete,
    /// every parameter staged). Its staging tensors return to the spares when it is
    /// dropped, after the engine applied it or let it go (on an error here, with `fill`).
    pub fn finish(
        &self,
        mut fill: NcclFill,
        asm: WeightAssembler,
    ) -> Result<StagedWeights, EngineError> {
        fill.check_complete()?;
        let mut staged = asm.finish()?;
        staged.recycle = Some(self.spares.recycler());
        // From here the tensors are the engine's until it drops `staged`.
        fill.spares = None;
        Ok(staged)
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
    /// tensors (staged through `asm` on the worker's device at a tensor's first segment,
    /// into the last update's tensors where they fit: [`NcclFill::unpack`]). Blocks on
    /// NCCL: call from a blocking thread. Any failure aborts the
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
            fill.unpack(&m.staging, seg, m.dtype, self.device, asm, &self.spares)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{self, Applied};
    use model::{param_specs, ModelConfig, ParamSpec, Weights};

    fn tiny() -> ModelConfig {
        let raw = serde_json::json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "tie_word_embeddings": true});
        ModelConfig::from_json(raw, std::path::Path::new("t")).unwrap()
    }

    fn ptrs(tensors: &[(String, Tensor)]) -> Vec<usize> {
        tensors.iter().map(|(_, t)| t.data_ptr() as usize).collect()
    }

    fn live(w: &Weights) -> Vec<(String, Tensor)> {
        w.named()
            .into_iter()
            .map(|(n, t)| (n, t.shallow_clone()))
            .collect()
    }

    /// Receives `sent` as NCCL buckets would bring it (each tensor in two segments, one
    /// bucket per segment; the bucket stands in for the broadcast's staging) and finishes
    /// the update.
    fn receive(
        sync: &NcclSync,
        specs: &[ParamSpec],
        sent: &[(String, Tensor)],
    ) -> Result<StagedWeights, EngineError> {
        let mut asm = WeightAssembler::new(specs);
        let mut fill = NcclFill::default();
        for (name, t) in sent {
            let flat = t.reshape([-1]);
            let n = flat.numel();
            for (from, len) in [(0, n / 2), (n / 2, n - n / 2)] {
                let bucket = flat.narrow(0, from as i64, len as i64).contiguous();
                let seg = Segment {
                    name: name.clone(),
                    shape: t.size(),
                    tensor_offset: from,
                    bucket_offset: 0,
                    len,
                };
                let (dtype, device) = (WireDType::F32, Device::Cpu);
                fill.unpack(&bucket, &seg, dtype, device, &mut asm, &sync.spares)?;
            }
        }
        sync.finish(fill, asm)
    }

    fn values(specs: &[ParamSpec], seed: i64) -> Vec<(String, Tensor)> {
        tch::manual_seed(seed);
        specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Tensor::randn(s.shape.as_slice(), tch::kind::FLOAT_CPU),
                )
            })
            .collect()
    }

    fn equal(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|((n, x), (m, y))| n == m && x.equal(y))
    }

    #[test]
    fn pushes_receive_into_the_tensors_of_the_last_one_never_into_served_ones() {
        let cfg = tiny();
        let specs = param_specs(&cfg);
        let model = Weights::random(&cfg, Kind::Float, Device::Cpu);
        let sync = NcclSync::new(Device::Cpu);
        let mut seen: Vec<Vec<usize>> = vec![ptrs(&live(&model))];
        for round in 0..3 {
            let sent = values(&specs, 10 + round);
            let before = live(&model);
            let mut staged = receive(&sync, &specs, &sent).unwrap();
            assert!(
                sync.spares.is_empty(),
                "round {round}: every spare was taken"
            );
            let staging = ptrs(&staged.tensors);
            // The old weights serve until the update is applied, untouched.
            assert!(equal(&live(&model), &before), "round {round}");
            assert!(
                staging.iter().all(|p| !ptrs(&before).contains(p)),
                "round {round}: received into served storage"
            );
            if round > 0 {
                // The storage the parameters gave up at the last push, no new allocation.
                assert_eq!(staging, seen[round as usize - 1], "round {round}");
            }
            let applied = weights::apply(&model, &mut staged).unwrap();
            assert_eq!(
                applied,
                Applied {
                    swapped: specs.len(),
                    copied: 0
                }
            );
            assert!(equal(&live(&model), &sent), "round {round}");
            drop(staged);
            assert_eq!(sync.spares.len(), specs.len(), "round {round}");
            seen.push(staging);
        }
    }

    #[test]
    fn a_failed_update_gives_its_tensors_back_and_a_misfit_spare_is_not_used() {
        let cfg = tiny();
        let specs = param_specs(&cfg);
        let sync = NcclSync::new(Device::Cpu);
        let sent = values(&specs, 1);
        // The last tensor never arrives: the update fails at the commit.
        let e = receive(&sync, &specs, &sent[..sent.len() - 1]).unwrap_err();
        assert!(e.to_string().contains("incomplete"), "{e}");
        assert_eq!(sync.spares.len(), specs.len() - 1);
        let given_back: Vec<usize> = sent[..sent.len() - 1]
            .iter()
            .map(|(n, _)| sync.spares.lock()[n].data_ptr() as usize)
            .collect();
        let staged = receive(&sync, &specs, &sent).unwrap();
        assert!(equal(&staged.tensors, &sent));
        assert_eq!(ptrs(&staged.tensors)[..sent.len() - 1], given_back[..]);
        drop(staged);
        // A spare of another dtype (the wire dtype changed) is dropped, not filled.
        let name = &specs[0].name;
        let bf16 = Tensor::zeros(specs[0].shape.as_slice(), (Kind::BFloat16, Device::Cpu));
        sync.spares.lock().insert(name.clone(), bf16);
        let staged = receive(&sync, &specs, &sent).unwrap();
        assert_eq!(staged.tensors[0].1.kind(), Kind::Float);
        assert!(equal(&staged.tensors, &sent));
    }
}
