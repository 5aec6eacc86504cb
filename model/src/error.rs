//! The model crate's error type. Every variant names the file or tensor at fault, so a
//! user with a bad checkpoint knows what to fix without reading a backtrace.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture {found:?}; supported: Qwen2 (model_type \"qwen2\") and Llama (model_type \"llama\")")]
    UnsupportedArchitecture { path: PathBuf, found: String },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{dir}: missing tensor(s) {names:?}")]
    MissingTensors { dir: PathBuf, names: Vec<String> },
    #[error("{dir}: unexpected tensor(s) {names:?} (not part of this architecture)")]
    UnexpectedTensors { dir: PathBuf, names: Vec<String> },
    #[error("{path}: tensor {name} has unsupported dtype {dtype}; supported: F32, BF16, F16")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor {name} is listed in the index but absent from the shard")]
    IndexMismatch { path: PathBuf, name: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
