//! Weight-push benchmark (numbers, not a test): the trainer's `WeightPush` streaming a
//! ~50M-parameter f32 Qwen2 (~203 MB) to 1, 2 and 4 rollout workers on loopback, with
//! float32 and bfloat16 on the wire, over three transports: `grpc` (chunks on the
//! `UpdateWeights` streams), `direct` (the TCP data plane, one stream per worker) and
//! `chain` (the data plane, rank 0 sends once and the workers forward), against the
//! reference measured in the same run: the same bytes through one plain loopback TCP
//! stream (the wire's ceiling on this machine; the faster of a tokio and a blocking
//! std sender).
//!
//! Data flow: writes the model once under `target/bench-models/push-50m`, starts the
//! workers in-process on a runtime of their own (each holds the model and its staging
//! copy), connects a `RolloutClient` and times `begin_push` → `send` of every tensor →
//! `commit` (every worker serving the new version), best of `BENCH_REPEAT` (default 3).
//!
//! Cases (`BENCH_CASES`): `f32` (an f32 policy, f32 wire, f32 workers), `f32-bf16` (the
//! f32 policy on a bf16 wire to the f32 workers) and `bf16` (a bf16 policy sending its
//! own memory to workers serving bf16: the realistic bf16 case); bf16 rows print their
//! per-byte rate against the f32 row of the same transport and worker count.
//!
//!   bash scripts/bench/push.sh            # BENCH_WORKERS=1,2,4 BENCH_REPEAT=3
//!                                         # BENCH_TRANSPORTS=grpc,direct,chain
//!                                         # BENCH_CASES=f32,f32-bf16,bf16
//!                                         # BENCH_LANES=2 (direct: connections per worker)
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use model::{ModelConfig, Weights};
use rollout_worker::{EngineHandle, Metrics, WorkerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trainer::rollout::{RolloutClient, RolloutConfig};

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Qwen2 of H 512, 10 layers, 8 heads, I 1536, V 32000, tied: 50.5M parameters.
fn write_model(dir: &Path) -> anyhow::Result<(ModelConfig, Weights)> {
    use serde_json::json;
    Ok(model::checkpoint::write_random_like(
        &root().join("fixtures/generated/qwen2-tiny"),
        dir,
        &[
            ("hidden_size", json!(512)),
            ("num_hidden_layers", json!(10)),
            ("num_attention_heads", json!(8)),
            ("num_key_value_heads", json!(8)),
            ("intermediate_size", json!(1536)),
            ("vocab_size", json!(32000)),
            ("max_position_embeddings", json!(512)),
            ("tie_word_embeddings", json!(true)),
        ],
    )?)
}

/// Seconds to move `bytes` through one loopback TCP stream in 4 MiB writes.
async fn tcp_reference(bytes: usize) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sink = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 4 << 20];
        let mut got = 0;
        while got < bytes {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        anyhow::Ok(got)
    });
    let data = vec![7u8; 4 << 20];
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(data.len());
        s.write_all(&data[..n]).await?;
        sent += n;
    }
    s.flush().await?;
    let got = sink.await??;
    anyhow::ensure!(got == bytes, "sink got {got} of {bytes} bytes");
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to move `bytes` through one loopback TCP stream with blocking std sockets
/// (what the data plane uses), 4 MiB writes and reads.
fn std_reference(bytes: usize) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 4 << 20];
        let mut got = 0;
        while got < bytes {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(got)
    });
    let data = vec![7u8; 4 << 20];
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(data.len());
        s.write_all(&data[..n])?;
        sent += n;
    }
    let got = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;
    anyhow::ensure!(got == bytes, "sink got {got} of {bytes} bytes");
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to move `bytes` through one loopback TCP stream from a `bytes`-long source
/// into a `bytes`-long destination (the memory a push really touches, not cache-hot
/// 4 MiB buffers): `fresh` allocates the destination per run (faulted in by the reads,
/// as a staging copy is), else it is reused and already faulted in.
fn std_memory_reference(src: &[u8], dst: &mut Vec<u8>, fresh: bool) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let bytes = src.len();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut buf = if fresh {
        vec![0u8; bytes]
    } else {
        std::mem::take(dst)
    };
    let t = Instant::now();
    let sink = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut s, _) = listener.accept()?;
        let mut got = 0;
        while got < bytes {
            let end = (got + (4 << 20)).min(bytes);
            let n = s.read(&mut buf[got..end])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(buf)
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    for c in src.chunks(4 << 20) {
        s.write_all(c)?;
    }
    let buf = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;
    let dt = t.elapsed().as_secs_f64();
    if !fresh {
        *dst = buf;
    }
    Ok(dt)
}

fn env_words(name: &str, default: &[&str]) -> Vec<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').map(|x| x.trim().to_string()).collect())
        .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
}

fn main() -> anyhow::Result<()> {
    let dir = root().join("target/bench-models/push-50m");
    let (_cfg, weights) = write_model(&dir)?;
    let params: i64 = weights.named().iter().map(|(_, t)| t.numel() as i64).sum();
    let counts = env_list("BENCH_WORKERS", &[1, 2, 4]);
    let repeat = env_list("BENCH_REPEAT", &[3])[0].max(1);
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let max = counts.iter().copied().max().unwrap_or(1);
    let keep = std::sync::Mutex::new(vec![]);
    let cases = env_words("BENCH_CASES", &["f32", "f32-bf16", "bf16"]);
    let start = |dtype: &str| -> anyhow::Result<Vec<String>> {
        let mut urls = vec![];
        for _ in 0..max {
            let mut c = WorkerConfig::new(&dir);
            c.device = "cpu".into();
            c.dtype = Some(dtype.into());
            c.engine.max_num_seqs = 4;
            c.engine.kv_cache_bytes = 64 << 20;
            let engine = EngineHandle::load(&c, Arc::new(Metrics::new("test")))?;
            let (grpc, http) = servers.block_on(async {
                anyhow::Ok((
                    tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                    tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                ))
            })?;
            urls.push(format!("http://{}", grpc.local_addr()?));
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            servers.spawn(rollout_worker::serve(grpc, http, engine, async move {
                let _ = rx.await;
            }));
            keep.lock().expect("keep lock").push(tx);
        }
        Ok(urls)
    };
    let f32_bytes = params as usize * 4;
    let tokio_ref = (0..repeat)
        .map(|_| client_rt.block_on(tcp_reference(f32_bytes)))
        .collect::<anyhow::Result<Vec<f64>>>()?
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    let std_ref = (0..repeat)
        .map(|_| std_reference(f32_bytes))
        .collect::<anyhow::Result<Vec<f64>>>()?
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    let reference = tokio_ref.min(std_ref);
    {
        let src = vec![7u8; f32_bytes];
        let mut dst = vec![1u8; f32_bytes];
        for fresh in [false, true] {
            let best = (0..repeat)
                .map(|_| std_memory_reference(&src, &mut dst, fresh))
                .collect::<anyhow::Result<Vec<f64>>>()?
                .into_iter()
                .fold(f64::INFINITY, f64::min);
            println!(
                "memory reference: {:.0} MB source -> {} {:.0} MB destination over one loopback TCP stream: {:.2} GB/s",
                f32_bytes as f64 / 1e6,
                if fresh { "fresh (unfaulted)" } else { "reused (faulted-in)" },
                f32_bytes as f64 / 1e6,
                f32_bytes as f64 / best / 1e9
            );
        }
    }
    let ref_gbs = f32_bytes as f64 / reference / 1e9;
    println!(
        "model: {:.1}M parameters, {:.0} MB in f32; reference: one loopback TCP stream {ref_gbs:.2} GB/s \
         (tokio {:.2}, std {:.2})",
        params as f64 / 1e6,
        f32_bytes as f64 / 1e6,
        f32_bytes as f64 / tokio_ref / 1e9,
        f32_bytes as f64 / std_ref / 1e9,
    );
    let transports = env_words("BENCH_TRANSPORTS", &["grpc", "direct", "chain"]);
    // Data-plane connections per directly fed worker (`rollout.weight_lanes`).
    let lanes_list = env_list("BENCH_LANES", &[2]);
    // The f32 workers serve the f32 policy over either wire; the bf16 ones serve a bf16
    // policy sent as its own bf16 memory (the realistic bf16 case: no conversion anywhere).
    let f32_urls = start("float32")?;
    let bf16_urls = if cases.iter().any(|c| c == "bf16") {
        start("bfloat16")?
    } else {
        vec![]
    };
    let bf16_policy: Vec<(String, tch::Tensor)> = weights
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(tch::Kind::BFloat16)))
        .collect();
    let f32_policy: Vec<(String, tch::Tensor)> = weights
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.shallow_clone()))
        .collect();
    // GB/s per worker of the f32 case, by (transport, workers): bf16 rows compare to it.
    let mut f32_rate = std::collections::HashMap::new();
    let mut version = 0u64;
    for transport in &transports {
        for case in &cases {
            let (wire, policy, urls, label) = match case.as_str() {
                "f32" => ("float32", &f32_policy, &f32_urls, "f32 -> f32 wire -> f32"),
                "f32-bf16" => (
                    "bfloat16",
                    &f32_policy,
                    &f32_urls,
                    "f32 -> bf16 wire -> f32",
                ),
                "bf16" => (
                    "bfloat16",
                    &bf16_policy,
                    &bf16_urls,
                    "bf16 -> bf16 wire -> bf16",
                ),
                other => anyhow::bail!("BENCH_CASES: unknown case {other:?} (f32, f32-bf16, bf16)"),
            };
            for (&n, &lanes) in counts
                .iter()
                .flat_map(|n| lanes_list.iter().map(move |l| (n, l)))
            {
                if transport == "chain" && n == 1 {
                    continue; // the same as direct
                }
                // Lanes apply to direct feeds only (a chain and gRPC use one connection).
                if transport != "direct" && lanes != lanes_list[0] {
                    continue;
                }
                let cfg = RolloutConfig {
                    workers: urls[..n].to_vec(),
                    weight_dtype: wire.into(),
                    weight_transport: if transport == "grpc" { "grpc" } else { "auto" }.into(),
                    weight_chain: transport == "chain",
                    weight_lanes: lanes as u8,
                    request_timeout_secs: 120.0,
                    ..RolloutConfig::default()
                };
                let client = client_rt.block_on(RolloutClient::connect(cfg))?;
                let mut best = f64::INFINITY;
                let mut bytes = 0;
                // Copies of the update that left rank 0: one down a chain, else one per worker.
                let mut egress = 0;
                for _ in 0..repeat {
                    version += 1;
                    let t = Instant::now();
                    let report = client_rt.block_on(async {
                        let mut push = client.begin_push(version).await?;
                        for (name, t) in policy {
                            push.send(name, t).await?;
                        }
                        push.commit().await
                    })?;
                    anyhow::ensure!(
                        report.updated.len() == n,
                        "workers missed the push: {:?}",
                        report.failed
                    );
                    let want = if transport == "grpc" { 0 } else { n };
                    anyhow::ensure!(
                        report.data_plane.len() == want,
                        "{transport}: {} of {n} workers on the data plane",
                        report.data_plane.len()
                    );
                    egress = report.egress_copies;
                    best = best.min(t.elapsed().as_secs_f64());
                    bytes = report.bytes;
                }
                let per_worker = bytes as f64 / best / 1e9;
                let per_byte = if *case == "f32" {
                    f32_rate.insert((transport.clone(), n, lanes), per_worker);
                    String::new()
                } else {
                    f32_rate
                        .get(&(transport.clone(), n, lanes))
                        .map(|f| format!(" | per byte {:.2} x f32", per_worker / f))
                        .unwrap_or_default()
                };
                let path = if transport == "direct" {
                    format!("direct x{lanes}")
                } else {
                    transport.clone()
                };
                println!(
                    "push {path:>9} {label:>26} to {n} worker(s): {best:.3} s | {per_worker:.2} GB/s per worker ({:.2} x reference) | {:.2} GB/s aggregate ({:.2} x reference) | rank-0 egress {egress} cop{}{per_byte}",
                    per_worker / ref_gbs,
                    per_worker * n as f64,
                    per_worker * n as f64 / ref_gbs,
                    if egress == 1 { "y" } else { "ies" }
                );
            }
        }
    }
    drop(keep);
    Ok(())
}
