//! Supervised examples: prompt and completion tokens with the boundary between them, as
//! TRL's `SFTTrainer` builds them for completion-only loss.
//!
//! A row is either prompt + completion columns (each a string or a message list), or, when
//! it has no prompt, a messages column whose final turn (an assistant message) is the
//! completion. With the chat template in use, strings become a user (prompt) or assistant
//! (completion) message, the system prompt is prepended when none is present, and
//! - prompt ids   = template(prompt messages, add_generation_prompt=true),
//! - input ids    = template(prompt + completion messages, add_generation_prompt=false),
//!
//! both tokenized without special tokens; the prompt ids must be a prefix of the input ids
//! (TRL only warns when they are not; here the row is unusable, since the loss mask would
//! be wrong). Without a template, `ids = encode(system + "\n\n" + prompt, special tokens) ++
//! encode(completion) ++ [eos]`. An example over `max_length` tokens is unusable, never
//! truncated.

use serde_json::{Map, Value};

use model::{ChatTemplateOptions, Tokenizer};

use super::prompts::template_error;
use super::{
    chat_template_active, load_with, message, no_template, parse_turns, plain_prompt, required,
    role, to_i64, with_system_prompt, DataError, DatasetConfig, LoadReport, RowError, Turns,
    Unusable,
};

/// One usable supervised example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    /// Index of the row in the dataset (shards concatenated in name order), from 0.
    pub row: usize,
    /// Prompt then completion: `len <= max_length`.
    pub input_ids: Vec<i64>,
    /// Tokens `[0, completion_start)` are prompt (no loss); `[completion_start, len)` are
    /// the completion, `0 < completion_start < len`.
    pub completion_start: usize,
}

/// Loads every row of `cfg.path` as an SFT example of at most `max_length` tokens.
/// Returns the usable examples in row order and the report; fails when the unusable
/// fraction exceeds `cfg.max_unusable_fraction`, on unreadable files, or when plain-text
/// completions need an EOS token the tokenizer does not have.
pub fn load_sft(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    max_length: usize,
) -> Result<(Vec<SftExample>, LoadReport), DataError> {
    if max_length == 0 {
        return Err(DataError::ZeroLength {
            argument: "max_length",
        });
    }
    let templated = chat_template_active(cfg, tok);
    load_with(cfg, |row, columns| {
        let (ids, completion_start) = build(cfg, tok, templated, row, columns)?;
        if ids.len() > max_length {
            return Err(Unusable::new(
                "too_long",
                format!(
                    "example has {} tokens ({completion_start} prompt + {} completion) > max_length {max_length}",
                    ids.len(),
                    ids.len() - completion_start
                ),
            )
            .into());
        }
        Ok(SftExample {
            row,
            input_ids: to_i64(&ids),
            completion_start,
        })
    })
}

/// The ids of one row and where its completion starts.
fn build(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    templated: bool,
    row: usize,
    columns: &Map<String, Value>,
) -> Result<(Vec<u32>, usize), RowError> {
    let system = cfg.system_prompt.as_deref();
    let has = |column: &str| columns.get(column).is_some_and(|v| !v.is_null());
    if !has(&cfg.prompt_column) && has(&cfg.messages_column) {
        return Ok(from_messages(cfg, tok, templated, columns)?);
    }
    let (prompt_col, completion_col) = (&cfg.prompt_column, &cfg.completion_column);
    let prompt = parse_turns(required(columns, prompt_col)?, prompt_col)?;
    let completion = parse_turns(required(columns, completion_col)?, completion_col)?;
    let empty = match &prompt {
        Turns::Text(t) => t.trim().is_empty(),
        Turns::Messages(m) => m.is_empty(),
    };
    if empty {
        return Err(
            Unusable::new("empty_prompt", format!("column {prompt_col:?} is empty")).into(),
        );
    }
    let empty = match &completion {
        Turns::Text(t) => t.is_empty(),
        Turns::Messages(m) => m.is_empty(),
    };
    if empty {
        return Err(Unusable::new(
            "empty_completion",
            format!("column {completion_col:?} is empty"),
        )
        .into());
    }
    if !templated {
        let (Turns::Text(prompt), Turns::Text(completion)) = (&prompt, &completion) else {
            let column = match prompt {
                Turns::Messages(_) => prompt_col,
                Turns::Text(_) => completion_col,
            };
            return Err(no_template(cfg, column).into());
        };
        return plain_text(cfg, tok, row, &plain_prompt(system, prompt), completion);
    }
    let prompt = match prompt {
        Turns::Text(t) => vec![message("user", &t)],
        Turns::Messages(m) => m,
    };
    let completion = match completion {
        Turns::Text(t) => vec![message("assistant", &t)],
        Turns::Messages(m) => m,
    };
    Ok(conversation(
        tok,
        with_system_prompt(system, prompt),
        completion,
        prompt_col,
    )?)
}

/// A messages row: everything before the final assistant turn is the prompt.
fn from_messages(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    templated: bool,
    columns: &Map<String, Value>,
) -> Result<(Vec<u32>, usize), Unusable> {
    let column = &cfg.messages_column;
    let Turns::Messages(mut messages) = parse_turns(required(columns, column)?, column)? else {
        return Err(Unusable::new(
            "wrong_type",
            format!("column {column:?} must be a list of {{role, content}} messages, got a string"),
        ));
    };
    if !templated {
        return Err(no_template(cfg, column));
    }
    match messages.last().map(role) {
        Some("assistant") => {}
        Some(other) => {
            return Err(Unusable::new(
                "no_assistant_turn",
                format!("column {column:?}: the last message is from {other:?}, not the assistant (the completion)"),
            ))
        }
        None => return Err(Unusable::new("empty_prompt", format!("column {column:?} is empty"))),
    }
    let completion = messages.split_off(messages.len() - 1);
    if messages.is_empty() && cfg.system_prompt.is_none() {
        return Err(Unusable::new(
            "empty_prompt",
            format!("column {column:?} has no message before the assistant turn"),
        ));
    }
    conversation(
        tok,
        with_system_prompt(cfg.system_prompt.as_deref(), messages),
        completion,
        column,
    )
}

/// Renders `prompt` (with the generation prompt) and `prompt + completion` (without), and
/// checks that the first is a token prefix of the second.
fn conversation(
    tok: &Tokenizer,
    prompt: Vec<Value>,
    completion: Vec<Value>,
    column: &str,
) -> Result<(Vec<u32>, usize), Unusable> {
    let prompt_ids = tok
        .encode_chat(
            &prompt,
            &ChatTemplateOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )
        .map_err(|e| template_error(column, e))?;
    let mut full = prompt;
    full.extend(completion);
    let ids = tok
        .encode_chat(&full, &ChatTemplateOptions::default())
        .map_err(|e| template_error(column, e))?;
    if !ids.starts_with(&prompt_ids) {
        let at = prompt_ids
            .iter()
            .zip(&ids)
            .position(|(a, b)| a != b)
            .unwrap_or(ids.len());
        let snippet = |ids: &[u32]| {
            let end = (at + 8).min(ids.len());
            tok.decode(&ids[at..end], false).unwrap_or_default()
        };
        return Err(Unusable::new(
            "template_mismatch",
            format!(
                "the chat template renders the prompt with its generation prompt as {:?}... but the full conversation as {:?}... from token {at}: the prompt is not a prefix, so the completion cannot be located (the template rewrites the final turn, e.g. strips <think>)",
                snippet(&prompt_ids),
                snippet(&ids)
            ),
        ));
    }
    if ids.len() == prompt_ids.len() {
        return Err(Unusable::new(
            "empty_completion",
            format!("column {column:?}: the completion renders to no tokens"),
        ));
    }
    Ok((ids, prompt_ids.len()))
}

/// Plain text: prompt with special tokens, then the completion and the EOS token.
fn plain_text(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    row: usize,
    prompt: &str,
    completion: &str,
) -> Result<(Vec<u32>, usize), RowError> {
    let eos = tok.eos_token_id().ok_or_else(|| {
        RowError::Fatal(DataError::NoEosToken {
            dir: tok.dir().into(),
            row,
            column: cfg.completion_column.clone(),
        })
    })?;
    let tokenize = |e: model::TokenizerError| Unusable::new("tokenize_error", e.to_string());
    let mut ids = tok.encode(prompt, true).map_err(tokenize)?;
    let start = ids.len();
    ids.extend(tok.encode(completion, false).map_err(tokenize)?);
    if ids.last() != Some(&eos) {
        ids.push(eos);
    }
    Ok((ids, start))
}
