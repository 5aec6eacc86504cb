//! `RolloutConfig`: where the workers are and how the client talks to them.

use crate::config::invalid::{bad, InvalidConfig};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest `weight_chunk_bytes`: the worker refuses messages over 64 MiB, and a chunk
/// message carries its name and shape besides the data.
pub const MAX_WEIGHT_CHUNK_BYTES: usize = 48 << 20;

/// Largest `update_weights_bucket_megabytes`: a worker accepts a bucket of at most
/// [`nccl_comm::bucket::MAX_BUCKET_ELEMENTS`] elements, and this many MiB of the
/// narrowest wire dtype (bfloat16, 2 bytes) is exactly that (1024 MiB).
pub const MAX_UPDATE_WEIGHTS_BUCKET_MEGABYTES: usize =
    (nccl_comm::bucket::MAX_BUCKET_ELEMENTS as usize * 2) >> 20;

/// Upper bound of the re-probe backoff of a failed worker.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// Settings of the rollout client (the `[rollout]` table of the trainer config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// gRPC addresses of the workers, e.g. `"http://127.0.0.1:50051"`, or DNS names
    /// standing for every address they resolve to, re-resolved every
    /// `dns_refresh_secs` (`"dns:///grpo-rollout-worker:50051"`, a Kubernetes headless
    /// Service; see [`super::resolve`]).
    pub workers: Vec<String>,
    /// How often `dns:///` entries are resolved again (workers added or removed).
    pub dns_refresh_secs: f64,
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
    /// Wire dtype of pushed weights: `"float32"`, `"bfloat16"`, or `"auto"` (the
    /// trainer's compute dtype: bfloat16 when the policy computes in bfloat16).
    pub weight_dtype: String,
    /// How pushed tensors travel: `"auto"` (NCCL broadcast when the trainer's policy is
    /// on CUDA and every worker reports a CUDA device; else the workers' TCP data plane
    /// where they announce one, i.e. every `http://` worker without TLS; gRPC chunks
    /// otherwise), `"grpc"` (always chunks on the `UpdateWeights` stream) or `"nccl"`
    /// (NCCL broadcast; an error at the push when the trainer or a worker is not on CUDA).
    pub weight_transport: String,
    /// Over the data plane, send every byte once, to the first worker, which forwards it
    /// down a chain of the others as it arrives (rank 0's egress is one copy); `false`:
    /// one stream from the trainer to each worker.
    pub weight_chain: bool,
    /// Parallel TCP connections ("lanes", 1 to 8) that carry a data-plane update to a
    /// worker fed directly (one worker, or `weight_chain = false`), each with whole
    /// tensors balanced by bytes: one loopback or NIC stream is bound by the one core
    /// that copies it, two moved 1.5-1.8x as much to one worker on two cores
    /// (scripts/bench/push.sh). A chain of two or more workers uses one lane per hop.
    pub weight_lanes: u8,
    /// MiB of the NCCL broadcast bucket (verl's `update_weights_bucket_megabytes`): rank
    /// 0 packs the pushed tensors into one device buffer of this size and broadcasts it
    /// each time it fills; every worker holds a staging bucket of the same size. Larger
    /// means fewer broadcasts and more device memory on each GPU.
    pub update_weights_bucket_megabytes: usize,
    /// File holding the workers' API key (sent as `authorization: Bearer`); or set
    /// `ROLLOUT_API_KEY`. The key itself is never a config value.
    pub api_key_file: Option<PathBuf>,
    /// PEM CA certificates of the workers' TLS certificates (needed for `https://`).
    pub ssl_ca_certs: Option<PathBuf>,
    /// PEM client certificate and key, for workers that require mutual TLS.
    pub ssl_certfile: Option<PathBuf>,
    pub ssl_keyfile: Option<PathBuf>,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            workers: vec![],
            dns_refresh_secs: 30.0,
            max_prompts_per_request: 8,
            max_requests_per_worker: 2,
            // Below dist.timeout_secs (300) with crate::timeouts::SLACK_SECS to spare.
            request_timeout_secs: 240.0,
            connect_timeout_secs: 10.0,
            retry_backoff_secs: 1.0,
            weight_chunk_bytes: 4 << 20,
            weight_dtype: "auto".into(),
            weight_transport: "auto".into(),
            weight_chain: true,
            weight_lanes: 2,
            update_weights_bucket_megabytes: 256,
            api_key_file: None,
            ssl_ca_certs: None,
            ssl_certfile: None,
            ssl_keyfile: None,
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

fn positive_secs(field: &str, v: f64) -> Result<(), InvalidConfig> {
    // Duration::from_secs_f64 panics past ~5.8e11 s; a year is far beyond any real need.
    if v.is_finite() && v > 0.0 && v <= 31_536_000.0 {
        Ok(())
    } else {
        Err(bad(
            &format!("rollout.{field}"),
            format!("rollout.{field} must be a number of seconds in (0, 31536000], got {v}"),
        ))
    }
}

impl RolloutConfig {
    /// Checks every field; the error names the field and its allowed values.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.workers.is_empty() {
            return Err(bad(
                "rollout.workers",
                "rollout.workers must list at least one worker url",
            ));
        }
        for (i, url) in self.workers.iter().enumerate() {
            let field = format!("rollout.workers[{i}]");
            super::resolve::WorkerSource::parse(url)
                .map_err(|why| bad(&field, format!("{field} = {url:?} {why}")))?;
            if url.starts_with("https://") && self.ssl_ca_certs.is_none() {
                return Err(bad(&field, format!(
                    "{field} = {url:?} is https://: set rollout.ssl_ca_certs to the CA of its certificate"
                )));
            }
            if self.workers[..i].contains(url) {
                return Err(bad(&field, format!("{field} = {url:?} is listed twice")));
            }
        }
        if self.max_prompts_per_request == 0 {
            return Err(bad(
                "rollout.max_prompts_per_request",
                "rollout.max_prompts_per_request must be at least 1",
            ));
        }
        if self.max_requests_per_worker == 0 {
            return Err(bad(
                "rollout.max_requests_per_worker",
                "rollout.max_requests_per_worker must be at least 1",
            ));
        }
        positive_secs("request_timeout_secs", self.request_timeout_secs)?;
        positive_secs("connect_timeout_secs", self.connect_timeout_secs)?;
        positive_secs("retry_backoff_secs", self.retry_backoff_secs)?;
        positive_secs("dns_refresh_secs", self.dns_refresh_secs)?;
        if self.weight_chunk_bytes < 4 || self.weight_chunk_bytes > MAX_WEIGHT_CHUNK_BYTES {
            return Err(bad(
                "rollout.weight_chunk_bytes",
                format!(
                    "rollout.weight_chunk_bytes must be in 4..={MAX_WEIGHT_CHUNK_BYTES}, got {}",
                    self.weight_chunk_bytes
                ),
            ));
        }
        self.wire_dtype()?;
        if !matches!(self.weight_transport.as_str(), "auto" | "grpc" | "nccl") {
            return Err(bad(
                "rollout.weight_transport",
                format!(
                    "rollout.weight_transport = {:?}; allowed: \"auto\", \"grpc\", \"nccl\"",
                    self.weight_transport
                ),
            ));
        }
        if !(1..=proto::data_plane::MAX_LANES).contains(&self.weight_lanes) {
            return Err(bad(
                "rollout.weight_lanes",
                format!(
                    "rollout.weight_lanes = {}; allowed 1..={} (TCP connections per \
                     directly fed worker)",
                    self.weight_lanes,
                    proto::data_plane::MAX_LANES
                ),
            ));
        }
        let mib = self.update_weights_bucket_megabytes;
        if !(1..=MAX_UPDATE_WEIGHTS_BUCKET_MEGABYTES).contains(&mib) {
            return Err(bad(
                "rollout.update_weights_bucket_megabytes",
                format!(
                    "rollout.update_weights_bucket_megabytes = {mib}; allowed \
                     1..={MAX_UPDATE_WEIGHTS_BUCKET_MEGABYTES} (MiB of the NCCL broadcast \
                     bucket)"
                ),
            ));
        }
        if self.ssl_certfile.is_some() != self.ssl_keyfile.is_some() {
            return Err(bad(
                "rollout.ssl_keyfile",
                "rollout.ssl_certfile and rollout.ssl_keyfile must be set together",
            ));
        }
        if self.ssl_certfile.is_some() && self.ssl_ca_certs.is_none() {
            return Err(bad(
                "rollout.ssl_ca_certs",
                "rollout.ssl_certfile (mutual TLS) needs rollout.ssl_ca_certs",
            ));
        }
        Ok(())
    }

    /// This config with `weight_dtype = "auto"` resolved for a policy computing in
    /// `compute` (bfloat16 on the wire for a bfloat16 policy, else float32).
    pub fn with_compute_dtype(mut self, compute: tch::Kind) -> Self {
        if self.weight_dtype == "auto" {
            self.weight_dtype = if compute == tch::Kind::BFloat16 {
                "bfloat16"
            } else {
                "float32"
            }
            .into();
        }
        self
    }

    /// The parsed `weight_dtype` (`"auto"` not resolved by
    /// [`RolloutConfig::with_compute_dtype`] means float32).
    pub fn wire_dtype(&self) -> Result<WireDtype, InvalidConfig> {
        match self.weight_dtype.as_str() {
            "float32" | "auto" => Ok(WireDtype::Float32),
            "bfloat16" => Ok(WireDtype::BFloat16),
            other => Err(bad(
                "rollout.weight_dtype",
                format!(
                    "rollout.weight_dtype = {other:?}; allowed: \"auto\", \"float32\", \"bfloat16\""
                ),
            )),
        }
    }

    /// Bytes of the NCCL broadcast bucket (`update_weights_bucket_megabytes` MiB).
    pub fn bucket_bytes(&self) -> usize {
        self.update_weights_bucket_megabytes << 20
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }

    /// The parsed `workers` entries (call after [`RolloutConfig::validate`]).
    pub fn worker_sources(&self) -> Vec<super::resolve::WorkerSource> {
        self.workers
            .iter()
            .filter_map(|w| super::resolve::WorkerSource::parse(w).ok())
            .collect()
    }

    pub(crate) fn dns_refresh(&self) -> Duration {
        Duration::from_secs_f64(self.dns_refresh_secs)
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
        assert_eq!(c.update_weights_bucket_megabytes, 256);
        assert_eq!(c.bucket_bytes(), 256 << 20);
        assert_eq!(c.wire_dtype().unwrap(), WireDtype::BFloat16);
        let e = serde_json::from_str::<RolloutConfig>(r#"{"workerz": []}"#).unwrap_err();
        assert!(e.to_string().contains("workerz"), "{e}");
    }

    #[test]
    fn the_nccl_bucket_is_set_in_mib_up_to_what_a_worker_accepts() {
        let c: RolloutConfig = serde_json::from_str(
            r#"{"workers": ["http://a:1"], "update_weights_bucket_megabytes": 64}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.bucket_bytes(), 64 << 20);
        for mib in [1, MAX_UPDATE_WEIGHTS_BUCKET_MEGABYTES] {
            let c = RolloutConfig {
                update_weights_bucket_megabytes: mib,
                ..ok()
            };
            c.validate().unwrap();
        }
        // The largest bucket in bfloat16 is the largest a worker allocates.
        let largest = RolloutConfig {
            update_weights_bucket_megabytes: MAX_UPDATE_WEIGHTS_BUCKET_MEGABYTES,
            ..ok()
        };
        assert_eq!(
            (largest.bucket_bytes() / WireDtype::BFloat16.size()) as u64,
            nccl_comm::bucket::MAX_BUCKET_ELEMENTS
        );
        let e = RolloutConfig {
            update_weights_bucket_megabytes: 0,
            ..ok()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field(), "rollout.update_weights_bucket_megabytes");
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
            (
                Box::new(|c| c.update_weights_bucket_megabytes = 0),
                "rollout.update_weights_bucket_megabytes = 0; allowed 1..=1024",
            ),
            (
                Box::new(|c| c.update_weights_bucket_megabytes = 1025),
                "rollout.update_weights_bucket_megabytes = 1025; allowed 1..=1024",
            ),
            (
                Box::new(|c| c.workers[0] = "dns:///svc".into()),
                "port is required",
            ),
            (Box::new(|c| c.dns_refresh_secs = 0.0), "dns_refresh_secs"),
            (
                Box::new(|c| c.workers[0] = "https://w:1".into()),
                "rollout.ssl_ca_certs",
            ),
            (
                Box::new(|c| c.ssl_certfile = Some("c.pem".into())),
                "rollout.ssl_keyfile",
            ),
        ];
        for (edit, field) in cases {
            let mut c = ok();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
