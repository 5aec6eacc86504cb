//! Chunked log-probs and entropy equal the unchunked computation, forward and backward.
mod common;

use common::*;
use model::{
    token_logprobs, token_logprobs_at, token_logprobs_backward, ForwardInput, LogprobOptions,
    Positions, Transformer,
};
use tch::{Device, Kind, Tensor};

/// Plain autograd reference: the full `[B, T, V]` logits at once.
fn unchunked(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> (Tensor, Tensor) {
    let logits = hidden.linear::<Tensor>(head, None).to_kind(Kind::Float) / temperature;
    let logp = logits.log_softmax(-1, Kind::Float);
    let lp = logp
        .gather(-1, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1);
    let ent = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float);
    (lp, ent)
}

fn batch() -> (Transformer, Tensor) {
    let m = Transformer::from_pretrained(model_dir("llama-tiny"), Device::Cpu, None).unwrap();
    tch::manual_seed(3);
    let ids = Tensor::randint(m.config.vocab_size, [2, 11], (Kind::Int64, Device::Cpu));
    (m, ids)
}

#[test]
fn chunked_equals_unchunked_for_every_chunk_size() {
    let (m, ids) = batch();
    let hidden = m.hidden_states(&ForwardInput::new(&ids), None).unwrap();
    let targets = ids.roll([-1], [1]);
    for temperature in [1.0, 0.7] {
        let (lp_ref, ent_ref) = unchunked(&hidden, m.weights.head(), &targets, temperature);
        for chunk_size in [1, 4, 11, 64] {
            let opts = LogprobOptions {
                chunk_size,
                temperature,
                with_entropy: true,
            };
            let out = token_logprobs(&hidden, m.weights.head(), &targets, &opts).unwrap();
            // Same math, matmuls of other shapes: fp32 rounding of |log p| up to ~20.
            assert_close(&out.logprobs, &lp_ref, 2e-5, "logprobs");
            assert_close(out.entropy.as_ref().unwrap(), &ent_ref, 2e-5, "entropy");
        }
    }
}

/// The chunked backward gives every parameter the gradient plain autograd gives.
#[test]
fn chunked_backward_equals_autograd() {
    let (mut m, ids) = batch();
    m.weights.set_requires_grad(true);
    let targets = ids.roll([-1], [1]);
    let g_lp = Tensor::randn([2, 11], (Kind::Float, Device::Cpu));
    let g_ent = Tensor::randn([2, 11], (Kind::Float, Device::Cpu));
    let temperature = 0.9;

    let hidden = m.hidden_states(&ForwardInput::new(&ids), None).unwrap();
    let (lp, ent) = unchunked(&hidden, m.weights.head(), &targets, temperature);
    ((lp * &g_lp).sum(Kind::Float) + (ent * &g_ent).sum(Kind::Float)).backward();
    let reference: Vec<(String, Tensor)> = m
        .weights
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.grad().copy()))
        .collect();
    for (_, t) in m.weights.named() {
        let _ = t.grad().zero_();
    }

    let hidden = m.hidden_states(&ForwardInput::new(&ids), None).unwrap();
    let opts = LogprobOptions {
        chunk_size: 4,
        temperature,
        with_entropy: true,
    };
    let grad_h = token_logprobs_backward(
        &hidden,
        m.weights.head(),
        &targets,
        &opts,
        &g_lp,
        Some(&g_ent),
    )
    .unwrap();
    (hidden * grad_h.detach()).sum(Kind::Float).backward();
    for ((name, want), (_, t)) in reference.iter().zip(m.weights.named()) {
        // Same math; the chunked head matmul sums in another order (fp32 rounding of
        // gradients up to ~1, measured 1.24e-5 at most).
        assert_close(&t.grad(), want, 2e-5, name);
    }
}

/// Log-probs at the masked positions only equal the unmasked ones there, 0 elsewhere;
/// gather and scatter are inverse on the selection.
#[test]
fn masked_positions_equal_the_full_computation() {
    let (m, ids) = batch();
    let hidden = m.hidden_states(&ForwardInput::new(&ids), None).unwrap();
    let targets = ids.roll([-1], [1]);
    let (lp_ref, ent_ref) = unchunked(&hidden, m.weights.head(), &targets, 0.8);
    // A prompt, a completion and right padding per row.
    let mask = Tensor::zeros([2, 11], (Kind::Float, Device::Cpu));
    let _ = mask.narrow(1, 3, 5).get(0).fill_(1.0);
    let _ = mask.narrow(1, 6, 5).get(1).fill_(1.0);
    let opts = LogprobOptions {
        chunk_size: 3,
        temperature: 0.8,
        with_entropy: true,
    };
    let out = token_logprobs_at(&hidden, m.weights.head(), &targets, &mask, &opts).unwrap();
    assert_close(&out.logprobs, &(&lp_ref * &mask), 2e-5, "masked logprobs");
    assert_close(
        out.entropy.as_ref().unwrap(),
        &(&ent_ref * &mask),
        2e-5,
        "masked entropy",
    );
    let at = Positions::new(&mask).unwrap();
    assert_eq!(at.count(), 10);
    let packed = at.gather(&hidden).unwrap();
    assert_eq!(packed.size(), vec![1, 10, hidden.size()[2]]);
    let back = at.scatter(&packed).unwrap();
    assert_close(
        &back,
        &(&hidden * mask.unsqueeze(-1)),
        0.0,
        "scatter of gather",
    );
    let e = at.gather(&hidden.narrow(1, 0, 10)).unwrap_err();
    assert!(e.to_string().contains("position mask [2, 11]"), "{e}");
}

#[test]
fn bad_shapes_are_errors() {
    let h = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
    let w = Tensor::zeros([10, 5], (Kind::Float, Device::Cpu));
    let t = Tensor::zeros([1, 3], (Kind::Int64, Device::Cpu));
    let e = token_logprobs(&h, &w, &t, &LogprobOptions::default()).unwrap_err();
    assert!(e.to_string().contains("head [V, H]"), "{e}");
    let w = Tensor::zeros([10, 4], (Kind::Float, Device::Cpu));
    let opts = LogprobOptions {
        chunk_size: 0,
        ..Default::default()
    };
    assert!(token_logprobs(&h, &w, &t, &opts).is_err());
}
