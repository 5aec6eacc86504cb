//! Shared helpers of the worker's integration tests: a worker on `127.0.0.1:0` serving a
//! tiny fixture model on CPU, clients for both front ends, and reference computations
//! straight from the model crate (full forward, no cache) to check outputs against.
#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::Arc;

use model::{ForwardInput, Transformer};
use proto::v1 as pb;
use proto::v1::rollout_service_client::RolloutServiceClient;
use rollout_worker::{EngineHandle, Metrics, WorkerConfig};
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub fn fixture(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/generated")
        .join(name);
    assert!(
        dir.exists(),
        "{} is missing: run scripts/test.sh",
        dir.display()
    );
    dir
}

/// A config for the tiny Qwen2 fixture on CPU with both servers on port 0.
pub fn tiny_config() -> WorkerConfig {
    let mut c = WorkerConfig::new(fixture("qwen2-tiny"));
    c.device = "cpu".into();
    c.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    c.server.http_addr = "127.0.0.1:0".parse().unwrap();
    c.engine.max_num_seqs = 8;
    c.engine.max_n = 8;
    c.engine.max_waiting_seqs = 256;
    c
}

pub struct Worker {
    pub grpc_url: String,
    pub http_url: String,
    pub engine: EngineHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), rollout_worker::ServeError>>>,
}

impl Worker {
    pub async fn start(config: WorkerConfig) -> Worker {
        let engine = EngineHandle::load(&config, Arc::new(Metrics::new(&config.model_name())))
            .expect("engine starts");
        let grpc = tokio::net::TcpListener::bind(config.server.grpc_addr)
            .await
            .unwrap();
        let http = tokio::net::TcpListener::bind(config.server.http_addr)
            .await
            .unwrap();
        let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
        let http_url = format!("http://{}", http.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(rollout_worker::serve(
            grpc,
            http,
            engine.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Worker {
            grpc_url,
            http_url,
            engine,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn client(&self) -> RolloutServiceClient<Channel> {
        RolloutServiceClient::connect(self.grpc_url.clone())
            .await
            .expect("connects")
            .max_decoding_message_size(64 << 20)
    }

    /// Stops both servers and the engine; asserts a clean exit.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
        assert!(
            !self.engine.stats().alive || {
                // The engine thread notices the shutdown command asynchronously.
                for _ in 0..1000 {
                    if !self.engine.stats().alive {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                !self.engine.stats().alive
            }
        );
    }
}

pub fn load_model(name: &str) -> Transformer {
    Transformer::from_pretrained(fixture(name), Device::Cpu, None).unwrap()
}

/// Logits `[T, V]` (fp32) of the full forward of `ids`, no cache.
pub fn full_logits(model: &Transformer, ids: &[i64]) -> Tensor {
    let x = Tensor::from_slice(ids).view([1, -1]);
    let _g = tch::no_grad_guard();
    model
        .forward(&ForwardInput::new(&x), None)
        .unwrap()
        .get(0)
        .to_kind(Kind::Float)
}

/// Greedy continuation by step-by-step argmax of the full forward (no KV cache).
pub fn greedy_reference(model: &Transformer, prompt: &[i64], steps: usize) -> Vec<i64> {
    let mut ids = prompt.to_vec();
    for _ in 0..steps {
        let logits = full_logits(model, &ids);
        ids.push(logits.get(-1).argmax(-1, false).int64_value(&[]));
    }
    ids[prompt.len()..].to_vec()
}

/// `log_softmax(logits / temperature)` of each completion token under the full forward.
pub fn logprobs_reference(
    model: &Transformer,
    prompt: &[i64],
    completion: &[i64],
    temperature: f64,
) -> Vec<f32> {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(completion);
    let logits = full_logits(model, &ids);
    let lp = (logits / temperature).log_softmax(-1, Kind::Float);
    completion
        .iter()
        .enumerate()
        .map(|(i, &t)| lp.double_value(&[(prompt.len() + i - 1) as i64, t]) as f32)
        .collect()
}

pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y} (tol {tol})");
    }
}

pub fn tokens_prompt(id: &str, ids: &[i64]) -> pb::Prompt {
    pb::Prompt {
        id: id.into(),
        input: Some(pb::prompt::Input::TokenIds(pb::TokenIds {
            ids: ids.to_vec(),
        })),
    }
}

pub fn sampling(temperature: f64, max_new_tokens: u32, seed: Option<u64>) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: Some(temperature),
        max_new_tokens,
        seed,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Runs a Generate call to the end; groups sorted by prompt index.
pub async fn generate(
    client: &mut RolloutServiceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Vec<pb::GroupResult>, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = vec![];
    while let Some(g) = stream.message().await? {
        // Progress messages are liveness only (see rollout.proto).
        if g.progress.is_none() {
            out.push(g);
        }
    }
    out.sort_by_key(|g| g.prompt_index);
    Ok(out)
}

/// Prompts of mixed lengths over the fixture's vocabulary.
pub fn mixed_prompts() -> Vec<Vec<i64>> {
    vec![
        vec![5, 17, 42, 99, 3],
        vec![200],
        (10..40).collect(),
        vec![7, 7, 7, 7, 7, 7, 7, 7, 300, 301, 302],
    ]
}
