//! Why a loaded configuration fails its checks ([`InvalidConfig`]): which field, and a
//! message that names it and what is allowed. `GrpoConfig`, `SftConfig` and
//! `TrainingArgs` `validate()` return it; the binary prefixes `configuration: `.
use crate::data::DataError;
use crate::dist::CommError;

#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    /// `field` (dotted for nested tables: `rollout.workers`) holds a value it does not
    /// allow; `message` names it and the allowed values.
    #[error("{message}")]
    Field { field: String, message: String },
    /// The training dataset's settings (`dataset.*`).
    #[error(transparent)]
    Dataset(DataError),
    /// The held-out dataset's settings (`eval_dataset.*`).
    #[error("eval_dataset: {error}")]
    EvalDataset { error: DataError },
    /// The rendezvous settings (`dist.*`).
    #[error(transparent)]
    Dist(#[from] CommError),
}

impl InvalidConfig {
    /// The field at fault (`dataset`, `eval_dataset` or `dist` for those sections).
    pub fn field(&self) -> &str {
        match self {
            InvalidConfig::Field { field, .. } => field,
            InvalidConfig::Dataset(_) => "dataset",
            InvalidConfig::EvalDataset { .. } => "eval_dataset",
            InvalidConfig::Dist(_) => "dist",
        }
    }
}

/// `field` is invalid: `message` says why.
pub(crate) fn bad(field: &str, message: impl Into<String>) -> InvalidConfig {
    InvalidConfig::Field {
        field: field.into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_the_display_and_the_field_is_kept() {
        let e = bad(
            "num_generations",
            "num_generations must be at least 2, got 1",
        );
        assert_eq!(e.field(), "num_generations");
        assert_eq!(e.to_string(), "num_generations must be at least 2, got 1");
    }
}
