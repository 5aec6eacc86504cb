//! `trainer eval` and `trainer generate` against a real rollout worker on loopback (the tiny
//! Qwen2 fixture on CPU, its OpenAI-compatible HTTP API): the model name comes from
//! `/v1/models`, and the worker's own `vllm:num_requests_running` gauge never exceeds
//! `max_concurrent` while it stays busy.

mod inference_support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use inference_support::read_jsonl;
use rollout_worker::{EngineHandle, Metrics, WorkerConfig};
use trainer::inference::eval::{self, EvalConfig};
use trainer::inference::generate::{self, GenerateConfig};

fn fixture(name: &str) -> PathBuf {
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

/// A worker on its own runtime; returns the HTTP base URL (with `/v1`).
fn start_worker(rt: &tokio::runtime::Runtime, max_num_seqs: usize) -> String {
    let mut c = WorkerConfig::new(fixture("qwen2-tiny"));
    c.device = "cpu".into();
    c.engine.max_num_seqs = max_num_seqs;
    c.engine.max_n = 8;
    c.engine.max_waiting_seqs = 1024;
    let engine = EngineHandle::load(&c, Arc::new(Metrics::new("test"))).expect("engine starts");
    let (grpc, http) = rt.block_on(async {
        (
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
    });
    let url = format!("http://{}", http.local_addr().unwrap());
    rt.spawn(rollout_worker::serve(
        grpc,
        http,
        engine,
        std::future::pending::<()>(),
    ));
    url
}

/// Samples the worker's running-sequence gauge every 10 ms until stopped; returns the maximum.
fn watch_running(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<i64> {
    std::thread::spawn(move || {
        let client = reqwest::blocking::Client::new();
        let max = AtomicI64::new(0);
        while !stop.load(Ordering::Relaxed) {
            if let Ok(text) = client
                .get(format!("{url}/metrics"))
                .send()
                .and_then(|r| r.text())
            {
                for line in text.lines() {
                    // `vllm:num_requests_running{model_name="..."} 2`
                    if let Some(v) = line
                        .strip_prefix("vllm:num_requests_running")
                        .filter(|r| r.starts_with([' ', '{']))
                        .and_then(|r| r.rsplit(' ').next())
                    {
                        max.fetch_max(
                            v.trim().parse::<f64>().unwrap_or(0.0) as i64,
                            Ordering::Relaxed,
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        max.load(Ordering::Relaxed)
    })
}

#[test]
fn eval_and_generate_against_a_real_worker_respect_max_concurrent() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = start_worker(&rt, 8);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("math.jsonl");
    std::fs::write(&data, inference_support::math_rows(4)).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_running(url.clone(), stop.clone());
    let gen = GenerateConfig {
        dataset_path: data.display().to_string(),
        prompt_column: "problem".into(),
        num_generations: 3,
        max_concurrent: 2,
        max_tokens: 24,
        temperature: 1.0,
        seed: Some(1),
        endpoints: vec![format!("{url}/v1")],
        output: dir.path().join("gen.jsonl"),
        ..GenerateConfig::default()
    };
    let report = generate::run(&gen).unwrap();
    stop.store(true, Ordering::Relaxed);
    let max_running = watcher.join().unwrap();
    assert_eq!(report.rows_written, 4);
    assert!(
        (1..=2).contains(&max_running),
        "worker saw {max_running} running sequences with max_concurrent = 2"
    );
    let recs = read_jsonl(&gen.output);
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert_eq!(r["generations"].as_array().unwrap().len(), 3);
        for f in r["finish_reasons"].as_array().unwrap() {
            assert!(f == "length" || f == "stop", "{f}");
        }
        assert!(r["usage"]["completion_tokens"].as_u64().unwrap() >= 3);
    }

    let ev = EvalConfig {
        dataset_path: data.display().to_string(),
        num_samples: 2,
        max_concurrent: 3,
        max_tokens: 16,
        endpoints: vec![format!("{url}/v1")],
        output_dir: dir.path().join("eval"),
        ..EvalConfig::default()
    };
    let s = eval::run(&ev).unwrap();
    assert_eq!((s.num_problems, s.num_samples, s.unscorable), (4, 2, 0));
    assert!((0.0..=1.0).contains(&s.pass_at_1) && s.pass_at_k >= s.pass_at_1);
    assert!(
        s.mean_completion_tokens > 0.0 && s.mean_completion_tokens <= 16.0,
        "{s:?}"
    );
    assert_eq!(read_jsonl(&ev.output_dir.join("samples.jsonl")).len(), 8);
}
