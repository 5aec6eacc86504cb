//! The NCCL carrier of a weight push: a CUDA trainer to CUDA workers (TRL's vLLM server
//! mode, verl). Trainer rank 0 and the push's workers form one communicator (rank 0 is
//! NCCL rank 0, worker i rank 1 + i); the unique id and the layout travel in an
//! `InitWeightSync` call to each worker. The communicator is kept across pushes and
//! re-formed when the set of workers changes or it was aborted.
//!
//! Which workers are on CUDA comes from their `GetInfo` answers, kept per worker URL in a
//! [`DeviceCache`] while the communicator formed from them carries on: a push to the
//! workers of the last one asks nobody.
//!
//! Per tensor (the ZeRO engine streams them unit by unit), rank 0 packs it into one
//! reused device bucket of `update_weights_bucket_megabytes` MiB in the wire dtype
//! ([`Packer`]: no per-tensor buffers, a tensor larger than the space left is split);
//! each full bucket is announced on every worker's `UpdateWeights` stream as an
//! `NcclBucket` (names, shapes, offsets) and then `ncclBroadcast` from rank 0. The
//! `Commit` still comes on the stream, so versions and the old-weights-serve-until-commit
//! rule are those of every push.
//!
//! Failures: a broadcast that fails or times out aborts the communicator (NCCL cannot
//! drop one member); the push fails with [`RolloutError::NcclFailed`], the caller
//! retries it once over gRPC / the TCP data plane ([`RolloutClient::take_nccl_failure`]),
//! and the next push re-forms the communicator with the workers still healthy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nccl_comm::bucket::Packer;
use nccl_comm::{Group, UniqueId};
use proto::v1 as pb;
use tch::{Device, Tensor};

use super::{grpc_client, status_text, RolloutClient, RolloutError, WeightPush};
use crate::rollout::{Conn, WireDtype};

/// Which carrier moves a push's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// gRPC chunks or the TCP data plane (`weight_transport` `grpc`/`auto` as before).
    Existing,
    Nccl,
}

/// The trainer's half of the choice: `Ok(true)` when the workers must be asked (`nccl`,
/// or `auto` on a CUDA trainer). `nccl` on a CPU trainer is an error naming the device.
pub fn trainer_side(transport: &str, device: Option<Device>) -> Result<bool, RolloutError> {
    let cuda = matches!(device, Some(Device::Cuda(_)));
    match transport {
        "nccl" if !cuda => Err(RolloutError::WeightTransport(format!(
            "the trainer's policy is on {}; NCCL needs a CUDA trainer (on the CPU use \
             \"auto\" or \"grpc\")",
            device.map_or("an unknown device".to_string(), |d| format!("{d:?}")
                .to_lowercase())
        ))),
        "nccl" => Ok(true),
        "auto" => Ok(cuda),
        _ => Ok(false),
    }
}

/// The workers' half: NCCL when every worker reported a CUDA device (`GetInfo.device`,
/// `None` when it did not answer). For `nccl` any other worker is an error naming it;
/// for `auto` it means the existing path.
pub fn worker_side(
    transport: &str,
    workers: &[(String, Option<String>)],
) -> Result<Carrier, RolloutError> {
    let not_cuda: Vec<String> = workers
        .iter()
        .filter(|(_, d)| !d.as_deref().is_some_and(|d| d.starts_with("cuda")))
        .map(|(u, d)| match d {
            Some(d) => format!("{u} runs on {d}"),
            None => format!("{u} did not answer GetInfo"),
        })
        .collect();
    if workers.is_empty() || not_cuda.is_empty() {
        return Ok(if workers.is_empty() {
            Carrier::Existing
        } else {
            Carrier::Nccl
        });
    }
    if transport == "nccl" {
        return Err(RolloutError::WeightTransport(format!(
            "every worker must run on CUDA, but {}",
            not_cuda.join("; ")
        )));
    }
    Ok(Carrier::Existing)
}

/// The device each worker named in its `GetInfo` answer, by URL, so that a push asks
/// only the workers it has no answer from. A worker's device does not change while it
/// stays in the push set on one connection under one communicator; so an entry holds
/// for one connection epoch (the pool's failure count of the worker, which moves
/// whenever its connection is dropped) and is dropped when its worker leaves the set or
/// fails a push, and every entry when the communicator is aborted or formed anew (its
/// members are then asked afresh). No answer is not remembered.
#[derive(Debug, Default)]
pub struct DeviceCache(HashMap<String, (u64, String)>);

impl DeviceCache {
    /// Prepares a push to `workers` (`(url, epoch)`, in stream order): forgets the
    /// workers outside it or on another connection, and everything when `reform` (the
    /// communicator is to be formed anew). Returns the indices into `workers` of those
    /// to ask.
    pub fn to_ask(&mut self, workers: &[(String, u64)], reform: bool) -> Vec<usize> {
        if reform {
            self.0.clear();
        }
        self.0
            .retain(|u, (epoch, _)| workers.iter().any(|(w, e)| w == u && e == epoch));
        (0..workers.len())
            .filter(|&i| !self.0.contains_key(&workers[i].0))
            .collect()
    }

    /// Records the answer of `(url, epoch)` (`None`: it did not answer, so it is asked
    /// again).
    pub fn record(&mut self, (url, epoch): &(String, u64), device: Option<String>) {
        match device {
            Some(d) => self.0.insert(url.clone(), (*epoch, d)),
            None => self.0.remove(url),
        };
    }

    /// `(url, device)` of each of `workers`, `None` for a worker with no answer on its
    /// current connection.
    pub fn devices(&self, workers: &[(String, u64)]) -> Vec<(String, Option<String>)> {
        workers
            .iter()
            .map(|(u, e)| {
                let d = self.0.get(u).filter(|(epoch, _)| epoch == e);
                (u.clone(), d.map(|(_, d)| d.clone()))
            })
            .collect()
    }

    /// `url` failed a push: it is asked again.
    pub fn forget(&mut self, url: &str) {
        self.0.remove(url);
    }

    /// The communicator is gone: every worker is asked again.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// The communicator and its bucket, kept across pushes.
struct Link {
    session: u64,
    members: Vec<String>,
    group: Group,
    packer: Packer,
}

impl Link {
    /// This communicator can carry a push to `members` (in stream order).
    fn serves(&self, members: &[String]) -> bool {
        self.members == members && self.group.poisoned().is_none()
    }
}

/// Rank 0's NCCL state, part of the rollout client.
#[derive(Default)]
pub(in crate::rollout) struct NcclState {
    device: Mutex<Option<Device>>,
    devices: Mutex<DeviceCache>,
    link: Arc<Mutex<Option<Link>>>,
    /// The next push uses the existing path (the last NCCL attempt failed).
    fallback_next: AtomicBool,
    /// An NCCL push failed since the caller last asked.
    failed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RolloutClient {
    /// The device the policy lives on (rank 0's); `weight_transport` `auto`/`nccl` use
    /// NCCL only for a CUDA one. Unset means not CUDA.
    pub fn set_policy_device(&self, device: Device) {
        *lock(&self.inner.nccl.device) = Some(device);
    }

    /// Whether a push's NCCL path failed since the last call (then the caller retries
    /// the push, which takes the existing path once).
    pub fn take_nccl_failure(&self) -> bool {
        self.inner.nccl.failed.swap(false, Ordering::SeqCst)
    }
}

impl NcclState {
    /// `url` failed a push (dropped from it): its device is asked again next time.
    pub(in crate::rollout) fn forget_device(&self, url: &str) {
        lock(&self.devices).forget(url);
    }
}

impl WeightPush {
    /// The dispatch point of `begin_push`: decides the carrier and, for NCCL, forms (or
    /// reuses) the communicator with exactly this push's workers (`conns`, in stream
    /// order). A communicator that cannot be formed means the existing path, with a
    /// warning.
    pub(super) async fn open_nccl(&mut self, conns: &[Conn]) -> Result<Carrier, RolloutError> {
        let transport = self.inner.cfg.weight_transport.clone();
        let device = *lock(&self.inner.nccl.device);
        if !trainer_side(&transport, device)? {
            return Ok(Carrier::Existing);
        }
        if self.inner.nccl.fallback_next.swap(false, Ordering::SeqCst) {
            tracing::warn!(
                version = self.version,
                "the last NCCL push failed: this one goes over gRPC / the data plane"
            );
            return Ok(Carrier::Existing);
        }
        let workers = self.worker_devices(conns).await;
        if worker_side(&transport, &workers)? == Carrier::Existing {
            return Ok(Carrier::Existing);
        }
        let Some(Device::Cuda(index)) = device else {
            unreachable!("trainer_side admits CUDA only")
        };
        match self.form_link(conns, index).await {
            Ok(()) => {
                self.egress_copies = 1;
                Ok(Carrier::Nccl)
            }
            Err(why) => {
                tracing::warn!(version = self.version, error = %why, "NCCL weight sync could not be formed: this push goes over gRPC / the data plane");
                Ok(Carrier::Existing)
            }
        }
    }

    /// `(url, device)` of this push's workers (`conns`, in stream order): the cached
    /// answers while the communicator can carry this push, a `GetInfo` to each worker
    /// without one (all at once); every worker is asked when the communicator is to be
    /// formed (anew).
    async fn worker_devices(&self, conns: &[Conn]) -> Vec<(String, Option<String>)> {
        let urls: Vec<String> = self.streams.iter().map(|s| s.url.clone()).collect();
        let workers: Vec<(String, u64)> = {
            let pool = self.inner.pool();
            self.streams
                .iter()
                .map(|s| (s.url.clone(), pool.slots[s.worker].failures))
                .collect()
        };
        let nccl = &self.inner.nccl;
        // No communicator carries this push: one is formed from fresh answers.
        let reform = !lock(&nccl.link).as_ref().is_some_and(|l| l.serves(&urls));
        let ask = lock(&nccl.devices).to_ask(&workers, reform);
        let timeout = self.inner.cfg.connect_timeout();
        let answers = futures::future::join_all(ask.iter().map(|&i| {
            let mut client = grpc_client(conns[i].clone());
            async move {
                match tokio::time::timeout(timeout, client.get_info(pb::GetInfoRequest {})).await {
                    Ok(Ok(r)) => Some(r.into_inner().device),
                    _ => None,
                }
            }
        }))
        .await;
        let mut cache = lock(&nccl.devices);
        for (&i, device) in ask.iter().zip(answers) {
            cache.record(&workers[i], device);
        }
        cache.devices(&workers)
    }

    async fn form_link(&mut self, conns: &[Conn], index: usize) -> Result<(), String> {
        let members: Vec<String> = self.streams.iter().map(|s| s.url.clone()).collect();
        let link = self.inner.nccl.link.clone();
        if let Some(l) = lock(&link).as_mut() {
            if l.serves(&members) {
                // A push dropped half-way (a tensor it could not send) may have left
                // segments in the bucket: this push starts with an empty one.
                l.packer.take();
                return Ok(());
            }
        }
        // The old communicator is destroyed before a new one forms.
        *lock(&link) = None;
        nccl_comm::probe(index).map_err(|e| e.to_string())?;
        let id = UniqueId::new().map_err(|e| e.to_string())?;
        let mut session = [0u8; 8];
        getrandom::fill(&mut session).map_err(|e| format!("session id: {e}"))?;
        let session = u64::from_le_bytes(session);
        let wire: WireDtype = self.inner.wire;
        let bucket_bytes = self.inner.cfg.bucket_bytes();
        let elements = bucket_bytes / wire.size();
        let world = members.len() + 1;
        let timeout = self.inner.cfg.request_timeout();
        let id_bytes = id.to_bytes();
        let calls = conns.iter().cloned().enumerate().map(|(i, c)| {
            let req = pb::InitWeightSyncRequest {
                nccl_id: id_bytes.clone(),
                world_size: world as u32,
                rank: (i + 1) as u32,
                bucket_elements: elements as u64,
                dtype: wire.wire() as i32,
                session,
                timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
            };
            async move {
                let mut client = grpc_client(c);
                tokio::time::timeout(timeout, client.init_weight_sync(req)).await
            }
        });
        let kind = wire.kind();
        let own = tokio::task::spawn_blocking(move || -> Result<(Group, Packer), String> {
            let group =
                Group::join_bounded(&id, world, 0, index, timeout).map_err(|e| e.to_string())?;
            let bucket = Tensor::f_empty([elements as i64], (kind, Device::Cuda(index)))
                .map_err(|e| format!("allocating the {bucket_bytes}-byte bucket: {e}"))?;
            Ok((group, Packer::new(bucket).map_err(|e| e.to_string())?))
        });
        let (answers, own) = tokio::join!(futures::future::join_all(calls), own);
        let refused: Vec<String> = members
            .iter()
            .zip(answers)
            .filter_map(|(u, a)| match a {
                Ok(Ok(_)) => None,
                Ok(Err(s)) => Some(format!("{u}: InitWeightSync: {}", status_text(&s))),
                Err(_) => Some(format!("{u}: InitWeightSync: no answer within {timeout:?}")),
            })
            .collect();
        let (group, packer) = own.map_err(|e| format!("join task: {e}"))??;
        if !refused.is_empty() {
            return Err(refused.join("; "));
        }
        tracing::info!(
            session,
            members = members.len(),
            "NCCL weight-sync communicator formed"
        );
        *lock(&link) = Some(Link {
            session,
            members,
            group,
            packer,
        });
        Ok(())
    }

    /// Packs `tensor` into the bucket, broadcasting each bucket that fills.
    pub(super) async fn send_nccl(
        &mut self,
        name: &str,
        tensor: &Tensor,
    ) -> Result<(), RolloutError> {
        let link = self.inner.nccl.link.clone();
        let mut from = 0;
        loop {
            let done = {
                let mut g = lock(&link);
                let Some(l) = g.as_mut() else {
                    return Err(self.nccl_failed("the communicator is gone".into()));
                };
                l.packer
                    .fill(name, tensor, &mut from)
                    .map_err(|e| RolloutError::Tensor {
                        name: name.to_string(),
                        message: e.to_string(),
                    })?
            };
            if done {
                break;
            }
            self.flush_nccl().await?;
        }
        self.bytes += (tensor.numel() * self.inner.wire.size()) as u64;
        Ok(())
    }

    /// Announces the bucket's segments on every stream, then broadcasts it (a blocking
    /// NCCL call, bounded by the request timeout, on a blocking thread).
    pub(super) async fn flush_nccl(&mut self) -> Result<(), RolloutError> {
        let link = self.inner.nccl.link.clone();
        let (msg, count) = {
            let mut g = lock(&link);
            let Some(l) = g.as_mut() else {
                return Err(self.nccl_failed("the communicator is gone".into()));
            };
            if l.packer.is_empty() {
                return Ok(());
            }
            let count = l.packer.used();
            let segments = l
                .packer
                .take()
                .into_iter()
                .map(|s| pb::BucketSegment {
                    name: s.name,
                    shape: s.shape,
                    tensor_offset: s.tensor_offset as u64,
                    bucket_offset: s.bucket_offset as u64,
                    num_elements: s.len as u64,
                })
                .collect();
            (
                pb::WeightUpdateMessage {
                    kind: Some(pb::weight_update_message::Kind::NcclBucket(
                        pb::NcclBucket {
                            session: l.session,
                            segments,
                        },
                    )),
                },
                count,
            )
        };
        let before = self.streams.len();
        if let Err(e) = self.broadcast(msg, false).await {
            return Err(self.nccl_failed(e.to_string()));
        }
        if self.streams.len() != before {
            // A member that will not receive: the broadcast could only time out.
            return Err(self.nccl_failed("a worker left the push before a broadcast".into()));
        }
        let kind = self.inner.wire.kind();
        let cancel = match lock(&link).as_ref() {
            Some(l) => l.group.cancel_flag(),
            None => return Err(self.nccl_failed("the communicator is gone".into())),
        };
        let mut task = tokio::task::spawn_blocking(move || {
            let mut g = lock(&link);
            let l = g.as_mut().ok_or("the communicator is gone".to_string())?;
            let dtype = nccl_comm::nccl_dtype(kind).ok_or("no NCCL dtype".to_string())?;
            let ptr = l.packer.bucket().data_ptr();
            // SAFETY: the bucket is a contiguous device tensor of capacity >= count
            // elements of `dtype`, held under the lock until the call returns.
            unsafe { l.group.broadcast_raw(ptr, count, dtype, 0) }.map_err(|e| e.to_string())
        });
        // A worker whose call ends during the broadcast will not take part: cancel it
        // at once rather than wait for the timeout. (Its JoinHandle is polled here; the
        // failure path below only aborts the calls, never polls them again.)
        let ended = futures::future::select_all(self.streams.iter_mut().map(|s| &mut s.call));
        let outcome = tokio::select! {
            r = &mut task => r,
            (_, i, _) = ended => {
                let url = self.streams[i].url.clone();
                cancel.store(true, Ordering::SeqCst);
                let _ = task.await;
                return Err(self.nccl_failed(format!("{url} ended its UpdateWeights call during a broadcast")));
            }
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(self.nccl_failed(why)),
            Err(e) => Err(self.nccl_failed(format!("broadcast task: {e}"))),
        }
    }

    /// Ends the NCCL attempt of this push: the communicator is dropped (aborted already
    /// when a collective failed), every stream cancelled (the workers reject the update
    /// and keep serving the old version), and the next push takes the existing path.
    fn nccl_failed(&mut self, why: String) -> RolloutError {
        tracing::warn!(version = self.version, error = %why, "NCCL weight push failed; retrying over gRPC / the data plane");
        *lock(&self.inner.nccl.link) = None;
        lock(&self.inner.nccl.devices).clear();
        self.inner.nccl.fallback_next.store(true, Ordering::SeqCst);
        self.inner.nccl.failed.store(true, Ordering::SeqCst);
        for s in std::mem::take(&mut self.streams) {
            s.call.abort();
        }
        RolloutError::NcclFailed {
            version: self.version,
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(url: &str, dev: Option<&str>) -> (String, Option<String>) {
        (url.to_string(), dev.map(str::to_string))
    }

    fn at(workers: &[(&str, u64)]) -> Vec<(String, u64)> {
        workers.iter().map(|(u, e)| (u.to_string(), *e)).collect()
    }

    #[test]
    fn a_push_asks_only_the_workers_without_a_current_answer() {
        let mut cache = DeviceCache::default();
        let ab = at(&[("http://a", 0), ("http://b", 0)]);
        // The first push asks everyone; a worker that did not answer is asked again.
        assert_eq!(cache.to_ask(&ab, false), vec![0, 1]);
        cache.record(&ab[0], Some("cuda:0".into()));
        cache.record(&ab[1], None);
        assert_eq!(
            cache.devices(&ab),
            vec![w("http://a", Some("cuda:0")), w("http://b", None)]
        );
        assert_eq!(cache.to_ask(&ab, false), vec![1]);
        cache.record(&ab[1], Some("cuda:1".into()));
        assert_eq!(cache.to_ask(&ab, false), Vec::<usize>::new());
        assert_eq!(
            cache.devices(&ab),
            vec![w("http://a", Some("cuda:0")), w("http://b", Some("cuda:1"))]
        );
        // b left the set: forgotten, and asked again when it is back.
        let a = at(&[("http://a", 0)]);
        assert_eq!(cache.to_ask(&a, false), Vec::<usize>::new());
        assert_eq!(cache.to_ask(&ab, false), vec![1]);
        cache.record(&ab[1], Some("cuda:1".into()));
        // a failed a push: asked again.
        cache.forget("http://a");
        assert_eq!(cache.to_ask(&ab, false), vec![0]);
        cache.record(&ab[0], Some("cuda:0".into()));
        // a's connection was dropped and made anew (its epoch moved): asked again, and
        // its old answer is not reported meanwhile.
        let moved = at(&[("http://a", 1), ("http://b", 0)]);
        assert_eq!(cache.devices(&moved)[0], w("http://a", None));
        assert_eq!(cache.to_ask(&moved, false), vec![0]);
        cache.record(&moved[0], Some("cpu".into()));
        assert_eq!(cache.devices(&moved)[0], w("http://a", Some("cpu")));
        // The communicator is formed anew, or it was aborted: everyone is asked.
        assert_eq!(cache.to_ask(&moved, true), vec![0, 1]);
        cache.record(&moved[0], Some("cuda:0".into()));
        cache.record(&moved[1], Some("cuda:1".into()));
        cache.clear();
        assert_eq!(cache.to_ask(&moved, false), vec![0, 1]);
    }

    #[test]
    fn the_trainer_side_needs_cuda_for_nccl() {
        assert!(!trainer_side("grpc", Some(Device::Cuda(0))).unwrap());
        assert!(!trainer_side("auto", Some(Device::Cpu)).unwrap());
        assert!(!trainer_side("auto", None).unwrap());
        assert!(trainer_side("auto", Some(Device::Cuda(0))).unwrap());
        assert!(trainer_side("nccl", Some(Device::Cuda(1))).unwrap());
        let e = trainer_side("nccl", Some(Device::Cpu))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("weight_transport = \"nccl\"") && e.contains("on cpu"),
            "{e}"
        );
    }

    #[test]
    fn the_worker_side_names_every_cpu_worker() {
        let all = [w("http://a", Some("cuda:0")), w("http://b", Some("cuda:1"))];
        assert_eq!(worker_side("auto", &all).unwrap(), Carrier::Nccl);
        assert_eq!(worker_side("nccl", &all).unwrap(), Carrier::Nccl);
        let mixed = [
            w("http://a", Some("cuda:0")),
            w("http://b", Some("cpu")),
            w("http://c", None),
        ];
        assert_eq!(worker_side("auto", &mixed).unwrap(), Carrier::Existing);
        let e = worker_side("nccl", &mixed).unwrap_err().to_string();
        assert!(
            e.contains("http://b runs on cpu") && e.contains("http://c did not answer"),
            "{e}"
        );
        assert!(!e.contains("http://a"), "{e}");
        assert_eq!(worker_side("auto", &[]).unwrap(), Carrier::Existing);
    }
}
