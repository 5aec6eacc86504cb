//! `RolloutConfig`: where the workers are and how the client talks to them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest `weight_chunk_bytes`: the worker refuses messages over 64 MiB, and a chunk
/// message carries its name and shape besides the data.
pub const MAX_WEIGHT_CHUNK_BYTES: usize = 48 << 20;

/// Upper bound of the re-probe backoff of a failed worker.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// Settings of the rollout client (the `[rollout]` table of the trainer config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// gRPC addresses of the workers, e.g. `"http://127.0.0.1:50051"`.
    pub workers: Vec<String>,
    /// Prompts per `Generate` call (each gives one group of `n` completions).
    pub max_prompts_per_request: usize,
    /// Bound on the `Generate` calls in flight on one worker (over all `generate`
    /// calls of one client).
    pub max_requests_per_worker: usize,
    /// A stream that delivers no message for this long fails its worker (silence since
    /// the last message: workers send progress messages while a group generates, so a
    /// slow long generation never trips it); `generate` also
    /// gives up once no worker has been usable for this long.
    pub request_timeout_secs: f64,
    /// Bound on connecting plus one `Health` call (the probe of a worker).
    pub connect_timeout_secs: f64,
    /// A failed worker is probed again after this, the wait doubling after each failed
    /// probe up to 30 s and resetting once it answers.
    pub retry_backoff_secs: f64,
    /// Payload bytes per `TensorChunk` of a weight push (rounded down to whole elements).
    pub weight_chunk_bytes: usize,
    /// Wire dtype of pushed weights: `"float32"` or `"bfloat16"`.
    pub weight_dtype: String,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            workers: vec![],
            max_prompts_per_request: 8,
            max_requests_per_worker: 2,
            request_timeout_secs: 600.0,
            connect_timeout_secs: 10.0,
            retry_backoff_secs: 1.0,
            weight_chunk_bytes: 4 << 20,
            weight_dtype: "float32".into(),
        }
    }
}

/// Element type of pushed weights on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    Float32,
    BFloat16,
}

impl WireDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDtype::Float32 => 4,
            WireDtype::BFloat16 => 2,
        }
    }

    pub fn kind(self) -> tch::Kind {
        match self {
            WireDtype::Float32 => tch::Kind::Float,
            WireDtype::BFloat16 => tch::Kind::BFloat16,
        }
    }

    pub fn wire(self) -> proto::v1::Dtype {
        match self {
            WireDtype::Float32 => proto::v1::Dtype::Float32,
            WireDtype::BFloat16 => proto::v1::Dtype::Bfloat16,
        }
    }
}

fn positive_secs(field: &str, v: f64) -> Result<(), String> {
    // Duration::from_secs_f64 panics past ~5.8e11 s; a year is far beyond any real need.
    if v.is_finite() && v > 0.0 && v <= 31_536_000.0 {
        Ok(())
    } else {
        Err(format!(
            "rollout.{field} must be a number of seconds in (0, 31536000], got {v}"
        ))
    }
}

impl RolloutConfig {
    /// Checks every field; the error names the field and its allowed values.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers.is_empty() {
            return Err("rollout.workers must list at least one worker url".into());
        }
        for (i, url) in self.workers.iter().enumerate() {
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                format!(
                    "rollout.workers[{i}] = {url:?} must start with http:// (TLS is not supported)"
                )
            })?;
            if rest.is_empty() || url.parse::<tonic::transport::Uri>().is_err() {
                return Err(format!(
                    "rollout.workers[{i}] = {url:?} is not a valid http://host:port url"
                ));
            }
            if self.workers[..i].contains(url) {
                return Err(format!("rollout.workers[{i}] = {url:?} is listed twice"));
            }
        }
        if self.max_prompts_per_request == 0 {
            return Err("rollout.max_prompts_per_request must be at least 1".into());
        }
        if self.max_requests_per_worker == 0 {
            return Err("rollout.max_requests_per_worker must be at least 1".into());
        }
        positive_secs("request_timeout_secs", self.request_timeout_secs)?;
        positive_secs("connect_timeout_secs", self.connect_timeout_secs)?;
        positive_secs("retry_backoff_secs", self.retry_backoff_secs)?;
        if self.weight_chunk_bytes < 4 || self.weight_chunk_bytes > MAX_WEIGHT_CHUNK_BYTES {
            return Err(format!(
                "rollout.weight_chunk_bytes must be in 4..={MAX_WEIGHT_CHUNK_BYTES}, got {}",
                self.weight_chunk_bytes
            ));
        }
        self.wire_dtype()?;
        Ok(())
    }

    /// The parsed `weight_dtype`.
    pub fn wire_dtype(&self) -> Result<WireDtype, String> {
        match self.weight_dtype.as_str() {
            "float32" => Ok(WireDtype::Float32),
            "bfloat16" => Ok(WireDtype::BFloat16),
            other => Err(format!(
                "rollout.weight_dtype = {other:?}; allowed: \"float32\", \"bfloat16\""
            )),
        }
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }

    pub(crate) fn retry_backoff(&self) -> Duration {
        Duration::from_secs_f64(self.retry_backoff_secs).min(MAX_RETRY_BACKOFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> RolloutConfig {
        RolloutConfig {
            workers: vec!["http://127.0.0.1:50051".into(), "http://w2:50051".into()],
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_toml_style_json() {
        ok().validate().unwrap();
        let c: RolloutConfig =
            serde_json::from_str(r#"{"workers": ["http://a:1"], "weight_dtype": "bfloat16"}"#)
                .unwrap();
        assert_eq!(c.max_prompts_per_request, 8);
        assert_eq!(c.max_requests_per_worker, 2);
        assert_eq!(c.weight_chunk_bytes, 4 << 20);
        assert_eq!(c.wire_dtype().unwrap(), WireDtype::BFloat16);
        let e = serde_json::from_str::<RolloutConfig>(r#"{"workerz": []}"#).unwrap_err();
        assert!(e.to_string().contains("workerz"), "{e}");
    }

    #[test]
    fn each_bad_field_is_named() {
        type Edit = Box<dyn Fn(&mut RolloutConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.workers.clear()), "rollout.workers"),
            (
                Box::new(|c| c.workers[0] = "127.0.0.1:1".into()),
                "rollout.workers[0]",
            ),
            (
                Box::new(|c| c.workers[1] = c.workers[0].clone()),
                "listed twice",
            ),
            (Box::new(|c| c.workers[0] = "http://".into()), "workers[0]"),
            (
                Box::new(|c| c.max_prompts_per_request = 0),
                "max_prompts_per_request",
            ),
            (
                Box::new(|c| c.max_requests_per_worker = 0),
                "max_requests_per_worker",
            ),
            (
                Box::new(|c| c.request_timeout_secs = f64::NAN),
                "request_timeout_secs",
            ),
            (
                Box::new(|c| c.connect_timeout_secs = 0.0),
                "connect_timeout_secs",
            ),
            (
                Box::new(|c| c.retry_backoff_secs = -1.0),
                "retry_backoff_secs",
            ),
            (
                Box::new(|c| c.weight_chunk_bytes = 64 << 20),
                "weight_chunk_bytes",
            ),
            (Box::new(|c| c.weight_dtype = "fp8".into()), "weight_dtype"),
        ];
        for (edit, field) in cases {
            let mut c = ok();
            edit(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
