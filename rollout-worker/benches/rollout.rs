//! Rollout worker benchmark (numbers, not a test): generated tokens/s against the number
//! of concurrent sequences, over gRPC on loopback, for the tiny fixture model and a
//! ~20M-parameter Qwen2 with random weights; and the time to push a ~100 MB model with
//! `UpdateWeights` over loopback.
//!
//! Data flow: writes the 20M model (and an untied ~113 MB variant for the push) under
//! `target/bench-models/` with `model::save_pretrained`, and the prompts to
//! `target/bench-models/prompts.json`, which `scripts/bench/rollout_hf_generate.py`
//! reads to run transformers' `generate` on the same model, prompts and lengths.
//!
//!   cargo bench -p rollout-worker --bench rollout
//!   BENCH_CONCURRENCY=1,8 BENCH_NEW_TOKENS=32 cargo bench -p rollout-worker --bench rollout
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use proto::v1 as pb;
use proto::v1::rollout_service_client::RolloutServiceClient;
use rollout_worker::weights::{chunks_of, WireDType};
use rollout_worker::{EngineHandle, Metrics, WorkerConfig};
use tch::Device;

const PROMPT_LEN: usize = 32;

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes a Qwen2 of H 256, 12 layers, 4 heads, 2 KV heads, I 1024, V 32000.
fn write_model(dir: &Path, tied: bool) -> anyhow::Result<()> {
    use serde_json::json;
    model::checkpoint::write_random_like(
        &root().join("fixtures/generated/qwen2-tiny"),
        dir,
        &[
            ("hidden_size", json!(256)),
            ("num_hidden_layers", json!(12)),
            ("num_attention_heads", json!(4)),
            ("num_key_value_heads", json!(2)),
            ("intermediate_size", json!(1024)),
            ("vocab_size", json!(32000)),
            ("max_position_embeddings", json!(1024)),
            ("tie_word_embeddings", json!(tied)),
        ],
    )?;
    Ok(())
}

fn prompts(n: usize, vocab: i64) -> Vec<Vec<i64>> {
    // Deterministic, spread over the shared tokenizer's range.
    (0..n)
        .map(|i| {
            (0..PROMPT_LEN)
                .map(|t| ((i * 131 + t * 17 + 5) as i64) % vocab.min(448))
                .collect()
        })
        .collect()
}

struct Served {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), rollout_worker::ServeError>>,
}

async fn serve(dir: &Path) -> anyhow::Result<Served> {
    let mut c = WorkerConfig::new(dir);
    c.device = "cpu".into();
    c.engine.max_num_seqs = 64;
    c.engine.max_n = 64;
    let engine = EngineHandle::load(&c, Arc::new(Metrics::new(&c.model_name())))?;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", grpc.local_addr()?);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(rollout_worker::serve(grpc, http, engine, async move {
        let _ = rx.await;
    }));
    Ok(Served { url, stop, task })
}

/// `concurrency` clients each ask for one sampled completion of `new_tokens` tokens at
/// once; returns generated tokens per second of wall time.
async fn throughput(url: &str, prompts: &[Vec<i64>], new_tokens: u32) -> anyhow::Result<f64> {
    let start = Instant::now();
    let tasks: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let url = url.to_string();
            let req = pb::GenerateRequest {
                prompts: vec![pb::Prompt {
                    id: String::new(),
                    input: Some(pb::prompt::Input::TokenIds(pb::TokenIds { ids: p.clone() })),
                }],
                n: 1,
                sampling: Some(pb::SamplingParams {
                    temperature: Some(1.0),
                    max_new_tokens: new_tokens,
                    ignore_eos: true,
                    seed: Some(i as u64),
                    ..Default::default()
                }),
                return_text: false,
            };
            tokio::spawn(async move {
                let mut c = RolloutServiceClient::connect(url).await?;
                let mut s = c.generate(req).await?.into_inner();
                let mut n = 0;
                while let Some(g) = s.message().await? {
                    n += g
                        .completions
                        .iter()
                        .map(|c| c.token_ids.len())
                        .sum::<usize>();
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn push_time(url: &str, dir: &Path) -> anyhow::Result<(f64, f64)> {
    let m = model::Transformer::from_pretrained(dir, Device::Cpu, None)?;
    let chunks = chunks_of(&m.weights, WireDType::F32, 4 << 20);
    let bytes: usize = chunks.iter().map(|c| c.data.len()).sum();
    let mut msgs: Vec<pb::WeightUpdateMessage> = chunks
        .into_iter()
        .map(|c| pb::WeightUpdateMessage {
            kind: Some(pb::weight_update_message::Kind::Chunk(pb::TensorChunk {
                name: c.name,
                dtype: pb::Dtype::Float32 as i32,
                shape: c.shape,
                offset: c.offset,
                data: c.data,
            })),
        })
        .collect();
    msgs.push(pb::WeightUpdateMessage {
        kind: Some(pb::weight_update_message::Kind::Commit(pb::Commit {
            version: 1,
        })),
    });
    let mut c = RolloutServiceClient::connect(url.to_string()).await?;
    let start = Instant::now();
    c.update_weights(futures::stream::iter(msgs)).await?;
    Ok((bytes as f64 / 1e6, start.elapsed().as_secs_f64()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let out = root().join("target/bench-models");
    let m20 = out.join("rollout-20m");
    let m100 = out.join("rollout-20m-untied");
    write_model(&m20, true)?;
    write_model(&m100, false)?;
    let concurrency = env_list("BENCH_CONCURRENCY", &[1, 4, 16, 64]);
    let new_tokens = env_list("BENCH_NEW_TOKENS", &[64])[0] as u32;
    let max_c = concurrency.iter().copied().max().unwrap_or(1);
    let all = prompts(max_c, 448);
    std::fs::write(
        out.join("prompts.json"),
        serde_json::to_string(&serde_json::json!({
            "prompts": all, "max_new_tokens": new_tokens, "concurrency": concurrency,
        }))?,
    )?;
    println!("threads: {} (torch intra-op)", tch::get_num_threads());
    for (name, dir) in [
        ("qwen2-tiny", root().join("fixtures/generated/qwen2-tiny")),
        ("rollout-20m", m20),
    ] {
        let s = serve(&dir).await?;
        // Warm-up (allocator, kernels).
        throughput(&s.url, &all[..max_c.min(4)], 8).await?;
        for &c in &concurrency {
            let tps = throughput(&s.url, &all[..c], new_tokens).await?;
            println!("{name:12} concurrency {c:3}: {tps:9.1} generated tokens/s ({new_tokens} new tokens each, prompt {PROMPT_LEN})");
        }
        let _ = s.stop.send(());
        s.task.await??;
    }
    let s = serve(&m100).await?;
    let (mb, secs) = push_time(&s.url, &m100).await?;
    println!(
        "UpdateWeights over loopback: {mb:.1} MB (f32, 4 MiB chunks) in {secs:.3}s = {:.0} MB/s",
        mb / secs
    );
    let _ = s.stop.send(());
    s.task.await??;
    println!(
        "\ntransformers side by side:\n  .venv/bin/python scripts/bench/rollout_hf_generate.py {}",
        out.display()
    );
    Ok(())
}
