//! Weight pushes over the workers' TCP data plane, against real in-process workers (tiny
//! Qwen2 fixture on CPU): a chain of three and one stream each, f32 and bf16 on the
//! wire; after every commit each worker serves exactly the trainer's weights (its greedy
//! completions and log-probs equal a full forward of the pushed model), and the gRPC
//! path is still chosen when asked for.
mod rollout_support;

use rollout_support::*;
use trainer::rollout::RolloutClient;

/// Generates on every worker at `version` and checks each group against `m`.
async fn check_all_serve(client: &RolloutClient, m: &model::Transformer, version: u64, n: usize) {
    let used = check_served(client, m, version).await;
    assert_eq!(used.len(), n, "every worker serves version {version}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_over_a_chain_of_three_and_direct_streams_serve_the_trainers_weights() {
    let ws = [
        Worker::start_with(4).await,
        Worker::start_with(4).await,
        Worker::start_with(4).await,
    ];
    let urls: Vec<&str> = ws.iter().map(|w| w.url.as_str()).collect();
    let numel: usize = load_model()
        .weights
        .named()
        .iter()
        .map(|(_, t)| t.numel())
        .sum();
    let mut version = 0;
    for (chain, wire) in [
        (true, "float32"),
        (true, "bfloat16"),
        (false, "bfloat16"),
        (false, "float32"),
    ] {
        let mut cfg = config(&urls);
        cfg.weight_chain = chain;
        cfg.weight_dtype = wire.into();
        let client = RolloutClient::connect(cfg).await.unwrap();
        version += 1;
        let m = perturbed_model(40 + version as i64);
        let r = push_model(&client, &m, version).await.unwrap();
        assert!(r.failed.is_empty(), "chain {chain} {wire}: {:?}", r.failed);
        assert_eq!(r.updated.len(), 3);
        assert_eq!(
            r.data_plane.len(),
            3,
            "every worker fed over the data plane"
        );
        assert_eq!(r.egress_copies, if chain { 1 } else { 3 });
        let size = if wire == "float32" { 4 } else { 2 };
        assert_eq!(r.bytes as usize, numel * size);
        if wire == "bfloat16" {
            round_to_bf16(&m);
        }
        check_all_serve(&client, &m, version, 3).await;
    }
    // The gRPC path when asked for (chunks on the UpdateWeights streams).
    let mut cfg = config(&urls);
    cfg.weight_transport = "grpc".into();
    cfg.weight_chunk_bytes = 4096;
    let client = RolloutClient::connect(cfg).await.unwrap();
    let m = perturbed_model(77);
    version += 1;
    let r = push_model(&client, &m, version).await.unwrap();
    assert_eq!(r.updated.len(), 3, "{:?}", r.failed);
    assert!(r.data_plane.is_empty());
    assert_eq!(r.egress_copies, 3);
    check_all_serve(&client, &m, version, 3).await;
    drop(client);
    for w in ws {
        w.stop().await;
    }
}
