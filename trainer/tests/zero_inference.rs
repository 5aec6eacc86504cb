//! The engine's gradient-free paths against the unsharded model: `forward_no_grad`
//! gives the same log-probs as `model::Transformer`, and `visit_full_weights` walks
//! exactly the model's parameters with the values `full_weights` gathers, at every stage
//! on a CPU ring of 2 ranks (threads).
use std::path::PathBuf;

use model::{ForwardInput, LogprobOptions, ModelConfig, Transformer, Weights};
use tch::{Device, Kind, Tensor};
use trainer::dist::{self, Backend, DistConfig, RendezvousEnv};
use trainer::zero::engine::BoxError;
use trainer::zero::{LossOutput, MicroBatch, OptimConfig, ZeroConfig, ZeroEngine, ZeroStage};

/// f32, same math in another order (sharded gathers vs resident tensors).
const TOL: f64 = 1e-5;

fn load() -> (ModelConfig, Weights) {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated/qwen2-tiny");
    assert!(d.exists(), "{} missing: run scripts/test.sh", d.display());
    model::load_pretrained(d, Device::Cpu, Some(Kind::Float)).unwrap()
}

fn engine(world: usize, rank: usize, port: u16, stage: ZeroStage) -> ZeroEngine {
    let cfg = DistConfig {
        backend: Backend::Ring,
        timeout_secs: 60,
        ..DistConfig::default()
    };
    let comm = dist::connect(
        &cfg,
        &RendezvousEnv::loopback(rank, world, port),
        Device::Cpu,
    )
    .unwrap();
    let (mcfg, w) = load();
    let zero = ZeroConfig {
        stage,
        ..ZeroConfig::default()
    };
    let optim = OptimConfig {
        learning_rate: 1e-2,
        ..OptimConfig::default()
    };
    ZeroEngine::new(mcfg, &w, zero, optim, 4, Device::Cpu, comm).unwrap()
}

fn ids() -> Tensor {
    Tensor::from_slice(&[5i64, 17, 3, 99, 42, 7, 1, 8, 250, 31, 64, 2]).view([2, 6])
}

fn logprobs(hidden: &Tensor, head: &Tensor, ids: &Tensor) -> Result<Tensor, BoxError> {
    let t = ids.size()[1] - 1;
    model::token_logprobs(
        &hidden.narrow(1, 0, t),
        head,
        &ids.narrow(1, 1, t),
        &LogprobOptions::default(),
    )
    .map(|l| l.logprobs)
    .map_err(Into::into)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The unsharded model's log-probs of `ids()` and its parameters.
fn reference() -> (Tensor, Vec<(String, Tensor)>) {
    let (cfg, w) = load();
    let original = w.named().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let reference = Transformer::new(cfg, w);
    let ids = ids();
    let logits = reference.forward(&ForwardInput::new(&ids), None).unwrap();
    let t = ids.size()[1] - 1;
    let expected = logits
        .narrow(1, 0, t)
        .log_softmax(-1, Kind::Float)
        .gather(-1, &ids.narrow(1, 1, t).unsqueeze(-1), false)
        .squeeze_dim(-1);
    (expected, original)
}

#[test]
fn forward_no_grad_and_weight_walk_match_the_unsharded_model() {
    for stage in [
        ZeroStage::Stage0,
        ZeroStage::Stage1,
        ZeroStage::Stage2,
        ZeroStage::Stage3,
    ] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let results: Vec<(f64, usize, f64, f64)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|rank| {
                    s.spawn(move || {
                        let (expected, original) = reference();
                        let ids = &ids();
                        let mut e = engine(2, rank, port, stage);
                        let mb = MicroBatch {
                            input_ids: ids.shallow_clone(),
                            attention_mask: None,
                            position_ids: None,
                            segment_ids: None,
                        };
                        let lp = e
                            .forward_no_grad(&mb, |h, head| logprobs(h, head, ids))
                            .unwrap();
                        let fwd_diff = max_abs(&lp, &expected);

                        // Before any step the walk returns the loaded weights.
                        let mut seen = vec![];
                        e.visit_full_weights(|name, t| {
                            seen.push((name.to_string(), t.copy()));
                            Ok(())
                        })
                        .unwrap();
                        let mut init_diff = 0f64;
                        for (name, t) in &seen {
                            let o = &original.iter().find(|(n, _)| n == name).unwrap().1;
                            init_diff = init_diff.max(max_abs(t, o));
                        }

                        // After a step it agrees with `full_weights`.
                        e.forward_backward(&mb, |h, head| {
                            let lp = logprobs(h, head, ids)?;
                            Ok(LossOutput {
                                loss_sum: -lp.sum(Kind::Float),
                                count: lp.numel() as i64,
                            })
                        })
                        .unwrap();
                        e.step().unwrap();
                        let full = e.full_weights().unwrap();
                        let full = full.named();
                        let mut step_diff = 0f64;
                        e.visit_full_weights(|name, t| {
                            let f = &full.iter().find(|(n, _)| n == name).unwrap().1;
                            step_diff = step_diff.max(max_abs(t, f));
                            Ok(())
                        })
                        .unwrap();
                        (fwd_diff, seen.len(), init_diff, step_diff)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (fwd, n, init, step)) in results.into_iter().enumerate() {
            assert!(
                fwd < TOL,
                "stage {stage:?} rank {rank}: log-probs differ by {fwd}"
            );
            assert_eq!(
                n,
                load().1.named().len(),
                "stage {stage:?}: every parameter once"
            );
            assert!(
                init < TOL,
                "stage {stage:?} rank {rank}: initial weights {init}"
            );
            assert!(
                step == 0.0,
                "stage {stage:?} rank {rank}: after a step {step}"
            );
        }
    }
}

#[test]
fn an_error_in_the_visitor_is_returned_without_desynchronising_ranks() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let results: Vec<(bool, f64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    let mut e = engine(2, rank, port, ZeroStage::Stage3);
                    let r = e.visit_full_weights(|_, _| {
                        if rank == 0 {
                            Err("worker went away".into())
                        } else {
                            Ok(())
                        }
                    });
                    // The ranks are still in step: a collective afterwards works.
                    let w = e.full_weights().unwrap();
                    (
                        r.is_err(),
                        w.named()[0].1.abs().sum(Kind::Float).double_value(&[]),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results[0].0 && !results[1].0);
    assert_eq!(results[0].1, results[1].1);
}

/// The reference model (`ZeroEngine::new_frozen`) holds only its stage's compute
/// parameters: no gradients, master weights or optimizer state; its log-probs equal the
/// unsharded model's (stages 2 and 3, 2 ranks), and training on it is refused.
#[test]
fn a_frozen_engine_holds_parameters_only_and_matches_the_model() {
    for stage in [ZeroStage::Stage2, ZeroStage::Stage3] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::thread::scope(|s| {
            for rank in 0..2 {
                s.spawn(move || {
                    let (expected, _) = reference();
                    let cfg = DistConfig {
                        backend: Backend::Ring,
                        timeout_secs: 60,
                        ..DistConfig::default()
                    };
                    let comm =
                        dist::connect(&cfg, &RendezvousEnv::loopback(rank, 2, port), Device::Cpu)
                            .unwrap();
                    let (mcfg, w) = load();
                    let numel: usize = w.named().iter().map(|(_, t)| t.numel()).sum();
                    let zero = ZeroConfig {
                        stage,
                        ..ZeroConfig::default()
                    };
                    let mut e = ZeroEngine::new_frozen(mcfg, &w, zero, Device::Cpu, comm).unwrap();
                    let m = e.memory();
                    assert_eq!(
                        (m.grad_bytes, m.optimizer_bytes),
                        (0, 0),
                        "{stage:?}: {m:?}"
                    );
                    let full = numel * 4;
                    match stage {
                        ZeroStage::Stage3 => assert!(m.param_bytes <= full / 2 + 4096, "{m:?}"),
                        _ => assert_eq!(m.param_bytes, full),
                    }
                    let ids = &ids();
                    let mb = MicroBatch {
                        input_ids: ids.shallow_clone(),
                        attention_mask: None,
                        position_ids: None,
                        segment_ids: None,
                    };
                    let lp = e
                        .forward_no_grad(&mb, |h, head| logprobs(h, head, ids))
                        .unwrap();
                    assert!(max_abs(&lp, &expected) < 1e-5, "{stage:?}");
                    let err = e.step().unwrap_err().to_string();
                    assert!(err.contains("frozen"), "{err}");
                });
            }
        });
    }
}
