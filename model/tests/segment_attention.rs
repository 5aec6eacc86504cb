//! The fused attention of shared-prefix rows (`model::fused::segment_attention`,
//! csrc/segment_attention.cpp) against SDPA under the dense segment mask it replaces:
//! values at every real query and the gradients of q, k and v, in f64 (within 1e-12:
//! only summation order differs) and f32 (within 2e-6), for grouped, multi- and
//! single-kv-head attention, rows with padding, one-token completions, prompt-only and
//! all-padding rows, SDPA's transposed layout and contiguous inputs, and the packed
//! layout (the real tokens of all rows in one sequence, rows numbered by a stride).
use model::fused::{
    segment_attention, segment_attention_composite, segment_attention_fused,
    segment_attention_is_fused, segment_mask, Segments,
};
use model::TokenPacking;
use tch::{Device, Kind, Tensor};

fn seeded(shape: &[i64], kind: Kind, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (kind, Device::Cpu))
}

/// Rows of `t` tokens as `(prompt, completions)`; the rest of each row is padding.
fn segments(rows: &[(i64, &[i64])], t: i64) -> Tensor {
    let mut ids = vec![];
    for &(prompt, completions) in rows {
        let mut row = vec![0i64; prompt as usize];
        for (k, &c) in completions.iter().enumerate() {
            row.extend(std::iter::repeat_n(k as i64 + 1, c as usize));
        }
        assert!(row.len() as i64 <= t, "a test row is longer than {t}");
        row.resize(t as usize, -1);
        ids.extend(row);
    }
    Tensor::from_slice(&ids).view([rows.len() as i64, t])
}

/// `[B, T, 1]`: 1 at real queries, 0 at padding (whose outputs the kernels define
/// differently and nobody reads).
fn real(seg: &Tensor) -> Tensor {
    seg.ge(0).unsqueeze(-1)
}

struct Case {
    nh: i64,
    nkv: i64,
    d: i64,
    t: i64,
    /// SDPA's layout as the decoder produces it: a transposed view of `[B, T, heads, d]`.
    transposed: bool,
}

fn inputs(c: &Case, b: i64, kind: Kind) -> [Tensor; 3] {
    let make = |heads: i64, seed: i64| {
        if c.transposed {
            seeded(&[b, c.t, heads, c.d], kind, seed).transpose(1, 2)
        } else {
            seeded(&[b, heads, c.t, c.d], kind, seed)
        }
    };
    [make(c.nh, 1), make(c.nkv, 2), make(c.nkv, 3)]
}

/// Values and the gradients of q, k, v of `f` under the upstream gradient `up`.
fn run(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    qkv: &[Tensor; 3],
    up: &Tensor,
) -> Vec<Tensor> {
    let leaves: Vec<Tensor> = qkv
        .iter()
        .map(|t| t.detach().copy().set_requires_grad(true))
        .collect();
    let y = f(&leaves[0], &leaves[1], &leaves[2]);
    (&y * up).sum(y.kind()).backward();
    let mut out = vec![y.detach()];
    out.extend(leaves.iter().map(|l| l.grad().copy()));
    out
}

fn check(c: &Case, rows: &[(i64, &[i64])], kind: Kind, tol: f64) {
    check_layout(c, rows, kind, tol, false);
    check_layout(c, rows, kind, tol, true);
}

/// The fused kernel on the padded rows, or with `packed` on their real tokens packed
/// into one sequence, against SDPA under the dense mask of the padded rows.
fn check_layout(c: &Case, rows: &[(i64, &[i64])], kind: Kind, tol: f64, packed: bool) {
    let seg = segments(rows, c.t);
    let b = rows.len() as i64;
    let qkv = inputs(c, b, kind);
    let mask = real(&seg).to_kind(kind);
    let up = seeded(&[b, c.t, c.nh * c.d], kind, 4) * &mask;
    let padded = Segments::rows(seg.shallow_clone());
    let packing = TokenPacking::new(&seg.ge(0), 0.0).expect("the test rows have padding");
    // [B, heads, T, d] to the packed [1, heads, N, d].
    let pack = |x: &Tensor| packing.pack(&x.transpose(1, 2)).transpose(1, 2);
    let numbered = padded.numbered_by_row();
    let packed_seg = Segments {
        ids: packing.pack(&numbered.ids),
        row_stride: numbered.row_stride,
    };
    let fused = run(
        |q, k, v| {
            if packed {
                packing.unpack(
                    &segment_attention_fused(&pack(q), &pack(k), &pack(v), &packed_seg)
                        .expect("the fused kernel runs"),
                )
            } else {
                segment_attention_fused(q, k, v, &padded).expect("the fused kernel runs")
            }
        },
        &qkv,
        &up,
    );
    let reference = run(
        |q, k, v| segment_attention_composite(q, k, v, &segment_mask(&padded)),
        &qkv,
        &up,
    );
    assert_eq!(fused[0].size(), [b, c.t, c.nh * c.d]);
    let names = ["output", "dq", "dk", "dv"];
    for (i, name) in names.iter().enumerate() {
        let (f, r) = if i == 0 {
            (&fused[0] * &mask, &reference[0] * &mask)
        } else {
            (fused[i].shallow_clone(), reference[i].shallow_clone())
        };
        assert_eq!(f.size(), r.size(), "{name}");
        let diff = (&f - &r).abs().max().double_value(&[]);
        let scale = r.abs().max().double_value(&[]).max(1.0);
        assert!(
            diff <= tol * scale,
            "{name} ({kind:?}, nh {} nkv {}, packed {packed}): differs from SDPA by {diff:e}",
            c.nh,
            c.nkv
        );
    }
    // Padding queries output zeros.
    let pad = (&fused[0] * real(&seg).logical_not().to_kind(kind))
        .abs()
        .max();
    assert_eq!(pad.double_value(&[]), 0.0);
    // The composite op takes the packed layout too (its mask keeps rows apart).
    if packed {
        let [q, k, v] = [&qkv[0], &qkv[1], &qkv[2]].map(pack);
        let composite = segment_attention_composite(&q, &k, &v, &segment_mask(&packed_seg));
        let diff = (packing.unpack(&composite) * &mask - &reference[0] * &mask)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff <= tol * 10.0,
            "the packed composite differs by {diff:e}"
        );
    }
}

const ROWS: &[(i64, &[i64])] = &[
    (5, &[4, 7, 1, 9]),
    (12, &[3, 3, 3, 3, 3, 3, 3, 3]),
    (1, &[30]),
    (20, &[]),
    (0, &[]),
    (3, &[1, 1, 1]),
];

#[test]
fn segment_attention_matches_sdpa_under_the_segment_mask() {
    for (kind, tol) in [(Kind::Double, 1e-12), (Kind::Float, 2e-6)] {
        for (nh, nkv) in [(4, 2), (2, 2), (4, 1)] {
            for transposed in [true, false] {
                let c = Case {
                    nh,
                    nkv,
                    d: 8,
                    t: 37,
                    transposed,
                };
                check(&c, ROWS, kind, tol);
            }
        }
    }
}

#[test]
fn segment_attention_matches_sdpa_at_the_demo_shape() {
    // Head dim 32 (the vectorised width of the demo model), 8 completions per prompt.
    let c = Case {
        nh: 4,
        nkv: 2,
        d: 32,
        t: 112,
        transposed: true,
    };
    let rows: &[(i64, &[i64])] = &[(10, &[12, 11, 13, 9, 12, 12, 10, 14]), (8, &[5; 8])];
    check(&c, rows, Kind::Float, 2e-6);
}

#[test]
fn inputs_the_kernel_does_not_take_run_sdpa() {
    assert!(segment_attention_is_fused(Device::Cpu, Kind::Float));
    assert!(!segment_attention_is_fused(Device::Cpu, Kind::BFloat16));
    assert!(!segment_attention_is_fused(Device::Cuda(0), Kind::Float));
    let seg = segments(&[(3, &[2, 4])], 10);
    let c = Case {
        nh: 2,
        nkv: 1,
        d: 4,
        t: 10,
        transposed: true,
    };
    let qkv = inputs(&c, 1, Kind::BFloat16);
    let seg = Segments::rows(seg);
    let got = segment_attention(&qkv[0], &qkv[1], &qkv[2], &seg);
    let want = segment_attention_composite(&qkv[0], &qkv[1], &qkv[2], &segment_mask(&seg));
    assert_eq!(got.kind(), Kind::BFloat16);
    assert!(got.equal(&want));
}

#[test]
fn the_kernel_names_what_it_refuses() {
    let seg = segments(&[(3, &[2, 4])], 10);
    let c = Case {
        nh: 4,
        nkv: 2,
        d: 4,
        t: 10,
        transposed: false,
    };
    let [q, k, v] = inputs(&c, 1, Kind::Float);
    let cases: [(&str, Tensor, Tensor, Tensor, Tensor); 4] = [
        (
            "seg must be [B, T] int64",
            q.copy(),
            k.copy(),
            v.copy(),
            seg.to_kind(Kind::Int),
        ),
        (
            "seg must be [B, T] int64",
            q.copy(),
            k.copy(),
            v.copy(),
            seg.narrow(1, 0, 9),
        ),
        (
            "share one dtype",
            q.copy(),
            k.to_kind(Kind::Double),
            v.copy(),
            seg.copy(),
        ),
        (
            "does not fit q",
            q.copy(),
            k.narrow(3, 0, 2),
            v.narrow(3, 0, 2),
            seg.copy(),
        ),
    ];
    for (want, q, k, v, s) in cases {
        let err = segment_attention_fused(&q, &k, &v, &Segments::rows(s)).expect_err(want);
        assert!(err.contains(want), "{err:?} does not say {want:?}");
    }
}
