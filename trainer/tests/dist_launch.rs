//! The trainer binary's rendezvous under the real launchers: PyTorch's `torchrun`
//! (installed by scripts/setup.sh) and `scripts/launch`, plus the launcher's own
//! contract: environment, rank-prefixed output, failure propagation, signals.

mod common;

use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{free_port, free_port_pair};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn trainer() -> &'static str {
    env!("CARGO_BIN_EXE_trainer")
}

fn launch() -> Command {
    let mut cmd = Command::new(repo().join("scripts/launch"));
    cmd.env_remove("OMP_NUM_THREADS")
        .env_remove("GRPO_STORE_PORT")
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
    cmd
}

/// Runs `cmd` to completion, killing it after `guard` (a hang guard only).
fn run(mut cmd: Command, guard: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + guard;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn trainer_rendezvous_works_under_real_torchrun() {
    let torchrun = repo().join(".venv/bin/torchrun");
    assert!(
        torchrun.exists(),
        "{} missing: run scripts/setup.sh",
        torchrun.display()
    );
    // torchrun's agent store takes the port; the trainer's store the one above it.
    let port = free_port_pair();
    let mut cmd = Command::new(torchrun);
    cmd.args(["--no-python", "--nproc-per-node", "2", "--master-port"])
        .arg(port.to_string())
        .arg(trainer())
        .args(["dist-check", "--timeout-secs", "60", "--numel", "10007"])
        .env_remove("GRPO_STORE_PORT")
        .env_remove("OMP_NUM_THREADS");
    let out = run(cmd, Duration::from_secs(300));
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    for rank in 0..2 {
        // torchrun sets OMP_NUM_THREADS=1, which the trainer honours.
        let line = format!(
            "rank {rank}/2 (local {rank}/2, restart 0): dist-check ok: backend ring, 1 intra-op threads, 10007 elements"
        );
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn trainer_rendezvous_works_under_scripts_launch() {
    let mut cmd = launch();
    cmd.args(["--nproc-per-node", "3", "--master-port"])
        .arg(free_port().to_string())
        .arg("--")
        .arg(trainer())
        .args(["dist-check", "--timeout-secs", "60", "--num-threads", "1"]);
    let out = run(cmd, Duration::from_secs(300));
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    for rank in 0..3 {
        let line = format!(
            "[rank{rank}]: rank {rank}/3 (local {rank}/3, restart 0): dist-check ok: backend ring, 1 intra-op threads, 100003 elements"
        );
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn trainer_names_the_rank_that_never_arrives() {
    let mut cmd = Command::new(trainer());
    cmd.args(["dist-check", "--timeout-secs", "1"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .env_remove("TORCHELASTIC_USE_AGENT_STORE")
        .env_remove("GRPO_STORE_PORT");
    let out = run(cmd, Duration::from_secs(120));
    let text = text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("rendezvous: ranks [1] of world size 2 did not arrive within 1s"),
        "{text}"
    );
}

#[test]
fn launch_gives_each_rank_the_torchrun_environment() {
    let mut cmd = launch();
    // Several nodes share a job secret given by the operator (without one the launcher
    // warns on stderr).
    cmd.env("GRPO_JOB_SECRET", "a-shared-test-secret")
        .args(["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1"])
        .args(["--master-addr", "10.1.2.3", "--master-port", "4242", "--"])
        .args(["sh", "-c", "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK $ROLE_RANK $MASTER_ADDR $MASTER_PORT ${OMP_NUM_THREADS:+omp}; echo to-stderr >&2"]);
    let out = run(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out));
    let mut stdout: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    stdout.sort();
    assert_eq!(
        stdout,
        vec![
            "[rank2]: 2 4 0 2 1 2 10.1.2.3 4242 omp",
            "[rank3]: 3 4 1 2 1 3 10.1.2.3 4242 omp",
        ]
    );
    let mut stderr: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(String::from)
        .collect();
    stderr.sort();
    assert_eq!(stderr, vec!["[rank2]: to-stderr", "[rank3]: to-stderr"]);
}

#[test]
fn launch_stops_the_other_ranks_and_fails_when_one_rank_fails() {
    let dir = std::env::temp_dir().join(format!("grpo-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = launch();
    cmd.args(["--nproc-per-node", "3", "--grace-secs", "5", "--"])
        .args(["sh", "-c", "echo $$ > \"$PIDS/$RANK\"; if [ \"$RANK\" = 1 ]; then sleep 1; exit 7; fi; exec sleep 600"])
        .env("PIDS", &dir);
    let out = run(cmd, Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("launch: rank 1 failed (exit code 7); stopping the others"));
    for rank in [0, 2] {
        let pid = std::fs::read_to_string(dir.join(rank.to_string())).unwrap();
        let alive = Command::new("kill")
            .args(["-0", pid.trim()])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(!alive, "rank {rank} (pid {}) still running", pid.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Spawns `cmd` and reads its stdout until `ranks` lines ended in "ready".
fn spawn_until_ready(mut cmd: Command, ranks: usize) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ready = 0;
    while ready < ranks {
        let line = lines.next().expect("launcher output ended").unwrap();
        ready += usize::from(line.ends_with("ready"));
    }
    (child, lines)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn launch_forwards_sigterm_to_every_rank() {
    let mut cmd = launch();
    // A Python rank, not `sh -c 'trap ...'`: dash 0.5.12 loses a trapped SIGTERM that
    // lands while it waits for a foreground child (about 1 run in 5 under load hung).
    cmd.args(["--nproc-per-node", "2", "--"])
        .args([
            "python3",
            "-c",
            "import signal, sys, time\n\
             signal.signal(signal.SIGTERM, lambda *_: (print('got TERM', flush=True), sys.exit(0)))\n\
             print('ready', flush=True)\n\
             while True: time.sleep(0.05)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, lines) = spawn_until_ready(cmd, 2);
    sigterm(&child);
    let mut rest: Vec<String> = lines.map_while(Result::ok).collect();
    rest.sort();
    assert_eq!(rest, vec!["[rank0]: got TERM", "[rank1]: got TERM"]);
    // Interrupted runs exit like a process killed by the signal: 128 + 15.
    assert_eq!(child.wait().unwrap().code(), Some(143));
}

/// A rank that ignores SIGTERM: the launcher SIGKILLs it `--signal-grace-secs` after the
/// forwarded signal (without the flag it would wait; a second signal kills at once).
#[test]
fn launch_kills_a_rank_that_ignores_sigterm_after_the_signal_grace() {
    for second_signal in [false, true] {
        let mut cmd = launch();
        cmd.args(["--nproc-per-node", "2"]);
        if !second_signal {
            cmd.args(["--signal-grace-secs", "0.5"]);
        }
        cmd.args([
            "--",
            "python3",
            "-c",
            "import signal, time\n\
             signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
             print('ready', flush=True)\n\
             while True: time.sleep(0.05)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let (mut child, _lines) = spawn_until_ready(cmd, 2);
        sigterm(&child);
        if second_signal {
            thread::sleep(Duration::from_millis(300));
            sigterm(&child);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let code = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.code();
            }
            assert!(
                Instant::now() < deadline,
                "launcher still waiting for its ranks"
            );
            thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(code, Some(143), "second signal: {second_signal}");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        let expected = if second_signal {
            "launch: second signal; sending SIGKILL to every rank"
        } else {
            "launch: ranks still running --signal-grace-secs after the signal; sending SIGKILL"
        };
        assert!(err.contains(expected), "{err}");
    }
}
