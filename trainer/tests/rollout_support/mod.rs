//! Shared helpers of the rollout client tests: real workers in-process on `127.0.0.1:0`
//! serving the tiny Qwen2 fixture on CPU, client configs with short timeouts, prompt
//! jobs, and a greedy reference straight from the model crate (full forward, no cache).
#![allow(dead_code)]
pub mod fake;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use model::{ForwardInput, Transformer};
use rollout_worker::security::ServeOptions;
use rollout_worker::{EngineHandle, Metrics, WorkerConfig};
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;
use trainer::rollout::{
    PromptJob, PushReport, RolloutClient, RolloutConfig, RolloutError, RolloutGroup, Sampling,
};

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

/// A worker serving the tiny Qwen2 fixture on CPU, gRPC and HTTP on port 0.
pub struct Worker {
    pub url: String,
    pub engine: EngineHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), rollout_worker::ServeError>>>,
}

impl Worker {
    pub async fn start() -> Worker {
        Self::start_with(16).await
    }

    /// A worker decoding at most `max_num_seqs` sequences together. With
    /// `max_num_seqs == n` its groups finish one after another (all completions have
    /// the same length), so a fault after the first group still hits groups in progress.
    pub async fn start_with(max_num_seqs: usize) -> Worker {
        Self::start_on("127.0.0.1", max_num_seqs, ServeOptions::default()).await
    }

    /// A worker listening on `ip` (port 0) with the serving options `opts` (e.g. a fixed
    /// `data_port`, so a proxy on another loopback address can stand in front of it).
    pub async fn start_on(ip: &str, max_num_seqs: usize, opts: ServeOptions) -> Worker {
        Self::start_at(ip, "cpu", max_num_seqs, opts).await
    }

    /// As [`Worker::start_with`], with the model on `device` (`"cpu"`, `"cuda:1"`).
    pub async fn start_on_device(device: &str, max_num_seqs: usize) -> Worker {
        Self::start_at("127.0.0.1", device, max_num_seqs, ServeOptions::default()).await
    }

    async fn start_at(ip: &str, device: &str, max_num_seqs: usize, opts: ServeOptions) -> Worker {
        let mut c = WorkerConfig::new(fixture("qwen2-tiny"));
        c.device = device.into();
        c.engine.max_num_seqs = max_num_seqs;
        c.engine.max_n = 8;
        c.engine.max_waiting_seqs = 1024;
        let engine =
            EngineHandle::load(&c, Arc::new(Metrics::new(&c.model_name()))).expect("engine starts");
        let grpc = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let http = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let url = format!("http://{}", grpc.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(rollout_worker::serve_with(
            grpc,
            http,
            engine.clone(),
            opts,
            async move {
                let _ = rx.await;
            },
        ));
        Worker {
            url,
            engine,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the servers and the engine (bounded, so a stuck connection fails the test).
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("worker stops within 60s")
            .unwrap()
            .unwrap();
    }
}

/// A client config over `workers` with timeouts fit for tests.
pub fn config(workers: &[&str]) -> RolloutConfig {
    RolloutConfig {
        workers: workers.iter().map(|w| w.to_string()).collect(),
        max_prompts_per_request: 4,
        max_requests_per_worker: 2,
        request_timeout_secs: 30.0,
        connect_timeout_secs: 2.0,
        retry_backoff_secs: 0.1,
        ..Default::default()
    }
}

/// `count` jobs with keys `1000 + i` and distinct prompts of 2..7 tokens.
pub fn jobs(count: usize) -> Vec<PromptJob> {
    (0..count)
        .map(|i| PromptJob {
            key: 1000 + i as u64,
            token_ids: (0..2 + i % 6)
                .map(|t| ((i * 37 + t * 11) % 400) as i64 + 3)
                .collect(),
        })
        .collect()
}

/// Seeded sampling at temperature 1, fixed length (EOS ignored).
pub fn sampling(max_new_tokens: u32, seed: Option<u64>) -> Sampling {
    Sampling {
        temperature: if seed.is_some() { 1.0 } else { 0.0 },
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        max_new_tokens,
        seed,
        ignore_eos: true,
    }
}

/// Asserts one group per job, in job order, each with `n` completions of
/// `max_new_tokens` tokens and log-probs.
pub fn check_groups(groups: &[RolloutGroup], jobs: &[PromptJob], n: usize, max_new_tokens: usize) {
    assert_eq!(groups.len(), jobs.len(), "one group per job");
    for (g, j) in groups.iter().zip(jobs) {
        assert_eq!(g.key, j.key, "groups come back in job order");
        assert_eq!(g.prompt_ids, j.token_ids, "key {}", j.key);
        assert_eq!(g.completions.len(), n, "key {}", j.key);
        for c in &g.completions {
            assert_eq!(c.token_ids.len(), max_new_tokens, "key {}", j.key);
            assert_eq!(c.logprobs.len(), max_new_tokens, "key {}", j.key);
        }
    }
}

/// Token ids of every completion, per group.
pub fn tokens(groups: &[RolloutGroup]) -> Vec<Vec<Vec<i64>>> {
    groups
        .iter()
        .map(|g| g.completions.iter().map(|c| c.token_ids.clone()).collect())
        .collect()
}

/// Pushes every parameter of `m` as `version` and commits.
pub async fn push_model(
    client: &RolloutClient,
    m: &Transformer,
    version: u64,
) -> Result<PushReport, RolloutError> {
    let mut push = client.begin_push(version).await?;
    for (name, t) in m.weights.named() {
        push.send(&name, t).await?;
    }
    push.commit().await
}

/// Generates greedily on the client's workers at `version` and checks every group against
/// the full-forward reference of `m` (tokens equal, log-probs within 1e-4); returns the
/// URLs of the workers that served.
pub async fn check_served(
    client: &RolloutClient,
    m: &Transformer,
    version: u64,
) -> std::collections::HashSet<String> {
    let len = 5usize;
    let groups = client
        .generate(
            jobs(12),
            1,
            sampling(len as u32, None),
            false,
            version,
            |_| {},
        )
        .await
        .unwrap();
    for g in &groups {
        assert_eq!(g.weight_version, version);
        let (ids, lps) = greedy_reference(m, &g.prompt_ids, len);
        assert_eq!(g.completions[0].token_ids, ids, "from {}", g.worker);
        for (x, y) in g.completions[0].logprobs.iter().zip(&lps) {
            assert!((x - y).abs() <= 1e-4, "{}: logprob {x} vs {y}", g.worker);
        }
    }
    groups.into_iter().map(|g| g.worker).collect()
}

pub fn load_model() -> Transformer {
    Transformer::from_pretrained(fixture("qwen2-tiny"), Device::Cpu, None).unwrap()
}

/// The fixture with every parameter perturbed by seeded noise (a distinct policy).
pub fn perturbed_model(seed: i64) -> Transformer {
    let m = load_model();
    tch::manual_seed(seed);
    let _g = tch::no_grad_guard();
    for (_, t) in m.weights.named() {
        let noise = Tensor::randn_like(t) * 0.05;
        let _ = t.shallow_clone().g_add_(&noise);
    }
    m
}

/// Rounds every parameter of `m` through bfloat16 (what a bf16 push delivers).
pub fn round_to_bf16(m: &Transformer) {
    let _g = tch::no_grad_guard();
    for (_, t) in m.weights.named() {
        let r = t.to_kind(Kind::BFloat16).to_kind(t.kind());
        t.shallow_clone().copy_(&r);
    }
}

/// `log_softmax` of the full forward's last-position logits, `[T, V]` fp32.
fn log_probs(model: &Transformer, ids: &[i64]) -> Tensor {
    let x = Tensor::from_slice(ids).view([1, -1]);
    let _g = tch::no_grad_guard();
    model
        .forward(&ForwardInput::new(&x), None)
        .unwrap()
        .get(0)
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float)
}

/// Greedy continuation by step-by-step argmax of the full forward, with the
/// log-prob of each chosen token.
pub fn greedy_reference(model: &Transformer, prompt: &[i64], steps: usize) -> (Vec<i64>, Vec<f32>) {
    let mut ids = prompt.to_vec();
    let mut lps = vec![];
    for _ in 0..steps {
        let lp = log_probs(model, &ids).get(-1);
        let t = lp.argmax(-1, false).int64_value(&[]);
        lps.push(lp.double_value(&[t]) as f32);
        ids.push(t);
    }
    (ids[prompt.len()..].to_vec(), lps)
}
