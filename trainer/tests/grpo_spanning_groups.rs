//! Groups that span ranks (TRL's layout: the global batch `per_device_train_batch_size
//! × world × gradient_accumulation_steps` divisible by `num_generations`, each rank a
//! contiguous slice of the flattened completions), with real processes on 127.0.0.1:
//! `trainer` ranks over the CPU ring and one `rollout-worker` on the demo checkpoint.
//!
//! - 3 ranks × 2 completions with `num_generations: 3` (open-r1's shape in small: group 0
//!   on ranks 0 and 1, group 1 on ranks 1 and 2) trains, and every completion's tokens,
//!   reward and advantage equal those of one rank holding the whole batch (per-completion
//!   seeds by global index; rewards gathered before normalising), as do the step's loss
//!   and grad norm (so the per-completion losses agree in sum), with shared-prefix
//!   training off and on.
//! - With `max_staleness: 1`, `scale_rewards: batch` and `dr_grpo`, spanning groups train.
//! - A global batch `num_generations` does not divide is refused naming the numbers.
mod e2e_support;

use std::collections::BTreeMap;
use std::time::Duration;

use e2e_support::*;

/// Per global completion index: (reward, advantage, tokens), from every rank's debug lines.
type Completions = BTreeMap<usize, (f64, f64, String)>;

/// `world` ranks with the per-completion debug lines on.
fn ranks_with_completions(world: usize, args: &[String]) -> Vec<Proc> {
    start_ranks_with(
        world,
        args,
        "warn,trainer=info,trainer::grpo::completion=debug",
        &format!("w{world}-"),
    )
}

fn parse_completions(lines: &[String]) -> Completions {
    let mut out = Completions::new();
    for l in lines {
        let Some(rest) = l.split("completion ").nth(1) else {
            continue;
        };
        let Some((idx, rest)) = rest.split_once(" reward ") else {
            continue;
        };
        let (Some((reward, rest)), Ok(idx)) = (rest.split_once(" advantage "), idx.parse()) else {
            continue;
        };
        let (adv, tokens) = rest.split_once(" tokens ").expect("tokens");
        let prev = out.insert(
            idx,
            (
                reward.parse().unwrap(),
                adv.parse().unwrap(),
                tokens.trim().to_string(),
            ),
        );
        assert!(prev.is_none(), "completion {idx} logged twice");
    }
    out
}

/// The `key=value` metrics of rank 0's step log line (6 decimals).
fn metrics(lines: &[String]) -> BTreeMap<String, f64> {
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains(" loss=") && l.contains(" grad_norm="))
        .unwrap_or_else(|| panic!("no metrics line in:\n{}", lines.join("\n")));
    line.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Runs one step over `world` ranks with `per_device` completions each; returns rank
/// 0's step metrics and every completion.
fn one_step(
    dir: &std::path::Path,
    url: &str,
    world: usize,
    per_device: usize,
    shared: bool,
) -> (BTreeMap<String, f64>, Completions) {
    let cfg = grpo_config(
        dir,
        &[url.to_string()],
        &format!(
            "per_device_train_batch_size: {per_device}\nmax_steps: 1\nsave_steps: 0\n\
             shared_prefix_training: {shared}\nlogging_steps: 1\n"
        ),
    );
    let args = vec![
        "grpo".into(),
        "--config".into(),
        cfg,
        "--set".into(),
        "num_generations=3".into(),
    ];
    let mut ranks = ranks_with_completions(world, &args);
    let mut all = vec![];
    for r in &mut ranks {
        assert!(r.wait(Duration::from_secs(300)), "a rank failed");
        all.extend(r.output());
    }
    let out = ranks[0].output();
    let steps = step_lines(&out);
    assert_eq!(steps.len(), 1, "{}", out.join("\n"));
    let mut m = metrics(&out);
    m.insert("groups".into(), field(&steps[0], "groups").expect("groups"));
    (m, parse_completions(&all))
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn groups_spanning_three_ranks_match_one_rank_holding_them() {
    let dir = tempdir("spanning");
    let (_worker, url) = start_worker("worker", &["--max-num-seqs", "64"]);
    let (line1, one) = one_step(&dir, &url, 1, 6, false);
    assert_eq!(one.len(), 6, "{one:?}");
    assert_eq!(line1.get("groups"), Some(&2.0), "{line1:?}");
    for shared in [false, true] {
        let (line3, three) = one_step(&dir, &url, 3, 2, shared);
        assert_eq!(
            line3.get("groups"),
            Some(&2.0),
            "each group counted once: {line3:?}"
        );
        assert_eq!(three.len(), 6, "{three:?}");
        for (c, (r1, a1, t1)) in &one {
            let (r3, a3, t3) = &three[c];
            assert_eq!(
                t1, t3,
                "completion {c}: tokens differ (shared prefix {shared})"
            );
            assert_eq!(r1, r3, "completion {c}: reward");
            assert_eq!(
                a1.to_bits(),
                a3.to_bits(),
                "completion {c}: advantage {a1} vs {a3} (shared prefix {shared})"
            );
        }
        for key in [
            "loss",
            "grad_norm",
            "reward",
            "reward_std",
            "frac_reward_zero_std",
            "completions/mean_length",
        ] {
            let (a, b) = (line1[key], line3[key]);
            assert!(
                close(a, b, 1e-4),
                "{key}: 1 rank {a} vs 3 ranks {b} (shared prefix {shared})"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The other paths with spanning groups: rounds generated one version ahead
/// (`max_staleness: 1`, each share of a group with its own version), batch-scaled
/// advantages and Dr. GRPO's normalisation over 3 ranks train every step.
#[test]
fn spanning_groups_train_with_staleness_batch_scaling_and_dr_grpo() {
    let dir = tempdir("spanning-paths");
    let (_worker, url) = start_worker("worker", &["--max-num-seqs", "64"]);
    let cfg = grpo_config(
        &dir,
        &[url],
        "per_device_train_batch_size: 2\nmax_steps: 3\nsave_steps: 0\nmax_staleness: 1\n\
         scale_rewards: batch\nloss_type: dr_grpo\nnum_generations: 3\n",
    );
    let args = vec!["grpo".into(), "--config".into(), cfg];
    let mut ranks = ranks_with_completions(3, &args);
    let mut all = vec![];
    for r in &mut ranks {
        assert!(r.wait(Duration::from_secs(300)), "a rank failed");
        all.extend(r.output());
    }
    let out = ranks[0].output();
    let steps = step_lines(&out);
    assert_eq!(steps.len(), 3, "{}", out.join("\n"));
    for l in &steps {
        assert_eq!(field(l, "groups"), Some(2.0), "{l}");
    }
    // Every step logs all 6 completions once over the ranks.
    assert_eq!(count_completion_lines(&all), 3 * 6);
    let _ = std::fs::remove_dir_all(&dir);
}

fn count_completion_lines(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("completion ") && l.contains(" advantage "))
        .count()
}

#[test]
fn a_global_batch_num_generations_does_not_divide_is_refused_with_its_numbers() {
    let dir = tempdir("refused");
    // Nothing listens here: the ranks must stop at validation, before any connection.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let cfg = grpo_config(
        &dir,
        &[dead],
        "per_device_train_batch_size: 3\nmax_steps: 1\n",
    );
    let args = vec![
        "grpo".into(),
        "--config".into(),
        cfg,
        "--set".into(),
        "num_generations=4".into(),
    ];
    let mut ranks = ranks_with_completions(2, &args);
    for r in &mut ranks {
        assert!(
            !r.wait(Duration::from_secs(120)),
            "2 x 3 completions with 4 generations ran"
        );
        let text = r.output().join("\n");
        for want in [
            "per_device_train_batch_size (3) x world size (2) x gradient_accumulation_steps (1) = 6",
            "evenly divisible by num_generations (4)",
            "[2, 3, 6]",
        ] {
            assert!(text.contains(want), "expected {want:?} in:\n{text}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
