//! Weight updates committed while groups are in flight (issue #11's stalled commit): the
//! update applies as soon as the started groups finish, even when no further request
//! arrives, and an update whose caller gave up (the trainer's commit timeout) is dropped
//! instead of refusing every later version with "another weight update is pending".
mod common;

use std::time::Duration;

use common::*;
use proto::v1 as pb;
use proto::v1::rollout_service_client::RolloutServiceClient;
use tonic::transport::Channel;

/// A group of 8 completions of one prompt, `max_new_tokens` each, eos ignored.
fn group_request(max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompts: vec![tokens_prompt("p0", &[5, 17, 42, 99, 3])],
        n: 8,
        sampling: Some(sampling(1.0, max_new_tokens, Some(3))),
        return_text: false,
    }
}

/// A full update (the fixture's own weights, f32 chunks) committed as `version`.
fn update(model: &model::Transformer, version: u64) -> Vec<pb::WeightUpdateMessage> {
    let mut msgs: Vec<pb::WeightUpdateMessage> = rollout_worker::weights::chunks_of(
        &model.weights,
        rollout_worker::weights::WireDType::F32,
        1 << 20,
    )
    .into_iter()
    .map(|c| pb::WeightUpdateMessage {
        kind: Some(pb::weight_update_message::Kind::Chunk(pb::TensorChunk {
            name: c.name,
            dtype: pb::Dtype::Float32 as i32,
            shape: c.shape,
            offset: c.offset,
            data: c.data,
        })),
    })
    .collect();
    msgs.push(pb::WeightUpdateMessage {
        kind: Some(pb::weight_update_message::Kind::Commit(pb::Commit {
            version,
        })),
    });
    msgs
}

async fn push(
    c: &mut RolloutServiceClient<Channel>,
    msgs: Vec<pb::WeightUpdateMessage>,
    limit: Duration,
) -> Result<Result<pb::UpdateWeightsResponse, tonic::Status>, tokio::time::error::Elapsed> {
    tokio::time::timeout(limit, c.update_weights(futures::stream::iter(msgs)))
        .await
        .map(|r| r.map(|r| r.into_inner()))
}

/// Starts the group request and returns once the engine runs its sequences.
async fn start_group(
    w: &Worker,
    max_new_tokens: u32,
) -> tokio::task::JoinHandle<Result<Vec<pb::GroupResult>, tonic::Status>> {
    let mut c = w.client().await;
    let task = tokio::spawn(async move { generate(&mut c, group_request(max_new_tokens)).await });
    for _ in 0..1000 {
        if w.engine.stats().num_running > 0 {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the group never started");
}

fn outcome(w: &Worker, label: &str) -> u64 {
    w.engine
        .metrics()
        .weight_updates_total
        .with_label_values(&[label])
        .get()
}

/// The stall seen in the 2 + 2 run: the commit reached the engine while the worker's
/// last group was generating; the group finished and no further request came, and the
/// engine waited for a command with the update still pending, so the commit was never
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_committed_during_the_last_group_applies_without_another_request() {
    let mut cfg = tiny_config();
    cfg.engine.step_delay_ms = 20;
    let w = Worker::start(cfg).await;
    let model = load_model("qwen2-tiny");
    let gen = start_group(&w, 16).await;
    let mut c = w.client().await;
    let r = push(&mut c, update(&model, 1), Duration::from_secs(5))
        .await
        .expect("the commit is answered once the started group finished")
        .unwrap();
    assert_eq!(r.version, 1);
    let groups = gen.await.unwrap().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].completions.len(), 8);
    // The group started on the old weights and finished on them.
    assert_eq!(groups[0].weight_version, 0);
    assert_eq!(w.engine.stats().weight_version, 1);
    assert_eq!(outcome(&w, "applied"), 1);
    w.stop().await;
}

/// The trainer drops a commit after its timeout (and cancels the call); the worker must
/// drop that pending update, keep serving, and take the next version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_pending_update_is_dropped_and_the_next_version_applies() {
    let mut cfg = tiny_config();
    cfg.engine.step_delay_ms = 20;
    let w = Worker::start(cfg).await;
    let model = load_model("qwen2-tiny");
    let gen = start_group(&w, 60).await;
    let mut c = w.client().await;
    // The commit waits for the started group (about 60 steps of 20 ms): give up early.
    let gave_up = push(&mut c, update(&model, 1), Duration::from_millis(300)).await;
    assert!(
        gave_up.is_err(),
        "the commit returned before the group finished: {gave_up:?}"
    );
    let r = push(&mut c, update(&model, 2), Duration::from_secs(10))
        .await
        .expect("the next version is answered")
        .expect("the next version is not refused because of the abandoned one");
    assert_eq!(r.version, 2);
    let groups = gen.await.unwrap().unwrap();
    assert_eq!(groups[0].weight_version, 0);
    assert_eq!(groups[0].completions.len(), 8);
    assert_eq!(w.engine.stats().weight_version, 2);
    assert_eq!(outcome(&w, "applied"), 1);
    assert_eq!(outcome(&w, "cancelled") + outcome(&w, "superseded"), 1);
    // Generation goes on, on the new weights.
    let mut g = w.client().await;
    let after = generate(&mut g, group_request(4)).await.unwrap();
    assert_eq!(after[0].weight_version, 2);
    w.stop().await;
}
