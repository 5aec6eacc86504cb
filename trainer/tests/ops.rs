//! Operations with real processes on 127.0.0.1, as Kubernetes runs them
//! (deploy/, docs/operations.md):
//!
//! - Ranks started as the pods of an Indexed Job (only JOB_COMPLETION_INDEX,
//!   WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) rendezvous and are local rank 0 of 1.
//! - SIGTERM to one rank of an SFT run (its pod evicted): every rank stops after the
//!   same step with a checkpoint and the configured exit status; the restarted ranks
//!   resume from it (`resume_from_checkpoint: latest`) and finish; metrics.jsonl
//!   holds every step and metrics.png is drawn.
//! - A real Prometheus (Debian's package) scrapes a running GRPO trainer and a rollout
//!   worker: every query of the Grafana dashboard returns series, every alert rule
//!   evaluates; then SIGTERM stops the trainer cleanly at a checkpoint.
mod e2e_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_support::*;

fn sigterm(p: &Proc) {
    let ok = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM failed");
}

/// Waits for exit and returns the exit code (panics after `timeout`).
fn exit_code(p: &mut Proc, timeout: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(200));
            return status.code().unwrap_or(-1);
        }
        assert!(
            start.elapsed() < timeout,
            "still running after {timeout:?}:\n{}",
            p.output().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `world` trainer processes with the environment of an Indexed Job's pods.
fn start_pods(world: usize, args: &[String]) -> Vec<Proc> {
    let port = free_port();
    (0..world)
        .map(|index| {
            let mut cmd = Command::new(trainer_bin());
            cmd.args(args)
                .env_remove("RANK")
                .env_remove("LOCAL_RANK")
                .env_remove("LOCAL_WORLD_SIZE")
                .env("JOB_COMPLETION_INDEX", index.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("OMP_NUM_THREADS", "1")
                .env("RUST_LOG", "warn,trainer=info");
            Proc::spawn(cmd, &format!("pod{index}"))
        })
        .collect()
}

#[test]
fn indexed_job_pods_rendezvous_with_the_completion_index_as_rank() {
    let args: Vec<String> = ["dist-check", "--numel", "1001", "--timeout-secs", "60"]
        .map(String::from)
        .to_vec();
    let mut pods = start_pods(3, &args);
    for (i, p) in pods.iter_mut().enumerate() {
        assert!(p.wait(Duration::from_secs(120)), "pod {i} failed");
        let out = p.output().join("\n");
        assert!(
            out.contains(&format!("rank {i}/3 (local 0/1, restart 0): dist-check ok")),
            "{out}"
        );
    }
}

fn sft_config(dir: &Path, out: &str, data: &Path) -> String {
    let p = dir.join(format!("{out}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model_name_or_path: {}\noutput_dir: {}\ndataset:\n  path: {}\n\
             per_device_train_batch_size: 8\nlearning_rate: 1.0e-3\nmax_steps: 2000\n\
             save_steps: 0\nlogging_steps: 1\nmax_length: 64\nseed: 5\n\
             sigterm_exit_code: 143\nzero:\n  stage: 2\n",
            checkpoint().display(),
            dir.join(out).display(),
            data.display()
        ),
    )
    .unwrap();
    p.display().to_string()
}

/// The step of "sft step N/M" lines.
fn sft_steps(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("sft step ")?.split('/').next()?.parse().ok())
        .collect()
}

#[test]
fn sigterm_to_one_pod_stops_every_rank_at_a_checkpoint_and_the_job_resumes() {
    let dir = tempdir("sigterm");
    let data = addition_rows(&dir, "sft.jsonl", 512, 3, true);
    let cfg = sft_config(&dir, "run", &data);
    let args = vec!["sft".to_string(), "--config".into(), cfg.clone()];
    let mut pods = start_pods(2, &args);
    pods[0].wait_line("step 3", Duration::from_secs(600), |l| {
        l.starts_with("sft step 3/")
    });
    // Only pod 1 is evicted; pod 0 learns it through the per-step agreement.
    let t0 = Instant::now();
    sigterm(&pods[1]);
    let codes: Vec<i32> = pods
        .iter_mut()
        .map(|p| exit_code(p, Duration::from_secs(120)))
        .collect();
    let took = t0.elapsed();
    assert_eq!(codes, vec![143, 143], "sigterm_exit_code on every rank");
    let out = pods[0].output();
    let stop = out
        .iter()
        .find(|l| l.starts_with("stopped by SIGTERM after step "))
        .unwrap_or_else(|| panic!("no stop line:\n{}", out.join("\n")));
    let step: u64 = stop["stopped by SIGTERM after step ".len()..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3..2000).contains(&step), "{stop}");
    assert_eq!(
        sft_steps(&out).last(),
        Some(&step),
        "stopped after the step it logged"
    );
    let ckpt = dir.join(format!("run/checkpoints/step-{step:08}"));
    assert!(
        ckpt.join("manifest.json").exists(),
        "{} missing",
        ckpt.display()
    );
    assert!(
        !dir.join("run/model.safetensors").exists(),
        "a stopped run publishes no final model"
    );
    eprintln!("both ranks stopped {took:?} after SIGTERM, at step {step}");

    // The Job replaces the pods; they resume from the checkpoint and finish.
    let args = vec![
        "sft".to_string(),
        "--config".into(),
        cfg,
        "--set".into(),
        "resume_from_checkpoint=latest".into(),
        "--set".into(),
        format!("max_steps={}", step + 2),
    ];
    let mut pods = start_pods(2, &args);
    for p in &mut pods {
        assert_eq!(exit_code(p, Duration::from_secs(600)), 0);
    }
    let out = pods[0].output();
    assert!(
        out.iter()
            .any(|l| l.starts_with("resumed from ") && l.ends_with(&format!("at step {step}"))),
        "{}",
        out.join("\n")
    );
    assert_eq!(sft_steps(&out), vec![step + 1, step + 2]);
    // metrics.jsonl has every step once per run; the plot was drawn.
    let series = trainer::runlog::read(&dir.join("run/metrics.jsonl")).unwrap();
    assert_eq!(
        series.keys().copied().collect::<Vec<_>>(),
        (1..=step + 2).collect::<Vec<_>>()
    );
    assert!(series.values().all(|v| v["loss"].is_some()));
    assert!(dir.join("run/metrics.png").exists());
    assert!(out.iter().any(|l| l.starts_with("metrics plot: ")));
    let _ = std::fs::remove_dir_all(&dir);
}

fn prometheus_bin() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`prometheus` is not installed: run scripts/setup.sh (Debian's prometheus package)")
    })
}

/// `GET /api/v1/<path>?<params>` of a Prometheus; the `data` field.
fn api(base: &str, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
    let url = reqwest::Url::parse_with_params(&format!("{base}/api/v1/{path}"), params).unwrap();
    let body: serde_json::Value = reqwest::blocking::get(url.clone())
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(body["status"], "success", "{url}: {body}");
    body["data"].clone()
}

/// Waits until the Prometheus at `base` answers `/-/ready` (it may still be starting
/// when the trainer has run its first steps: a query then meets a closed port).
fn wait_ready(base: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match reqwest::blocking::get(format!("{base}/-/ready")) {
            Ok(r) if r.status().is_success() => return,
            other if Instant::now() > deadline => {
                panic!("Prometheus at {base} not ready within {within:?}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Every `expr` of the dashboard, its variables set as Grafana would ("All").
fn dashboard_queries() -> Vec<(String, String)> {
    let path = root().join("deploy/components/monitoring/dashboard.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = vec![];
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$trainer_job", ".*")
                .replace("$worker_job", ".*")
                .replace("$model_name", ".*")
                .replace("$__rate_interval", "15s");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

#[test]
fn prometheus_scrapes_trainer_and_worker_and_every_dashboard_query_returns_series() {
    let prometheus = prometheus_bin();
    let dir = tempdir("prometheus");
    let (worker, grpc) = start_worker("worker", &["--max-num-seqs", "128"]);
    let serving = worker
        .output()
        .into_iter()
        .find(|l| l.starts_with("serving "))
        .unwrap();
    let worker_http = serving.split("http://").nth(1).unwrap().trim().to_string();
    let metrics_port = free_port();
    let train = addition_rows(&dir, "train.jsonl", 256, 1, false);
    let heldout = addition_rows(&dir, "heldout.jsonl", 16, 2, false);
    let cfg = dir.join("grpo.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model_name_or_path: {ckpt}\noutput_dir: {out}\ndataset:\n  path: {train}\n\
             eval_dataset:\n  path: {heldout}\neval_num_generations: 2\n\
             num_generations: 8\nmax_prompt_length: 32\nmax_completion_length: 16\n\
             per_device_train_batch_size: 16\nmax_steps: 5000\nsave_steps: 0\n\
             learning_rate: 3.0e-4\nreward_funcs: [accuracy, format]\nlogging_steps: 1\n\
             metrics_port: {metrics_port}\nrollout:\n  workers: [\"{grpc}\"]\n",
            ckpt = checkpoint().display(),
            out = dir.join("out").display(),
            train = train.display(),
            heldout = heldout.display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(trainer_bin());
    cmd.args(["grpo", "--config"])
        .arg(&cfg)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "warn,trainer=info");
    let mut trainer = Proc::spawn(cmd, "trainer");

    let web = free_port();
    let rules = root().join("deploy/components/monitoring/alerts.yaml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: grpo-trainer\n    static_configs:\n      \
             - targets: [\"127.0.0.1:{metrics_port}\"]\n  - job_name: grpo-rollout-worker\n    \
             static_configs:\n      - targets: [\"{worker_http}\"]\n",
            rules.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(prometheus);
    cmd.arg(format!(
        "--config.file={}",
        dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.join("tsdb").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{web}"));
    let _prom = Proc::spawn(cmd, "prometheus");
    let base = format!("http://127.0.0.1:{web}");

    trainer.wait_line("step 4", Duration::from_secs(600), |l| {
        l.starts_with("step 4/")
    });
    wait_ready(&base, Duration::from_secs(60));
    // Both targets up, then every dashboard query returns at least one series (the
    // rate() ones need a few scrapes of a few steps).
    let queries = dashboard_queries();
    assert!(queries.len() >= 40, "{}", queries.len());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut empty: Vec<(String, String)>;
    loop {
        empty = queries
            .iter()
            .filter(|(_, q)| {
                api(&base, "query", &[("query", q)])["result"]
                    .as_array()
                    .is_none_or(|r| r.is_empty())
            })
            .cloned()
            .collect();
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(empty.is_empty(), "queries without series: {empty:#?}");
    let up = api(&base, "query", &[("query", "up")]);
    assert_eq!(up["result"].as_array().unwrap().len(), 2, "{up}");
    for r in up["result"].as_array().unwrap() {
        assert_eq!(r["value"][1], "1", "{r}");
    }
    // The worker's vLLM series carry model_name = the served model name.
    let named = api(
        &base,
        "query",
        &[(
            "query",
            "vllm:num_requests_running{model_name=\"checkpoint\"}",
        )],
    );
    assert_eq!(named["result"].as_array().unwrap().len(), 1, "{named}");
    // Every alert rule evaluates against the real series without error.
    let groups = api(&base, "rules", &[]);
    let rules: Vec<&serde_json::Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(rules.len(), 7, "{groups}");
    for r in &rules {
        assert_eq!(r["health"], "ok", "{r}");
    }
    // A healthy run fires nothing.
    let alerts = api(&base, "alerts", &[]);
    let firing: Vec<&serde_json::Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(firing.is_empty(), "{firing:?}");

    // SIGTERM: the step finishes, a checkpoint is written, exit status 0.
    sigterm(&trainer);
    assert_eq!(exit_code(&mut trainer, Duration::from_secs(120)), 0);
    let out = trainer.output();
    let stop = out
        .iter()
        .find(|l| l.starts_with("stopped by SIGTERM after step "))
        .unwrap_or_else(|| panic!("{}", out.join("\n")));
    let step: u64 = stop["stopped by SIGTERM after step ".len()..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(dir
        .join(format!("out/checkpoints/step-{step:08}/manifest.json"))
        .exists());
    assert!(dir.join("out/metrics.png").exists());
    let series = trainer::runlog::read(&dir.join("out/metrics.jsonl")).unwrap();
    assert!(
        series[&0].contains_key("eval/accuracy_greedy"),
        "eval before training"
    );
    assert!(series[&step].contains_key("rewards/format/mean"));
    let _ = std::fs::remove_dir_all(&dir);
}
