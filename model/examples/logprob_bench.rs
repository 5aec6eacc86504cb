//! Chooses `model::FULL_LOGITS_MAX_ELEMENTS`: the training step of the head (log-probs
//! forward, loss, backward to the hidden states and the head) by the one-pass path
//! (`token_logprobs_full` under autograd) against the chunked pair (`token_logprobs`
//! without grad, then `token_logprobs_backward` recomputing chunk by chunk), for
//! growing `N * V`, in the same run.
//!
//!   cargo run -p model --example logprob_bench   # BENCH_REPEAT=5; the work is libtorch's
use std::time::Instant;

use model::{token_logprobs, token_logprobs_backward, token_logprobs_full, LogprobOptions};
use tch::{Device, Kind, Tensor};

fn time(repeat: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..repeat {
        f();
    }
    t.elapsed().as_secs_f64() / repeat as f64
}

fn main() {
    let repeat: usize = std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let h = 512;
    let opts = LogprobOptions {
        chunk_size: 512,
        temperature: 0.9,
        with_entropy: false,
    };
    println!(
        "threads {}, hidden {h}, chunk {}",
        tch::get_num_threads(),
        opts.chunk_size
    );
    println!(
        "{:>6} {:>7} {:>12} {:>10} {:>10} {:>7}",
        "N", "V", "N*V", "full ms", "chunk ms", "ratio"
    );
    for v in [8192i64, 32768] {
        for n in [64i64, 128, 256, 512, 1024, 2048] {
            tch::manual_seed(0);
            let hidden = Tensor::randn([1, n, h], (Kind::Float, Device::Cpu));
            let head = Tensor::randn([v, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let targets = Tensor::randint(v, [1, n], (Kind::Int64, Device::Cpu));
            let full = time(repeat, || {
                let x = hidden.detach().set_requires_grad(true);
                let lp = token_logprobs_full(&x, &head, &targets, &opts).unwrap();
                lp.logprobs.exp().sum(Kind::Float).backward();
                let _ = x.grad();
            });
            let chunked = time(repeat, || {
                let lp = tch::no_grad(|| token_logprobs(&hidden, &head, &targets, &opts)).unwrap();
                let g = lp.logprobs.exp();
                let _ = token_logprobs_backward(&hidden, &head, &targets, &opts, &g, None).unwrap();
            });
            println!(
                "{n:>6} {v:>7} {:>12} {:>10.2} {:>10.2} {:>7.2}",
                n * v,
                full * 1e3,
                chunked * 1e3,
                chunked / full
            );
        }
    }
}
