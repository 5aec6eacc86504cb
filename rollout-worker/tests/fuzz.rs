//! Fuzz targets of the worker (test_support::fuzz, mutation-based): OpenAI HTTP bodies
//! through the router, gRPC `Generate` requests (mutated wire bytes, decoded and sent to
//! a real server), and `UpdateWeights` chunk sequences through the assembler. Every
//! input must end in a response or an error status, never a panic, a 500 or a dead
//! engine. `scripts/fuzz.sh` runs them for a bounded time (`FUZZ_SECS`).
mod common;

use std::sync::Arc;

use axum::body::Body;
use http_body_util::BodyExt;
use model::ParamSpec;
use prost::Message;
use proto::v1 as pb;
use rollout_worker::weights::{TensorChunk, WeightAssembler, WireDType};
use rollout_worker::{EngineHandle, Metrics};
use test_support::fuzz::fuzz;
use tower_service::Service;

#[test]
fn fuzz_http_request_bodies() {
    let engine =
        EngineHandle::load(&common::tiny_config(), Arc::new(Metrics::new("test"))).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut app = rollout_worker::http::router(engine.clone());
    let seeds: Vec<Vec<u8>> = [
        r#"{"prompt": "hi", "max_tokens": 3, "n": 2, "temperature": 0.7, "seed": 1}"#,
        r#"{"prompt": [[1, 2], [3]], "max_tokens": 2, "logprobs": 2, "stop": ["a", "b"]}"#,
        r#"{"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 2, "logprobs": true, "top_logprobs": 3}"#,
        r#"{"messages": [{"role": "system", "content": [{"type": "text", "text": "x"}]}], "max_completion_tokens": 2, "stream": true}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut n = 0usize;
    fuzz("http_bodies", &seeds, 300, |body| {
        n += 1;
        let path = if n.is_multiple_of(2) {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        let req = axum::http::Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_vec()))
            .unwrap();
        let status = rt.block_on(async {
            let resp = app.call(req).await.unwrap();
            let status = resp.status();
            // Drain streams too: an SSE body fails (or ends) like any other.
            let _ = resp.into_body().collect().await;
            status
        });
        assert!(
            status.is_success() || status.is_client_error(),
            "status {status} for {:?}",
            String::from_utf8_lossy(body)
        );
    });
    assert!(engine.stats().alive, "the engine died");
}

#[test]
fn fuzz_grpc_generate_requests() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let worker = rt.block_on(common::Worker::start(common::tiny_config()));
    let mut client = rt.block_on(worker.client());
    let req = |input: pb::prompt::Input, n: u32, max: u32| pb::GenerateRequest {
        prompts: vec![pb::Prompt {
            id: "p".into(),
            input: Some(input),
        }],
        n,
        sampling: Some(pb::SamplingParams {
            max_new_tokens: max,
            stop: vec!["x".into()],
            seed: Some(3),
            ..Default::default()
        }),
        return_text: true,
    };
    let seeds: Vec<Vec<u8>> = vec![
        req(
            pb::prompt::Input::TokenIds(pb::TokenIds { ids: vec![1, 2, 3] }),
            2,
            3,
        )
        .encode_to_vec(),
        req(
            pb::prompt::Input::Chat(pb::ChatMessages {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "hello".into(),
                }],
            }),
            1,
            2,
        )
        .encode_to_vec(),
    ];
    let mut sent = 0u64;
    fuzz("grpc_generate", &seeds, 200, |bytes| {
        let Ok(r) = pb::GenerateRequest::decode(bytes) else {
            return;
        };
        sent += 1;
        rt.block_on(async {
            match client.generate(r).await {
                Ok(resp) => {
                    let mut s = resp.into_inner();
                    while let Ok(Some(_)) = s.message().await {}
                }
                Err(status) => {
                    assert_ne!(status.code(), tonic::Code::Internal, "{}", status.message())
                }
            }
        });
    });
    assert!(sent > 0);
    assert!(worker.engine.stats().alive, "the engine died");
    rt.block_on(worker.stop());
}

/// A chunk sequence on the wire: length-delimited `TensorChunk` messages.
fn encode_chunks(chunks: &[pb::TensorChunk]) -> Vec<u8> {
    let mut out = vec![];
    for c in chunks {
        c.encode_length_delimited(&mut out).unwrap();
    }
    out
}

/// Wire chunk to the assembler's input (the mapping `grpc.rs` does).
fn domain(c: pb::TensorChunk) -> TensorChunk {
    let dtype = match pb::Dtype::try_from(c.dtype) {
        Ok(pb::Dtype::Float32) => Some(WireDType::F32),
        Ok(pb::Dtype::Bfloat16) => Some(WireDType::BF16),
        Ok(pb::Dtype::Float16) => Some(WireDType::F16),
        _ => None,
    };
    TensorChunk {
        name: c.name,
        dtype,
        shape: c.shape,
        offset: c.offset,
        data: c.data,
    }
}

#[test]
fn fuzz_update_weights_chunk_sequences() {
    let specs = vec![
        ParamSpec {
            name: "a.weight".into(),
            shape: vec![4, 3],
        },
        ParamSpec {
            name: "b.bias".into(),
            shape: vec![5],
        },
    ];
    let chunk = |name: &str, shape: Vec<i64>, offset: u64, n: usize| pb::TensorChunk {
        name: name.into(),
        dtype: pb::Dtype::Float32 as i32,
        shape,
        offset,
        data: vec![0x3f; n].into(),
    };
    let seeds = vec![
        encode_chunks(&[
            chunk("a.weight", vec![4, 3], 0, 24),
            chunk("a.weight", vec![4, 3], 24, 24),
            chunk("b.bias", vec![5], 0, 20),
        ]),
        encode_chunks(&[
            chunk("b.bias", vec![5], 0, 8),
            chunk("b.bias", vec![5], 8, 12),
            chunk("a.weight", vec![4, 3], 0, 48),
        ]),
    ];
    let mut complete = 0u64;
    fuzz("update_weights_chunks", &seeds, 3000, |bytes| {
        let mut asm = WeightAssembler::new(&specs);
        let mut buf = bytes;
        while !buf.is_empty() {
            let Ok(c) = pb::TensorChunk::decode_length_delimited(&mut buf) else {
                return;
            };
            if asm.add_chunk(domain(c)).is_err() {
                return;
            }
        }
        if let Ok(staged) = asm.finish() {
            complete += 1;
            // A complete update holds exactly the specs' tensors, whole.
            assert_eq!(staged.tensors.len(), specs.len());
            for ((name, t), spec) in staged.tensors.iter().zip(&specs) {
                assert_eq!(name, &spec.name);
                assert_eq!(t.size(), spec.shape);
            }
        }
    });
    assert!(complete > 0, "no input assembled a complete update");
}
