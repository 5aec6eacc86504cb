//! Chat templates rendered exactly as transformers' `apply_chat_template` renders them.
//!
//! Data flow: the Jinja source (from `chat_template.jinja` or `tokenizer_config.json`) is
//! compiled once by [`ChatTemplate::compile`] into a minijinja environment configured like
//! transformers' `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`;
//! [`ChatTemplate::render`] then takes the context that [`crate::tokenizer::Tokenizer`]
//! assembles (messages, tools, special tokens, extra kwargs) and returns the prompt text.
//!
//! What makes the output byte-identical to Python:
//! - the `tojson` filter is [`python_json`], a re-implementation of
//!   `json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...)`
//!   (no HTML escaping, Python float repr, Python separators);
//! - `{{ value }}` prints `None`/`True`/`False`, Python float repr and Python list/dict repr;
//! - string/dict methods (`.strip()`, `.split()`, `.items()`, ...) come from
//!   `minijinja_contrib::pycompat`;
//! - `raise_exception(msg)` and `strftime_now(fmt)` are the globals transformers adds;
//! - `{% generation %}...{% endgeneration %}` is accepted and renders its body unchanged.
//!
//! Maps keep insertion order (serde_json and minijinja `preserve_order`), as Python dicts do.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};

use crate::pycompat::{format_value, python_str, strftime, tojson};
pub use crate::pycompat::{python_float_repr, python_json, JsonOptions};

/// Why a template could not be compiled or rendered; the tokenizer reports these as its
/// own `TemplateError`s (this module depends on nothing above it).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{}: chat template syntax error{}: {message}", path.display(), line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{}: chat template raised an exception: {message}", path.display())]
    Exception { path: PathBuf, message: String },
    #[error("{}: chat template failed to render{}: {message}", path.display(), line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Render {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
}

/// Name under which the single template lives in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    path: PathBuf,
}

impl ChatTemplate {
    /// Compiles `source`; `path` is the file it came from, named in errors.
    pub fn compile(source: &str, path: &Path) -> Result<Self, TemplateError> {
        let mut env = environment();
        let source = rewrite_generation_tags(source).into_owned();
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|err| TemplateError::Syntax {
                path: path.to_path_buf(),
                line: err.line(),
                message: error_message(&err),
            })?;
        Ok(Self {
            env,
            path: path.to_path_buf(),
        })
    }

    /// The file the template was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renders the template with `context` (a map of template variables).
    pub fn render(&self, context: Value) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|err| self.render_error(err))?;
        template
            .render(context)
            .map_err(|err| self.render_error(err))
    }

    fn render_error(&self, err: Error) -> TemplateError {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = cause {
            if let Some(raised) = e.downcast_ref::<RaisedException>() {
                return TemplateError::Exception {
                    path: self.path.clone(),
                    message: raised.0.clone(),
                };
            }
            cause = e.source();
        }
        TemplateError::Render {
            path: self.path.clone(),
            line: err.line(),
            message: error_message(&err),
        }
    }
}

/// The error's kind and detail, without minijinja's "(in name:line)" suffix, since the
/// caller reports the file and line itself.
fn error_message(err: &Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

/// The environment transformers builds in `_compile_jinja_template`.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(format_value);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` tags (which mark
/// assistant text for `return_assistant_tokens_mask`) with `{% with %}` / `{% endwith %}`.
///
/// Both are block tags whose body renders unchanged in its own scope, so whitespace control
/// (`-`, `+`, trim_blocks, lstrip_blocks) and `set` scoping behave as in Python.
fn rewrite_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, replacement)) => {
                out.push_str(&replacement);
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Parses `{%[-+]? (end)?generation [-+]?%}` at the start of `tag`; returns its length and
/// the equivalent `with` tag.
fn parse_generation_tag(tag: &str) -> Option<(usize, String)> {
    let bytes = tag.as_bytes();
    let mut i = 2;
    let open = match bytes.get(i) {
        Some(&c @ (b'-' | b'+')) => {
            i += 1;
            Some(c as char)
        }
        _ => None,
    };
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    let (keyword, replacement) = if tag[i..].starts_with("endgeneration") {
        ("endgeneration", "endwith")
    } else if tag[i..].starts_with("generation") {
        ("generation", "with")
    } else {
        return None;
    };
    i += keyword.len();
    let after_keyword = i;
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    if i == after_keyword && !matches!(bytes.get(i), Some(b'-' | b'+' | b'%')) {
        return None; // a longer identifier such as `generation_prompt`
    }
    let close = match bytes.get(i) {
        Some(&c @ (b'-' | b'+')) => {
            i += 1;
            Some(c as char)
        }
        _ => None,
    };
    if !tag[i..].starts_with("%}") {
        return None;
    }
    let mut out = String::from("{%");
    out.extend(open);
    out.push(' ');
    out.push_str(replacement);
    out.push(' ');
    out.extend(close);
    out.push_str("%}");
    Some((i + 2, out))
}

/// The error `raise_exception` raises, found again in the error chain by
/// [`ChatTemplate::render`] so the template's own message reaches the caller verbatim.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RaisedException(String);

/// `raise_exception(message)`: aborts rendering with `message` (jinja2's `TemplateError`).
fn raise_exception(message: Value) -> Result<Value, Error> {
    let message = match message.as_str() {
        Some(s) => s.to_string(),
        None => python_str(&message),
    };
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

/// `strftime_now(format)`: the current time formatted like Python's `datetime.strftime`.
///
/// Python uses local time; this uses UTC (the usual local time of training hosts).
fn strftime_now(format: String) -> Result<String, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(strftime(&format, now.as_secs() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_with_blocks() {
        let src = "a{% generation %}b{%- endgeneration -%}c{%+generation%}{% generation_x %}";
        assert_eq!(
            rewrite_generation_tags(src),
            "a{% with %}b{%- endwith -%}c{%+ with %}{% generation_x %}"
        );
        assert!(matches!(
            rewrite_generation_tags("{{ x }}"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn values_print_like_python_str() {
        let env = environment();
        let ctx = Value::from_serialize(serde_json::json!({
            "n": null, "t": true, "f": 1.0, "l": ["it's", 2, 2.5, false, null],
            "d": {"b": "x", "a": {"q": "\"'"}},
        }));
        let out = env
            .render_str("{{ n }}|{{ t }}|{{ f }}|{{ l }}|{{ d }}|{{ missing }}", ctx)
            .unwrap();
        assert_eq!(
            out,
            "None|True|1.0|[\"it's\", 2, 2.5, False, None]|{'b': 'x', 'a': {'q': '\"\\''}}|"
        );
    }
}
