//! `trainer eval`: a MATH-500-layout dataset (a problem column and an answer column) against
//! OpenAI-compatible servers, scored by the answer checker, with Open-R1's defaults from the
//! DeepSeek-R1 report (4 samples per problem, temperature 0.6, top_p 0.95, 32,768 tokens).
//!
//! Data flow: rows -> one chat request per (problem, sample) (system prompt + the problem in
//! `prompt_template`, the server applies its chat template, as GRPO's rollouts do), at most
//! `max_concurrent` in flight, a new one started as soon as one finishes -> each finished
//! sample appended to `output_dir/samples.jsonl` -> `summary.json` (pass@1 and the unbiased
//! pass@k over all samples) and a table on stdout. A rerun with the same `output_dir` reads
//! `samples.jsonl` back and only requests the samples it lacks.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Context, Result, RunError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use super::client::{ChatRequest, ClientConfig, Pool};
use super::jsonl::JsonlAppender;
use super::progress::Progress;
use super::{load_rows, resolve_dataset_path};
use crate::data::DataFormat;
use crate::rewards::answer::{extract_completion_answer, is_correct, parse_gold};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// A JSONL/Parquet file or a directory of shards (MATH-500: `test.jsonl`).
    pub dataset_path: String,
    pub dataset_format: DataFormat,
    pub problem_column: String,
    pub answer_column: String,
    /// Only the first `num_problems` rows (all when unset).
    pub num_problems: Option<usize>,
    /// Prepended as a system message, as GRPO's `system_prompt`.
    pub system_prompt: Option<String>,
    /// The user message; `{problem}` is replaced by the problem text.
    pub prompt_template: String,
    pub num_samples: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    /// Per-sample seeds `seed + row * num_samples + sample` when set.
    pub seed: Option<u64>,
    pub max_concurrent: usize,
    pub output_dir: PathBuf,
    pub endpoints: Vec<String>,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub request_timeout_secs: f64,
    pub max_retries: u32,
    pub retry_backoff_secs: f64,
}

impl crate::config::Recipe for EvalConfig {
    const COMMAND: crate::config::Command = crate::config::Command::Eval;
}

impl Default for EvalConfig {
    fn default() -> Self {
        let c = ClientConfig::default();
        Self {
            dataset_path: String::new(),
            dataset_format: DataFormat::Auto,
            problem_column: "problem".into(),
            answer_column: "answer".into(),
            num_problems: None,
            system_prompt: None,
            prompt_template: "{problem}".into(),
            num_samples: 4,
            temperature: 0.6,
            top_p: 0.95,
            max_tokens: 32768,
            seed: None,
            max_concurrent: 64,
            output_dir: PathBuf::from("eval_output"),
            endpoints: c.endpoints,
            model: c.model,
            api_key: c.api_key,
            api_key_file: c.api_key_file,
            request_timeout_secs: c.request_timeout_secs,
            max_retries: c.max_retries,
            retry_backoff_secs: c.retry_backoff_secs,
        }
    }
}

impl EvalConfig {
    pub fn client(&self) -> ClientConfig {
        ClientConfig {
            endpoints: self.endpoints.clone(),
            model: self.model.clone(),
            api_key: self.api_key.clone(),
            api_key_file: self.api_key_file.clone(),
            request_timeout_secs: self.request_timeout_secs,
            max_retries: self.max_retries,
            retry_backoff_secs: self.retry_backoff_secs,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.dataset_path.is_empty() {
            return Err(crate::config::invalid::bad(
                "dataset_path",
                "dataset_path: no dataset is set",
            )
            .into());
        }
        if self.num_samples == 0 {
            return Err(
                crate::config::invalid::bad("num_samples", "num_samples: must be >= 1").into(),
            );
        }
        if self.max_concurrent == 0 {
            return Err(crate::config::invalid::bad(
                "max_concurrent",
                "max_concurrent: must be >= 1",
            )
            .into());
        }
        if self.max_tokens == 0 {
            return Err(
                crate::config::invalid::bad("max_tokens", "max_tokens: must be >= 1").into(),
            );
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(crate::config::invalid::bad(
                "temperature",
                format!("temperature: must be >= 0, got {}", self.temperature),
            )
            .into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(crate::config::invalid::bad(
                "top_p",
                format!("top_p: must be in (0, 1], got {}", self.top_p),
            )
            .into());
        }
        if !self.prompt_template.contains("{problem}") {
            return Err(crate::config::invalid::bad(
                "prompt_template",
                "prompt_template: must contain {problem}",
            )
            .into());
        }
        self.client().validate()?;
        Ok(())
    }
}

/// The unbiased pass@k estimator (Chen et al. 2021) for `n` samples of which `c` are correct:
/// `1 - C(n-c, k) / C(n, k)`, computed as a product to stay finite.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product::<f64>()
}

/// `summary.json`'s fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub num_problems: usize,
    pub num_samples: usize,
    #[serde(rename = "pass@1")]
    pub pass_at_1: f64,
    #[serde(rename = "pass@k")]
    pub pass_at_k: f64,
    pub k: usize,
    pub mean_completion_tokens: f64,
    /// Problems whose gold answer does not parse (left out of pass@1 and pass@k).
    pub unscorable: usize,
}

/// Summarises sample records (`row`, `correct`, `completion_tokens`) for `k = num_samples`.
pub fn summarize(records: &[Value], num_problems: usize, num_samples: usize) -> Summary {
    let mut per_row: HashMap<u64, (usize, usize, bool)> = HashMap::new();
    let mut tokens = 0.0;
    for r in records {
        let row = r["row"].as_u64().unwrap_or(u64::MAX);
        let e = per_row.entry(row).or_insert((0, 0, false));
        e.0 += 1;
        match r["correct"].as_bool() {
            Some(true) => e.1 += 1,
            Some(false) => {}
            None => e.2 = true,
        }
        tokens += r["completion_tokens"].as_f64().unwrap_or(0.0);
    }
    let scorable: Vec<&(usize, usize, bool)> = per_row.values().filter(|v| !v.2).collect();
    let mean = |f: &dyn Fn(&(usize, usize, bool)) -> f64| {
        if scorable.is_empty() {
            0.0
        } else {
            scorable.iter().map(|v| f(v)).sum::<f64>() / scorable.len() as f64
        }
    };
    Summary {
        num_problems,
        num_samples,
        pass_at_1: mean(&|v| v.1 as f64 / v.0 as f64),
        pass_at_k: mean(&|v| pass_at_k(v.0, v.1, num_samples.min(v.0))),
        k: num_samples,
        mean_completion_tokens: if records.is_empty() {
            0.0
        } else {
            tokens / records.len() as f64
        },
        unscorable: per_row.values().filter(|v| v.2).count(),
    }
}

fn render_table(s: &Summary, model: &str) -> String {
    let rows = [
        ("model", model.to_string()),
        ("problems", s.num_problems.to_string()),
        ("samples per problem", s.num_samples.to_string()),
        ("pass@1", format!("{:.4}", s.pass_at_1)),
        (&*format!("pass@{}", s.k), format!("{:.4}", s.pass_at_k)),
        (
            "mean completion tokens",
            format!("{:.1}", s.mean_completion_tokens),
        ),
        ("unscorable problems", s.unscorable.to_string()),
    ];
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let v = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let mut out = format!("+-{}-+-{}-+\n", "-".repeat(w), "-".repeat(v));
    for (k, val) in rows {
        out += &format!("| {k:<w$} | {val:>v$} |\n");
    }
    out += &format!("+-{}-+-{}-+", "-".repeat(w), "-".repeat(v));
    out
}

struct Problem {
    text: String,
    gold: Option<crate::rewards::answer::Answer>,
}

/// Runs the evaluation (see the module doc); returns the summary it wrote.
pub fn run(cfg: &EvalConfig) -> Result<Summary> {
    cfg.validate()?;
    let path = resolve_dataset_path(&cfg.dataset_path)?;
    let rows = load_rows(&path, cfg.dataset_format, cfg.num_problems)?;
    let mut problems = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let text = row
            .get(&cfg.problem_column)
            .and_then(Value::as_str)
            .with_context(|| {
                format!(
                    "{}: row {i}: column {:?} is missing or not a string",
                    path.display(),
                    cfg.problem_column
                )
            })?;
        let gold = row.get(&cfg.answer_column).with_context(|| {
            format!(
                "{}: row {i}: no column {:?}",
                path.display(),
                cfg.answer_column
            )
        })?;
        problems.push(Problem {
            text: text.to_string(),
            gold: parse_gold(gold),
        });
    }
    let samples_path = cfg.output_dir.join("samples.jsonl");
    let (mut out, mut records, repaired) = JsonlAppender::open(&samples_path)?;
    if repaired {
        tracing::warn!("{}: cut off a partial last line", samples_path.display());
    }
    // Keep only records of this run's grid, once each (a resumed run may have fewer problems).
    let mut seen = HashSet::new();
    records.retain(|r| {
        let key = (r["row"].as_u64(), r["sample"].as_u64());
        matches!(key, (Some(row), Some(s)) if (row as usize) < problems.len() && (s as usize) < cfg.num_samples)
            && seen.insert(key)
    });
    let todo: Vec<(usize, usize)> = (0..problems.len())
        .flat_map(|row| (0..cfg.num_samples).map(move |s| (row, s)))
        .filter(|&(row, s)| !seen.contains(&(Some(row as u64), Some(s as u64))))
        .collect();
    if !records.is_empty() {
        tracing::info!(
            "resuming: {} samples done, {} to go",
            records.len(),
            todo.len()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let problems = Arc::new(problems);
    let (model, new_records) = runtime.block_on(async {
        let pool = Arc::new(Pool::connect(&cfg.client()).await?);
        let progress = Progress::new("eval", todo.len() as u64);
        let drawer = tokio::spawn(progress.clone().run());
        let (tx, mut rx) = mpsc::unbounded_channel::<Result<Value>>();
        let sem = Arc::new(Semaphore::new(cfg.max_concurrent));
        let producer = {
            let (pool, problems, progress, cfg) = (
                pool.clone(),
                problems.clone(),
                progress.clone(),
                cfg.clone(),
            );
            tokio::spawn(async move {
                for (row, sample) in todo {
                    let Ok(permit) = sem.clone().acquire_owned().await else {
                        break;
                    };
                    let (pool, problems, progress, tx, cfg) = (
                        pool.clone(),
                        problems.clone(),
                        progress.clone(),
                        tx.clone(),
                        cfg.clone(),
                    );
                    tokio::spawn(async move {
                        let r =
                            one_sample(&pool, &problems[row], row, sample, &cfg, &progress).await;
                        drop(permit);
                        let _ = tx.send(r);
                    });
                }
            })
        };
        let mut new = Vec::new();
        let mut failure = None;
        while let Some(r) = rx.recv().await {
            match r {
                Ok(rec) => {
                    out.append(&rec)?;
                    progress.done.fetch_add(1, Ordering::Relaxed);
                    new.push(rec);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        producer.abort();
        progress.finish();
        drawer.abort();
        if let Some(e) = failure {
            return Err(e.context(format!(
                "eval stopped; {} finished samples are kept in {}",
                new.len(),
                samples_path.display()
            )));
        }
        Ok::<_, RunError>((pool.model.clone(), new))
    })?;
    records.extend(new_records);
    let summary = summarize(&records, problems.len(), cfg.num_samples);
    let summary_path = cfg.output_dir.join("summary.json");
    std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&summary)? + "\n",
    )
    .with_context(|| format!("writing {}", summary_path.display()))?;
    println!("{}", render_table(&summary, &model));
    Ok(summary)
}

async fn one_sample(
    pool: &Pool,
    p: &Problem,
    row: usize,
    sample: usize,
    cfg: &EvalConfig,
    progress: &Progress,
) -> Result<Value> {
    let mut messages = Vec::new();
    if let Some(system) = &cfg.system_prompt {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(
        json!({"role": "user", "content": cfg.prompt_template.replace("{problem}", &p.text)}),
    );
    let req = ChatRequest {
        messages,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        max_tokens: cfg.max_tokens,
        seed: cfg
            .seed
            .map(|s| s + (row * cfg.num_samples + sample) as u64),
    };
    let c = pool
        .chat(&req, &|| {
            progress.tokens.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .with_context(|| format!("row {row} sample {sample}"))?;
    let correct = p.gold.as_ref().map(|g| is_correct(&c.text, g));
    Ok(json!({
        "row": row,
        "sample": sample,
        "completion": c.text,
        "answer": extract_completion_answer(&c.text),
        "correct": correct,
        "completion_tokens": c.completion_tokens,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_known_values() {
        assert_eq!(pass_at_k(4, 0, 1), 0.0);
        assert_eq!(pass_at_k(4, 4, 4), 1.0);
        assert!((pass_at_k(4, 1, 1) - 0.25).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 1, 4), 1.0);
        // 1 - C(8, 2) / C(10, 2) = 1 - 28/45
        assert!((pass_at_k(10, 2, 2) - (1.0 - 28.0 / 45.0)).abs() < 1e-12);
        assert!(pass_at_k(2, 1, 3).is_nan());
    }

    #[test]
    fn summary_of_known_outcomes() {
        let rec = |row: u64, correct: Value, t: u64| json!({"row": row, "correct": correct, "completion_tokens": t});
        let records = vec![
            rec(0, json!(true), 10),
            rec(0, json!(false), 20),
            rec(1, json!(false), 30),
            rec(1, json!(false), 40),
            rec(2, Value::Null, 50),
            rec(2, Value::Null, 50),
        ];
        let s = summarize(&records, 3, 2);
        assert_eq!(s.unscorable, 1);
        assert!((s.pass_at_1 - 0.25).abs() < 1e-12); // (1/2 + 0) / 2
        assert!((s.pass_at_k - 0.5).abs() < 1e-12); // (1 + 0) / 2
        assert!((s.mean_completion_tokens - 200.0 / 6.0).abs() < 1e-12);
    }
}
