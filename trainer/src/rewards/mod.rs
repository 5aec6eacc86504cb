//! Reward functions for GRPO: the built-in ones Open-R1 / TRL users know, and an external HTTP
//! reward service.
//!
//! The step loop builds the functions once from `GRPOConfig.reward_funcs` with
//! [`build_reward_functions`], and after each rollout calls [`RewardFunction::score`] on the whole
//! step batch (every completion of every prompt, as [`RewardInput`]s) from a plain thread. Each
//! function returns one `Option<f64>` per input; `None` means "cannot score this sample" (for
//! example an unparseable gold answer): the caller excludes it and counts it. Configuration is the
//! `[rewards]` table, [`RewardsConfig`]. `docs/rewards.md` is the user-facing reference.
//!
//! # Built-in functions (names as in `reward_funcs`)
//!
//! Correctness, used by `accuracy`, `length` and `cosine`, comes from [`answer`] (the `verify`
//! crate, math-verify's grade): the completion's last `\boxed{}`, else its `<answer>` tag, else its
//! last LaTeX span or number, against the gold answer in column `answer_column` (default
//! `"solution"`; a number, an answer string, a GSM8K-style `... #### 42` or a solution with a
//! `\boxed{}`), compared as math (rationals, rounded decimals, expressions, sets, intervals,
//! tuples, matrices, equations). A missing column is an error; a null or unparseable gold answer
//! gives `None`.
//!
//! - `accuracy`: `1.0` if correct, else `0.0`.
//! - `format`: `1.0` if the completion matches `^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$`
//!   (`.` matches newlines; the match must span the completion, one trailing newline allowed),
//!   else `0.0`. `format_pattern` replaces the pattern; it is compiled with `(?s)` and must match
//!   at the start of the completion (Python's `re.match`); anchor its end with `$`.
//! - `tag_count`: `0.25` for each of `<think>\n`, `\n</think>\n`, `\n<answer>\n`, `\n</answer>`
//!   that occurs exactly once (0, 0.25, ..., 1).
//! - `reasoning_steps`: `min(1, count / 3)`, `count` = occurrences of `Step N:`, a numbered list
//!   item `N.` at the start of a line, a bullet `\n-` or `\n*`, and `First,` `Second,` `Next,`
//!   `Finally,`.
//! - `length` (Kimi 1.5): per prompt group, over its scorable samples, with lengths in tokens,
//!   `lambda = 0.5 - (len - min_len) / (max_len - min_len)`; correct: `lambda`, wrong:
//!   `min(0, lambda)`; `0.0` for all when `max_len == min_len`.
//! - `cosine`: `progress = min(len, cosine_max_len) / cosine_max_len` (tokens),
//!   `reward = lo + 0.5 (hi - lo)(1 + cos(pi * progress))` with `(lo, hi)` =
//!   `(cosine_min_value_correct, cosine_max_value_correct)` when correct (short correct answers
//!   earn most) and `(cosine_max_value_wrong, cosine_min_value_wrong)` when wrong (short wrong
//!   answers are punished most). Defaults `-0.5, 0.0, 0.5, 1.0`, `cosine_max_len =
//!   max_completion_length`.
//! - `repetition_penalty`: with the completion lower-cased and split on whitespace into words,
//!   `repetition_max_penalty * (1 - distinct / total)` over its `repetition_n_grams`-grams; `0.0`
//!   for completions shorter than one n-gram. Defaults `3`, `-1.0` (must be `<= 0`).
//! - `soft_overlong_punishment` (DAPO): with `L = max_completion_length`, `B = soft_punish_cache`
//!   and `len` in tokens: `0` if `len <= L - B`, `(L - B - len) / B` if `L - B < len <= L`, `-1`
//!   beyond. Default `B = L / 5` (DAPO's 4096 of 20480).
//!
//! # External functions
//!
//! Each `[[rewards.external]]` entry is a function named by its `name`: one POST per step batch
//! to its `url` (see [`external`] for the JSON protocol), `timeout_secs` (default 60) per request.

pub mod answer;
mod builtin;
pub mod external;
mod length;

use crate::config::invalid::{bad, InvalidConfig};
use std::collections::{BTreeMap, BTreeSet};

pub use builtin::{Accuracy, Format, ReasoningSteps, RepetitionPenalty, TagCount};
pub use external::ExternalReward;
pub use length::{CosineScaled, KimiLength, SoftOverlongPunishment};

/// One completion to score, with what a reward function may need about it.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The rendered prompt text.
    pub prompt: &'a str,
    /// The decoded completion text.
    pub completion: &'a str,
    /// Completion length in tokens.
    pub completion_tokens: usize,
    /// The finish reason was the length limit.
    pub truncated: bool,
    /// Index of the prompt group in the step batch; completions of one prompt share it.
    pub group: usize,
    /// The dataset row's other columns (the gold answer, test cases, ...).
    pub fields: &'a serde_json::Map<String, serde_json::Value>,
}

/// Why a reward function could not score a batch. Messages name the function and the problem.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// The dataset row lacks a column the function needs.
    #[error(
        "reward function '{function}': the dataset row has no column '{column}' \
         (set rewards.answer_column); its columns are [{available}]"
    )]
    MissingColumn {
        function: String,
        column: String,
        available: String,
    },
    /// The batch cannot be scored as given.
    #[error("reward function '{function}': {problem}")]
    InvalidInput { function: String, problem: String },
    /// The request to an external service failed before an answer (connection, body encoding).
    #[error("reward function '{function}': request to {url} failed: {message}")]
    Request {
        function: String,
        url: String,
        message: String,
    },
    /// The external service did not answer within the timeout.
    #[error("reward function '{function}': {url} did not answer within {timeout_secs} s")]
    Timeout {
        function: String,
        url: String,
        timeout_secs: f64,
    },
    /// The external service answered with a non-success status.
    #[error("reward function '{function}': {url} answered HTTP {status}: {body}")]
    Status {
        function: String,
        url: String,
        status: u16,
        body: String,
    },
    /// The external service's answer is not `{"rewards": [number|null, ...]}` of the batch length.
    #[error("reward function '{function}': bad response from {url}: {problem}")]
    Response {
        function: String,
        url: String,
        problem: String,
    },
}

/// A reward function over a batch of completions.
pub trait RewardFunction: Send + Sync {
    /// The name it was selected by in `reward_funcs`; used in metrics and errors.
    fn name(&self) -> &str;
    /// One score per input; None = cannot score this sample (it is excluded and counted by the caller).
    /// Called from a plain (non-async) thread.
    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError>;
}

/// The built-in reward function names, as accepted in `reward_funcs`.
pub const BUILTIN_REWARDS: [&str; 8] = [
    "accuracy",
    "format",
    "tag_count",
    "reasoning_steps",
    "length",
    "cosine",
    "repetition_penalty",
    "soft_overlong_punishment",
];

/// The `[rewards]` table: parameters of the built-in functions (Open-R1's names where they exist)
/// and the external reward services.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardsConfig {
    /// Dataset column holding the gold answer (`accuracy`, `length`, `cosine`). Default `"solution"`.
    pub answer_column: String,
    /// Regex replacing the think/answer pattern of `format`; `(?s)`, matched at the start.
    pub format_pattern: Option<String>,
    /// `cosine`: reward of a wrong answer of length 0 (the lowest). Default `-0.5`.
    pub cosine_min_value_wrong: f64,
    /// `cosine`: reward of a wrong answer at `cosine_max_len` or longer. Default `0.0`.
    pub cosine_max_value_wrong: f64,
    /// `cosine`: reward of a correct answer at `cosine_max_len` or longer. Default `0.5`.
    pub cosine_min_value_correct: f64,
    /// `cosine`: reward of a correct answer of length 0 (the highest). Default `1.0`.
    pub cosine_max_value_correct: f64,
    /// `cosine`: length in tokens where the cosine reaches its end. Default `max_completion_length`.
    pub cosine_max_len: Option<usize>,
    /// `repetition_penalty`: n-gram size in words. Default `3`.
    pub repetition_n_grams: usize,
    /// `repetition_penalty`: the penalty when every n-gram repeats; `<= 0`. Default `-1.0`.
    pub repetition_max_penalty: f64,
    /// `soft_overlong_punishment`: the buffer in tokens before `max_completion_length` over which
    /// the penalty ramps from 0 to -1 (DAPO's overlong buffer). Default `max_completion_length / 5`.
    #[serde(alias = "overlong_buffer_len")]
    pub soft_punish_cache: Option<usize>,
    /// External reward services, each a function named by its `name`.
    pub external: Vec<ExternalRewardConfig>,
}

impl Default for RewardsConfig {
    fn default() -> Self {
        Self {
            answer_column: "solution".to_string(),
            format_pattern: None,
            cosine_min_value_wrong: -0.5,
            cosine_max_value_wrong: 0.0,
            cosine_min_value_correct: 0.5,
            cosine_max_value_correct: 1.0,
            cosine_max_len: None,
            repetition_n_grams: 3,
            repetition_max_penalty: -1.0,
            soft_punish_cache: None,
            external: Vec::new(),
        }
    }
}

/// One `[[rewards.external]]` entry: an HTTP reward service. `Debug` prints header names only,
/// since values are often credentials.
#[derive(Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalRewardConfig {
    /// The function's name in `reward_funcs`; must not be a built-in name.
    pub name: String,
    /// `http://` or `https://` URL the batch is POSTed to.
    pub url: String,
    /// Time limit of one request (connect, send, answer) in seconds. Default 60.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// Extra request headers (e.g. `Authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_timeout_secs() -> f64 {
    60.0
}

impl std::fmt::Debug for ExternalRewardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalRewardConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("timeout_secs", &self.timeout_secs)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RewardsConfig {
    /// Checks every field on its own and across fields; errors name the field and what is allowed.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.answer_column.trim().is_empty() {
            return Err(bad(
                "rewards.answer_column",
                "rewards.answer_column must name a dataset column",
            ));
        }
        if let Some(pattern) = &self.format_pattern {
            builtin::Format::with_pattern(pattern)?;
        }
        let cosine = [
            ("cosine_min_value_wrong", self.cosine_min_value_wrong),
            ("cosine_max_value_wrong", self.cosine_max_value_wrong),
            ("cosine_min_value_correct", self.cosine_min_value_correct),
            ("cosine_max_value_correct", self.cosine_max_value_correct),
        ];
        if let Some((field, value)) = cosine.iter().find(|(_, v)| !v.is_finite()) {
            return Err(bad(
                &format!("rewards.{field}"),
                format!("rewards.{field} must be finite, got {value}"),
            ));
        }
        for (lo, hi) in [(0, 1), (2, 3)] {
            if cosine[lo].1 > cosine[hi].1 {
                return Err(bad(
                    &format!("rewards.{}", cosine[lo].0),
                    format!(
                        "rewards.{} ({}) must be <= rewards.{} ({})",
                        cosine[lo].0, cosine[lo].1, cosine[hi].0, cosine[hi].1
                    ),
                ));
            }
        }
        if self.cosine_max_len == Some(0) {
            return Err(bad(
                "rewards.cosine_max_len",
                "rewards.cosine_max_len must be >= 1 token",
            ));
        }
        if self.repetition_n_grams == 0 {
            return Err(bad(
                "rewards.repetition_n_grams",
                "rewards.repetition_n_grams must be >= 1",
            ));
        }
        if !(self.repetition_max_penalty.is_finite() && self.repetition_max_penalty <= 0.0) {
            return Err(bad(
                "rewards.repetition_max_penalty",
                format!(
                    "rewards.repetition_max_penalty must be a finite number <= 0, got {}",
                    self.repetition_max_penalty
                ),
            ));
        }
        if self.soft_punish_cache == Some(0) {
            return Err(bad(
                "rewards.soft_punish_cache",
                "rewards.soft_punish_cache must be >= 1 token",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, ext) in self.external.iter().enumerate() {
            if ext.name.trim().is_empty() {
                return Err(bad(
                    &format!("rewards.external[{i}].name"),
                    format!("rewards.external[{i}].name must not be empty"),
                ));
            }
            if BUILTIN_REWARDS.contains(&ext.name.as_str()) {
                return Err(bad(
                    &format!("rewards.external[{i}].name"),
                    format!(
                        "rewards.external[{i}].name '{}' is a built-in reward name; built-ins are {}",
                        ext.name,
                        BUILTIN_REWARDS.join(", ")
                    ),
                ));
            }
            if !names.insert(ext.name.as_str()) {
                return Err(bad(
                    &format!("rewards.external[{i}].name"),
                    format!(
                        "rewards.external[{i}].name '{}' is used by another entry",
                        ext.name
                    ),
                ));
            }
            external::validate_entry(ext).map_err(|e| {
                bad(
                    &format!("rewards.external[{i}].{}", e.field()),
                    format!("rewards.external[{i}].{e}"),
                )
            })?;
        }
        Ok(())
    }
}

/// Builds the functions named by `GRPOConfig.reward_funcs`, in that order: the built-ins
/// ([`BUILTIN_REWARDS`]) or the `name` of a `[[rewards.external]]` entry. `max_completion_length`
/// (tokens) is the default `cosine_max_len` and the limit of `soft_overlong_punishment`.
/// Errors: an invalid config, an empty or repeated list, an unknown name (the error lists the
/// allowed ones), a `soft_punish_cache` above `max_completion_length`.
pub fn build_reward_functions(
    names: &[String],
    cfg: &RewardsConfig,
    max_completion_length: usize,
) -> Result<Vec<Box<dyn RewardFunction>>, InvalidConfig> {
    cfg.validate()?;
    if max_completion_length == 0 {
        return Err(bad(
            "max_completion_length",
            "max_completion_length must be >= 1 token",
        ));
    }
    if names.is_empty() {
        return Err(bad(
            "reward_funcs",
            format!("reward_funcs is empty; choose from {}", allowed_names(cfg)),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut functions: Vec<Box<dyn RewardFunction>> = Vec::with_capacity(names.len());
    for name in names {
        if !seen.insert(name.as_str()) {
            return Err(bad(
                "reward_funcs",
                format!("reward_funcs lists '{name}' twice; weight it with reward_weights instead"),
            ));
        }
        let column = &cfg.answer_column;
        let function: Box<dyn RewardFunction> = match name.as_str() {
            "accuracy" => Box::new(Accuracy::new(column)),
            "format" => Box::new(match &cfg.format_pattern {
                Some(pattern) => Format::with_pattern(pattern)?,
                None => Format::open_r1(),
            }),
            "tag_count" => Box::new(TagCount),
            "reasoning_steps" => Box::new(ReasoningSteps::new()),
            "length" => Box::new(KimiLength::new(column)),
            "cosine" => Box::new(CosineScaled::new(cfg, max_completion_length)?),
            "repetition_penalty" => Box::new(RepetitionPenalty::new(
                cfg.repetition_n_grams,
                cfg.repetition_max_penalty,
            )?),
            "soft_overlong_punishment" => {
                let cache = cfg
                    .soft_punish_cache
                    .unwrap_or((max_completion_length / 5).max(1));
                Box::new(SoftOverlongPunishment::new(max_completion_length, cache)?)
            }
            other => match cfg.external.iter().find(|e| e.name == other) {
                Some(entry) => Box::new(ExternalReward::new(entry)?),
                None => {
                    return Err(bad(
                        "reward_funcs",
                        format!(
                            "unknown reward function '{other}' in reward_funcs; allowed: {}",
                            allowed_names(cfg)
                        ),
                    ))
                }
            },
        };
        functions.push(function);
    }
    Ok(functions)
}

fn allowed_names(cfg: &RewardsConfig) -> String {
    let mut all: Vec<&str> = BUILTIN_REWARDS.to_vec();
    all.extend(cfg.external.iter().map(|e| e.name.as_str()));
    all.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn builds_every_builtin_in_order() {
        let all = names(&BUILTIN_REWARDS);
        let functions = build_reward_functions(&all, &RewardsConfig::default(), 512).unwrap();
        let built: Vec<&str> = functions.iter().map(|f| f.name()).collect();
        assert_eq!(built, BUILTIN_REWARDS);
    }

    #[test]
    fn unknown_empty_and_repeated_names_are_errors() {
        let cfg = RewardsConfig::default();
        let err = build_reward_functions(&names(&["accuracy", "acuracy"]), &cfg, 512)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("'acuracy'") && err.contains("soft_overlong_punishment"),
            "{err}"
        );
        let err = build_reward_functions(&[], &cfg, 512)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("reward_funcs is empty"), "{err}");
        let err = build_reward_functions(&names(&["format", "format"]), &cfg, 512)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("twice"), "{err}");
        let err = build_reward_functions(&names(&["format"]), &cfg, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("max_completion_length"), "{err}");
    }

    #[test]
    fn config_parses_open_r1_names_and_rejects_unknown_fields() {
        let cfg: RewardsConfig = serde_json::from_value(serde_json::json!({
            "answer_column": "answer",
            "cosine_max_len": 1000,
            "repetition_n_grams": 4,
            "overlong_buffer_len": 64,
            "external": [{"name": "judge", "url": "http://127.0.0.1:9/score",
                          "headers": {"Authorization": "Bearer x"}},
                         {"name": "grader", "url": "https://grader/", "timeout_secs": 30}],
        }))
        .unwrap();
        assert_eq!(cfg.answer_column, "answer");
        assert_eq!(cfg.soft_punish_cache, Some(64));
        assert_eq!(cfg.repetition_max_penalty, -1.0);
        assert_eq!(cfg.external[0].timeout_secs, 60.0);
        assert_eq!(cfg.external[1].timeout_secs, 30.0);
        cfg.validate().unwrap();
        let debug = format!("{cfg:?}");
        assert!(
            debug.contains("Authorization") && !debug.contains("Bearer"),
            "{debug}"
        );
        let functions = build_reward_functions(&names(&["judge", "accuracy"]), &cfg, 512).unwrap();
        assert_eq!(functions[0].name(), "judge");

        let err = serde_json::from_value::<RewardsConfig>(serde_json::json!({"cosine_maxlen": 3}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cosine_maxlen"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(RewardsConfig, &str)> = vec![
            (
                RewardsConfig {
                    answer_column: " ".into(),
                    ..Default::default()
                },
                "answer_column",
            ),
            (
                RewardsConfig {
                    format_pattern: Some("(<think>".into()),
                    ..Default::default()
                },
                "format_pattern",
            ),
            (
                RewardsConfig {
                    cosine_min_value_wrong: 0.5,
                    ..Default::default()
                },
                "cosine_min_value_wrong (0.5) must be <= rewards.cosine_max_value_wrong",
            ),
            (
                RewardsConfig {
                    cosine_max_value_correct: f64::NAN,
                    ..Default::default()
                },
                "cosine_max_value_correct must be finite",
            ),
            (
                RewardsConfig {
                    cosine_max_len: Some(0),
                    ..Default::default()
                },
                "cosine_max_len",
            ),
            (
                RewardsConfig {
                    repetition_n_grams: 0,
                    ..Default::default()
                },
                "repetition_n_grams",
            ),
            (
                RewardsConfig {
                    repetition_max_penalty: 0.5,
                    ..Default::default()
                },
                "repetition_max_penalty must be a finite number <= 0, got 0.5",
            ),
            (
                RewardsConfig {
                    soft_punish_cache: Some(0),
                    ..Default::default()
                },
                "soft_punish_cache",
            ),
            (
                external_cfg("accuracy", "http://a/"),
                "is a built-in reward name",
            ),
            (
                external_cfg("", "http://a/"),
                "external[0].name must not be empty",
            ),
            (external_cfg("judge", "ftp://a/"), "external[0].url"),
            (external_cfg("judge", "not a url"), "external[0].url"),
        ];
        for (cfg, want) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
        let mut twice = external_cfg("judge", "http://a/");
        twice.external.push(twice.external[0].clone());
        assert!(twice
            .validate()
            .unwrap_err()
            .to_string()
            .contains("used by another entry"));
        let mut bad_timeout = external_cfg("judge", "http://a/");
        bad_timeout.external[0].timeout_secs = 0.0;
        assert!(bad_timeout
            .validate()
            .unwrap_err()
            .to_string()
            .contains("timeout_secs"));
        let mut bad_header = external_cfg("judge", "http://a/");
        bad_header.external[0]
            .headers
            .insert("Bad Header".into(), "x".into());
        assert!(bad_header
            .validate()
            .unwrap_err()
            .to_string()
            .contains("headers"));
    }

    #[test]
    fn soft_punish_cache_above_the_limit_is_an_error() {
        let cfg = RewardsConfig {
            soft_punish_cache: Some(600),
            ..Default::default()
        };
        let err = build_reward_functions(&names(&["soft_overlong_punishment"]), &cfg, 512)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("soft_punish_cache (600)"), "{err}");
    }

    fn external_cfg(name: &str, url: &str) -> RewardsConfig {
        RewardsConfig {
            external: vec![ExternalRewardConfig {
                name: name.into(),
                url: url.into(),
                timeout_secs: 5.0,
                headers: BTreeMap::new(),
            }],
            ..Default::default()
        }
    }
}
