//! Model benchmarks on CPU (`cargo bench -p model --bench model`):
//!
//! 1. forward+backward tokens/s and peak memory of a ~20M-parameter Qwen2-shaped model
//!    (H 256, 12 layers, 4 heads / 2 KV heads, I 1024, V 32000, tied) at sequence length
//!    512, batch 4, fp32; the loss is the mean token log-prob through the chunked path
//!    (what GRPO uses). scripts/bench/hf_fwd_bwd.py measures transformers on the same
//!    shape for the side-by-side ratio (scripts/bench/model.sh runs both).
//! 2. peak memory of token log-probs at V = 32k, T = 4k, H = 256: chunked vs unchunked,
//!    forward only and forward+backward.
//!
//! Each case runs in a child process of this binary so its peak RSS is its own; the peak
//! is read from /proc/self/status (VmHWM) after resetting it through
//! /proc/self/clear_refs, minus the RSS at the reset. Linux only.
use std::process::Command;
use std::time::Instant;

use model::config::ModelConfig;
use model::{
    token_logprobs, token_logprobs_backward, ForwardInput, LogprobOptions, Transformer, Weights,
};
use tch::{Device, Kind, Tensor};

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets the peak-RSS counter; returns the current RSS in bytes.
fn reset_peak() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kib("VmRSS:") * 1024
}

fn peak_since(base: u64) -> u64 {
    (status_kib("VmHWM:") * 1024).saturating_sub(base)
}

fn bench_config() -> ModelConfig {
    let raw = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 32000, "hidden_size": 256,
        "intermediate_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": true, "rope_theta": 10000.0
    });
    ModelConfig::from_json(raw, std::path::Path::new("bench")).unwrap()
}

fn fwd_bwd(chunked: bool) -> String {
    tch::manual_seed(0);
    let cfg = bench_config();
    let mut w = Weights::random(&cfg, Kind::Float, Device::Cpu);
    w.set_requires_grad(true);
    let m = Transformer::new(cfg, w);
    let params = m.weights.num_params();
    let (b, t) = (4i64, 512i64);
    let ids = Tensor::randint(m.config.vocab_size, [b, t], (Kind::Int64, Device::Cpu));
    let targets = ids.roll([-1], [1]);
    let opts = LogprobOptions {
        chunk_size: 128,
        ..Default::default()
    };
    let step = || {
        let hidden = m.hidden_states(&ForwardInput::new(&ids), None).unwrap();
        if chunked {
            let lp = tch::no_grad(|| {
                token_logprobs(&hidden, m.weights.head(), &targets, &opts).unwrap()
            });
            // d(mean log-prob)/d logprob = 1 / (B T).
            let g = lp.logprobs.ones_like() / (b * t) as f64;
            let gh = token_logprobs_backward(&hidden, m.weights.head(), &targets, &opts, &g, None)
                .unwrap();
            (hidden * gh).sum(Kind::Float).backward();
        } else {
            // The full [B, T, V] logits under autograd, as transformers + TRL do.
            let logits = m.logits(&hidden).to_kind(Kind::Float);
            let lp = logits
                .log_softmax(-1, Kind::Float)
                .gather(-1, &targets.unsqueeze(-1), false);
            lp.mean(Kind::Float).backward();
        }
        for (_, p) in m.weights.named() {
            let _ = p.grad().zero_();
        }
    };
    step(); // warm-up
    let base = reset_peak();
    let iters = 3;
    let start = Instant::now();
    for _ in 0..iters {
        step();
    }
    let secs = start.elapsed().as_secs_f64() / iters as f64;
    format!(
        "fwd_bwd chunked={chunked} params={params} batch={b} seq={t} step_s={secs:.3} tokens_per_s={:.0} peak_mib={:.0}",
        (b * t) as f64 / secs,
        peak_since(base) as f64 / (1 << 20) as f64
    )
}

fn logprobs_case(chunked: bool, backward: bool) -> String {
    tch::manual_seed(0);
    let (t, h, v) = (4096i64, 256i64, 32000i64);
    let hidden = Tensor::randn([1, t, h], (Kind::Float, Device::Cpu)).set_requires_grad(backward);
    let head =
        (Tensor::randn([v, h], (Kind::Float, Device::Cpu)) * 0.05).set_requires_grad(backward);
    let targets = Tensor::randint(v, [1, t], (Kind::Int64, Device::Cpu));
    let chunk_size = if chunked { 512 } else { t };
    let opts = LogprobOptions {
        chunk_size,
        ..Default::default()
    };
    let base = reset_peak();
    let start = Instant::now();
    if backward && chunked {
        let lp = tch::no_grad(|| token_logprobs(&hidden, &head, &targets, &opts).unwrap());
        let g = lp.logprobs.ones_like();
        let gh = token_logprobs_backward(&hidden, &head, &targets, &opts, &g, None).unwrap();
        (&hidden * gh).sum(Kind::Float).backward();
    } else if backward {
        let lp = token_logprobs(&hidden, &head, &targets, &opts).unwrap();
        lp.logprobs.sum(Kind::Float).backward();
    } else {
        let _lp = tch::no_grad(|| token_logprobs(&hidden, &head, &targets, &opts).unwrap());
    }
    format!(
        "logprobs chunked={chunked} backward={backward} V={v} T={t} secs={:.2} peak_mib={:.0}",
        start.elapsed().as_secs_f64(),
        peak_since(base) as f64 / (1 << 20) as f64
    )
}

fn main() {
    if let Ok(case) = std::env::var("MODEL_BENCH_CASE") {
        let line = match case.as_str() {
            "fwd_bwd" => fwd_bwd(true),
            "fwd_bwd_unchunked" => fwd_bwd(false),
            "lp_chunked" => logprobs_case(true, false),
            "lp_unchunked" => logprobs_case(false, false),
            "lp_chunked_bwd" => logprobs_case(true, true),
            "lp_unchunked_bwd" => logprobs_case(false, true),
            other => panic!("unknown case {other}"),
        };
        println!("{line}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    println!("threads: {}", tch::get_num_threads());
    for case in [
        "fwd_bwd",
        "fwd_bwd_unchunked",
        "lp_chunked",
        "lp_unchunked",
        "lp_chunked_bwd",
        "lp_unchunked_bwd",
    ] {
        let out = Command::new(&exe)
            .env("MODEL_BENCH_CASE", case)
            .output()
            .expect("spawn bench case");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!("{case} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
