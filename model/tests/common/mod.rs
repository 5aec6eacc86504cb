//! Helpers shared by the model's integration tests: fixture paths and tensor checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Kind, Tensor};

/// `fixtures/generated`, written by scripts/make_fixtures.py (scripts/test.sh runs it).
pub fn fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated");
    assert!(
        dir.join(".stamp").exists(),
        "{} is missing: run scripts/test.sh (or .venv/bin/python scripts/make_fixtures.py fixtures/generated)",
        dir.display()
    );
    dir
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The reference tensors transformers wrote beside a fixture model.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = model_dir(name).join("reference.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Number of reference sequences (`seq{i}.ids`).
pub fn num_seqs(r: &HashMap<String, Tensor>) -> usize {
    (0..)
        .take_while(|i| r.contains_key(&format!("seq{i}.ids")))
        .count()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[track_caller]
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
}

/// The project venv's interpreter (set by .cargo/config.toml, created by scripts/setup.sh).
pub fn python() -> PathBuf {
    let p = std::env::var("GRPO_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let p = PathBuf::from(p);
    let p = if p.is_absolute() {
        p
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    };
    assert!(
        p.exists(),
        "{} not found: run scripts/setup.sh",
        p.display()
    );
    p
}

pub fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// A fresh temporary directory under the target dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let base = std::env::temp_dir().join(format!(
            "grpo-model-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        TempDir(base)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
