//! Offline jobs against OpenAI-compatible servers (rollout workers, vLLM): `trainer eval`
//! ([`eval`]: MATH-500-style accuracy with pass@k) and `trainer generate` ([`generate`]:
//! synthetic reasoning data), both on one streaming [`client`] that keeps at most
//! `max_concurrent` requests in flight and starts the next as soon as one finishes.

pub mod client;
pub mod eval;
pub mod generate;
pub mod jsonl;
pub mod progress;

use std::path::{Path, PathBuf};

use crate::error::{Context, Result, RunError};
use serde_json::{Map, Value};

use crate::data::{read_rows, DataFormat};

/// Where a dataset named in a config is. A local file or directory is used as it is; other
/// names (a Hugging Face hub id in the local cache) are resolved by [`hub_cache_lookup`], the
/// hook the Hub-cache resolution plugs into.
pub fn resolve_dataset_path(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if let Some(found) = hub_cache_lookup(spec) {
        return Ok(found);
    }
    Err(RunError::DatasetNotFound { spec: spec.into() })
}

/// A dataset id (`HuggingFaceH4/MATH-500`) in the local Hugging Face cache: the snapshot
/// directory under `$HF_HUB_CACHE` (or `$HF_HOME/hub`, default `~/.cache/huggingface/hub`),
/// `datasets--{org}--{name}/snapshots/{revision}` (the one `refs/main` names, else any).
pub fn hub_cache_lookup(spec: &str) -> Option<PathBuf> {
    let (org, name) = spec.split_once('/')?;
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HF_HOME")
                .map(|h| PathBuf::from(h).join("hub"))
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
                })
        })?;
    let repo = hub.join(format!("datasets--{org}--{name}"));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
}

/// The dataset's rows (a snapshot directory is searched for its data files), the first
/// `limit` of them; an unparseable row is an error naming it.
pub fn load_rows(
    path: &Path,
    format: DataFormat,
    limit: Option<usize>,
) -> Result<Vec<Map<String, Value>>> {
    let target = if path.is_dir() {
        data_dir(path)
    } else {
        path.to_path_buf()
    };
    let rows =
        read_rows(&target, format).with_context(|| format!("reading {}", target.display()))?;
    let n = limit.unwrap_or(rows.len()).min(rows.len());
    rows.into_iter()
        .take(n)
        .enumerate()
        .map(|(i, r)| {
            r.map_err(|e| RunError::FileRow {
                path: target.clone(),
                row: i,
                message: e.to_string(),
            })
        })
        .collect()
}

/// In a Hub snapshot the data files sit in a subdirectory (`data/`, or one per split with
/// `test` preferred); a plain directory of shards is used as it is.
fn data_dir(dir: &Path) -> PathBuf {
    let has_shards = |d: &Path| {
        std::fs::read_dir(d).ok().is_some_and(|it| {
            it.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.ends_with(".jsonl") || n.ends_with(".parquet") || n.ends_with(".json")
            })
        })
    };
    if has_shards(dir) {
        return dir.to_path_buf();
    }
    for sub in ["test", "data", "train"] {
        let d = dir.join(sub);
        if has_shards(&d) {
            return d;
        }
    }
    dir.to_path_buf()
}
