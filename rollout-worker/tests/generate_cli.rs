//! The `rollout-worker generate` command driven as a user drives it.
use std::path::PathBuf;
use std::process::Command;

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

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rollout-worker"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn greedy_generation_is_deterministic_and_seeded_sampling_reproducible() {
    let model = fixture("qwen2-tiny");
    let m = model.to_str().unwrap();
    let greedy = [
        "generate",
        "--model",
        m,
        "--prompt",
        "What is 2 + 3?",
        "--chat",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--max-new-tokens",
        "8",
    ];
    let (ok, a, err) = run(&greedy);
    assert!(ok, "{err}");
    let (_, b, _) = run(&greedy);
    let completion = |s: &str| {
        s.lines()
            .filter(|l| l.contains("completion"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        a.contains("completion (8 tokens") || a.contains("Stop"),
        "{a}"
    );
    assert_eq!(completion(&a), completion(&b));

    let sampled = [
        "generate",
        "--model",
        m,
        "--prompt",
        "hello",
        "--n",
        "3",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
    ];
    let (ok, x, err) = run(&sampled);
    assert!(ok, "{err}");
    let (_, y, _) = run(&sampled);
    assert_eq!(completion(&x), completion(&y));
    assert_eq!(x.lines().filter(|l| l.contains("completion")).count(), 3);
}

#[test]
fn bad_model_directory_is_a_clear_error() {
    let (ok, _, err) = run(&[
        "generate",
        "--model",
        "/nonexistent/dir",
        "--prompt",
        "x",
        "--device",
        "cpu",
    ]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/dir"), "{err}");
    let m = fixture("qwen2-tiny");
    let (ok, _, err) = run(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert!(!ok);
    assert!(err.contains("top_p"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
