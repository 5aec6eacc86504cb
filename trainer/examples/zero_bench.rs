//! ZeRO benchmark (not a test): step time and per-rank model-state bytes of stages 0-3
//! at world sizes 1 and 2 (ranks as threads on the CPU ring over loopback) for a
//! ~20M-parameter Qwen2-shaped model (H 256, 12 layers, 4/2 heads, I 1024, V 32000,
//! tied), f32, 2 x 256 tokens per rank per step, LM loss.
//!
//! Stages 2 and 3 at world size 2 also run with `overlap_comm` off; each on/off pair is
//! measured `ZERO_BENCH_REPEATS` times (default 3), alternating, and the medians are
//! compared, so load from other processes hits both sides alike
//! (`ZERO_BENCH_OVERLAP_ONLY=1` runs only this comparison).
//!
//!     cargo run --release -p trainer --example zero_bench
use std::time::Instant;

use model::{ModelConfig, Weights};
use tch::{Device, Kind, Tensor};
use trainer::dist::{self, Backend, DistConfig, RendezvousEnv};
use trainer::zero::{LossOutput, MicroBatch, OptimConfig, ZeroConfig, ZeroEngine, ZeroStage};

fn config() -> ModelConfig {
    let raw = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 32000, "hidden_size": 256,
        "intermediate_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": true
    });
    ModelConfig::from_json(raw, std::path::Path::new("bench")).unwrap()
}

/// The same random initial weights on every rank (tch's RNG is global, so one at a time).
fn init_weights() -> Weights {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap();
    tch::manual_seed(0);
    Weights::random(&config(), Kind::Float, Device::Cpu)
}

fn run(world: usize, stage: ZeroStage, overlap_comm: bool) -> (f64, usize) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let results: Vec<(f64, usize)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let cfg = DistConfig {
                        backend: if world == 1 {
                            Backend::Auto
                        } else {
                            Backend::Ring
                        },
                        ..DistConfig::default()
                    };
                    let comm = dist::connect(
                        &cfg,
                        &RendezvousEnv::loopback(rank, world, port),
                        Device::Cpu,
                    )
                    .unwrap();
                    let zero = ZeroConfig {
                        stage,
                        overlap_comm,
                        ..ZeroConfig::default()
                    };
                    let weights = init_weights();
                    let mut e = ZeroEngine::new(
                        config(),
                        &weights,
                        zero,
                        OptimConfig::default(),
                        10,
                        Device::Cpu,
                        comm,
                    )
                    .unwrap();
                    let ids = (Tensor::arange(2 * 256, (Kind::Int64, Device::Cpu)).view([2, 256])
                        * (rank as i64 + 7))
                        .remainder(32000);
                    let step = |e: &mut ZeroEngine| {
                        let mb = MicroBatch {
                            input_ids: ids.shallow_clone(),
                            attention_mask: None,
                            position_ids: None,
                            segment_ids: None,
                        };
                        e.forward_backward(&mb, |h, head| {
                            let logp = h.linear::<Tensor>(head, None).log_softmax(-1, Kind::Float);
                            let nll = -logp
                                .narrow(1, 0, 255)
                                .gather(-1, &ids.narrow(1, 1, 255).unsqueeze(-1), false)
                                .sum(Kind::Float);
                            Ok(LossOutput {
                                loss_sum: nll,
                                count: 2 * 255,
                            })
                        })
                        .unwrap();
                        e.step().unwrap();
                    };
                    step(&mut e); // warm-up
                    let iters = 3;
                    let t = Instant::now();
                    for _ in 0..iters {
                        step(&mut e);
                    }
                    (t.elapsed().as_secs_f64() / iters as f64, e.memory().total())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    results[0]
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let only_overlap = std::env::var_os("ZERO_BENCH_OVERLAP_ONLY").is_some();
    let repeats: usize = std::env::var("ZERO_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let p = init_weights().num_params();
    println!("params {p}, torch threads {}", tch::get_num_threads());
    for world in [1usize, 2] {
        if only_overlap {
            break;
        }
        let base = run(world, ZeroStage::Stage0, true);
        for stage in [
            ZeroStage::Stage0,
            ZeroStage::Stage1,
            ZeroStage::Stage2,
            ZeroStage::Stage3,
        ] {
            let (secs, bytes) = if stage == ZeroStage::Stage0 {
                base
            } else {
                run(world, stage, true)
            };
            println!(
                "world {world} stage {}: step {secs:.3}s ({:.2}x stage 0), model state {:.1} MiB/rank ({:.2}x stage 0, {:.1} bytes/param)",
                stage.number(),
                secs / base.0,
                bytes as f64 / (1 << 20) as f64,
                bytes as f64 / base.1 as f64,
                bytes as f64 / p as f64
            );
        }
    }
    for stage in [ZeroStage::Stage2, ZeroStage::Stage3] {
        let (mut on, mut off) = (vec![], vec![]);
        for _ in 0..repeats {
            on.push(run(2, stage, true).0);
            off.push(run(2, stage, false).0);
        }
        let min = |xs: &[f64]| xs.iter().copied().fold(f64::INFINITY, f64::min);
        let (on_min, off_min) = (min(&on), min(&off));
        let (on, off) = (median(on), median(off));
        println!(
            "world 2 stage {}: overlap_comm on {on:.3}s, off {off:.3}s, on/off {:.2}x \
             (median of {repeats}; best {on_min:.3}s vs {off_min:.3}s, {:.2}x)",
            stage.number(),
            on / off,
            on_min / off_min
        );
    }
}
