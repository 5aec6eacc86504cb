//! DAPO's dynamic sampling through real processes (2 `trainer` ranks, 1 `rollout-worker`
//! on the demo checkpoint, addition prompts scored by accuracy): groups whose
//! completions all score the same are dropped, more prompts are drawn until every rank's
//! batch holds informative groups only, and the counts reach the metrics and the step
//! line. A run resumed from a checkpoint logs the uninterrupted run's later steps bit for
//! bit: the extra prompts consumed the sampler and the checkpoint recorded where it was.
//! Sampling at temperature 0.3 makes groups whose completions all agree common enough
//! that every run drops some.
mod e2e_support;

use std::time::Duration;

use e2e_support::*;

fn metric(out: &[String], name: &str) -> Vec<f64> {
    out.iter()
        .filter_map(|l| l.split(&format!(" {name}=")).nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `world` ranks, `prompts` prompts per rank and step.
fn run(
    world: usize,
    prompts: usize,
    dir: &std::path::Path,
    url: &str,
    extra: &str,
    set: &[&str],
) -> Vec<String> {
    let cfg = grpo_config(
        dir,
        &[url.to_string()],
        &format!(
            "per_device_train_batch_size: {}\nmax_steps: 4\ndynamic_sampling: true\n\
             max_num_gen_batches: 8\ntemperature: 0.3\n{extra}",
            8 * prompts
        ),
    );
    let mut args = vec!["grpo".to_string(), "--config".into(), cfg];
    for s in set {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let mut ranks = start_ranks(world, &args);
    for r in &mut ranks {
        assert!(r.wait(Duration::from_secs(300)), "a rank failed");
    }
    ranks[0].output()
}

#[test]
fn flat_groups_are_dropped_and_the_batch_filled() {
    let dir = tempdir("dynamic");
    let (_worker, url) = start_worker("worker", &["--max-num-seqs", "64"]);
    let out = run(2, 2, &dir, &url, "save_steps: 0\n", &[]);
    let steps = step_lines(&out);
    assert_eq!(steps.len(), 4, "{}", out.join("\n"));
    for l in &steps {
        assert_eq!(field(l, "groups"), Some(4.0), "2 ranks x 2 prompts: {l}");
        // A batch is padded only when the 8 rounds ran out.
        let padded = field(l, "padded").unwrap();
        assert!(padded == 0.0 || field(l, "gen rounds") == Some(8.0), "{l}");
    }
    // Every trained group has distinct rewards (padding is left out of the loss); the
    // flat ones were dropped and counted.
    assert!(metric(&out, "frac_reward_zero_std")
        .iter()
        .all(|&f| f == 0.0));
    let dropped = metric(&out, "dynamic_sampling/dropped_groups");
    let rounds = metric(&out, "dynamic_sampling/rounds");
    assert_eq!(dropped.len(), 4, "{}", out.join("\n"));
    assert!(
        dropped.iter().sum::<f64>() > 0.0 && rounds.iter().any(|&r| r > 1.0),
        "some groups were flat and more prompts drawn: dropped {dropped:?}, rounds {rounds:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_steps() {
    let dir = tempdir("dynamic-resume");
    let (_worker, url) = start_worker("worker", &["--max-num-seqs", "64"]);
    // One rank: two ranks' requests batch differently on the worker from run to run.
    let full = run(1, 4, &dir, &url, "save_steps: 2\n", &[]);
    let dropped = metric(&full, "dynamic_sampling/dropped_groups");
    assert!(
        dropped[..2].iter().sum::<f64>() > 0.0,
        "extra prompts were drawn before the checkpoint: {dropped:?}"
    );
    let ckpt = dir.join("out/checkpoints/step-00000002");
    assert!(ckpt.join("manifest.json").exists(), "{}", full.join("\n"));
    let resumed = run(
        1,
        4,
        &dir,
        &url,
        "save_steps: 0\n",
        &[&format!("resume_from_checkpoint={}", ckpt.display())],
    );
    for name in [
        "loss",
        "reward",
        "grad_norm",
        "dynamic_sampling/dropped_groups",
    ] {
        let (a, b) = (metric(&full, name), metric(&resumed, name));
        assert_eq!(a.len(), 4, "{name}: {}", full.join("\n"));
        assert_eq!(b, a[2..].to_vec(), "{name} of steps 3-4 after resuming");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
