//! GRPO prompts: each row's prompt column rendered and tokenized the way TRL's
//! `GRPOTrainer` (with Open-R1's `make_conversation`) prepares it for generation.
//!
//! With the chat template in use, a string prompt becomes `[system?, user]` messages and a
//! conversational prompt gets the system prompt prepended when it has none; the messages
//! are rendered with `add_generation_prompt=true` and tokenized without special tokens (the
//! template writes them). Without a template, the prompt is plain text
//! (`system + "\n\n" + prompt`) tokenized with special tokens (e.g. a BOS). A prompt over
//! `max_prompt_length` tokens is unusable, never truncated.

use serde_json::{Map, Value};

use model::{ChatTemplateOptions, Tokenizer};

use super::{
    chat_template_active, load_with, message, no_template, parse_turns, plain_prompt, required,
    to_i64, with_system_prompt, DataError, DatasetConfig, LoadReport, Turns, Unusable,
};

/// One usable prompt row.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptExample {
    /// Index of the row in the dataset (shards concatenated in name order), from 0.
    pub row: usize,
    /// The prompt as the model sees it (the chat template's output, or the plain text).
    pub prompt_text: String,
    /// `prompt_text` tokenized: `1 <= len <= max_prompt_length`.
    pub prompt_ids: Vec<i64>,
    /// Every column of the row except the prompt (answers, solutions, ... for the reward
    /// functions).
    pub fields: Map<String, Value>,
}

/// Loads every row of `cfg.path` as a GRPO prompt of at most `max_prompt_length` tokens.
/// Returns the usable prompts in row order and the report; fails when the unusable fraction
/// exceeds `cfg.max_unusable_fraction`, or on unreadable files.
pub fn load_prompts(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    max_prompt_length: usize,
) -> Result<(Vec<PromptExample>, LoadReport), DataError> {
    if max_prompt_length == 0 {
        return Err(DataError::ZeroLength {
            argument: "max_prompt_length",
        });
    }
    let templated = chat_template_active(cfg, tok);
    load_with(cfg, |row, columns| {
        let (prompt_text, ids) = render_prompt(cfg, tok, templated, columns)?;
        if ids.len() > max_prompt_length {
            return Err(Unusable::new(
                "prompt_too_long",
                format!(
                    "prompt has {} tokens > max_prompt_length {max_prompt_length}",
                    ids.len()
                ),
            )
            .into());
        }
        let mut fields = columns.clone();
        fields.remove(&cfg.prompt_column);
        Ok(PromptExample {
            row,
            prompt_text,
            prompt_ids: to_i64(&ids),
            fields,
        })
    })
}

/// The prompt text and its ids for one row.
fn render_prompt(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    templated: bool,
    columns: &Map<String, Value>,
) -> Result<(String, Vec<u32>), Unusable> {
    let column = &cfg.prompt_column;
    let system = cfg.system_prompt.as_deref();
    let turns = parse_turns(required(columns, column)?, column)?;
    let messages = match turns {
        Turns::Text(text) if text.trim().is_empty() => {
            return Err(empty_prompt(column));
        }
        Turns::Messages(m) if m.is_empty() => return Err(empty_prompt(column)),
        Turns::Text(text) if !templated => {
            let text = plain_prompt(system, &text);
            let ids = tok
                .encode(&text, true)
                .map_err(|e| Unusable::new("tokenize_error", e.to_string()))?;
            return Ok((text, ids));
        }
        Turns::Messages(_) if !templated => return Err(no_template(cfg, column)),
        Turns::Text(text) => with_system_prompt(system, vec![message("user", &text)]),
        Turns::Messages(m) => with_system_prompt(system, m),
    };
    let options = ChatTemplateOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let text = tok
        .apply_chat_template(&messages, &options)
        .map_err(|e| template_error(column, e))?;
    let ids = tok
        .encode(&text, false)
        .map_err(|e| Unusable::new("tokenize_error", e.to_string()))?;
    if ids.is_empty() {
        return Err(empty_prompt(column));
    }
    Ok((text, ids))
}

fn empty_prompt(column: &str) -> Unusable {
    Unusable::new("empty_prompt", format!("column {column:?} is empty"))
}

/// A chat template failure on this row's messages.
pub(crate) fn template_error(column: &str, e: model::TokenizerError) -> Unusable {
    Unusable::new(
        "template_error",
        format!("column {column:?}: chat template failed: {e}"),
    )
}
