//! The weight data plane on real loopback sockets, without a model: a sender written
//! against `proto::data_plane` feeds one data plane or a chain of three; every staged
//! tensor must equal the sent one byte for byte (f32 and bf16), a wrong token and
//! out-of-bounds headers are refused with a clear error, and a hop cut mid-chain is
//! routed around: the worker before it reconnects to the one after it, so only the cut
//! worker misses the update. An update over two lanes arrives whole; a lane presented
//! twice or with another count is refused, and a broken lane or a missing tensor fails
//! the whole update. A tensor may come in pieces, out of order and spread over lanes or
//! forwarded down a chain; overlapping, overrunning, inconsistent or missing pieces are
//! refused, naming the tensor.
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
    hello_lane(addr, token, dp::Lane::SOLE)
}

/// Connects and presents `token` as `lane`; the worker's answer to the hello.
fn hello_lane(addr: &str, token: &Token, lane: dp::Lane) -> (TcpStream, Result<(), String>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    dp::write_hello(&mut s, token, lane).unwrap();
    let status = dp::read_status(&mut s).unwrap();
    (s, status)
}

/// A piece's header and bytes.
type Frame = (TensorHeader, Vec<u8>);

/// A piece of tensor `name` (of `t`'s dtype and shape): `data` at byte `offset`.
fn frame(name: &str, t: &Tensor, offset: usize, data: Vec<u8>) -> Frame {
    let h = TensorHeader {
        name: name.into(),
        dtype: wire(t.kind()),
        shape: t.size(),
        offset: offset as u64,
        num_bytes: data.len() as u64,
    };
    (h, data)
}

/// The pieces of `t` at the byte ranges `(start, end)`, in that order.
fn pieces(name: &str, t: &Tensor, ranges: &[(usize, usize)]) -> Vec<Frame> {
    let b = bytes_of(t);
    ranges
        .iter()
        .map(|&(start, end)| frame(name, t, start, b[start..end].to_vec()))
        .collect()
}

/// Sends `frames` after `route`, then the end marker; the worker's final status.
fn send_frames(s: &mut TcpStream, route: &Route, frames: &[Frame]) -> Result<(), String> {
    dp::write_route(s, route).unwrap();
    for (h, b) in frames {
        if s.write_all(&dp::encode_header(h))
            .and_then(|_| s.write_all(b))
            .is_err()
        {
            break;
        }
    }
    let _ = s.write_all(&dp::END);
    dp::read_status(s).unwrap_or_else(|e| Err(e.to_string()))
}

/// On a blocking thread: connects as `lane` presenting `token` (the hello must be
/// accepted) and sends `frames` after `route`; the worker's final status.
fn spawn_frames(
    addr: &str,
    token: Token,
    lane: dp::Lane,
    route: Route,
    frames: Vec<Frame>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let (mut s, ok) = hello_lane(&addr, &token, lane);
        ok.unwrap();
        send_frames(&mut s, &route, &frames)
    })
}

/// Registers `tokens[i]` on `planes[i]`; the route from the first plane through the others.
fn chain(planes: &[DataPlane], tokens: &[Token]) -> (Vec<Pending>, Route) {
    let pending = planes
        .iter()
        .zip(tokens)
        .map(|(p, t)| p.register(*t).unwrap())
        .collect();
    let hops = planes
        .iter()
        .zip(tokens)
        .skip(1)
        .map(|(p, t)| Hop {
            addr: addr(p),
            token: *t,
        })
        .collect();
    let route = Route {
        hop_timeout_ms: 5000,
        rejoin_ms: 0,
        hops,
    };
    (pending, route)
}

/// Sends `tensors`, each whole, after `route`, then the end marker; the final status.
fn send(s: &mut TcpStream, route: &Route, tensors: &[(String, Tensor)]) -> Result<(), String> {
    let frames: Vec<_> = tensors
        .iter()
        .map(|(name, t)| frame(name, t, 0, bytes_of(t)))
        .collect();
    send_frames(s, route, &frames)
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
        let (pending, route) = chain(&planes, &tokens);
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
                offset: 0,
                num_bytes: 4000,
            },
        ),
        (
            "shape [2000], expected [1000]",
            TensorHeader {
                name: "model.norm.weight".into(),
                dtype: 1,
                shape: vec![2000],
                offset: 0,
                num_bytes: 8000,
            },
        ),
        (
            "a piece of bytes 0..8000 runs past the tensor's 4000",
            TensorHeader {
                name: "model.norm.weight".into(),
                dtype: 1,
                shape: vec![1000],
                offset: 0,
                num_bytes: 8000,
            },
        ),
        (
            "dtype is unspecified or unknown",
            TensorHeader {
                name: "model.norm.weight".into(),
                dtype: 9,
                shape: vec![1000],
                offset: 0,
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
                offset: 0,
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

/// The lane `index` of two.
fn lane(index: u8) -> dp::Lane {
    dp::Lane { index, count: 2 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_lane_update_arrives_whole_and_a_bad_broken_or_short_lane_fails_it() {
    let p = plane(Duration::from_secs(10)).await;
    let a = addr(&p);
    for kind in [Kind::Float, Kind::BFloat16] {
        let sent = tensors(kind);
        // Each lane carries one tensor; both connect at once.
        let t = token(40 + wire(kind));
        let pending = p.register(t).unwrap();
        let lanes: Vec<_> = (0..2u8)
            .map(|i| {
                let (a, part) = (
                    a.clone(),
                    vec![(
                        sent[i as usize].0.clone(),
                        sent[i as usize].1.shallow_clone(),
                    )],
                );
                tokio::task::spawn_blocking(move || {
                    let (mut s, ok) = hello_lane(&a, &t, lane(i));
                    ok.unwrap();
                    send(&mut s, &Route::default(), &part)
                })
            })
            .collect();
        check_equal(&wait(pending).await.unwrap(), &sent);
        for l in lanes {
            l.await.unwrap().unwrap();
        }
    }
    let sent = tensors(Kind::Float);
    let one = |i: usize| vec![(sent[i].0.clone(), sent[i].1.shallow_clone())];

    // Lane 0 twice, or a lane that counts three, is refused; the update goes on.
    let t = token(50);
    let pending = p.register(t).unwrap();
    let (a2, part) = (a.clone(), one(0));
    let first = tokio::task::spawn_blocking(move || {
        let (s, ok) = hello_lane(&a2, &t, lane(0));
        ok.unwrap();
        (s, part)
    })
    .await
    .unwrap();
    let (a2, t2) = (a.clone(), t);
    let refused = tokio::task::spawn_blocking(move || {
        let again = hello_lane(&a2, &t2, lane(0)).1.unwrap_err();
        let three = hello_lane(&a2, &t2, dp::Lane { index: 1, count: 3 })
            .1
            .unwrap_err();
        (again, three)
    })
    .await
    .unwrap();
    assert!(
        refused
            .0
            .contains("lane 0 of this update is already connected"),
        "{}",
        refused.0
    );
    assert!(
        refused.1.contains("this update's lanes number 2"),
        "{}",
        refused.1
    );
    let (a2, part1) = (a.clone(), one(1));
    let done = tokio::task::spawn_blocking(move || {
        let (mut s0, part0) = first;
        let (mut s1, ok) = hello_lane(&a2, &t, lane(1));
        ok.unwrap();
        (
            send(&mut s0, &Route::default(), &part0),
            send(&mut s1, &Route::default(), &part1),
        )
    });
    check_equal(&wait(pending).await.unwrap(), &sent);
    let (r0, r1) = done.await.unwrap();
    r0.unwrap();
    r1.unwrap();

    // Lane 0 breaks mid-tensor: the update fails, and lane 1 is told so at its end.
    let t = token(51);
    let pending = p.register(t).unwrap();
    let (a2, part1) = (a.clone(), one(1));
    let bytes = bytes_of(&sent[0].1);
    let name = sent[0].0.clone();
    let shape = sent[0].1.size();
    let lane1 = tokio::task::spawn_blocking(move || {
        let (s1, ok) = hello_lane(&a2, &t, lane(1));
        ok.unwrap();
        let (mut s0, ok) = hello_lane(&a2, &t, lane(0));
        ok.unwrap();
        dp::write_route(&mut s0, &Route::default()).unwrap();
        let h = TensorHeader {
            name,
            dtype: 1,
            shape,
            offset: 0,
            num_bytes: bytes.len() as u64,
        };
        s0.write_all(&dp::encode_header(&h)).unwrap();
        s0.write_all(&bytes[..1000]).unwrap();
        drop(s0);
        (part1, s1)
    })
    .await
    .unwrap();
    let e = wait(pending).await.unwrap_err();
    assert!(e.contains("closed the stream mid-update"), "{e}");
    let (part1, mut s1) = lane1;
    let e = tokio::task::spawn_blocking(move || send(&mut s1, &Route::default(), &part1))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.contains("another lane of this update failed"), "{e}");

    // Both lanes end but a parameter never came: the lane that ends last says which.
    let t = token(52);
    let pending = p.register(t).unwrap();
    let (a2, part0) = (a.clone(), one(0));
    let ends = tokio::task::spawn_blocking(move || {
        let (mut s0, ok) = hello_lane(&a2, &t, lane(0));
        ok.unwrap();
        let (mut s1, ok) = hello_lane(&a2, &t, lane(1));
        ok.unwrap();
        (
            send(&mut s0, &Route::default(), &part0),
            send(&mut s1, &Route::default(), &[]),
        )
    });
    let e = wait(pending).await.unwrap_err();
    assert!(e.contains("model.norm.weight"), "{e}");
    let (r0, r1) = ends.await.unwrap();
    r0.unwrap();
    assert!(r1.unwrap_err().contains("model.norm.weight"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_in_pieces_over_lanes_or_a_chain_arrive_whole_and_bad_pieces_are_refused() {
    let planes = [
        plane(Duration::from_secs(10)).await,
        plane(Duration::from_secs(10)).await,
    ];
    let a = addr(&planes[0]);
    let sent = tensors(Kind::BFloat16);
    let ((embed, e), (norm, nt)) = (&sent[0], &sent[1]);
    let n = bytes_of(e).len();
    let third = n / 3;
    let whole_norm = pieces(norm, nt, &[(0, bytes_of(nt).len())]);

    // Two lanes: lane 0 takes the embedding's last piece and the norm whole, lane 1 the
    // embedding's other two, the later one first.
    let t = token(60);
    let pending = planes[0].register(t).unwrap();
    let shares = [
        [pieces(embed, e, &[(2 * third, n)]), whole_norm.clone()].concat(),
        pieces(embed, e, &[(third, 2 * third), (0, third)]),
    ];
    let lanes: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(i, share)| spawn_frames(&a, t, lane(i as u8), Route::default(), share))
        .collect();
    check_equal(&wait(pending).await.unwrap(), &sent);
    for l in lanes {
        l.await.unwrap().unwrap();
    }

    // A chain of two: the first worker forwards each piece at its offset.
    let tokens = [token(61), token(62)];
    let (pending, route) = chain(&planes, &tokens);
    let frames = [
        pieces(embed, e, &[(third, n), (0, third)]),
        whole_norm.clone(),
    ]
    .concat();
    let status = spawn_frames(&a, tokens[0], dp::Lane::SOLE, route, frames);
    for p in pending {
        check_equal(&wait(p).await.unwrap(), &sent);
    }
    status.await.unwrap().unwrap();

    // Bad pieces on one connection: each fails the update, naming the tensor.
    let mut other_dtype = frame(embed, e, third, vec![0; third]);
    other_dtype.0.dtype = 1;
    let cases: Vec<(&str, Vec<Frame>)> = vec![
        (
            "bytes 100000..200010 arrived twice",
            pieces(embed, e, &[(0, third), (third / 2, third + 10)]),
        ),
        (
            "a piece of bytes 599990..600010 runs past the tensor's 600000",
            vec![frame(embed, e, n - 10, vec![0; 20])],
        ),
        (
            "a piece of dtype 1 and shape [300, 1000], its first piece's were 2",
            [pieces(embed, e, &[(0, third)]), vec![other_dtype]].concat(),
        ),
        (
            "an empty piece at offset 5",
            vec![frame(embed, e, 5, vec![])],
        ),
        (
            "model.embed_tokens.weight (400000 of 600000 bytes)",
            [pieces(embed, e, &[(0, third), (2 * third, n)]), whole_norm].concat(),
        ),
    ];
    for (i, (want, frames)) in cases.into_iter().enumerate() {
        let t = token(70 + i as u8);
        let pending = planes[0].register(t).unwrap();
        let status = spawn_frames(&a, t, dp::Lane::SOLE, Route::default(), frames);
        let e = wait(pending).await.unwrap_err();
        assert!(
            e.contains(want) && e.contains(embed.as_str()),
            "{want}: {e}"
        );
        assert!(status.await.unwrap().unwrap_err().contains(want));
    }
}
