//! Unit tests of the policy loss: hand-computed values, masking, errors.
use super::*;

fn t2(rows: &[&[f64]]) -> Tensor {
    let b = rows.len() as i64;
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_slice(&flat).view([b, -1])
}

fn cfg(loss_type: LossType) -> PolicyLossConfig {
    PolicyLossConfig {
        epsilon: 0.2,
        epsilon_high: 0.28,
        beta: 0.0,
        loss_type,
        max_completion_length: 4,
        ..PolicyLossConfig::default()
    }
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

fn grads(out: &PolicyLoss, lp: &Tensor) -> Vec<Vec<f64>> {
    (&out.loss_sum / out.count as f64).backward();
    Vec::<Vec<f64>>::try_from(&lp.grad()).unwrap()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
}

/// B = 2, T = 2; sequence 0 counts both tokens, sequence 1 only the first.
/// log-ratios: ln 1.5 (above 1.28), ln 0.5 (below 0.8), ln 1.1 (inside), masked.
fn toy() -> (Tensor, Tensor, Tensor, Tensor) {
    let old = t2(&[&[-1.0, -2.0], &[-0.5, -3.0]]);
    let lp = leaf(&(&old + t2(&[&[1.5f64.ln(), 0.5f64.ln()], &[1.1f64.ln(), 0.0]])));
    let adv = Tensor::from_slice(&[2.0f64, -1.0]);
    let mask = t2(&[&[1.0, 1.0], &[1.0, 0.0]]);
    (lp, old, adv, mask)
}

#[test]
fn clipped_loss_by_hand_for_each_type() {
    // Token losses: seq 0 (A = 2): ratio 1.5 -> clipped at 1.28: -2.56; ratio 0.5: the
    // min takes the unclipped 0.5·2 = 1 -> -1. Seq 1 (A = -1): ratio 1.1 -> 1.1.
    let (l00, l01, l10) = (-2.56, -1.0, 1.1);
    let cases = [
        (LossType::Grpo, ((l00 + l01) / 2.0 + l10) / 2.0, 2),
        (LossType::Bnpo, (l00 + l01 + l10) / 3.0, 1),
        (LossType::DrGrpo, (l00 + l01 + l10) / (2.0 * 4.0), 2),
        (LossType::Dapo, (l00 + l01 + l10) / 3.0, 3),
    ];
    for (ty, want, want_count) in cases {
        let (lp, old, adv, mask) = toy();
        let batch = PolicyBatch {
            logprobs: &lp,
            old_logprobs: Some(&old),
            ref_logprobs: None,
            sampler_logprobs: None,
            advantages: &adv,
            mask: &mask,
        };
        let out = policy_loss(&batch, &cfg(ty)).unwrap();
        assert_eq!(out.count, want_count, "{ty:?}");
        close(out.loss_sum.double_value(&[]) / out.count as f64, want);
        // Gradient: the clipped token has none; d(-ratio·A)/dlogp = -ratio·A elsewhere.
        let g = grads(&out, &lp);
        assert_eq!(g[0][0], 0.0, "{ty:?}");
        assert_eq!(g[1][1], 0.0, "{ty:?}");
        let w = match ty {
            LossType::Grpo => [0.25, 0.5],
            LossType::Bnpo | LossType::Dapo => [1.0 / 3.0, 1.0 / 3.0],
            LossType::DrGrpo => [0.125, 0.125],
            LossType::Cispo | LossType::Sapo => unreachable!("not in this table"),
        };
        close(g[0][1], -w[0]);
        close(g[1][0], 1.1 * w[1]);
        assert_eq!(out.stats.tokens, 3.0);
        assert_eq!(out.stats.high_clipped, 1.0);
        // Ratio 0.5 < 0.8 but A > 0: not low-clipped (the min keeps the gradient).
        assert_eq!(out.stats.low_clipped, 0.0);
        assert_eq!(out.stats.region_clipped, 1.0);
        assert_eq!(out.stats.kl_sum, 0.0);
        assert_eq!(out.stats.tis_ratio_sum, 0.0);
    }
}

#[test]
fn low_clip_needs_negative_advantage() {
    let (lp, old, _, mask) = toy();
    let adv = Tensor::from_slice(&[-1.0f64, -1.0]);
    let batch = PolicyBatch {
        logprobs: &lp,
        old_logprobs: Some(&old),
        ref_logprobs: None,
        sampler_logprobs: None,
        advantages: &adv,
        mask: &mask,
    };
    let out = policy_loss(&batch, &cfg(LossType::Dapo)).unwrap();
    assert_eq!(out.stats.low_clipped, 1.0);
    assert_eq!(out.stats.high_clipped, 0.0);
    // With A < 0 the 1.5 ratio is not clipped: -min(-1.5, -1.28) = 1.5; ratio 0.5 ->
    // -min(-0.5, -0.8) = 0.8 (clipped); ratio 1.1 -> 1.1.
    close(out.loss_sum.double_value(&[]), 1.5 + 0.8 + 1.1);
}

#[test]
fn without_old_the_ratio_is_one_and_the_gradient_is_minus_advantage() {
    let (lp, _, adv, mask) = toy();
    let batch = PolicyBatch {
        logprobs: &lp,
        old_logprobs: None,
        ref_logprobs: None,
        sampler_logprobs: None,
        advantages: &adv,
        mask: &mask,
    };
    let out = policy_loss(&batch, &cfg(LossType::Dapo)).unwrap();
    close(out.loss_sum.double_value(&[]), -2.0 - 2.0 + 1.0);
    assert_eq!(out.stats.region_clipped, 0.0);
    let g = grads(&out, &lp);
    close(g[0][0], -2.0 / 3.0);
    close(g[1][0], 1.0 / 3.0);
    assert_eq!(g[1][1], 0.0);
}

#[test]
fn kl_and_tis_terms() {
    let (lp, _, adv, mask) = toy();
    let lp_v = Vec::<Vec<f64>>::try_from(&lp.detach()).unwrap();
    let refp = &lp.detach() + 0.3;
    let sampler = &lp.detach() - t2(&[&[0.1, 2.0], &[-0.2, 0.0]]);
    let mut c = cfg(LossType::Dapo);
    c.beta = 0.5;
    c.correction = Some(IsCorrection {
        mode: IsCorrectionMode::TokenTruncate,
        cap: 2.0,
    });
    let batch = PolicyBatch {
        logprobs: &lp,
        old_logprobs: None,
        ref_logprobs: Some(&refp),
        sampler_logprobs: Some(&sampler),
        advantages: &adv,
        mask: &mask,
    };
    let out = policy_loss(&batch, &c).unwrap();
    let k3 = 0.3f64.exp() - 0.3 - 1.0;
    let w = [0.1f64.exp(), 2.0, (-0.2f64).exp()]; // exp(2) capped at 2
    let want = -2.0 * w[0] - 2.0 * w[1] + 1.0 * w[2] + 3.0 * 0.5 * k3;
    close(out.loss_sum.double_value(&[]), want);
    close(out.stats.kl_sum, 3.0 * k3);
    close(out.stats.tis_ratio_sum, w.iter().sum());
    // d/dlogp of k3(ref - logp) = 1 - exp(ref - logp).
    let g = grads(&out, &lp);
    close(g[0][0], (-2.0 * w[0] + 0.5 * (1.0 - 0.3f64.exp())) / 3.0);
    assert_eq!(lp_v.len(), 2);
}

#[test]
fn fully_masked_sequence_and_garbage_at_masked_positions() {
    let nan = f64::NAN;
    let mut lp = leaf(&t2(&[&[-1.0, f64::NEG_INFINITY], &[nan, f64::INFINITY]]));
    let old = t2(&[&[-1.2, nan], &[f64::NEG_INFINITY, nan]]);
    let refp = t2(&[&[-0.9, f64::INFINITY], &[nan, nan]]);
    let adv = Tensor::from_slice(&[1.0f64, nan]);
    let mask = t2(&[&[1.0, 0.0], &[0.0, 0.0]]);
    for ty in [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
        LossType::Cispo,
        LossType::Sapo,
    ] {
        lp.zero_grad();
        let mut c = cfg(ty);
        c.beta = 0.1;
        let batch = PolicyBatch {
            logprobs: &lp,
            old_logprobs: Some(&old),
            ref_logprobs: Some(&refp),
            sampler_logprobs: None,
            advantages: &adv,
            mask: &mask,
        };
        let out = policy_loss(&batch, &c).unwrap();
        let want_count = match ty {
            LossType::Grpo | LossType::DrGrpo | LossType::Sapo => 2,
            LossType::Bnpo | LossType::Dapo | LossType::Cispo => 1,
        };
        assert_eq!(out.count, want_count, "{ty:?}");
        assert!(out.loss_sum.double_value(&[]).is_finite(), "{ty:?}");
        let g = grads(&out, &lp);
        assert!(g[0][0].is_finite() && g[0][0] != 0.0, "{ty:?}");
        assert_eq!((g[0][1], g[1][0], g[1][1]), (0.0, 0.0, 0.0), "{ty:?}");
        assert_eq!(out.stats.tokens, 1.0);
    }
    // A micro-batch with no counted token: zero loss, dapo count 0.
    let zero = mask.zeros_like();
    let batch = PolicyBatch {
        logprobs: &lp,
        old_logprobs: None,
        ref_logprobs: None,
        sampler_logprobs: None,
        advantages: &adv,
        mask: &zero,
    };
    let out = policy_loss(&batch, &cfg(LossType::Dapo)).unwrap();
    assert_eq!((out.count, out.loss_sum.double_value(&[])), (0, 0.0));
    let out = policy_loss(&batch, &cfg(LossType::Bnpo)).unwrap();
    assert_eq!((out.count, out.loss_sum.double_value(&[])), (1, 0.0));
}

#[test]
fn bool_mask_and_f32_inputs() {
    let (lp, old, adv, mask) = toy();
    let lp32 = leaf(&lp.to_kind(Kind::Float));
    let bmask = mask.to_kind(Kind::Bool);
    let batch = PolicyBatch {
        logprobs: &lp32,
        old_logprobs: Some(&old),
        ref_logprobs: None,
        sampler_logprobs: None,
        advantages: &adv,
        mask: &bmask,
    };
    let out = policy_loss(&batch, &cfg(LossType::Dapo)).unwrap();
    assert_eq!(out.loss_sum.kind(), Kind::Float);
    assert!((out.loss_sum.double_value(&[]) - (-2.56 - 1.0 + 1.1)).abs() < 1e-5);
}

fn err(batch: &PolicyBatch, c: &PolicyLossConfig) -> String {
    policy_loss(batch, c).unwrap_err().to_string()
}

#[test]
fn bad_inputs_are_errors() {
    let (lp, old, adv, mask) = toy();
    let base = PolicyBatch {
        logprobs: &lp,
        old_logprobs: Some(&old),
        ref_logprobs: None,
        sampler_logprobs: None,
        advantages: &adv,
        mask: &mask,
    };
    let c = cfg(LossType::Dapo);
    let flat = lp.view([-1]);
    let e = err(
        &PolicyBatch {
            logprobs: &flat,
            ..base
        },
        &c,
    );
    assert!(e.contains("logprobs must be [B, T], got shape [4]"), "{e}");
    let short = mask.narrow(1, 0, 1);
    let e = err(
        &PolicyBatch {
            mask: &short,
            ..base
        },
        &c,
    );
    assert!(e.contains("mask has shape [2, 1], expected [2, 2]"), "{e}");
    let adv2 = adv.unsqueeze(1);
    let e = err(
        &PolicyBatch {
            advantages: &adv2,
            ..base
        },
        &c,
    );
    assert!(
        e.contains("advantages has shape [2, 1], expected [2]"),
        "{e}"
    );
    let old3 = old.narrow(0, 0, 1);
    let e = err(
        &PolicyBatch {
            old_logprobs: Some(&old3),
            ..base
        },
        &c,
    );
    assert!(e.contains("old_logprobs has shape [1, 2]"), "{e}");
    let ilp = lp.detach().to_kind(Kind::Int64);
    let e = err(
        &PolicyBatch {
            logprobs: &ilp,
            ..base
        },
        &c,
    );
    assert!(e.contains("logprobs has kind Int64"), "{e}");
    let e = err(&base, &PolicyLossConfig { beta: 0.1, ..c });
    assert!(e.contains("beta = 0.1 > 0 needs ref_logprobs"), "{e}");
    let e = err(
        &base,
        &PolicyLossConfig {
            correction: Some(IsCorrection {
                mode: IsCorrectionMode::TokenTruncate,
                cap: 2.0,
            }),
            ..c
        },
    );
    assert!(e.contains("needs sampler_logprobs"), "{e}");
    // Without TIS the sampler's log-probs are ignored, whatever they hold.
    let junk = Tensor::from_slice(&[f64::NAN]);
    let ignored = PolicyBatch {
        sampler_logprobs: Some(&junk),
        ..base
    };
    assert!(policy_loss(&ignored, &c).is_ok());
    let half = &mask * 0.5;
    let e = err(
        &PolicyBatch {
            mask: &half,
            ..base
        },
        &c,
    );
    assert!(e.contains("mask has 3 values other than 0 and 1"), "{e}");
    let bad_old = old.copy();
    let _ = bad_old.get(0).get(1).fill_(f64::NAN);
    let e = err(
        &PolicyBatch {
            old_logprobs: Some(&bad_old),
            ..base
        },
        &c,
    );
    assert!(e.contains("old_logprobs has 1 non-finite values"), "{e}");
    let bad_adv = Tensor::from_slice(&[f64::INFINITY, 1.0]);
    let e = err(
        &PolicyBatch {
            advantages: &bad_adv,
            ..base
        },
        &c,
    );
    assert!(e.contains("advantages has 1 non-finite"), "{e}");
}

#[test]
fn config_validation() {
    let c = cfg(LossType::DrGrpo);
    assert!(c.validate().is_ok());
    let e = PolicyLossConfig {
        max_completion_length: 0,
        ..c
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("max_completion_length must be >= 1 for loss_type dr_grpo"),
        "{e}"
    );
    let e = PolicyLossConfig { epsilon: -0.1, ..c }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("epsilon must be finite and >= 0"), "{e}");
    let e = PolicyLossConfig {
        beta: f64::NAN,
        ..c
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("beta"), "{e}");
    let e = PolicyLossConfig {
        correction: Some(IsCorrection {
            mode: IsCorrectionMode::TokenTruncate,
            cap: 0.0,
        }),
        ..c
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vllm_importance_sampling_cap must be finite and > 0"),
        "{e}"
    );
    let ok = PolicyLossConfig {
        max_completion_length: 0,
        loss_type: LossType::Dapo,
        ..c
    };
    assert!(ok.validate().is_ok());
}

#[test]
fn stats_add_up_and_loss_type_names_match_trl() {
    let mut a = LossStats::from_array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    a += LossStats::from_array([1.0; 6]);
    assert_eq!(a.to_array(), [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
    let names: Vec<String> = [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
    ]
    .iter()
    .map(|t| serde_json::to_string(t).unwrap())
    .collect();
    assert_eq!(names, ["\"grpo\"", "\"bnpo\"", "\"dr_grpo\"", "\"dapo\""]);
    assert_eq!(LossType::default(), LossType::Dapo);
}

/// GSPO, CISPO, SAPO and two-sided clipping on one sequence, by hand.
#[test]
fn sequence_level_cispo_sapo_and_delta_by_hand() {
    // One sequence, A = 1, token log-ratios ln 2 and 0 (their mean: ln √2).
    let old = t2(&[&[-1.0, -2.0]]);
    let lp = leaf(&(&old + t2(&[&[2f64.ln(), 0.0]])));
    let adv = Tensor::from_slice(&[1.0f64]);
    let mask = t2(&[&[1.0, 1.0]]);
    let run = |c: PolicyLossConfig| {
        let lp = leaf(&lp);
        let batch = PolicyBatch {
            logprobs: &lp,
            old_logprobs: Some(&old),
            ref_logprobs: None,
            sampler_logprobs: None,
            advantages: &adv,
            mask: &mask,
        };
        let out = policy_loss(&batch, &c).unwrap();
        let loss = out.loss_sum.double_value(&[]) / out.count as f64;
        (loss, grads(&out, &lp))
    };
    // GSPO: one ratio √2 ≈ 1.414 > 1.28, clipped for A > 0: every token's loss is -1.28.
    let seq = PolicyLossConfig {
        importance_sampling_level: ImportanceSamplingLevel::Sequence,
        ..cfg(LossType::Dapo)
    };
    let (loss, g) = run(seq);
    close(loss, -1.28);
    assert_eq!(g[0], vec![0.0, 0.0]);
    // Below the clip (epsilon_high 0.5), the gradient of -√2 per token through the mean
    // log-ratio: d/dlogp_t = -√2 / 2 per token, averaged over 2 tokens, times 2 tokens.
    let (loss, g) = run(PolicyLossConfig {
        epsilon_high: 0.5,
        ..seq
    });
    close(loss, -(2f64.sqrt()));
    close(g[0][0], -(2f64.sqrt()) / 2.0);
    close(g[0][1], -(2f64.sqrt()) / 2.0);
    // delta caps the unclipped ratio of a negative advantage: token ratios 2 and 1 with
    // A = -1: max(-r, -clip(r)) -> min(r, delta) = 1.5 on the first token.
    let neg = Tensor::from_slice(&[-1.0f64]);
    let lp2 = leaf(&lp);
    let batch = PolicyBatch {
        logprobs: &lp2,
        old_logprobs: Some(&old),
        ref_logprobs: None,
        sampler_logprobs: None,
        advantages: &neg,
        mask: &mask,
    };
    let c = PolicyLossConfig {
        delta: Some(1.5),
        ..cfg(LossType::Dapo)
    };
    let out = policy_loss(&batch, &c).unwrap();
    close(
        out.loss_sum.double_value(&[]) / out.count as f64,
        (1.5 + 1.0) / 2.0,
    );
    // CISPO: -min(r, epsilon_high) · A · logp, weight detached: d/dlogp = -min(r, 1.3).
    let (_, g) = run(PolicyLossConfig {
        epsilon_high: 1.3,
        ..cfg(LossType::Cispo)
    });
    close(g[0][0], -1.3 / 2.0);
    close(g[0][1], -1.0 / 2.0);
    // SAPO: the gate 4σ(τ(r − 1))/τ; at r = 1 its slope in logp is 1 (the policy gradient).
    let (loss, g) = run(PolicyLossConfig {
        ..cfg(LossType::Sapo)
    });
    let gate = |r: f64, tau: f64| 4.0 / tau / (1.0 + (-(tau * (r - 1.0))).exp());
    close(loss, -(gate(2.0, 1.0) + gate(1.0, 1.0)) / 2.0);
    let s = 1.0 / (1.0 + (-1.0f64).exp());
    close(g[0][0], -4.0 * s * (1.0 - s) * 2.0 / 2.0);
    close(g[0][1], -1.0 / 2.0);
}
