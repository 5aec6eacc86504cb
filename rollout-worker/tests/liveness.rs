//! Liveness and failure of the engine, end to end over gRPC with the tiny fixture: a
//! deliberately slowed engine keeps the Generate stream talking (progress messages), so
//! a client that measures silence since the last message never times out while tokens
//! keep coming, and still notices a worker that went silent; a failed step fails its
//! requests and the worker keeps serving; a panic fails the requests, turns health
//! NOT_SERVING and makes `serve` return an error (the process exits non-zero).
mod common;

use std::time::{Duration, Instant};

use common::*;
use proto::v1 as pb;
use rollout_worker::engine::Fault;

fn request(prompt: &[i64], n: u32, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompts: vec![tokens_prompt("p0", prompt)],
        n,
        sampling: Some(sampling(0.0, max_new_tokens, None)),
        return_text: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_generation_keeps_the_stream_alive_with_progress_messages() {
    let mut cfg = tiny_config();
    cfg.engine.step_delay_ms = 150;
    cfg.engine.progress_interval_secs = 0.2;
    let w = Worker::start(cfg).await;
    let mut c = w.client().await;
    let prompt = vec![5, 17, 42, 99, 3];
    let start = Instant::now();
    let mut stream = c
        .generate(request(&prompt, 2, 16))
        .await
        .unwrap()
        .into_inner();
    let (mut last, mut max_gap) = (Instant::now(), Duration::ZERO);
    let (mut progress, mut groups) = (vec![], vec![]);
    // A client timeout of 1 s on silence, shorter than the whole generation.
    while let Some(m) = tokio::time::timeout(Duration::from_secs(1), stream.message())
        .await
        .expect("the stream went silent for 1 s")
        .unwrap()
    {
        max_gap = max_gap.max(last.elapsed());
        last = Instant::now();
        match m.progress {
            Some(p) => progress.push(p.tokens_generated),
            None => groups.push(m),
        }
    }
    let total = start.elapsed();
    assert!(total > Duration::from_secs(2), "not slow enough: {total:?}");
    assert!(max_gap < Duration::from_secs(1), "gap {max_gap:?}");
    assert!(progress.len() >= 3, "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert!(*progress.last().unwrap() <= 32);
    assert_eq!(groups.len(), 1);
    let expected = greedy_reference(&load_model("qwen2-tiny"), &prompt, 16);
    for comp in &groups[0].completions {
        assert_eq!(comp.token_ids, expected);
    }
    // A paused engine is silent: the same client notices within its timeout.
    w.engine.set_paused(true);
    let mut stream = c
        .generate(request(&prompt, 1, 4))
        .await
        .unwrap()
        .into_inner();
    let silent = tokio::time::timeout(Duration::from_millis(800), stream.message()).await;
    assert!(silent.is_err(), "a paused engine sent {silent:?}");
    drop(stream);
    w.engine.set_paused(false);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_fails_its_requests_and_the_worker_recovers() {
    let mut cfg = tiny_config();
    cfg.engine.step_delay_ms = 50;
    let w = Worker::start(cfg).await;
    let mut c = w.client().await;
    let prompt = vec![5, 17, 42];
    let call = tokio::spawn({
        let mut c = c.clone();
        let req = request(&prompt, 2, 40);
        async move { generate(&mut c, req).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.engine.inject_fault(Fault::StepError);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err}");
    assert!(err.message().contains("injected"), "{err}");
    // Its blocks were freed: the next request runs and is right.
    let groups = generate(&mut c, request(&prompt, 2, 6)).await.unwrap();
    let expected = greedy_reference(&load_model("qwen2-tiny"), &prompt, 6);
    assert_eq!(groups[0].completions[0].token_ids, expected);
    assert!(w.engine.stats().alive);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_requests_turns_health_not_serving_and_ends_serve_with_an_error() {
    let mut cfg = tiny_config();
    cfg.engine.step_delay_ms = 50;
    let engine = rollout_worker::EngineHandle::load(
        &cfg,
        std::sync::Arc::new(rollout_worker::Metrics::new("test")),
    )
    .unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", grpc.local_addr().unwrap());
    let serve = tokio::spawn(rollout_worker::serve(
        grpc,
        http,
        engine.clone(),
        std::future::pending(),
    ));
    let mut c = proto::v1::rollout_service_client::RolloutServiceClient::connect(url)
        .await
        .unwrap();
    let call = tokio::spawn({
        let mut c = c.clone();
        let req = request(&[5, 17, 42], 2, 40);
        async move { generate(&mut c, req).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.inject_fault(Fault::Panic);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err}");
    assert!(err.message().contains("panicked"), "{err}");
    // serve returns an error once the engine is dead (main exits non-zero on it).
    let ended = tokio::time::timeout(Duration::from_secs(10), serve)
        .await
        .expect("serve ends after the engine died")
        .unwrap();
    assert!(ended.unwrap_err().to_string().contains("engine"));
    assert!(!engine.stats().alive);
    let _ = c.health(pb::HealthRequest {}).await; // the server is gone; no hang
}
