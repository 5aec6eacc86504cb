//! The `rollout-worker generate` command driven as a user drives it.
mod common;

use std::process::Command;

use common::fixture;

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

#[test]
fn serve_binds_the_given_addresses_and_answers_health() {
    use std::io::{BufRead, BufReader, Read, Write};
    let m = fixture("qwen2-tiny");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rollout-worker"))
        .args(["serve", "--model", m.to_str().unwrap(), "--device", "cpu"])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "serving qwen2-tiny on grpc://127.0.0.1:P and http://127.0.0.1:Q"
    let http = line.trim().rsplit("http://").next().unwrap().to_string();
    assert!(
        line.starts_with("serving qwen2-tiny on grpc://127.0.0.1:"),
        "{line}"
    );
    let mut s = std::net::TcpStream::connect(&http).unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"weight_version\":0"), "{resp}");
}

#[test]
fn serve_rejects_a_bad_config_naming_the_field() {
    let m = fixture("qwen2-tiny");
    let (ok, _, err) = run(&[
        "serve",
        "--model",
        m.to_str().unwrap(),
        "--max-num-seqs",
        "0",
    ]);
    assert!(!ok);
    assert!(err.contains("engine.max_num_seqs"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(
        &file,
        format!("model = {:?}\n[engine]\nmax_seq = 3\n", m.to_str().unwrap()),
    )
    .unwrap();
    let (ok, _, err) = run(&["serve", "--config", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("max_seq"), "{err}");
}
