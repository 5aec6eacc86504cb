//! `trainer generate`: synthetic reasoning data, Open-R1's distillation step. Every input row
//! gets `num_generations` chat completions; at most `max_concurrent` requests are in flight and
//! a new one starts as soon as any finishes (no lock-step batches, so one long completion does
//! not idle the servers); requests go to the endpoint with the fewest outstanding ones and are
//! retried with backoff.
//!
//! Output: `output` (JSONL), one line per row appended when its last generation finishes: the
//! row's own columns plus `id`, `generations`, `finish_reasons` and `usage`
//! (`{prompt_tokens, completion_tokens}`); with `filter_answer_column`, also `correct` (per
//! generation, by the answer checker) and `pass_rate`, and `generations` keeps the correct ones.
//! Resume: rows whose `id` (`id_column`, else a hash of the prompt) is already in `output` are
//! skipped, a partial last line is cut off, so no row is lost or written twice. At the end a
//! dataset card (`<output>.card.md`: counts, settings, throughput) is written.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Context, Result, RunError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};

use super::client::{ChatRequest, ClientConfig, Completion, Pool};
use super::jsonl::JsonlAppender;
use super::progress::{format_secs, Progress};
use super::{load_rows, resolve_dataset_path};
use crate::data::DataFormat;
use crate::rewards::answer::{is_correct, parse_gold};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    pub dataset_path: String,
    pub dataset_format: DataFormat,
    /// A string (one user message) or a list of `{role, content}` messages.
    pub prompt_column: String,
    /// The column identifying a row for resume; else a hash of the prompt.
    pub id_column: Option<String>,
    pub num_rows: Option<usize>,
    pub system_prompt: Option<String>,
    pub num_generations: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub seed: Option<u64>,
    pub max_concurrent: usize,
    pub output: PathBuf,
    /// Keep only generations the answer checker finds correct against this column.
    pub filter_answer_column: Option<String>,
    pub endpoints: Vec<String>,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub request_timeout_secs: f64,
    pub max_retries: u32,
    pub retry_backoff_secs: f64,
}

impl crate::config::Recipe for GenerateConfig {
    const COMMAND: crate::config::Command = crate::config::Command::Generate;
}

impl Default for GenerateConfig {
    fn default() -> Self {
        let c = ClientConfig::default();
        Self {
            dataset_path: String::new(),
            dataset_format: DataFormat::Auto,
            prompt_column: "prompt".into(),
            id_column: None,
            num_rows: None,
            system_prompt: None,
            num_generations: 1,
            temperature: 0.6,
            top_p: 0.95,
            max_tokens: 32768,
            seed: None,
            max_concurrent: 64,
            output: PathBuf::from("generations.jsonl"),
            filter_answer_column: None,
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

impl GenerateConfig {
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
        if self.num_generations == 0 {
            return Err(crate::config::invalid::bad(
                "num_generations",
                "num_generations: must be >= 1",
            )
            .into());
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
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(crate::config::invalid::bad(
                "top_p",
                format!("top_p: must be in (0, 1], got {}", self.top_p),
            )
            .into());
        }
        self.client().validate()?;
        Ok(())
    }

    fn card_path(&self) -> PathBuf {
        let mut p = self.output.clone().into_os_string();
        p.push(".card.md");
        PathBuf::from(p)
    }
}

/// A row's id: its `id_column` value as text, else the first 16 hex digits of the SHA-256 of
/// the prompt's JSON.
pub fn row_id(row: &Map<String, Value>, cfg: &GenerateConfig) -> Result<String> {
    if let Some(col) = &cfg.id_column {
        return match row.get(col) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            other => Err(RunError::Column {
                column: "id_column",
                name: col.clone(),
                expected: "a string or number",
                got: format!("{other:?}"),
            }),
        };
    }
    let prompt = row.get(&cfg.prompt_column).cloned().unwrap_or(Value::Null);
    let digest = Sha256::digest(serde_json::to_vec(&prompt)?);
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

fn messages(row: &Map<String, Value>, cfg: &GenerateConfig, index: usize) -> Result<Vec<Value>> {
    let mut m = match row.get(&cfg.prompt_column) {
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        Some(Value::Array(a))
            if a.iter()
                .all(|x| x["role"].is_string() && x["content"].is_string()) =>
        {
            a.clone()
        }
        other => {
            return Err(RunError::Row {
                row: index,
                message: format!(
                    "column {:?} is not a string or a list of messages (got {other:?})",
                    cfg.prompt_column
                ),
            })
        }
    };
    if let Some(system) = &cfg.system_prompt {
        if !m.iter().any(|x| x["role"] == "system") {
            m.insert(0, json!({"role": "system", "content": system}));
        }
    }
    Ok(m)
}

/// Counts for the dataset card.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GenerateReport {
    pub rows_in_input: usize,
    pub rows_already_done: usize,
    pub rows_written: usize,
    pub duplicate_ids_skipped: usize,
    pub generations: usize,
    pub completion_tokens: u64,
    pub seconds: f64,
    /// Correct generations / all generations, with a filter.
    pub pass_rate: Option<f64>,
}

struct Pending {
    index: usize,
    id: String,
    results: Vec<Option<Completion>>,
    left: usize,
}

/// Runs the generation (see the module doc).
pub fn run(cfg: &GenerateConfig) -> Result<GenerateReport> {
    cfg.validate()?;
    let started = Instant::now();
    let path = resolve_dataset_path(&cfg.dataset_path)?;
    let rows = load_rows(&path, cfg.dataset_format, cfg.num_rows)?;
    let (mut out, existing, repaired) = JsonlAppender::open(&cfg.output)?;
    if repaired {
        tracing::warn!("{}: cut off a partial last line", cfg.output.display());
    }
    let mut done: HashSet<String> = existing
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    let mut report = GenerateReport {
        rows_in_input: rows.len(),
        rows_already_done: 0,
        ..Default::default()
    };
    let mut todo = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let id = row_id(row, cfg).with_context(|| format!("row {i}"))?;
        if done.contains(&id) {
            report.rows_already_done += 1;
            continue;
        }
        if !done.insert(id.clone()) {
            report.duplicate_ids_skipped += 1;
            continue;
        }
        let msgs = messages(row, cfg, i)?;
        let gold = match &cfg.filter_answer_column {
            Some(col) => Some(parse_gold(
                row.get(col)
                    .with_context(|| format!("row {i}: no column {col:?}"))?,
            )),
            None => None,
        };
        todo.push((i, id, msgs, gold));
    }
    // `done` now also holds this run's ids; only the input order matters below.
    let rows = Arc::new(rows);
    let units = todo.len() * cfg.num_generations;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (mut correct_total, mut judged_total) = (0usize, 0usize);
    let model = runtime.block_on(async {
        let pool = Arc::new(Pool::connect(&cfg.client()).await?);
        let progress = Progress::new("generate", units as u64);
        let drawer = tokio::spawn(progress.clone().run());
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, usize, Result<Completion>)>();
        let sem = Arc::new(Semaphore::new(cfg.max_concurrent));
        let mut pending: HashMap<usize, Pending> = HashMap::new();
        let mut golds = HashMap::new();
        let mut work = Vec::with_capacity(units);
        for (slot, (index, id, msgs, gold)) in todo.into_iter().enumerate() {
            pending.insert(
                slot,
                Pending {
                    index,
                    id,
                    results: vec![None; cfg.num_generations],
                    left: cfg.num_generations,
                },
            );
            golds.insert(slot, gold.flatten());
            for g in 0..cfg.num_generations {
                let req = ChatRequest {
                    messages: msgs.clone(),
                    temperature: cfg.temperature,
                    top_p: cfg.top_p,
                    max_tokens: cfg.max_tokens,
                    seed: cfg
                        .seed
                        .map(|s| s + (index * cfg.num_generations + g) as u64),
                };
                work.push((slot, g, req));
            }
        }
        let producer = {
            let (pool, progress) = (pool.clone(), progress.clone());
            tokio::spawn(async move {
                for (slot, g, req) in work {
                    let Ok(permit) = sem.clone().acquire_owned().await else {
                        break;
                    };
                    let (pool, progress, tx) = (pool.clone(), progress.clone(), tx.clone());
                    tokio::spawn(async move {
                        let r = pool
                            .chat(&req, &|| {
                                progress.tokens.fetch_add(1, Ordering::Relaxed);
                            })
                            .await
                            .map_err(RunError::from);
                        drop(permit);
                        let _ = tx.send((slot, g, r));
                    });
                }
            })
        };
        let mut failure = None;
        while !pending.is_empty() {
            let Some((slot, g, r)) = rx.recv().await else {
                break;
            };
            let c = match r {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(e.context(format!(
                        "row {} generation {g}",
                        pending.get(&slot).map_or(0, |p| p.index)
                    )));
                    break;
                }
            };
            progress.done.fetch_add(1, Ordering::Relaxed);
            let p = pending
                .get_mut(&slot)
                .context("a result for an unknown row")?;
            p.results[g] = Some(c);
            p.left -= 1;
            if p.left > 0 {
                continue;
            }
            let p = pending.remove(&slot).context("row vanished")?;
            let comps: Vec<Completion> = p.results.into_iter().flatten().collect();
            let mut line = rows[p.index].clone();
            line.insert("id".into(), json!(p.id));
            let usage = json!({
                "prompt_tokens": comps.first().and_then(|c| c.prompt_tokens),
                "completion_tokens": comps.iter().map(|c| c.completion_tokens).sum::<u64>(),
            });
            report.completion_tokens += comps.iter().map(|c| c.completion_tokens).sum::<u64>();
            report.generations += comps.len();
            match golds.get(&slot) {
                Some(Some(gold)) => {
                    let correct: Vec<bool> =
                        comps.iter().map(|c| is_correct(&c.text, gold)).collect();
                    let n_ok = correct.iter().filter(|c| **c).count();
                    correct_total += n_ok;
                    judged_total += correct.len();
                    let kept: Vec<&Completion> = comps
                        .iter()
                        .zip(&correct)
                        .filter(|(_, ok)| **ok)
                        .map(|(c, _)| c)
                        .collect();
                    line.insert(
                        "generations".into(),
                        json!(kept.iter().map(|c| &c.text).collect::<Vec<_>>()),
                    );
                    line.insert(
                        "finish_reasons".into(),
                        json!(kept.iter().map(|c| &c.finish_reason).collect::<Vec<_>>()),
                    );
                    line.insert("correct".into(), json!(correct));
                    line.insert(
                        "pass_rate".into(),
                        json!(n_ok as f64 / correct.len() as f64),
                    );
                }
                _ => {
                    line.insert(
                        "generations".into(),
                        json!(comps.iter().map(|c| &c.text).collect::<Vec<_>>()),
                    );
                    line.insert(
                        "finish_reasons".into(),
                        json!(comps.iter().map(|c| &c.finish_reason).collect::<Vec<_>>()),
                    );
                    if cfg.filter_answer_column.is_some() {
                        line.insert("correct".into(), Value::Null);
                        line.insert("pass_rate".into(), Value::Null);
                    }
                }
            }
            line.insert("usage".into(), usage);
            out.append(&Value::Object(line))?;
            report.rows_written += 1;
        }
        producer.abort();
        progress.finish();
        drawer.abort();
        if let Some(e) = failure {
            return Err(e.context(format!(
                "generate stopped; {} rows written to {} are kept",
                report.rows_written,
                cfg.output.display()
            )));
        }
        Ok::<_, RunError>(pool.model.clone())
    })?;
    report.seconds = started.elapsed().as_secs_f64();
    if judged_total > 0 {
        report.pass_rate = Some(correct_total as f64 / judged_total as f64);
    }
    let card = dataset_card(cfg, &model, &report);
    std::fs::write(cfg.card_path(), card)
        .with_context(|| format!("writing {}", cfg.card_path().display()))?;
    eprintln!(
        "generate: {} rows written ({} already done), {} generations, {} tokens in {} ({:.0} tok/s)",
        report.rows_written,
        report.rows_already_done,
        report.generations,
        report.completion_tokens,
        format_secs(report.seconds),
        report.completion_tokens as f64 / report.seconds.max(1e-9)
    );
    Ok(report)
}

fn dataset_card(cfg: &GenerateConfig, model: &str, r: &GenerateReport) -> String {
    let pass = r
        .pass_rate
        .map_or("not filtered".to_string(), |p| format!("{:.4}", p));
    format!(
        "---\ntags:\n- synthetic\n- reasoning\n---\n\n# {out}\n\nGenerated with `trainer generate` from `{src}` by `{model}`.\n\n\
         ## Counts\n\n| rows in input | rows written this run | rows already done | duplicate ids skipped | generations this run | pass rate |\n\
         | --- | --- | --- | --- | --- | --- |\n| {} | {} | {} | {} | {} | {pass} |\n\n\
         ## Settings\n\n| num_generations | temperature | top_p | max_tokens | max_concurrent | endpoints | system_prompt |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n| {} | {} | {} | {} | {} | {} | {:?} |\n\n\
         ## Throughput\n\n{} completion tokens in {:.1} s: {:.1} tokens/s.\n",
        r.rows_in_input,
        r.rows_written,
        r.rows_already_done,
        r.duplicate_ids_skipped,
        r.generations,
        cfg.num_generations,
        cfg.temperature,
        cfg.top_p,
        cfg.max_tokens,
        cfg.max_concurrent,
        cfg.endpoints.len(),
        cfg.system_prompt.as_deref().unwrap_or(""),
        r.completion_tokens,
        r.seconds,
        r.completion_tokens as f64 / r.seconds.max(1e-9),
        out = cfg.output.display(),
        src = cfg.dataset_path,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_column_or_the_prompt_hash() {
        let row: Map<String, Value> =
            serde_json::from_value(json!({"prompt": "2+2?", "uid": 7})).unwrap();
        let mut cfg = GenerateConfig::default();
        let h = row_id(&row, &cfg).unwrap();
        assert_eq!(h.len(), 16);
        assert_eq!(h, row_id(&row, &cfg).unwrap());
        cfg.id_column = Some("uid".into());
        assert_eq!(row_id(&row, &cfg).unwrap(), "7");
        cfg.id_column = Some("missing".into());
        assert!(row_id(&row, &cfg).is_err());
    }
}
