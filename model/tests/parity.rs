//! Parity with Hugging Face transformers on the fixture models (scripts/make_fixtures.py):
//! logits, log-probs, greedy continuations, KV-cached decoding, left padding, bf16, and
//! checkpoints saved by us loaded back by transformers.
mod common;

use common::*;
use model::checkpoint::save_pretrained;
use model::{token_logprobs, ForwardInput, KvCache, LogprobOptions, Transformer};
use tch::{Device, Kind, Tensor};

const MODELS: [&str; 3] = ["qwen2-tiny", "qwen3-tiny", "llama-tiny"];
/// fp32 logits tolerance against transformers (max abs), as the issue states.
const FP32_TOL: f64 = 1e-4;
/// Our own paths against each other (cached vs full, batched vs alone): the same math
/// in a different summation order; logits reach ~15, so fp32 rounding is ~1e-5.
const SELF_TOL: f64 = 5e-5;

fn load(name: &str, kind: Option<Kind>) -> Transformer {
    Transformer::from_pretrained(model_dir(name), Device::Cpu, kind).unwrap()
}

fn ids_of(r: &std::collections::HashMap<String, Tensor>, i: usize) -> Tensor {
    r[&format!("seq{i}.ids")].unsqueeze(0)
}

#[test]
fn fp32_logits_match_transformers() {
    for name in MODELS {
        let m = load(name, None);
        let r = reference(name);
        for i in 0..num_seqs(&r) {
            let logits = m.forward(&ForwardInput::new(&ids_of(&r, i)), None).unwrap();
            assert_close(
                &logits.get(0),
                &r[&format!("seq{i}.logits")],
                FP32_TOL,
                name,
            );
        }
    }
}

/// bf16 forward vs transformers' bf16 forward of the same weights. Both round every
/// op's output to bf16 (8 bits of mantissa), but not necessarily identically (matmul
/// accumulation order), so differences of a few bf16 ulps of the logits' magnitude are
/// expected: the bound is 2% of the largest |logit| (the logits here reach ~15).
#[test]
fn bf16_logits_match_transformers_within_bf16_rounding() {
    for name in MODELS {
        let m = load(name, Some(Kind::BFloat16));
        assert_eq!(m.kind(), Kind::BFloat16);
        let r = reference(name);
        for i in 0..num_seqs(&r) {
            let logits = m.forward(&ForwardInput::new(&ids_of(&r, i)), None).unwrap();
            let reference = &r[&format!("seq{i}.logits_bf16")];
            let scale = reference.abs().max().double_value(&[]);
            let d = max_abs_diff(&logits.get(0), reference);
            assert!(
                d <= 0.02 * scale,
                "{name} seq{i}: bf16 max abs diff {d} (scale {scale})"
            );
            // Where the reference's top-2 margin exceeds twice the largest difference, no
            // rounding can flip the argmax: there the decisions must agree exactly.
            // Elsewhere a near tie may flip either way, and overall agreement is only
            // required to be 80%: transformers' own bf16 forward, rerun in another
            // process (2 threads, sdpa) against its stored reference, agrees on 83% of
            // qwen3-tiny's seq0 argmaxes (max |diff| 0.13), because that random model's
            // top-2 margins are small (median 0.68, min 0.001; qwen2-tiny and llama-tiny
            // 1.3-1.4) next to bf16's ~0.1-0.2 logit noise. Not a q/k-norm discrepancy:
            // `head_norm` is Qwen3RMSNorm (fp32 normalise, cast, scale) and the fp32
            // logits match within 1e-4. scripts/checks/bf16_argmax.py prints these figures.
            let (ours, theirs) = (logits.get(0).argmax(-1, false), reference.argmax(-1, false));
            let (top, _) = reference.topk(2, -1, true, true);
            let margin = top.select(1, 0) - top.select(1, 1);
            let flipped = ours
                .ne_tensor(&theirs)
                .logical_and(&margin.gt(2.0 * d))
                .sum(Kind::Int64)
                .int64_value(&[]);
            assert_eq!(
                flipped, 0,
                "{name} seq{i}: argmax differs where the margin is decisive"
            );
            let agree = ours
                .eq_tensor(&theirs)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            assert!(agree >= 0.8, "{name} seq{i}: argmax agreement {agree}");
        }
    }
}

#[test]
fn bf16_checkpoint_loads_to_the_rounded_weights() {
    let (_, from_bf16) =
        model::load_pretrained(model_dir("qwen2-tiny-bf16"), Device::Cpu, None).unwrap();
    let (_, from_f32) =
        model::load_pretrained(model_dir("qwen2-tiny"), Device::Cpu, Some(Kind::BFloat16)).unwrap();
    for ((n1, a), (n2, b)) in from_bf16.named().iter().zip(from_f32.named()) {
        assert_eq!(n1, &n2);
        assert_eq!(a.kind(), Kind::BFloat16, "{n1}");
        assert!(a.equal(b), "{n1} differs between bf16 file and f32 cast");
    }
}

#[test]
fn chunked_logprobs_match_transformers() {
    for name in MODELS {
        let m = load(name, None);
        let r = reference(name);
        for i in 0..num_seqs(&r) {
            let ids = ids_of(&r, i);
            let t = ids.size()[1];
            let hidden = m.hidden_states(&ForwardInput::new(&ids), None).unwrap();
            let opts = LogprobOptions {
                chunk_size: 3,
                ..Default::default()
            };
            let lp = token_logprobs(
                &hidden.narrow(1, 0, t - 1),
                m.weights.head(),
                &ids.narrow(1, 1, t - 1),
                &opts,
            )
            .unwrap();
            assert_close(
                &lp.logprobs.get(0),
                &r[&format!("seq{i}.logprobs")],
                FP32_TOL,
                name,
            );
        }
    }
}

/// Greedy decoding with the KV cache reproduces transformers' greedy continuation, and
/// every cached step's logits equal the full forward's logits at that position.
#[test]
fn kv_cached_decoding_equals_full_forward_and_transformers_greedy() {
    for name in MODELS {
        let m = load(name, None);
        let r = reference(name);
        for i in 0..num_seqs(&r) {
            let prompt = ids_of(&r, i);
            let expected = &r[&format!("seq{i}.greedy")];
            let mut cache = KvCache::new(m.config.num_hidden_layers);
            let mut logits = m
                .forward(&ForwardInput::new(&prompt), Some(&mut cache))
                .unwrap();
            let mut seq = prompt.shallow_clone();
            for step in 0..expected.size()[0] {
                let next = logits.get(0).get(-1).argmax(-1, false).view([1, 1]);
                assert_eq!(
                    next.int64_value(&[0, 0]),
                    expected.int64_value(&[step]),
                    "{name} seq{i} step {step}"
                );
                seq = Tensor::cat(&[&seq, &next], 1);
                logits = m
                    .forward(&ForwardInput::new(&next), Some(&mut cache))
                    .unwrap();
                let full = m.forward(&ForwardInput::new(&seq), None).unwrap();
                assert_close(&logits.get(0).get(-1), &full.get(0).get(-1), SELF_TOL, name);
            }
            assert_eq!(cache.seq_len(), seq.size()[1]);
        }
    }
}

/// Left-pads all reference sequences into one batch.
fn padded_batch(r: &std::collections::HashMap<String, Tensor>) -> (Tensor, Tensor, Vec<i64>) {
    let n = num_seqs(r);
    let lens: Vec<i64> = (0..n)
        .map(|i| r[&format!("seq{i}.ids")].size()[0])
        .collect();
    let t = *lens.iter().max().unwrap();
    let ids = Tensor::zeros([n as i64, t], (Kind::Int64, Device::Cpu));
    let mask = Tensor::zeros([n as i64, t], (Kind::Int64, Device::Cpu));
    for (i, &l) in lens.iter().enumerate() {
        ids.get(i as i64)
            .narrow(0, t - l, l)
            .copy_(&r[&format!("seq{i}.ids")]);
        let _ = mask.get(i as i64).narrow(0, t - l, l).fill_(1);
    }
    (ids, mask, lens)
}

#[test]
fn left_padded_batch_equals_each_sequence_alone() {
    for name in MODELS {
        let m = load(name, None);
        let r = reference(name);
        let (ids, mask, lens) = padded_batch(&r);
        let t = ids.size()[1];
        let mut cache = KvCache::new(m.config.num_hidden_layers);
        let logits = m
            .forward(&ForwardInput::new(&ids).with_mask(&mask), Some(&mut cache))
            .unwrap();
        for (i, &l) in lens.iter().enumerate() {
            let got = logits.get(i as i64).narrow(0, t - l, l);
            assert_close(&got, &r[&format!("seq{i}.logits")], FP32_TOL, name);
        }
        // Greedy-decode the padded batch with the cache: every row must produce its
        // transformers greedy continuation (computed alone), and each step's logits must
        // equal the row's own full forward.
        let steps = r["seq0.greedy"].size()[0];
        let mut seqs: Vec<Tensor> = (0..lens.len())
            .map(|i| r[&format!("seq{i}.ids")].shallow_clone())
            .collect();
        let mut next = logits.select(1, -1).argmax(-1, true);
        for step in 0..steps {
            for (i, seq) in seqs.iter_mut().enumerate() {
                let tok = next.int64_value(&[i as i64, 0]);
                assert_eq!(
                    tok,
                    r[&format!("seq{i}.greedy")].int64_value(&[step]),
                    "{name} row {i} step {step}"
                );
                *seq = Tensor::cat(&[&*seq, &Tensor::from_slice(&[tok])], 0);
            }
            let step_logits = m
                .forward(&ForwardInput::new(&next), Some(&mut cache))
                .unwrap();
            for (i, seq) in seqs.iter().enumerate() {
                let alone = m
                    .forward(&ForwardInput::new(&seq.unsqueeze(0)), None)
                    .unwrap();
                assert_close(
                    &step_logits.get(i as i64).get(-1),
                    &alone.get(0).get(-1),
                    SELF_TOL,
                    name,
                );
            }
            next = step_logits.select(1, -1).argmax(-1, true);
        }
        assert_eq!(cache.seq_len(), t + steps);
    }
}

/// Rows removed from and merged into a cache keep decoding exactly as before, which is
/// what continuous batching does between steps.
#[test]
fn kv_cache_select_and_concat_preserve_each_row() {
    let m = load("llama-tiny", None);
    let r = reference("llama-tiny");
    let mut caches = vec![];
    let mut lasts = vec![];
    for i in 0..2 {
        let mut c = KvCache::new(m.config.num_hidden_layers);
        let logits = m
            .forward(&ForwardInput::new(&ids_of(&r, i)), Some(&mut c))
            .unwrap();
        lasts.push(logits.select(1, -1).argmax(-1, true));
        caches.push(c);
    }
    let mut merged = KvCache::concat(&[&caches[0], &caches[1]]).unwrap();
    let next = Tensor::cat(&lasts, 0);
    let step = m
        .forward(&ForwardInput::new(&next), Some(&mut merged))
        .unwrap();
    for i in 0..2 {
        let alone = m
            .forward(&ForwardInput::new(&lasts[i]), Some(&mut caches[i]))
            .unwrap();
        assert_close(&step.get(i as i64), &alone.get(0), SELF_TOL, "merged row");
    }
    // Drop row 0 (the longer sequence is row 1 here or not; compact removes what is unused).
    let mut kept = merged.select(&Tensor::from_slice(&[1i64])).unwrap();
    kept.compact().unwrap();
    assert_eq!(kept.seq_len(), caches[1].seq_len());
    let tok = step.get(1).select(0, -1).argmax(-1, true).view([1, 1]);
    let a = m
        .forward(&ForwardInput::new(&tok), Some(&mut kept))
        .unwrap();
    let b = m
        .forward(&ForwardInput::new(&tok), Some(&mut caches[1]))
        .unwrap();
    assert_close(&a, &b, SELF_TOL, "selected row");
}

#[test]
fn save_then_load_is_bit_exact_single_and_sharded() {
    for name in MODELS {
        let (cfg, w) = model::load_pretrained(model_dir(name), Device::Cpu, None).unwrap();
        for (tag, max_shard) in [("single", u64::MAX), ("sharded", 60_000)] {
            let dir = TempDir::new(&format!("{name}-{tag}"));
            save_pretrained(&dir.0, &cfg, &w, Kind::Float, max_shard).unwrap();
            assert_eq!(
                dir.0.join("model.safetensors.index.json").exists(),
                tag == "sharded"
            );
            let (cfg2, w2) = model::load_pretrained(&dir.0, Device::Cpu, None).unwrap();
            assert_eq!(cfg2.raw["model_type"], cfg.raw["model_type"]);
            let (a, b) = (w.named(), w2.named());
            assert_eq!(a.len(), b.len());
            for ((n1, t1), (n2, t2)) in a.iter().zip(b.iter()) {
                assert_eq!(n1, n2);
                assert!(t1.equal(t2), "{name} {tag}: {n1} not bit-exact");
            }
        }
    }
}

/// transformers loads checkpoints written by `save_pretrained` and computes the same
/// logits as we do.
#[test]
fn transformers_loads_our_checkpoints() {
    for name in MODELS {
        let m = load(name, None);
        let r = reference(name);
        let seqs: Vec<Vec<i64>> = (0..num_seqs(&r))
            .map(|i| Vec::<i64>::try_from(&r[&format!("seq{i}.ids")]).unwrap())
            .collect();
        let dir = TempDir::new(&format!("hf-{name}"));
        let ckpt = dir.0.join("ckpt");
        // Sharded, to exercise the index on transformers' side too.
        save_pretrained(&ckpt, &m.config, &m.weights, Kind::Float, 80_000).unwrap();
        let ids_path = dir.0.join("ids.json");
        std::fs::write(&ids_path, serde_json_string(&seqs)).unwrap();
        let out = dir.0.join("logits.safetensors");
        let status = std::process::Command::new(python())
            .arg(scripts().join("hf_logits.py"))
            .args([&ckpt, &ids_path, &out])
            .status()
            .unwrap();
        assert!(
            status.success(),
            "hf_logits.py failed on {}",
            ckpt.display()
        );
        let hf: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect();
        for (i, ids) in seqs.iter().enumerate() {
            let x = Tensor::from_slice(ids).unsqueeze(0);
            let ours = m.forward(&ForwardInput::new(&x), None).unwrap();
            assert_close(&ours.get(0), &hf[&format!("seq{i}.logits")], FP32_TOL, name);
        }
    }
}

fn serde_json_string(seqs: &[Vec<i64>]) -> String {
    let rows: Vec<String> = seqs
        .iter()
        .map(|s| {
            format!(
                "[{}]",
                s.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    format!("[{}]", rows.join(","))
}

/// More shapes of both families (MQA, explicit head_dim, biases, tied Llama, linear and
/// llama3 rope in the transformers 4 layout, f16/bf16 files, deep sharded): loaded in
/// fp32, each matches transformers' fp32 logits of the same file.
#[test]
fn zoo_of_shapes_matches_transformers() {
    let zoo = fixtures().join("zoo");
    let mut n = 0;
    for entry in std::fs::read_dir(&zoo).unwrap() {
        let dir = entry.unwrap().path();
        let m = Transformer::from_pretrained(&dir, Device::Cpu, Some(Kind::Float))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let r: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("reference.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let logits = m.forward(&ForwardInput::new(&r["ids"]), None).unwrap();
        assert_close(&logits, &r["logits"], FP32_TOL, &dir.display().to_string());
        n += 1;
    }
    assert!(
        n >= 6,
        "expected the zoo fixtures (Qwen3 ones too), found {n}"
    );
}
