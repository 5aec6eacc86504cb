//! Fault tests with real processes and elapsed-time bounds (docs/security.md):
//!
//! - a rank started as a pod starts it (the `trainer` binary with RANK, WORLD_SIZE and
//!   MASTER_ADDR in its environment, no launcher) SIGKILLed while the ranks run
//!   collectives: the others exit non-zero within `dist.timeout_secs`, naming it;
//! - a rollout worker SIGSTOPped while it generates: the trainer fails over to the other
//!   worker within `connect_timeout_secs + request_timeout_secs`, and after SIGCONT the
//!   stopped worker ends the run on the same weights as the other one;
//! - a weight-push client SIGKILLed in the middle of an `UpdateWeights` stream: the
//!   worker keeps serving the old version, and the next push commits at once.
//! - the middle worker of a weight-push chain (data plane, w0 -> w1 -> w2) SIGKILLed
//!   halfway: w0 commits, w1 and w2 are dropped at once (w2 keeps its old version), and
//!   the next push brings w2 up to date down the shortened chain.
//!
//! The third re-runs this test binary with `FAULT_CHILD` set, which turns the
//! `child_process` test into the pushing client.
mod e2e_support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_support::*;
use tch::Tensor;
use trainer::rollout::{RolloutClient, RolloutConfig};

/// Waits for exit, up to `limit` (killing it after); returns success and the time taken.
fn wait_exit(p: &mut Proc, limit: Duration) -> (bool, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            let took = start.elapsed();
            std::thread::sleep(Duration::from_millis(200)); // the last output lines
            return (status.success(), took);
        }
        if start.elapsed() > limit {
            p.kill();
            panic!("still running after {limit:?}:\n{}", p.output().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[test]
fn a_rank_started_without_the_launcher_killed_mid_collective_stops_the_others() {
    const TIMEOUT_SECS: u64 = 20;
    let dir = tempdir("fault-rank");
    let data = addition_rows(&dir, "sft.jsonl", 256, 3, true);
    let cfg = dir.join("sft.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model_name_or_path: {}\noutput_dir: {}\ndataset:\n  path: {}\n\
             per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\nmax_steps: 100000\n\
             save_steps: 0\nlogging_steps: 1\nmax_length: 64\nzero:\n  stage: 3\n\
             dist:\n  timeout_secs: {TIMEOUT_SECS}\n",
            checkpoint().display(),
            dir.join("out").display(),
            data.display()
        ),
    )
    .unwrap();
    // ZeRO-3 gathers every unit in forward and backward and reduce-scatters its
    // gradients: a running rank is nearly always inside a collective.
    let mut ranks = start_ranks(
        3,
        &["sft".into(), "--config".into(), cfg.display().to_string()],
    );
    ranks[0].wait_line("step 2", Duration::from_secs(300), |l| {
        l.starts_with("sft step 2/")
    });
    ranks[1].kill();
    let killed = Instant::now();
    let bound = Duration::from_secs(TIMEOUT_SECS);
    // Both survivors polled together: each one's exit time is measured from the kill.
    let mut exits: [Option<(bool, Duration)>; 3] = [None; 3];
    while exits[0].is_none() || exits[2].is_none() {
        for rank in [0, 2] {
            if exits[rank].is_none() {
                if let Some(status) = ranks[rank].child.try_wait().unwrap() {
                    exits[rank] = Some((status.success(), killed.elapsed()));
                }
            }
        }
        assert!(killed.elapsed() < bound * 3, "a rank is still running");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200)); // the last output lines
    for rank in [0, 2] {
        let (ok, took) = exits[rank].unwrap();
        let out = ranks[rank].output().join("\n");
        eprintln!("FAULT rank {rank} exited {took:?} after rank 1 was killed");
        assert!(!ok, "rank {rank} must fail:\n{out}");
        assert!(
            took < bound,
            "rank {rank} took {took:?}, over dist.timeout_secs = {bound:?}:\n{out}"
        );
        assert!(
            out.contains("rank 1 failed"),
            "rank {rank} must name rank 1:\n{out}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker's HTTP address (from its serving line).
fn http_addr(worker: &Proc) -> String {
    worker
        .output()
        .iter()
        .filter(|l| l.starts_with("serving "))
        .find_map(|l| l.split("http://").nth(1).map(|s| s.trim().to_string()))
        .unwrap()
}

/// One HTTP/1.0 exchange; returns the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out)
}

fn health(addr: &str) -> serde_json::Value {
    serde_json::from_str(&http(addr, "GET", "/health", "")).unwrap()
}

/// The greedy completion of a fixed prompt (what the served weights compute).
fn greedy(addr: &str) -> String {
    let body =
        r#"{"prompt": "What is 12+34?", "max_tokens": 12, "temperature": 0, "ignore_eos": true}"#;
    let v: serde_json::Value = serde_json::from_str(&http(addr, "POST", "/v1/completions", body))
        .unwrap_or_else(|e| panic!("completion: {e}"));
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

#[test]
fn a_worker_stopped_past_its_timeout_is_failed_over_and_rejoins_intact() {
    const CONNECT: f64 = 1.0;
    const REQUEST: f64 = 3.0;
    let dir = tempdir("fault-stop");
    let (fast, fast_url) = start_worker("fast", &["--max-num-seqs", "128"]);
    let (victim, victim_url) = start_worker("victim", &["--max-num-seqs", "4"]);
    let (fast_http, victim_http) = (http_addr(&fast), http_addr(&victim));
    let train = addition_rows(&dir, "train.jsonl", 128, 1, false);
    let cfg = dir.join("grpo.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model_name_or_path: {}\noutput_dir: {}\ndataset:\n  path: {}\n\
             num_generations: 8\nper_device_train_batch_size: 32\nmax_prompt_length: 32\n\
             max_completion_length: 16\nreward_funcs: [accuracy]\nlogging_steps: 1\n\
             max_steps: 5\nsave_steps: 0\nrollout:\n  workers: [\"{fast_url}\", \"{victim_url}\"]\n\
             \x20 max_prompts_per_request: 1\n  request_timeout_secs: {REQUEST}\n\
             \x20 connect_timeout_secs: {CONNECT}\n  retry_backoff_secs: 0.5\n",
            checkpoint().display(),
            dir.join("out").display(),
            train.display()
        ),
    )
    .unwrap();
    let mut rank = start_ranks(
        1,
        &["grpo".into(), "--config".into(), cfg.display().to_string()],
    )
    .remove(0);
    rank.wait_line("step 1", Duration::from_secs(300), |l| {
        l.starts_with("step 1/")
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while health(&victim_http)["num_running_seqs"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the victim never got work");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&victim, "-STOP");
    let stopped = Instant::now();
    let failover = "rollout worker failed; re-sending its groups";
    let line = rank.wait_line("the failover", Duration::from_secs(120), |l| {
        l.contains(failover)
    });
    let took = stopped.elapsed();
    eprintln!("FAULT failover {took:?} after SIGSTOP");
    // The silence timeout, plus the time a fast step takes to notice (a few seconds).
    let bound = Duration::from_secs_f64(CONNECT + REQUEST + 10.0);
    assert!(
        took < bound,
        "failover after {took:?} (bound {bound:?}): {line}"
    );
    assert!(
        line.contains(victim_url.trim_start_matches("http://")),
        "{line}"
    );
    signal(&victim, "-CONT");
    let (ok, _) = wait_exit(&mut rank, Duration::from_secs(300));
    let out = rank.output();
    assert!(ok, "the trainer failed:\n{}", out.join("\n"));
    let steps = step_lines(&out);
    assert_eq!(steps.len(), 5, "{}", out.join("\n"));
    for l in &steps {
        assert_eq!(
            field(l, "groups"),
            Some(4.0),
            "every group of every step: {l}"
        );
    }
    assert!(
        !out.iter().any(|l| l.contains("above version")),
        "no group from a version never pushed:\n{}",
        out.join("\n")
    );
    // The revived worker took the final push: same version, same greedy completion.
    let (hf, hv) = (health(&fast_http), health(&victim_http));
    assert_eq!(hv["status"], "ok", "{hv}");
    assert_eq!(hf["weight_version"], hv["weight_version"], "{hf} vs {hv}");
    assert_eq!(greedy(&fast_http), greedy(&victim_http));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The demo checkpoint's tensors, each moved by a fixed amount (a different policy).
fn perturbed() -> Vec<(String, Tensor)> {
    let path = checkpoint().join("model.safetensors");
    tch::manual_seed(11);
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = t.to_kind(tch::Kind::Float);
            let moved = &t + t.randn_like() * 0.05;
            (n, moved)
        })
        .collect()
}

fn client(url: &str) -> (tokio::runtime::Runtime, RolloutClient) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cfg = RolloutConfig {
        workers: vec![url.to_string()],
        weight_chunk_bytes: 64 << 10,
        weight_dtype: "float32".into(),
        ..RolloutConfig::default()
    };
    let c = rt.block_on(RolloutClient::connect(cfg)).unwrap();
    (rt, c)
}

/// The pushing client (`FAULT_CHILD=push`): half of an update, then it waits to be killed.
#[test]
fn child_process() {
    let Ok(url) = std::env::var("FAULT_CHILD_PUSH_URL") else {
        return;
    };
    let (rt, c) = client(&url);
    let tensors = perturbed();
    rt.block_on(async {
        let mut push = c.begin_push(1).await.unwrap();
        for (name, t) in &tensors[..tensors.len() / 2] {
            push.send(name, t).await.unwrap();
        }
        // Sent means queued: give the stream time to deliver them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("HALF SENT");
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(push);
    });
}

#[test]
fn a_pusher_killed_mid_update_leaves_the_old_version_serving() {
    let (worker, url) = start_worker("worker", &[]);
    let http_at = http_addr(&worker);
    let before = greedy(&http_at);
    assert_eq!(health(&http_at)["weight_version"], 0);

    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("FAULT_CHILD_PUSH_URL", &url)
    .env("OMP_NUM_THREADS", "1");
    let mut pusher = Proc::spawn(cmd, "pusher");
    pusher.wait_line("half the update", Duration::from_secs(120), |l| {
        l.contains("HALF SENT")
    });
    pusher.kill();
    let killed = Instant::now();

    // The half-sent update is not applied: the old weights keep serving.
    assert_eq!(health(&http_at)["weight_version"], 0);
    assert_eq!(greedy(&http_at), before, "the old version keeps serving");

    // The next push commits without waiting on the dead stream (nor its idle timeout).
    let (rt, c) = client(&url);
    let tensors = perturbed();
    let report = rt.block_on(async {
        let mut push = c.begin_push(1).await.unwrap();
        for (name, t) in &tensors {
            push.send(name, t).await.unwrap();
        }
        push.commit().await.unwrap()
    });
    let took = killed.elapsed();
    eprintln!("FAULT next push committed {took:?} after the kill");
    assert!(
        took < Duration::from_secs(20),
        "the next push took {took:?} after the kill: {report:?}"
    );
    assert_eq!(health(&http_at)["weight_version"], 1);
    let after = greedy(&http_at);
    assert_ne!(after, before, "the new weights serve");
    // Still the committed version, and deterministic.
    assert_eq!(greedy(&http_at), after);
}

#[test]
fn a_worker_killed_mid_chain_is_routed_around_and_only_it_misses_the_version() {
    let ws: Vec<(Proc, String)> = (0..3)
        .map(|i| start_worker(&format!("w{i}"), &[]))
        .collect();
    let http_at: Vec<String> = ws.iter().map(|(p, _)| http_addr(p)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cfg = RolloutConfig {
        workers: ws.iter().map(|(_, u)| u.clone()).collect(),
        weight_dtype: "float32".into(),
        connect_timeout_secs: 2.0,
        request_timeout_secs: 30.0,
        retry_backoff_secs: 0.1,
        ..RolloutConfig::default()
    };
    let c = rt.block_on(RolloutClient::connect(cfg)).unwrap();
    let tensors = perturbed();
    let mut ws = ws;
    // Version 1 down the chain w0 -> w1 -> w2; w1 is killed halfway through.
    let (report, killed) = rt.block_on(async {
        let mut push = c.begin_push(1).await.unwrap();
        for (name, t) in &tensors[..tensors.len() / 2] {
            push.send(name, t).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        ws[1].0.kill();
        let killed = Instant::now();
        for (name, t) in &tensors[tensors.len() / 2..] {
            push.send(name, t).await.unwrap();
        }
        (push.commit().await.unwrap(), killed)
    });
    let took = killed.elapsed();
    eprintln!("FAULT chain push committed {took:?} after the kill: {report:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(report.egress_copies, 1, "{report:?}");
    // w0 reconnected to w2 around the dead w1 and sent the update again from its start.
    assert_eq!(
        report.updated,
        vec![ws[0].1.clone(), ws[2].1.clone()],
        "{report:?}"
    );
    let failed: Vec<&str> = report.failed.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(failed, vec![ws[1].1.as_str()], "{report:?}");
    assert_eq!(health(&http_at[0])["weight_version"], 1);
    assert_eq!(health(&http_at[2])["weight_version"], 1, "w2 got version 1");
    assert_eq!(
        greedy(&http_at[0]),
        greedy(&http_at[2]),
        "the same weights serve"
    );
    // Version 2: the chain without the dead worker.
    let report = rt.block_on(async {
        let mut push = c.begin_push(2).await.unwrap();
        for (name, t) in &tensors {
            push.send(name, t).await.unwrap();
        }
        push.commit().await.unwrap()
    });
    assert_eq!(
        report.updated,
        vec![ws[0].1.clone(), ws[2].1.clone()],
        "{report:?}"
    );
    assert_eq!(report.egress_copies, 1);
    assert_eq!(health(&http_at[2])["weight_version"], 2);
    assert_eq!(
        greedy(&http_at[0]),
        greedy(&http_at[2]),
        "the same weights serve"
    );
}
