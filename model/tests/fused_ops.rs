//! The fused CPU ops of `model::fused` (csrc/fused_ops.cpp: RMSNorm and rotary embedding
//! with hand-written backward) against the composite torch ops they replace: values and
//! the gradients autograd computes through each, in f64 (within 1e-12: only summation
//! order differs) and in f32 (within 2e-6 of the values' scale), for contiguous and
//! strided inputs; inputs the kernels do not take (bf16) go to the composite op.
use model::fused::{rms_norm, rms_norm_composite, rms_norm_fused, rope, rope_composite};
use tch::{Device, Kind, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn seeded(shape: &[i64], kind: Kind, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (kind, Device::Cpu))
}

/// Values and gradients (w.r.t. every input in `grads_of`) of `f` at `inputs`, under the
/// upstream gradient `up`.
fn value_and_grads(
    f: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    grads_of: &[usize],
    up: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = t.detach().copy();
            if grads_of.contains(&i) {
                t.set_requires_grad(true)
            } else {
                t
            }
        })
        .collect();
    let y = f(&leaves);
    (&y * up).sum(y.kind()).backward();
    let grads = grads_of.iter().map(|&i| leaves[i].grad().copy()).collect();
    (y.detach(), grads)
}

/// RMSNorm in the input's own dtype (the composite op normalises in f32, as transformers).
fn rms_norm_native(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let var = x.pow_tensor_scalar(2).mean_dim(-1, true, x.kind());
    w * (x * (var + eps).rsqrt())
}

fn check_rms(kind: Kind, tol: f64, strided: bool) {
    let x = seeded(&[3, 7, 32], kind, 1);
    let x = if strided {
        // A transposed view of the same values' layout: not contiguous.
        x.transpose(0, 1).contiguous().transpose(0, 1)
    } else {
        x
    };
    let w = seeded(&[32], kind, 2) * 0.5 + 1.0;
    let up = seeded(&[3, 7, 32], kind, 3);
    let inputs = [x, w];
    // f32 through the public op; f64 straight into the kernel (the public op keeps
    // transformers' f32 normalisation for f64 and so takes the composite op).
    let (a, ga) = if kind == Kind::Float {
        value_and_grads(|t| rms_norm(&t[0], &t[1], 1e-6), &inputs, &[0, 1], &up)
    } else {
        let fused = |t: &[Tensor]| rms_norm_fused(&t[0], &t[1], 1e-6).unwrap();
        value_and_grads(fused, &inputs, &[0, 1], &up)
    };
    let (b, gb) = value_and_grads(
        |t| rms_norm_native(&t[0], &t[1], 1e-6),
        &inputs,
        &[0, 1],
        &up,
    );
    assert!(
        max_diff(&a, &b) <= tol,
        "{kind:?} value: {}",
        max_diff(&a, &b)
    );
    for (i, (p, q)) in ga.iter().zip(&gb).enumerate() {
        // d/dw sums 21 rows: allow for it.
        let scale = if i == 1 { 21.0 } else { 1.0 };
        assert!(
            max_diff(p, q) <= tol * scale,
            "{kind:?} grad {i}: {}",
            max_diff(p, q)
        );
    }
}

#[test]
fn rms_norm_matches_the_composite_op_in_f64_and_f32() {
    check_rms(Kind::Double, 1e-12, false);
    check_rms(Kind::Double, 1e-12, true);
    check_rms(Kind::Float, 2e-6, false);
    check_rms(Kind::Float, 2e-6, true);
}

fn check_rope(kind: Kind, tol: f64, strided: bool) {
    // [B, T, heads, d]; cos/sin of arbitrary angles (the halves need not repeat).
    let x = seeded(&[2, 5, 3, 8], kind, 4);
    let x = if strided {
        x.transpose(1, 2).contiguous().transpose(1, 2)
    } else {
        x
    };
    let angle = seeded(&[2, 5, 8], kind, 5) * 3.0;
    let (cos, sin) = (angle.cos(), angle.sin());
    let up = seeded(&[2, 5, 3, 8], kind, 6);
    let inputs = [x, cos, sin];
    let (a, ga) = value_and_grads(|t| rope(&t[0], &t[1], &t[2]), &inputs, &[0], &up);
    let (b, gb) = value_and_grads(|t| rope_composite(&t[0], &t[1], &t[2]), &inputs, &[0], &up);
    assert!(
        max_diff(&a, &b) <= tol,
        "{kind:?} value: {}",
        max_diff(&a, &b)
    );
    assert!(
        max_diff(&ga[0], &gb[0]) <= tol,
        "{kind:?} grad: {}",
        max_diff(&ga[0], &gb[0])
    );
}

#[test]
fn rope_matches_the_composite_op_in_f64_and_f32() {
    check_rope(Kind::Double, 1e-12, false);
    check_rope(Kind::Double, 1e-12, true);
    check_rope(Kind::Float, 2e-6, false);
    check_rope(Kind::Float, 2e-6, true);
}

#[test]
fn rope_matches_transformers_formula_with_tied_halves() {
    // The tables transformers builds: cos/sin of cat(freqs, freqs).
    let x = seeded(&[1, 4, 2, 6], Kind::Double, 7);
    let freqs = seeded(&[1, 4, 3], Kind::Double, 8);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    let (cos, sin) = (emb.cos(), emb.sin());
    let y = rope(&x, &cos, &sin);
    // Rotation of each pair (x_i, x_{i+3}) by the angle freqs_i.
    for i in 0..3 {
        let (c, s) = (freqs.narrow(2, i, 1).cos(), freqs.narrow(2, i, 1).sin());
        let (c, s) = (c.unsqueeze(2), s.unsqueeze(2));
        let (x1, x2) = (x.narrow(3, i, 1), x.narrow(3, i + 3, 1));
        let want1 = &x1 * &c - &x2 * &s;
        let want2 = &x2 * &c + &x1 * &s;
        assert!(max_diff(&y.narrow(3, i, 1), &want1) < 1e-12);
        assert!(max_diff(&y.narrow(3, i + 3, 1), &want2) < 1e-12);
    }
}

#[test]
fn inputs_the_kernels_do_not_take_use_the_composite_ops() {
    let x = seeded(&[2, 3, 16], Kind::Float, 9).to_kind(Kind::BFloat16);
    let w = seeded(&[16], Kind::Float, 10).to_kind(Kind::BFloat16);
    let a = rms_norm(&x, &w, 1e-6).to_kind(Kind::Float);
    let b = rms_norm_composite(&x, &w, 1e-6).to_kind(Kind::Float);
    assert_eq!(max_diff(&a, &b), 0.0);
    // Mixed dtypes (f32 activations, f64 weight) are not fused either.
    let x = seeded(&[2, 3, 16], Kind::Float, 11);
    let w = seeded(&[16], Kind::Double, 12);
    let a = rms_norm(&x, &w, 1e-6);
    let b = rms_norm_composite(&x, &w, 1e-6);
    assert_eq!(max_diff(&a, &b), 0.0);
}

#[test]
fn the_kernels_name_what_they_refuse() {
    let x = seeded(&[2, 3, 16], Kind::Float, 13);
    let err = rms_norm_fused(&x, &seeded(&[8], Kind::Float, 14), 1e-6).unwrap_err();
    assert!(err.contains("weight has shape [8]"), "{err}");
    let err = rms_norm_fused(&x, &seeded(&[16], Kind::Double, 15), 1e-6).unwrap_err();
    assert!(err.contains("Double"), "{err}");
    // The public ops check first and run the composite op (here: broadcasting cos).
    let x = seeded(&[2, 3, 2, 4], Kind::Float, 16);
    let cos = seeded(&[1, 3, 4], Kind::Float, 17);
    let sin = seeded(&[1, 3, 4], Kind::Float, 18);
    let a = rope(&x, &cos, &sin);
    assert_eq!(max_diff(&a, &rope_composite(&x, &cos, &sin)), 0.0);
}
