//! `output_dir/metrics.jsonl`: every step's metrics, for users without a Prometheus.
//!
//! Rank 0 appends one JSON object per logged step (and per evaluation):
//! `{"step": 12, "timestamp": 1764612345.2, "reward": 0.81, "rewards/accuracy/mean": ...}`
//! with the TRL names of the [`StepLog`]; non-finite values are written as `null`. A
//! resumed run appends to the same file, so a step can appear twice (redone after
//! resuming from an older checkpoint); [`read`] keeps the last value per step and
//! name. [`crate::plot`] draws the file.
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::metrics::{unix_now, StepLog};

/// The file name under `output_dir`.
pub const FILE_NAME: &str = "metrics.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum RunLogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a metrics record: {detail}")]
    Parse {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

/// `output_dir/metrics.jsonl`.
pub fn path(output_dir: &Path) -> PathBuf {
    output_dir.join(FILE_NAME)
}

/// Appends one record for `step` (creating `output_dir` and the file if needed).
pub fn append(output_dir: &Path, step: u64, log: &StepLog) -> Result<(), RunLogError> {
    let p = path(output_dir);
    let io = |source| RunLogError::Io {
        path: p.clone(),
        source,
    };
    std::fs::create_dir_all(output_dir).map_err(io)?;
    let mut obj = serde_json::Map::new();
    obj.insert("step".into(), step.into());
    obj.insert("timestamp".into(), unix_now().into());
    for (k, v) in log {
        let value = serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into);
        obj.insert(k.clone(), value);
    }
    let mut line = serde_json::Value::Object(obj).to_string();
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(io)?;
    // One write per record, so a crash leaves at most a torn last line.
    f.write_all(line.as_bytes()).map_err(io)
}

/// A logged step: its gauges and histograms on every rank, and (rank 0) a line of
/// `output_dir/metrics.jsonl`. A failed write is logged, not fatal: training goes on.
pub fn publish_step(
    metrics: &crate::metrics::Metrics,
    main: bool,
    output_dir: &Path,
    step: u64,
    log: &StepLog,
) {
    metrics.record_step(step, log);
    if main {
        if let Err(e) = append(output_dir, step, log) {
            tracing::warn!(error = %e, "could not append to metrics.jsonl");
        }
    }
}

/// An evaluation's results at `step`: gauges, and (rank 0) a metrics.jsonl line.
pub fn publish_eval(
    metrics: &crate::metrics::Metrics,
    main: bool,
    output_dir: &Path,
    step: u64,
    log: &StepLog,
) {
    metrics.record(log);
    if main {
        if let Err(e) = append(output_dir, step, log) {
            tracing::warn!(error = %e, "could not append to metrics.jsonl");
        }
    }
}

/// Metrics by step: name -> value (`None` where the run logged a non-finite value).
pub type Series = BTreeMap<u64, BTreeMap<String, Option<f64>>>;

/// Reads a metrics file; the last record of a step wins per name. A torn last line
/// (the run was killed mid-write) is skipped.
pub fn read(file: &Path) -> Result<Series, RunLogError> {
    let f = std::fs::File::open(file).map_err(|source| RunLogError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| RunLogError::Io {
            path: file.to_path_buf(),
            source,
        })?;
    let mut out = Series::new();
    let last = lines.len();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parse_err = |detail: String| RunLogError::Parse {
            path: file.to_path_buf(),
            line: i + 1,
            detail,
        };
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == last => break,
            Err(e) => return Err(parse_err(e.to_string())),
        };
        let obj = value
            .as_object()
            .ok_or_else(|| parse_err("not a JSON object".into()))?;
        let step = obj
            .get("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| parse_err("no integer \"step\"".into()))?;
        let entry = out.entry(step).or_default();
        for (k, v) in obj {
            if k == "step" || k == "timestamp" {
                continue;
            }
            match v {
                serde_json::Value::Null => {
                    entry.insert(k.clone(), None);
                }
                serde_json::Value::Number(n) => {
                    entry.insert(k.clone(), n.as_f64());
                }
                other => return Err(parse_err(format!("{k} is {other}, not a number"))),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_last_one_of_a_step_wins() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut log = StepLog::new();
        log.insert("reward".into(), 0.5);
        log.insert("loss".into(), f64::NAN);
        append(&out, 1, &log).unwrap();
        log.insert("reward".into(), 0.7);
        append(&out, 2, &log).unwrap();
        // Resumed from step 1: step 2 is redone.
        log.insert("reward".into(), 0.9);
        log.insert("loss".into(), 0.1);
        append(&out, 2, &log).unwrap();
        let text = std::fs::read_to_string(path(&out)).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(
            text.lines().next().unwrap().contains("\"loss\":null"),
            "{text}"
        );
        // A torn last line is ignored.
        std::fs::write(path(&out), format!("{text}{{\"step\": 3, \"rew")).unwrap();
        let s = read(&path(&out)).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[&1]["reward"], Some(0.5));
        assert_eq!(s[&1]["loss"], None);
        assert_eq!(s[&2]["reward"], Some(0.9));
        assert_eq!(s[&2]["loss"], Some(0.1));
        // A bad line elsewhere names its line.
        std::fs::write(path(&out), format!("nope\n{text}")).unwrap();
        let err = read(&path(&out)).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:1:"), "{err}");
    }
}
