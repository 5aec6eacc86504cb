//! The paged KV cache against the contiguous reference: every logit row a paged step
//! produces equals the full forward (no cache) of that sequence's tokens, through
//! chunked prefill, mixed lengths, admission into freed blocks, removal, preemption
//! (blocks freed, recomputed) and shared prefixes with copy-on-write; and the CPU
//! kernel equals SDPA over a gathered copy in f32 and bf16.
mod common;

use common::*;
use model::paged::{
    gathered_attention, paged_attention, paged_attention_isa, AttentionBackend, BlockPool,
    Geometry, Isa, PagedKvCache, PagedStep, SeqSpan,
};
use model::{ForwardInput, Transformer};
use tch::{Device, Kind, Tensor};

/// fp32 logits, paged against the full forward: within 1e-5 relative to the row's
/// largest logit (the two differ only in summation order: packed rows vs one sequence
/// in the matrix products, blocked vs fused softmax in attention).
const TOL: f64 = 1e-5;

struct Seq {
    tokens: Vec<i64>,
    computed: usize,
    blocks: Vec<u32>,
}

impl Seq {
    fn new(tokens: Vec<i64>) -> Self {
        Seq {
            tokens,
            computed: 0,
            blocks: vec![],
        }
    }

    /// Shares every block of `self` (a fork after prefill).
    fn fork(&self, pool: &mut BlockPool) -> Seq {
        for &b in &self.blocks {
            pool.share(b);
        }
        Seq {
            tokens: self.tokens.clone(),
            computed: self.computed,
            blocks: self.blocks.clone(),
        }
    }

    fn free(&mut self, pool: &mut BlockPool) {
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
        self.computed = 0;
    }
}

/// Computes `chunk[i]` more tokens of `seqs[i]` in one packed step and returns the
/// logits of each sequence's last computed token.
fn step(
    m: &Transformer,
    cache: &mut PagedKvCache,
    pool: &mut BlockPool,
    seqs: &mut [&mut Seq],
    chunks: &[usize],
) -> Tensor {
    let bs = pool.block_size();
    for (s, &c) in seqs.iter_mut().zip(chunks) {
        // Copy-on-write: the partial block we are about to write into is shared.
        if !s.computed.is_multiple_of(bs) {
            let i = s.computed / bs;
            let b = s.blocks[i];
            if pool.refcount(b) > 1 {
                let nb = pool.allocate().expect("pool has room");
                cache.copy_block(b, nb).unwrap();
                pool.release(b);
                s.blocks[i] = nb;
            }
        }
        while s.blocks.len() * bs < s.computed + c {
            s.blocks.push(pool.allocate().expect("pool has room"));
        }
    }
    let mut tokens = vec![];
    let mut rows = vec![];
    let mut meta = vec![];
    for (s, &c) in seqs.iter().zip(chunks) {
        meta.push((tokens.len(), c, s.computed + c));
        tokens.extend_from_slice(&s.tokens[s.computed..s.computed + c]);
        rows.push(tokens.len() as i64 - 1);
    }
    let spans: Vec<SeqSpan> = seqs
        .iter()
        .zip(&meta)
        .map(|(s, &(q_start, q_len, ctx_len))| SeqSpan {
            q_start,
            q_len,
            ctx_len,
            blocks: &s.blocks,
        })
        .collect();
    let logits = m
        .forward_paged(
            &PagedStep {
                tokens: &tokens,
                spans: &spans,
            },
            cache,
            &rows,
        )
        .unwrap();
    drop(spans);
    for (s, &c) in seqs.iter_mut().zip(chunks) {
        s.computed += c;
    }
    logits
}

fn full_last_logits(m: &Transformer, tokens: &[i64]) -> Tensor {
    let ids = Tensor::from_slice(tokens).view([1, -1]);
    m.forward(&ForwardInput::new(&ids), None)
        .unwrap()
        .get(0)
        .get(-1)
}

fn check(m: &Transformer, logits: &Tensor, seqs: &[&Seq], what: &str) {
    for (r, s) in seqs.iter().enumerate() {
        let reference = full_last_logits(m, &s.tokens[..s.computed]);
        let d = max_abs_diff(&logits.get(r as i64), &reference);
        let scale = reference.abs().max().double_value(&[]).max(1.0);
        assert!(
            d <= TOL * scale,
            "{what}: row {r} differs by {d} (largest logit {scale})"
        );
    }
}

fn argmax(logits: &Tensor, r: i64) -> i64 {
    logits.get(r).argmax(-1, false).int64_value(&[])
}

fn prompt(len: usize, salt: i64, vocab: i64) -> Vec<i64> {
    (0..len as i64)
        .map(|i| (i * 7 + salt * 13 + 3) % vocab)
        .collect()
}

fn scenario(m: &Transformer, backend: AttentionBackend) {
    let _g = tch::no_grad_guard();
    let bs = 4;
    let mut pool = BlockPool::new(64, bs);
    let mut cache = PagedKvCache::new(&m.config, 64, bs, m.kind(), Device::Cpu).unwrap();
    cache.set_backend(backend).unwrap();
    let v = m.config.vocab_size;
    let mut a = Seq::new(prompt(13, 1, v));
    let mut b = Seq::new(prompt(5, 2, v));
    let mut c = Seq::new(prompt(30, 3, v));
    // Mixed: A whole, B chunked (3 of 5).
    let l = step(m, &mut cache, &mut pool, &mut [&mut a, &mut b], &[13, 3]);
    check(m, &l, &[&a, &b], "prefill A, chunk of B");
    a.tokens.push(argmax(&l, 0));
    // Decode A, rest of B, first chunk of C.
    let l = step(
        m,
        &mut cache,
        &mut pool,
        &mut [&mut a, &mut b, &mut c],
        &[1, 2, 16],
    );
    check(m, &l, &[&a, &b, &c], "decode A, end of B, chunk of C");
    a.tokens.push(argmax(&l, 0));
    b.tokens.push(argmax(&l, 1));
    // B forks into B2 sharing its blocks (5 tokens: the second block is partial).
    let mut b2 = b.fork(&mut pool);
    *b2.tokens.last_mut().unwrap() = (b.tokens.last().unwrap() + 1) % v;
    let l = step(
        m,
        &mut cache,
        &mut pool,
        &mut [&mut a, &mut b, &mut b2, &mut c],
        &[1, 1, 1, 14],
    );
    check(
        m,
        &l,
        &[&a, &b, &b2, &c],
        "shared prefix with copy-on-write",
    );
    assert_ne!(b.blocks[1], b2.blocks[1], "the partial block was copied");
    assert_eq!(b.blocks[0], b2.blocks[0], "full blocks stay shared");
    for (r, s) in [&mut a, &mut b, &mut b2, &mut c].into_iter().enumerate() {
        s.tokens.push(argmax(&l, r as i64));
    }
    // A finishes; C is preempted (blocks freed); D is admitted into the freed blocks.
    let used = pool.num_used();
    a.free(&mut pool);
    c.free(&mut pool);
    assert!(pool.num_used() < used);
    let mut d = Seq::new(prompt(9, 4, v));
    let l = step(
        m,
        &mut cache,
        &mut pool,
        &mut [&mut b, &mut d, &mut b2],
        &[1, 9, 1],
    );
    check(m, &l, &[&b, &d, &b2], "after removal and admission");
    b.tokens.push(argmax(&l, 0));
    d.tokens.push(argmax(&l, 1));
    // C resumes: prompt + its generated token recomputed in one chunk.
    let n = c.tokens.len();
    let l = step(
        m,
        &mut cache,
        &mut pool,
        &mut [&mut c, &mut b, &mut d],
        &[n, 1, 1],
    );
    check(m, &l, &[&c, &b, &d], "preempted sequence recomputed");
}

#[test]
fn paged_steps_equal_the_full_forward_f32() {
    for name in ["qwen2-tiny", "llama-tiny"] {
        let m = Transformer::from_pretrained(model_dir(name), Device::Cpu, None).unwrap();
        scenario(&m, AttentionBackend::CpuKernel);
        scenario(&m, AttentionBackend::GatherSdpa);
    }
}

/// `(q_len, ctx_len, blocks)` per sequence.
type Seqs = Vec<(usize, usize, Vec<u32>)>;

/// Key pool, value pool (`[num_blocks, nkv, bs, d]`) and packed queries for `seqs`.
fn random_tensors(geo: Geometry, kind: Kind, seqs: &Seqs, seed: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(seed);
    let nb = seqs.iter().flat_map(|s| &s.2).max().map_or(1, |&b| b + 1) as i64;
    let (nh, nkv, d, bs) = (
        geo.num_heads as i64,
        geo.num_kv_heads as i64,
        geo.head_dim as i64,
        geo.block_size as i64,
    );
    let k = Tensor::randn([nb, nkv, bs, d], (Kind::Float, Device::Cpu)).to_kind(kind);
    // Values on an offset so rows of output are not near zero.
    let v = (Tensor::randn([nb, nkv, bs, d], (Kind::Float, Device::Cpu)) + 0.5).to_kind(kind);
    let n: usize = seqs.iter().map(|s| s.0).sum();
    let q = (Tensor::randn([n as i64, nh, d], (Kind::Float, Device::Cpu)) * 2.0).to_kind(kind);
    (k, v, q)
}

/// Geometry, key pool, value pool, packed queries, sequences.
fn random_case(kind: Kind, seed: i64) -> (Geometry, Tensor, Tensor, Tensor, Seqs) {
    let geo = Geometry {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 24,
        block_size: 8,
    };
    // (q_len, ctx_len, blocks): decode rows and prefill chunks, blocks out of order.
    let seqs = vec![
        (1, 37, vec![5, 3, 9, 1, 20]),
        (6, 6, vec![7]),
        (1, 1, vec![0]),
        (19, 40, vec![30, 31, 2, 4, 11, 12]),
        (1, 64, vec![13, 14, 15, 16, 17, 18, 19, 21]),
    ];
    let (k, v, q) = random_tensors(geo, kind, &seqs, seed);
    (geo, k, v, q, seqs)
}

fn spans_of(seqs: &[(usize, usize, Vec<u32>)]) -> Vec<SeqSpan<'_>> {
    let mut start = 0;
    seqs.iter()
        .map(|(q_len, ctx_len, blocks)| {
            let s = SeqSpan {
                q_start: start,
                q_len: *q_len,
                ctx_len: *ctx_len,
                blocks,
            };
            start += q_len;
            s
        })
        .collect()
}

/// The kernel's output with `isa` on `threads` threads (q, k, v contiguous CPU tensors).
fn kernel_out(
    isa: Isa,
    geo: Geometry,
    k: &Tensor,
    v: &Tensor,
    q: &Tensor,
    spans: &[SeqSpan],
    threads: usize,
) -> Tensor {
    let out = q.empty_like();
    let n = q.numel();
    // SAFETY: contiguous CPU tensors of the matching element type, alive for the call.
    unsafe {
        if q.kind() == Kind::Float {
            let f = |t: &Tensor| std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel());
            let o = std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n);
            paged_attention_isa(isa, geo, f(q), f(k), f(v), spans, o, threads).unwrap();
        } else {
            let f = |t: &Tensor| {
                std::slice::from_raw_parts(t.data_ptr() as *const half::bf16, t.numel())
            };
            let o = std::slice::from_raw_parts_mut(out.data_ptr() as *mut half::bf16, n);
            paged_attention_isa(isa, geo, f(q), f(k), f(v), spans, o, threads).unwrap();
        }
    }
    out
}

/// The ISAs this machine runs for `head_dim` (the portable one always).
fn isas(head_dim: usize) -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    if Isa::best(head_dim) != Isa::Scalar {
        v.push(Isa::best(head_dim));
    }
    v
}

/// f32 within 1e-5 of SDPA (summation order only); bf16 storage: the kernel reads the
/// same bf16 keys and values and accumulates in fp32, SDPA rounds its intermediates to
/// bf16, hence 2e-2.
fn tolerance(kind: Kind) -> f64 {
    if kind == Kind::Float {
        1e-5
    } else {
        2e-2
    }
}

#[test]
fn kernel_equals_sdpa_over_a_gathered_copy_f32_and_bf16() {
    let _g = tch::no_grad_guard();
    for kind in [Kind::Float, Kind::BFloat16] {
        for threads in [1, 3] {
            let (geo, k, v, q, seqs) = random_case(kind, 11);
            let spans = spans_of(&seqs);
            let reference = gathered_attention(geo, &k, &v, &q, &spans).unwrap();
            for isa in isas(geo.head_dim) {
                let out = kernel_out(isa, geo, &k, &v, &q, &spans, threads);
                let d = max_abs_diff(&out.to_kind(Kind::Float), &reference.to_kind(Kind::Float));
                assert!(
                    d <= tolerance(kind),
                    "{kind:?}, {isa:?}, {threads} threads: differs by {d}"
                );
            }
        }
    }
}

/// The one-pass kernel across GQA group sizes (1, 2, 4 and 6, which folds 4 + 2 rows),
/// head dims on and off the 8-lane path, block sizes that are and are not multiples of
/// 8, one-key sequences, contexts ending on and just past a block boundary, many blocks,
/// prefill chunks longer than a query tile, and a threads > sequences split.
#[test]
fn kernel_geometries_equal_sdpa() {
    let _g = tch::no_grad_guard();
    let shapes = [
        (4, 4, 32, 16),
        (4, 2, 16, 5),
        (8, 2, 32, 16),
        (12, 2, 8, 8),
        (6, 3, 20, 4),
    ];
    for (ci, &(nh, nkv, d, bs)) in shapes.iter().enumerate() {
        let geo = Geometry {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            block_size: bs,
        };
        // Blocks handed out in a scrambled order, as a long-running pool does.
        let mut next = 0u32;
        let mut take = |ctx: usize| -> Vec<u32> {
            let b: Vec<u32> = (0..ctx.div_ceil(bs))
                .map(|i| next + i as u32)
                .rev()
                .collect();
            next += b.len() as u32;
            b
        };
        let seqs: Seqs = vec![
            (1, 1, take(1)),
            (1, bs, take(bs)),
            (1, bs + 1, take(bs + 1)),
            (1, 40 * bs + 3, take(40 * bs + 3)),
            (2 * bs + 1, 2 * bs + 1, take(2 * bs + 1)),
            (21, 3 * bs + 21, take(3 * bs + 21)),
        ];
        for kind in [Kind::Float, Kind::BFloat16] {
            let (k, v, q) = random_tensors(geo, kind, &seqs, 7 + ci as i64);
            let spans = spans_of(&seqs);
            let reference = gathered_attention(geo, &k, &v, &q, &spans).unwrap();
            for isa in isas(d) {
                for threads in [1, 8] {
                    let out = kernel_out(isa, geo, &k, &v, &q, &spans, threads);
                    let diff =
                        max_abs_diff(&out.to_kind(Kind::Float), &reference.to_kind(Kind::Float));
                    assert!(
                        diff <= tolerance(kind),
                        "{geo:?} {kind:?} {isa:?} {threads} threads: differs by {diff}"
                    );
                }
            }
        }
    }
}

#[test]
fn kernel_rejects_inconsistent_spans() {
    let (geo, k, v, q, mut seqs) = random_case(Kind::Float, 3);
    seqs[0].1 = 100; // more keys than its blocks hold
    let spans = spans_of(&seqs);
    let f =
        |t: &Tensor| unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) };
    let mut out = vec![0f32; q.numel()];
    let e = paged_attention(geo, f(&q), f(&k), f(&v), &spans, &mut out, 1).unwrap_err();
    assert!(e.to_string().contains("sequence 0"), "{e}");
    // head_dim 24 is on the 8-lane path; 20 is not.
    let bad = Geometry {
        head_dim: 20,
        ..geo
    };
    let e =
        paged_attention_isa::<f32>(Isa::Avx2Fma, bad, &[], &[], &[], &[], &mut [], 1).unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
}
