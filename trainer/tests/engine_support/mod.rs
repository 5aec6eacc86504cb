//! A small ZeRO engine over the tiny fixture for the checkpoint and non-finite tests:
//! one rank, or ranks as threads on a loopback ring.
#![allow(dead_code)]
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use trainer::dist::{self, Backend, DistConfig, RendezvousEnv};
use trainer::zero::{LossOutput, MicroBatch, OptimConfig, ZeroConfig, ZeroEngine, ZeroStage};

pub const SEQ: i64 = 8;

pub fn fixture() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated/qwen2-tiny");
    assert!(d.exists(), "{} missing: run scripts/test.sh", d.display());
    d
}

pub fn engine(world: usize, rank: usize, port: u16, optim: OptimConfig) -> ZeroEngine {
    let cfg = DistConfig {
        backend: if world == 1 {
            Backend::Auto
        } else {
            Backend::Ring
        },
        timeout_secs: 60,
        ..DistConfig::default()
    };
    let env = if world == 1 {
        RendezvousEnv::single()
    } else {
        RendezvousEnv::loopback(rank, world, port)
    };
    let comm = dist::connect(&cfg, &env, Device::Cpu).unwrap();
    let (mcfg, w) = model::load_pretrained(fixture(), Device::Cpu, Some(Kind::Float)).unwrap();
    let zero = ZeroConfig {
        stage: ZeroStage::Stage2,
        ..ZeroConfig::default()
    };
    ZeroEngine::new(mcfg, &w, zero, optim, 10, Device::Cpu, comm).unwrap()
}

pub fn optim() -> OptimConfig {
    OptimConfig {
        learning_rate: 1e-2,
        ..OptimConfig::default()
    }
}

/// `[2, SEQ]` token ids of step `step` and rank `rank`.
pub fn batch(step: u64, rank: usize, vocab: i64) -> Tensor {
    let ids: Vec<i64> = (0..2 * SEQ)
        .map(|i| ((step as i64 * 31 + rank as i64 * 17 + i * 7) % vocab).abs())
        .collect();
    Tensor::from_slice(&ids).view([2, SEQ])
}

/// One forward/backward of next-token NLL times `scale` (NaN or inf to poison it).
pub fn forward_backward(e: &mut ZeroEngine, step: u64, scale: f64) {
    let ids = batch(step, e.rank(), e.config().vocab_size);
    let mb = MicroBatch {
        input_ids: ids.shallow_clone(),
        attention_mask: None,
        position_ids: None,
        segment_ids: None,
    };
    e.forward_backward(&mb, |hidden, head| {
        let t = SEQ - 1;
        let logits = hidden.narrow(1, 0, t).linear::<Tensor>(head, None);
        let logp = logits.log_softmax(-1, Kind::Float);
        let tgt = ids.narrow(1, 1, t).unsqueeze(-1);
        let nll = -logp.gather(-1, &tgt, false).sum(Kind::Float);
        Ok(LossOutput {
            loss_sum: nll * scale,
            count: 2 * t,
        })
    })
    .unwrap();
}

/// The full f32 weights, copied.
pub fn weights(e: &mut ZeroEngine) -> Vec<(String, Tensor)> {
    let w = e.full_weights().unwrap();
    w.named().into_iter().map(|(n, t)| (n, t.copy())).collect()
}

pub fn same_weights(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((n1, x), (n2, y))| n1 == n2 && x.equal(y))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `f(rank, port)` on `world` threads.
pub fn run_world<R: Send>(world: usize, f: impl Fn(usize, u16) -> R + Sync) -> Vec<R> {
    let port = free_port();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let f = &f;
                s.spawn(move || f(r, port))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
