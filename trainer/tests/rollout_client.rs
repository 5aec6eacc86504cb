//! The rollout client against real in-process workers (tiny Qwen2 fixture on CPU) on
//! 127.0.0.1:0, with faults injected by `FaultProxy`: groups are neither lost nor
//! duplicated when a worker is killed or hangs, failed workers come back, all-down is a
//! bounded error, and weight pushes version the groups (f32 and bf16 on the wire).
mod rollout_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rollout_support::fake::{FakeWorker, Fault};
use rollout_support::*;
use test_support::FaultProxy;
use trainer::rollout::{RolloutClient, RolloutError, RolloutGroup};

/// Generates `count` seeded jobs on `client` (any weight version), checking their shape.
async fn run(
    client: &RolloutClient,
    count: usize,
    n: u32,
    max_new_tokens: u32,
    seed: u64,
) -> Vec<RolloutGroup> {
    let groups = client
        .generate(
            jobs(count),
            n,
            sampling(max_new_tokens, Some(seed)),
            false,
            0,
            |_| {},
        )
        .await
        .unwrap();
    check_groups(&groups, &jobs(count), n as usize, max_new_tokens as usize);
    groups
}

fn workers_used(groups: &[RolloutGroup]) -> HashSet<String> {
    groups.iter().map(|g| g.worker.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_return_every_group_once_in_job_order_and_seeds_follow_the_job() {
    let (a, b) = (Worker::start().await, Worker::start().await);
    let client = RolloutClient::connect(config(&[&a.url, &b.url]))
        .await
        .unwrap();
    let (n, len) = (3u32, 4u32);
    let all = jobs(40);
    let mut arrived = vec![];
    let groups = client
        .generate(all.clone(), n, sampling(len, Some(11)), true, 0, |g| {
            arrived.push(g.key)
        })
        .await
        .unwrap();
    check_groups(&groups, &all, n as usize, len as usize);
    assert_eq!(arrived.len(), 40, "on_group once per group");
    assert_eq!(
        arrived.iter().collect::<HashSet<_>>().len(),
        40,
        "no group twice"
    );
    assert_eq!(
        workers_used(&groups),
        HashSet::from([a.url.clone(), b.url.clone()]),
        "load is spread over both workers"
    );
    assert!(groups.iter().all(|g| g.weight_version == 0));
    assert!(!groups[0].completions[0].text.is_empty(), "return_text");
    let status = client.status();
    assert_eq!(status.iter().map(|s| s.groups_done).sum::<u64>(), 40);
    assert!(status
        .iter()
        .all(|s| s.healthy && s.in_flight == 0 && s.failures == 0));

    // The same seeded jobs in one request to one worker: identical samples, because a
    // request starting at job f is seeded with seed + f * n.
    let mut one = config(&[&b.url]);
    one.max_prompts_per_request = 64;
    let single = RolloutClient::connect(one).await.unwrap();
    let reference = run(&single, 40, n, len, 11).await;
    assert_eq!(tokens(&groups), tokens(&reference));
    drop((client, single));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_mid_stream_loses_and_duplicates_nothing_and_is_used_again() {
    let (a, b) = (Worker::start_with(2).await, Worker::start().await);
    let proxy = FaultProxy::start(&a.url).await.unwrap();
    let client = RolloutClient::connect(config(&[&proxy.url(), &b.url]))
        .await
        .unwrap();
    let (n, len) = (2u32, 12u32);
    let all = jobs(48);
    let mut from_proxy_before_cut = 0;
    let mut keys = vec![];
    let groups = client
        .generate(all.clone(), n, sampling(len, Some(5)), false, 0, |g| {
            keys.push(g.key);
            if g.worker == proxy.url() && from_proxy_before_cut == 0 {
                from_proxy_before_cut += 1;
                proxy.cut(); // the worker dies after its first group
            }
        })
        .await
        .unwrap();
    check_groups(&groups, &all, n as usize, len as usize);
    assert_eq!(
        from_proxy_before_cut, 1,
        "the proxied worker served a group"
    );
    keys.sort_unstable();
    assert_eq!(
        keys,
        all.iter().map(|j| j.key).collect::<Vec<_>>(),
        "every key exactly once"
    );
    let on_a = groups.iter().filter(|g| g.worker == proxy.url()).count();
    assert!((1..48).contains(&on_a), "{on_a} groups from the cut worker");
    let st = client.status();
    assert!(st[0].failures >= 1 && !st[0].healthy, "{st:?}");
    assert_eq!(st[1].failures, 0);
    // Groups re-sent after the cut are the same samples as without any fault.
    let single = RolloutClient::connect(config(&[&b.url])).await.unwrap();
    let reference = run(&single, 48, n, len, 5).await;
    assert_eq!(tokens(&groups), tokens(&reference));

    // After a restore the worker is probed again (backoff) and gets work again.
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = run(&client, 8, 1, 2, 3).await;
        if workers_used(&g).contains(&proxy.url()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restored worker never used: {:?}",
            client.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(client.status()[0].healthy);
    drop((client, single, proxy));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_times_out_and_its_groups_move() {
    let (a, b) = (Worker::start().await, Worker::start().await);
    let proxy = FaultProxy::start(&a.url).await.unwrap();
    let mut cfg = config(&[&proxy.url(), &b.url]);
    cfg.request_timeout_secs = 2.0;
    cfg.connect_timeout_secs = 1.0;
    let client = RolloutClient::connect(cfg).await.unwrap();
    // The worker hangs with its connection open: requests go out and nothing comes back.
    proxy.stall();
    let (n, len) = (2u32, 12u32);
    let all = jobs(24);
    let mut arrivals = vec![];
    let started = Instant::now();
    let groups = client
        .generate(all.clone(), n, sampling(len, Some(9)), false, 0, |g| {
            arrivals.push((g.worker.clone(), started.elapsed()))
        })
        .await
        .unwrap();
    let elapsed = started.elapsed();
    check_groups(&groups, &all, n as usize, len as usize);
    assert!(
        arrivals.iter().all(|(w, _)| *w == b.url),
        "nothing arrives through a stalled proxy: {arrivals:?}"
    );
    assert!(
        arrivals[0].1 < Duration::from_millis(1900),
        "the healthy worker's share is not held up: {arrivals:?}"
    );
    assert!(
        arrivals.last().unwrap().1 >= Duration::from_millis(1900),
        "the stalled worker's requests moved only after the 2s silence: {arrivals:?}"
    );
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    let st = client.status();
    assert!(st[0].failures >= 1 && !st[0].healthy, "{st:?}");
    let single = RolloutClient::connect(config(&[&b.url])).await.unwrap();
    assert_eq!(tokens(&groups), tokens(&run(&single, 24, n, len, 9).await));
    drop((client, single, proxy));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_workers_down_is_a_clear_error_within_the_bound() {
    let (a, b) = (Worker::start().await, Worker::start().await);
    let (pa, pb) = (
        FaultProxy::start(&a.url).await.unwrap(),
        FaultProxy::start(&b.url).await.unwrap(),
    );
    let mut cfg = config(&[&pa.url(), &pb.url()]);
    cfg.request_timeout_secs = 1.5;
    cfg.connect_timeout_secs = 1.0;
    let client = RolloutClient::connect(cfg.clone()).await.unwrap();
    pa.cut();
    pb.cut();
    let started = Instant::now();
    let e = client
        .generate(jobs(8), 2, sampling(4, Some(1)), false, 0, |_| {})
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            e,
            RolloutError::NoUsableWorker {
                total: 8,
                received: 0,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&pa.url()) && msg.contains(&pb.url()), "{msg}");
    assert!(msg.contains("failed"), "{msg}");
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(8),
        "gave up after {elapsed:?}"
    );

    // Connecting while every worker is down fails too, naming each one.
    let started = Instant::now();
    let e = match RolloutClient::connect(cfg).await {
        Err(e) => e,
        Ok(_) => panic!("connected to cut workers"),
    };
    assert!(started.elapsed() < Duration::from_secs(5));
    let msg = e.to_string();
    assert!(matches!(e, RolloutError::NoWorker { .. }), "{msg}");
    assert!(msg.contains(&pa.url()) && msg.contains(&pb.url()), "{msg}");

    // A bad request is refused by the worker and not retried elsewhere.
    pa.restore();
    pb.restore();
    let client = RolloutClient::connect(config(&[&a.url, &b.url]))
        .await
        .unwrap();
    let e = client
        .generate(jobs(2), 99, sampling(4, None), false, 0, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, RolloutError::Rejected { .. }), "{e}");
    assert!(client.status().iter().all(|s| s.healthy && s.failures == 0));
    drop((client, pa, pb));
    a.stop().await;
    b.stop().await;
}

/// Checks greedy groups against the full-forward reference of `m`.
fn check_greedy(groups: &[RolloutGroup], m: &model::Transformer, len: usize, tol: f32) {
    for g in groups {
        let (ids, lps) = greedy_reference(m, &g.prompt_ids, len);
        assert_eq!(
            g.completions[0].token_ids, ids,
            "key {} from {}",
            g.key, g.worker
        );
        for (x, y) in g.completions[0].logprobs.iter().zip(&lps) {
            assert!((x - y).abs() <= tol, "key {}: logprob {x} vs {y}", g.key);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_pushes_version_groups_and_min_version_skips_a_restarted_worker() {
    let (a, b) = (Worker::start().await, Worker::start().await);
    let proxy = FaultProxy::start(&a.url).await.unwrap();
    let mut cfg = config(&[&proxy.url(), &b.url]);
    cfg.weight_chunk_bytes = 1000; // many chunks per tensor
    let client = RolloutClient::connect(cfg.clone()).await.unwrap();
    let len = 6u32;
    let before = client
        .generate(jobs(8), 1, sampling(len, None), false, 0, |_| {})
        .await
        .unwrap();
    check_greedy(&before, &load_model(), len as usize, 1e-4);

    // Version 1: perturbed weights in f32.
    let m1 = perturbed_model(7);
    let r = push_model(&client, &m1, 1).await.unwrap();
    let numel: usize = m1.weights.named().iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(r.version, 1);
    assert_eq!(r.bytes as usize, numel * 4);
    assert_eq!(r.updated, vec![proxy.url(), b.url.clone()]);
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert!(client.status().iter().all(|s| s.weight_version == Some(1)));
    let g1 = client
        .generate(jobs(8), 1, sampling(len, None), false, 1, |_| {})
        .await
        .unwrap();
    assert!(g1.iter().all(|g| g.weight_version == 1));
    assert_eq!(workers_used(&g1).len(), 2);
    assert_ne!(tokens(&g1), tokens(&before), "the new weights serve");
    check_greedy(&g1, &m1, len as usize, 1e-4);

    // A pushed version must increase.
    let e = push_model(&client, &m1, 1).await.unwrap_err();
    assert!(
        e.to_string().contains("already serves weight version 1"),
        "{e}"
    );

    // Worker a "restarts": the proxy now leads to a fresh worker at version 0.
    let a2 = Worker::start().await;
    proxy.cut();
    proxy.retarget(&a2.url).unwrap();
    proxy.restore();
    let g = client
        .generate(jobs(16), 1, sampling(len, None), false, 1, |_| {})
        .await
        .unwrap();
    assert!(
        g.iter().all(|g| g.weight_version == 1 && g.worker == b.url),
        "stale worker skipped"
    );
    let st = client.status();
    assert!(
        !(st[0].healthy && st[0].weight_version == Some(1)),
        "the restart was noticed: {st:?}"
    );
    check_greedy(&g, &m1, len as usize, 1e-4);

    // Version 2 in bfloat16 on the wire reaches both, the restarted one included.
    let m2 = perturbed_model(8);
    let mut bf = cfg.clone();
    bf.weight_dtype = "bfloat16".into();
    let bf_client = RolloutClient::connect(bf).await.unwrap();
    let r = push_model(&bf_client, &m2, 2).await.unwrap();
    assert_eq!(r.bytes as usize, numel * 2);
    assert_eq!(r.updated.len(), 2, "{:?}", r.failed);
    let g2 = bf_client
        .generate(jobs(8), 1, sampling(len, None), false, 2, |_| {})
        .await
        .unwrap();
    assert!(g2.iter().all(|g| g.weight_version == 2));
    assert_eq!(workers_used(&g2).len(), 2, "both workers serve version 2");
    round_to_bf16(&m2);
    check_greedy(&g2, &m2, len as usize, 1e-4);
    drop((client, bf_client, proxy));
    for w in [a, a2, b] {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_workers_are_failed_or_skipped_and_their_groups_resent() {
    let b = Worker::start().await;
    let single = RolloutClient::connect(config(&[&b.url])).await.unwrap();
    push_model(&single, &load_model(), 1).await.unwrap();
    let (n, len) = (2u32, 4u32);
    let all = jobs(16);

    // Health says version 1 but its groups are version 0: a restart the client has not
    // noticed. Its groups are dropped and re-sent; it is skipped from then on.
    let fake = FakeWorker::start(1, Fault::StaleGroups(0)).await;
    let client = RolloutClient::connect(config(&[&fake.url, &b.url]))
        .await
        .unwrap();
    let groups = client
        .generate(all.clone(), n, sampling(len, Some(2)), false, 1, |_| {})
        .await
        .unwrap();
    check_groups(&groups, &all, n as usize, len as usize);
    assert!(groups
        .iter()
        .all(|g| g.worker == b.url && g.weight_version == 1));
    assert_eq!(client.status()[0].weight_version, Some(0));
    assert_eq!(tokens(&groups), tokens(&run(&single, 16, n, len, 2).await));

    // Protocol violations fail the worker; what it still owed is re-sent.
    for fault in [Fault::WrongN, Fault::Duplicate, Fault::EndEarly] {
        let fake = FakeWorker::start(0, fault).await;
        let client = RolloutClient::connect(config(&[&fake.url, &b.url]))
            .await
            .unwrap();
        let mut keys = vec![];
        let groups = client
            .generate(all.clone(), n, sampling(len, Some(2)), false, 0, |g| {
                keys.push(g.key)
            })
            .await
            .unwrap();
        check_groups(&groups, &all, n as usize, len as usize);
        keys.sort_unstable();
        assert_eq!(
            keys,
            all.iter().map(|j| j.key).collect::<Vec<_>>(),
            "{fault:?}"
        );
        let st = client.status();
        assert!(st[0].failures >= 1, "{fault:?}: {st:?}");
        // Only the first group of each request can come from the fake; each failure
        // ends at most max_requests_per_worker (2) of its requests.
        let from_fake = groups.iter().filter(|g| g.worker == fake.url).count();
        match fault {
            Fault::WrongN => assert_eq!(from_fake, 0),
            _ => assert!(
                from_fake as u64 <= 2 * st[0].failures,
                "{fault:?}: {from_fake} groups, {st:?}"
            ),
        }
    }
    drop((client, single));
    b.stop().await;
}

// The proxy sits on the gRPC path only: over the data plane a cut loses the worker's
// offer or its commit. Direct streams keep the other worker's update; a cut inside a
// chain fails the hops after it until the next push (trainer/tests/faults.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_mid_push_is_dropped_and_reported() {
    lost_mid_push("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_mid_direct_data_plane_push_is_dropped_and_reported() {
    lost_mid_push("auto").await;
}

async fn lost_mid_push(transport: &str) {
    let (a, b) = (Worker::start().await, Worker::start().await);
    let proxy = FaultProxy::start(&a.url).await.unwrap();
    let mut cfg = config(&[&proxy.url(), &b.url]);
    cfg.weight_chunk_bytes = 1000;
    cfg.weight_transport = transport.into();
    cfg.weight_chain = false;
    let client = RolloutClient::connect(cfg).await.unwrap();
    let m = perturbed_model(3);
    let mut push = client.begin_push(1).await.unwrap();
    let named = m.weights.named();
    for (i, (name, t)) in named.iter().enumerate() {
        if i == named.len() / 2 {
            proxy.cut();
        }
        push.send(name, t).await.unwrap();
    }
    let e = push.send(&named[0].0, named[0].1).await.unwrap_err();
    assert!(e.to_string().contains("sent twice"), "{e}");
    let r = push.commit().await.unwrap();
    assert_eq!(r.updated, vec![b.url.clone()]);
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].0, proxy.url(), "{:?}", r.failed);
    assert!(!client.status()[0].healthy);
    proxy.restore();
    // The dropped worker kept version 0: a version-1 generate skips it.
    let g = client
        .generate(jobs(8), 1, sampling(4, None), false, 1, |_| {})
        .await
        .unwrap();
    assert!(g.iter().all(|g| g.worker == b.url && g.weight_version == 1));
    check_greedy(&g, &m, 4, 1e-4);
    drop((client, proxy));
    a.stop().await;
    b.stop().await;
}
