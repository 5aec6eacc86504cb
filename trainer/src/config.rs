//! Layered configuration of the trainer's commands: a file, then the environment, then
//! command-line overrides, merged with the `config` crate, carried over from TRL /
//! Open-R1 recipe keys ([`recipe`]) and deserialised into a typed struct whose defaults
//! fill what no layer sets.
//!
//! - File: TOML, YAML or JSON, chosen by extension (Open-R1's recipes are YAML). A
//!   top-level YAML key given twice takes its last value, as PyYAML does, with a warning.
//! - Environment: variables named `TRAINER__<FIELD>` (two underscores after `TRAINER`,
//!   so that no unrelated `TRAINER_...` variable is ever read), nested tables joined by
//!   `__` as well (`TRAINER__LEARNING_RATE=1e-5`, `TRAINER__ZERO__STAGE=3`,
//!   `TRAINER__ROLLOUT__WORKERS=http://a:50051,http://b:50051`). Values are parsed as
//!   numbers or booleans when they look like one; the list fields below split on commas.
//! - Flags: `--set key=value` (dotted keys for tables, values parsed as TOML, so
//!   `--set reward_funcs='["accuracy","format"]'` works), applied last.
//!
//! Unknown keys are errors at every level: the top level is checked here against the
//! keys of the config's serialised default (so a misspelt `lerning_rate` is named with
//! the closest known keys), nested tables by `deny_unknown_fields`.
pub mod intervals;
pub mod invalid;
mod more_keys;
pub mod recipe;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::{de::DeserializeOwned, Serialize};

pub use intervals::{Interval, IntervalStrategy, LogLevel, Steps};
pub use invalid::InvalidConfig;
pub use recipe::{Command, RecipeWarning};

/// Prefix of the environment variables read by [`load`], with its separator: a
/// variable is a setting only if it starts with `TRAINER__`.
pub const ENV_PREFIX: &str = "TRAINER__";

/// Keys whose environment values are comma-separated lists.
const LIST_KEYS: &[&str] = &["reward_funcs", "reward_weights", "rollout.workers", "stop"];

/// A configuration that could not be loaded; each variant names the source and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: config file {} does not exist", path.display())]
    MissingFile { path: PathBuf },
    #[error("configuration: config file {}: unknown extension {extension:?} (allowed: .toml, .yaml, .yml, .json)", path.display())]
    UnknownExtension { path: PathBuf, extension: String },
    #[error("configuration: --set {set:?}: {reason}")]
    BadSet { set: String, reason: String },
    #[error("configuration: unknown field `{}`{}; known fields: {}", keys.join("`, `"),
        suggestion.as_ref().map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default(),
        known.join(", "))]
    UnknownKeys {
        keys: Vec<String>,
        suggestion: Option<String>,
        known: Vec<String>,
    },
    #[error("configuration: `{key}`: {message}")]
    Recipe { key: String, message: String },
    #[error("configuration: `{key}` and `{other}` disagree: {message}")]
    Conflict {
        key: String,
        other: String,
        message: String,
    },
    /// Reading, merging or deserialising failed (the message names the key).
    #[error("configuration: {0}")]
    Source(#[from] config::ConfigError),
}

/// A configuration that can be loaded: which command it belongs to decides which
/// recipe keys apply.
pub trait Recipe: DeserializeOwned + Serialize + Default {
    const COMMAND: Command;
}

/// A loaded configuration and the recipe keys that were accepted but handled another
/// way (log each once: [`Loaded::log_warnings`]).
#[derive(Debug)]
pub struct Loaded<T> {
    pub config: T,
    pub warnings: Vec<RecipeWarning>,
}

impl<T> Loaded<T> {
    pub fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!("{w}");
        }
    }
}

/// Merges `file` (optional), the `TRAINER__*` environment and `sets` (`key=value`) into
/// `T`. `T` must have serde defaults for every field and serialise to a table.
pub fn load<T: Recipe>(file: Option<&Path>, sets: &[String]) -> Result<Loaded<T>, ConfigError> {
    load_with_env(file, sets, std::env::vars())
}

/// [`load`] with an explicit environment (tests pass their own).
pub fn load_with_env<T: Recipe>(
    file: Option<&Path>,
    sets: &[String],
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded<T>, ConfigError> {
    let mut builder = Config::builder();
    let mut duplicate_warnings = vec![];
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile { path: path.into() });
        }
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => FileFormat::Toml,
            Some("yaml" | "yml") => FileFormat::Yaml,
            Some("json") => FileFormat::Json,
            other => {
                return Err(ConfigError::UnknownExtension {
                    path: path.into(),
                    extension: other.unwrap_or("").into(),
                })
            }
        };
        let deduped = match format {
            FileFormat::Yaml => std::fs::read_to_string(path)
                .ok()
                .and_then(|text| last_of_repeated_keys(&text)),
            _ => None,
        };
        builder = match deduped {
            Some((text, repeated)) => {
                duplicate_warnings = repeated
                    .into_iter()
                    .map(|key| RecipeWarning {
                        key,
                        message: "given more than once in the file: the last value is used, \
                                  as TRL's YAML reader (PyYAML) does"
                            .into(),
                    })
                    .collect();
                builder.add_source(File::from_str(&text, FileFormat::Yaml))
            }
            None => builder.add_source(File::from(path).format(format)),
        };
    }
    let vars: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.len() > ENV_PREFIX.len())
        .collect();
    let mut environment = Environment::with_prefix("TRAINER")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .source(Some(vars));
    for key in LIST_KEYS {
        environment = environment.with_list_parse_key(key);
    }
    builder = builder.add_source(environment);
    for set in sets {
        let bad = |reason: &str| ConfigError::BadSet {
            set: set.clone(),
            reason: reason.into(),
        };
        let (key, value) = set
            .split_once('=')
            .ok_or_else(|| bad("expected key=value, e.g. --set learning_rate=1e-5"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(bad("empty key"));
        }
        builder = builder
            .set_override(key, parse_value(value))
            .map_err(|e| bad(&e.to_string()))?;
    }
    let merged = builder.build()?;
    let mut table = merged.try_deserialize::<serde_json::Map<String, serde_json::Value>>()?;
    let mut warnings = duplicate_warnings;
    warnings.extend(recipe::translate(&mut table, T::COMMAND)?);
    check_top_level_keys::<T>(&table)?;
    // Through the config crate again, so type errors name the key.
    let text = serde_json::Value::Object(table).to_string();
    let config = Config::builder()
        .add_source(File::from_str(&text, FileFormat::Json))
        .build()?
        .try_deserialize::<T>()?;
    Ok(Loaded { config, warnings })
}

/// A YAML file whose top-level keys repeat (open-r1's Codeforces recipe gives `do_eval`
/// twice), rewritten with only the last occurrence of each, as PyYAML reads it (the YAML
/// reader here refuses repeated keys); `None` when no key repeats. A top-level entry is
/// its unindented `key:` line and the lines up to the next one (comments, blank and
/// indented lines: nested values, lists, block scalars).
fn last_of_repeated_keys(text: &str) -> Option<(String, Vec<String>)> {
    let key_of = |line: &str| -> Option<String> {
        let first = line.chars().next()?;
        if !(first.is_ascii_alphabetic() || first == '_' || first == '"' || first == '\'') {
            return None;
        }
        let (key, _) = line.split_once(':')?;
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        (!key.is_empty() && !key.contains(' ')).then(|| key.to_string())
    };
    // (key, lines) per top-level entry; the preamble before the first key has none.
    let mut entries: Vec<(Option<String>, Vec<&str>)> = vec![(None, vec![])];
    for line in text.lines() {
        match key_of(line) {
            Some(k) => entries.push((Some(k), vec![line])),
            None => entries.last_mut().expect("one entry").1.push(line),
        }
    }
    let mut last = std::collections::HashMap::new();
    for (i, (k, _)) in entries.iter().enumerate() {
        if let Some(k) = k {
            last.insert(k.clone(), i);
        }
    }
    let mut repeated = BTreeSet::new();
    let mut out = String::with_capacity(text.len());
    for (i, (k, lines)) in entries.iter().enumerate() {
        if let Some(k) = k {
            if last[k] != i {
                repeated.insert(k.clone());
                continue;
            }
        }
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
    }
    (!repeated.is_empty()).then(|| (out, repeated.into_iter().collect()))
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
fn check_top_level_keys<T: Serialize + Default>(
    table: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ConfigError> {
    let known: BTreeSet<String> = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => return Ok(()),
    };
    let unknown: Vec<String> = table
        .keys()
        .filter(|k| !known.contains(*k))
        .cloned()
        .collect();
    if let Some(first) = unknown.first() {
        return Err(ConfigError::UnknownKeys {
            suggestion: closest(first, &known).map(str::to_string),
            keys: unknown,
            known: known.into_iter().collect(),
        });
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

    impl Recipe for Demo {
        const COMMAND: Command = Command::Grpo;
    }

    fn load_demo(
        file: Option<&Path>,
        sets: &[String],
        env: Vec<(String, String)>,
    ) -> Result<Demo, ConfigError> {
        load_with_env::<Demo>(file, sets, env).map(|l| l.config)
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
        let c: Demo = load_demo(Some(&path), &[], env(&[])).unwrap();
        assert_eq!(c.learning_rate, 0.001);
        assert_eq!(c.zero.stage, 1);
        assert_eq!(c.reward_funcs, vec!["format"]);

        let e = env(&[
            ("TRAINER__LEARNING_RATE", "0.01"),
            ("TRAINER__ZERO__STAGE", "2"),
            ("TRAINER__ROLLOUT__WORKERS", "http://a:1,http://b:2"),
            ("TRAINER__REWARD_FUNCS", "accuracy,format"),
            ("GRPO_PYTHON", "/usr/bin/python"),
            // Unrelated variables that merely start with TRAINER_ are never settings.
            ("TRAINER_ID", "7"),
            ("TRAINER_NAME", "alice"),
            ("TRAINER__", "x"),
        ]);
        let c: Demo = load_demo(Some(&path), &[], e.clone()).unwrap();
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
        let c: Demo = load_demo(Some(&path), &sets, e).unwrap();
        assert_eq!(c.learning_rate, 0.5);
        assert_eq!(c.zero.stage, 3);
        assert_eq!(c.name.as_deref(), Some("flag"));
        assert_eq!(c.reward_funcs, vec!["length"]);
    }

    #[test]
    fn defaults_fill_what_no_layer_sets() {
        let c: Demo = load_demo(None, &[], env(&[])).unwrap();
        assert_eq!(c, Demo::default());
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lerning_rate = 0.1\n").unwrap();
        let e = load_demo(Some(&path), &[], env(&[])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("unknown field `lerning_rate`"), "{msg}");
        assert!(msg.contains("did you mean `learning_rate`"), "{msg}");

        let e = load_demo(None, &["zero.stag=1".into()], env(&[])).unwrap_err();
        assert!(e.to_string().contains("stag"), "{e}");

        let e = load_demo(None, &["learning_rate=fast".into()], env(&[])).unwrap_err();
        assert!(e.to_string().contains("learning_rate"), "{e}");

        let e = load_demo(None, &["novalue".into()], env(&[])).unwrap_err();
        assert!(e.to_string().contains("key=value"), "{e}");

        let e = load_demo(Some(Path::new("/nonexistent/c.toml")), &[], env(&[])).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");

        let bad = dir.path().join("c.ini");
        std::fs::write(&bad, "").unwrap();
        let e = load_demo(Some(&bad), &[], env(&[])).unwrap_err();
        assert!(e.to_string().contains("allowed: .toml"), "{e}");
    }
}
