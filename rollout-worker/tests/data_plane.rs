//! The weight data plane on real loopback sockets, without a model: a sender written
//! against `proto::data_plane` feeds one data plane or a chain of three; every staged
//! tensor must equal the sent one byte for byte (f32 and bf16), a wrong token and
//! out-of-bounds headers are refused with a clear error, and a hop cut mid-chain is
//! routed around: the worker before it reconnects to the one after it, so only the cut
//! worker misses the update.
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use model::ParamSpec;
use proto::data_plane::{self as dp, Hop, Route, TensorHeader, Token};
use rollout_worker::data_plane::{DataPlane, Pending};
use rollout_worker::weights::StagedWeights;
use tch::{Kind, Tensor};
use test_support::faults::FaultProxy;

fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec {
            name: "model.embed_tokens.weight".into(),
            shape: vec![300, 1000],
        },
        ParamSpec {
            name: "model.norm.weight".into(),
            shape: vec![1000],
        },
    ]
}

/// Each parameter as seeded random values in `kind`.
fn tensors(kind: Kind) -> Vec<(String, Tensor)> {
    tch::manual_seed(11);
    specs()
        .into_iter()
        .map(|s| {
            (
                s.name,
                Tensor::randn(s.shape.as_slice(), (Kind::Float, tch::Device::Cpu)).to_kind(kind),
            )
        })
        .collect()
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let mut b = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut b, t.numel());
    b
}

fn wire(kind: Kind) -> u8 {
    match kind {
        Kind::Float => 1,
        Kind::BFloat16 => 2,
        _ => 3,
    }
}

async fn plane(idle: Duration) -> DataPlane {
    let (p, _task) = DataPlane::start([127, 0, 0, 1].into(), 0, specs(), idle)
        .await
        .unwrap();
    p
}

fn token(i: u8) -> Token {
    [i; dp::TOKEN_BYTES]
}

fn addr(p: &DataPlane) -> String {
    format!("127.0.0.1:{}", p.port())
}

/// Connects and presents `token`; the worker's answer to the hello.
fn hello(addr: &str, token: &Token) -> (TcpStream, Result<(), String>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    dp::write_hello(&mut s, token).unwrap();
    let status = dp::read_status(&mut s).unwrap();
    (s, status)
}

/// Sends `tensors` after `route`, then the end marker; the worker's final status.
fn send(s: &mut TcpStream, route: &Route, tensors: &[(String, Tensor)]) -> Result<(), String> {
    dp::write_route(s, route).unwrap();
    for (name, t) in tensors {
        let b = bytes_of(t);
        let h = TensorHeader {
            name: name.clone(),
            dtype: wire(t.kind()),
            shape: t.size(),
            num_bytes: b.len() as u64,
        };
        if s.write_all(&dp::encode_header(&h))
            .and_then(|_| s.write_all(&b))
            .is_err()
        {
            break;
        }
    }
    let _ = s.write_all(&dp::END);
    dp::read_status(s).unwrap_or_else(|e| Err(e.to_string()))
}

fn check_equal(staged: &StagedWeights, sent: &[(String, Tensor)]) {
    assert_eq!(staged.tensors.len(), sent.len());
    for ((n1, t1), (n2, t2)) in staged.tensors.iter().zip(sent) {
        assert_eq!(n1, n2);
        assert_eq!(t1.kind(), t2.kind(), "{n1}");
        assert_eq!(bytes_of(t1), bytes_of(t2), "{n1} differs");
    }
}

async fn wait(mut p: Pending) -> Result<StagedWeights, String> {
    tokio::time::timeout(Duration::from_secs(30), p.wait())
        .await
        .expect("an outcome within 30 s")
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_chained_updates_arrive_byte_exact_in_f32_and_bf16() {
    let planes = [
        plane(Duration::from_secs(10)).await,
        plane(Duration::from_secs(10)).await,
        plane(Duration::from_secs(10)).await,
    ];
    for (round, kind) in [Kind::Float, Kind::BFloat16].into_iter().enumerate() {
        let sent = tensors(kind);
        // Direct: one sender, one worker.
        let t0 = token(10 + round as u8);
        let pending = planes[0].register(t0).unwrap();
        let s2 = sent
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect::<Vec<_>>();
        let a = addr(&planes[0]);
        let status = tokio::task::spawn_blocking(move || {
            let (mut s, ok) = hello(&a, &t0);
            ok.unwrap();
            send(&mut s, &Route::default(), &s2)
        });
        check_equal(&wait(pending).await.unwrap(), &sent);
        status.await.unwrap().unwrap();

        // A chain of three: the sender feeds the first, which forwards down the route.
        let tokens: Vec<Token> = (0..3).map(|i| token(20 + 3 * round as u8 + i)).collect();
        let pending: Vec<Pending> = planes
            .iter()
            .zip(&tokens)
            .map(|(p, t)| p.register(*t).unwrap())
            .collect();
        let route = Route {
            hop_timeout_ms: 5000,
            rejoin_ms: 0,
            hops: (1..3)
                .map(|i| Hop {
                    addr: addr(&planes[i]),
                    token: tokens[i],
                })
                .collect(),
        };
        let s2 = sent
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect::<Vec<_>>();
        let (a, t0) = (addr(&planes[0]), tokens[0]);
        let status = tokio::task::spawn_blocking(move || {
            let (mut s, ok) = hello(&a, &t0);
            ok.unwrap();
            send(&mut s, &route, &s2)
        });
        for p in pending {
            check_equal(&wait(p).await.unwrap(), &sent);
        }
        status.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_and_out_of_bounds_headers_are_refused_with_a_clear_error() {
    let p = plane(Duration::from_secs(10)).await;
    let a = addr(&p);
    let _pending = p.register(token(1)).unwrap();
    let a2 = a.clone();
    let refused = tokio::task::spawn_blocking(move || hello(&a2, &token(2)).1)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        refused.contains("unknown or expired data-plane token"),
        "{refused}"
    );
    // The token is one-time: after the refusal above the right one still works once.
    let sent = tensors(Kind::Float);
    let cases: Vec<(&str, TensorHeader)> = vec![
        (
            "unknown tensor",
            TensorHeader {
                name: "model.layers.99.mlp.up_proj.weight".into(),
                dtype: 1,
                shape: vec![1000],
                num_bytes: 4000,
            },
        ),
        (
            "shape [2000], expected [1000]",
            TensorHeader {
                name: "model.norm.weight".into(),
                dtype: 1,
                shape: vec![2000],
                num_bytes: 8000,
            },
        ),
        (
            "8000 bytes announced, the tensor has 4000",
            TensorHeader {
                name: "model.norm.weight".into(),
                dtype: 1,
                shape: vec![1000],
                num_bytes: 8000,
            },
        ),
        (
            "dtype is unspecified or unknown",
            TensorHeader {
                name: "model.norm.weight".into(),
                dtype: 9,
                shape: vec![1000],
                num_bytes: 4000,
            },
        ),
    ];
    for (i, (want, header)) in cases.into_iter().enumerate() {
        let t = token(100 + i as u8);
        let pending = p.register(t).unwrap();
        let a2 = a.clone();
        let status = tokio::task::spawn_blocking(move || {
            let (mut s, ok) = hello(&a2, &t);
            ok.unwrap();
            dp::write_route(&mut s, &Route::default()).unwrap();
            let _ = s.write_all(&dp::encode_header(&header));
            dp::read_status(&mut s).unwrap()
        });
        let e = wait(pending).await.unwrap_err();
        assert!(e.contains(want), "{want}: {e}");
        assert!(status.await.unwrap().unwrap_err().contains(want));
    }
    // A tensor sent twice, and an update that ends before every tensor arrived.
    let t = token(120);
    let pending = p.register(t).unwrap();
    let twice = vec![
        (sent[1].0.clone(), sent[1].1.shallow_clone()),
        (sent[1].0.clone(), sent[1].1.shallow_clone()),
    ];
    let a2 = a.clone();
    let status = tokio::task::spawn_blocking(move || {
        let (mut s, ok) = hello(&a2, &t);
        ok.unwrap();
        send(&mut s, &Route::default(), &twice)
    });
    let e = wait(pending).await.unwrap_err();
    assert!(e.contains("sent twice"), "{e}");
    assert!(status.await.unwrap().is_err());
    let t = token(121);
    let pending = p.register(t).unwrap();
    let part = vec![(sent[1].0.clone(), sent[1].1.shallow_clone())];
    let status = tokio::task::spawn_blocking(move || {
        let (mut s, ok) = hello(&a, &t);
        ok.unwrap();
        send(&mut s, &Route::default(), &part)
    });
    let e = wait(pending).await.unwrap_err();
    assert!(e.contains("incomplete"), "{e}");
    assert!(status.await.unwrap().unwrap_err().contains("incomplete"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_cut_mid_chain_is_routed_around_and_only_the_cut_worker_misses_the_update() {
    let planes = [
        plane(Duration::from_secs(20)).await,
        plane(Duration::from_secs(20)).await,
        plane(Duration::from_secs(20)).await,
    ];
    // The hop into the middle worker runs through a proxy that is cut mid-stream.
    let proxy = FaultProxy::start(&format!("http://{}", addr(&planes[1])))
        .await
        .unwrap();
    let tokens: Vec<Token> = (0..3).map(|i| token(50 + i)).collect();
    let pending: Vec<Pending> = planes
        .iter()
        .zip(&tokens)
        .map(|(p, t)| p.register(*t).unwrap())
        .collect();
    let route = Route {
        hop_timeout_ms: 2000,
        rejoin_ms: 0,
        hops: vec![
            Hop {
                addr: proxy.addr().to_string(),
                token: tokens[1],
            },
            Hop {
                addr: addr(&planes[2]),
                token: tokens[2],
            },
        ],
    };
    let sent = tensors(Kind::Float);
    let s2 = sent
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect::<Vec<_>>();
    let (a, t0) = (addr(&planes[0]), tokens[0]);
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let status = tokio::task::spawn_blocking(move || {
        let (mut s, ok) = hello(&a, &t0);
        ok.unwrap();
        dp::write_route(&mut s, &route).unwrap();
        // The first tensor, then wait for the cut, then the rest.
        for (i, (name, t)) in s2.iter().enumerate() {
            let b = bytes_of(t);
            let h = TensorHeader {
                name: name.clone(),
                dtype: 1,
                shape: t.size(),
                num_bytes: b.len() as u64,
            };
            s.write_all(&dp::encode_header(&h)).unwrap();
            s.write_all(&b).unwrap();
            if i == 0 {
                go_rx.recv().unwrap();
            }
        }
        s.write_all(&dp::END).unwrap();
        dp::read_status(&mut s).unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    go_tx.send(()).unwrap();
    let started = Instant::now();
    let mut it = pending.into_iter();
    let (p0, p1, p2) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    check_equal(&wait(p0).await.unwrap(), &sent);
    // The first worker reconnected to the third (its token, the route minus the cut
    // hop) and sent the update again from its start.
    check_equal(&wait(p2).await.unwrap(), &sent);
    let e = wait(p1).await.unwrap_err();
    assert!(e.contains("data plane"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the cut worker failed within its rejoin wait (hop timeout + token wait), not at the idle timeout: {:?}",
        started.elapsed()
    );
    status.await.unwrap().unwrap();
}
