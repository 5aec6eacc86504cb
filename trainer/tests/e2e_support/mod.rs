//! Helpers of the end-to-end tests: real `trainer` ranks and `rollout-worker` processes
//! on 127.0.0.1, the shipped demo checkpoint, and generated addition data.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn checkpoint() -> PathBuf {
    root().join("demo/checkpoint")
}

pub fn trainer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trainer"))
}

/// The worker binary sits next to the trainer's (`cargo test --workspace` builds both).
pub fn worker_bin() -> PathBuf {
    let p = trainer_bin().with_file_name("rollout-worker");
    assert!(
        p.exists(),
        "{} missing: build it with `cargo build -p rollout-worker` (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `n` addition prompts (a, b in 10..99, from `seed`) as GRPO rows, and returns
/// the path. With `sft`, rows carry a correct completion instead of a solution.
pub fn addition_rows(dir: &Path, name: &str, n: usize, seed: u64, sft: bool) -> PathBuf {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        10 + (x % 90) as i64
    };
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..n {
        let (a, b) = (next(), next());
        let prompt = format!("What is {a}+{b}?");
        let row = if sft {
            let (da, db) = (a % 10, b % 10);
            serde_json::json!({
                "prompt": prompt,
                "completion": format!("<think>{da}+{db}={}</think><answer>{}</answer>", da + db, a + b),
            })
        } else {
            serde_json::json!({ "prompt": prompt, "solution": (a + b).to_string() })
        };
        writeln!(f, "{row}").unwrap();
    }
    path
}

/// A child process whose output lines are collected (and echoed with a prefix).
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command, tag: &str) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{tag}: spawn: {e}"));
        let lines = Arc::new(Mutex::new(vec![]));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (lines, tag) = (lines.clone(), tag.to_string());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{tag}] {line}");
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Proc { child, lines }
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a line satisfies `f` (returns it) or the deadline passes (panics).
    pub fn wait_line(&mut self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.output().into_iter().find(|l| f(l)) {
                return l;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                if let Some(l) = self.output().into_iter().find(|l| f(l)) {
                    return l;
                }
                panic!(
                    "exited ({status}) before {what}:\n{}",
                    self.output().join("\n")
                );
            }
            assert!(start.elapsed() < timeout, "no {what} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for exit within `timeout` (killing it after) and returns whether it succeeded.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                return status.success();
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "still running after {timeout:?}:\n{}",
                    self.output().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rollout worker on the demo checkpoint; returns it with its gRPC URL.
pub fn start_worker(tag: &str, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(worker_bin());
    cmd.env("OMP_NUM_THREADS", "1")
        .arg("serve")
        .arg("--model")
        .arg(checkpoint())
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(extra);
    let mut p = Proc::spawn(cmd, tag);
    let line = p.wait_line("the serving line", Duration::from_secs(120), |l| {
        l.starts_with("serving ")
    });
    let addr = line
        .split("grpc://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (p, format!("http://{addr}"))
}

/// Starts `world` trainer ranks with torchrun's environment.
pub fn start_ranks(world: usize, args: &[String]) -> Vec<Proc> {
    start_ranks_with(world, args, "warn,trainer=info", "")
}

/// [`start_ranks`] with its own `RUST_LOG` and a prefix for the ranks' log names.
pub fn start_ranks_with(world: usize, args: &[String], rust_log: &str, label: &str) -> Vec<Proc> {
    let port = free_port();
    (0..world)
        .map(|rank| {
            let mut cmd = Command::new(trainer_bin());
            cmd.args(args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("OMP_NUM_THREADS", "1")
                .env("RUST_LOG", rust_log);
            Proc::spawn(cmd, &format!("{label}rank{rank}"))
        })
        .collect()
}

/// The value after `key ` in a progress line, e.g. `field(l, "reward")`.
pub fn field(line: &str, key: &str) -> Option<f64> {
    line.split(" | ").find_map(|part| {
        let rest = part.trim().strip_prefix(key)?.trim_start();
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The `key=value` entries of the last tracing line containing `marker`.
pub fn step_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("step "))
        .cloned()
        .collect()
}

pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("grpo-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `body` as `dir/name`; returns the path.
pub fn write_config(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// The demo GRPO recipe (addition prompts, accuracy reward, ZeRO-2) for `workers`,
/// followed by the `extra` YAML lines; returns its path.
pub fn grpo_config(dir: &Path, workers: &[String], extra: &str) -> String {
    let train = addition_rows(dir, "train.jsonl", 256, 1, false);
    let quoted: Vec<String> = workers.iter().map(|w| format!("\"{w}\"")).collect();
    write_config(
        dir,
        "grpo.yaml",
        &format!(
            "model_name_or_path: {ckpt}\noutput_dir: {out}\ndataset:\n  path: {train}\n\
             num_generations: 8\nmax_prompt_length: 32\nmax_completion_length: 16\n\
             learning_rate: 3.0e-4\nlr_scheduler_type: constant\nadam_beta2: 0.99\n\
             reward_funcs: [accuracy]\nlogging_steps: 1\nseed: 0\nzero:\n  stage: 2\n\
             rollout:\n  workers: [{workers}]\n  request_timeout_secs: 60\n{extra}",
            ckpt = checkpoint().display(),
            out = dir.join("out").display(),
            train = train.display(),
            workers = quoted.join(", "),
        ),
    )
}
