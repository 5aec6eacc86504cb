//! Real-token packing benchmark (not a test): forward + backward of the demo checkpoint
//! (demo/checkpoint, f32, CPU) over shared-prefix rows padded to the longest, with the
//! token-wise ops over the padded `[B, T]` layout against packed real tokens
//! ([`model::packing`]), alternating, median of `PACKING_BENCH_REPEATS` (default 40)
//! per padding share. Prints the packed / padded time ratio (below 1: packing pays).
//!
//!     cargo run --release -p model --example packing_bench
use std::time::Instant;

use model::{ForwardInput, Transformer};
use tch::{Device, Kind, Tensor};

/// A batch of `rows` shared-prefix rows: row `i` is a prompt of `prompt` tokens and
/// `per_row` completions whose lengths vary so that `share` of the positions are padding
/// (approximately).
fn batch(rows: i64, prompt: i64, per_row: i64, share: f64) -> (Tensor, Tensor, Tensor) {
    let full = prompt + per_row * 16;
    // Row i loses a share of completion tokens growing with i: mean loss = share * full.
    let lengths: Vec<i64> = (0..rows)
        .map(|i| {
            let lose = (2.0 * share * full as f64 * i as f64 / (rows - 1) as f64) as i64;
            (full - lose).max(prompt + per_row)
        })
        .collect();
    let t = *lengths.iter().max().unwrap();
    let (mut ids, mut pos, mut seg) = (vec![], vec![], vec![]);
    for &len in &lengths {
        let completion = (len - prompt) / per_row;
        for j in 0..t {
            if j < prompt {
                ids.push(3 + j % 200);
                pos.push(j);
                seg.push(0);
            } else if j < prompt + completion * per_row {
                let k = (j - prompt) / completion;
                ids.push(3 + (j * 7) % 250);
                pos.push(prompt + (j - prompt) % completion);
                seg.push(k + 1);
            } else {
                ids.push(0);
                pos.push(0);
                seg.push(-1);
            }
        }
    }
    let shape = [rows, t];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&pos).view(shape),
        Tensor::from_slice(&seg).view(shape),
    )
}

fn step(m: &Transformer, ids: &Tensor, pos: &Tensor, seg: &Tensor, pack: bool) -> f64 {
    let input = ForwardInput::new(ids)
        .with_positions(pos)
        .with_segments(seg);
    let t0 = Instant::now();
    let share = if pack { 0.0 } else { 1.0 };
    let h = m.training_hidden_states(&input, share).unwrap();
    let real = seg.ge(0).to_kind(Kind::Float).unsqueeze(-1);
    let loss = (m.logits(&h).log_softmax(-1, Kind::Float) * real).mean(Kind::Float);
    loss.backward();
    t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    tch::set_num_threads(1);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/checkpoint");
    let mut m = Transformer::from_pretrained(&root, Device::Cpu, Some(Kind::Float)).unwrap();
    m.weights.set_requires_grad(true);
    let repeats: usize = std::env::var("PACKING_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    println!("padding_share  padded_ms  packed_ms  packed/padded");
    for share in [0.0, 0.02, 0.04, 0.07, 0.12, 0.25] {
        let (ids, pos, seg) = batch(8, 17, 8, share);
        let real = seg.ge(0).sum(Kind::Int64).int64_value(&[]) as f64;
        let got = 1.0 - real / seg.numel() as f64;
        let (mut padded, mut packed) = (vec![], vec![]);
        for _ in 0..3 {
            step(&m, &ids, &pos, &seg, false);
            step(&m, &ids, &pos, &seg, true);
        }
        for _ in 0..repeats {
            padded.push(step(&m, &ids, &pos, &seg, false));
            packed.push(step(&m, &ids, &pos, &seg, true));
        }
        let (a, b) = (median(padded), median(packed));
        println!(
            "{got:13.3}  {:9.2}  {:9.2}  {:13.3}",
            a * 1e3,
            b * 1e3,
            b / a
        );
    }
}
