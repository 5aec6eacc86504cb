//! Supervised examples: prompt and completion tokens with the boundary between them, as
//! TRL's `SFTTrainer` builds them for completion-only loss.
//!
//! A row is either prompt + completion columns (each a string or a message list), or, when
//! it has no prompt, a messages column (a conversation with at least one assistant turn).
//! With the chat template in use, strings become a user (prompt) or assistant
//! (completion) message, the system prompt is prepended when none is present, and
//! - prompt ids   = template(prompt messages, add_generation_prompt=true),
//! - input ids    = template(prompt + completion messages, add_generation_prompt=false),
//!
//! both tokenized without special tokens; the prompt ids must be a prefix of the input ids
//! (TRL only warns when they are not; here the row is unusable, since the loss mask would
//! be wrong). Without a template, `ids = encode(system + "\n\n" + prompt, special tokens) ++
//! encode(completion) ++ [eos]`. An example over `max_length` tokens is unusable, never
//! truncated.
//!
//! Which tokens count in the loss is TRL's [`SftLoss`] (`SFTConfig.completion_only_loss`,
//! `assistant_only_loss`), with TRL's defaults: the completion of a prompt/completion row,
//! every token of a messages row. `assistant_only_loss` keeps the tokens of every
//! assistant turn: TRL marks them with `{% generation %}` in the template; here they are
//! found by incremental rendering ([`assistant_spans`]), which needs no markers.

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
    /// The first token in the loss: tokens before it never count,
    /// `0 < completion_start < len`. For a prompt/completion row under TRL's default
    /// loss, where the completion starts.
    pub completion_start: usize,
    /// `loss_mask[t]`: token `t` is predicted in the loss (same length as `input_ids`;
    /// false at 0 and before `completion_start`, true at `completion_start`).
    pub loss_mask: Vec<bool>,
}

/// Which tokens of an example count in the loss: TRL's `SFTConfig` settings of the same
/// names, and TRL's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SftLoss {
    /// `completion_only_loss`: `None` (TRL's default) is the completion of a
    /// prompt/completion row and every token of a messages row; `Some(true)` the
    /// completion only (a messages row has none: unusable, as in TRL); `Some(false)`
    /// every token.
    pub completion_only: Option<bool>,
    /// `assistant_only_loss`: only the tokens of assistant turns (every turn of a
    /// conversation), intersected with the completion when that applies. Needs the chat
    /// template.
    pub assistant_only: bool,
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
    load_sft_with(cfg, tok, max_length, SftLoss::default())
}

/// [`load_sft`] with the loss tokens chosen by `loss`.
pub fn load_sft_with(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    max_length: usize,
    loss: SftLoss,
) -> Result<(Vec<SftExample>, LoadReport), DataError> {
    if max_length == 0 {
        return Err(DataError::ZeroLength {
            argument: "max_length",
        });
    }
    let templated = chat_template_active(cfg, tok);
    load_with(cfg, |row, columns| {
        let (ids, loss_mask) = build(cfg, tok, templated, loss, row, columns)?;
        let Some(completion_start) = loss_mask.iter().position(|&m| m) else {
            return Err(Unusable::new(
                "empty_completion",
                "no token of the example is in the loss (with these completion_only_loss / assistant_only_loss settings)",
            )
            .into());
        };
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
            loss_mask,
        })
    })
}

/// The ids of one row and which of them count in the loss.
fn build(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    templated: bool,
    loss: SftLoss,
    row: usize,
    columns: &Map<String, Value>,
) -> Result<(Vec<u32>, Vec<bool>), RowError> {
    let system = cfg.system_prompt.as_deref();
    let has = |column: &str| columns.get(column).is_some_and(|v| !v.is_null());
    if !has(&cfg.prompt_column) && has(&cfg.messages_column) {
        return Ok(from_messages(cfg, tok, templated, loss, columns)?);
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
        if loss.assistant_only {
            return Err(Unusable::new(
                "not_conversational",
                format!("assistant_only_loss needs the chat template, and column {prompt_col:?} is plain text without one"),
            )
            .into());
        }
        let (ids, start) = plain_text(cfg, tok, row, &plain_prompt(system, prompt), completion)?;
        let from = if loss.completion_only == Some(false) {
            1
        } else {
            start
        };
        let mask = mask_from(ids.len(), from);
        return Ok((ids, mask));
    }
    let prompt = match prompt {
        Turns::Text(t) => vec![message("user", &t)],
        Turns::Messages(m) => m,
    };
    let completion = match completion {
        Turns::Text(t) => vec![message("assistant", &t)],
        Turns::Messages(m) => m,
    };
    let prompt = with_system_prompt(system, prompt);
    let (ids, start) = conversation(tok, prompt.clone(), completion.clone(), prompt_col)?;
    let from = if loss.completion_only == Some(false) {
        1
    } else {
        start
    };
    let mut mask = mask_from(ids.len(), from);
    if loss.assistant_only {
        let mut all = prompt;
        all.extend(completion);
        let assistant = assistant_spans(tok, &all, &ids, prompt_col)?;
        for (m, a) in mask.iter_mut().zip(assistant) {
            *m &= a;
        }
    }
    Ok((ids, mask))
}

/// `len` flags, true from `from` on (never at 0: the first token is not predicted).
fn mask_from(len: usize, from: usize) -> Vec<bool> {
    (0..len).map(|t| t >= from.max(1)).collect()
}

/// A messages row (TRL's conversational language modeling): every token in the loss, or
/// under `assistant_only_loss` the tokens of every assistant turn.
fn from_messages(
    cfg: &DatasetConfig,
    tok: &Tokenizer,
    templated: bool,
    loss: SftLoss,
    columns: &Map<String, Value>,
) -> Result<(Vec<u32>, Vec<bool>), Unusable> {
    let column = &cfg.messages_column;
    let Turns::Messages(messages) = parse_turns(required(columns, column)?, column)? else {
        return Err(Unusable::new(
            "wrong_type",
            format!("column {column:?} must be a list of {{role, content}} messages, got a string"),
        ));
    };
    if !templated {
        return Err(no_template(cfg, column));
    }
    if messages.is_empty() {
        return Err(Unusable::new(
            "empty_prompt",
            format!("column {column:?} is empty"),
        ));
    }
    if !messages.iter().any(|m| role(m) == "assistant") {
        return Err(Unusable::new(
            "no_assistant_turn",
            format!("column {column:?} has no assistant message to learn from"),
        ));
    }
    if loss.completion_only == Some(true) {
        return Err(Unusable::new(
            "no_completion",
            format!("completion_only_loss: true needs prompt/completion rows; column {column:?} is a conversation (TRL refuses it too)"),
        ));
    }
    let messages = with_system_prompt(cfg.system_prompt.as_deref(), messages);
    let ids = tok
        .encode_chat(&messages, &ChatTemplateOptions::default())
        .map_err(|e| template_error(column, e))?;
    let mask = if loss.assistant_only {
        assistant_spans(tok, &messages, &ids, column)?
    } else {
        mask_from(ids.len(), 1)
    };
    Ok((ids, mask))
}

/// The tokens of every assistant turn of `messages` within `ids` (their full rendering),
/// by incremental rendering: turn `i` spans from the end of
/// `template(messages[..i], add_generation_prompt=true)` to the end of
/// `template(messages[..=i])`, i.e. what the turn adds after its generation prompt (its
/// content, the end-of-turn token and what the template writes after it). Each rendering
/// must be a token prefix of the next and of `ids`; a template that renders earlier
/// turns differently once more follow (e.g. one that strips reasoning from past turns)
/// is reported, naming the turn.
pub(crate) fn assistant_spans(
    tok: &Tokenizer,
    messages: &[Value],
    ids: &[u32],
    column: &str,
) -> Result<Vec<bool>, Unusable> {
    let mut mask = vec![false; ids.len()];
    let render = |upto: usize, add_generation_prompt: bool| {
        tok.encode_chat(
            &messages[..upto],
            &ChatTemplateOptions {
                add_generation_prompt,
                ..Default::default()
            },
        )
        .map_err(|e| template_error(column, e))
    };
    for (i, m) in messages.iter().enumerate() {
        if role(m) != "assistant" {
            continue;
        }
        let before = render(i, true)?;
        let upto = if i + 1 == messages.len() {
            ids.to_vec()
        } else {
            render(i + 1, false)?
        };
        for (what, a, b) in [
            ("the conversation up to it", &before, &upto),
            ("the whole conversation", &upto, &ids.to_vec()),
        ] {
            if !b.starts_with(a) {
                let at = a
                    .iter()
                    .zip(b.iter())
                    .position(|(x, y)| x != y)
                    .unwrap_or(b.len());
                return Err(Unusable::new(
                    "template_not_prefix_stable",
                    format!(
                        "column {column:?}: assistant_only_loss: the chat template is not prefix-stable at message {i}: rendering up to it differs from {what} from token {at} ({:?} vs {:?}); use a template that renders past turns unchanged (TRL's *_training.jinja templates, via chat_template)",
                        tok.decode(&a[at..(at + 8).min(a.len())], false).unwrap_or_default(),
                        tok.decode(&b[at..(at + 8).min(b.len())], false).unwrap_or_default(),
                    ),
                ));
            }
        }
        mask[before.len()..upto.len()].fill(true);
    }
    mask[0] = false;
    Ok(mask)
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
