//! The first worker of a weight-push chain (data plane) dead, refusing or stalled,
//! against real in-process workers (tiny Qwen2 fixture on CPU): the trainer's feed cuts
//! it and starts the chain at the next reachable worker, so only the cut workers miss the
//! version (two consecutive ones as well), a stall is detected by the hop deadline
//! (before the stream and in the middle of it), and after every commit each live worker
//! serves exactly the trainer's weights; the cut worker catches up on the next push.
//!
//! A worker "behind proxies" listens on 127.0.0.2 with a fixed data port `P`; the client
//! knows it by a gRPC proxy's url on 127.0.0.1, so its data plane is reached at
//! 127.0.0.1:P, where a `FaultProxy` forwards to the worker: cutting or stalling that
//! proxy kills or stalls only the data connection while `GetInfo` still answers.
mod rollout_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rollout_support::*;
use rollout_worker::security::ServeOptions;
use test_support::faults::FaultProxy;
use trainer::rollout::{PushReport, RolloutClient};

struct Proxied {
    worker: Worker,
    grpc: FaultProxy,
    data: FaultProxy,
}

impl Proxied {
    async fn start() -> Proxied {
        // The data proxy's port is the worker's data port, on the other loopback address.
        let probe = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let placeholder = probe.local_addr().unwrap();
        drop(probe);
        let data = FaultProxy::start(&placeholder.to_string()).await.unwrap();
        let port = data.addr().port();
        let opts = ServeOptions {
            data_port: port,
            ..ServeOptions::default()
        };
        let worker = Worker::start_on("127.0.0.2", 4, opts).await;
        data.retarget(&format!("127.0.0.2:{port}")).unwrap();
        let grpc = FaultProxy::start(&worker.url).await.unwrap();
        Proxied { worker, grpc, data }
    }

    fn url(&self) -> String {
        self.grpc.url()
    }
}

/// Pushes `m` as `version`, stalling the first worker's data proxy after half the
/// tensors when `stall_midway` is given.
async fn push(
    client: &RolloutClient,
    m: &model::Transformer,
    version: u64,
    stall_midway: Option<&FaultProxy>,
) -> PushReport {
    let mut push = client.begin_push(version).await.unwrap();
    let named = m.weights.named();
    for (i, (name, t)) in named.iter().enumerate() {
        if i == named.len() / 2 {
            if let Some(p) = stall_midway {
                tokio::time::sleep(Duration::from_millis(200)).await;
                p.stall();
            }
        }
        push.send(name, t).await.unwrap();
    }
    push.commit().await.unwrap()
}

/// Every worker of `urls` serves `version` with exactly `m`'s weights (greedy tokens and
/// log-probs equal a full forward of `m`).
async fn check_serve(
    client: &RolloutClient,
    m: &model::Transformer,
    version: u64,
    urls: &[String],
) {
    let used = check_served(client, m, version).await;
    let want: HashSet<String> = urls.iter().cloned().collect();
    assert_eq!(used, want, "the workers serving version {version}");
}

fn names(r: &PushReport) -> (Vec<String>, Vec<String>) {
    let failed = r.failed.iter().map(|(u, _)| u.clone()).collect();
    (r.updated.clone(), failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_stalled_first_hop_costs_only_that_worker() {
    let p0 = Proxied::start().await;
    let p1 = Proxied::start().await;
    let w2 = Worker::start_with(4).await;
    let urls = [p0.url(), p1.url(), w2.url.clone()];
    let mut cfg = config(&urls.iter().map(|u| u.as_str()).collect::<Vec<_>>());
    cfg.weight_dtype = "float32".into();
    let deadline = Duration::from_secs_f64(cfg.connect_timeout_secs);
    let client = RolloutClient::connect(cfg).await.unwrap();

    // Version 1: the first hop refuses every connection (a dead data plane).
    p0.data.cut();
    let m = perturbed_model(101);
    let r = push(&client, &m, 1, None).await;
    eprintln!("dead first hop: {:?}", r.failed);
    assert_eq!(
        names(&r),
        (urls[1..].to_vec(), vec![urls[0].clone()]),
        "{r:?}"
    );
    assert_eq!(r.egress_copies, 1);
    check_serve(&client, &m, 1, &urls[1..]).await;

    // Version 2: two consecutive dead hops; the chain starts at the third worker.
    p1.data.cut();
    let m = perturbed_model(102);
    let r = push(&client, &m, 2, None).await;
    assert_eq!(
        names(&r),
        (vec![urls[2].clone()], urls[..2].to_vec()),
        "{r:?}"
    );
    check_serve(&client, &m, 2, &urls[2..]).await;

    // Version 3: the first hop accepts but never answers (stalled): cut after the
    // deadline (plus the offer wait), not a hang; both others take the version.
    p0.data.restore();
    p1.data.restore();
    p0.data.stall();
    let m = perturbed_model(103);
    let t = Instant::now();
    let r = push(&client, &m, 3, None).await;
    let took = t.elapsed();
    eprintln!("stalled first hop: committed in {took:?}: {:?}", r.failed);
    assert!(took < deadline * 4 + Duration::from_secs(8), "{took:?}");
    assert_eq!(
        names(&r),
        (urls[1..].to_vec(), vec![urls[0].clone()]),
        "{r:?}"
    );
    check_serve(&client, &m, 3, &urls[1..]).await;

    // Version 4: the first hop is back and catches up; every worker equal.
    p0.data.restore();
    let m = perturbed_model(104);
    let r = push(&client, &m, 4, None).await;
    assert_eq!(names(&r), (urls.to_vec(), vec![]), "{r:?}");
    check_serve(&client, &m, 4, &urls).await;

    // Version 5: the first hop stalls in the middle of the stream; the feed starts again
    // at the next worker (which was receiving from it) and sends the update from its start.
    let m = perturbed_model(105);
    let t = Instant::now();
    let r = push(&client, &m, 5, Some(&p0.data)).await;
    let took = t.elapsed();
    eprintln!(
        "first hop stalled midway: committed in {took:?}: {:?}",
        r.failed
    );
    assert!(took < deadline * 4 + Duration::from_secs(8), "{took:?}");
    assert_eq!(
        names(&r),
        (urls[1..].to_vec(), vec![urls[0].clone()]),
        "{r:?}"
    );
    check_serve(&client, &m, 5, &urls[1..]).await;

    // Version 6: restored, all three serve the same weights again.
    p0.data.restore();
    let m = perturbed_model(106);
    let r = push(&client, &m, 6, None).await;
    assert_eq!(names(&r), (urls.to_vec(), vec![]), "{r:?}");
    check_serve(&client, &m, 6, &urls).await;

    drop(client);
    for w in [p0.worker, p1.worker, w2] {
        w.stop().await;
    }
}
