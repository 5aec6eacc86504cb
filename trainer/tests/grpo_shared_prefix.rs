//! Shared-prefix packing is exact: the per-token log-probs, the GRPO loss and every
//! parameter gradient of the packed layout (one row per group, completions attending to
//! one copy of the prompt) equal those of the unpacked layout (one right-padded row per
//! sample, as `grpo::batch::pack` builds it) within 1e-5 in f32 (gradients relative to
//! their largest element, at least 1). Neither the packed rows nor the unpacked ones the
//! trainer forwards carry a completion's last token (it predicts nothing); the reference
//! forwards every row whole, as transformers does.
use std::path::PathBuf;

use model::{token_logprobs_full, ForwardInput, LogprobOptions, Positions, Transformer};
use tch::{Device, Kind, Tensor};
use trainer::grpo::batch::{pack, Sample};
use trainer::grpo::prefix::{pack_shared_prefix, prompt_runs};
use trainer::grpo::{policy_loss, LossType, PolicyBatch, PolicyLossConfig};

const PAD: i64 = 0;

fn model(name: &str) -> Transformer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated");
    assert!(dir.join(".stamp").exists(), "run scripts/prepare.sh first");
    let mut m = Transformer::from_pretrained(dir.join(name), Device::Cpu, None).unwrap();
    m.weights.set_requires_grad(true);
    m
}

/// Groups of `n` completions of the given lengths after prompts of the given lengths.
fn samples(vocab: i64, groups: &[(usize, &[usize])], seed: i64) -> Vec<Sample> {
    tch::manual_seed(seed);
    let ids = |n: usize| -> Vec<i64> {
        Vec::<i64>::try_from(Tensor::randint_low(
            1,
            vocab,
            [n as i64],
            (Kind::Int64, Device::Cpu),
        ))
        .unwrap()
    };
    let mut out = vec![];
    for (g, (p, lens)) in groups.iter().enumerate() {
        let prompt = ids(*p);
        for (i, &c) in lens.iter().enumerate() {
            out.push(Sample {
                prompt_ids: prompt.clone(),
                completion_ids: ids(c),
                sampler_logprobs: vec![-1.0; c],
                advantage: (g as f32 - 1.0) * 0.5 + i as f32 * 0.25 - 0.3,
                in_loss: (g + i) % 5 != 4,
            });
        }
    }
    out
}

/// Log-probs `[S, L - 1]` (unpacked shifted layout, 0 off the completions), the
/// policy loss on them and every parameter's gradient of `loss + <g, logprobs>`.
struct Outcome {
    logprobs: Tensor,
    loss: f64,
    grads: Vec<(String, Tensor)>,
}

/// The forward layout of [`run`].
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// The reference: every `[prompt, completion]` row whole, as HF forwards it.
    Full,
    /// The unpacked rows without their last column (`PackedBatch::forward_ids`).
    Forward,
    /// Shared-prefix rows of at most this many tokens.
    Shared(usize),
}

fn run(m: &Transformer, samples: &[Sample], layout: Layout, loss_type: LossType) -> Outcome {
    for (_, t) in m.weights.named() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let unpacked = pack(samples, PAD).unwrap();
    let at = Positions::new(&unpacked.completion_mask).unwrap();
    let opts = LogprobOptions::default();
    let head = m.weights.head();
    let flat = match layout {
        Layout::Full | Layout::Forward => {
            let ids = match layout {
                Layout::Full => unpacked.input_ids.shallow_clone(),
                _ => unpacked.forward_ids(),
            };
            let h = m.hidden_states(&ForwardInput::new(&ids), None).unwrap();
            let t = unpacked.targets.size()[1];
            let h = h.narrow(1, 0, t);
            token_logprobs_full(
                &at.gather(&h).unwrap(),
                head,
                &at.gather(&unpacked.targets).unwrap(),
                &opts,
            )
            .unwrap()
            .logprobs
        }
        Layout::Shared(budget) => {
            let sp = pack_shared_prefix(&prompt_runs(samples), PAD, budget).unwrap();
            // Same tokens in the same order as the unpacked selection.
            assert!(sp.targets.equal(&at.gather(&unpacked.targets).unwrap()));
            let input = ForwardInput::new(&sp.input_ids)
                .with_positions(&sp.position_ids)
                .with_segments(&sp.segment_ids);
            let h = m.hidden_states(&input, None).unwrap();
            token_logprobs_full(&sp.predictors.gather(&h).unwrap(), head, &sp.targets, &opts)
                .unwrap()
                .logprobs
        }
    };
    let logprobs = at.scatter(&flat).unwrap();
    let cfg = PolicyLossConfig {
        loss_type,
        max_completion_length: 16,
        ..Default::default()
    };
    let old = (logprobs.detach() + &unpacked.completion_mask * 0.05).detach();
    let out = policy_loss(
        &PolicyBatch {
            logprobs: &logprobs,
            old_logprobs: Some(&old),
            ref_logprobs: None,
            sampler_logprobs: None,
            advantages: &unpacked.advantages,
            mask: &unpacked.loss_mask,
        },
        &cfg,
    )
    .unwrap();
    // A fixed upstream gradient for every log-prob, not drawn from torch's global
    // generator: the tests of this file run in parallel threads and share it.
    let g = Tensor::arange(logprobs.numel() as i64, (Kind::Float, Device::Cpu))
        .sin()
        .view(logprobs.size().as_slice());
    let objective = &out.loss_sum / out.count.max(1) as f64 + (&logprobs * g).sum(Kind::Float);
    objective.backward();
    Outcome {
        logprobs: logprobs.detach(),
        loss: out.loss_sum.double_value(&[]),
        grads: m
            .weights
            .named()
            .into_iter()
            .map(|(n, t)| (n, t.grad().copy()))
            .collect(),
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check(name: &str, groups: &[(usize, &[usize])], budgets: &[usize]) {
    let m = model(name);
    let s = samples(m.config.vocab_size, groups, 7);
    for loss_type in [LossType::Dapo, LossType::Grpo] {
        let want = run(&m, &s, Layout::Full, loss_type);
        let layouts = budgets.iter().map(|&b| Layout::Shared(b));
        for layout in std::iter::once(Layout::Forward).chain(layouts) {
            let got = run(&m, &s, layout, loss_type);
            let what = format!("{name} {loss_type:?} {layout:?}");
            let d = max_diff(&got.logprobs, &want.logprobs);
            assert!(d <= 1e-5, "{what}: log-probs differ by {d:e}");
            let d = (got.loss - want.loss).abs();
            assert!(d <= 1e-5, "{what}: loss differs by {d:e}");
            for ((n, g), (_, w)) in got.grads.iter().zip(&want.grads) {
                // The prompt's gradient sums its n branches' contributions in another
                // order: f32 rounding, relative to the gradient's scale.
                let scale = 1.0 + w.abs().max().double_value(&[]);
                let d = max_diff(g, w) / scale;
                assert!(
                    d <= 1e-5,
                    "{what}: gradient of {n} differs by {d:e} (relative)"
                );
            }
        }
    }
}

/// Mixed prompt lengths, completions of 1 to 9 tokens, n = 1, 2 and 8; one row per
/// group (large budget) and groups split over several rows (small budget).
#[test]
fn packed_equals_unpacked_qwen2() {
    check(
        "qwen2-tiny",
        &[(5, &[3, 1, 7, 2, 9, 1, 4, 6]), (2, &[1]), (9, &[4, 1])],
        &[4096, 12],
    );
}

#[test]
fn packed_equals_unpacked_qwen3() {
    check(
        "qwen3-tiny",
        &[(3, &[2, 5]), (7, &[1, 1, 3, 8, 2, 2, 5, 1]), (1, &[6])],
        &[4096, 9],
    );
}

#[test]
fn bad_groups_are_refused() {
    let s = samples(100, &[(3, &[2, 2])], 1);
    assert!(pack_shared_prefix(&[], PAD, 64).is_err());
    assert!(pack_shared_prefix(&[&s[..]], PAD, 0).is_err());
    let mut other = s.clone();
    other[1].prompt_ids[0] += 1;
    let e = pack_shared_prefix(&[&other[..]], PAD, 64).unwrap_err();
    assert!(e.to_string().contains("prompt differs"), "{e}");
    let mut empty = s.clone();
    empty[0].completion_ids.clear();
    assert!(pack_shared_prefix(&[&empty[..]], PAD, 64).is_err());
    // Layout: one row [prompt, c1[..1], c2[..1]] (a completion's last token predicts
    // nothing and is not forwarded), positions continue the prompt in each branch.
    let sp = pack_shared_prefix(&[&s[..]], PAD, 64).unwrap();
    assert_eq!(sp.segment_ids.size(), [1, 5]);
    assert_eq!(
        Vec::<i64>::try_from(sp.position_ids.view([-1])).unwrap(),
        [0, 1, 2, 3, 3]
    );
    assert_eq!(
        Vec::<i64>::try_from(sp.segment_ids.view([-1])).unwrap(),
        [0, 0, 0, 1, 2]
    );
    assert_eq!(
        Vec::<i64>::try_from(sp.input_ids.view([-1])).unwrap(),
        [
            s[0].prompt_ids[0],
            s[0].prompt_ids[1],
            s[0].prompt_ids[2],
            s[0].completion_ids[0],
            s[1].completion_ids[0]
        ]
    );
    // Predictors: the last prompt position for each first token, then c_i[0].
    assert_eq!(sp.predictors.count(), 4);
    assert_eq!(sp.prompt_tokens_saved, 3);
    assert_eq!(sp.padding, 0);
}

/// Segments without explicit positions, with a KV cache, or of the wrong shape are
/// errors naming the problem; a repeated predictor index cannot be scattered.
#[test]
fn bad_segment_inputs_are_errors() {
    let m = model("qwen2-tiny");
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
    let seg = Tensor::from_slice(&[0i64, 0, 1, 2]).view([1, 4]);
    let pos = Tensor::from_slice(&[0i64, 1, 2, 2]).view([1, 4]);
    let e = m
        .hidden_states(&ForwardInput::new(&ids).with_segments(&seg), None)
        .unwrap_err();
    assert!(e.to_string().contains("position_ids"), "{e}");
    let short = seg.narrow(1, 0, 3);
    let input = ForwardInput::new(&ids)
        .with_positions(&pos)
        .with_segments(&short);
    let e = m.hidden_states(&input, None).unwrap_err();
    assert!(e.to_string().contains("segment_ids has shape"), "{e}");
    let mut cache = model::KvCache::new(m.config.num_hidden_layers);
    let input = ForwardInput::new(&ids)
        .with_positions(&pos)
        .with_segments(&seg);
    let e = m.hidden_states(&input, Some(&mut cache)).unwrap_err();
    assert!(e.to_string().contains("KV cache"), "{e}");
    assert!(Positions::from_index(&[0, 4], 1, 4).is_err());
    let repeated = Positions::from_index(&[1, 1, 2], 1, 4).unwrap();
    let x = Tensor::ones([1, 3], (Kind::Float, Device::Cpu));
    assert!(repeated.scatter(&x).is_err());
}

fn zero_engine(recompute: bool) -> trainer::zero::ZeroEngine {
    use trainer::dist::{self, DistConfig, RendezvousEnv};
    use trainer::zero::{OptimConfig, ZeroConfig, ZeroEngine, ZeroStage};
    let env = RendezvousEnv::single();
    let comm = dist::connect(&DistConfig::default(), &env, Device::Cpu).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated/qwen2-tiny");
    let (cfg, w) = model::load_pretrained(dir, Device::Cpu, Some(Kind::Float)).unwrap();
    let zero = ZeroConfig {
        stage: ZeroStage::Stage2,
        gradient_checkpointing: recompute,
        ..ZeroConfig::default()
    };
    ZeroEngine::new(cfg, &w, zero, OptimConfig::default(), 10, Device::Cpu, comm).unwrap()
}

/// Through `ZeroEngine::forward_backward` (stage 2, with and without gradient
/// checkpointing): the same log-probs, loss and gradient norm packed and unpacked.
#[test]
fn packed_equals_unpacked_through_the_zero_engine() {
    use trainer::zero::{LossOutput, MicroBatch};
    let s = samples(
        zero_engine(false).config().vocab_size,
        &[(4, &[2, 1, 6, 3]), (6, &[5])],
        11,
    );
    let unpacked = pack(&s, PAD).unwrap();
    let at = Positions::new(&unpacked.completion_mask).unwrap();
    let sp = pack_shared_prefix(&prompt_runs(&s), PAD, 4096).unwrap();
    let cfg = PolicyLossConfig::default();
    for recompute in [false, true] {
        let mut out = vec![];
        for shared in [false, true] {
            let mut e = zero_engine(recompute);
            let mb = if shared {
                MicroBatch {
                    input_ids: sp.input_ids.shallow_clone(),
                    attention_mask: None,
                    position_ids: Some(sp.position_ids.shallow_clone()),
                    segment_ids: Some(sp.segment_ids.shallow_clone()),
                }
            } else {
                MicroBatch {
                    input_ids: unpacked.input_ids.shallow_clone(),
                    attention_mask: None,
                    position_ids: None,
                    segment_ids: None,
                }
            };
            let mut lp = None;
            e.forward_backward(&mb, |hidden, head| {
                let opts = LogprobOptions::default();
                let flat = if shared {
                    let h = sp.predictors.gather(hidden)?;
                    token_logprobs_full(&h, head, &sp.targets, &opts)?.logprobs
                } else {
                    let h = hidden.narrow(1, 0, unpacked.targets.size()[1]);
                    let t = at.gather(&unpacked.targets)?;
                    token_logprobs_full(&at.gather(&h)?, head, &t, &opts)?.logprobs
                };
                let logprobs = at.scatter(&flat)?;
                lp = Some(logprobs.detach());
                let loss = policy_loss(
                    &PolicyBatch {
                        logprobs: &logprobs,
                        old_logprobs: None,
                        ref_logprobs: None,
                        sampler_logprobs: None,
                        advantages: &unpacked.advantages,
                        mask: &unpacked.loss_mask,
                    },
                    &cfg,
                )?;
                Ok(LossOutput {
                    loss_sum: loss.loss_sum,
                    count: loss.count,
                })
            })
            .unwrap();
            out.push((lp.unwrap(), e.step().unwrap()));
        }
        let ((lp_u, st_u), (lp_p, st_p)) = (&out[0], &out[1]);
        let d = max_diff(lp_p, lp_u);
        assert!(
            d <= 1e-5,
            "recompute {recompute}: log-probs differ by {d:e}"
        );
        assert!(
            (st_p.loss - st_u.loss).abs() <= 1e-5,
            "{st_p:?} vs {st_u:?}"
        );
        let rel = (st_p.grad_norm - st_u.grad_norm).abs() / st_u.grad_norm.max(1.0);
        assert!(rel <= 1e-5, "recompute {recompute}: {st_p:?} vs {st_u:?}");
    }
}

/// Micro-batches cut from whole prompt runs (`PromptUnits`, the shared-prefix
/// micro-batching): every sample lands in exactly one micro-batch, a group that fits the
/// budget is never split (its prompt is forwarded once), one that exceeds it is, and the
/// loss and every gradient accumulated over the shared-prefix micro-batches equal the
/// unpacked whole batch's within 1e-5.
#[test]
fn whole_group_micro_batches_keep_the_loss_and_gradients() {
    use trainer::grpo::batch::PromptUnits;
    let m = model("qwen2-tiny");
    let groups: &[(usize, &[usize])] = &[
        (5, &[3, 1, 7, 2]),
        (2, &[1, 4]),
        (9, &[4, 1, 2]),
        (3, &[8, 8, 8, 8]),
        (4, &[2]),
    ];
    let s = samples(m.config.vocab_size, groups, 5);
    let group_of: Vec<usize> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, (_, c))| std::iter::repeat_n(g, c.len()))
        .collect();
    let cfg = PolicyLossConfig::default();
    let opts = LogprobOptions::default();
    let head = m.weights.head();
    let zero_grads = || {
        for (_, t) in m.weights.named() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    };
    let grads = || -> Vec<Tensor> {
        m.weights
            .named()
            .into_iter()
            .map(|(_, t)| t.grad().copy())
            .collect()
    };
    // The loss sum of `part`, backpropagated (gradients accumulate).
    let step = |part: &[Sample], shared: bool| -> f64 {
        let unpacked = pack(part, PAD).unwrap();
        let at = Positions::new(&unpacked.completion_mask).unwrap();
        let flat = if shared {
            let sp = pack_shared_prefix(&prompt_runs(part), PAD, 4096).unwrap();
            let input = ForwardInput::new(&sp.input_ids)
                .with_positions(&sp.position_ids)
                .with_segments(&sp.segment_ids);
            let h = m.hidden_states(&input, None).unwrap();
            token_logprobs_full(&sp.predictors.gather(&h).unwrap(), head, &sp.targets, &opts)
        } else {
            let h = m
                .hidden_states(&ForwardInput::new(&unpacked.input_ids), None)
                .unwrap();
            let h = h.narrow(1, 0, unpacked.targets.size()[1]);
            let t = at.gather(&unpacked.targets).unwrap();
            token_logprobs_full(&at.gather(&h).unwrap(), head, &t, &opts)
        };
        let logprobs = at.scatter(&flat.unwrap().logprobs).unwrap();
        let out = policy_loss(
            &PolicyBatch {
                logprobs: &logprobs,
                old_logprobs: None,
                ref_logprobs: None,
                sampler_logprobs: None,
                advantages: &unpacked.advantages,
                mask: &unpacked.loss_mask,
            },
            &cfg,
        )
        .unwrap();
        out.loss_sum.backward();
        out.loss_sum.double_value(&[])
    };
    zero_grads();
    let want_loss = step(&s, false);
    let want = grads();
    // A row forwards each completion but its last token. Group 3 (3 + 4 x 7 tokens)
    // exceeds the budget of 20 and is split in two; the others fit.
    let budget = 20;
    let units = PromptUnits::new(&s, budget);
    assert_eq!(units.lengths(), [14, 5, 13, 17, 17, 5]);
    for parts in [units.micro_batches_needed(budget), 3, 6] {
        let plan = PromptUnits::new(&s, budget).partition(&s, parts);
        assert_eq!(plan.len(), parts);
        let mut all = plan.concat();
        all.sort_unstable();
        assert_eq!(all, (0..s.len()).collect::<Vec<_>>(), "each sample once");
        for g in [0, 1, 2, 4] {
            let holding = plan
                .iter()
                .filter(|p| p.iter().any(|&i| group_of[i] == g))
                .count();
            assert_eq!(holding, 1, "{parts} parts: group {g} split: {plan:?}");
        }
        zero_grads();
        let mut loss = 0.0;
        for rows in &plan {
            let part: Vec<Sample> = rows.iter().map(|&i| s[i].clone()).collect();
            loss += step(&part, true);
        }
        let d = (loss - want_loss).abs();
        assert!(d <= 1e-5, "{parts} parts: loss differs by {d:e}");
        for ((n, _), (g, w)) in m.weights.named().iter().zip(grads().iter().zip(&want)) {
            let scale = 1.0 + w.abs().max().double_value(&[]);
            let d = max_diff(g, w) / scale;
            assert!(d <= 1e-5, "{parts} parts: gradient of {n} differs by {d:e}");
        }
    }
}
