//! Layered configuration of the trainer's commands: a file, then the environment, then
//! command-line overrides, merged with the `config` crate and deserialised into a typed
//! struct whose defaults fill what no layer sets.
//!
//! - File: TOML, YAML or JSON, chosen by extension (Open-R1's recipes are YAML).
//! - Environment: variables named `TRAINER_<FIELD>`, nested tables joined by `__`
//!   (`TRAINER_LEARNING_RATE=1e-5`, `TRAINER_ZERO__STAGE=3`,
//!   `TRAINER_ROLLOUT__WORKERS=http://a:50051,http://b:50051`). Values are parsed as
//!   numbers or booleans when they look like one; the list fields below split on commas.
//! - Flags: `--set key=value` (dotted keys for tables, values parsed as TOML, so
//!   `--set reward_funcs='["accuracy","format"]'` works), applied last.
//!
//! Unknown keys are errors at every level: the top level is checked here against the
//! keys of the config's serialised default (so a misspelt `lerning_rate` is named with
//! the closest known keys), nested tables by `deny_unknown_fields`.
use std::collections::BTreeSet;
use std::path::Path;

use config::{Config, Environment, File, FileFormat};
use serde::{de::DeserializeOwned, Serialize};

/// Prefix of the environment variables read by [`load`].
pub const ENV_PREFIX: &str = "TRAINER";

/// Keys whose environment values are comma-separated lists.
const LIST_KEYS: &[&str] = &["reward_funcs", "reward_weights", "rollout.workers", "stop"];

/// A configuration that could not be loaded: the message names the source and field.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// Merges `file` (optional), the `TRAINER_*` environment and `sets` (`key=value`) into
/// `T`. `T` must have serde defaults for every field and serialise to a table.
pub fn load<T>(file: Option<&Path>, sets: &[String]) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    load_with_env(file, sets, std::env::vars())
}

/// [`load`] with an explicit environment (tests pass their own).
pub fn load_with_env<T>(
    file: Option<&Path>,
    sets: &[String],
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let mut builder = Config::builder();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => FileFormat::Toml,
            Some("yaml" | "yml") => FileFormat::Yaml,
            Some("json") => FileFormat::Json,
            other => {
                return Err(ConfigError(format!(
                    "config file {}: unknown extension {:?} (allowed: .toml, .yaml, .yml, .json)",
                    path.display(),
                    other.unwrap_or("")
                )))
            }
        };
        builder = builder.add_source(File::from(path).format(format));
    }
    let vars: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")))
        .collect();
    let mut environment = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .source(Some(vars));
    for key in LIST_KEYS {
        environment = environment.with_list_parse_key(key);
    }
    builder = builder.add_source(environment);
    for set in sets {
        let (key, value) = set.split_once('=').ok_or_else(|| {
            ConfigError(format!(
                "--set {set:?}: expected key=value, e.g. --set learning_rate=1e-5"
            ))
        })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ConfigError(format!("--set {set:?}: empty key")));
        }
        builder = builder
            .set_override(key, parse_value(value))
            .map_err(|e| ConfigError(format!("--set {set:?}: {e}")))?;
    }
    let merged = builder.build().map_err(|e| ConfigError(e.to_string()))?;
    check_top_level_keys::<T>(&merged)?;
    merged
        .try_deserialize::<T>()
        .map_err(|e| ConfigError(e.to_string()))
}

/// A `--set` value: TOML when it parses as a TOML value (numbers, booleans, arrays,
/// quoted strings), else the raw string.
fn parse_value(raw: &str) -> config::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => match t.remove("v") {
            Some(v) => toml_to_config(v),
            None => config::Value::from(raw.to_string()),
        },
        Err(_) => config::Value::from(raw.to_string()),
    }
}

fn toml_to_config(v: toml::Value) -> config::Value {
    match v {
        toml::Value::String(s) => s.into(),
        toml::Value::Integer(i) => i.into(),
        toml::Value::Float(f) => f.into(),
        toml::Value::Boolean(b) => b.into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(a) => a.into_iter().map(toml_to_config).collect::<Vec<_>>().into(),
        toml::Value::Table(t) => t
            .into_iter()
            .map(|(k, v)| (k, toml_to_config(v)))
            .collect::<config::Map<String, config::Value>>()
            .into(),
    }
}

/// Refuses top-level keys that `T` does not have (nested tables deny their own).
fn check_top_level_keys<T: Serialize + Default>(merged: &Config) -> Result<(), ConfigError> {
    let known: BTreeSet<String> = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => return Ok(()),
    };
    let table = merged
        .clone()
        .try_deserialize::<config::Map<String, config::Value>>()
        .map_err(|e| ConfigError(e.to_string()))?;
    let unknown: Vec<&String> = table.keys().filter(|k| !known.contains(*k)).collect();
    if let Some(first) = unknown.first() {
        let near = closest(first, &known);
        return Err(ConfigError(format!(
            "unknown field `{}`{}; known fields: {}",
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("`, `"),
            near.map(|n| format!(" (did you mean `{n}`?)"))
                .unwrap_or_default(),
            known.iter().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// The known key with the smallest edit distance to `key`, if it is close.
fn closest<'a>(key: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        stage: u8,
        workers: Vec<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        learning_rate: f64,
        reward_funcs: Vec<String>,
        name: Option<String>,
        zero: Inner,
        rollout: Inner,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                learning_rate: 1e-6,
                reward_funcs: vec!["accuracy".into()],
                name: None,
                zero: Inner::default(),
                rollout: Inner::default(),
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "learning_rate: 0.001\nname: file\nzero:\n  stage: 1\nreward_funcs: [format]\n",
        )
        .unwrap();
        let c: Demo = load_with_env(Some(&path), &[], env(&[])).unwrap();
        assert_eq!(c.learning_rate, 0.001);
        assert_eq!(c.zero.stage, 1);
        assert_eq!(c.reward_funcs, vec!["format"]);

        let e = env(&[
            ("TRAINER_LEARNING_RATE", "0.01"),
            ("TRAINER_ZERO__STAGE", "2"),
            ("TRAINER_ROLLOUT__WORKERS", "http://a:1,http://b:2"),
            ("TRAINER_REWARD_FUNCS", "accuracy,format"),
            ("GRPO_PYTHON", "/usr/bin/python"),
        ]);
        let c: Demo = load_with_env(Some(&path), &[], e.clone()).unwrap();
        assert_eq!(c.learning_rate, 0.01);
        assert_eq!(c.zero.stage, 2);
        assert_eq!(c.rollout.workers, vec!["http://a:1", "http://b:2"]);
        assert_eq!(c.reward_funcs, vec!["accuracy", "format"]);

        let sets = vec![
            "learning_rate=0.5".to_string(),
            "zero.stage=3".to_string(),
            "name=flag".to_string(),
            r#"reward_funcs=["length"]"#.to_string(),
        ];
        let c: Demo = load_with_env(Some(&path), &sets, e).unwrap();
        assert_eq!(c.learning_rate, 0.5);
        assert_eq!(c.zero.stage, 3);
        assert_eq!(c.name.as_deref(), Some("flag"));
        assert_eq!(c.reward_funcs, vec!["length"]);
    }

    #[test]
    fn defaults_fill_what_no_layer_sets() {
        let c: Demo = load_with_env(None, &[], env(&[])).unwrap();
        assert_eq!(c, Demo::default());
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lerning_rate = 0.1\n").unwrap();
        let e = load_with_env::<Demo>(Some(&path), &[], env(&[])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("unknown field `lerning_rate`"), "{msg}");
        assert!(msg.contains("did you mean `learning_rate`"), "{msg}");

        let e = load_with_env::<Demo>(None, &["zero.stag=1".into()], env(&[])).unwrap_err();
        assert!(e.to_string().contains("stag"), "{e}");

        let e = load_with_env::<Demo>(None, &["learning_rate=fast".into()], env(&[])).unwrap_err();
        assert!(e.to_string().contains("learning_rate"), "{e}");

        let e = load_with_env::<Demo>(None, &["novalue".into()], env(&[])).unwrap_err();
        assert!(e.to_string().contains("key=value"), "{e}");

        let e = load_with_env::<Demo>(Some(Path::new("/nonexistent/c.toml")), &[], env(&[]))
            .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");

        let bad = dir.path().join("c.ini");
        std::fs::write(&bad, "").unwrap();
        let e = load_with_env::<Demo>(Some(&bad), &[], env(&[])).unwrap_err();
        assert!(e.to_string().contains("allowed: .toml"), "{e}");
    }
}
