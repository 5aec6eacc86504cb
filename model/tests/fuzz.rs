//! Fuzz targets of the model crate (test_support::fuzz, mutation-based): safetensors
//! weight files and config.json through `load_pretrained`, and chat-template inputs
//! (mutated JSON message lists) through the tokenizer. Any input must give a value or
//! an error naming the problem, never a panic. `scripts/fuzz.sh` runs them for a
//! bounded time (`FUZZ_SECS`).
use std::path::PathBuf;

use model::{ChatTemplateOptions, Tokenizer};
use tch::{Device, Kind};
use test_support::fuzz::fuzz;

fn fixture() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated/qwen2-tiny");
    assert!(d.exists(), "{} missing: run scripts/test.sh", d.display());
    d
}

/// A copy of the fixture checkpoint whose `file` the target overwrites.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

#[test]
fn fuzz_safetensors_and_config() {
    let dir = scratch();
    for file in ["model.safetensors", "config.json"] {
        let path = dir.path().join(file);
        let original = std::fs::read(&path).unwrap();
        let execs = if file == "config.json" { 400 } else { 150 };
        fuzz(
            &format!("load_{file}"),
            std::slice::from_ref(&original),
            execs,
            |bytes| {
                std::fs::write(&path, bytes).unwrap();
                let _ = model::load_pretrained(dir.path(), Device::Cpu, Some(Kind::Float));
            },
        );
        std::fs::write(&path, original).unwrap();
    }
    model::load_pretrained(dir.path(), Device::Cpu, None).unwrap();
}

#[test]
fn fuzz_chat_template_inputs() {
    let tok = Tokenizer::from_dir(fixture()).unwrap();
    let seeds: Vec<Vec<u8>> = [
        r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]"#,
        r#"[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>4"}, {"role": "user", "content": "again {{ raise_exception('x') }}"}]"#,
        r#"[{"role": "tool", "content": "{\"a\": 1}"}]"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let opts = ChatTemplateOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    fuzz("chat_template", &seeds, 1500, |bytes| {
        let Ok(messages) = serde_json::from_slice::<Vec<serde_json::Value>>(bytes) else {
            // Not JSON: the raw text as one user message.
            let text = String::from_utf8_lossy(bytes);
            let _ = tok.encode_chat(&[model::ChatMessage::user(text.as_ref())], &opts);
            return;
        };
        let _ = tok.encode_chat(&messages, &opts);
    });
}
