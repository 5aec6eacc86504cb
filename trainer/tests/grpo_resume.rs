//! Every rank of a GRPO run SIGKILLed in the middle of a round, then resumed from
//! `latest` with the same (surviving) rollout worker: the continued run equals the
//! uninterrupted one bit for bit on CPU. Compared: the logged loss, reward and grad norm
//! of every resumed step, and the final checkpoint's files (parameters, optimizer
//! moments and step counts of every rank's shard, the sampler position) byte for byte.
//! The weight version is the one exception, by design: the worker outlived the killed
//! run and serves a version that run pushed after its last checkpoint, so the resumed
//! run pushes the checkpoint's policy under a version above it (versions only rise);
//! the test checks exactly that offset.
mod e2e_support;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use e2e_support::*;

const STEPS: usize = 4;

fn config(dir: &Path, name: &str, worker: &str) -> String {
    let train = addition_rows(dir, "train.jsonl", 64, 4, false);
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model_name_or_path: {ckpt}\noutput_dir: {out}\ndataset:\n  path: {train}\n\
             num_generations: 8\nper_device_train_batch_size: 8\nmax_prompt_length: 32\n\
             max_completion_length: 12\nlearning_rate: 3.0e-4\nlr_scheduler_type: constant\n\
             reward_funcs: [accuracy]\nlogging_steps: 1\nseed: 3\nmax_steps: {STEPS}\n\
             save_steps: 2\nzero:\n  stage: 2\nrollout:\n  workers: [\"{worker}\"]\n  \
             request_timeout_secs: 60\n",
            ckpt = checkpoint().display(),
            out = dir.join(name).display(),
            train = train.display(),
        ),
    )
    .unwrap();
    p.display().to_string()
}

/// `(step, loss, reward, grad_norm)` of rank 0's tracing lines, as printed.
fn metrics(lines: &[String]) -> Vec<(u64, String, String, String)> {
    let value = |l: &str, key: &str| -> String {
        l.split(&format!(" {key}="))
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(|s| s.trim_end_matches("\u{1b}[0m").to_string())
            .unwrap_or_default()
    };
    lines
        .iter()
        .filter(|l| l.contains("trainer::grpo") && l.contains(" loss="))
        .map(|l| {
            (
                value(l, "step").parse().unwrap_or(0),
                value(l, "loss"),
                value(l, "reward"),
                value(l, "grad_norm"),
            )
        })
        .collect()
}

/// A number of a worker's /health answer (`weight_version`, `num_running_seqs`...).
fn health(http: &str, key: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.write_all(b"GET /health HTTP/1.0\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .find(|t| !t.is_empty())
        })
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {body:?}"))
}

fn served_version(http: &str) -> u64 {
    health(http, "weight_version")
}

/// The sequences a worker is running or holding.
fn busy(http: &str) -> u64 {
    health(http, "num_running_seqs") + health(http, "num_waiting_seqs")
}

fn http_addr(worker: &Proc) -> String {
    worker
        .output()
        .iter()
        .filter(|l| l.starts_with("serving "))
        .find_map(|l| l.split("http://").nth(1).map(|s| s.trim().to_string()))
        .unwrap()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn trainer_state(dir: &Path) -> serde_json::Value {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("rank0.json")).unwrap()).unwrap();
    meta["trainer_state"].clone()
}

#[test]
fn grpo_killed_mid_round_resumes_bit_for_bit() {
    let dir = tempdir("grpo-resume");
    let args = |cfg: String, extra: &[&str]| -> Vec<String> {
        let mut a = vec!["grpo".to_string(), "--config".into(), cfg];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // One group per batch: the worker's batches do not depend on the ranks' timing.
    let worker_args = ["--max-num-seqs", "8"];

    let (_ref_worker, ref_url) = start_worker("ref-worker", &worker_args);
    let mut reference = start_ranks(2, &args(config(&dir, "reference", &ref_url), &[]));
    for r in &mut reference {
        assert!(r.wait(Duration::from_secs(300)), "a reference rank failed");
    }
    let expected = metrics(&reference[0].output());
    assert_eq!(
        expected.len(),
        STEPS,
        "{}",
        reference[0].output().join("\n")
    );

    let (worker, url) = start_worker("worker", &worker_args);
    let http = http_addr(&worker);
    let cfg = config(&dir, "killed", &url);
    let mut killed = start_ranks(2, &args(cfg.clone(), &[]));
    // Step 3 is logged after its round; the ranks are then inside round 4 (its
    // rollouts or its training), past the checkpoint of step 2.
    killed[0].wait_line("step 3", Duration::from_secs(300), |l| {
        l.starts_with("step 3/")
    });
    for r in &mut killed {
        r.kill();
    }
    let ckpts = dir.join("killed/checkpoints");
    assert!(ckpts.join("step-00000002/manifest.json").exists());
    assert!(
        !ckpts.join("step-00000004").exists(),
        "killed before step 4's checkpoint"
    );
    let at_checkpoint = trainer_state(&ckpts.join("step-00000002"))["weight_version"]
        .as_u64()
        .unwrap();
    // What the killed run pushed after its checkpoint (step 3's policy at least).
    let served = served_version(&http);
    assert!(served > at_checkpoint, "{served} vs {at_checkpoint}");
    // The killed ranks' requests end with their connections; wait for an idle worker.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while busy(&http) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker stays busy"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut resumed = start_ranks(2, &args(cfg, &["--set", "resume_from_checkpoint=latest"]));
    for r in &mut resumed {
        assert!(r.wait(Duration::from_secs(300)), "a resumed rank failed");
    }
    let out = resumed[0].output();
    assert!(
        out.iter()
            .any(|l| l.contains("resumed from") && l.contains("step-00000002")),
        "{}",
        out.join("\n")
    );
    let got = metrics(&out);
    assert_eq!(got, expected[2..].to_vec(), "resumed steps 3-4 differ");

    // The final checkpoints: every shard (parameters, optimizer state) byte for byte.
    let (a, b) = (
        dir.join("reference/checkpoints/step-00000004"),
        ckpts.join("step-00000004"),
    );
    let (fa, fb) = (files(&a), files(&b));
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fa), names(&fb));
    let (sa, sb) = (trainer_state(&a), trainer_state(&b));
    assert_eq!(sa["sampler"], sb["sampler"], "sampler position");
    for ((name, x), (_, y)) in fa.iter().zip(&fb) {
        if name.ends_with(".json") {
            continue; // carry the trainer state, compared here
        }
        assert!(x == y, "{name} differs between the runs");
    }
    // Versions: the resumed run pushed the checkpoint's policy above what the worker
    // served, then one version per step, as the uninterrupted run did from its own base.
    let (va, vb) = (
        sa["weight_version"].as_u64().unwrap(),
        sb["weight_version"].as_u64().unwrap(),
    );
    assert_eq!(vb - va, served - at_checkpoint, "version offset");
    assert_eq!(
        served_version(&http),
        vb + 1,
        "the last step's policy is served"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
