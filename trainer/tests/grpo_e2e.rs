//! GRPO and SFT end to end with real processes on 127.0.0.1: `trainer` ranks (torchrun's
//! environment, CPU ring) and `rollout-worker` processes serving the shipped demo
//! checkpoint, on generated two-digit addition prompts.
//!
//! - 2 ranks + 1 worker: the reward rises within a dozen steps and held-out accuracy
//!   after training beats before.
//! - A worker SIGKILLed while it is generating: the step still completes with every
//!   group (the client re-sends the dead worker's groups to the other one).
//! - SFT killed after a checkpoint and resumed gives the uninterrupted run's losses
//!   bit for bit.
//! - `max_staleness` 0 reproduces bit for bit; 1 overlaps generation with training,
//!   trains on one-version-old groups and still learns.
//! - Bad configuration and bad dataset rows fail with errors naming what is wrong.
mod e2e_support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use e2e_support::*;

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn reward_rises_with_two_ranks_and_one_worker() {
    let dir = tempdir("rises");
    let heldout = addition_rows(&dir, "heldout.jsonl", 64, 2, false);
    let (_worker, url) = start_worker("worker", &["--max-num-seqs", "128"]);
    let cfg = grpo_config(
        &dir,
        &[url],
        &format!(
            "per_device_train_batch_size: 32\nmax_steps: 12\nsave_steps: 6\n\
             eval_num_generations: 4\neval_dataset:\n  path: {}\n",
            heldout.display()
        ),
    );
    let mut ranks = start_ranks(2, &["grpo".into(), "--config".into(), cfg]);
    for r in &mut ranks {
        assert!(r.wait(Duration::from_secs(600)), "a rank failed");
    }
    let out = ranks[0].output();
    let steps = step_lines(&out);
    assert_eq!(steps.len(), 12, "{}", out.join("\n"));
    let rewards: Vec<f64> = steps.iter().map(|l| field(l, "reward").unwrap()).collect();
    for l in &steps {
        assert_eq!(field(l, "groups"), Some(8.0), "2 ranks x 4 prompts: {l}");
    }
    let (early, late) = (mean(&rewards[..4]), mean(&rewards[8..]));
    assert!(late > early + 0.1, "reward did not rise: {rewards:?}");

    let evals: Vec<&String> = out
        .iter()
        .filter(|l| l.starts_with("eval before") || l.starts_with("eval after"))
        .collect();
    assert_eq!(evals.len(), 2, "{}", out.join("\n"));
    let sampled = |l: &str| -> f64 {
        l.split("sampled (T=1, n=4) ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no sampled accuracy in {l:?}"))
    };
    let (before, after) = (sampled(evals[0]), sampled(evals[1]));
    assert!(
        after > before + 0.1,
        "held-out accuracy {before} -> {after}"
    );

    let out_dir = dir.join("out");
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(out_dir.join(f).exists(), "final model lacks {f}");
    }
    for s in ["step-00000006", "step-00000012"] {
        assert!(out_dir
            .join("checkpoints")
            .join(s)
            .join("manifest.json")
            .exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The other paths of the loop at once: a reference model (beta > 0) sharded with
/// ZeRO-3 on the ranks' shared connection, batches reused (num_iterations = 2, with old
/// log-probs), batch-scaled advantages (an all-reduce), truncated completions masked,
/// gradient accumulation, another loss type.
#[test]
fn reference_model_reused_batches_and_batch_scaling_run() {
    let dir = tempdir("paths");
    let (_worker, url) = start_worker("worker", &["--max-num-seqs", "128"]);
    let cfg = grpo_config(
        &dir,
        &[url],
        "per_device_train_batch_size: 8\ngradient_accumulation_steps: 2\nmax_steps: 4\n\
         num_iterations: 2\nbeta: 0.04\nloss_type: grpo\nscale_rewards: batch\n\
         mask_truncated_completions: true\nsave_steps: 0\n",
    );
    let mut ranks = start_ranks(
        2,
        &[
            "grpo".into(),
            "--config".into(),
            cfg,
            "--set".into(),
            "zero.stage=3".into(),
            "--set".into(),
            "max_completion_length=13".into(),
        ],
    );
    for r in &mut ranks {
        assert!(r.wait(Duration::from_secs(600)), "a rank failed");
    }
    let out = ranks[0].output();
    let steps = step_lines(&out);
    // One line per round of num_iterations = 2 optimizer steps.
    assert_eq!(steps.len(), 2, "{}", out.join("\n"));
    assert!(steps[1].starts_with("step 4/4"), "{}", steps[1]);
    let metric = |name: &str| -> Vec<f64> {
        out.iter()
            .filter_map(|l| l.split(&format!(" {name}=")).nth(1))
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect()
    };
    // The first round runs on the initial policy (KL 0); the second has moved away.
    let kl = metric("kl");
    assert_eq!(kl.len(), 2, "{}", out.join("\n"));
    assert!(kl[1] > 0.0, "kl {kl:?}");
    let clipped = metric("completions/clipped_ratio");
    assert!(
        clipped.iter().any(|&c| c > 0.0),
        "some completions hit 13 tokens: {clipped:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `max_staleness`: 0 is the sequential round and reproducible bit for bit (two runs
/// with the same seed log the same losses and rewards); 1 generates the next round
/// while this one trains, every group after the first round is one version old (the
/// staleness metrics say so), none is dropped, and the demo task still learns.
#[test]
fn max_staleness_zero_reproduces_and_one_overlaps_and_learns() {
    let run = |tag: &str, k: usize| -> Vec<String> {
        let dir = tempdir(tag);
        let (_worker, url) = start_worker("worker", &["--max-num-seqs", "128"]);
        let cfg = grpo_config(
            &dir,
            &[url],
            &format!("per_device_train_batch_size: 32\nmax_steps: 12\nsave_steps: 0\nmax_staleness: {k}\n"),
        );
        let mut ranks = start_ranks(1, &["grpo".into(), "--config".into(), cfg]);
        assert!(ranks[0].wait(Duration::from_secs(600)), "the rank failed");
        let out = ranks[0].output();
        let _ = std::fs::remove_dir_all(&dir);
        out
    };
    let metric = |out: &[String], name: &str| -> Vec<f64> {
        out.iter()
            .filter_map(|l| l.split(&format!(" {name}=")).nth(1))
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect()
    };
    let a = run("k0a", 0);
    let b = run("k0b", 0);
    for name in ["loss", "reward", "grad_norm", "completions/mean_length"] {
        let (x, y) = (metric(&a, name), metric(&b, name));
        assert_eq!(x.len(), 12, "{name}: {}", a.join("\n"));
        assert_eq!(x, y, "{name} differs between two runs with max_staleness 0");
    }
    let c = run("k1", 1);
    let steps = step_lines(&c);
    assert_eq!(steps.len(), 12, "{}", c.join("\n"));
    let stale = metric(&c, "staleness/mean");
    assert_eq!(stale.len(), 12);
    assert_eq!(stale[0], 0.0, "the first round is generated on-policy");
    assert!(
        stale[1..].iter().all(|&s| s == 1.0),
        "one version old: {stale:?}"
    );
    assert!(metric(&c, "groups/stale_dropped").iter().all(|&d| d == 0.0));
    let rewards = metric(&c, "reward");
    let (early, late) = (mean(&rewards[..4]), mean(&rewards[8..]));
    assert!(
        late > early + 0.1,
        "reward did not rise with max_staleness 1: {rewards:?}"
    );
    // The time the rank waited for rollouts is reported every step.
    let wait = metric(&c, "time/rollout_wait");
    assert_eq!(wait.len(), 12);
}

/// `vllm:num_requests_running` of a worker's HTTP endpoint.
fn running(http: &str) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(http) else {
        return 0.0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find(|l| l.starts_with("vllm:num_requests_running"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_worker_killed_mid_step_loses_no_group() {
    let dir = tempdir("kill");
    let (_fast, fast_url) = start_worker("fast", &["--max-num-seqs", "128"]);
    // One sequence at a time: this worker is busy for most of every generation phase.
    let (mut slow, slow_url) = start_worker("slow", &["--max-num-seqs", "1"]);
    let slow_http = slow
        .output()
        .iter()
        .filter(|l| l.starts_with("serving "))
        .find_map(|l| l.split("http://").nth(1).map(|s| s.trim().to_string()))
        .unwrap();
    let cfg = grpo_config(
        &dir,
        &[fast_url, slow_url],
        "per_device_train_batch_size: 64\nmax_steps: 5\nsave_steps: 0\n",
    );
    // Requests of one prompt, so the slow worker always holds some of every step's work.
    let mut ranks = start_ranks(
        1,
        &[
            "grpo".into(),
            "--config".into(),
            cfg,
            "--set".into(),
            "rollout.max_prompts_per_request=1".into(),
        ],
    );
    ranks[0].wait_line("step 1", Duration::from_secs(300), |l| {
        l.starts_with("step 1/")
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while running(&slow_http) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow worker never got work"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    slow.kill();
    assert!(
        ranks[0].wait(Duration::from_secs(600)),
        "the trainer failed"
    );
    let out = ranks[0].output();
    let steps = step_lines(&out);
    assert_eq!(steps.len(), 5, "{}", out.join("\n"));
    for l in &steps {
        assert_eq!(
            field(l, "groups"),
            Some(8.0),
            "every group of every step: {l}"
        );
    }
    let failed = out
        .iter()
        .find(|l| l.contains("rollout worker failed; re-sending its groups"))
        .unwrap_or_else(|| panic!("the kill was not noticed:\n{}", out.join("\n")));
    let requeued: u64 = failed
        .split("requeued=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(
        requeued >= 1,
        "killed mid-request, so groups were re-sent: {failed}"
    );
    assert!(
        steps.last().unwrap().contains("workers 1/2"),
        "{}",
        steps.last().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `(step, loss, grad_norm)` of the `sft` tracing lines, at full precision.
fn sft_losses(lines: &[String]) -> Vec<(u64, String, String)> {
    let value = |l: &str, key: &str| -> String {
        l.split(&format!("{key}="))
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(|s| s.trim_end_matches("\u{1b}[0m").to_string())
            .unwrap_or_default()
    };
    lines
        .iter()
        .filter(|l| l.contains("trainer::sft") && l.contains("loss="))
        .map(|l| {
            (
                value(l, "step").parse().unwrap(),
                value(l, "loss"),
                value(l, "grad_norm"),
            )
        })
        .collect()
}

#[test]
fn sft_killed_after_a_checkpoint_resumes_with_identical_losses() {
    let dir = tempdir("resume");
    let data = addition_rows(&dir, "sft.jsonl", 512, 3, true);
    let run = |out: &str, extra: &[&str]| -> Vec<Proc> {
        let cfg = write_config(
            &dir,
            &format!("{out}.yaml"),
            &format!(
                "model_name_or_path: {}\noutput_dir: {}\ndataset:\n  path: {}\n\
                 per_device_train_batch_size: 8\nlearning_rate: 1.0e-3\nmax_steps: 8\n\
                 save_steps: 4\nlogging_steps: 1\nmax_length: 64\nseed: 5\nzero:\n  stage: 3\n",
                checkpoint().display(),
                dir.join(out).display(),
                data.display()
            ),
        );
        let mut args = vec!["sft".to_string(), "--config".into(), cfg];
        args.extend(extra.iter().map(|s| s.to_string()));
        start_ranks(2, &args)
    };
    let mut reference = run("reference", &[]);
    for r in &mut reference {
        assert!(r.wait(Duration::from_secs(600)));
    }
    let expected = sft_losses(&reference[0].output());
    assert_eq!(expected.len(), 8);

    let mut killed = run("killed", &[]);
    killed[0].wait_line("step 6", Duration::from_secs(600), |l| {
        l.starts_with("sft step 6/")
    });
    for r in &mut killed {
        r.kill();
    }
    let ckpt = dir.join("killed/checkpoints");
    assert!(ckpt.join("step-00000004/manifest.json").exists());
    assert!(
        !ckpt.join("step-00000008").exists(),
        "killed before the end"
    );

    let mut resumed = run("killed", &["--set", "resume_from_checkpoint=latest"]);
    for r in &mut resumed {
        assert!(r.wait(Duration::from_secs(600)));
    }
    let got = sft_losses(&resumed[0].output());
    assert_eq!(got.len(), 4, "steps 5-8 after resuming at 4");
    assert_eq!(got, expected[4..].to_vec(), "resumed losses differ");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs one rank to completion; returns (success, all output).
fn run_once(args: &[&str]) -> (bool, String) {
    let out = Command::new(trainer_bin())
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn bad_configuration_and_rows_give_clear_errors() {
    let dir = tempdir("bad");
    // Nothing listens here: runs that get past validation fail on the workers instead.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let cfg = grpo_config(
        &dir,
        &[dead],
        "per_device_train_batch_size: 16\nmax_steps: 2\n",
    );
    let check = |sets: &[&str], want: &[&str]| {
        let mut args = vec!["grpo", "--config", cfg.as_str()];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (ok, text) = run_once(&args);
        assert!(!ok, "{sets:?} should fail");
        for w in want {
            assert!(text.contains(w), "{sets:?}: expected {w:?} in:\n{text}");
        }
    };
    check(
        &["lerning_rate=0.1"],
        &["unknown field `lerning_rate`", "learning_rate"],
    );
    check(
        &["num_generations=1"],
        &["num_generations must be at least 2"],
    );
    check(
        &["per_device_train_batch_size=12"],
        &[
            "per_device_train_batch_size (12) x world size (1) x gradient_accumulation_steps (1) = 12",
            "evenly divisible by num_generations (8)",
        ],
    );
    check(&["loss_type=ppo"], &["loss_type", "ppo"]);
    check(&["zero.stage=4"], &["stage", "4"]);
    check(&["reward_funcs=[\"acuracy\"]"], &["acuracy"]);
    check(&["temperature=0"], &["temperature"]);

    // Rows: 3 of 10 lack the prompt column.
    let rows = dir.join("rows.jsonl");
    let mut f = std::fs::File::create(&rows).unwrap();
    for i in 0..10 {
        if i % 3 == 1 {
            writeln!(
                f,
                "{{\"question\": \"What is 1+{i}?\", \"solution\": \"{}\"}}",
                1 + i
            )
            .unwrap();
        } else {
            writeln!(
                f,
                "{{\"prompt\": \"What is 1+{i}?\", \"solution\": \"{}\"}}",
                1 + i
            )
            .unwrap();
        }
    }
    drop(f);
    let path = format!("dataset.path={}", rows.display());
    check(&[&path], &["missing_column", "row 1", "3"]);
    check(&[&path, "max_prompt_length=4"], &["prompt_too_long"]);
    // Tolerated at 50%: the run gets past the data to the (absent) workers.
    check(
        &[&path, "dataset.max_unusable_fraction=0.5"],
        &["7 usable, 3 unusable", "rollout"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
