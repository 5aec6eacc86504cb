//! The choice of the NCCL weight path, over real gRPC with real in-process workers
//! (tiny Qwen2 fixture on CPU): `auto` keeps the existing path on a CPU trainer and for
//! CPU workers, `nccl` is refused naming the trainer's device or each CPU worker, a CPU
//! worker refuses `InitWeightSync` and an `NcclBucket` it has no communicator for (and
//! keeps serving its weights). `nccl_push_to_a_gpu_worker_gpu` runs the NCCL push end
//! to end; NCCL refuses two ranks on one GPU, so it needs at least two and skips with a
//! message otherwise.
mod rollout_support;

use proto::v1 as pb;
use proto::v1::rollout_service_client::RolloutServiceClient;
use rollout_support::*;
use tch::Device;
use trainer::rollout::RolloutClient;

async fn serves(client: &RolloutClient, m: &model::Transformer, version: u64) {
    let groups = client
        .generate(jobs(4), 1, sampling(4, None), false, version, |_| {})
        .await
        .unwrap();
    for g in &groups {
        assert_eq!(g.weight_version, version);
        let (ids, _) = greedy_reference(m, &g.prompt_ids, 4);
        assert_eq!(g.completions[0].token_ids, ids, "from {}", g.worker);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_the_existing_path_for_a_cpu_trainer_or_cpu_workers() {
    let ws = [Worker::start().await, Worker::start().await];
    let urls: Vec<&str> = ws.iter().map(|w| w.url.as_str()).collect();
    let client = RolloutClient::connect(config(&urls)).await.unwrap();
    // No device set, then a CPU policy: NCCL is not considered.
    let m = perturbed_model(3);
    let r = push_model(&client, &m, 1).await.unwrap();
    assert_eq!((r.updated.len(), r.data_plane.len()), (2, 2), "{r:?}");
    client.set_policy_device(Device::Cpu);
    let r = push_model(&client, &m, 2).await.unwrap();
    assert_eq!(r.data_plane.len(), 2, "{r:?}");
    // A CUDA policy: the workers are asked, report cpu, and the data plane carries it.
    client.set_policy_device(Device::Cuda(0));
    let m = perturbed_model(4);
    let r = push_model(&client, &m, 3).await.unwrap();
    assert_eq!((r.updated.len(), r.data_plane.len()), (2, 2), "{r:?}");
    assert!(!client.take_nccl_failure(), "NCCL was never tried");
    serves(&client, &m, 3).await;
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nccl_is_refused_naming_the_trainer_device_or_each_cpu_worker() {
    let ws = [Worker::start().await, Worker::start().await];
    let urls: Vec<&str> = ws.iter().map(|w| w.url.as_str()).collect();
    let mut cfg = config(&urls);
    cfg.weight_transport = "nccl".into();
    cfg.validate().unwrap();
    let client = RolloutClient::connect(cfg).await.unwrap();
    client.set_policy_device(Device::Cpu);
    let e = client.begin_push(1).await.err().unwrap().to_string();
    assert!(
        e.contains("weight_transport = \"nccl\"") && e.contains("policy is on cpu"),
        "{e}"
    );
    client.set_policy_device(Device::Cuda(0));
    let e = client.begin_push(1).await.err().unwrap().to_string();
    for u in &urls {
        assert!(e.contains(&format!("{u} runs on cpu")), "{e}");
    }
    // Nothing was applied: the workers still serve version 0.
    let m = load_model();
    serves(&client, &m, 0).await;
    for w in ws {
        w.stop().await;
    }
}

#[test]
fn weight_transport_values_are_validated() {
    let mut cfg = config(&["http://127.0.0.1:1"]);
    for ok in ["auto", "grpc", "nccl"] {
        cfg.weight_transport = ok.into();
        cfg.validate().unwrap();
    }
    cfg.weight_transport = "rdma".into();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("rollout.weight_transport") && e.contains("\"rdma\"") && e.contains("\"nccl\""),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_worker_reports_cpu_and_refuses_nccl_messages() {
    let w = Worker::start().await;
    let mut c = RolloutServiceClient::connect(w.url.clone()).await.unwrap();
    let info = c
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.device, "cpu");
    let req = pb::InitWeightSyncRequest {
        nccl_id: vec![0; 128],
        world_size: 2,
        rank: 1,
        bucket_elements: 1024,
        dtype: pb::Dtype::Bfloat16 as i32,
        session: 7,
        timeout_ms: 1000,
    };
    let s = c.init_weight_sync(req).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(s.message().contains("runs on the cpu"), "{}", s.message());
    // An NcclBucket without a communicator rejects the update; version 0 keeps serving.
    let msgs = vec![
        pb::WeightUpdateMessage {
            kind: Some(pb::weight_update_message::Kind::NcclBucket(
                pb::NcclBucket {
                    session: 7,
                    segments: vec![],
                },
            )),
        },
        pb::WeightUpdateMessage {
            kind: Some(pb::weight_update_message::Kind::Commit(pb::Commit {
                version: 1,
            })),
        },
    ];
    let s = c
        .update_weights(tokio_stream::iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(
        s.message().contains("joined no communicator"),
        "{}",
        s.message()
    );
    let h = c.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.weight_version, 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nccl_push_to_a_gpu_worker_gpu() {
    // NCCL refuses two ranks on one GPU: the trainer takes cuda:0, the worker cuda:1.
    let gpus = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    if gpus < 2 {
        eprintln!("skipping nccl_push_to_a_gpu_worker_gpu: needs 2 GPUs, {gpus} visible");
        return;
    }
    let w = Worker::start_on_device("cuda:1", 4).await;
    let urls = [w.url.as_str()];
    let mut cfg = config(&urls);
    cfg.weight_transport = "nccl".into();
    cfg.weight_dtype = "float32".into();
    // The smallest bucket (1 MiB): the setting reaches both ends and larger tensors
    // split across broadcasts.
    cfg.update_weights_bucket_megabytes = 1;
    let client = RolloutClient::connect(cfg).await.unwrap();
    client.set_policy_device(Device::Cuda(0));
    for version in 1..=2u64 {
        let m = perturbed_model(10 + version as i64);
        let mut push = client.begin_push(version).await.unwrap();
        for (name, t) in m.weights.named() {
            push.send(&name, &t.to(Device::Cuda(0))).await.unwrap();
        }
        let r = push.commit().await.unwrap();
        assert_eq!((r.updated.len(), r.egress_copies), (1, 1), "{r:?}");
        assert!(r.data_plane.is_empty(), "NCCL, not the data plane: {r:?}");
        assert!(!client.take_nccl_failure());
        serves(&client, &m, version).await;
    }
    w.stop().await;
}
