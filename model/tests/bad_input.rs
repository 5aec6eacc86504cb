//! Bad checkpoints and bad requests give errors that name the file, tensor or field at
//! fault; nothing panics.
mod common;

use std::path::Path;

use common::*;
use model::{ForwardInput, ModelError, Transformer};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Copies a fixture model into a temp dir so a test can damage it.
fn copy_model(name: &str, tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.0.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    Transformer::from_pretrained(dir, Device::Cpu, None)
        .unwrap_err()
        .to_string()
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_directory_and_files() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(
        e.contains("/nonexistent/model/config.json") && e.contains("No such file"),
        "{e}"
    );

    let dir = copy_model("qwen2-tiny", "no-weights");
    std::fs::remove_file(dir.0.join("model.safetensors")).unwrap();
    let e = load_err(&dir.0);
    assert!(
        e.contains("no model.safetensors or model.safetensors.index.json"),
        "{e}"
    );

    let dir = copy_model("llama-tiny", "missing-shard");
    std::fs::remove_file(dir.0.join("model-00003-of-00014.safetensors")).unwrap();
    let e = load_err(&dir.0);
    assert!(
        e.contains("model-00003-of-00014.safetensors") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_model("qwen2-tiny", "truncated");
    let p = dir.0.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir.0);
    assert!(
        e.contains("model.safetensors: not a valid safetensors file"),
        "{e}"
    );

    std::fs::write(&p, b"garbage").unwrap();
    let e = load_err(&dir.0);
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn config_errors_name_the_fields() {
    let dir = copy_model("qwen2-tiny", "bad-heads");
    edit_config(&dir.0, |v| v["num_key_value_heads"] = 3.into());
    let e = load_err(&dir.0);
    assert!(
        e.contains("config.json")
            && e.contains("num_attention_heads (4) is not divisible by num_key_value_heads (3)"),
        "{e}"
    );

    let dir = copy_model("qwen2-tiny", "bad-json");
    std::fs::write(dir.0.join("config.json"), "{ not json").unwrap();
    let e = load_err(&dir.0);
    assert!(e.contains("config.json: invalid JSON"), "{e}");

    let dir = copy_model("qwen2-tiny", "bad-arch");
    edit_config(&dir.0, |v| v["model_type"] = "mixtral".into());
    let e = load_err(&dir.0);
    assert!(e.contains("unsupported architecture \"mixtral\""), "{e}");
}

#[test]
fn mis_shaped_missing_and_unexpected_tensors() {
    // A config that disagrees with the weights: intermediate_size changed.
    let dir = copy_model("qwen2-tiny", "shape");
    edit_config(&dir.0, |v| v["intermediate_size"] = 100.into());
    let e = load_err(&dir.0);
    assert!(
        e.contains("mlp.") && e.contains("has shape") && e.contains("expected"),
        "{e}"
    );
    assert!(e.contains("100") && e.contains("176"), "{e}");

    // Untied config but the file has no lm_head.
    let dir = copy_model("qwen2-tiny", "missing");
    edit_config(&dir.0, |v| v["tie_word_embeddings"] = false.into());
    let e = load_err(&dir.0);
    assert!(e.contains("missing tensor(s) [\"lm_head.weight\"]"), "{e}");

    // Fewer layers in the config than in the file.
    let dir = copy_model("qwen2-tiny", "unexpected");
    edit_config(&dir.0, |v| v["num_hidden_layers"] = 1.into());
    let e = load_err(&dir.0);
    assert!(
        e.contains("unexpected tensor(s)") && e.contains("model.layers.1."),
        "{e}"
    );
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let m = Transformer::from_pretrained(model_dir("qwen2-tiny"), Device::Cpu, None).unwrap();
    let v = m.config.vocab_size;
    let too_big = Tensor::from_slice(&[1i64, v]).unsqueeze(0);
    let e = m.forward(&ForwardInput::new(&too_big), None).unwrap_err();
    assert!(
        matches!(e, ModelError::Input(_))
            && e.to_string().contains(&format!("token id {v} is outside")),
        "{e}"
    );

    let negative = Tensor::from_slice(&[-1i64, 2]).unsqueeze(0);
    assert!(m.forward(&ForwardInput::new(&negative), None).is_err());

    let empty = Tensor::zeros([1, 0], (Kind::Int64, Device::Cpu));
    let e = m
        .forward(&ForwardInput::new(&empty), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("seq > 0"), "{e}");

    let ids = Tensor::from_slice(&[1i64, 2, 3]).unsqueeze(0);
    let mask = Tensor::ones([1, 2], (Kind::Int64, Device::Cpu));
    let e = m
        .forward(&ForwardInput::new(&ids).with_mask(&mask), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention_mask has shape [1, 2]"), "{e}");

    let floats = Tensor::from_slice(&[1.0f32]).unsqueeze(0);
    assert!(m.forward(&ForwardInput::new(&floats), None).is_err());
}

/// The benchmarks' model writer: the overrides reach config.json, the weights written
/// are the ones returned, the tokenizer comes along, and an existing checkpoint is kept.
#[test]
fn write_random_like_applies_overrides_and_keeps_an_existing_checkpoint() {
    let base = model_dir("qwen2-tiny");
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("m");
    let overrides = [
        ("num_hidden_layers", serde_json::json!(3)),
        ("hidden_size", serde_json::json!(48)),
    ];
    let (cfg, w) = model::checkpoint::write_random_like(&base, &dir, &overrides).unwrap();
    assert_eq!((cfg.num_hidden_layers, cfg.hidden_size), (3, 48));
    assert!(dir.join("tokenizer.json").exists());
    let (loaded_cfg, loaded) = model::checkpoint::load_pretrained(&dir, Device::Cpu, None).unwrap();
    assert_eq!(loaded_cfg.num_hidden_layers, 3);
    assert!(loaded.embed_tokens.equal(&w.embed_tokens));
    let before = std::fs::read(dir.join("config.json")).unwrap();
    let again = [("num_hidden_layers", serde_json::json!(2))];
    model::checkpoint::write_random_like(&base, &dir, &again).unwrap();
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), before);
}
