//! The GRPO math of `trainer::grpo` against `scripts/grpo_reference.py`, an independent
//! float64 PyTorch implementation written from TRL's formulas.
//!
//! One fixed toy micro-batch (B = 4, T = 6, seeded values, a partly masked, a fully masked
//! and a holed sequence, garbage at masked positions, ratios beyond both clip bounds and
//! sampler ratios beyond the correction's cap) is run through every loss type (grpo, bnpo,
//! dr_grpo, dapo, cispo, sapo) × importance-sampling level {token, sequence (GSPO)} ×
//! correction {off, token_truncate, token_mask, sequence_truncate, sequence_mask} × old
//! log-probs {None, given}, with beta 0 or 0.04 and `delta` (two-sided clipping) off or
//! 1.35 alternating, in f32 and in f64. The loss
//! (`loss_sum / count`), d loss / d logprobs and the statistics must match the reference
//! within an absolute tolerance of 1e-6 in f32 (single-precision rounding of ~24-term sums
//! of O(1) values) and 1e-10 in f64. Group advantages for all three scalings must match
//! within 1e-9. All cases go to one Python process.
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tch::{Kind, Tensor};
use trainer::grpo::loss::{ImportanceSamplingLevel, IsCorrection, IsCorrectionMode};
use trainer::grpo::{
    group_advantages, policy_loss, LossType, PolicyBatch, PolicyLossConfig, ScaleRewards,
};

const B: usize = 4;
const T: usize = 6;
const TOL_F32: f64 = 1e-6;
const TOL_F64: f64 = 1e-10;
const TOL_ADV: f64 = 1e-9;

fn python() -> PathBuf {
    let p =
        PathBuf::from(std::env::var("GRPO_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into()));
    let p = if p.is_absolute() {
        p
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    };
    assert!(
        p.exists(),
        "{} not found: run scripts/setup.sh",
        p.display()
    );
    p
}

/// Runs the reference script on `input`, returns its parsed output.
fn reference(input: &Value) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/grpo_reference.py");
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the reference script");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference output is JSON")
}

/// Deterministic uniform values in `[lo, hi)`, rounded to f32 so that the f32 and f64
/// runs and the reference all see the same numbers.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        (lo + (hi - lo) * u) as f32 as f64
    }
    fn matrix(&mut self, lo: f64, hi: f64) -> Vec<Vec<f64>> {
        (0..B)
            .map(|_| (0..T).map(|_| self.uniform(lo, hi)).collect())
            .collect()
    }
}

struct Toy {
    logprobs: Vec<Vec<f64>>,
    old: Vec<Vec<f64>>,
    refp: Vec<Vec<f64>>,
    sampler: Vec<Vec<f64>>,
    advantages: Vec<f64>,
    mask: Vec<Vec<f64>>,
}

fn toy() -> Toy {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut logprobs = rng.matrix(-3.0, -0.05);
    // log-ratios in ±0.6: ratios 0.55..1.82, beyond both 1 − 0.2 and 1 + 0.28.
    let mut shift = rng.matrix(-0.6, 0.6);
    // And for certain: sequence 0 (A > 0) above the upper bound, sequence 3 (A < 0) below
    // the lower one.
    shift[0][1] = 0.45;
    shift[3][0] = -0.45;
    let mut old: Vec<Vec<f64>> = (0..B)
        .map(|b| {
            (0..T)
                .map(|t| (logprobs[b][t] - shift[b][t]) as f32 as f64)
                .collect()
        })
        .collect();
    let dref = rng.matrix(-0.5, 0.5);
    let mut refp: Vec<Vec<f64>> = (0..B)
        .map(|b| {
            (0..T)
                .map(|t| (logprobs[b][t] + dref[b][t]) as f32 as f64)
                .collect()
        })
        .collect();
    // exp(old − sampler) in 0.37..2.7: some beyond the cap of 1.5.
    let mut dsam = rng.matrix(-1.0, 1.0);
    dsam[1][2] = -0.9;
    let mut sampler: Vec<Vec<f64>> = (0..B)
        .map(|b| {
            (0..T)
                .map(|t| (old[b][t] + dsam[b][t]) as f32 as f64)
                .collect()
        })
        .collect();
    let mask: Vec<Vec<f64>> = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], // full
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0], // padded
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], // fully masked
        [1.0, 1.0, 0.0, 1.0, 1.0, 0.0], // a hole
    ]
    .iter()
    .map(|r| r.to_vec())
    .collect();
    // Garbage (but finite, so the reference's multiply-by-mask stays exact) where masked.
    for b in 0..B {
        for t in 0..T {
            if mask[b][t] == 0.0 {
                logprobs[b][t] = 2.5;
                old[b][t] = -30.0;
                refp[b][t] = 7.0;
                sampler[b][t] = -40.0;
            }
        }
    }
    Toy {
        logprobs,
        old,
        refp,
        sampler,
        advantages: vec![1.3, -0.8, 0.5, -1.7],
        mask,
    }
}

fn tensor(rows: &[Vec<f64>], kind: Kind) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .view([B as i64, T as i64])
        .to_kind(kind)
}

struct Case {
    cfg: PolicyLossConfig,
    with_old: bool,
}

const MODES: [Option<IsCorrectionMode>; 5] = [
    None,
    Some(IsCorrectionMode::TokenTruncate),
    Some(IsCorrectionMode::TokenMask),
    Some(IsCorrectionMode::SequenceTruncate),
    Some(IsCorrectionMode::SequenceMask),
];

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut i = 0usize;
    for ty in [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
        LossType::Cispo,
        LossType::Sapo,
    ] {
        for level in [
            ImportanceSamplingLevel::Token,
            ImportanceSamplingLevel::Sequence,
        ] {
            for mode in MODES {
                for with_old in [false, true] {
                    i += 1;
                    let cfg = PolicyLossConfig {
                        epsilon: 0.2,
                        // cispo's cap of the ratio itself; the clip range otherwise.
                        epsilon_high: if ty == LossType::Cispo { 1.3 } else { 0.28 },
                        beta: if i.is_multiple_of(2) { 0.04 } else { 0.0 },
                        loss_type: ty,
                        max_completion_length: T as i64 + 2,
                        importance_sampling_level: level,
                        delta: i.is_multiple_of(3).then_some(1.35),
                        sapo_temperature_pos: 1.0,
                        sapo_temperature_neg: 1.05,
                        correction: mode.map(|mode| IsCorrection { mode, cap: 1.5 }),
                    };
                    v.push(Case { cfg, with_old });
                }
            }
        }
    }
    v
}

fn level_name(l: ImportanceSamplingLevel) -> &'static str {
    match l {
        ImportanceSamplingLevel::Token => "token",
        ImportanceSamplingLevel::Sequence => "sequence",
    }
}

fn case_name(c: &Case) -> String {
    format!(
        "{} {} beta={} delta={:?} corr={:?} old={}",
        c.cfg.loss_type.name(),
        level_name(c.cfg.importance_sampling_level),
        c.cfg.beta,
        c.cfg.delta,
        c.cfg.correction.map(|x| x.mode.name()),
        c.with_old
    )
}

/// What the Rust side computes for one case: loss, gradient, stats as the reference names them.
fn run_rust(toy: &Toy, c: &Case, kind: Kind) -> (f64, Vec<Vec<f64>>, Vec<(String, f64)>) {
    let lp = tensor(&toy.logprobs, kind).set_requires_grad(true);
    let old = tensor(&toy.old, kind);
    let refp = tensor(&toy.refp, kind);
    let sampler = tensor(&toy.sampler, kind);
    let adv = Tensor::from_slice(&toy.advantages).to_kind(kind);
    let mask = tensor(&toy.mask, kind);
    let batch = PolicyBatch {
        logprobs: &lp,
        old_logprobs: c.with_old.then_some(&old),
        // Given only when used, as the reference computes the KL stat whenever it has one.
        ref_logprobs: (c.cfg.beta > 0.0).then_some(&refp),
        sampler_logprobs: c.cfg.correction.map(|_| &sampler),
        advantages: &adv,
        mask: &mask,
    };
    let out = policy_loss(&batch, &c.cfg).unwrap_or_else(|e| panic!("{}: {e}", case_name(c)));
    let loss = &out.loss_sum / out.count as f64;
    loss.backward();
    let grad = Vec::<Vec<f64>>::try_from(&lp.grad().to_kind(Kind::Double)).unwrap();
    let s = out.stats;
    let stats = [
        ("tokens", s.tokens),
        ("kl_sum", s.kl_sum),
        ("low_clipped", s.low_clipped),
        ("high_clipped", s.high_clipped),
        ("region_clipped", s.region_clipped),
        ("tis_ratio_sum", s.tis_ratio_sum),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    (loss.double_value(&[]), grad, stats)
}

fn rows(v: &[Vec<f64>]) -> Value {
    json!(v)
}

#[test]
fn policy_loss_and_advantages_match_the_pytorch_reference() {
    let toy = toy();
    let cases = cases();
    let loss_cases: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({
                "name": case_name(c),
                "logprobs": rows(&toy.logprobs),
                "old": if c.with_old { rows(&toy.old) } else { Value::Null },
                "ref": if c.cfg.beta > 0.0 { rows(&toy.refp) } else { Value::Null },
                "sampler": if c.cfg.correction.is_some() { rows(&toy.sampler) } else { Value::Null },
                "advantages": toy.advantages,
                "mask": rows(&toy.mask),
                "config": {
                    "epsilon": c.cfg.epsilon,
                    "epsilon_high": c.cfg.epsilon_high,
                    "beta": c.cfg.beta,
                    "loss_type": c.cfg.loss_type.name(),
                    "max_completion_length": c.cfg.max_completion_length,
                    "importance_sampling_level": level_name(c.cfg.importance_sampling_level),
                    "delta": c.cfg.delta,
                    "sapo_temperature_pos": c.cfg.sapo_temperature_pos,
                    "sapo_temperature_neg": c.cfg.sapo_temperature_neg,
                    "correction": c.cfg.correction.map(|x| json!({"mode": x.mode.name(), "cap": x.cap})),
                },
            })
        })
        .collect();

    // Rewards: three groups with spread, one flat group (zero std), G = 4; and G = 3.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rewards4: Vec<f64> = (0..12).map(|_| rng.uniform(-1.0, 2.0)).collect();
    rewards4.extend([0.5; 4]);
    let rewards3: Vec<f64> = (0..9).map(|_| rng.uniform(0.0, 1.0).round()).collect();
    let scales = [
        (ScaleRewards::Group, "group"),
        (ScaleRewards::Batch, "batch"),
        (ScaleRewards::None, "none"),
    ];
    let mut adv_cases = Vec::new();
    let mut adv_inputs = Vec::new();
    for (rewards, g) in [(&rewards4, 4usize), (&rewards3, 3)] {
        for (scale, sname) in scales {
            adv_cases
                .push(json!({"rewards": rewards, "num_generations": g, "scale_rewards": sname}));
            adv_inputs.push((rewards.clone(), g, scale));
        }
    }

    let out = reference(&json!({"loss_cases": loss_cases, "advantage_cases": adv_cases}));
    let ref_loss = out["loss_cases"].as_array().unwrap();
    assert_eq!(ref_loss.len(), cases.len());

    let (mut low_seen, mut high_seen, mut tis_capped) = (false, false, false);
    for (c, r) in cases.iter().zip(ref_loss) {
        let cname = case_name(c);
        assert_eq!(r["name"], cname);
        let want_loss = r["loss"].as_f64().unwrap();
        let want_grad: Vec<Vec<f64>> = serde_json::from_value(r["grad"].clone()).unwrap();
        for (kind, tol) in [(Kind::Float, TOL_F32), (Kind::Double, TOL_F64)] {
            let (loss, grad, stats) = run_rust(&toy, c, kind);
            assert!(
                (loss - want_loss).abs() <= tol,
                "{cname} {kind:?}: loss {loss} vs reference {want_loss}"
            );
            for b in 0..B {
                for t in 0..T {
                    let (g, w) = (grad[b][t], want_grad[b][t]);
                    assert!(
                        (g - w).abs() <= tol,
                        "{cname} {kind:?}: grad[{b}][{t}] {g} vs reference {w}"
                    );
                    if toy.mask[b][t] == 0.0 {
                        assert_eq!(g, 0.0, "{cname} {kind:?}: masked grad[{b}][{t}]");
                    }
                }
            }
            for (k, v) in stats {
                let w = r["stats"][&k].as_f64().unwrap();
                // Sums of up to 16 terms of O(1): scale the tolerance.
                assert!(
                    (v - w).abs() <= 16.0 * tol,
                    "{cname} {kind:?}: stats.{k} {v} vs reference {w}"
                );
            }
        }
        let s = &r["stats"];
        low_seen |= s["low_clipped"].as_f64().unwrap() > 0.0;
        high_seen |= s["high_clipped"].as_f64().unwrap() > 0.0;
        if let (Some(corr), true) = (c.cfg.correction, c.with_old) {
            // Some token (or sequence) is beyond the cap, so truncation and masking act.
            let d = |b: usize, t: usize| (toy.old[b][t] - toy.sampler[b][t]) * toy.mask[b][t];
            tis_capped |= match corr.mode {
                IsCorrectionMode::TokenTruncate | IsCorrectionMode::TokenMask => (0..B)
                    .any(|b| (0..T).any(|t| toy.mask[b][t] == 1.0 && d(b, t).exp() > corr.cap)),
                _ => (0..B).any(|b| (0..T).map(|t| d(b, t)).sum::<f64>().exp() > corr.cap),
            };
        }
    }
    // The fixture exercises what it claims to.
    assert!(
        low_seen && high_seen && tis_capped,
        "low {low_seen} high {high_seen} tis {tis_capped}"
    );

    let ref_adv = out["advantage_cases"].as_array().unwrap();
    assert_eq!(ref_adv.len(), adv_inputs.len());
    for ((rewards, g, scale), r) in adv_inputs.iter().zip(ref_adv) {
        let got = group_advantages(rewards, *g, *scale).unwrap();
        let want: Vec<f64> = serde_json::from_value(r["advantages"].clone()).unwrap();
        assert_eq!(got.values.len(), want.len());
        for (i, (a, w)) in got.values.iter().zip(&want).enumerate() {
            assert!(
                (a - w).abs() <= TOL_ADV,
                "advantages G={g} {scale:?}[{i}]: {a} vs reference {w}"
            );
        }
        if *g == 4 {
            assert_eq!(got.zero_std_groups, 1, "the flat group");
        }
    }
}
