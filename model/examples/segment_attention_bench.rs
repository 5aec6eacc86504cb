//! Shared-prefix attention benchmark (not a test): forward + backward of
//! `model::fused::segment_attention` (the fused CPU kernel) against SDPA under the dense
//! segment mask (the composite op the kernel replaced), f32 on CPU, alternating, median
//! of `SEGMENT_BENCH_REPEATS` (default 30) per shape. Shapes: the demo's (prompts of 17
//! tokens, 8 completions of 12, 4 heads over 2 kv heads of 32) and a long one (a prompt
//! of 256 and 8 completions of 1,024, 8 heads over 2 kv heads of 64). Prints each time
//! and the fused / SDPA ratio (below 1: the kernel is faster). Set OMP_NUM_THREADS;
//! `SEGMENT_BENCH_SHAPES=demo` runs one shape.
//!
//!     cargo run --release -p model --example segment_attention_bench
use std::time::Instant;

use model::fused::{segment_attention_composite, segment_attention_fused, segment_mask, Segments};
use tch::{Device, Kind, Tensor};

struct Shape {
    name: &'static str,
    rows: i64,
    prompt: i64,
    completions: i64,
    completion: i64,
    nh: i64,
    nkv: i64,
    d: i64,
}

fn segments(s: &Shape) -> Tensor {
    let mut row = vec![0i64; s.prompt as usize];
    for c in 0..s.completions {
        row.extend(std::iter::repeat_n(c + 1, s.completion as usize));
    }
    let t = row.len() as i64;
    Tensor::from_slice(&row).view([1, t]).repeat([s.rows, 1])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let repeats: usize = std::env::var("SEGMENT_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let shapes = [
        Shape {
            name: "demo",
            rows: 8,
            prompt: 17,
            completions: 8,
            completion: 12,
            nh: 4,
            nkv: 2,
            d: 32,
        },
        Shape {
            name: "long",
            rows: 1,
            prompt: 256,
            completions: 8,
            completion: 1024,
            nh: 8,
            nkv: 2,
            d: 64,
        },
    ];
    let only = std::env::var("SEGMENT_BENCH_SHAPES").ok();
    println!("shape  tokens  fused_ms  sdpa_ms  fused/sdpa");
    for s in &shapes {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|n| n == s.name))
        {
            continue;
        }
        let seg = Segments::rows(segments(s));
        let t = seg.ids.size()[1];
        let mask = segment_mask(&seg);
        let opts = (Kind::Float, Device::Cpu);
        let q = Tensor::randn([s.rows, t, s.nh, s.d], opts).transpose(1, 2);
        let k = Tensor::randn([s.rows, t, s.nkv, s.d], opts).transpose(1, 2);
        let v = Tensor::randn([s.rows, t, s.nkv, s.d], opts).transpose(1, 2);
        let up = Tensor::randn([s.rows, t, s.nh * s.d], opts);
        let time = |fused: bool| {
            let [q, k, v] = [&q, &k, &v].map(|x| x.detach().set_requires_grad(true));
            let start = Instant::now();
            let y = if fused {
                segment_attention_fused(&q, &k, &v, &seg).expect("the fused kernel runs")
            } else {
                segment_attention_composite(&q, &k, &v, &mask)
            };
            (y * &up).sum(Kind::Float).backward();
            start.elapsed().as_secs_f64() * 1e3
        };
        time(true);
        time(false);
        let (mut fused, mut sdpa) = (vec![], vec![]);
        for _ in 0..repeats {
            fused.push(time(true));
            sdpa.push(time(false));
        }
        let (f, r) = (median(fused), median(sdpa));
        println!(
            "{:<6} {:>6}  {f:>8.3}  {r:>7.3}  {:>10.3}",
            s.name,
            s.rows * t,
            f / r
        );
    }
}
