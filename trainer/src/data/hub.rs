//! `dataset_name` (a Hub id, or a local dataset repository) to the data files of one
//! config and split, as `datasets.load_dataset(name, config, split=...)` finds them,
//! offline.
//!
//! The repository is the cached snapshot ([`model::hub`]) or the local directory. Its
//! files are chosen by:
//!
//! 1. the dataset card's YAML front matter (`README.md`), `configs:` — each entry has a
//!    `config_name`, `data_files` (a pattern, a list of them, or a list of `{split,
//!    path}`) and possibly `default: true`. Without a `dataset_config`, the `default`
//!    entry is used, else the one named `default`, else the only one;
//! 2. else the usual file layout (`datasets`' default patterns): data files under the
//!    repository whose name starts with the split (`train.jsonl`,
//!    `data/train-00000-of-00002.parquet`, `train-*.parquet`) or that sit in a folder named
//!    after it (`train/*.parquet`), under `<config>/` when a config is given and such a
//!    folder exists.
//!
//! Errors name the repository and what it offers (configs, splits).
use std::path::{Path, PathBuf};

use model::hub::{HubCache, RepoType};
use serde_json::Value;

use super::DataError;

const DATA_EXTENSIONS: &[&str] = &["parquet", "jsonl", "json"];

/// Why the card or the layout offers no files for the wanted config and split; the
/// message (carried by `DataError::Hub`) names what the repository offers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum FilesError {
    #[error("the card has no config {wanted:?}; it has: {names:?} (dataset_config)")]
    NoSuchConfig { wanted: String, names: Vec<String> },
    #[error("the card has several configs and none is the default; pick one with dataset_config: {names:?}")]
    NoDefaultConfig { names: Vec<String> },
    #[error("config {name:?} has only the train split, not {split:?}")]
    OnlyTrain { name: String, split: String },
    #[error("config {name:?} has no split {split:?}; it has: {splits:?} (dataset_train_split)")]
    NoSplit {
        name: String,
        split: String,
        splits: Vec<String>,
    },
    #[error("config {name:?} has no split {split:?}; it has: {splits:?}")]
    NoSplitKey {
        name: String,
        split: String,
        splits: Vec<String>,
    },
    #[error("config {name:?} of the card lists no data_files")]
    NoDataFiles { name: String },
    #[error(
        "no data files of split {split:?}{} in {} (found: {found})",
        config.as_ref().map(|c| format!(", config {c:?}")).unwrap_or_default(),
        root.display()
    )]
    NoLayoutFiles {
        split: String,
        config: Option<String>,
        root: PathBuf,
        found: String,
    },
}

/// The data files of `config` / `split` of dataset `name`, in name order.
pub fn dataset_files(
    cache: &HubCache,
    name: &str,
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>, DataError> {
    let root = cache
        .resolve(name, RepoType::Dataset, None)
        .map_err(|e| DataError::Hub {
            name: name.into(),
            message: e.to_string(),
        })?;
    let fail = |message: String| DataError::Hub {
        name: name.into(),
        message,
    };
    let all = walk(&root).map_err(|source| DataError::Io {
        path: root.clone(),
        source,
    })?;
    let rel: Vec<String> = all
        .iter()
        .filter_map(|p| p.strip_prefix(&root).ok())
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    let files = match card_configs(&root)? {
        Some(configs) if !configs.is_empty() => {
            let entry = pick_config(&configs, config).map_err(|e| fail(e.to_string()))?;
            let patterns = split_patterns(entry, split).map_err(|e| fail(e.to_string()))?;
            let mut out: Vec<PathBuf> = rel
                .iter()
                .filter(|r| patterns.iter().any(|p| glob_match(p, r)))
                .map(|r| root.join(r))
                .collect();
            out.sort();
            if out.is_empty() {
                return Err(fail(format!(
                    "the card's data_files for split {split:?} ({patterns:?}) match no file in {}",
                    root.display()
                )));
            }
            out
        }
        _ => layout_files(&root, &rel, config, split).map_err(|e| fail(e.to_string()))?,
    };
    Ok(files)
}

/// Every file under `dir` (following links, as snapshots link into `blobs/`), skipping
/// hidden entries.
fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The `configs:` list of the card's front matter, if the card has one.
fn card_configs(root: &Path) -> Result<Option<Vec<Value>>, DataError> {
    let card = root.join("README.md");
    let Ok(text) = std::fs::read_to_string(&card) else {
        return Ok(None);
    };
    let Some(rest) = text.strip_prefix("---") else {
        return Ok(None);
    };
    let Some(end) = rest.find("\n---") else {
        return Ok(None);
    };
    let yaml = &rest[..end];
    let parsed = config::Config::builder()
        .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
        .build()
        .and_then(|c| c.try_deserialize::<serde_json::Map<String, Value>>())
        .map_err(|e| DataError::Hub {
            name: root.display().to_string(),
            message: format!("{}: unreadable YAML front matter: {e}", card.display()),
        })?;
    Ok(match parsed.get("configs") {
        Some(Value::Array(a)) => Some(a.clone()),
        _ => None,
    })
}

fn config_name(v: &Value) -> &str {
    v.get("config_name")
        .and_then(Value::as_str)
        .unwrap_or("default")
}

fn pick_config<'a>(configs: &'a [Value], wanted: Option<&str>) -> Result<&'a Value, FilesError> {
    let names: Vec<String> = configs.iter().map(|c| config_name(c).to_string()).collect();
    let found = match wanted {
        Some(w) => configs.iter().find(|c| config_name(c) == w),
        None => configs
            .iter()
            .find(|c| c.get("default").and_then(Value::as_bool) == Some(true))
            .or_else(|| configs.iter().find(|c| config_name(c) == "default"))
            .or_else(|| (configs.len() == 1).then(|| &configs[0])),
    };
    found.ok_or_else(|| match wanted {
        Some(w) => FilesError::NoSuchConfig {
            wanted: w.to_string(),
            names,
        },
        None => FilesError::NoDefaultConfig { names },
    })
}

/// The file patterns of `split` in one card config.
fn split_patterns(entry: &Value, split: &str) -> Result<Vec<String>, FilesError> {
    let strings = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    let name = config_name(entry);
    match entry.get("data_files") {
        // One pattern or a list of patterns: all of it is the `train` split.
        Some(v @ (Value::String(_) | Value::Array(_))) if !matches!(v, Value::Array(a) if a.iter().any(Value::is_object)) => {
            if split == "train" {
                Ok(strings(v))
            } else {
                Err(FilesError::OnlyTrain {
                    name: name.to_string(),
                    split: split.to_string(),
                })
            }
        }
        Some(Value::Array(items)) => {
            let splits: Vec<String> = items
                .iter()
                .filter_map(|i| i.get("split").and_then(Value::as_str))
                .map(str::to_string)
                .collect();
            items
                .iter()
                .find(|i| i.get("split").and_then(Value::as_str) == Some(split))
                .and_then(|i| i.get("path"))
                .map(strings)
                .ok_or_else(|| FilesError::NoSplit {
                    name: name.to_string(),
                    split: split.to_string(),
                    splits,
                })
        }
        Some(Value::Object(m)) => m
            .get(split)
            .map(strings)
            .ok_or_else(|| FilesError::NoSplitKey {
                name: name.to_string(),
                split: split.to_string(),
                splits: m.keys().cloned().collect(),
            }),
        _ => Err(FilesError::NoDataFiles {
            name: name.to_string(),
        }),
    }
}

/// The usual layout: see the module docs.
fn layout_files(
    root: &Path,
    rel: &[String],
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>, FilesError> {
    let data: Vec<&String> = rel
        .iter()
        .filter(|r| {
            let ext = r.rsplit('.').next().unwrap_or("");
            DATA_EXTENSIONS.contains(&ext)
        })
        .collect();
    let scoped: Vec<&String> = match config {
        Some(c) if data.iter().any(|r| r.starts_with(&format!("{c}/"))) => data
            .iter()
            .copied()
            .filter(|r| r.starts_with(&format!("{c}/")))
            .collect(),
        _ => data.clone(),
    };
    let matches_split = |r: &str, s: &str| {
        let mut parts: Vec<&str> = r.split('/').collect();
        let file = parts.pop().unwrap_or("");
        parts.contains(&s)
            || [format!("{s}-"), format!("{s}."), format!("{s}_")]
                .iter()
                .any(|p| file.starts_with(p.as_str()))
            || file.contains(&format!("-{s}-"))
    };
    let mut out: Vec<PathBuf> = scoped
        .iter()
        .filter(|r| matches_split(r, split))
        .map(|r| root.join(r))
        .collect();
    // A repository of data files with no split in their names is all `train`.
    if out.is_empty() && split == "train" {
        let known = ["test", "validation", "valid", "dev", "eval"];
        let plain: Vec<&&String> = scoped
            .iter()
            .filter(|r| !known.iter().any(|k| matches_split(r, k)))
            .collect();
        out = plain.iter().map(|r| root.join(r)).collect();
    }
    out.sort();
    if out.is_empty() {
        return Err(FilesError::NoLayoutFiles {
            split: split.to_string(),
            config: config.map(str::to_string),
            root: root.to_path_buf(),
            found: if data.is_empty() {
                "no .parquet, .jsonl or .json file".to_string()
            } else {
                data.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    }
    Ok(out)
}

/// Glob match of a `/`-separated relative path: `*` and `?` within a component, `**`
/// across components (the patterns of `data_files`).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn parts(s: &str) -> Vec<&str> {
        s.trim_start_matches("./")
            .split('/')
            .filter(|p| !p.is_empty())
            .collect()
    }
    fn comp(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => comp(&p[1..], s) || (!s.is_empty() && comp(p, &s[1..])),
            (Some(b'?'), Some(_)) => comp(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => comp(&p[1..], &s[1..]),
            _ => false,
        }
    }
    fn walk(p: &[&str], s: &[&str]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(&"**"), _) => walk(&p[1..], s) || (!s.is_empty() && walk(p, &s[1..])),
            (Some(a), Some(b)) => comp(a.as_bytes(), b.as_bytes()) && walk(&p[1..], &s[1..]),
            _ => false,
        }
    }
    walk(&parts(pattern), &parts(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_data_files() {
        assert!(glob_match(
            "data/train-*",
            "data/train-00000-of-00002.parquet"
        ));
        assert!(!glob_match(
            "data/train-*",
            "data/test-00000-of-00001.parquet"
        ));
        assert!(glob_match("**/*.parquet", "a/b/c.parquet"));
        assert!(glob_match(
            "all/train-?????-of-*.parquet",
            "all/train-00001-of-00003.parquet"
        ));
        assert!(!glob_match("train.jsonl", "x/train.jsonl"));
    }
}
