//! Decode attention over the paged cache, one thread, the long-completion benchmark's
//! geometry (6 heads, 2 KV heads, head_dim 32, blocks of 16, 6 layers' worth of calls
//! not included: one layer): 32 sequences, one query each, at several context lengths.
//! Times (CPU time of this thread, mean of 20 calls) the kernel with AVX2 + FMA and portable, and SDPA over a gathered copy, and
//! gives the kernel's share of the memcpy bandwidth (K and V bytes it must read over
//! bytes copied per second).
//!
//!   cargo run -p model --example paged_kernel_bench --profile dev
use std::time::Instant;

use model::paged::{gathered_attention, paged_attention_isa, Geometry, Isa, SeqSpan};
use tch::{Device, Kind, Tensor};

fn memcpy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let (t, c) = (Instant::now(), cpu_time());
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min((cpu_time() - c).min(t.elapsed().as_secs_f64()));
    }
    n as f64 / best
}

/// This thread's time on a CPU in seconds (Linux schedstat), so that a loaded machine's
/// waits for a core do not count; stalls on memory do.
fn cpu_time() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns * 1e-9)
}

/// Mean CPU seconds of `f` over `reps` calls after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = cpu_time();
    for _ in 0..reps {
        f();
    }
    (cpu_time() - t) / reps as f64
}

fn main() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let geo = Geometry {
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 32,
        block_size: 16,
    };
    let seqs = 32;
    let bw = memcpy_bandwidth();
    println!("memcpy {:.2} GB/s, {seqs} sequences, {geo:?}", bw / 1e9);
    for ctx in [256usize, 1024, 2048] {
        let per = ctx.div_ceil(geo.block_size);
        let nb = (seqs * per) as i64;
        // Sequences' blocks interleaved, as concurrent decoding allocates them.
        let tables: Vec<Vec<u32>> = (0..seqs)
            .map(|s| (0..per).map(|i| (i * seqs + s) as u32).collect())
            .collect();
        let spans: Vec<SeqSpan> = tables
            .iter()
            .enumerate()
            .map(|(s, b)| SeqSpan {
                q_start: s,
                q_len: 1,
                ctx_len: ctx,
                blocks: b,
            })
            .collect();
        let shape = [nb, 2, 16, 32];
        let k = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let v = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let q = Tensor::randn([seqs as i64, 6, 32], (Kind::Float, Device::Cpu));
        let f = |t: &Tensor| unsafe {
            std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel())
        };
        let mut out = vec![0f32; q.numel()];
        let bytes = (2 * seqs * ctx * 2 * 32 * 4) as f64;
        let mut row = format!("ctx {ctx:5}:");
        for isa in [Isa::Avx2Fma, Isa::Scalar] {
            if Isa::best(32) != Isa::Avx2Fma && isa == Isa::Avx2Fma {
                continue;
            }
            let s = time(20, || {
                paged_attention_isa(isa, geo, f(&q), f(&k), f(&v), &spans, &mut out, 1).unwrap()
            });
            row += &format!(
                " {isa:?} {:.3} ms ({:.0}% of memcpy)",
                s * 1e3,
                100.0 * bytes / bw / s
            );
        }
        let s = time(5, || {
            let _ = gathered_attention(geo, &k, &v, &q, &spans).unwrap();
        });
        row += &format!(" gathered SDPA {:.3} ms", s * 1e3);
        println!("{row}");
    }
}
