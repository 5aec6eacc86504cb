//! The job secret on real rendezvous and rings over loopback: ranks with the same secret
//! form a ring; a rank with another secret (or none) is refused with a message naming
//! the job secret; a process that connects to a rank's ring port posing as its
//! predecessor, without the secret, is dropped and the real ring still forms. (The
//! test itself holds the secret to find the ring port in the store; the impostor's
//! hello carries a forged MAC.)
mod common;

use std::io::Write;
use std::time::Duration;

use common::{free_port, ring_config};
use tch::Tensor;
use trainer::dist::store::StoreClient;
use trainer::dist::{self, JobSecret, ReduceOp, RendezvousEnv};

fn env(rank: usize, port: u16, secret: &str) -> RendezvousEnv {
    let mut e = RendezvousEnv::loopback(rank, 2, port);
    e.job_secret = JobSecret::new(secret);
    e
}

/// All-reduces `[rank + 1]` and returns the sum.
fn sum_ranks(env: &RendezvousEnv) -> Result<f64, String> {
    let mut comm = dist::connect(&ring_config(10, 1 << 16), env, tch::Device::Cpu)
        .map_err(|e| e.to_string())?;
    let mut t = Tensor::from_slice(&[env.rank as f32 + 1.0]);
    comm.all_reduce(&mut t, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    Ok(t.double_value(&[0]))
}

#[test]
fn a_rank_with_another_secret_cannot_join() {
    let port = free_port();
    let (r0, r1) = std::thread::scope(|s| {
        let a = s.spawn(|| sum_ranks(&env(0, port, "job-a")));
        let b = s.spawn(|| sum_ranks(&env(1, port, "job-b")));
        (a.join().unwrap(), b.join().unwrap())
    });
    let e1 = r1.unwrap_err();
    assert!(e1.contains("job secret"), "{e1}");
    // Rank 0 never saw rank 1 arrive.
    let e0 = r0.unwrap_err();
    assert!(e0.contains("[1]"), "{e0}");

    // The same secret works.
    let port = free_port();
    let sums = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| s.spawn(move || sum_ranks(&env(r, port, "job-a"))))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(sums, [3.0, 3.0]);
}

#[test]
fn an_impostor_predecessor_without_the_secret_is_dropped() {
    let port = free_port();
    let secret = "job-secret";
    let sums = std::thread::scope(|s| {
        let r0 = s.spawn(|| sum_ranks(&env(0, port, secret)));
        // Find rank 0's ring address (the test may read the store: it has the secret),
        // then connect first and send rank 1's hello with a forged MAC.
        let store = StoreClient::connect(
            "127.0.0.1",
            port,
            Duration::from_secs(10),
            &JobSecret::new(secret),
        )
        .unwrap();
        // Registering rank 1's arrival lets rank 0 publish its ring address before
        // the real rank 1 starts, so the impostor is first in rank 0's accept queue.
        store.set("rank/1", b"").unwrap();
        let published = store.get("ring/0", Duration::from_secs(10)).unwrap();
        let addr = String::from_utf8_lossy(&published[32..]).to_string();
        let mut impostor = std::net::TcpStream::connect(&addr).unwrap();
        let mut hello = vec![];
        hello.extend_from_slice(&0x4752_4c4bu32.to_le_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&2u32.to_le_bytes());
        hello.extend_from_slice(&[0u8; 32]);
        impostor.write_all(&hello).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let r1 = s.spawn(|| sum_ranks(&env(1, port, secret)));
        let sums = vec![r0.join().unwrap().unwrap(), r1.join().unwrap().unwrap()];
        drop(impostor);
        sums
    });
    assert_eq!(sums, [3.0, 3.0]);
}
