//! A scripted worker: answers `Health` like a real one and serves `Generate` with made-up
//! tokens, breaking the protocol in one chosen way. Used to drive the client's
//! validation paths that real workers never take.
use std::pin::Pin;

use futures::Stream;
use proto::v1 as pb;
use proto::v1::rollout_service_server::{RolloutService, RolloutServiceServer};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

/// How the fake misbehaves on `Generate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Groups carry this weight version, not the one `Health` reports (a restart the
    /// client has not noticed).
    StaleGroups(u64),
    /// Groups have `n - 1` completions.
    WrongN,
    /// The first group is sent twice.
    Duplicate,
    /// The stream ends cleanly after the first group.
    EndEarly,
}

#[derive(Clone)]
struct Fake {
    version: u64,
    fault: Fault,
}

pub struct FakeWorker {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeWorker {
    /// Serves on 127.0.0.1:0, reporting weight `version` in `Health`.
    pub async fn start(version: u64, fault: Fault) -> FakeWorker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RolloutServiceServer::new(Fake { version, fault }))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = rx.await;
                    },
                ),
        );
        FakeWorker {
            url,
            stop: Some(tx),
        }
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

type GroupStream = Pin<Box<dyn Stream<Item = Result<pb::GroupResult, Status>> + Send>>;

#[tonic::async_trait]
impl RolloutService for Fake {
    type GenerateStream = GroupStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GroupStream>, Status> {
        let req = request.into_inner();
        let len = req.sampling.as_ref().map_or(1, |s| s.max_new_tokens) as usize;
        let completions = match self.fault {
            Fault::WrongN => req.n as usize - 1,
            _ => req.n as usize,
        };
        let version = match self.fault {
            Fault::StaleGroups(v) => v,
            _ => self.version,
        };
        let mut groups: Vec<pb::GroupResult> = req
            .prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| pb::GroupResult {
                prompt_index: i as u32,
                prompt_id: p.id,
                prompt_token_ids: match p.input {
                    Some(pb::prompt::Input::TokenIds(t)) => t.ids,
                    _ => vec![],
                },
                completions: (0..completions)
                    .map(|_| pb::Completion {
                        token_ids: vec![7; len],
                        logprobs: vec![-0.5; len],
                        finish_reason: pb::FinishReason::Length as i32,
                        text: String::new(),
                    })
                    .collect(),
                weight_version: version,
                timings: None,
                progress: None,
            })
            .collect();
        match self.fault {
            Fault::Duplicate => groups.insert(1, groups[0].clone()),
            Fault::EndEarly => groups.truncate(1),
            _ => {}
        }
        Ok(Response::new(Box::pin(futures::stream::iter(
            groups.into_iter().map(Ok),
        ))))
    }

    async fn update_weights(
        &self,
        _request: Request<Streaming<pb::WeightUpdateMessage>>,
    ) -> Result<Response<pb::UpdateWeightsResponse>, Status> {
        Err(Status::unimplemented("fake worker"))
    }

    async fn get_info(
        &self,
        _request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        Err(Status::unimplemented("fake worker"))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            status: pb::health_response::Status::Serving as i32,
            weight_version: self.version,
            num_running_seqs: 0,
            num_waiting_seqs: 0,
        }))
    }

    async fn init_weight_sync(
        &self,
        _request: Request<pb::InitWeightSyncRequest>,
    ) -> Result<Response<pb::InitWeightSyncResponse>, Status> {
        Err(Status::failed_precondition("the fake worker has no GPU"))
    }
}
