//! Text-only built-in rewards: `accuracy`, `format`, `tag_count`, `reasoning_steps`,
//! `repetition_penalty`. Formulas are in the parent module's doc.

use crate::config::invalid::{bad, InvalidConfig};
use std::collections::HashSet;

use regex::Regex;

use super::answer::{is_correct, parse_gold};
use super::{RewardError, RewardFunction, RewardInput};

/// `accuracy`: 1.0 if the completion's final answer equals the gold answer, else 0.0; `None`
/// where the gold answer is null or unparseable.
#[derive(Debug, Clone)]
pub struct Accuracy {
    column: String,
}

impl Accuracy {
    /// Reads the gold answer from dataset column `column`.
    pub fn new(column: &str) -> Self {
        Self {
            column: column.to_string(),
        }
    }

    /// Whether `input` is correct; `None` for an unparseable gold answer. `function` names the
    /// caller (`accuracy`, `length`, `cosine`) in the error for a missing column.
    pub fn correctness(
        &self,
        function: &str,
        input: &RewardInput<'_>,
    ) -> Result<Option<bool>, RewardError> {
        let Some(gold) = input.fields.get(&self.column) else {
            return Err(RewardError::MissingColumn {
                function: function.to_string(),
                column: self.column.clone(),
                available: input
                    .fields
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        Ok(parse_gold(gold).map(|gold| is_correct(input.completion, &gold)))
    }
}

impl RewardFunction for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        batch
            .iter()
            .map(|input| {
                let correct = self.correctness("accuracy", input)?;
                Ok(correct.map(|c| if c { 1.0 } else { 0.0 }))
            })
            .collect()
    }
}

/// `format`: 1.0 if the completion matches the think/answer pattern (or `format_pattern`), else 0.0.
#[derive(Debug, Clone)]
pub struct Format {
    pattern: Regex,
}

impl Format {
    /// Open-R1's `^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$` with `.` matching newlines,
    /// over the whole completion; one trailing newline is allowed, as Python's `$` allows it.
    pub fn open_r1() -> Self {
        let pattern = Regex::new(r"(?s)\A<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\n?\z")
            .expect("the built-in format pattern is a valid regex");
        Self { pattern }
    }

    /// A user pattern, compiled with `(?s)` and anchored at the start (Python's `re.match`).
    pub fn with_pattern(pattern: &str) -> Result<Self, InvalidConfig> {
        let pattern = Regex::new(&format!(r"(?s)\A(?:{pattern})")).map_err(|e| {
            bad(
                "rewards.format_pattern",
                format!("rewards.format_pattern is not a valid regex: {e}"),
            )
        })?;
        Ok(Self { pattern })
    }
}

impl RewardFunction for Format {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        Ok(batch
            .iter()
            .map(|input| {
                Some(if self.pattern.is_match(input.completion) {
                    1.0
                } else {
                    0.0
                })
            })
            .collect())
    }
}

/// `tag_count`: 0.25 for each format tag that occurs exactly once.
#[derive(Debug, Clone, Copy)]
pub struct TagCount;

impl TagCount {
    /// The tags with the newlines `format` expects around them.
    const TAGS: [&'static str; 4] = ["<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>"];

    fn count(text: &str) -> f64 {
        let ones = Self::TAGS
            .iter()
            .filter(|tag| text.matches(*tag).count() == 1)
            .count();
        0.25 * ones as f64
    }
}

impl RewardFunction for TagCount {
    fn name(&self) -> &str {
        "tag_count"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        Ok(batch
            .iter()
            .map(|input| Some(Self::count(input.completion)))
            .collect())
    }
}

/// `reasoning_steps`: `min(1, count / 3)` over step markers.
#[derive(Debug, Clone)]
pub struct ReasoningSteps {
    pattern: Regex,
}

impl ReasoningSteps {
    /// `Step N:`, `N.` at the start of any line (Open-R1 only counts one at the very start of the
    /// text, though its doc says "at start of line"), `\n-`, `\n*`, `First,` `Second,` `Next,`
    /// `Finally,`; non-overlapping.
    pub fn new() -> Self {
        let pattern = Regex::new(r"(?m)Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,")
            .expect("the reasoning-steps pattern is a valid regex");
        Self { pattern }
    }
}

impl Default for ReasoningSteps {
    fn default() -> Self {
        Self::new()
    }
}

impl RewardFunction for ReasoningSteps {
    fn name(&self) -> &str {
        "reasoning_steps"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        Ok(batch
            .iter()
            .map(|input| {
                let count = self.pattern.find_iter(input.completion).count();
                Some((count as f64 / 3.0).min(1.0))
            })
            .collect())
    }
}

/// `repetition_penalty`: `max_penalty * (1 - distinct / total)` over word n-grams.
#[derive(Debug, Clone)]
pub struct RepetitionPenalty {
    n_grams: usize,
    max_penalty: f64,
}

impl RepetitionPenalty {
    /// `n_grams >= 1` words; `max_penalty <= 0` (the reward when every n-gram is a repeat).
    pub fn new(n_grams: usize, max_penalty: f64) -> Result<Self, InvalidConfig> {
        if n_grams == 0 {
            return Err(bad(
                "rewards.repetition_n_grams",
                "rewards.repetition_n_grams must be >= 1",
            ));
        }
        if !(max_penalty.is_finite() && max_penalty <= 0.0) {
            return Err(bad(
                "rewards.repetition_max_penalty",
                format!(
                    "rewards.repetition_max_penalty must be a finite number <= 0, got {max_penalty}"
                ),
            ));
        }
        Ok(Self {
            n_grams,
            max_penalty,
        })
    }

    fn penalty(&self, text: &str) -> f64 {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        if words.len() < self.n_grams {
            return 0.0;
        }
        let total = words.len() - self.n_grams + 1;
        let distinct: HashSet<&[&str]> = words.windows(self.n_grams).collect();
        let repeated = 1.0 - distinct.len() as f64 / total as f64;
        if repeated == 0.0 {
            0.0 // not -0.0
        } else {
            repeated * self.max_penalty
        }
    }
}

impl RewardFunction for RepetitionPenalty {
    fn name(&self) -> &str {
        "repetition_penalty"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        Ok(batch
            .iter()
            .map(|input| Some(self.penalty(input.completion)))
            .collect())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    /// Inputs over `completions`, each with `fields` and the given token length and group.
    pub fn inputs<'a>(
        rows: &'a [(&'a str, usize, usize)],
        fields: &'a Map<String, Value>,
    ) -> Vec<RewardInput<'a>> {
        rows.iter()
            .map(|&(completion, completion_tokens, group)| RewardInput {
                prompt: "What is it?",
                completion,
                completion_tokens,
                truncated: false,
                group,
                fields,
            })
            .collect()
    }

    pub fn score_texts(f: &dyn RewardFunction, texts: &[&str]) -> Vec<Option<f64>> {
        let fields = Map::new();
        let rows: Vec<(&str, usize, usize)> = texts.iter().map(|t| (*t, 1, 0)).collect();
        f.score(&inputs(&rows, &fields)).unwrap()
    }

    fn gold(value: Value) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert("solution".into(), value);
        fields.insert("level".into(), json!(3));
        fields
    }

    #[test]
    fn accuracy_scores_and_skips_unparseable_gold() {
        let acc = Accuracy::new("solution");
        let fields = gold(json!("#### 1/2"));
        let rows = [("\\boxed{0.5}", 3, 0), ("so 0.4", 2, 0), ("nothing", 1, 0)];
        let got = acc.score(&inputs(&rows, &fields)).unwrap();
        assert_eq!(got, vec![Some(1.0), Some(0.0), Some(0.0)]);

        let null = gold(Value::Null);
        let got = acc.score(&inputs(&rows[..1], &null)).unwrap();
        assert_eq!(got, vec![None]);
    }

    #[test]
    fn accuracy_missing_column_is_an_error_naming_it() {
        let acc = Accuracy::new("answer");
        let fields = gold(json!(1));
        let err = acc
            .score(&inputs(&[("\\boxed{1}", 1, 0)], &fields))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'accuracy'"), "{err}");
        assert!(err.contains("'answer'"), "{err}");
        assert!(err.contains("solution") && err.contains("level"), "{err}");
    }

    #[test]
    fn format_table() {
        let f = Format::open_r1();
        let cases: &[(&str, f64)] = &[
            ("<think>\nhmm\n</think>\n<answer>\n4\n</answer>", 1.0),
            ("<think>\na\nb\n</think>\n<answer>\n4\n</answer>\n", 1.0),
            (
                "<think>\nhmm\n</think>\n<answer>\n4\n</answer>\n\nmore",
                0.0,
            ),
            ("<think>hmm</think><answer>4</answer>", 0.0),
            (" <think>\nhmm\n</think>\n<answer>\n4\n</answer>", 0.0),
            ("<think>\nhmm\n</think>\n4", 0.0),
            ("", 0.0),
        ];
        for (text, want) in cases {
            assert_eq!(score_texts(&f, &[text]), vec![Some(*want)], "text {text:?}");
        }
        let custom = Format::with_pattern(r"<reasoning>.*</reasoning>").unwrap();
        let got = score_texts(
            &custom,
            &[
                "<reasoning>\nx\n</reasoning> 4",
                "x <reasoning></reasoning>",
            ],
        );
        assert_eq!(got, vec![Some(1.0), Some(0.0)]);
        let err = Format::with_pattern("(").unwrap_err().to_string();
        assert!(err.contains("format_pattern"), "{err}");
    }

    #[test]
    fn tag_count_table() {
        let cases: &[(&str, f64)] = &[
            ("<think>\nx\n</think>\n<answer>\n4\n</answer>", 1.0),
            ("<think>\nx\n</think>\n4", 0.5),
            ("<think>\nx\n<think>\n</think>\n", 0.25),
            ("<think>x</think>", 0.0),
            ("\n<answer>\n1\n</answer>", 0.5),
        ];
        for (text, want) in cases {
            assert_eq!(
                score_texts(&TagCount, &[text]),
                vec![Some(*want)],
                "text {text:?}"
            );
        }
    }

    #[test]
    fn reasoning_steps_table() {
        let f = ReasoningSteps::new();
        let cases: &[(&str, f64)] = &[
            ("Step 1: a\nStep 2: b\nStep 3: c", 1.0),
            ("1. a\n2. b", 2.0 / 3.0),
            ("intro\n- a\n* b\n- c\n- d", 1.0),
            ("First, a. Next, b.", 2.0 / 3.0),
            ("Finally, done", 1.0 / 3.0),
            ("no steps at all", 0.0),
            ("version 2.5 is out", 0.0),
        ];
        for (text, want) in cases {
            let got = score_texts(&f, &[text])[0].unwrap();
            assert!((got - want).abs() < 1e-12, "text {text:?}: {got} vs {want}");
        }
    }

    #[test]
    fn repetition_penalty_table() {
        let f = RepetitionPenalty::new(3, -1.0).unwrap();
        let cases: &[(&str, f64)] = &[
            ("", 0.0),
            ("two words", 0.0),
            ("a b c d e", 0.0),
            // 6 trigrams: (a b c) x2, (b c a) x2, (c a b) x2 -> 3 distinct.
            ("a b c a b c a b", -0.5),
            // Case and spacing do not make n-grams distinct: 4 trigrams, 1 distinct.
            ("Go go GO\ngo  go go", -0.75),
        ];
        for (text, want) in cases {
            let got = score_texts(&f, &[text])[0].unwrap();
            assert!((got - want).abs() < 1e-12, "text {text:?}: {got} vs {want}");
            assert!(
                got.is_sign_negative() == (*want < 0.0),
                "text {text:?}: {got}"
            );
        }
        let half = RepetitionPenalty::new(1, -0.5).unwrap();
        assert_eq!(score_texts(&half, &["x x x x"]), vec![Some(-0.375)]);
        assert!(RepetitionPenalty::new(3, 0.1).is_err());
        assert!(RepetitionPenalty::new(0, -1.0).is_err());
    }
}
