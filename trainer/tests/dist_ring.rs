//! The CPU ring backend end to end over loopback: every collective in every dtype
//! for world sizes 1 to 4, as threads and as processes; killed, stalled and missing
//! ranks; ranks that disagree about the collective.
//!
//! Process tests re-run this test binary with `GRPO_TEST_CHILD` set, which turns
//! the `child_process` test into one rank of the scenario it names.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{check_all_collectives, free_port, ring_config, run_world};
use tch::{Device, Kind, Tensor};
use trainer::dist::{self, CommError, Communicator, ReduceOp, Rendezvous, RendezvousEnv};

#[test]
fn every_collective_is_exact_for_world_sizes_1_to_4_in_threads() {
    for world in 1..=4 {
        // A 24-byte chunk cuts segments into many pieces, some empty.
        for chunk in [24, 1 << 20] {
            let results = run_world(world, &ring_config(20, chunk), |comm| {
                check_all_collectives(comm, 30_011, Device::Cpu)
            });
            for (rank, r) in results.into_iter().enumerate() {
                let checked = r.unwrap_or_else(|e| panic!("world {world} chunk {chunk}: {e}"));
                assert_eq!(checked, (3 * 13 + 10) * 11 + 1, "rank {rank}");
            }
        }
    }
}

#[test]
fn the_single_rank_backend_passes_the_same_checks() {
    let cfg = trainer::dist::DistConfig::default();
    let mut comm = dist::connect(&cfg, &RendezvousEnv::single(), Device::Cpu).unwrap();
    assert_eq!(comm.backend(), "single");
    let checked = check_all_collectives(comm.as_mut(), 30_011, Device::Cpu).unwrap();
    assert_eq!(checked, (3 * 13 + 10) * 11 + 1);
}

#[test]
fn every_collective_is_exact_for_world_sizes_2_to_4_in_processes() {
    for world in 2..=4 {
        let port = free_port();
        let (tx, _rx) = mpsc::channel();
        let ranks: Vec<Rank> = (0..world)
            .map(|r| spawn_child("matrix", r, world, port, &[], &tx))
            .collect();
        for (rank, child) in ranks.into_iter().enumerate() {
            let out = child.finish(Duration::from_secs(300));
            assert!(
                out.success && out.text.contains("CHILD OK"),
                "world {world} rank {rank}:\n{}",
                out.text
            );
        }
    }
}

#[test]
fn a_killed_rank_makes_every_other_rank_fail_naming_it() {
    // Rank 0 also serves the rendezvous store, so killing it is a case of its own.
    for (world, victim) in [(4, 2), (3, 0)] {
        let port = free_port();
        let (tx, rx) = mpsc::channel();
        let mut ranks: Vec<Option<Rank>> = (0..world)
            .map(|r| Some(spawn_child("loop", r, world, port, &[], &tx)))
            .collect();
        wait_for_iterations(&rx, world, 2);
        // SIGKILL in the middle of the all-reduce loop.
        ranks[victim].take().unwrap().kill();
        for (rank, child) in ranks.into_iter().enumerate() {
            let Some(child) = child else { continue };
            let out = child.finish(Duration::from_secs(120));
            eprintln!(
                "world {world}, rank {victim} killed; rank {rank}:\n{}",
                out.text
            );
            assert!(!out.success, "rank {rank} must fail:\n{}", out.text);
            assert!(
                out.text.contains("CHILD ERROR: ")
                    && out.text.contains(&format!("rank {victim} failed")),
                "world {world}: rank {rank} must name rank {victim}:\n{}",
                out.text
            );
        }
    }
}

#[test]
fn a_stalled_rank_makes_the_others_fail_within_the_timeout_naming_it() {
    let (world, stalled) = (3, 1);
    let port = free_port();
    let (tx, _rx) = mpsc::channel();
    let mut ranks: Vec<Option<Rank>> = (0..world)
        .map(|r| {
            Some(spawn_child(
                "loop",
                r,
                world,
                port,
                &[("STALL_RANK", "1")],
                &tx,
            ))
        })
        .collect();
    let stalled_rank = ranks[stalled].take().unwrap();
    for (rank, child) in ranks.into_iter().enumerate() {
        let Some(child) = child else { continue };
        let out = child.finish(Duration::from_secs(120));
        eprintln!("rank {stalled} stalled; rank {rank}:\n{}", out.text);
        assert!(!out.success, "rank {rank} must fail:\n{}", out.text);
        assert!(
            out.text.contains(&format!("rank {stalled} failed")) && out.text.contains("stalled"),
            "rank {rank} must name the stalled rank {stalled}:\n{}",
            out.text
        );
    }
    stalled_rank.kill();
}

#[test]
fn rendezvous_names_the_ranks_that_never_arrive() {
    for (world, present, missing) in [
        (3, vec![0, 1], vec![2]),
        (3, vec![1, 2], vec![0]),
        (4, vec![0, 2], vec![1, 3]),
    ] {
        let port = free_port();
        let errors: Vec<CommError> = thread::scope(|s| {
            let handles: Vec<_> = present
                .iter()
                .map(|&r| {
                    s.spawn(move || {
                        let env = RendezvousEnv::loopback(r, world, port);
                        Rendezvous::join(&env, Duration::from_millis(1500))
                            .err()
                            .expect("must time out")
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in errors {
            match &e {
                CommError::RendezvousTimeout {
                    missing: got,
                    world_size,
                    ..
                } => {
                    assert_eq!((got, *world_size), (&missing, world), "{e}");
                    assert!(e.to_string().contains(&format!("ranks {missing:?}")), "{e}");
                }
                other => panic!("expected RendezvousTimeout, got {other}"),
            }
        }
    }
}

#[test]
fn ranks_calling_different_collectives_get_a_mismatch_not_a_hang() {
    let results = run_world(2, &ring_config(10, 1 << 20), |comm| {
        let mut x = Tensor::ones([10], (Kind::Float, Device::Cpu));
        let first = if comm.rank() == 0 {
            comm.all_reduce(&mut x, ReduceOp::Sum).err()
        } else {
            comm.all_gather(&x.narrow(0, 0, 5), 10).err()
        };
        let second = comm.barrier().err();
        (first, second)
    });
    for (rank, (first, second)) in results.into_iter().enumerate() {
        let peer = 1 - rank;
        match first {
            Some(CommError::Mismatch {
                peer: p, rank: r, ..
            }) => assert_eq!((p, r), (peer, rank)),
            other => panic!("rank {rank}: expected a mismatch, got {other:?}"),
        }
        assert!(
            matches!(second, Some(CommError::Poisoned(_))),
            "rank {rank}: {second:?}"
        );
    }
}

#[test]
fn bad_arguments_are_rejected_before_any_communication() {
    let results = run_world(2, &ring_config(10, 1 << 20), |comm| {
        let x = Tensor::ones([4], (Kind::Int64, Device::Cpu));
        let avg = comm.reduce_scatter(&x, ReduceOp::Avg).err();
        let wrong_shard = comm.all_gather(&x, 4).err();
        let mut y = Tensor::ones([4], (Kind::Int8, Device::Cpu));
        let dtype = comm.broadcast(&mut y, 0).err();
        let root = comm.broadcast(&mut y.to_kind(Kind::Float), 2).err();
        // Nothing was sent, so the ring is still usable.
        let mut z = Tensor::from_slice(&[comm.rank() as i64 + 1]);
        comm.all_reduce(&mut z, ReduceOp::Sum).unwrap();
        (avg, wrong_shard, dtype, root, z.int64_value(&[0]))
    });
    for (avg, wrong_shard, dtype, root, z) in results {
        for e in [avg, wrong_shard, dtype, root] {
            assert!(
                matches!(e, Some(CommError::InvalidArgument { .. })),
                "{e:?}"
            );
        }
        assert_eq!(z, 3);
    }
}

// ---------------------------------------------------------------------------
// Child processes.

/// One rank of a process scenario; a no-op in a normal test run.
#[test]
fn child_process() {
    let Ok(scenario) = std::env::var("GRPO_TEST_CHILD") else {
        return;
    };
    let env = RendezvousEnv::from_env().unwrap();
    let timeout = if scenario == "matrix" { 60 } else { 3 };
    let mut comm = dist::connect(&ring_config(timeout, 64 << 10), &env, Device::Cpu).unwrap();
    match scenario.as_str() {
        "matrix" => match check_all_collectives(comm.as_mut(), 100_003, Device::Cpu) {
            Ok(n) => println!("CHILD OK {n}"),
            Err(e) => {
                println!("CHILD ERROR: {e}");
                std::process::exit(3);
            }
        },
        "loop" => run_loop(comm.as_mut()),
        other => panic!("unknown scenario {other}"),
    }
}

/// All-reduces a 4 MiB tensor forever, printing each completed iteration; the
/// rank named by STALL_RANK stops calling after two iterations but stays alive.
fn run_loop(comm: &mut dyn Communicator) {
    let stall = std::env::var("STALL_RANK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let mut x = Tensor::ones([1 << 20], (Kind::Float, Device::Cpu));
    for iteration in 1.. {
        if let Err(e) = comm.all_reduce(&mut x, ReduceOp::Max) {
            println!("CHILD ERROR: {e}");
            std::process::exit(3);
        }
        println!("iteration {iteration}");
        if stall == Some(comm.rank()) && iteration == 2 {
            thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// A child process running one rank, with its output collected by two threads.
struct Rank {
    child: Child,
    readers: Vec<thread::JoinHandle<String>>,
}

struct Output {
    success: bool,
    text: String,
}

fn spawn_child(
    scenario: &str,
    rank: usize,
    world: usize,
    port: u16,
    extra: &[(&str, &str)],
    lines: &mpsc::Sender<(usize, String)>,
) -> Rank {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("GRPO_TEST_CHILD", scenario)
    .env("RANK", rank.to_string())
    .env("WORLD_SIZE", world.to_string())
    .env("MASTER_ADDR", "127.0.0.1")
    .env("MASTER_PORT", port.to_string())
    .env("OMP_NUM_THREADS", "1")
    .env_remove("TORCHELASTIC_USE_AGENT_STORE")
    .env_remove("GRPO_STORE_PORT")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
    let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
    let readers = [out, err]
        .into_iter()
        .map(|stream| {
            let lines = lines.clone();
            thread::spawn(move || {
                let mut text = String::new();
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = lines.send((rank, line.clone()));
                    text.push_str(&line);
                    text.push('\n');
                }
                text
            })
        })
        .collect();
    Rank { child, readers }
}

impl Rank {
    /// Waits for the child, killing it if it outlives `guard` (a hang guard, not a
    /// timing assertion: a killed child fails the test through its output).
    fn finish(mut self, guard: Duration) -> Output {
        let deadline = Instant::now() + guard;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let status = self.child.wait().unwrap();
        let text = self
            .readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect();
        Output {
            success: status.success(),
            text,
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until every rank has printed `iteration {n}`.
fn wait_for_iterations(lines: &mpsc::Receiver<(usize, String)>, world: usize, n: usize) {
    let mut done = vec![false; world];
    while !done.iter().all(|&d| d) {
        let (rank, line) = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("ranks must iterate");
        assert!(!line.starts_with("CHILD ERROR"), "rank {rank}: {line}");
        if line == format!("iteration {n}") {
            done[rank] = true;
        }
    }
}
