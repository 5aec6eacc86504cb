//! Fuzz target of the CPU ring's link frames (test_support::fuzz): the link hello
//! (magic, rank, world size, the MAC over the listener's nonce) and the per-collective
//! headers and payload that follow it.
//!
//! The fuzzer plays rank 0 of a 2-rank ring (it serves the store and publishes its ring
//! address) against a real rank 1 (`dist::connect`, in a thread) that broadcasts from
//! root 1 and then all-gathers. An input whose first byte is even is sent as it is, as a
//! foreign process that connects to rank 1's ring port: rank 1 must drop it, and an
//! honest predecessor connecting afterwards must get a correct all-gather (the junk took
//! no one's place). An odd first byte sends an authenticated hello followed by the rest
//! of the input as frames: rank 1 must end with a value or an error, never a panic or a
//! hang. Every connection is closed after its bytes, so a short input ends at once.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use test_support::fuzz::fuzz;
use trainer::dist::store::{StoreClient, StoreServer};
use trainer::dist::{self, Backend, DistConfig, JobSecret, RendezvousEnv};

const LEN: usize = 16;

fn header(seq: u64, collective: u8, root: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&0x4752_4844u32.to_le_bytes()); // "GRHD"
    b[4..12].copy_from_slice(&seq.to_le_bytes());
    b[12] = collective;
    b[13] = 1; // f32
    b[16..20].copy_from_slice(&root.to_le_bytes());
    b[20..28].copy_from_slice(&(LEN as u64).to_le_bytes());
    b
}

/// Rank 0's link hello to rank 1 (`nonce`: the one rank 1 published).
fn hello(secret: &JobSecret, nonce: &[u8]) -> Vec<u8> {
    let mut h = 0x4752_4c4bu32.to_le_bytes().to_vec(); // "GRLK"
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&2u32.to_le_bytes());
    let tag = secret.mac(b"grpo-ring-link", &[&h[4..12], nonce]);
    h.extend_from_slice(&tag);
    h
}

/// What an honest rank 0 sends after its hello: the broadcast's header, then the
/// all-gather's header and rank 0's half (the values 0..8).
fn honest_frames() -> Vec<u8> {
    let mut f = header(1, 4, 1).to_vec();
    f.extend_from_slice(&header(2, 3, 0));
    for i in 0..LEN / 2 {
        f.extend_from_slice(&(i as f32).to_le_bytes());
    }
    f
}

/// Rank 1's side: join, broadcast its tensor from root 1, all-gather its half.
fn rank1(port: u16, secret: JobSecret) -> Result<Vec<f32>, String> {
    let mut env = RendezvousEnv::loopback(1, 2, port);
    env.job_secret = secret;
    let cfg = DistConfig {
        backend: Backend::Ring,
        timeout_secs: 5,
        ring_chunk_bytes: 1 << 16,
    };
    let mut comm = dist::connect(&cfg, &env, Device::Cpu).map_err(|e| e.to_string())?;
    let mut t = Tensor::arange(LEN as i64, (Kind::Float, Device::Cpu));
    comm.broadcast(&mut t, 1).map_err(|e| e.to_string())?;
    let half = Tensor::full([(LEN / 2) as i64], 100.0, (Kind::Float, Device::Cpu));
    let out = comm.all_gather(&half, LEN).map_err(|e| e.to_string())?;
    Ok(Vec::<f32>::try_from(&out).unwrap())
}

/// One scenario: returns rank 1's outcome.
fn exchange(secret: &JobSecret, authenticated: bool, frames: &[u8]) -> Result<Vec<f32>, String> {
    exchange_with(secret, authenticated, frames, true)
}

/// `close_junk`: whether the foreign connection closes after its bytes or stays open.
fn exchange_with(
    secret: &JobSecret,
    authenticated: bool,
    frames: &[u8],
    close_junk: bool,
) -> Result<Vec<f32>, String> {
    let server = StoreServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), secret.clone()).unwrap();
    let port = server.addr().port();
    let store = StoreClient::connect("127.0.0.1", port, Duration::from_secs(5), secret).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut published = [9u8; 32].to_vec();
    published.extend_from_slice(listener.local_addr().unwrap().to_string().as_bytes());
    store.set("ring/0", &published).unwrap();
    store.set("rank/0", b"").unwrap();
    let s = secret.clone();
    let rank = std::thread::spawn(move || rank1(port, s));
    // Rank 1 connects to its successor (us): read whatever it sends until it closes.
    let (mut from1, _) = listener.accept().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = from1.read_to_end(&mut sink);
    });
    let ring1 = store.get("ring/1", Duration::from_secs(5)).unwrap();
    let (nonce, addr) = ring1.split_at(32);
    let addr: SocketAddr = String::from_utf8_lossy(addr).parse().unwrap();
    let send = |bytes: &[u8], close: bool| {
        let mut c = TcpStream::connect(addr).unwrap();
        let _ = c.write_all(bytes);
        if close {
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
        c
    };
    let _keep = if authenticated {
        // Rank 0's own failure record, as its failure protocol would post it, so that
        // rank 1 tracing a broken link finds it without waiting out its grace period.
        store
            .set("fail/0", b"0\t1\tthe fuzzer closed the link")
            .unwrap();
        let mut stream = hello(secret, nonce);
        stream.extend_from_slice(frames);
        vec![send(&stream, true)]
    } else {
        // A foreign connection first, then the honest predecessor.
        let junk = send(frames, close_junk);
        std::thread::sleep(Duration::from_millis(2));
        let mut stream = hello(secret, nonce);
        stream.extend_from_slice(&honest_frames());
        vec![junk, send(&stream, true)]
    };
    let started = Instant::now();
    let out = rank.join().expect("rank 1 panicked");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "rank 1 hung for {:?}",
        started.elapsed()
    );
    drop(_keep);
    let _ = drain.join();
    out
}

#[test]
fn fuzz_ring_frames() {
    let secret = JobSecret::new("fuzz-ring");
    // The honest exchange works, and rank 1's half arrives after ours.
    let mut want: Vec<f32> = (0..LEN / 2).map(|i| i as f32).collect();
    want.extend(std::iter::repeat_n(100.0, LEN / 2));
    assert_eq!(exchange(&secret, true, &honest_frames()), Ok(want.clone()));

    let mut honest_hello = hello(&secret, &[9u8; 32]);
    honest_hello.insert(0, 0);
    let mut seeds = vec![[vec![1u8], honest_frames()].concat(), honest_hello];
    seeds.push([vec![3u8], header(1, 4, 1).to_vec()].concat());
    seeds.push([vec![0u8], b"GRLK".to_vec(), vec![0; 40]].concat());
    let report = fuzz("ring_frames", &seeds, 200, |input| {
        let Some((&first, rest)) = input.split_first() else {
            return;
        };
        let got = exchange(&secret, first % 2 == 1, rest);
        if first % 2 == 0 {
            assert_eq!(got, Ok(want.clone()), "a foreign connection took part");
        }
    });
    assert!(report.execs > 0);
}

/// Regression: a connection that sends part of a hello and then idles used to hold rank
/// 1's accept loop for the whole collective timeout (5 s here) before the predecessor's
/// hello was even read; now each hello is read on its own thread.
#[test]
fn a_half_hello_that_idles_delays_no_one() {
    let secret = JobSecret::new("fuzz-ring");
    let mut want: Vec<f32> = (0..LEN / 2).map(|i| i as f32).collect();
    want.extend(std::iter::repeat_n(100.0, LEN / 2));
    let started = Instant::now();
    let got = exchange_with(&secret, false, b"GRL", false);
    assert_eq!(got, Ok(want));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the ring waited {:?} on an idle connection",
        started.elapsed()
    );
}
