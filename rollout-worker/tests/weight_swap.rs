//! Applying a weight update received over the real data plane (loopback sockets) to a
//! served model with tied embeddings (the qwen2-tiny fixture): where the wire dtype is
//! the model's, the parameters take over the staging storage (a swap, no copy) and the
//! old storage is the next update's staging; elsewhere one conversion in place. After
//! each of three updates the model's weights equal the sent ones bit for bit, the head
//! stays tied to the embeddings, and its logits equal those of a model that got the same
//! values by a plain copy.
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use model::Transformer;
use proto::data_plane::{self as dp, Route, TensorHeader};
use rollout_worker::data_plane::DataPlane;
use rollout_worker::weights::{self, Applied};
use tch::{Device, Kind, Tensor};

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let mut b = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut b, t.numel());
    b
}

/// Sends `tensors` (in their own dtype) to `plane` with `token`; the final status.
fn send(plane: &DataPlane, token: &dp::Token, tensors: &[(String, Tensor)]) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", plane.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    dp::write_hello(&mut s, token, dp::Lane::SOLE).unwrap();
    dp::read_status(&mut s).unwrap()?;
    dp::write_route(&mut s, &Route::default()).unwrap();
    for (name, t) in tensors {
        let b = bytes_of(t);
        let dtype = if t.kind() == Kind::Float { 1 } else { 2 };
        let h = TensorHeader {
            name: name.clone(),
            dtype,
            shape: t.size(),
            offset: 0,
            num_bytes: b.len() as u64,
        };
        s.write_all(&dp::encode_header(&h)).unwrap();
        s.write_all(&b).unwrap();
    }
    s.write_all(&dp::END).unwrap();
    dp::read_status(&mut s).unwrap()
}

fn logits(m: &Transformer) -> Tensor {
    full_logits(m, &[1, 5, 9, 2, 7, 3])
}

/// Three updates of `live` (served in `serve`) sent in `wire`: `swap` says whether the
/// parameters take over the staging storage.
async fn three_updates(serve: Kind, wire: Kind, swap: bool) {
    let live =
        Transformer::from_pretrained(fixture("qwen2-tiny"), Device::Cpu, Some(serve)).unwrap();
    assert!(live.config.tie_word_embeddings, "the fixture ties its head");
    let specs = model::param_specs(&live.config);
    let (plane, _task) = DataPlane::start([127, 0, 0, 1].into(), 0, specs, Duration::from_secs(20))
        .await
        .unwrap();
    let mut previous_live: Option<Vec<usize>> = None;
    for round in 0..3u8 {
        tch::manual_seed(100 + round as i64);
        let sent: Vec<(String, Tensor)> = live
            .weights
            .named()
            .into_iter()
            .map(|(n, t)| {
                (
                    n,
                    (t.to_kind(Kind::Float) + Tensor::randn_like(&t.to_kind(Kind::Float)) * 0.05)
                        .to_kind(wire),
                )
            })
            .collect();
        let token = [40 + round; dp::TOKEN_BYTES];
        let mut pending = plane.register(token).unwrap();
        let s2: Vec<(String, Tensor)> = sent
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let p2 = plane.clone();
        let status = tokio::task::spawn_blocking(move || send(&p2, &token, &s2));
        let mut staged = tokio::time::timeout(Duration::from_secs(30), pending.wait())
            .await
            .unwrap()
            .unwrap();
        status.await.unwrap().unwrap();
        let staging: Vec<usize> = staged
            .tensors
            .iter()
            .map(|(_, t)| t.data_ptr() as usize)
            .collect();
        if let (true, Some(prev)) = (swap, &previous_live) {
            // The storage the model gave up at the last update is this update's staging.
            assert_eq!(
                &staging, prev,
                "round {round}: the recycled buffers are the staging"
            );
        }
        let before: Vec<usize> = live
            .weights
            .named()
            .iter()
            .map(|(_, t)| t.data_ptr() as usize)
            .collect();
        let applied = weights::apply(&live.weights, &mut staged).unwrap();
        let n = sent.len();
        let want = if swap {
            Applied {
                swapped: n,
                copied: 0,
            }
        } else {
            Applied {
                swapped: 0,
                copied: n,
            }
        };
        assert_eq!(applied, want, "round {round}");
        drop(staged); // recycled as the next update's staging
        for ((name, t), (_, s)) in live.weights.named().iter().zip(&sent) {
            assert_eq!(t.kind(), serve, "{name}");
            assert_eq!(
                bytes_of(t),
                bytes_of(&s.to_kind(serve)),
                "round {round}: {name} differs"
            );
        }
        let after: Vec<usize> = live
            .weights
            .named()
            .iter()
            .map(|(_, t)| t.data_ptr() as usize)
            .collect();
        if swap {
            assert_eq!(
                after, staging,
                "round {round}: the model serves the staging storage"
            );
        } else {
            assert_eq!(after, before, "round {round}: converted in place");
        }
        assert!(live.weights.lm_head.is_none());
        assert_eq!(
            live.weights.head().data_ptr(),
            live.weights.embed_tokens.data_ptr(),
            "the head stays tied to the embeddings"
        );
        // The same values copied into a fresh model give the same logits, bit for bit.
        let copy =
            Transformer::from_pretrained(fixture("qwen2-tiny"), Device::Cpu, Some(serve)).unwrap();
        let _g = tch::no_grad_guard();
        for ((_, d), (_, s)) in copy.weights.named().iter().zip(&sent) {
            d.shallow_clone().copy_(s);
        }
        assert_eq!(
            bytes_of(&logits(&live)),
            bytes_of(&logits(&copy)),
            "round {round}: logits"
        );
        previous_live = Some(before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f32_wire_to_an_f32_model_swaps_storage_and_recycles_it() {
    three_updates(Kind::Float, Kind::Float, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_wire_to_a_bf16_model_swaps_storage_and_recycles_it() {
    three_updates(Kind::BFloat16, Kind::BFloat16, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_wire_to_an_f32_model_converts_in_place() {
    three_updates(Kind::Float, Kind::BFloat16, false).await;
}
