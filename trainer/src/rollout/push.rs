//! Versioned weight pushes: one client-streaming `UpdateWeights` call per worker, all
//! fed concurrently from per-worker queues, so a slow worker never slows the others
//! (it finishes later, or is dropped at the commit's timeout and re-synced by a later
//! push).
//!
//! No copies on the sender's side: each tensor's bytes in the wire dtype are one
//! [`Bytes`] buffer (the tensor's own memory when it already is a contiguous host
//! tensor of the wire dtype, else one conversion), chunks are slices of it and every
//! worker's queue shares them; protobuf encoding is the one copy, into the HTTP/2 frames.
//! Host memory: at most one copy of the model in the wire dtype, shared by all workers
//! (the buffers live until the slowest worker's stream has taken them).

use super::error::WireError;
use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use proto::v1 as pb;
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::data_feed::Feed;
use super::{grpc_client, status_text, Inner, RolloutClient, RolloutError, WireDtype};
use proto::data_plane::{self as dp, Hop};

pub mod nccl_push;

// Chunks carry the tensors' bytes as the host lays them out; the protocol says little-endian.
#[cfg(target_endian = "big")]
compile_error!("weight pushes send host-order bytes; the protocol requires little-endian");

/// Outcome of a committed push.
#[derive(Debug, Clone, PartialEq)]
pub struct PushReport {
    pub version: u64,
    /// Bytes of one copy of the update in the wire dtype (each worker got this many).
    pub bytes: u64,
    /// From `begin_push` to the last worker's answer to the commit.
    pub seconds: f64,
    /// Workers now serving `version`.
    pub updated: Vec<String>,
    /// `(url, reason)` of each worker that did not take it.
    pub failed: Vec<(String, String)>,
    /// Workers whose tensors came over the TCP data plane (the others took gRPC chunks).
    pub data_plane: Vec<String>,
    /// Copies of the update rank 0 sent: one per data-plane feed (one for a chain) plus
    /// one per worker fed by gRPC chunks.
    pub egress_copies: usize,
}

struct PushStream {
    worker: usize,
    url: String,
    /// Its tensors come over the data plane (a `Feed`), not as chunks on `tx`.
    data: bool,
    tx: mpsc::UnboundedSender<pb::WeightUpdateMessage>,
    call: JoinHandle<Result<pb::UpdateWeightsResponse, tonic::Status>>,
}

/// A weight push in progress. Dropping it without [`WeightPush::commit`] cancels the
/// calls; the workers then reject the update and keep their old weights.
pub struct WeightPush {
    inner: Arc<Inner>,
    version: u64,
    started: Instant,
    bytes: u64,
    names: HashSet<String>,
    streams: Vec<PushStream>,
    failed: Vec<(String, String)>,
    /// Data-plane streams (one for a chain, else one per data-plane worker).
    feeds: Vec<Feed>,
    data_plane: Vec<String>,
    egress_copies: usize,
    /// The bytes go by NCCL broadcast ([`nccl_push`]), not chunks or the data plane.
    nccl: bool,
}

/// Byte ranges of `total` bytes in chunks of `chunk` bytes (the last may be shorter); an
/// empty tensor still gets one (empty) chunk so the worker sees it.
pub fn chunk_ranges(total: usize, chunk: usize) -> Vec<Range<usize>> {
    if total == 0 {
        return std::iter::once(0..0).collect();
    }
    let chunk = chunk.max(1);
    (0..total)
        .step_by(chunk)
        .map(|s| s..(s + chunk).min(total))
        .collect()
}

/// A contiguous host tensor viewed as its bytes (kept alive by the [`Bytes`] it backs;
/// shared with [`WireBuffers`] when it is a reused conversion buffer).
struct TensorBytes(Arc<HostBuf>);

/// A host tensor shared between threads that only read it.
struct HostBuf(Tensor);

// SAFETY: a `HostBuf` is written (converted into) only while [`WireBuffers::take`]'s
// caller holds the sole reference besides the map, under the map's lock; every thread
// holding it otherwise only reads its memory and metadata (kind, numel, data pointer),
// which libtorch does not mutate.
unsafe impl Sync for HostBuf {}

impl std::ops::Deref for HostBuf {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.0
    }
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        let len = self.0.numel() * self.0.kind().elt_size_in_bytes();
        if len == 0 {
            return &[];
        }
        // SAFETY: the tensor is contiguous, on the CPU and owned by `self` (a shallow
        // clone keeps its storage alive); its memory holds `len` initialised bytes. The
        // trainer does not write the weights while a push is in progress (the push is
        // committed before the next optimizer step).
        unsafe { std::slice::from_raw_parts(self.0.data_ptr() as *const u8, len) }
    }
}

/// One host buffer per tensor name for the tensors a push has to convert (another
/// dtype than the wire's, or not on the host), kept across pushes: a push converts into
/// the buffer of the push before (`copy_`, one conversion, no allocation and no page
/// faults) once nothing references it any more, i.e. the streams that sent from it have
/// ended. Holds one copy of those tensors in the wire dtype between pushes.
#[derive(Default)]
pub(super) struct WireBuffers(std::sync::Mutex<std::collections::HashMap<String, Arc<HostBuf>>>);

impl WireBuffers {
    /// A buffer for `name` of `shape` and `kind` on the host that nothing else holds:
    /// the kept one when it is free and fits, else a new one (kept for the next push).
    fn take(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Arc<HostBuf>, tch::TchError> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(name) {
            // Only the map holds it (every `Bytes` that sent from it is gone); new
            // references are made under this lock only, so it stays free until returned.
            if Arc::strong_count(b) == 1 && b.kind() == kind && b.size() == shape {
                return Ok(b.clone());
            }
        }
        let b = Arc::new(HostBuf(Tensor::f_empty(shape, (kind, Device::Cpu))?));
        map.insert(name.to_string(), b.clone());
        Ok(b)
    }
}

/// The little-endian bytes of `t` in `wire` dtype, on the host, without a copy when `t`
/// already is a contiguous host tensor of that dtype (a bf16 policy to a bf16 wire sends
/// its own memory). Otherwise one conversion, into the reused buffer `name` of `buffers`
/// (narrowing and device-to-host in one `copy_`).
fn wire_bytes(
    t: &Tensor,
    wire: WireDtype,
    name: &str,
    buffers: &WireBuffers,
) -> Result<Bytes, WireError> {
    if !t.defined() {
        return Err(WireError::Undefined);
    }
    let kind = t.f_kind().map_err(WireError::Torch)?;
    if !matches!(
        kind,
        Kind::Double | Kind::Float | Kind::Half | Kind::BFloat16
    ) {
        return Err(WireError::NotFloat { kind });
    }
    let _g = tch::no_grad_guard();
    let t = t.detach();
    let conversion = |source| WireError::Conversion { wire, source };
    if kind == wire.kind() && t.device() == Device::Cpu && t.is_contiguous() {
        return Ok(Bytes::from_owner(TensorBytes(Arc::new(HostBuf(t)))));
    }
    let buf = buffers
        .take(name, &t.size(), wire.kind())
        .map_err(conversion)?;
    buf.shallow_clone().f_copy_(&t).map_err(conversion)?;
    Ok(Bytes::from_owner(TensorBytes(buf)))
}

/// A rejection by the worker (bad chunk, stale version) leaves it healthy; anything
/// else (transport, timeout) fails it.
fn is_rejection(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
    )
}

impl RolloutClient {
    /// Starts a versioned weight push to every reachable worker (a client-streaming
    /// `UpdateWeights` per worker). Failed workers are probed first, ignoring their
    /// backoff, so a restarted worker gets the new weights. Workers already at
    /// `version` or later are left out (reported at commit). Errors if no worker can
    /// take the push.
    pub async fn begin_push(&self, version: u64) -> Result<WeightPush, RolloutError> {
        let started = Instant::now();
        // Workers that joined since the last resolution get this push before any group.
        self.inner.resolve_if_due().await;
        self.inner.probe_now(true).await;
        let mut push = WeightPush {
            inner: self.inner.clone(),
            version,
            started,
            bytes: 0,
            names: HashSet::new(),
            streams: vec![],
            failed: vec![],
            feeds: vec![],
            data_plane: vec![],
            egress_copies: 0,
            nccl: false,
        };
        let targets: Vec<_> = {
            let pool = self.inner.pool();
            pool.slots
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    (
                        i,
                        s.url.clone(),
                        s.conn.clone(),
                        s.version,
                        s.last_error.clone(),
                    )
                })
                .collect()
        };
        let mut data_ports = vec![];
        for (worker, url, conn, known, last_error) in targets {
            let Some(channel) = conn else {
                let why = last_error.unwrap_or_else(|| "unreachable".into());
                push.failed.push((url, format!("unreachable: {why}")));
                continue;
            };
            if let Some(v) = known.filter(|&v| v >= version) {
                push.failed.push((
                    url,
                    format!("already serves weight version {v} >= {version}"),
                ));
                continue;
            }
            data_ports.push(channel.clone());
            let (tx, rx) = mpsc::unbounded_channel();
            let mut client = grpc_client(channel);
            let call = tokio::spawn(async move {
                client
                    .update_weights(UnboundedReceiverStream::new(rx))
                    .await
                    .map(|r| r.into_inner())
            });
            push.streams.push(PushStream {
                worker,
                url,
                data: false,
                tx,
                call,
            });
        }
        if push.streams.is_empty() {
            return Err(push.all_failed());
        }
        push.egress_copies = push.streams.len();
        if push.open_nccl(&data_ports).await? == nccl_push::Carrier::Nccl {
            push.nccl = true;
        } else if self.inner.cfg.weight_transport != "grpc" {
            push.open_data_plane(data_ports).await;
        }
        tracing::debug!(version, workers = push.streams.len(), "weight push started");
        Ok(push)
    }
}

impl WeightPush {
    /// The version being pushed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Workers still taking part.
    pub fn workers(&self) -> Vec<String> {
        self.streams.iter().map(|s| s.url.clone()).collect()
    }

    fn all_failed(&self) -> RolloutError {
        RolloutError::PushFailed {
            version: self.version,
            failed: self
                .failed
                .iter()
                .map(|(u, e)| format!("{u}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    /// Drops `s` from the push with `reason`; fails the worker unless it merely refused.
    fn drop_stream(&mut self, s: PushStream, reason: String, rejection: bool) {
        s.call.abort();
        self.drop_worker(s.worker, s.url, reason, rejection);
    }

    fn drop_worker(&mut self, worker: usize, url: String, reason: String, rejection: bool) {
        tracing::warn!(worker = %url, version = self.version, error = %reason, "worker dropped from weight push");
        self.inner.nccl.forget_device(&url);
        if !rejection {
            self.inner
                .pool()
                .mark_failed(worker, format!("weight push: {reason}"), Instant::now());
            self.inner.bump();
        }
        self.failed.push((url, reason));
    }

    /// Why a call whose stream stopped accepting messages ended.
    async fn ended_call(&self, s: &mut PushStream) -> (String, bool) {
        match tokio::time::timeout(self.inner.cfg.connect_timeout(), &mut s.call).await {
            Ok(Ok(Err(status))) => (
                format!("UpdateWeights: {}", status_text(&status)),
                is_rejection(&status),
            ),
            Ok(Ok(Ok(_))) => ("UpdateWeights answered before the commit".into(), false),
            Ok(Err(e)) => (format!("UpdateWeights task failed: {e}"), false),
            Err(_) => (
                "UpdateWeights stream closed without an answer".into(),
                false,
            ),
        }
    }

    /// Queues `msg` on every worker still in the push (`chunks`: only those fed by
    /// chunks; returns at once). A worker whose call has ended is dropped, with the
    /// reason its call gives.
    async fn broadcast(
        &mut self,
        msg: pb::WeightUpdateMessage,
        chunks: bool,
    ) -> Result<(), RolloutError> {
        let streams = std::mem::take(&mut self.streams);
        for mut s in streams {
            if (chunks && s.data) || s.tx.send(msg.clone()).is_ok() {
                self.streams.push(s);
            } else {
                let (why, rejection) = self.ended_call(&mut s).await;
                self.drop_stream(s, why, rejection);
            }
        }
        if self.streams.is_empty() {
            return Err(self.all_failed());
        }
        Ok(())
    }

    /// Sends one named Hugging Face tensor (any float kind, any device) to every worker
    /// in chunks of `weight_chunk_bytes` (whole elements), converted to `weight_dtype`.
    /// Queues the chunks on every worker and returns without waiting for any (each
    /// worker's stream drains its own queue). A worker that fails is dropped from this
    /// push (reported at commit); errors if none is left, or if the tensor cannot be sent
    /// (not a float kind, or a name sent twice).
    pub async fn send(&mut self, name: &str, tensor: &Tensor) -> Result<(), RolloutError> {
        let tensor_err = |message: String| RolloutError::Tensor {
            name: name.to_string(),
            message,
        };
        if self.names.contains(name) {
            return Err(tensor_err("sent twice in one push".into()));
        }
        if self.nccl {
            self.names.insert(name.to_string());
            return self.send_nccl(name, tensor).await;
        }
        let wire = self.inner.wire;
        let bytes = wire_bytes(tensor, wire, name, &self.inner.wire_buffers)
            .map_err(|e| tensor_err(e.to_string()))?;
        self.names.insert(name.to_string());
        let shape = tensor.size();
        if !self.feeds.is_empty() {
            let header = dp::TensorHeader {
                name: name.to_string(),
                dtype: wire.wire() as u8,
                shape: shape.clone(),
                offset: 0,
                num_bytes: bytes.len() as u64,
            };
            for f in &mut self.feeds {
                f.send(&header, bytes.clone());
            }
        }
        if self.streams.iter().all(|s| s.data) {
            self.bytes += bytes.len() as u64;
            return Ok(());
        }
        let chunk = (self.inner.cfg.weight_chunk_bytes / wire.size()).max(1) * wire.size();
        for range in chunk_ranges(bytes.len(), chunk) {
            let msg = pb::WeightUpdateMessage {
                kind: Some(pb::weight_update_message::Kind::Chunk(pb::TensorChunk {
                    name: name.to_string(),
                    dtype: wire.wire() as i32,
                    shape: shape.clone(),
                    offset: range.start as u64,
                    data: bytes.slice(range),
                })),
            };
            self.broadcast(msg, true).await?;
        }
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Commits: every worker still in the push applies the new version (waiting for
    /// sequences it is running to finish on the old weights). Returns each worker's
    /// outcome; errors only if no worker took the new version.
    pub async fn commit(mut self) -> Result<PushReport, RolloutError> {
        let commit = pb::WeightUpdateMessage {
            kind: Some(pb::weight_update_message::Kind::Commit(pb::Commit {
                version: self.version,
            })),
        };
        if self.nccl {
            self.flush_nccl().await?;
        }
        // The commit goes out with the end of the data, so each worker applies as soon
        // as its bytes are in (it awaits them first) while the feeds' verdicts return;
        // a worker a feed cut is dropped then (its call aborted, it applies nothing).
        self.broadcast(commit, false).await?;
        self.finish_feeds().await?;
        let timeout = self.inner.cfg.request_timeout();
        // Every worker's answer is awaited at once: the push ends with the slowest.
        let waits = std::mem::take(&mut self.streams)
            .into_iter()
            .map(|s| async move {
                let PushStream {
                    worker,
                    url,
                    tx,
                    mut call,
                    ..
                } = s;
                // Ends the request stream; the worker answers once the new weights serve.
                drop(tx);
                let outcome = tokio::time::timeout(timeout, &mut call).await;
                if outcome.is_err() {
                    call.abort();
                    // The task (and the chunks still queued in it) is gone once this returns.
                    let _ = call.await;
                }
                (worker, url, outcome)
            });
        let outcomes = futures::future::join_all(waits).await;
        let mut updated = vec![];
        for (worker, url, outcome) in outcomes {
            match outcome {
                Ok(Ok(Ok(r))) => {
                    self.inner.pool().observe_version(worker, r.version);
                    updated.push(url);
                }
                Ok(Ok(Err(status))) => {
                    let why = format!("UpdateWeights: {}", status_text(&status));
                    self.drop_worker(worker, url, why, is_rejection(&status));
                }
                Ok(Err(e)) => self.drop_worker(
                    worker,
                    url,
                    format!("UpdateWeights task failed: {e}"),
                    false,
                ),
                Err(_) => {
                    let why = format!(
                        "no answer to the commit within {:.1}s",
                        timeout.as_secs_f64()
                    );
                    self.drop_worker(worker, url, why, false);
                }
            }
        }
        self.inner.bump();
        if updated.is_empty() {
            return Err(self.all_failed());
        }
        let report = PushReport {
            version: self.version,
            bytes: self.bytes,
            seconds: self.started.elapsed().as_secs_f64(),
            updated,
            failed: std::mem::take(&mut self.failed),
            data_plane: std::mem::take(&mut self.data_plane),
            egress_copies: self.egress_copies,
        };
        tracing::debug!(
            version = report.version,
            bytes = report.bytes,
            seconds = report.seconds,
            updated = report.updated.len(),
            failed = report.failed.len(),
            "weight push committed"
        );
        Ok(report)
    }
}

/// `host:port` of the data plane of the worker at `url` (an `http://` url only: with
/// TLS the bytes stay on the encrypted gRPC stream).
fn data_addr(url: &str, port: u32) -> Option<String> {
    if port == 0 || port > u16::MAX as u32 || !url.starts_with("http://") {
        return None;
    }
    let uri: tonic::codegen::http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

impl WeightPush {
    /// Moves every worker that announces a data plane (`GetInfo.data_port`, asked of all
    /// at once at the first push over a connection, then remembered with it) onto it: a
    /// one-time token in a `DataPlaneOffer` on its call, then one feed down the chain of
    /// them (`weight_chain`) or one feed each. The others keep taking chunks on their
    /// gRPC stream.
    async fn open_data_plane(&mut self, conns: Vec<super::Conn>) {
        let timeout = self.inner.cfg.connect_timeout();
        let known: Vec<Option<u32>> = {
            let pool = self.inner.pool();
            self.streams
                .iter()
                .map(|s| pool.slots[s.worker].data_port)
                .collect()
        };
        // `None`: GetInfo failed (asked again at the next push).
        let infos: Vec<Option<u32>> =
            futures::future::join_all(conns.into_iter().zip(known).map(|(c, known)| async move {
                if known.is_some() {
                    return known;
                }
                let mut client = grpc_client(c);
                let call = client.get_info(pb::GetInfoRequest {});
                match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(r)) => Some(r.into_inner().data_port),
                    _ => None,
                }
            }))
            .await;
        {
            let mut pool = self.inner.pool();
            for (s, port) in self.streams.iter().zip(&infos) {
                if port.is_some() {
                    pool.slots[s.worker].data_port = *port;
                }
            }
        }
        let infos = infos.into_iter().map(|port| port.unwrap_or(0));
        let mut hops: Vec<(usize, Hop)> = vec![];
        for (s, port) in self.streams.iter_mut().zip(infos) {
            let Some(addr) = data_addr(&s.url, port) else {
                continue;
            };
            let mut token = [0u8; dp::TOKEN_BYTES];
            if getrandom::fill(&mut token).is_err() {
                continue;
            }
            let offer = pb::WeightUpdateMessage {
                kind: Some(pb::weight_update_message::Kind::DataPlane(
                    pb::DataPlaneOffer {
                        token: token.to_vec(),
                    },
                )),
            };
            if s.tx.send(offer).is_ok() {
                s.data = true;
                self.data_plane.push(s.url.clone());
                hops.push((s.worker, Hop { addr, token }));
            }
        }
        let routes: Vec<Vec<(usize, Hop)>> = if self.inner.cfg.weight_chain {
            vec![hops].into_iter().filter(|h| !h.is_empty()).collect()
        } else {
            hops.into_iter().map(|h| vec![h]).collect()
        };
        for route in routes {
            self.feeds
                .push(Feed::start(route, timeout, self.inner.cfg.weight_lanes));
        }
        self.egress_copies = self.feeds.len() + self.streams.iter().filter(|s| !s.data).count();
        tracing::debug!(
            version = self.version,
            feeds = self.feeds.len(),
            data_plane = self.streams.iter().filter(|s| s.data).count(),
            "weight push over the data plane"
        );
    }

    /// Ends every feed and awaits each one's outcome. The workers a feed cut (dead,
    /// refusing or stalled while they were its first hop) are dropped from the push at
    /// once (their calls would otherwise wait for a connection that never comes); the
    /// feed went on at the next worker of its route, so the others still take the
    /// version. Other failures surface in the workers' answers to the commit.
    async fn finish_feeds(&mut self) -> Result<(), RolloutError> {
        let feeds = std::mem::take(&mut self.feeds);
        let ends = futures::future::join_all(feeds.into_iter().map(Feed::finish)).await;
        let mut lost: Vec<(usize, String)> = vec![];
        for end in ends {
            if let Some(e) = &end.rejected {
                tracing::warn!(version = self.version, error = %e, "weight data-plane feed rejected");
            }
            lost.extend(end.cut.into_iter().map(|(w, e)| (w, e.to_string())));
        }
        if lost.is_empty() {
            return Ok(());
        }
        let streams = std::mem::take(&mut self.streams);
        for s in streams {
            match lost.iter().find(|(w, _)| *w == s.worker) {
                Some((_, why)) => {
                    let why = why.clone();
                    self.drop_stream(s, why, false);
                }
                None => self.streams.push(s),
            }
        }
        if self.streams.is_empty() {
            return Err(self.all_failed());
        }
        Ok(())
    }
}

impl Drop for WeightPush {
    fn drop(&mut self) {
        for s in &self.streams {
            s.call.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ranges_cover_exactly() {
        assert_eq!(chunk_ranges(10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(chunk_ranges(8, 4), vec![0..4, 4..8]);
        assert_eq!(chunk_ranges(3, 4), vec![0..3]);
        let empty = chunk_ranges(0, 4);
        assert_eq!((empty.len(), empty[0].clone()), (1, 0..0));
    }

    #[test]
    fn wire_bytes_converts_and_rejects_non_floats() {
        let bufs = WireBuffers::default();
        let t = Tensor::from_slice(&[1.0f64, -2.5, 3.25]).view([3, 1]);
        let b = wire_bytes(&t, WireDtype::Float32, "t", &bufs).unwrap();
        let back: Vec<f32> = b
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, vec![1.0, -2.5, 3.25]);
        let b = wire_bytes(&t.to_kind(Kind::Half), WireDtype::BFloat16, "h", &bufs).unwrap();
        let back: Vec<f32> = b
            .chunks(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect();
        assert_eq!(back, vec![1.0, -2.5, 3.25]);
        // Non-contiguous input is laid out row-major.
        let m = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .view([2, 2])
            .tr();
        let b = wire_bytes(&m, WireDtype::Float32, "m", &bufs).unwrap();
        assert_eq!(f32::from_le_bytes(b[4..8].try_into().unwrap()), 3.0);
        let e = wire_bytes(&Tensor::from_slice(&[1i64]), WireDtype::Float32, "i", &bufs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Int64"), "{e}");
    }

    #[test]
    fn wire_bytes_sends_own_memory_or_reuses_one_buffer_per_tensor() {
        let bufs = WireBuffers::default();
        // The wire dtype already: the tensor's own memory, nothing kept.
        let own = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let b = wire_bytes(&own, WireDtype::Float32, "own", &bufs).unwrap();
        assert_eq!(b.as_ptr() as usize, own.data_ptr() as usize);
        // Converted: the second push's bytes land in the first push's buffer once its
        // bytes are released, and never while they are held.
        let t = Tensor::from_slice(&[1.5f32, -2.0, 0.1]);
        let first = wire_bytes(&t, WireDtype::BFloat16, "w", &bufs).unwrap();
        let held = wire_bytes(&(&t * 2.0), WireDtype::BFloat16, "w", &bufs).unwrap();
        assert_ne!(
            first.as_ptr(),
            held.as_ptr(),
            "a buffer still sending is not reused"
        );
        let ptr = held.as_ptr() as usize;
        drop((first, held));
        let again = wire_bytes(&(&t * 3.0), WireDtype::BFloat16, "w", &bufs).unwrap();
        assert_eq!(again.as_ptr() as usize, ptr, "the kept buffer is reused");
        let want = (&t * 3.0).to_kind(Kind::BFloat16);
        let mut bytes = vec![0u8; 6];
        want.copy_data_u8(&mut bytes, 3);
        assert_eq!(&again[..], &bytes[..], "torch's own rounding, bit for bit");
    }
}
