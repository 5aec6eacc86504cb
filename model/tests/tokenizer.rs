//! Tokenizer and chat-template tests against transformers.
//!
//! The reference is `fixtures/generated/chat_reference.json`, written by
//! `scripts/make_fixtures.py` with transformers' `apply_chat_template`, `__call__` and
//! `decode`. Literal expectations below (ids, decodes, `json.dumps` strings) were produced
//! with the same transformers/Python and are noted where they appear.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use model::chat_template::python_float_repr;
use model::tokenizer::{ChatMessage, ChatTemplateOptions};
use model::{Tokenizer, TokenizerError};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated");
    assert!(
        dir.join("chat_reference.json").is_file(),
        "missing test fixtures in {}: run scripts/test.sh to generate fixtures",
        dir.display()
    );
    dir
}

fn load(name: &str) -> Tokenizer {
    let dir = fixtures().join(name);
    Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

fn chat_reference() -> Value {
    let path = fixtures().join("chat_reference.json");
    let text = std::fs::read_to_string(&path).expect("read chat_reference.json");
    serde_json::from_str(&text).expect("parse chat_reference.json")
}

/// A scratch directory, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "model-tokenizer-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    /// A copy of the fixture tokenizer.json with the given tokenizer_config.json.
    fn with_config(name: &str, config: &Value) -> Self {
        let scratch = Self::new(name);
        std::fs::copy(
            fixtures().join("tokenizer/tokenizer.json"),
            scratch.0.join("tokenizer.json"),
        )
        .expect("copy tokenizer.json");
        scratch.write("tokenizer_config.json", &config.to_string());
        scratch
    }

    fn write(&self, file: &str, contents: &str) {
        std::fs::write(self.0.join(file), contents).expect("write scratch file");
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(add_generation_prompt: bool) -> ChatTemplateOptions {
    ChatTemplateOptions {
        add_generation_prompt,
        ..Default::default()
    }
}

#[test]
fn chat_reference_cases_render_encode_and_decode_like_transformers() {
    let reference = chat_reference();
    let cases = reference["cases"].as_array().expect("cases");
    assert!(
        cases.len() >= 13,
        "expected the full reference, got {} cases",
        cases.len()
    );
    let mut tokenizers: HashMap<String, Tokenizer> = HashMap::new();
    for (i, case) in cases.iter().enumerate() {
        let name = case["model"].as_str().expect("model");
        let tokenizer = tokenizers
            .entry(name.to_string())
            .or_insert_with(|| load(name));
        let messages = case["messages"].as_array().expect("messages");
        let opts = ChatTemplateOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().expect("agp"),
            tools: Some(case["tools"].clone()).filter(|t| !t.is_null()),
            ..Default::default()
        };
        let what = format!(
            "case {i} ({name}, add_generation_prompt={})",
            opts.add_generation_prompt
        );

        let text = tokenizer
            .apply_chat_template(messages, &opts)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{what}: rendered text"
        );

        let want_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tokenizer.encode(&text, false).unwrap(),
            want_ids,
            "{what}: ids"
        );
        assert_eq!(
            tokenizer.encode_chat(messages, &opts).unwrap(),
            want_ids,
            "{what}: encode_chat"
        );

        assert_eq!(
            tokenizer.decode(&want_ids, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{what}: decode"
        );
        assert_eq!(
            tokenizer.decode(&want_ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{what}: decode(skip_special_tokens=True)"
        );
    }
}

#[test]
fn typed_messages_render_like_json_messages() {
    let tokenizer = load("qwen2-tiny");
    let typed = [
        ChatMessage::system("You are a careful mathematician."),
        ChatMessage::user("  Compute 17 * 3.  "),
        ChatMessage::assistant("<think>\n17 * 3 = 51</think>\n\\boxed{51}"),
    ];
    let untyped: Vec<Value> = typed
        .iter()
        .map(|m| serde_json::to_value(m).unwrap())
        .collect();
    for agp in [false, true] {
        assert_eq!(
            tokenizer
                .apply_chat_template(&typed, &options(agp))
                .unwrap(),
            tokenizer
                .apply_chat_template(&untyped, &options(agp))
                .unwrap()
        );
    }
}

#[test]
fn raise_exception_carries_the_templates_message() {
    let reference = chat_reference();
    let errors = reference["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 2);
    for case in errors {
        let name = case["model"].as_str().unwrap();
        let want = case["message"].as_str().unwrap();
        let messages = case["messages"].as_array().unwrap();
        let err = load(name)
            .apply_chat_template(messages, &options(false))
            .expect_err("an unknown role must raise");
        match &err {
            TokenizerError::TemplateException { message, .. } => assert_eq!(message, want),
            other => panic!("{name}: expected TemplateException, got {other:?}"),
        }
        assert!(err.to_string().contains(want), "{name}: {err}");
    }
}

#[test]
fn special_tokens_and_vocabulary() {
    let qwen = load("qwen2-tiny");
    assert_eq!(qwen.bos_token(), None);
    assert_eq!(qwen.bos_token_id(), None);
    assert_eq!(qwen.eos_token(), Some("<|im_end|>"));
    assert_eq!(qwen.eos_token_id(), Some(2));
    assert_eq!(qwen.eos_token_ids(), &[2]);
    assert_eq!(qwen.pad_token(), Some("<|endoftext|>"));
    assert_eq!(qwen.pad_token_id(), Some(0));
    assert_eq!(qwen.unk_token(), None);

    let llama = load("llama-tiny");
    assert_eq!(llama.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(llama.bos_token_id(), Some(3));
    assert_eq!(llama.eos_token(), Some("<|eot_id|>"));
    assert_eq!(llama.eos_token_ids(), &[4]);

    // len(tokenizer) == 448 in transformers.
    assert_eq!(llama.vocab_size(), 448);
    assert_eq!(llama.token_to_id("<think>"), Some(7));
    assert_eq!(llama.id_to_token(8).as_deref(), Some("</think>"));
    assert_eq!(llama.id_to_token(447).as_deref(), Some("therefore"));
    assert_eq!(llama.id_to_token(479), None);
    assert!(llama.has_chat_template());
}

#[test]
fn encode_and_decode_match_transformers() {
    // Reference: PreTrainedTokenizerFast.from_pretrained("fixtures/generated/llama-tiny").
    let tok = load("llama-tiny");
    assert_eq!(
        tok.encode("über 数学 <think>x</think>", true).unwrap(),
        [316, 392, 229, 7, 96, 8]
    );
    assert_eq!(
        tok.encode("Hello <|eot_id|> world", true).unwrap(),
        [48, 355, 84, 87, 229, 4, 229, 95, 87, 90, 84, 76]
    );
    let cases: [(&[u32], &str, &str); 3] = [
        (
            &[3, 5, 100, 200, 300, 6, 4],
            "<|begin_of_text|><|start_header_id|>|\u{3}tep<|end_header_id|><|eot_id|>",
            "|\u{3}tep",
        ),
        (
            &[7, 100, 8, 0, 1, 2, 9],
            "<think>|</think><|endoftext|><|im_start|><|im_end|>!",
            "|!",
        ),
        // 479 and 478 are outside the vocabulary: skipped.
        (&[0, 479, 478, 447], "<|endoftext|>therefore", "therefore"),
    ];
    for (ids, with_special, without) in cases {
        assert_eq!(tok.decode(ids, false).unwrap(), with_special, "{ids:?}");
        assert_eq!(tok.decode(ids, true).unwrap(), without, "{ids:?}");
    }
}

/// Renders `{{ x | tojson(<args>) }}` with `x` passed as an extra template variable.
fn render_tojson(tokenizer_dir: &ScratchDir, args: &str, x: Value) -> String {
    tokenizer_dir.write(
        "chat_template.jinja",
        &format!("{{{{ x | tojson{args} }}}}"),
    );
    let tokenizer = Tokenizer::from_dir(&tokenizer_dir.0).expect("load scratch tokenizer");
    let mut opts = options(false);
    opts.extra.insert("x".into(), x);
    tokenizer
        .apply_chat_template(&[ChatMessage::user("hi")], &opts)
        .unwrap_or_else(|e| panic!("tojson{args}: {e}"))
}

#[test]
fn tojson_matches_python_json_dumps() {
    // Every expected string is Python's json.dumps(x, ensure_ascii=False, **args).
    let dir = ScratchDir::with_config("tojson", &json!({}));
    let x = json!({"b": [1, 2.0, 3.25, true, null], "a": "é\"\\\n\t\u{1}</script>&'"});
    let cases: [(&str, Value, &str); 11] = [
        (
            "",
            x.clone(),
            r#"{"b": [1, 2.0, 3.25, true, null], "a": "é\"\\\n\t\u0001</script>&'"}"#,
        ),
        (
            "(indent=2)",
            x.clone(),
            "{\n  \"b\": [\n    1,\n    2.0,\n    3.25,\n    true,\n    null\n  ],\n  \"a\": \"é\\\"\\\\\\n\\t\\u0001</script>&'\"\n}",
        ),
        (
            "(indent=4, sort_keys=true)",
            x.clone(),
            "{\n    \"a\": \"é\\\"\\\\\\n\\t\\u0001</script>&'\",\n    \"b\": [\n        1,\n        2.0,\n        3.25,\n        true,\n        null\n    ]\n}",
        ),
        (
            "(separators=(',', ':'))",
            x.clone(),
            r#"{"b":[1,2.0,3.25,true,null],"a":"é\"\\\n\t\u0001</script>&'"}"#,
        ),
        (
            "(ensure_ascii=true)",
            json!({"s": "é😀\u{7f}"}),
            r#"{"s": "\u00e9\ud83d\ude00\u007f"}"#,
        ),
        (
            "(indent=2)",
            json!({"a": [], "b": {}, "c": [[]]}),
            "{\n  \"a\": [],\n  \"b\": {},\n  \"c\": [\n    []\n  ]\n}",
        ),
        (
            "",
            json!([1e-7, 1e16, 100.0, -0.0, 12345678.9, 0.1, 12345678901234567890u64, -7]),
            "[1e-07, 1e+16, 100.0, -0.0, 12345678.9, 0.1, 12345678901234567890, -7]",
        ),
        ("(indent='\\t')", json!({"k": [1, "v"]}), "{\n\t\"k\": [\n\t\t1,\n\t\t\"v\"\n\t]\n}"),
        ("(indent=0)", json!({"k": [1, "v"]}), "{\n\"k\": [\n1,\n\"v\"\n]\n}"),
        // Positional arguments follow Python's order: ensure_ascii, indent, ...
        ("(false, 0)", json!({"k": [1, "v"]}), "{\n\"k\": [\n1,\n\"v\"\n]\n}"),
        ("", json!("x"), "\"x\""),
    ];
    for (args, x, want) in cases {
        assert_eq!(render_tojson(&dir, args, x), want, "tojson{args}");
    }
}

#[test]
fn python_float_repr_examples() {
    // repr() in Python 3.
    assert_eq!(python_float_repr(2.0), "2.0");
    assert_eq!(python_float_repr(1e-5), "1e-05");
    assert_eq!(python_float_repr(1e22), "1e+22");
    assert_eq!(python_float_repr(-123.456), "-123.456");
}

#[test]
fn templates_see_python_semantics() {
    let dir = ScratchDir::with_config(
        "pycompat",
        &json!({"bos_token": {"content": "<|begin_of_text|>", "lstrip": false}, "eos_token": "<|eot_id|>"}),
    );
    dir.write(
        "chat_template.jinja",
        "{% for m in messages %}\n  {%- generation -%}\n    [{{ m.role.upper() }}:{{ m.content.strip().split(',') | join('|') }}]\n  {%- endgeneration %}\n  {% if loop.last %}{% break %}{% endif %}\n{% endfor %}\n{{ bos_token }}/{{ eos_token }}/{{ pad_token }}/{{ tools }}/{{ flag }}/{{ n }}/{{ messages[0] }}\n{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ strftime_now('%Y') | length }}\n",
    );
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(tok.bos_token_id(), Some(3));
    let mut opts = options(false);
    opts.extra.insert("flag".into(), json!(true));
    opts.extra.insert("n".into(), json!(2.0));
    let out = tok
        .apply_chat_template(
            &[
                json!({"role": "user", "content": " a,b "}),
                json!({"role": "x", "content": "c"}),
            ],
            &opts,
        )
        .unwrap();
    // Python/Jinja2 prints the unset pad_token as nothing, None/True/2.0 in Python spelling
    // and a dict with Python's repr.
    assert_eq!(
        out,
        "[USER:a|b][X:c]<|begin_of_text|>/<|eot_id|>//None/True/2.0/{'role': 'user', 'content': ' a,b '}\nrole=user;content= a,b ;4"
    );
}

#[test]
fn template_list_and_file_priority() {
    let inline = "{{ 'inline' }}";
    let listed = json!({"chat_template": [
        {"name": "tool_use", "template": "{{ 'tools:' ~ (tools | length) }}"},
        {"name": "default", "template": "{{ 'default' }}"},
    ]});
    let dir = ScratchDir::with_config("list", &listed);
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    let msgs = [ChatMessage::user("hi")];
    assert_eq!(
        tok.apply_chat_template(&msgs, &options(false)).unwrap(),
        "default"
    );
    let with_tools = ChatTemplateOptions {
        tools: Some(json!([{"type": "function"}])),
        ..Default::default()
    };
    assert_eq!(
        tok.apply_chat_template(&msgs, &with_tools).unwrap(),
        "tools:1"
    );

    let no_default = ScratchDir::with_config(
        "nodefault",
        &json!({"chat_template": [{"name": "rag", "template": "x"}]}),
    );
    let err = Tokenizer::from_dir(&no_default.0)
        .unwrap()
        .apply_chat_template(&msgs, &options(false))
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::NoChatTemplate { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"rag\""), "{err}");

    // chat_template.jinja wins over the config entry, as in transformers.
    let both = ScratchDir::with_config("both", &json!({"chat_template": inline}));
    both.write("chat_template.jinja", "{{ 'file' }}");
    let tok = Tokenizer::from_dir(&both.0).unwrap();
    assert_eq!(
        tok.apply_chat_template(&msgs, &options(false)).unwrap(),
        "file"
    );
}

#[test]
fn bad_inputs_give_clear_errors() {
    let missing = fixtures().join("no-such-tokenizer");
    let err = Tokenizer::from_dir(&missing).unwrap_err();
    assert!(
        matches!(err, TokenizerError::NotADirectory { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no-such-tokenizer"), "{err}");

    let empty = ScratchDir::new("empty");
    let err = Tokenizer::from_dir(&empty.0).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingFile { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    let full = std::fs::read_to_string(fixtures().join("tokenizer/tokenizer.json")).unwrap();
    let truncated = ScratchDir::new("truncated");
    truncated.write("tokenizer.json", &full[..full.len() / 2]);
    let err = Tokenizer::from_dir(&truncated.0).unwrap_err();
    assert!(matches!(err, TokenizerError::Json { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.json") && msg.contains("malformed JSON"),
        "{msg}"
    );

    let garbage = ScratchDir::new("garbage");
    garbage.write("tokenizer.json", "\u{1}\u{2} this is not json");
    let err = Tokenizer::from_dir(&garbage.0).unwrap_err();
    assert!(matches!(err, TokenizerError::Json { .. }), "{err:?}");

    let wrong_shape = ScratchDir::new("wrongshape");
    wrong_shape.write("tokenizer.json", r#"{"hello": "world"}"#);
    let err = Tokenizer::from_dir(&wrong_shape.0).unwrap_err();
    assert!(
        matches!(err, TokenizerError::InvalidTokenizer { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    let bad_config = ScratchDir::with_config("badconfig", &json!({}));
    bad_config.write("tokenizer_config.json", "{\"eos_token\": ");
    let err = Tokenizer::from_dir(&bad_config.0).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    let bad_token = ScratchDir::with_config("badtoken", &json!({"eos_token": 7}));
    let err = Tokenizer::from_dir(&bad_token.0).unwrap_err();
    assert!(
        matches!(err, TokenizerError::Config { ref field, .. } if field == "eos_token"),
        "{err:?}"
    );
}

#[test]
fn missing_template_is_an_error_not_a_panic() {
    let dir = ScratchDir::with_config("notemplate", &json!({"eos_token": "<|im_end|>"}));
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    assert!(!tok.has_chat_template());
    let err = tok
        .apply_chat_template(&[ChatMessage::user("hi")], &options(true))
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::NoChatTemplate { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("no chat template") && msg.contains("notemplate"),
        "{msg}"
    );
    // Plain encoding still works.
    assert_eq!(
        tok.encode("hi", false).unwrap(),
        tok.encode("hi", true).unwrap()
    );
}

#[test]
fn template_syntax_and_render_errors_name_the_file_and_line() {
    let dir = ScratchDir::with_config("syntax", &json!({}));
    dir.write(
        "chat_template.jinja",
        "ok\n{% if messages %}\n{{ 1 + }}\n{% endif %}",
    );
    let err = Tokenizer::from_dir(&dir.0).unwrap_err();
    match &err {
        TokenizerError::TemplateSyntax { path, line, .. } => {
            assert!(path.ends_with("chat_template.jinja"));
            assert_eq!(*line, Some(3));
        }
        other => panic!("expected TemplateSyntax, got {other:?}"),
    }
    assert!(err.to_string().contains("line 3"), "{err}");

    let render = ScratchDir::with_config("render", &json!({}));
    render.write(
        "chat_template.jinja",
        "{{ messages[0].content.nope.deeper }}",
    );
    let err = Tokenizer::from_dir(&render.0)
        .unwrap()
        .apply_chat_template(&[ChatMessage::user("hi")], &options(false))
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::Render { line: Some(1), .. }),
        "{err:?}"
    );

    let tok = load("qwen2-tiny");
    let err = tok
        .apply_chat_template(&[json!("not an object")], &options(false))
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::InvalidInput { .. }),
        "{err:?}"
    );
    let bad_tools = ChatTemplateOptions {
        tools: Some(json!({"not": "a list"})),
        ..Default::default()
    };
    let err = tok
        .apply_chat_template(&[ChatMessage::user("hi")], &bad_tools)
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::InvalidInput { .. }),
        "{err:?}"
    );
}
