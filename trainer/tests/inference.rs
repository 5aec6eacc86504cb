//! `trainer eval` and `trainer generate` against a scripted OpenAI-compatible server (known
//! outcomes, errors, timeouts, a dead endpoint), real processes killed and resumed, and a real
//! rollout worker on loopback whose own metrics show the concurrency bound.

mod inference_support;

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use inference_support::{dead_endpoint, math_rows, read_jsonl, Script, Scripted};
use serde_json::Value;
use trainer::inference::eval::{self, EvalConfig};
use trainer::inference::generate::{self, GenerateConfig};

fn eval_config(dir: &Path, endpoints: Vec<String>) -> EvalConfig {
    let data = dir.join("math.jsonl");
    if !data.exists() {
        std::fs::write(&data, math_rows(5)).unwrap();
    }
    EvalConfig {
        dataset_path: data.display().to_string(),
        endpoints,
        output_dir: dir.join("out"),
        max_concurrent: 3,
        max_tokens: 64,
        request_timeout_secs: 2.0,
        retry_backoff_secs: 0.01,
        ..EvalConfig::default()
    }
}

/// Problem i gets i correct samples of 4 (problem 4: all four).
fn known_script() -> Script {
    Script {
        correct_per_problem: vec![0, 1, 2, 3, 4],
        ..Script::default()
    }
}

fn check_known_summary(s: &eval::Summary) {
    assert_eq!(s.num_problems, 5);
    assert_eq!(s.num_samples, 4);
    assert_eq!(s.unscorable, 0);
    // pass@1 = mean(c / 4) = (0 + 1 + 2 + 3 + 4) / 20; pass@4 = share of problems with c > 0.
    assert!((s.pass_at_1 - 0.5).abs() < 1e-12, "{s:?}");
    assert!((s.pass_at_k - 0.8).abs() < 1e-12, "{s:?}");
    assert!((s.mean_completion_tokens - 4.0).abs() < 1e-12, "{s:?}");
}

fn check_samples(out: &Path) {
    let recs = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(recs.len(), 20);
    let mut keys: Vec<(u64, u64)> = recs
        .iter()
        .map(|r| (r["row"].as_u64().unwrap(), r["sample"].as_u64().unwrap()))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 20, "every (row, sample) exactly once");
    for r in &recs {
        let row = r["row"].as_i64().unwrap();
        let correct = r["correct"].as_bool().unwrap();
        let answer = r["answer"].as_str().unwrap();
        assert_eq!(correct, answer == row.to_string(), "{r}");
        assert!(r["completion"].as_str().unwrap().contains("\\boxed"));
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "num_problems",
        "num_samples",
        "pass@1",
        "pass@k",
        "mean_completion_tokens",
        "unscorable",
    ] {
        assert!(
            summary.get(key).is_some(),
            "summary.json lacks {key}: {summary}"
        );
    }
}

#[test]
fn eval_pass_at_k_on_known_outcomes() {
    let server = Scripted::start(known_script());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = eval_config(dir.path(), vec![server.url.clone()]);
    cfg.api_key = Some("sk-test".into());
    let s = eval::run(&cfg).unwrap();
    check_known_summary(&s);
    check_samples(&cfg.output_dir);
    assert!(server.script.max_in_flight.load(Ordering::SeqCst) <= 3);
    let auth = server.script.auth_headers.lock().unwrap();
    assert!(
        auth.iter().all(|h| h.as_deref() == Some("Bearer sk-test")),
        "{auth:?}"
    );
    // A rerun finds every sample done and sends nothing.
    let before = server.script.requests.load(Ordering::SeqCst);
    let again = eval::run(&cfg).unwrap();
    assert_eq!(again, s);
    assert_eq!(server.script.requests.load(Ordering::SeqCst), before);
}

#[test]
fn eval_survives_errors_timeouts_and_a_dead_endpoint() {
    let flaky = Scripted::start(Script {
        fail_first: 3,
        ..known_script()
    });
    let hanging = Scripted::start(Script {
        hang: true,
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = eval_config(
        dir.path(),
        vec![dead_endpoint(), flaky.url.clone(), hanging.url.clone()],
    );
    cfg.model = Some("scripted-model".into());
    cfg.request_timeout_secs = 0.5;
    cfg.max_retries = 8;
    let s = eval::run(&cfg).unwrap();
    check_known_summary(&s);
    check_samples(&cfg.output_dir);
    assert!(
        flaky.script.requests.load(Ordering::SeqCst) >= 23,
        "the 3 failures were retried"
    );
}

#[test]
fn eval_fails_with_a_clear_error_and_keeps_nothing_false() {
    let broken = Scripted::start(Script {
        always_fail: true,
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = eval_config(dir.path(), vec![broken.url.clone()]);
    cfg.max_retries = 1;
    let err = eval::run(&cfg).unwrap_err().chain();
    assert!(
        err.contains("HTTP 500") && err.contains("2 attempts"),
        "{err}"
    );
    assert!(read_jsonl(&cfg.output_dir.join("samples.jsonl")).is_empty());
    let mut bad = eval_config(dir.path(), vec![broken.url.clone()]);
    bad.top_p = 0.0;
    assert!(eval::run(&bad).unwrap_err().chain().contains("top_p"));
}

fn trainer_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
}

/// Waits until `path` has at least `n` lines (or the child exits), then kills the child.
fn kill_after_lines(mut child: Child, path: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while read_jsonl_lossy(path) < n {
        assert!(
            Instant::now() < deadline,
            "no progress in {}",
            path.display()
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the process exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn read_jsonl_lossy(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.matches('\n').count())
        .unwrap_or(0)
}

#[test]
fn eval_killed_and_resumed_keeps_every_sample_once() {
    let server = Scripted::start(Script {
        chunk_delay: Duration::from_millis(40),
        ..known_script()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = eval_config(dir.path(), vec![server.url.clone()]);
    let file = dir.path().join("eval.toml");
    std::fs::write(&file, format!("dataset_path = {:?}\nendpoints = [{:?}]\noutput_dir = {:?}\nmax_concurrent = 2\nmax_tokens = 64\n", cfg.dataset_path, server.url, cfg.output_dir.display().to_string())).unwrap();
    let samples = cfg.output_dir.join("samples.jsonl");
    let child = trainer_bin()
        .args(["eval", "--config"])
        .arg(&file)
        .spawn()
        .unwrap();
    kill_after_lines(child, &samples, 6);
    // A crash mid-write leaves half a line.
    let mut text = std::fs::read_to_string(&samples).unwrap();
    text.push_str("{\"row\": 4, \"sam");
    std::fs::write(&samples, text).unwrap();
    let status = trainer_bin()
        .args(["eval", "--config"])
        .arg(&file)
        .args(["--set", "max_concurrent=4"])
        .status()
        .unwrap();
    assert!(status.success());
    check_samples(&cfg.output_dir);
    let s: eval::Summary = serde_json::from_str(
        &std::fs::read_to_string(cfg.output_dir.join("summary.json")).unwrap(),
    )
    .unwrap();
    check_known_summary(&s);
}

fn generate_config(dir: &Path, endpoints: Vec<String>) -> GenerateConfig {
    let data = dir.join("prompts.jsonl");
    if !data.exists() {
        std::fs::write(&data, math_rows(6)).unwrap();
    }
    GenerateConfig {
        dataset_path: data.display().to_string(),
        prompt_column: "problem".into(),
        id_column: Some("uid".into()),
        num_generations: 3,
        endpoints,
        output: dir.join("gen/out.jsonl"),
        max_concurrent: 4,
        max_tokens: 64,
        request_timeout_secs: 2.0,
        retry_backoff_secs: 0.01,
        ..GenerateConfig::default()
    }
}

fn check_generated(path: &Path, rows: usize, generations: usize) -> Vec<Value> {
    let recs = read_jsonl(path);
    assert_eq!(recs.len(), rows);
    let mut ids: Vec<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), rows, "no row twice");
    for r in &recs {
        assert!(
            r["problem"].is_string() && r["answer"].is_string() && r["uid"] == r["id"],
            "the row's own columns: {r}"
        );
        assert_eq!(
            r["finish_reasons"].as_array().unwrap().len(),
            r["generations"].as_array().unwrap().len()
        );
        if r.get("pass_rate").is_none() {
            assert_eq!(r["generations"].as_array().unwrap().len(), generations);
        }
        assert!(r["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    }
    recs
}

#[test]
fn generate_filters_by_the_checker_and_writes_a_card() {
    // Problem i: its first i requests are right.
    let server = Scripted::start(Script {
        correct_per_problem: (0..6).collect(),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = generate_config(dir.path(), vec![dead_endpoint(), server.url.clone()]);
    cfg.filter_answer_column = Some("answer".into());
    cfg.max_retries = 4;
    let report = generate::run(&cfg).unwrap();
    let recs = check_generated(&cfg.output, 6, 3);
    for r in &recs {
        let i: usize = r["answer"].as_str().unwrap().parse().unwrap();
        let kept = i.min(3);
        assert_eq!(r["generations"].as_array().unwrap().len(), kept, "{r}");
        assert!((r["pass_rate"].as_f64().unwrap() - kept as f64 / 3.0).abs() < 1e-12);
    }
    // 0 + 1 + 2 + 3 + 3 + 3 correct of 18.
    assert!((report.pass_rate.unwrap() - 12.0 / 18.0).abs() < 1e-12);
    let card = std::fs::read_to_string(dir.path().join("gen/out.jsonl.card.md")).unwrap();
    assert!(
        card.contains("tokens/s") && card.contains("0.6667"),
        "{card}"
    );
    assert!(server.script.max_in_flight.load(Ordering::SeqCst) <= 4);
}

#[test]
fn generate_killed_and_resumed_loses_and_duplicates_no_row() {
    let server = Scripted::start(Script {
        chunk_delay: Duration::from_millis(30),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = generate_config(dir.path(), vec![server.url.clone()]);
    let file = dir.path().join("gen.toml");
    std::fs::write(&file, format!("dataset_path = {:?}\nprompt_column = \"problem\"\nendpoints = [{:?}]\noutput = {:?}\nnum_generations = 3\nmax_concurrent = 2\nmax_tokens = 64\n", cfg.dataset_path, server.url, cfg.output.display().to_string())).unwrap();
    let child = trainer_bin()
        .args(["generate", "--config"])
        .arg(&file)
        .spawn()
        .unwrap();
    kill_after_lines(child, &cfg.output, 2);
    let mut text = std::fs::read_to_string(&cfg.output).unwrap();
    text.push_str("{\"problem\": \"Problem 5");
    std::fs::write(&cfg.output, text).unwrap();
    let status = trainer_bin()
        .args(["generate", "--config"])
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    // Without id_column the id is the prompt hash; still one line per row.
    let recs = read_jsonl(&cfg.output);
    assert_eq!(recs.len(), 6);
    let mut ids: Vec<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
    assert!(recs
        .iter()
        .all(|r| r["generations"].as_array().unwrap().len() == 3));
}
