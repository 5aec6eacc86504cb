//! A Hugging Face tokenizer directory: text to ids and back, and chat messages to a prompt,
//! matching transformers' `AutoTokenizer` (5.x, fast tokenizers backend).
//!
//! Data flow: [`Tokenizer::from_dir`] reads `tokenizer.json` (the `tokenizers` crate does
//! the BPE/normalization/decoding), `tokenizer_config.json` (special tokens, clean-up flag,
//! inline chat template), `chat_template.jinja` (which takes priority, as in transformers)
//! and `generation_config.json` (extra end-of-sequence ids). The chat template is compiled
//! once, here. [`Tokenizer::apply_chat_template`] builds the template context the way
//! `apply_chat_template(..., tokenize=False)` does; [`Tokenizer::encode_chat`] then encodes
//! the prompt with `add_special_tokens=false`, since the template already wrote them.

use std::path::{Path, PathBuf};

use minijinja::Value;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::chat_template::{ChatTemplate, TemplateError};

/// A chat message with plain string content, serialized as `{"role": ..., "content": ...}`.
///
/// For structured content (a list of parts), tool calls or extra fields, pass
/// `serde_json::Value` messages instead; the tokenizer accepts any `Serialize` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The keyword arguments of `apply_chat_template` beyond the messages.
#[derive(Debug, Clone, Default)]
pub struct ChatTemplateOptions {
    /// Append the header that starts the assistant's turn.
    pub add_generation_prompt: bool,
    /// Tool JSON schemas: a JSON array of objects, passed to the template as `tools`.
    pub tools: Option<serde_json::Value>,
    /// Extra template variables (`enable_thinking`, `date_string`, ...). They override the
    /// special-token variables of the same name, as in transformers.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Why loading a tokenizer or rendering a prompt failed; each variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{dir}: tokenizer directory does not exist or is not a directory")]
    NotADirectory { dir: PathBuf },
    #[error("{path}: file not found (a tokenizer directory needs tokenizer.json)")]
    MissingFile { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: not a valid tokenizers file: {source}")]
    InvalidTokenizer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field {field:?}: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{dir}: no chat template (neither chat_template.jinja nor a \"chat_template\" entry in tokenizer_config.json){}", named_hint(.available))]
    NoChatTemplate {
        dir: PathBuf,
        /// Names of the templates that exist when none is called "default".
        available: Vec<String>,
    },
    #[error("{path}: chat template syntax error{}: {message}", at_line(.line))]
    TemplateSyntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{path}: chat template raised an exception: {message}")]
    TemplateException { path: PathBuf, message: String },
    #[error("{path}: chat template failed to render{}: {message}", at_line(.line))]
    Render {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("invalid chat template input: {message}")]
    InvalidInput { message: String },
    #[error("{dir}: {operation} failed: {message}")]
    Tokenization {
        dir: PathBuf,
        operation: &'static str,
        message: String,
    },
}

impl From<TemplateError> for TokenizerError {
    fn from(e: TemplateError) -> Self {
        match e {
            TemplateError::Syntax {
                path,
                line,
                message,
            } => TokenizerError::TemplateSyntax {
                path,
                line,
                message,
            },
            TemplateError::Exception { path, message } => {
                TokenizerError::TemplateException { path, message }
            }
            TemplateError::Render {
                path,
                line,
                message,
            } => TokenizerError::Render {
                path,
                line,
                message,
            },
        }
    }
}

fn at_line(line: &Option<usize>) -> String {
    line.map(|l| format!(" at template line {l}"))
        .unwrap_or_default()
}

fn named_hint(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!("; named templates {available:?} exist but none is called \"default\"")
    }
}

/// A named special token (`bos_token`, ...) and its id, if the vocabulary has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    pub id: Option<u32>,
}

/// The special-token attributes transformers passes to chat templates (its
/// `SPECIAL_TOKENS_ATTRIBUTES`), in its order.
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A loaded tokenizer directory. Cheap to share: `Send + Sync`, all methods take `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    /// Indexed like [`SPECIAL_TOKEN_NAMES`].
    special: [Option<SpecialToken>; 7],
    eos_token_ids: Vec<u32>,
    clean_up_tokenization_spaces: bool,
    chat_template: Option<ChatTemplate>,
    /// The `tool_use` template, chosen over the default when tools are given.
    tool_use_template: Option<ChatTemplate>,
    /// Names of templates when a template list has no "default" (reported in errors).
    template_names: Vec<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("eos_token_ids", &self.eos_token_ids)
            .field(
                "chat_template",
                &self.chat_template.as_ref().map(|t| t.path()),
            )
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, plus `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(TokenizerError::NotADirectory { dir });
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = read_file(&tokenizer_path)?.ok_or_else(|| TokenizerError::MissingFile {
            path: tokenizer_path.clone(),
        })?;
        let inner: tokenizers::Tokenizer = serde_json::from_slice(&bytes).map_err(|source| {
            // The tokenizers deserializer reports some structural problems as JSON syntax
            // errors, so check the syntax separately (only on this error path).
            match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                Err(syntax) => TokenizerError::Json {
                    path: tokenizer_path.clone(),
                    source: syntax,
                },
                Ok(_) => TokenizerError::InvalidTokenizer {
                    path: tokenizer_path.clone(),
                    source,
                },
            }
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = match read_json(&config_path)? {
            None => Map::new(),
            Some(Json::Object(map)) => map,
            Some(_) => {
                return Err(config_error(
                    &config_path,
                    "",
                    "the file must hold a JSON object",
                ))
            }
        };

        let mut special: [Option<SpecialToken>; 7] = Default::default();
        for (slot, name) in special.iter_mut().zip(SPECIAL_TOKEN_NAMES) {
            *slot = special_token(&config, name, &config_path)?.map(|content| SpecialToken {
                id: inner.token_to_id(&content),
                content,
            });
        }
        let mut eos_token_ids: Vec<u32> = special[1].iter().filter_map(|t| t.id).collect();
        for id in generation_config_eos_ids(&dir.join("generation_config.json"))? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let clean_up_tokenization_spaces = match config.get("clean_up_tokenization_spaces") {
            None | Some(Json::Null) => false,
            Some(Json::Bool(b)) => *b,
            Some(_) => {
                return Err(config_error(
                    &config_path,
                    "clean_up_tokenization_spaces",
                    "must be true or false",
                ))
            }
        };

        let templates = load_templates(&dir, &config, &config_path)?;
        let mut tokenizer = Self {
            inner,
            dir,
            special,
            eos_token_ids,
            clean_up_tokenization_spaces,
            chat_template: None,
            tool_use_template: None,
            template_names: Vec::new(),
        };
        for (name, source, path) in templates {
            match name.as_deref() {
                None | Some("default") => {
                    tokenizer.chat_template = Some(ChatTemplate::compile(&source, &path)?)
                }
                Some("tool_use") => {
                    tokenizer.tool_use_template = Some(ChatTemplate::compile(&source, &path)?)
                }
                Some(other) => tokenizer.template_names.push(other.to_string()),
            }
        }
        if tokenizer.tool_use_template.is_some() {
            tokenizer.template_names.push("tool_use".into());
        }
        Ok(tokenizer)
    }

    /// The directory this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes `text`; `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| self.tokenization_error("encode", e))
    }

    /// Decodes `ids` as transformers' `decode(ids, skip_special_tokens=...)`. Ids outside the
    /// vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.tokenization_error("decode", e))?;
        // transformers skips the clean-up for BPE models: it would delete real spaces.
        let is_bpe = matches!(self.inner.get_model(), tokenizers::ModelWrapper::BPE(_));
        Ok(if self.clean_up_tokenization_spaces && !is_bpe {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    fn tokenization_error(
        &self,
        operation: &'static str,
        err: tokenizers::Error,
    ) -> TokenizerError {
        TokenizerError::Tokenization {
            dir: self.dir.clone(),
            operation,
            message: err.to_string(),
        }
    }

    /// Vocabulary size including added tokens (`len(tokenizer)` in transformers). The
    /// model's embedding matrix may be larger (padded).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token` (a vocabulary entry or added token), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id`, if it is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    fn special(&self, name: &str) -> Option<&SpecialToken> {
        let index = SPECIAL_TOKEN_NAMES.iter().position(|n| *n == name)?;
        self.special[index].as_ref()
    }

    /// The beginning-of-sequence token, if the tokenizer config names one.
    pub fn bos_token(&self) -> Option<&str> {
        self.special("bos_token").map(|t| t.content.as_str())
    }

    /// The id of [`Self::bos_token`].
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special("bos_token").and_then(|t| t.id)
    }

    /// The end-of-sequence token, if the tokenizer config names one.
    pub fn eos_token(&self) -> Option<&str> {
        self.special("eos_token").map(|t| t.content.as_str())
    }

    /// The id of [`Self::eos_token`].
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special("eos_token").and_then(|t| t.id)
    }

    /// Every id that ends a generation: the tokenizer's eos first, then the
    /// `eos_token_id` entries (int or list) of `generation_config.json`, deduplicated.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The padding token, if the tokenizer config names one.
    pub fn pad_token(&self) -> Option<&str> {
        self.special("pad_token").map(|t| t.content.as_str())
    }

    /// The id of [`Self::pad_token`].
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special("pad_token").and_then(|t| t.id)
    }

    /// The unknown token, if the tokenizer config names one.
    pub fn unk_token(&self) -> Option<&str> {
        self.special("unk_token").map(|t| t.content.as_str())
    }

    /// Replaces the chat template (Open-R1's `chat_template` recipe key: a Jinja source);
    /// `origin` names it in errors. The `tool_use` variant, if any, is dropped too, so the
    /// override renders every prompt.
    pub fn set_chat_template(&mut self, source: &str, origin: &Path) -> Result<(), TokenizerError> {
        self.chat_template = Some(ChatTemplate::compile(source, origin)?);
        self.tool_use_template = None;
        self.template_names.clear();
        Ok(())
    }

    /// Replaces the end-of-sequence token (TRL's `SFTConfig.eos_token`); it must be one
    /// token of the vocabulary. It becomes the first of [`Self::eos_token_ids`].
    pub fn set_eos_token(&mut self, token: &str) -> Result<(), TokenizerError> {
        let id = self
            .inner
            .token_to_id(token)
            .ok_or_else(|| TokenizerError::Config {
                path: self.dir.join("tokenizer.json"),
                field: "eos_token".into(),
                message: format!("{token:?} is not a token of the vocabulary"),
            })?;
        self.special[1] = Some(SpecialToken {
            content: token.to_string(),
            id: Some(id),
        });
        self.eos_token_ids.retain(|&e| e != id);
        self.eos_token_ids.insert(0, id);
        Ok(())
    }

    /// Whether a chat template was found (default or `tool_use`).
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some() || self.tool_use_template.is_some()
    }

    /// Renders `messages` with the chat template, like transformers'
    /// `apply_chat_template(messages, tools=..., add_generation_prompt=..., tokenize=False,
    /// **extra)`. Messages are anything serializing to a JSON object: [`ChatMessage`]
    /// or a `serde_json::Value` whose `content` may be a string or a list of parts.
    pub fn apply_chat_template<M: Serialize>(
        &self,
        messages: &[M],
        options: &ChatTemplateOptions,
    ) -> Result<String, TokenizerError> {
        let template = match (&options.tools, &self.tool_use_template) {
            (Some(_), Some(tool_use)) => tool_use,
            _ => self
                .chat_template
                .as_ref()
                .ok_or_else(|| TokenizerError::NoChatTemplate {
                    dir: self.dir.clone(),
                    available: self.template_names.clone(),
                })?,
        };
        Ok(template.render(self.template_context(messages, options)?)?)
    }

    /// [`Self::apply_chat_template`], then [`Self::encode`] with `add_special_tokens=false`
    /// (the template writes the special tokens itself), as transformers' `tokenize=True`.
    pub fn encode_chat<M: Serialize>(
        &self,
        messages: &[M],
        options: &ChatTemplateOptions,
    ) -> Result<Vec<u32>, TokenizerError> {
        let text = self.apply_chat_template(messages, options)?;
        self.encode(&text, false)
    }

    /// The variables transformers' `render_jinja_template` passes: the special tokens that
    /// are set (unset ones stay undefined, so they print as nothing), the extra kwargs over
    /// them, then `messages`, `tools`, `documents` (always none) and `add_generation_prompt`.
    fn template_context<M: Serialize>(
        &self,
        messages: &[M],
        options: &ChatTemplateOptions,
    ) -> Result<Value, TokenizerError> {
        let invalid = |message: String| TokenizerError::InvalidInput { message };
        let mut context: Map<String, Json> = Map::new();
        for (name, token) in SPECIAL_TOKEN_NAMES.iter().zip(&self.special) {
            if let Some(token) = token {
                context.insert((*name).into(), Json::String(token.content.clone()));
            }
        }
        for (key, value) in &options.extra {
            if matches!(
                key.as_str(),
                "messages" | "tools" | "documents" | "add_generation_prompt"
            ) {
                return Err(invalid(format!(
                    "extra template variable {key:?} is set by apply_chat_template itself"
                )));
            }
            context.insert(key.clone(), value.clone());
        }

        let mut chat = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let message =
                serde_json::to_value(message).map_err(|e| invalid(format!("message {i}: {e}")))?;
            match message {
                Json::Object(map) => chat.push(Json::Object(alias_reasoning_fields(map))),
                other => {
                    return Err(invalid(format!(
                        "message {i} must be a JSON object, got {other}"
                    )))
                }
            }
        }
        if let Some(tools) = &options.tools {
            let all_objects = tools
                .as_array()
                .is_some_and(|list| list.iter().all(Json::is_object));
            if !all_objects {
                return Err(invalid(
                    "tools must be a JSON array of tool schemas (objects)".into(),
                ));
            }
        }
        context.insert("messages".into(), Json::Array(chat));
        context.insert("tools".into(), options.tools.clone().unwrap_or(Json::Null));
        context.insert("documents".into(), Json::Null);
        context.insert(
            "add_generation_prompt".into(),
            Json::Bool(options.add_generation_prompt),
        );
        Ok(Value::from_serialize(&context))
    }
}

/// transformers' `_alias_reasoning_fields`: a message carrying reasoning under
/// `reasoning_content`, `thinking` or `reasoning` gets it under both `thinking` (first key,
/// unless the message already has one) and `reasoning_content`, since templates read either.
fn alias_reasoning_fields(message: Map<String, Json>) -> Map<String, Json> {
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|key| message.get(*key).filter(|v| !v.is_null()))
        .cloned();
    let Some(reasoning) = reasoning else {
        return message;
    };
    // {"thinking": reasoning, **message, "reasoning_content": reasoning}
    let mut out = Map::with_capacity(message.len() + 2);
    out.insert("thinking".into(), reasoning.clone());
    for (key, value) in message {
        out.insert(key, value);
    }
    out.insert("reasoning_content".into(), reasoning);
    out
}

/// transformers' `clean_up_tokenization`: removes the space before punctuation and
/// English contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

fn config_error(path: &Path, field: &str, message: &str) -> TokenizerError {
    TokenizerError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: message.to_string(),
    }
}

/// The file's bytes, or `None` when it does not exist.
fn read_file(path: &Path) -> Result<Option<Vec<u8>>, TokenizerError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The file parsed as JSON, or `None` when it does not exist.
fn read_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    let Some(bytes) = read_file(path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// A special token from the config: a string, null/absent, or (older files) an
/// `AddedToken` dict `{"content": "...", ...}`.
fn special_token(
    config: &Map<String, Json>,
    name: &str,
    path: &Path,
) -> Result<Option<String>, TokenizerError> {
    match config.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(map)) => match map.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(config_error(
                path,
                name,
                "token dict has no string \"content\"",
            )),
        },
        Some(_) => Err(config_error(
            path,
            name,
            "must be a string, null or {\"content\": \"...\"}",
        )),
    }
}

/// `eos_token_id` of `generation_config.json` (an int or a list of ints), if present.
fn generation_config_eos_ids(path: &Path) -> Result<Vec<u32>, TokenizerError> {
    let Some(config) = read_json(path)? else {
        return Ok(Vec::new());
    };
    let as_id = |v: &Json| v.as_u64().and_then(|id| u32::try_from(id).ok());
    let bad = || config_error(path, "eos_token_id", "must be a token id or a list of ids");
    match config.get("eos_token_id") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(ids)) => ids.iter().map(|v| as_id(v).ok_or_else(bad)).collect(),
        Some(v) => as_id(v).map(|id| vec![id]).ok_or_else(bad),
    }
}

/// The chat templates as (name, source, file): `chat_template.jinja` if it exists (it
/// takes priority, as in transformers), else the config's `chat_template`, a string or a
/// list of `{"name", "template"}`. A plain template has no name.
fn load_templates(
    dir: &Path,
    config: &Map<String, Json>,
    config_path: &Path,
) -> Result<Vec<(Option<String>, String, PathBuf)>, TokenizerError> {
    let jinja_path = dir.join("chat_template.jinja");
    if let Some(bytes) = read_file(&jinja_path)? {
        let source = String::from_utf8(bytes).map_err(|e| TokenizerError::Io {
            path: jinja_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        return Ok(vec![(None, source, jinja_path)]);
    }
    let bad_list = || {
        config_error(
            config_path,
            "chat_template",
            "must be a string or a list of {\"name\": ..., \"template\": ...}",
        )
    };
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::String(source)) => Ok(vec![(None, source.clone(), config_path.into())]),
        Some(Json::Array(entries)) => entries
            .iter()
            .map(|entry| {
                let name = entry
                    .get("name")
                    .and_then(Json::as_str)
                    .ok_or_else(bad_list)?;
                let source = entry
                    .get("template")
                    .and_then(Json::as_str)
                    .ok_or_else(bad_list)?;
                Ok((
                    Some(name.to_string()),
                    source.to_string(),
                    config_path.into(),
                ))
            })
            .collect(),
        Some(_) => Err(bad_list()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_fields_are_aliased_like_transformers() {
        let message = serde_json::json!({"role": "assistant", "content": "4", "reasoning": "2+2"});
        let Json::Object(map) = message else {
            unreachable!()
        };
        let out = alias_reasoning_fields(map);
        // {"thinking": r, **message, "reasoning_content": r}
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"thinking":"2+2","role":"assistant","content":"4","reasoning":"2+2","reasoning_content":"2+2"}"#
        );
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("I do n't know , he 's here . ok ?"),
            "I don't know, he's here. ok?"
        );
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }
}
