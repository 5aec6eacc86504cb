//! `trainer::data` against datasets written the way Hugging Face `datasets` exports them
//! (pyarrow Parquet with snappy/zstd/gzip and nested message columns, JSON lines), and
//! against the ids transformers' `apply_chat_template` gives for the same rows
//! (scripts/make_data_fixtures.py writes both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use trainer::data::{
    load_prompts, load_sft, load_sft_with, read_rows, DataError, DataFormat, DatasetConfig,
    Sampler, SftLoss,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer(name: &str) -> model::Tokenizer {
    model::Tokenizer::from_dir(root().join("fixtures/generated").join(name)).unwrap()
}

/// The fixture directory (written once per test binary) and its expected.json.
fn fixtures() -> &'static (tempfile::TempDir, Value) {
    static FIXTURES: OnceLock<(tempfile::TempDir, Value)> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let python = std::env::var("GRPO_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
        let python = root().join(python);
        let gen = root().join("fixtures/generated");
        assert!(
            gen.join(".stamp").exists(),
            "{} is missing: run scripts/test.sh",
            gen.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(&python)
            .arg(root().join("scripts/make_data_fixtures.py"))
            .arg(dir.path())
            .arg(gen.join("qwen2-tiny"))
            .arg(gen.join("llama-tiny"))
            .output()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", python.display()));
        assert!(
            out.status.success(),
            "make_data_fixtures.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected = std::fs::read_to_string(dir.path().join("expected.json")).unwrap();
        (dir, serde_json::from_str(&expected).unwrap())
    })
}

fn dir() -> &'static Path {
    fixtures().0.path()
}

fn expected(key: &str) -> &'static Vec<Value> {
    fixtures().1[key].as_array().unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn cfg(file: &str) -> DatasetConfig {
    DatasetConfig {
        path: dir().join(file),
        ..Default::default()
    }
}

fn system() -> String {
    fixtures().1["system"].as_str().unwrap().to_string()
}

#[test]
fn parquet_and_jsonl_rows_agree() {
    let jsonl = read_rows(&dir().join("prompts.jsonl"), DataFormat::Auto).unwrap();
    assert_eq!(jsonl.len(), 12);
    for file in [
        "prompts.parquet",
        "prompts.zstd.parquet",
        "prompts.gzip.parquet",
    ] {
        let rows = read_rows(&dir().join(file), DataFormat::Auto).unwrap();
        assert_eq!(rows, jsonl, "{file}");
    }
    // Nested list<struct<role, content>> columns come back as message lists.
    let conv = read_rows(&dir().join("conv.parquet"), DataFormat::Parquet).unwrap();
    let conv_jsonl = read_rows(&dir().join("conv.jsonl"), DataFormat::Jsonl).unwrap();
    assert_eq!(conv, conv_jsonl);
    let first = conv[1].as_ref().unwrap();
    assert_eq!(first["prompt"][0]["role"], "system");
    assert_eq!(first["prompt"][1]["content"], "Compute 1 * 17.");
    assert_eq!(first["id"], 101);
}

#[test]
fn grpo_prompts_match_transformers() {
    let tok = tokenizer("qwen2-tiny");
    for file in ["prompts.parquet", "prompts.jsonl"] {
        let (prompts, report) = load_prompts(&cfg(file), &tok, 256).unwrap();
        assert_eq!((report.total_rows, report.usable_rows), (12, 12), "{file}");
        for (p, want) in prompts.iter().zip(expected("grpo")) {
            assert_eq!(
                p.prompt_text,
                want["text"].as_str().unwrap(),
                "{file} row {}",
                p.row
            );
            assert_eq!(p.prompt_ids, ids(&want["ids"]), "{file} row {}", p.row);
            assert!(!p.fields.contains_key("prompt"));
            assert_eq!(p.fields["id"], p.row as i64);
        }
        assert_eq!(prompts[3].fields["solution"], "33"); // 10 + 23
    }
    let with_system = DatasetConfig {
        system_prompt: Some(system()),
        ..cfg("prompts.zstd.parquet")
    };
    let (prompts, _) = load_prompts(&with_system, &tok, 256).unwrap();
    for (p, want) in prompts.iter().zip(expected("grpo_system")) {
        assert_eq!(p.prompt_ids, ids(&want["ids"]), "row {}", p.row);
    }
}

#[test]
fn conversational_prompts_match_transformers() {
    let tok = tokenizer("qwen2-tiny");
    for file in ["conv.parquet", "conv.jsonl"] {
        let c = DatasetConfig {
            system_prompt: Some(system()),
            ..cfg(file)
        };
        let (prompts, report) = load_prompts(&c, &tok, 256).unwrap();
        assert_eq!(report.usable_rows, 6, "{file}");
        for (p, want) in prompts.iter().zip(expected("conv")) {
            assert_eq!(
                p.prompt_text,
                want["text"].as_str().unwrap(),
                "{file} row {}",
                p.row
            );
            assert_eq!(p.prompt_ids, ids(&want["ids"]), "{file} row {}", p.row);
        }
        // Rows with their own system message keep it.
        assert!(prompts[1].prompt_text.contains("You are terse."));
        assert!(!prompts[1].prompt_text.contains(&system()));
    }
}

#[test]
fn plain_text_prompts_without_chat_template() {
    let tok = tokenizer("llama-tiny");
    let c = DatasetConfig {
        use_chat_template: false,
        system_prompt: Some(system()),
        ..cfg("prompts.parquet")
    };
    let (prompts, _) = load_prompts(&c, &tok, 256).unwrap();
    for (p, want) in prompts.iter().zip(expected("grpo_plain_llama")) {
        assert_eq!(p.prompt_ids, ids(want), "row {}", p.row);
        assert!(p.prompt_text.starts_with(&system()));
    }
    // Conversational rows cannot be used without a template: every row is reported.
    let c = DatasetConfig {
        use_chat_template: false,
        ..cfg("conv.parquet")
    };
    let err = load_prompts(&c, &tok, 256).unwrap_err().to_string();
    assert!(err.contains("no_chat_template 6"), "{err}");
    assert!(err.contains("use_chat_template is false"), "{err}");
}

#[test]
fn directory_of_shards_reads_in_name_order() {
    let tok = tokenizer("qwen2-tiny");
    let (prompts, report) = load_prompts(&cfg("shards"), &tok, 256).unwrap();
    assert_eq!(report.total_rows, 12);
    let order: Vec<i64> = prompts
        .iter()
        .map(|p| p.fields["id"].as_i64().unwrap())
        .collect();
    assert_eq!(order, (0..12).collect::<Vec<_>>());
    let rows: Vec<usize> = prompts.iter().map(|p| p.row).collect();
    assert_eq!(rows, (0..12).collect::<Vec<_>>());
    // A directory with format = jsonl finds no shards among the parquet files.
    let c = DatasetConfig {
        format: DataFormat::Jsonl,
        ..cfg("shards")
    };
    let err = load_prompts(&c, &tok, 256).unwrap_err();
    assert!(matches!(err, DataError::NoShards { .. }), "{err}");
    assert!(
        err.to_string().contains("train-00000-of-00003.parquet"),
        "{err}"
    );
}

/// A JSONL file with every kind of bad row, next to good ones.
fn bad_rows_file(tmp: &Path) -> PathBuf {
    let path = tmp.join("bad.jsonl");
    let long = "seven ".repeat(200);
    let lines = [
        r#"{"prompt": "What is 1 + 1?", "answer": "2"}"#.to_string(),
        r#"{"question": "no prompt column"}"#.into(),
        r#"{"prompt": 42}"#.into(),
        r#"{"prompt": "   "}"#.into(),
        r#"{"prompt": [{"role": "wizard", "content": "x"}]}"#.into(),
        format!(r#"{{"prompt": "{long}"}}"#),
        "not json at all".into(),
        r#"{"prompt": [{"role": "user"}]}"#.into(),
        r#"{"prompt": "What is 2 + 2?", "answer": "4"}"#.into(),
        r#"{"prompt": "What is 3 + 3?", "answer": "6"}"#.into(),
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn bad_rows_are_counted_by_reason() {
    let tok = tokenizer("qwen2-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let mut c = DatasetConfig {
        path: bad_rows_file(tmp.path()),
        ..Default::default()
    };
    // Default 0.0: any unusable row fails the load, and the error says why.
    let err = load_prompts(&c, &tok, 64).unwrap_err();
    let DataError::TooManyUnusable {
        unusable,
        total,
        summary,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!((*unusable, *total), (7, 10), "{summary}");
    assert!(err.to_string().contains("bad.jsonl"), "{err}");
    for needle in [
        "malformed_row 1",
        "missing_column 1",
        "wrong_type 2",
        "empty_prompt 1",
        "template_error 1",
        "prompt_too_long 1",
        "row 1: column \"prompt\" is missing",
        "row 2: column \"prompt\" must be a string or a list",
    ] {
        assert!(summary.contains(needle), "{needle:?} not in {summary}");
    }
    // 7/10 = 0.7 passes at 0.7 exactly and fails at 0.69.
    c.max_unusable_fraction = 0.69;
    assert!(load_prompts(&c, &tok, 64).is_err());
    c.max_unusable_fraction = 0.7;
    let (prompts, report) = load_prompts(&c, &tok, 64).unwrap();
    assert_eq!(report.unusable_rows(), 7);
    assert_eq!(report.usable_rows, 3);
    assert_eq!(report.unusable["prompt_too_long"], 1);
    assert_eq!(report.samples.len(), 5);
    let rows: Vec<usize> = prompts.iter().map(|p| p.row).collect();
    assert_eq!(rows, [0, 8, 9]);
    // The long prompt is reported with its length, not truncated.
    let (_, report) = load_prompts(
        &DatasetConfig {
            max_unusable_fraction: 1.0,
            ..c.clone()
        },
        &tok,
        64,
    )
    .unwrap();
    let too_long = report
        .samples
        .iter()
        .find(|s| s.starts_with("row 5"))
        .unwrap();
    assert!(
        too_long.contains("tokens > max_prompt_length 64"),
        "{too_long}"
    );
    // With a large enough limit, the long prompt is usable.
    let (_, report) = load_prompts(&c, &tok, 4096).unwrap();
    assert!(!report.unusable.contains_key("prompt_too_long"));
    assert!(matches!(
        load_prompts(&c, &tok, 0),
        Err(DataError::ZeroLength { .. })
    ));
}

#[test]
fn sft_examples_match_transformers() {
    let tok = tokenizer("llama-tiny");
    for file in ["sft.parquet", "sft.jsonl"] {
        let c = DatasetConfig {
            system_prompt: Some(system()),
            ..cfg(file)
        };
        let (examples, report) = load_sft(&c, &tok, 512).unwrap();
        assert_eq!(report.usable_rows, 6, "{file}: {}", report.summary());
        for (e, want) in examples.iter().zip(expected("sft_llama")) {
            assert_eq!(e.input_ids, ids(&want["ids"]), "{file} row {}", e.row);
            assert_eq!(
                e.completion_start,
                want["completion_start"].as_u64().unwrap() as usize,
                "{file} row {}",
                e.row
            );
        }
        // The multi-turn row: by default (TRL's) every token is in the loss; under
        // assistant_only_loss the tokens of both assistant turns.
        let multi = &examples[4];
        assert_eq!(multi.completion_start, 1);
        assert!(multi.loss_mask[1..].iter().all(|&m| m));
        let loss = SftLoss {
            assistant_only: true,
            ..Default::default()
        };
        let (only, _) = load_sft_with(&c, &tok, 512, loss).unwrap();
        let multi = &only[4];
        assert_eq!(multi.input_ids, examples[4].input_ids);
        let kept: Vec<u32> = multi
            .input_ids
            .iter()
            .zip(&multi.loss_mask)
            .filter(|(_, &m)| m)
            .map(|(&i, _)| i as u32)
            .collect();
        assert_eq!(tok.decode(&kept, false).unwrap(), "5<|eot_id|>8<|eot_id|>");
        // Too short a max_length: reported, not truncated.
        let err = load_sft(&c, &tok, 20).unwrap_err().to_string();
        assert!(err.contains("too_long"), "{err}");
        assert!(err.contains("> max_length 20"), "{err}");
    }
}

#[test]
fn sft_plain_text_appends_eos() {
    let tok = tokenizer("llama-tiny");
    let c = DatasetConfig {
        use_chat_template: false,
        max_unusable_fraction: 0.5,
        ..cfg("sft.parquet")
    };
    let (examples, report) = load_sft(&c, &tok, 512).unwrap();
    // The two messages rows need a template.
    assert_eq!(
        report.unusable["no_chat_template"],
        2,
        "{}",
        report.summary()
    );
    for (e, want) in examples.iter().zip(expected("sft_plain_llama")) {
        let prompt = ids(&want["prompt"]);
        assert_eq!(e.completion_start, prompt.len());
        assert_eq!(e.input_ids[..prompt.len()], prompt[..]);
        assert_eq!(e.input_ids[prompt.len()..], ids(&want["completion"])[..]);
        assert_eq!(
            *e.input_ids.last().unwrap(),
            i64::from(tok.eos_token_id().unwrap())
        );
    }
}

#[test]
fn sft_template_that_rewrites_the_last_turn_is_reported() {
    // qwen2-tiny's template opens the generation prompt with "<think>\n" but renders
    // assistant turns without it: the prompt is not a prefix of the conversation.
    let tok = tokenizer("qwen2-tiny");
    for want in expected("sft_qwen") {
        assert_eq!(want["prefix_ok"], false);
    }
    let err = load_sft(&cfg("sft.parquet"), &tok, 512)
        .unwrap_err()
        .to_string();
    // The 4 prompt/completion rows; the 2 messages rows are rendered whole (every token
    // in the loss), so no prompt has to be a prefix.
    assert!(err.contains("template_mismatch 4"), "{err}");
    assert!(err.contains("not a prefix"), "{err}");
}

#[test]
fn sft_bad_rows() {
    let tok = tokenizer("llama-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sft.jsonl");
    let lines = [
        r#"{"prompt": "Q", "completion": "A"}"#,
        r#"{"prompt": "Q"}"#,
        r#"{"prompt": "Q", "completion": ""}"#,
        r#"{"messages": [{"role": "user", "content": "Q"}]}"#,
        r#"{"messages": [{"role": "assistant", "content": "A"}]}"#,
        r#"{"messages": "Q"}"#,
        r#"{"other": 1}"#,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let c = DatasetConfig {
        path,
        max_unusable_fraction: 1.0,
        ..Default::default()
    };
    let (examples, report) = load_sft(&c, &tok, 512).unwrap();
    // The lone assistant turn is a whole-sequence example (TRL's default for messages).
    assert_eq!(examples.len(), 2);
    let kinds: Vec<(&str, usize)> = report
        .unusable
        .iter()
        .map(|(k, n)| (k.as_str(), *n))
        .collect();
    assert_eq!(
        kinds,
        [
            ("empty_completion", 1),
            ("missing_column", 2),
            ("no_assistant_turn", 1),
            ("wrong_type", 1),
        ],
        "{}",
        report.summary()
    );
}

#[test]
fn sampler_over_loaded_prompts_is_deterministic() {
    let tok = tokenizer("qwen2-tiny");
    let (prompts, _) = load_prompts(&cfg("prompts.parquet"), &tok, 256).unwrap();
    let mut a = Sampler::new(prompts.len(), 1234);
    let mut b = Sampler::new(prompts.len(), 1234);
    let first: Vec<usize> = (0..3).flat_map(|_| a.next_batch(8)).collect();
    assert_eq!(
        first,
        (0..3).flat_map(|_| b.next_batch(8)).collect::<Vec<_>>()
    );
    assert_eq!(a.epoch(), 1);
    let mut epoch0 = first[..12].to_vec();
    epoch0.sort_unstable();
    assert_eq!(epoch0, (0..12).collect::<Vec<_>>());
    let state = a.state();
    let mut c = Sampler::new(prompts.len(), 1234);
    c.restore(&state).unwrap();
    assert_eq!(a.next_batch(20), c.next_batch(20));
    let mut other = Sampler::new(prompts.len() + 1, 1234);
    assert!(other.restore(&state).is_err());
}

/// Writes `rows` (each a `{"messages": [...]}` object) as a JSON-lines dataset.
fn messages_dataset(dir: &Path, rows: &[&Value]) -> DatasetConfig {
    let path = dir.join("conversations.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .map(|r| serde_json::json!({ "messages": r["messages"] }).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    DatasetConfig {
        path,
        ..Default::default()
    }
}

#[test]
fn sft_assistant_only_loss_matches_transformers_assistant_masks() {
    // transformers' return_assistant_tokens_mask on a template with {% generation %}
    // markers is the reference; the loader finds the same tokens by incremental rendering.
    let cases = &fixtures().1["assistant_masks_qwen"];
    let mut tok = tokenizer("qwen2-tiny");
    tok.set_chat_template(cases["template"].as_str().unwrap(), Path::new("<test>"))
        .unwrap();
    let rows: Vec<&Value> = cases["rows"].as_array().unwrap().iter().collect();
    assert_eq!(rows.len(), 3);
    let tmp = tempfile::tempdir().unwrap();
    let c = messages_dataset(tmp.path(), &rows);
    let only = SftLoss {
        assistant_only: true,
        ..Default::default()
    };
    let (examples, report) = load_sft_with(&c, &tok, 512, only).unwrap();
    assert_eq!(report.usable_rows, 3, "{}", report.summary());
    for (e, want) in examples.iter().zip(&rows) {
        assert_eq!(e.input_ids, ids(&want["ids"]), "row {}", e.row);
        let mask: Vec<bool> = ids(&want["mask"]).iter().map(|&m| m == 1).collect();
        assert_eq!(
            e.loss_mask, mask,
            "row {}: token-by-token assistant mask",
            e.row
        );
        assert_eq!(e.completion_start, mask.iter().position(|&m| m).unwrap());
    }
    // TRL's default for a conversation: every token after the first.
    let (full, _) = load_sft_with(&c, &tok, 512, SftLoss::default()).unwrap();
    for (e, want) in full.iter().zip(&rows) {
        assert_eq!(e.input_ids, ids(&want["ids"]));
        assert!(!e.loss_mask[0] && e.loss_mask[1..].iter().all(|&m| m));
    }
    // completion_only_loss: true has no completion in a conversation (TRL refuses it).
    let strict = SftLoss {
        completion_only: Some(true),
        ..Default::default()
    };
    let err = load_sft_with(&c, &tok, 512, strict)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_completion 3"), "{err}");
}

#[test]
fn sft_assistant_only_loss_needs_a_prefix_stable_template() {
    // Earlier assistant turns rendered empty once a later turn follows (as templates that
    // strip past reasoning do): the spans cannot be located, and the error says where.
    let cases = &fixtures().1["assistant_masks_qwen"];
    let mut tok = tokenizer("qwen2-tiny");
    let template = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}\
        {% if message['role'] == 'assistant' and not loop.last %}{{ '<|im_end|>\\n' }}\
        {% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    tok.set_chat_template(template, Path::new("<test>"))
        .unwrap();
    let rows: Vec<&Value> = cases["rows"].as_array().unwrap().iter().collect();
    let tmp = tempfile::tempdir().unwrap();
    let c = messages_dataset(tmp.path(), &rows[..1]);
    let only = SftLoss {
        assistant_only: true,
        ..Default::default()
    };
    let err = load_sft_with(&c, &tok, 512, only).unwrap_err().to_string();
    assert!(err.contains("template_not_prefix_stable 1"), "{err}");
    assert!(err.contains("not prefix-stable at message 2"), "{err}");
    // Without assistant_only_loss the same rows train on every token.
    assert!(load_sft_with(&c, &tok, 512, SftLoss::default()).is_ok());
}
