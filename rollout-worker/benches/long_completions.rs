//! Long-completion benchmark of the rollout engine (numbers, not a test); run through
//! `scripts/bench/rollout_long.sh`, which also runs transformers' `generate` on the same
//! model and prompts and prints the ratios of one run.
//!
//! - Long completions: 4 prompts x n = 8, 64-token prompts, 256 / 1,024 / 2,048 new
//!   tokens (ignore_eos, temperature 1), f32, one thread, a ~3M-parameter Qwen2 with
//!   8,192 positions (written to `target/bench-models/qwen2-3m-8k`). Tokens/s, and the
//!   memory-bandwidth roofline: every decode step must read the weights once plus the
//!   live KV (shared prompt blocks once per group), at the measured memcpy bandwidth.
//! - Prefix sharing: one 1,024-token prompt, n = 16, 64 new tokens: prompt tokens
//!   computed and peak KV bytes with group sharing and prefix caching on, then off.
//!
//! Each figure comes twice: over wall-clock time, and over CPU time (this process's
//! user + system time; for transformers its `time.process_time()`). Both sides run one
//! thread, so on a quiet machine the two agree; on a loaded one the CPU-time figures are
//! the ones that do not depend on how long each side waited for a core (stalls on memory
//! count in both). The memcpy bandwidth is measured the same way (best of 5, wall and
//! the copying thread's CPU time).
//!
//! Writes `target/bench-models/long_ours.json` and `long_prompts.json`.
//!
//!   BENCH_LENGTHS=256,1024 cargo bench -p rollout-worker --bench long_completions
use std::path::{Path, PathBuf};
use std::time::Instant;

use model::{ModelConfig, SamplingParams, Tokenizer, Transformer};
use rollout_worker::engine::{EngineHandle, Stats};
use rollout_worker::WorkerConfig;
use rollout_worker::{EngineConfig, Event, GenerateRequest, Metrics, PromptInput, PromptSpec};
use serde_json::json;
use tch::{Device, Kind};

const PROMPTS: usize = 4;
const N: usize = 8;
const PROMPT_LEN: usize = 64;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Qwen2 of H 192, 6 layers, 6 heads (head_dim 32), 2 KV heads, I 512, V 4096,
/// 8,192 positions, tied embeddings: 3.1M parameters.
fn write_model(dir: &Path) -> anyhow::Result<()> {
    model::checkpoint::write_random_like(
        &root().join("fixtures/generated/qwen2-tiny"),
        dir,
        &[
            ("hidden_size", json!(192)),
            ("num_hidden_layers", json!(6)),
            ("num_attention_heads", json!(6)),
            ("num_key_value_heads", json!(2)),
            ("head_dim", json!(32)),
            ("intermediate_size", json!(512)),
            ("vocab_size", json!(4096)),
            ("max_position_embeddings", json!(8192)),
            ("tie_word_embeddings", json!(true)),
        ],
    )?;
    Ok(())
}

fn prompts(count: usize, len: usize, vocab: i64) -> Vec<Vec<i64>> {
    (0..count)
        .map(|i| {
            (0..len)
                .map(|t| ((i * 131 + t * 17 + 5) as i64) % vocab)
                .collect()
        })
        .collect()
}

/// This process's CPU time (user + system, all threads) in seconds, from /proc/self/stat
/// (clock ticks of 1/100 s, Linux's `USER_HZ`).
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

/// The calling thread's time on a CPU in seconds (ns resolution, /proc schedstat).
fn thread_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns * 1e-9)
}

/// Seconds of one run, on the wall clock and in CPU time.
#[derive(Debug, Clone, Copy)]
struct Secs {
    wall: f64,
    cpu: f64,
}

/// Runs one request through an in-process engine; returns (seconds, tokens, stats).
fn run(
    dir: &Path,
    engine_cfg: &EngineConfig,
    prompts: &[Vec<i64>],
    n: usize,
    new_tokens: usize,
) -> anyhow::Result<(Secs, usize, Stats)> {
    let model = Transformer::from_pretrained(dir, Device::Cpu, Some(Kind::Float))?;
    let tok = Tokenizer::from_dir(dir)?;
    let mut cfg = WorkerConfig::new(dir);
    cfg.engine = engine_cfg.clone();
    let engine = EngineHandle::start(model, tok, &cfg, std::sync::Arc::new(Metrics::new("test")))?;
    let mut req = GenerateRequest::new(
        prompts
            .iter()
            .map(|p| PromptSpec {
                id: String::new(),
                input: PromptInput::Tokens(p.clone()),
            })
            .collect(),
        new_tokens,
    );
    req.n = n;
    req.sampling = SamplingParams::default();
    req.ignore_eos = true;
    req.seed = Some(1);
    let (start, cpu0) = (Instant::now(), process_cpu_secs());
    let mut sub = engine.submit(req)?;
    let mut tokens = 0;
    let mut groups = 0;
    while groups < prompts.len() {
        match sub.events.blocking_recv() {
            Some(Event::Group(g)) => {
                groups += 1;
                tokens += g.completions.iter().map(|c| c.tokens.len()).sum::<usize>();
            }
            Some(Event::Error(e)) => anyhow::bail!("{e}"),
            Some(_) => {}
            None => anyhow::bail!("engine stopped"),
        }
    }
    let secs = Secs {
        wall: start.elapsed().as_secs_f64(),
        cpu: process_cpu_secs() - cpu0,
    };
    let stats = engine.stats();
    engine.shutdown();
    Ok((secs, tokens, stats))
}

/// memcpy bandwidth in bytes copied per second (best of 5 copies of 256 MiB), over wall
/// time and over this thread's CPU time.
fn memcpy_bandwidth() -> (f64, f64) {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let (t, c) = (Instant::now(), thread_cpu_secs());
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        cpu = cpu.min(thread_cpu_secs() - c);
        wall = wall.min(t.elapsed().as_secs_f64());
    }
    // CPU time cannot exceed wall time for one thread; schedstat granularity aside.
    (n as f64 / wall, n as f64 / cpu.min(wall))
}

fn main() -> anyhow::Result<()> {
    tch::set_num_threads(1);
    let lengths: Vec<usize> = std::env::var("BENCH_LENGTHS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![256, 1024, 2048]);
    let out = root().join("target/bench-models");
    std::fs::create_dir_all(&out)?;
    let dir = out.join("qwen2-3m-8k");
    write_model(&dir)?;
    let cfg = ModelConfig::from_dir(&dir)?;
    let ps = prompts(PROMPTS, PROMPT_LEN, cfg.vocab_size);
    std::fs::write(
        out.join("long_prompts.json"),
        json!({"prompts": ps, "n": N, "lengths": lengths}).to_string(),
    )?;
    let (bw, bw_cpu) = memcpy_bandwidth();
    let num_params = {
        let m = Transformer::from_pretrained(&dir, Device::Cpu, Some(Kind::Float))?;
        m.weights.num_params()
    };
    let weight_bytes = (num_params * 4) as f64;
    let kv_per_token =
        (2 * cfg.num_hidden_layers as i64 * cfg.num_key_value_heads * cfg.head_dim * 4) as f64;
    println!(
        "threads 1, {num_params} parameters, memcpy bandwidth {:.2} GB/s ({:.2} GB/s in CPU time), KV {kv_per_token} B/token",
        bw / 1e9,
        bw_cpu / 1e9
    );
    let engine_cfg = EngineConfig {
        max_num_seqs: 64,
        kv_cache_bytes: 4 << 30,
        ..Default::default()
    };
    let mut results = vec![];
    for &len in &lengths {
        let (secs, tokens, _) = run(&dir, &engine_cfg, &ps, N, len)?;
        let (tps, tps_cpu) = (tokens as f64 / secs.wall, tokens as f64 / secs.cpu);
        // Bytes that must be read over the generation: weights once per step, the live
        // KV of every step (prompts once per group, each completion's own tokens).
        let seqs = (PROMPTS * N) as f64;
        let steps = len as f64;
        let kv = kv_per_token
            * (steps * (PROMPTS * PROMPT_LEN) as f64 + seqs * steps * (steps - 1.0) / 2.0);
        let bytes = steps * weight_bytes + kv;
        let roofline_tps = tokens as f64 * bw / bytes;
        let roofline_tps_cpu = tokens as f64 * bw_cpu / bytes;
        println!(
            "ours {len:5} new tokens: {tps:9.1} tokens/s ({:.2}s); roofline {roofline_tps:9.1} tokens/s -> {:.0}% of roofline; CPU time: {tps_cpu:9.1} tokens/s ({:.2}s), {:.0}% of roofline",
            secs.wall,
            100.0 * tps / roofline_tps,
            secs.cpu,
            100.0 * tps_cpu / roofline_tps_cpu
        );
        results.push(json!({
            "new_tokens": len, "tokens_per_s": tps, "seconds": secs.wall,
            "roofline_tokens_per_s": roofline_tps, "bytes_read": bytes,
            "cpu_tokens_per_s": tps_cpu, "cpu_seconds": secs.cpu,
            "cpu_roofline_tokens_per_s": roofline_tps_cpu,
        }));
    }
    // Prefix sharing: one 1,024-token prompt, n = 16, 64 new tokens.
    let long = prompts(1, 1024, cfg.vocab_size);
    let mut sharing = vec![];
    for share in [true, false] {
        let c = EngineConfig {
            share_group_prompts: share,
            enable_prefix_caching: share,
            ..engine_cfg.clone()
        };
        let (secs, _, st) = run(&dir, &c, &long, 16, 64)?;
        let kv_bytes = st.kv_blocks_peak * st.kv_block_bytes;
        println!(
            "prefix sharing {}: {} prompt tokens computed, peak KV {:.1} MiB per group, {:.2}s",
            if share { "on " } else { "off" },
            st.prefill_tokens,
            kv_bytes as f64 / (1 << 20) as f64,
            secs.wall
        );
        sharing.push(json!({
            "share": share, "prefill_tokens": st.prefill_tokens, "kv_bytes": kv_bytes,
            "seconds": secs.wall,
        }));
    }
    std::fs::write(
        out.join("long_ours.json"),
        json!({
            "memcpy_bytes_per_s": bw, "cpu_memcpy_bytes_per_s": bw_cpu, "num_params": num_params,
            "long": results, "sharing": sharing,
        })
        .to_string(),
    )?;
    Ok(())
}
