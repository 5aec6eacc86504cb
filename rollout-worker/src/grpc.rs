//! The gRPC front end: `rollout.v1.RolloutService` over tonic.
//!
//! Data flow: wire requests are converted to domain types here ([`GenerateRequest`],
//! [`TensorChunk`]), handed to the [`EngineHandle`], and the engine's [`Event`]s are
//! converted back to wire messages. Weight chunks are assembled in this task
//! ([`WeightAssembler`]) while they stream in, while the engine keeps generating; only a
//! complete, validated update reaches the engine. At most [`MAX_STAGED_UPDATES`] updates
//! assemble at once (a further one is refused, never queued), a stream that sends
//! nothing for [`UPDATE_IDLE_TIMEOUT`] is rejected, and the lock that serializes
//! applying updates is taken only once an update is complete, never while waiting on a
//! client, so an idle or dead sender cannot block later pushes.
//! Domain errors become [`Status`] in one place, [`status`].
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use model::tokenizer::ChatMessage;
use model::SamplingParams;
use proto::v1 as pb;
use proto::v1::rollout_service_server::{RolloutService, RolloutServiceServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::data_plane::{DataPlane, Pending};
use crate::engine::EngineHandle;
use crate::error::EngineError;
use crate::nccl_sync::{NcclFill, NcclSync};
use crate::request::{
    CompletionOutput, Event, FinishReason, GenerateRequest, GroupOutput, PromptInput, PromptSpec,
};
use crate::security::{GrpcGuardLayer, ServeOptions};
use crate::weights::{TensorChunk, WeightAssembler, WireDType};

/// Largest message accepted: one weight chunk (the trainer's chunks are at most 48 MiB
/// plus name and shape); every other message is far smaller.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Updates assembling at once; each holds at most one copy of the model on the host.
pub const MAX_STAGED_UPDATES: usize = 2;

/// An `UpdateWeights` stream that delivers no message for this long is rejected.
pub const UPDATE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP/2 receive windows and frame size: a weight push streams hundreds of megabytes
/// on one stream; with hyper's defaults (1 MiB windows, 16 KiB frames) the sender waits
/// for window updates every megabyte and the receiver handles 64 frames per MiB.
const STREAM_WINDOW_BYTES: u32 = 64 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 128 << 20;
const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

/// The one mapping from domain errors to gRPC statuses.
pub fn status(e: EngineError) -> Status {
    let msg = e.to_string();
    match e {
        EngineError::InvalidArgument(_) | EngineError::Weights(_) => Status::invalid_argument(msg),
        EngineError::Overloaded { .. } => Status::resource_exhausted(msg),
        EngineError::StaleVersion { .. } | EngineError::WeightSync(_) => {
            Status::failed_precondition(msg)
        }
        EngineError::Superseded { .. } => Status::aborted(msg),
        EngineError::Unavailable(_) => Status::unavailable(msg),
        EngineError::Internal(_) => Status::internal(msg),
    }
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct GrpcService {
    engine: EngineHandle,
    /// Serializes applying complete updates (never held while reading a stream).
    update_lock: Arc<tokio::sync::Mutex<()>>,
    /// Permits to assemble an update (bounds the staging memory).
    staging: Arc<tokio::sync::Semaphore>,
    idle_timeout: Duration,
    /// The bulk weight data plane, when one listens (not with TLS).
    data_plane: Option<DataPlane>,
    /// The NCCL communicator of weight pushes (GPU workers, after `InitWeightSync`).
    nccl: NcclSync,
}

impl GrpcService {
    pub fn new(engine: EngineHandle) -> Self {
        let device = model::parse_device(&engine.info().device).unwrap_or(tch::Device::Cpu);
        GrpcService {
            nccl: NcclSync::new(device),
            engine,
            update_lock: Arc::new(tokio::sync::Mutex::new(())),
            staging: Arc::new(tokio::sync::Semaphore::new(MAX_STAGED_UPDATES)),
            idle_timeout: UPDATE_IDLE_TIMEOUT,
            data_plane: None,
        }
    }

    /// Accepts `DataPlaneOffer`s: updates whose bytes come over `dp`.
    pub fn with_data_plane(mut self, dp: DataPlane) -> Self {
        self.data_plane = Some(dp);
        self
    }

    /// Rejects an `UpdateWeights` stream idle for `t` (default [`UPDATE_IDLE_TIMEOUT`]).
    pub fn with_update_idle_timeout(mut self, t: Duration) -> Self {
        self.idle_timeout = t;
        self
    }

    /// Registers the token of a `DataPlaneOffer`: the update's tensors come over the
    /// data plane. Refused without a data plane, after chunks, or twice.
    fn offer(
        &self,
        o: pb::DataPlaneOffer,
        asm: &WeightAssembler,
        again: bool,
    ) -> Result<Pending, EngineError> {
        let Some(dp) = &self.data_plane else {
            return Err(invalid(
                "a DataPlaneOffer, but this worker has no data plane (TLS is configured): \
                 send TensorChunks"
                    .into(),
            ));
        };
        if again || asm.num_bytes() > 0 {
            return Err(invalid(
                "a DataPlaneOffer after chunks or another offer (one update takes one path)".into(),
            ));
        }
        let token: proto::data_plane::Token = o.token.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "DataPlaneOffer.token has {} bytes, expected {}",
                o.token.len(),
                proto::data_plane::TOKEN_BYTES
            ))
        })?;
        dp.register(token)
    }

    /// The tonic server wrapper with the message size limits set.
    pub fn into_server(self) -> RolloutServiceServer<Self> {
        RolloutServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Serves gRPC on `listener` until `shutdown` resolves.
///
/// Accepted connections get TCP_NODELAY (tonic's `Server::tcp_nodelay` applies only to
/// listeners it binds itself): without it, Nagle's algorithm holding the server's small
/// replies until the client's delayed ACK cost ~40 ms per exchange, i.e. ~45 ms per
/// weight-update commit and as much per health probe on loopback.
pub async fn serve(
    listener: TcpListener,
    engine: EngineHandle,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_with(listener, engine, &ServeOptions::default(), shutdown).await
}

/// [`serve`] with the API key, TLS, keepalive and request limits of `opts`. Without TLS
/// the weight data plane listens beside it (same host, a port of its own, announced in
/// `GetInfo.data_port`); with TLS there is none and pushes stream over gRPC, so no
/// weight byte ever crosses the network unencrypted when TLS is configured.
pub async fn serve_with(
    listener: TcpListener,
    engine: EngineHandle,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let listener_ip = listener.local_addr().ok().map(|a| a.ip());
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok::<_, std::io::Error>(conn)
    });
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout));
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.tonic_config(opts.header_read_timeout))?;
    }
    let mut service = GrpcService::new(engine.clone());
    let mut data_task = None;
    if opts.tls.is_none() {
        let ip = listener_ip.unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
        let specs = engine.param_specs().to_vec();
        match DataPlane::start(ip, opts.data_port, specs, UPDATE_IDLE_TIMEOUT).await {
            Ok((dp, task)) => {
                service = service.with_data_plane(dp);
                data_task = Some(task);
            }
            Err(e) => tracing::warn!(
                port = opts.data_port,
                error = %e,
                "no weight data plane (pushes use gRPC)"
            ),
        }
    }
    let served = builder
        .layer(GrpcGuardLayer::new(opts))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Some(t) = data_task {
        t.abort();
    }
    served
}

fn invalid(m: String) -> EngineError {
    EngineError::InvalidArgument(m)
}

/// Wire request to domain request; structural checks only (limits are the engine's).
fn to_domain(req: pb::GenerateRequest) -> Result<GenerateRequest, EngineError> {
    let s = req.sampling.unwrap_or_default();
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for (i, p) in req.prompts.into_iter().enumerate() {
        let input = match p.input {
            Some(pb::prompt::Input::TokenIds(t)) => PromptInput::Tokens(t.ids),
            Some(pb::prompt::Input::Chat(c)) => PromptInput::Chat(
                c.messages
                    .into_iter()
                    .map(|m| ChatMessage::new(m.role, m.content))
                    .collect(),
            ),
            None => {
                return Err(invalid(format!(
                    "prompts[{i}] has neither token_ids nor chat"
                )))
            }
        };
        prompts.push(PromptSpec { id: p.id, input });
    }
    Ok(GenerateRequest {
        prompts,
        n: req.n as usize,
        sampling: SamplingParams {
            temperature: s.temperature.unwrap_or(1.0),
            top_k: s.top_k,
            top_p: s.top_p.unwrap_or(1.0),
            min_p: s.min_p,
        },
        max_new_tokens: s.max_new_tokens as usize,
        stop_token_ids: s.stop_token_ids,
        stop: s.stop,
        ignore_eos: s.ignore_eos,
        seed: s.seed,
        top_logprobs: 0,
        stream_tokens: false,
        return_text: req.return_text,
    })
}

fn completion_to_wire(c: CompletionOutput) -> pb::Completion {
    pb::Completion {
        token_ids: c.tokens,
        logprobs: c.logprobs,
        finish_reason: match c.finish_reason {
            FinishReason::Stop => pb::FinishReason::Stop,
            FinishReason::Length => pb::FinishReason::Length,
        } as i32,
        text: c.text.unwrap_or_default(),
    }
}

fn group_to_wire(g: GroupOutput) -> pb::GroupResult {
    pb::GroupResult {
        prompt_index: g.prompt_index as u32,
        prompt_id: g.prompt_id,
        prompt_token_ids: g.prompt_token_ids,
        completions: g.completions.into_iter().map(completion_to_wire).collect(),
        weight_version: g.weight_version,
        timings: Some(pb::Timings {
            queue_seconds: g.timings.queue.as_secs_f64(),
            time_to_first_token_seconds: g.timings.time_to_first_token.as_secs_f64(),
            total_seconds: g.timings.total.as_secs_f64(),
        }),
        progress: None,
    }
}

fn chunk_to_domain(c: pb::TensorChunk) -> TensorChunk {
    let dtype = match pb::Dtype::try_from(c.dtype) {
        Ok(pb::Dtype::Float32) => Some(WireDType::F32),
        Ok(pb::Dtype::Bfloat16) => Some(WireDType::BF16),
        Ok(pb::Dtype::Float16) => Some(WireDType::F16),
        _ => None,
    };
    TensorChunk {
        name: c.name,
        dtype,
        shape: c.shape,
        offset: c.offset,
        data: c.data,
    }
}

type GroupStream = Pin<Box<dyn Stream<Item = Result<pb::GroupResult, Status>> + Send>>;

#[tonic::async_trait]
impl RolloutService for GrpcService {
    type GenerateStream = GroupStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("rollout", prompts = req.prompts.len(), n = req.n);
        let _e = span.enter();
        let req = to_domain(req).map_err(status)?;
        let expected = req.prompts.len();
        let sub = crate::http_server::submit_blocking(&self.engine, req)
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "generate refused");
                status(e)
            })?;
        let stream =
            futures::stream::unfold((sub.events, 0usize), move |(mut rx, sent)| async move {
                if sent == expected {
                    return None;
                }
                loop {
                    match rx.recv().await {
                        Some(Event::Group(g)) => {
                            return Some((Ok(group_to_wire(g)), (rx, sent + 1)))
                        }
                        Some(Event::Token { .. }) => continue,
                        Some(Event::Progress {
                            prompt_index,
                            tokens_generated,
                        }) => {
                            let p = pb::GroupResult {
                                progress: Some(pb::Progress {
                                    prompt_index: prompt_index as u32,
                                    tokens_generated: tokens_generated as u64,
                                }),
                                ..Default::default()
                            };
                            return Some((Ok(p), (rx, sent)));
                        }
                        // An error ends the request: report it and stop.
                        Some(Event::Error(e)) => return Some((Err(status(e)), (rx, expected))),
                        None => {
                            let s = Status::unavailable(
                                "the engine stopped before the request finished",
                            );
                            return Some((Err(s), (rx, expected)));
                        }
                    }
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn update_weights(
        &self,
        request: Request<Streaming<pb::WeightUpdateMessage>>,
    ) -> Result<Response<pb::UpdateWeightsResponse>, Status> {
        let mut stream = request.into_inner();
        let Ok(_permit) = self.staging.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "{MAX_STAGED_UPDATES} weight updates are already being received; retry later"
            )));
        };
        let started = Instant::now();
        let metrics = self.engine.metrics().clone();
        let idle = self.idle_timeout;
        let mut committed = None;
        let result = async {
            let mut asm = WeightAssembler::new(self.engine.param_specs());
            let mut pending: Option<Pending> = None;
            let mut received = None;
            let mut nccl: Option<NcclFill> = None;
            loop {
                // While the bytes flow over the data plane the stream is quiet until the
                // commit: its outcome is awaited beside the stream (the data connection
                // has its own idle timeout), and a failure ends the call at once.
                let next = if let Some(p) = pending.as_mut() {
                    tokio::select! {
                        n = stream.next() => Some(n),
                        r = p.wait() => {
                            received = Some(r?);
                            None
                        }
                    }
                } else {
                    None
                };
                let next = match next {
                    Some(n) => n,
                    None if received.is_some() && pending.is_some() => {
                        pending = None;
                        continue;
                    }
                    None => {
                        let Ok(n) = tokio::time::timeout(idle, stream.next()).await else {
                            return Err(invalid(format!(
                                "the update stream sent nothing for {:.0}s; nothing was applied",
                                idle.as_secs_f64()
                            )));
                        };
                        n
                    }
                };
                let Some(msg) = next else { break };
                let msg =
                    msg.map_err(|s| invalid(format!("update stream failed: {}", s.message())))?;
                match msg.kind {
                    Some(pb::weight_update_message::Kind::Chunk(c)) => {
                        if pending.is_some() || received.is_some() || nccl.is_some() {
                            return Err(invalid(
                                "a TensorChunk after a DataPlaneOffer or an NcclBucket (one update takes one path)"
                                    .into(),
                            ));
                        }
                        asm.add_chunk(chunk_to_domain(c))?;
                    }
                    Some(pb::weight_update_message::Kind::NcclBucket(b)) => {
                        if pending.is_some() || received.is_some() || (asm.num_bytes() > 0 && nccl.is_none()) {
                            return Err(invalid(
                                "an NcclBucket after chunks or a DataPlaneOffer (one update takes one path)"
                                    .into(),
                            ));
                        }
                        let sync = self.nccl.clone();
                        let mut fill = nccl.take().unwrap_or_default();
                        let (r, a, f) = tokio::task::spawn_blocking(move || {
                            let r = sync.receive(&b, &mut asm, &mut fill);
                            (r, asm, fill)
                        })
                        .await
                        .map_err(|e| EngineError::Internal(format!("NCCL receive task: {e}")))?;
                        r?;
                        asm = a;
                        nccl = Some(f);
                    }
                    Some(pb::weight_update_message::Kind::DataPlane(o)) => {
                        let again = pending.is_some() || received.is_some() || nccl.is_some();
                        pending = Some(self.offer(o, &asm, again)?);
                    }
                    Some(pb::weight_update_message::Kind::Commit(c)) => {
                        committed = Some(c.version);
                        let staged = match (received.take(), pending.take()) {
                            (Some(s), _) => s,
                            (None, Some(mut p)) => p.wait().await?,
                            (None, None) => match nccl.take() {
                                Some(fill) => self.nccl.finish(fill, asm)?,
                                None => asm.finish()?,
                            },
                        };
                        let num_bytes = staged.num_bytes;
                        let num_tensors = staged.tensors.len() as u64;
                        let span =
                            tracing::info_span!("weight_sync", version = c.version, num_bytes);
                        // Taken only now: the update is complete, nothing waits on the client.
                        let _guard = self.update_lock.lock().await;
                        let outcome = self
                            .engine
                            .update_weights(staged, c.version)
                            .instrument(span)
                            .await?;
                        return Ok(pb::UpdateWeightsResponse {
                            version: outcome.version,
                            num_tensors,
                            num_bytes,
                            apply_seconds: outcome.apply_seconds,
                        });
                    }
                    None => {
                        return Err(invalid(
                            "a WeightUpdateMessage with neither chunk nor commit".into(),
                        ))
                    }
                }
            }
            Err(invalid(
                "the update stream ended without a commit; nothing was applied".into(),
            ))
        }
        .await;
        match result {
            Ok(r) => {
                metrics
                    .weight_update_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(Response::new(r))
            }
            Err(e) => {
                // The engine counts (and logs) a superseded update itself.
                if !matches!(e, EngineError::Superseded { .. }) {
                    metrics
                        .weight_updates_total
                        .with_label_values(&["rejected"])
                        .inc();
                }
                tracing::warn!(version = ?committed, error = %e, "weight update rejected; the old weights keep serving");
                Err(status(e))
            }
        }
    }

    async fn get_info(
        &self,
        _request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        let i = self.engine.info();
        let l = self.engine.stats();
        Ok(Response::new(pb::WorkerInfo {
            model: i.name.clone(),
            model_path: i.path.clone(),
            architecture: i.architecture.clone(),
            dtype: i.dtype.clone(),
            device: i.device.clone(),
            weight_version: l.weight_version,
            vocab_size: i.vocab_size,
            max_model_len: i.limits.max_model_len as u32,
            max_num_seqs: i.limits.max_num_seqs as u32,
            kv_cache_tokens: i.limits.kv_cache_tokens as u64,
            max_n: i.limits.max_n as u32,
            max_waiting_seqs: i.limits.max_waiting_seqs as u32,
            num_running_seqs: l.num_running as u32,
            num_waiting_seqs: l.num_waiting as u32,
            num_parameters: i.num_parameters,
            eos_token_ids: i.eos_token_ids.clone(),
            data_port: self.data_plane.as_ref().map_or(0, |d| d.port() as u32),
        }))
    }

    async fn init_weight_sync(
        &self,
        request: Request<pb::InitWeightSyncRequest>,
    ) -> Result<Response<pb::InitWeightSyncResponse>, Status> {
        let req = request.into_inner();
        let sync = self.nccl.clone();
        let joined = tokio::task::spawn_blocking(move || sync.join(&req))
            .await
            .map_err(|e| Status::internal(format!("NCCL join task: {e}")))?;
        match joined {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                tracing::warn!(error = %e, "InitWeightSync refused");
                Err(status(e))
            }
        }
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let l = self.engine.stats();
        Ok(Response::new(pb::HealthResponse {
            status: if l.alive {
                pb::health_response::Status::Serving
            } else {
                pb::health_response::Status::NotServing
            } as i32,
            weight_version: l.weight_version,
            num_running_seqs: l.num_running as u32,
            num_waiting_seqs: l.num_waiting as u32,
        }))
    }
}
