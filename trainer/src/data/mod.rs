//! Training data: dataset rows from JSONL or Parquet, turned into token ids for GRPO
//! prompts and SFT examples, and a seeded epoch sampler over them.
//!
//! Data flow: [`read_rows`] reads a file or a directory of shards into one JSON object per
//! row ([`reader`]); [`load_prompts`] ([`prompts`]) and [`load_sft`] ([`sft`]) check each
//! row against the TRL dataset formats (standard string columns or conversational
//! `{role, content}` message lists), render it with the tokenizer's chat template and
//! tokenize it. A row that cannot be used (a missing or wrong-typed column, an empty
//! prompt, a template error, too many tokens) is never dropped or truncated silently: it is
//! counted by reason in a [`LoadReport`], and the load fails when the unusable fraction
//! exceeds [`DatasetConfig::max_unusable_fraction`]. [`Sampler`] ([`sampler`]) then deals
//! out example indices, one seeded permutation per epoch, resumable from a checkpoint.

pub mod hub;
pub mod prompts;
pub mod reader;
pub mod sampler;
pub mod sft;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use prompts::{load_prompts, PromptExample};
pub use reader::{read_rows, MalformedRow};
pub use sampler::{Sampler, SamplerState};
pub use sft::{load_sft, load_sft_with, SftExample, SftLoss};

/// How dataset files are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// By extension: `.jsonl` and `.json` are JSON lines (a `.json` file holding one JSON
    /// array of rows is accepted too), `.parquet` is Parquet.
    #[default]
    Auto,
    /// One JSON object per line, as `Dataset.to_json` writes.
    Jsonl,
    /// Apache Parquet, as `Dataset.to_parquet` and the Hub's parquet exports write.
    Parquet,
}

/// Where a dataset is and how its rows become examples. Column names follow TRL's dataset
/// formats; `prompt_column` is Open-R1's `dataset_prompt_column`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// A file, or a directory of `*.parquet` / `*.jsonl` / `*.json` shards read in name
    /// order (not recursive; hidden files are ignored). Unset when `name` is given.
    pub path: PathBuf,
    /// A Hugging Face dataset id (`open-r1/OpenR1-Math-220k`) resolved in the local Hub
    /// cache, or a local dataset repository; TRL's `dataset_name` ([`hub`]).
    pub name: Option<String>,
    /// The dataset config of `name` (TRL's `dataset_config`); unset: the default one.
    pub config: Option<String>,
    /// The split of `name` (TRL's `dataset_train_split`).
    pub split: String,
    pub format: DataFormat,
    /// The prompt: a string (standard) or a list of `{role, content}` messages
    /// (conversational).
    pub prompt_column: String,
    /// SFT only: the completion, a string or a list of messages.
    pub completion_column: String,
    /// SFT only, used when a row has no prompt: a whole conversation whose final assistant
    /// turn is the completion.
    pub messages_column: String,
    /// Prepended as a `system` message (or, without a chat template, as text followed by a
    /// blank line) unless the conversation already has a system message.
    pub system_prompt: Option<String>,
    /// Render prompts with the tokenizer's chat template when it has one. Without a
    /// template, string prompts are used as plain text and conversational rows are unusable.
    pub use_chat_template: bool,
    /// The largest tolerated fraction of unusable rows, in [0, 1]. The default 0 fails the
    /// load on any unusable row; e.g. 0.05 tolerates (and reports) up to 5%.
    pub max_unusable_fraction: f64,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            name: None,
            config: None,
            split: "train".into(),
            format: DataFormat::Auto,
            prompt_column: "prompt".into(),
            completion_column: "completion".into(),
            messages_column: "messages".into(),
            system_prompt: None,
            use_chat_template: true,
            max_unusable_fraction: 0.0,
        }
    }
}

impl DatasetConfig {
    /// Checks the fields that do not depend on the data: a path is set, column names are
    /// non-empty and `max_unusable_fraction` is in [0, 1].
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |field: &str, message: String| DataError::Config {
            field: field.into(),
            message,
        };
        match (self.path.as_os_str().is_empty(), &self.name) {
            (true, None) => {
                return Err(bad(
                    "path",
                    "no dataset is set: give path (a file or directory) or name (a Hub id, TRL's dataset_name)"
                        .into(),
                ))
            }
            (false, Some(_)) => {
                return Err(bad(
                    "name",
                    "give either path or name (dataset_name), not both".into(),
                ))
            }
            (_, Some(n)) if n.is_empty() => {
                return Err(bad("name", "must not be empty".into()))
            }
            _ => {}
        }
        if self.split.is_empty() {
            return Err(bad("split", "must name a split, e.g. train".into()));
        }
        for (field, column) in [
            ("prompt_column", &self.prompt_column),
            ("completion_column", &self.completion_column),
            ("messages_column", &self.messages_column),
        ] {
            if column.is_empty() {
                return Err(bad(field, "must name a column, got an empty string".into()));
            }
        }
        let f = self.max_unusable_fraction;
        if !(0.0..=1.0).contains(&f) {
            return Err(bad(
                "max_unusable_fraction",
                format!("must be in [0, 1], got {f}"),
            ));
        }
        Ok(())
    }

    /// What the dataset is called in messages: its path, or its name.
    pub fn label(&self) -> PathBuf {
        match &self.name {
            Some(n) => PathBuf::from(format!(
                "{n} ({}{})",
                self.config
                    .as_deref()
                    .map(|c| format!("{c}, "))
                    .unwrap_or_default(),
                self.split
            )),
            None => self.path.clone(),
        }
    }
}

/// Why a dataset could not be read or loaded. Each variant names the file, and where it
/// applies the row and column.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset config: field {field:?}: {message}")]
    Config { field: String, message: String },
    #[error("dataset {name:?}: {message}")]
    Hub { name: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot tell the format from the extension (expected .jsonl, .json or .parquet); set format = \"jsonl\" or \"parquet\"")]
    UnknownFormat { path: PathBuf },
    #[error("{dir}: directory holds no {wanted} files (found: {found})")]
    NoShards {
        dir: PathBuf,
        wanted: &'static str,
        found: String,
    },
    #[error("{path}{}: not a readable Parquet file: {message}", at_row(.row))]
    Parquet {
        path: PathBuf,
        /// The row being decoded when the file turned out corrupt, if any.
        row: Option<usize>,
        message: String,
    },
    #[error("{path}: malformed JSON array of rows: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: the dataset has no rows")]
    Empty { path: PathBuf },
    #[error("{path}: {unusable} of {total} rows unusable, above max_unusable_fraction {max_fraction}: {summary}")]
    TooManyUnusable {
        path: PathBuf,
        unusable: usize,
        total: usize,
        max_fraction: f64,
        summary: String,
    },
    #[error("{dir}: the tokenizer has no eos_token, which plain-text completions (row {row}, column {column:?}) must end with")]
    NoEosToken {
        dir: PathBuf,
        row: usize,
        column: String,
    },
    #[error("{argument} must be at least 1, got 0")]
    ZeroLength { argument: &'static str },
    #[error("sampler state does not match this dataset: {field} is {found} in the checkpoint but {expected} here")]
    SamplerMismatch {
        field: &'static str,
        expected: String,
        found: String,
    },
}

fn at_row(row: &Option<usize>) -> String {
    row.map(|r| format!(" (row {r})")).unwrap_or_default()
}

/// How many first unusable rows a [`LoadReport`] quotes.
const MAX_SAMPLES: usize = 5;

/// What a load made of a dataset: how many rows were usable, and why the others were not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub total_rows: usize,
    pub usable_rows: usize,
    /// Reason kind (`missing_column`, `prompt_too_long`, ...) -> number of rows.
    pub unusable: BTreeMap<String, usize>,
    /// The first few unusable rows, e.g. `row 17: prompt has 300 tokens > max_prompt_length 256`.
    pub samples: Vec<String>,
}

impl LoadReport {
    /// Rows counted under any reason: `total_rows - usable_rows`.
    pub fn unusable_rows(&self) -> usize {
        self.unusable.values().sum()
    }

    /// One line: totals, the count per reason and the sample rows.
    pub fn summary(&self) -> String {
        let unusable = self.unusable_rows();
        let mut s = format!(
            "{} rows: {} usable, {} unusable",
            self.total_rows, self.usable_rows, unusable
        );
        if unusable > 0 {
            let percent = 100.0 * unusable as f64 / self.total_rows.max(1) as f64;
            let reasons: Vec<String> = self
                .unusable
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            let _ = write!(s, " ({percent:.2}%): {}", reasons.join(", "));
            if !self.samples.is_empty() {
                let _ = write!(s, "; first: {}", self.samples.join("; "));
            }
        }
        s
    }

    fn record(&mut self, location: &str, why: Unusable) {
        *self.unusable.entry(why.kind.to_string()).or_default() += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(format!("{location}: {}", why.message));
        }
    }
}

/// Why one row cannot be used: a reason kind (the [`LoadReport::unusable`] key) and a
/// message naming the column.
#[derive(Debug, Clone)]
pub(crate) struct Unusable {
    pub kind: &'static str,
    pub message: String,
}

impl Unusable {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// A row failing for a reason that is not the row's fault (the tokenizer lacks an EOS
/// token): the whole load stops.
pub(crate) enum RowError {
    Unusable(Unusable),
    Fatal(DataError),
}

impl From<Unusable> for RowError {
    fn from(u: Unusable) -> Self {
        RowError::Unusable(u)
    }
}

/// Reads every shard of `cfg.path`, turns each row into an example with `convert(row
/// index, row)`, counts the unusable ones and enforces `max_unusable_fraction`.
pub(crate) fn load_with<T>(
    cfg: &DatasetConfig,
    mut convert: impl FnMut(usize, &Map<String, Value>) -> Result<T, RowError>,
) -> Result<(Vec<T>, LoadReport), DataError> {
    cfg.validate()?;
    let shards = match &cfg.name {
        Some(name) => {
            let cache = model::hub::HubCache::from_env();
            let files = hub::dataset_files(&cache, name, cfg.config.as_deref(), &cfg.split)?;
            reader::read_files(files, cfg.format)?
        }
        None => reader::read_shards(&cfg.path, cfg.format)?,
    };
    let many = shards.len() > 1;
    let mut report = LoadReport::default();
    let mut examples = Vec::new();
    for shard in &shards {
        for (local, row) in shard.rows.iter().enumerate() {
            let index = report.total_rows;
            report.total_rows += 1;
            let outcome = match row {
                Ok(map) => convert(index, map),
                Err(reason) => Err(Unusable::new("malformed_row", reason.to_string()).into()),
            };
            match outcome {
                Ok(example) => {
                    examples.push(example);
                    report.usable_rows += 1;
                }
                Err(RowError::Unusable(why)) => {
                    let location = if many {
                        format!("row {index} ({} row {local})", shard.path.display())
                    } else {
                        format!("row {index}")
                    };
                    report.record(&location, why);
                }
                Err(RowError::Fatal(e)) => return Err(e),
            }
        }
    }
    check_report(&cfg.label(), &report, cfg.max_unusable_fraction)?;
    if report.unusable_rows() > 0 {
        tracing::warn!(path = %cfg.label().display(), "dataset: {}", report.summary());
    }
    Ok((examples, report))
}

/// Fails an empty dataset, one without any usable row, and one whose unusable fraction
/// `unusable / total` exceeds `max_fraction`.
fn check_report(path: &Path, report: &LoadReport, max_fraction: f64) -> Result<(), DataError> {
    if report.total_rows == 0 {
        return Err(DataError::Empty { path: path.into() });
    }
    let unusable = report.unusable_rows();
    let fraction = unusable as f64 / report.total_rows as f64;
    if fraction > max_fraction || report.usable_rows == 0 {
        return Err(DataError::TooManyUnusable {
            path: path.into(),
            unusable,
            total: report.total_rows,
            max_fraction,
            summary: report.summary(),
        });
    }
    Ok(())
}

/// A prompt or completion cell: TRL's standard (string) or conversational (messages) form.
#[derive(Debug, Clone)]
pub(crate) enum Turns {
    Text(String),
    Messages(Vec<Value>),
}

/// The JSON type name of `v`, for messages ("a string", "a list", ...).
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The non-null value of `column`, or a `missing_column` reason.
pub(crate) fn required<'a>(
    row: &'a Map<String, Value>,
    column: &str,
) -> Result<&'a Value, Unusable> {
    match row.get(column) {
        Some(Value::Null) => Err(Unusable::new(
            "missing_column",
            format!("column {column:?} is null"),
        )),
        Some(v) => Ok(v),
        None => {
            let mut present: Vec<&str> = row.keys().map(String::as_str).collect();
            present.sort_unstable();
            Err(Unusable::new(
                "missing_column",
                format!("column {column:?} is missing (row has {present:?})"),
            ))
        }
    }
}

/// Parses a cell as a string or a list of messages: objects with a string `role` and a
/// `content` that is a string, a list of parts or null. The messages are passed to the
/// chat template unchanged, extra keys included, as transformers does.
pub(crate) fn parse_turns(value: &Value, column: &str) -> Result<Turns, Unusable> {
    let wrong = |message: String| Unusable::new("wrong_type", message);
    match value {
        Value::String(s) => Ok(Turns::Text(s.clone())),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let Value::Object(message) = item else {
                    return Err(wrong(format!(
                        "column {column:?}: message {i} must be an object with \"role\" and \"content\", got {}",
                        type_name(item)
                    )));
                };
                match message.get("role") {
                    Some(Value::String(_)) => {}
                    other => {
                        return Err(wrong(format!(
                            "column {column:?}: message {i} needs a string \"role\", got {}",
                            other.map_or("nothing", type_name)
                        )))
                    }
                }
                match message.get("content") {
                    Some(Value::String(_) | Value::Array(_) | Value::Null) => {}
                    other => {
                        return Err(wrong(format!(
                            "column {column:?}: message {i} needs \"content\" (a string or a list of parts), got {}",
                            other.map_or("nothing", type_name)
                        )))
                    }
                }
            }
            Ok(Turns::Messages(items.clone()))
        }
        other => Err(wrong(format!(
            "column {column:?} must be a string or a list of {{role, content}} messages, got {}",
            type_name(other)
        ))),
    }
}

/// The role of a message already checked by [`parse_turns`].
pub(crate) fn role(message: &Value) -> &str {
    message.get("role").and_then(Value::as_str).unwrap_or("")
}

/// `{"role": role, "content": content}`.
pub(crate) fn message(role: &str, content: &str) -> Value {
    serde_json::json!({ "role": role, "content": content })
}

/// Prepends `system_prompt` as a system message unless one is configured away or the
/// conversation already has a system message.
pub(crate) fn with_system_prompt(
    system_prompt: Option<&str>,
    mut messages: Vec<Value>,
) -> Vec<Value> {
    if let Some(system) = system_prompt {
        if !messages.iter().any(|m| role(m) == "system") {
            messages.insert(0, message("system", system));
        }
    }
    messages
}

/// Plain-text prompt without a chat template: `system + "\n\n" + prompt`, or the prompt
/// alone.
pub(crate) fn plain_prompt(system_prompt: Option<&str>, prompt: &str) -> String {
    match system_prompt {
        Some(system) => format!("{system}\n\n{prompt}"),
        None => prompt.to_string(),
    }
}

/// Whether rows are rendered with the chat template: asked for and available.
pub(crate) fn chat_template_active(cfg: &DatasetConfig, tok: &model::Tokenizer) -> bool {
    if cfg.use_chat_template && !tok.has_chat_template() {
        tracing::warn!(
            tokenizer = %tok.dir().display(),
            "use_chat_template is set but the tokenizer has no chat template: string prompts are used as plain text"
        );
    }
    cfg.use_chat_template && tok.has_chat_template()
}

/// The reason a conversational cell cannot be rendered without a template.
pub(crate) fn no_template(cfg: &DatasetConfig, column: &str) -> Unusable {
    let why = if cfg.use_chat_template {
        "the tokenizer has no chat template"
    } else {
        "use_chat_template is false"
    };
    Unusable::new(
        "no_chat_template",
        format!("column {column:?} holds messages but {why}"),
    )
}

/// Token ids as the `i64` the model takes.
pub(crate) fn to_i64(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&id| i64::from(id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let cfg: DatasetConfig = serde_json::from_str(r#"{"path": "d.jsonl"}"#).unwrap();
        assert_eq!(cfg.prompt_column, "prompt");
        assert_eq!(cfg.completion_column, "completion");
        assert_eq!(cfg.messages_column, "messages");
        assert!(cfg.use_chat_template);
        assert_eq!(cfg.max_unusable_fraction, 0.0);
        assert_eq!(cfg.format, DataFormat::Auto);
        let cfg: DatasetConfig =
            serde_json::from_str(r#"{"path": "d", "format": "parquet"}"#).unwrap();
        assert_eq!(cfg.format, DataFormat::Parquet);
        let err = serde_json::from_str::<DatasetConfig>(r#"{"path": "d", "prompt_col": "q"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("prompt_col"), "{err}");
    }

    #[test]
    fn validate_names_the_field() {
        let mut cfg = DatasetConfig {
            path: "d.jsonl".into(),
            ..Default::default()
        };
        cfg.validate().unwrap();
        cfg.max_unusable_fraction = 1.5;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("max_unusable_fraction"), "{err}");
        cfg.max_unusable_fraction = f64::NAN;
        assert!(cfg.validate().is_err());
        cfg.max_unusable_fraction = 0.1;
        cfg.prompt_column.clear();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("prompt_column"), "{err}");
    }

    #[test]
    fn report_counts_and_threshold() {
        let mut report = LoadReport {
            total_rows: 10,
            usable_rows: 8,
            ..Default::default()
        };
        for i in 0..2 {
            report.record(
                &format!("row {i}"),
                Unusable::new("prompt_too_long", format!("prompt has {} tokens", 300 + i)),
            );
        }
        assert_eq!(report.unusable_rows(), 2);
        let summary = report.summary();
        assert!(
            summary.starts_with("10 rows: 8 usable, 2 unusable (20.00%): prompt_too_long 2"),
            "{summary}"
        );
        assert!(
            summary.contains("row 1: prompt has 301 tokens"),
            "{summary}"
        );
        // 2/10 = 0.2: allowed at exactly 0.2, refused just below.
        check_report(Path::new("d"), &report, 0.2).unwrap();
        let err = check_report(Path::new("d"), &report, 0.19).unwrap_err();
        assert!(matches!(
            err,
            DataError::TooManyUnusable {
                unusable: 2,
                total: 10,
                ..
            }
        ));
        let empty = LoadReport::default();
        assert!(matches!(
            check_report(Path::new("d"), &empty, 1.0),
            Err(DataError::Empty { .. })
        ));
    }

    #[test]
    fn report_quotes_at_most_five_rows() {
        let mut report = LoadReport::default();
        for i in 0..9 {
            report.record(&format!("row {i}"), Unusable::new("empty_prompt", "x"));
        }
        assert_eq!(report.samples.len(), MAX_SAMPLES);
        assert_eq!(report.unusable["empty_prompt"], 9);
    }

    #[test]
    fn turns_are_checked() {
        let ok = serde_json::json!([{"role": "user", "content": "hi"}]);
        assert!(matches!(parse_turns(&ok, "prompt"), Ok(Turns::Messages(m)) if m.len() == 1));
        let bad = serde_json::json!([{"role": "user", "content": 3}]);
        let err = parse_turns(&bad, "prompt").unwrap_err();
        assert_eq!(err.kind, "wrong_type");
        assert!(err.message.contains("message 0"), "{}", err.message);
        let err = parse_turns(&serde_json::json!(5), "prompt").unwrap_err();
        assert!(err.message.contains("got a number"), "{}", err.message);
        let row = serde_json::json!({"a": 1, "p": null});
        let row = row.as_object().unwrap();
        assert_eq!(required(row, "p").unwrap_err().kind, "missing_column");
        assert!(required(row, "q")
            .unwrap_err()
            .message
            .contains("[\"a\", \"p\"]"));
    }

    #[test]
    fn system_prompt_is_prepended_once() {
        let msgs = vec![message("user", "q")];
        let out = with_system_prompt(Some("be brief"), msgs.clone());
        assert_eq!(out.len(), 2);
        assert_eq!(role(&out[0]), "system");
        let again = with_system_prompt(Some("other"), out.clone());
        assert_eq!(again, out);
        assert_eq!(with_system_prompt(None, msgs.clone()), msgs);
        assert_eq!(plain_prompt(Some("S"), "P"), "S\n\nP");
    }
}
