//! Length-shaped built-in rewards: `length` (Kimi 1.5), `cosine` (cosine-scaled correctness) and
//! `soft_overlong_punishment` (DAPO). Lengths are `RewardInput::completion_tokens`.

use crate::config::invalid::{bad, InvalidConfig};
use std::collections::BTreeMap;
use std::f64::consts::PI;

use super::builtin::Accuracy;
use super::{RewardError, RewardFunction, RewardInput, RewardsConfig};

/// `length` (Kimi 1.5, arXiv:2501.12599): within each prompt group, over the samples with a
/// parseable gold answer, `lambda = 0.5 - (len - min_len) / (max_len - min_len)`; a correct
/// sample gets `lambda` (in `[-0.5, 0.5]`), a wrong one `min(0, lambda)`; every sample gets 0
/// when the group's scorable lengths are all equal. Unparseable gold answers give `None`.
#[derive(Debug, Clone)]
pub struct KimiLength {
    accuracy: Accuracy,
}

impl KimiLength {
    /// Reads the gold answer from dataset column `column`.
    pub fn new(column: &str) -> Self {
        Self {
            accuracy: Accuracy::new(column),
        }
    }
}

impl RewardFunction for KimiLength {
    fn name(&self) -> &str {
        "length"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        let correct = batch
            .iter()
            .map(|input| self.accuracy.correctness("length", input))
            .collect::<Result<Vec<_>, _>>()?;
        // Per group: (min, max) length over its scorable samples.
        let mut bounds: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for (input, c) in batch.iter().zip(&correct) {
            if c.is_some() {
                let len = input.completion_tokens;
                bounds
                    .entry(input.group)
                    .and_modify(|(lo, hi)| {
                        *lo = (*lo).min(len);
                        *hi = (*hi).max(len);
                    })
                    .or_insert((len, len));
            }
        }
        Ok(batch
            .iter()
            .zip(&correct)
            .map(|(input, c)| {
                let correct = (*c)?;
                let (lo, hi) = bounds[&input.group];
                if hi == lo {
                    return Some(0.0);
                }
                let lambda = 0.5 - (input.completion_tokens - lo) as f64 / (hi - lo) as f64;
                Some(if correct { lambda } else { lambda.min(0.0) })
            })
            .collect())
    }
}

/// `cosine` (Open-R1, after arXiv:2502.03373): correctness scaled by length on a half cosine,
/// `lo + 0.5 (hi - lo)(1 + cos(pi * min(len, max_len) / max_len))`, where `(lo, hi)` is
/// `(min_value_correct, max_value_correct)` for a correct sample and
/// `(max_value_wrong, min_value_wrong)` for a wrong one. So a correct sample earns
/// `max_value_correct` at length 0 falling to `min_value_correct` at `max_len`, and a wrong one
/// `min_value_wrong` at length 0 rising to `max_value_wrong`. Lengths beyond `max_len` score as
/// `max_len` (Open-R1's cosine would turn back up). Unparseable gold answers give `None`.
#[derive(Debug, Clone)]
pub struct CosineScaled {
    accuracy: Accuracy,
    min_value_wrong: f64,
    max_value_wrong: f64,
    min_value_correct: f64,
    max_value_correct: f64,
    max_len: usize,
}

impl CosineScaled {
    /// From the `cosine_*` fields and `answer_column` of `cfg`; `max_len` is `cosine_max_len` or,
    /// unset, `max_completion_length`.
    pub fn new(cfg: &RewardsConfig, max_completion_length: usize) -> Result<Self, InvalidConfig> {
        let max_len = cfg.cosine_max_len.unwrap_or(max_completion_length);
        if max_len == 0 {
            return Err(bad(
                "rewards.cosine_max_len",
                "rewards.cosine_max_len must be >= 1 token",
            ));
        }
        Ok(Self {
            accuracy: Accuracy::new(&cfg.answer_column),
            min_value_wrong: cfg.cosine_min_value_wrong,
            max_value_wrong: cfg.cosine_max_value_wrong,
            min_value_correct: cfg.cosine_min_value_correct,
            max_value_correct: cfg.cosine_max_value_correct,
            max_len,
        })
    }

    /// The reward of a sample of `len` tokens that is `correct` or not.
    pub fn reward(&self, len: usize, correct: bool) -> f64 {
        let progress = len.min(self.max_len) as f64 / self.max_len as f64;
        let (lo, hi) = if correct {
            (self.min_value_correct, self.max_value_correct)
        } else {
            (self.max_value_wrong, self.min_value_wrong)
        };
        lo + 0.5 * (hi - lo) * (1.0 + (PI * progress).cos())
    }
}

impl RewardFunction for CosineScaled {
    fn name(&self) -> &str {
        "cosine"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        batch
            .iter()
            .map(|input| {
                let correct = self.accuracy.correctness("cosine", input)?;
                Ok(correct.map(|c| self.reward(input.completion_tokens, c)))
            })
            .collect()
    }
}

/// `soft_overlong_punishment` (DAPO, arXiv:2503.14476): with `L = max_completion_length` and
/// buffer `B`: `0` for `len <= L - B`, `(L - B - len) / B` for `L - B < len <= L` (linear from 0
/// to -1), `-1` beyond `L`.
#[derive(Debug, Clone, Copy)]
pub struct SoftOverlongPunishment {
    max_completion_length: usize,
    cache: usize,
}

impl SoftOverlongPunishment {
    /// `1 <= cache <= max_completion_length`.
    pub fn new(max_completion_length: usize, cache: usize) -> Result<Self, InvalidConfig> {
        if cache == 0 || cache > max_completion_length {
            return Err(bad(
                "rewards.soft_punish_cache",
                format!(
                    "rewards.soft_punish_cache ({cache}) must be between 1 and \
                     max_completion_length ({max_completion_length})"
                ),
            ));
        }
        Ok(Self {
            max_completion_length,
            cache,
        })
    }

    /// The punishment of a completion of `len` tokens.
    pub fn reward(&self, len: usize) -> f64 {
        let start = self.max_completion_length - self.cache;
        if len <= start {
            0.0
        } else if len <= self.max_completion_length {
            -((len - start) as f64) / self.cache as f64
        } else {
            -1.0
        }
    }
}

impl RewardFunction for SoftOverlongPunishment {
    fn name(&self) -> &str {
        "soft_overlong_punishment"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        Ok(batch
            .iter()
            .map(|input| Some(self.reward(input.completion_tokens)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::builtin::tests::inputs;
    use super::*;
    use serde_json::{json, Map, Value};

    fn close(got: &[Option<f64>], want: &[Option<f64>]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            match (g, w) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}"),
                _ => assert_eq!(g, w, "{got:?} vs {want:?}"),
            }
        }
    }

    fn gold(value: Value) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert("solution".into(), value);
        fields
    }

    #[test]
    fn kimi_length_is_per_group() {
        let fields = gold(json!("7"));
        let rows = [
            // group 0: lengths 10..30
            ("\\boxed{7}", 10, 0),
            ("\\boxed{7}", 20, 0),
            ("\\boxed{8}", 30, 0),
            ("\\boxed{8}", 10, 0),
            // group 1: its own min and max
            ("\\boxed{7}", 100, 1),
            ("\\boxed{8}", 300, 1),
            // group 2: one length
            ("\\boxed{7}", 5, 2),
            ("\\boxed{8}", 5, 2),
        ];
        let got = KimiLength::new("solution")
            .score(&inputs(&rows, &fields))
            .unwrap();
        close(
            &got,
            &[
                Some(0.5),
                Some(0.0),
                Some(-0.5),
                Some(0.0), // wrong and shortest: min(0, 0.5)
                Some(0.5),
                Some(-0.5),
                Some(0.0),
                Some(0.0),
            ],
        );
    }

    #[test]
    fn kimi_length_skips_unparseable_gold() {
        let null = gold(Value::Null);
        let got = KimiLength::new("solution")
            .score(&inputs(&[("\\boxed{7}", 10, 0), ("x", 20, 0)], &null))
            .unwrap();
        assert_eq!(got, vec![None, None]);
        let err = KimiLength::new("answer")
            .score(&inputs(&[("x", 1, 0)], &null))
            .unwrap_err();
        assert!(err.to_string().contains("'length'"), "{err}");
    }

    #[test]
    fn cosine_endpoints_and_midpoint() {
        let cfg = RewardsConfig {
            cosine_max_len: Some(100),
            ..Default::default()
        };
        let f = CosineScaled::new(&cfg, 512).unwrap();
        // Correct: 1.0 at 0, 0.75 at half, 0.5 at max_len and beyond.
        let cases = [
            (0, true, 1.0),
            (50, true, 0.75),
            (100, true, 0.5),
            (400, true, 0.5),
            (0, false, -0.5),
            (50, false, -0.25),
            (100, false, 0.0),
            (1000, false, 0.0),
        ];
        for (len, correct, want) in cases {
            let got = f.reward(len, correct);
            assert!(
                (got - want).abs() < 1e-12,
                "len {len} correct {correct}: {got}"
            );
        }
        // A quarter of the way: lo + 0.5 (hi - lo)(1 + cos(pi/4)).
        let quarter = 0.5 + 0.25 * (1.0 + (PI / 4.0).cos());
        assert!((f.reward(25, true) - quarter).abs() < 1e-12);

        let fields = gold(json!("\\frac{1}{2}"));
        let rows = [("\\boxed{0.5}", 50, 0), ("\\boxed{2}", 0, 0)];
        close(
            &f.score(&inputs(&rows, &fields)).unwrap(),
            &[Some(0.75), Some(-0.5)],
        );
        let null = gold(Value::Null);
        assert_eq!(f.score(&inputs(&rows, &null)).unwrap(), vec![None, None]);
    }

    #[test]
    fn cosine_defaults_to_max_completion_length() {
        let f = CosineScaled::new(&RewardsConfig::default(), 200).unwrap();
        assert!((f.reward(100, true) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn soft_overlong_ramp() {
        let f = SoftOverlongPunishment::new(100, 20).unwrap();
        let cases = [
            (0, 0.0),
            (80, 0.0),
            (81, -0.05),
            (90, -0.5),
            (100, -1.0),
            (101, -1.0),
        ];
        for (len, want) in cases {
            assert!((f.reward(len) - want).abs() < 1e-12, "len {len}");
        }
        let whole = SoftOverlongPunishment::new(10, 10).unwrap();
        assert!((whole.reward(5) + 0.5).abs() < 1e-12);
        assert!(SoftOverlongPunishment::new(10, 11).is_err());
        assert!(SoftOverlongPunishment::new(10, 0).is_err());
    }
}
