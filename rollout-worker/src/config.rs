//! The worker's configuration: which checkpoint to serve, the engine's capacity limits and
//! the listen addresses.
//!
//! Data flow: `main.rs` reads an optional TOML file into [`WorkerConfig`] (unknown keys
//! are errors), then applies environment variables and command-line flags over it, then
//! calls [`WorkerConfig::validate`]. The engine turns [`EngineConfig`] into concrete
//! limits once the model's config is known ([`EngineConfig::resolve`]).
use std::net::SocketAddr;
use std::path::PathBuf;

use model::ModelConfig;
use serde::{Deserialize, Serialize};

/// Everything a `rollout-worker serve` process needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json).
    pub model: PathBuf,
    /// Name reported by /v1/models and GetInfo; the directory's name when absent.
    #[serde(default)]
    pub served_model_name: Option<String>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `float32`, `bfloat16` or `float16`; the checkpoint's dtype when absent.
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub server: ServerConfig,
}

/// Capacity of the batching engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Sequences decoded together in one batch (vLLM's `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Bytes the paged KV cache may use (blocks of `block_size` positions, allocated
    /// once, at most what `max_num_seqs` sequences of `max_model_len` can fill). Must
    /// hold at least one sequence of `max_model_len` tokens.
    pub kv_cache_bytes: u64,
    /// When set, the KV budget is this fraction of the memory available at start
    /// (MemAvailable, CPU only) instead of `kv_cache_bytes` (vLLM's
    /// `gpu_memory_utilization`, for the host).
    pub kv_cache_memory_fraction: Option<f64>,
    /// Positions per KV block (vLLM's `block_size`).
    pub block_size: usize,
    /// Tokens computed per engine step, decode and prefill chunks together (vLLM's
    /// `max_num_batched_tokens`): a long prompt is prefilled in chunks of at most this
    /// many tokens, so it never stalls decoding.
    pub max_num_batched_tokens: usize,
    /// Reuse the KV blocks of identical prompt prefixes across requests (vLLM's
    /// `enable_prefix_caching`). The n completions of a group share their prompt's
    /// blocks either way.
    pub enable_prefix_caching: bool,
    /// The n completions of a group prefill their prompt once and share its blocks
    /// (copy-on-write). Off only to measure what sharing saves.
    pub share_group_prompts: bool,
    /// Seconds between the progress messages a running group sends on the Generate
    /// stream (liveness for long generations); 0 disables them.
    pub progress_interval_secs: f64,
    /// Sleep after each engine step, in milliseconds: a slowed engine for liveness
    /// tests and fault drills. 0 in production.
    pub step_delay_ms: u64,
    /// Sequences accepted beyond the running ones before requests are refused with
    /// RESOURCE_EXHAUSTED (HTTP 429).
    pub max_waiting_seqs: usize,
    /// Largest group size `n` of one request (GRPO's `num_generations`).
    pub max_n: usize,
    /// Longest prompt + completion; the model's `max_position_embeddings` when absent.
    pub max_model_len: Option<usize>,
    /// Most alternatives per token an HTTP request may ask for (`logprobs` / `top_logprobs`).
    pub max_top_logprobs: usize,
    /// Bound on what one response can hold: prompts x n x max_tokens x (1 +
    /// top_logprobs) entries. A request over it is refused (HTTP 400 / INVALID_ARGUMENT)
    /// instead of being amplified into gigabytes.
    pub max_response_tokens: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            kv_cache_bytes: 1 << 30,
            kv_cache_memory_fraction: None,
            block_size: 16,
            max_num_batched_tokens: 2048,
            enable_prefix_caching: true,
            share_group_prompts: true,
            progress_interval_secs: 5.0,
            step_delay_ms: 0,
            max_waiting_seqs: 4096,
            max_n: 64,
            max_model_len: None,
            max_top_logprobs: 20,
            max_response_tokens: 1 << 23,
        }
    }
}

/// Listen addresses, TLS files and connection limits of the two front ends. The API key
/// itself is not here (it would end up in logs and dumps): it comes from `ROLLOUT_API_KEY`
/// or the file `--api-key-file` names ([`crate::security::ApiKey`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC (`rollout.v1.RolloutService`).
    pub grpc_addr: SocketAddr,
    /// OpenAI-compatible HTTP API, `/metrics` and `/health`.
    pub http_addr: SocketAddr,
    /// Port of the raw TCP weight data plane (on `grpc_addr`'s host, announced in
    /// `GetInfo.data_port`); 0 picks a free one. Fixed where a firewall, a
    /// Kubernetes `containerPort` or a network policy must name it. Unused with TLS.
    pub data_port: u16,
    /// With an API key: `/health`, `/metrics` and the gRPC `Health` call stay open to
    /// clients without it (probes, Prometheus), as vLLM leaves them.
    pub open_health_and_metrics: bool,
    /// PEM certificate chain and private key: both front ends serve TLS only (vLLM's
    /// `--ssl-certfile` / `--ssl-keyfile`).
    pub ssl_certfile: Option<PathBuf>,
    pub ssl_keyfile: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate they signed (mutual TLS).
    pub ssl_ca_certs: Option<PathBuf>,
    /// HTTP connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Idle HTTP/1.1 keep-alive connections kept open: a response that would leave more
    /// idle connections than this carries `Connection: close`. A burst of requests on
    /// one connection each (an `AsyncOpenAI` fan-out) otherwise leaves that many idle
    /// connections in the client's pool, which httpx-based clients probe on every
    /// request event; 0 closes every connection after its response.
    pub max_idle_connections: usize,
    /// An HTTP client must send its request headers (and a TLS client finish its
    /// handshake) within this many seconds.
    pub header_read_timeout_secs: f64,
    /// HTTP/2 keepalive: a PING after this many idle seconds, the connection closed
    /// when the answer takes longer than `keepalive_timeout_secs`.
    pub keepalive_interval_secs: f64,
    pub keepalive_timeout_secs: f64,
    /// Largest gRPC request other than `UpdateWeights` (a `Generate` of token ids).
    pub max_request_bytes: usize,
    /// On shutdown, open streams get this long to finish before they are cut.
    pub shutdown_timeout_secs: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: "0.0.0.0:50051".parse().expect("a valid address"),
            http_addr: "0.0.0.0:8000".parse().expect("a valid address"),
            data_port: 0,
            open_health_and_metrics: true,
            ssl_certfile: None,
            ssl_keyfile: None,
            ssl_ca_certs: None,
            max_connections: 1024,
            max_idle_connections: 16,
            header_read_timeout_secs: 10.0,
            keepalive_interval_secs: 30.0,
            keepalive_timeout_secs: 20.0,
            max_request_bytes: 4 << 20,
            shutdown_timeout_secs: 10.0,
        }
    }
}

impl ServerConfig {
    /// Checks that need no files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc_addr == self.http_addr && self.grpc_addr.port() != 0 {
            return Err(err(
                "server.http_addr",
                format!(
                    "equals server.grpc_addr ({}); use two ports",
                    self.grpc_addr
                ),
            ));
        }
        if self.data_port != 0
            && [self.grpc_addr.port(), self.http_addr.port()].contains(&self.data_port)
        {
            return Err(err(
                "server.data_port",
                format!(
                    "{} is also the gRPC or HTTP port; use a port of its own (or 0: any free one)",
                    self.data_port
                ),
            ));
        }
        if self.ssl_certfile.is_some() != self.ssl_keyfile.is_some() {
            return Err(err(
                "server.ssl_keyfile",
                "ssl_certfile and ssl_keyfile must be given together",
            ));
        }
        if self.ssl_ca_certs.is_some() && self.ssl_certfile.is_none() {
            return Err(err(
                "server.ssl_ca_certs",
                "mutual TLS needs ssl_certfile and ssl_keyfile too",
            ));
        }
        if self.max_connections == 0 {
            return Err(err("server.max_connections", "must be >= 1"));
        }
        if self.max_request_bytes < 1024 {
            return Err(err("server.max_request_bytes", "must be >= 1024"));
        }
        for (field, v) in [
            (
                "server.header_read_timeout_secs",
                self.header_read_timeout_secs,
            ),
            (
                "server.keepalive_interval_secs",
                self.keepalive_interval_secs,
            ),
            ("server.keepalive_timeout_secs", self.keepalive_timeout_secs),
            ("server.shutdown_timeout_secs", self.shutdown_timeout_secs),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                return Err(err(
                    field,
                    format!("must be seconds in (0, 86400], got {v}"),
                ));
            }
        }
        Ok(())
    }

    /// Whether either front end listens beyond the loopback interface.
    pub fn is_exposed(&self) -> bool {
        !(self.grpc_addr.ip().is_loopback() && self.http_addr.ip().is_loopback())
    }
}

fn default_device() -> String {
    "auto".into()
}

/// A configuration value out of range; the message names the field and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("invalid worker config: {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

impl WorkerConfig {
    /// A config serving `model` with every other field at its default.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        WorkerConfig {
            model: model.into(),
            served_model_name: None,
            device: default_device(),
            dtype: None,
            engine: EngineConfig::default(),
            server: ServerConfig::default(),
        }
    }

    /// Cross-field checks that need no model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        model::parse_device(&self.device).map_err(|_| {
            err(
                "device",
                format!("{:?}: use cpu, cuda, cuda:N or auto", self.device),
            )
        })?;
        if let Some(d) = &self.dtype {
            if model::config::parse_dtype(d).is_none() {
                return Err(err(
                    "dtype",
                    format!("{d:?}: use float32, bfloat16 or float16"),
                ));
            }
        }
        if self.served_model_name.as_deref() == Some("") {
            return Err(err("served_model_name", "must not be empty"));
        }
        self.engine.validate()?;
        self.server.validate()
    }

    /// The name served to clients.
    pub fn model_name(&self) -> String {
        self.served_model_name.clone().unwrap_or_else(|| {
            self.model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.model.display().to_string())
        })
    }
}

/// Limits of a running engine: [`EngineConfig`] resolved against the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    pub max_num_seqs: usize,
    pub max_waiting_seqs: usize,
    pub max_n: usize,
    pub max_model_len: usize,
    pub max_top_logprobs: usize,
    pub max_response_tokens: u64,
    /// KV-cache budget in token positions (`num_blocks * block_size`).
    pub kv_cache_tokens: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    pub share_group_prompts: bool,
    pub progress_interval: Option<std::time::Duration>,
    pub step_delay: std::time::Duration,
    /// Bytes one cached position takes: keys and values of every layer.
    pub kv_bytes_per_token: usize,
}

impl EngineConfig {
    /// Checks that need no model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_num_seqs == 0 {
            return Err(err("engine.max_num_seqs", "must be >= 1"));
        }
        if self.max_n == 0 {
            return Err(err("engine.max_n", "must be >= 1"));
        }
        if self.max_model_len == Some(0) {
            return Err(err(
                "engine.max_model_len",
                "must be >= 2 (a prompt token and one generated)",
            ));
        }
        if self.kv_cache_bytes == 0 {
            return Err(err("engine.kv_cache_bytes", "must be > 0"));
        }
        if self.max_response_tokens == 0 {
            return Err(err("engine.max_response_tokens", "must be >= 1"));
        }
        if let Some(f) = self.kv_cache_memory_fraction {
            if !(f > 0.0 && f <= 1.0) {
                return Err(err(
                    "engine.kv_cache_memory_fraction",
                    format!("must be in (0, 1], got {f}"),
                ));
            }
        }
        if self.block_size == 0 || self.block_size > 1024 {
            return Err(err(
                "engine.block_size",
                format!("must be in [1, 1024], got {}", self.block_size),
            ));
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(err(
                "engine.max_num_batched_tokens",
                format!(
                    "{} is below max_num_seqs = {}: every running sequence needs a token per step",
                    self.max_num_batched_tokens, self.max_num_seqs
                ),
            ));
        }
        if !(self.progress_interval_secs.is_finite() && self.progress_interval_secs >= 0.0) {
            return Err(err(
                "engine.progress_interval_secs",
                "must be >= 0 (0 disables)",
            ));
        }
        Ok(())
    }

    /// The limits for `model` whose weights are `elt_size` bytes per element.
    pub fn resolve(
        &self,
        model: &ModelConfig,
        elt_size: usize,
    ) -> Result<EngineLimits, ConfigError> {
        self.validate()?;
        let ctx = model.max_position_embeddings.max(0) as usize;
        let max_model_len = self.max_model_len.unwrap_or(ctx);
        if max_model_len < 2 || max_model_len > ctx {
            return Err(err(
                "engine.max_model_len",
                format!(
                    "{max_model_len} must be in [2, {ctx}] (the model's max_position_embeddings)"
                ),
            ));
        }
        let kv_bytes_per_token = 2
            * model.num_hidden_layers
            * (model.num_key_value_heads * model.head_dim).max(1) as usize
            * elt_size;
        let budget = match self.kv_cache_memory_fraction {
            None => self.kv_cache_bytes,
            Some(f) => {
                (available_memory().ok_or_else(|| {
                    err(
                        "engine.kv_cache_memory_fraction",
                        "MemAvailable is not readable from /proc/meminfo; give kv_cache_bytes",
                    )
                })? as f64
                    * f) as u64
            }
        };
        let bs = self.block_size;
        let block_bytes = (kv_bytes_per_token * bs) as u64;
        let blocks_per_seq = max_model_len.div_ceil(bs);
        // More than every row at max_model_len can never be used.
        let num_blocks = ((budget / block_bytes) as usize).min(blocks_per_seq * self.max_num_seqs);
        if num_blocks < blocks_per_seq {
            return Err(err(
                "engine.kv_cache_bytes",
                format!(
                    "{budget} bytes hold {} tokens ({kv_bytes_per_token} bytes each, in blocks of {bs}); at least max_model_len = {max_model_len} are needed, i.e. {} bytes",
                    (budget / block_bytes) as usize * bs,
                    blocks_per_seq as u64 * block_bytes
                ),
            ));
        }
        let kv_cache_tokens = num_blocks * bs;
        Ok(EngineLimits {
            max_num_seqs: self.max_num_seqs,
            max_waiting_seqs: self.max_waiting_seqs,
            max_n: self.max_n,
            max_model_len,
            max_top_logprobs: self.max_top_logprobs,
            max_response_tokens: self.max_response_tokens,
            kv_cache_tokens,
            kv_bytes_per_token,
            num_blocks,
            block_size: bs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_prefix_caching: self.enable_prefix_caching,
            share_group_prompts: self.share_group_prompts,
            progress_interval: (self.progress_interval_secs > 0.0)
                .then(|| std::time::Duration::from_secs_f64(self.progress_interval_secs)),
            step_delay: std::time::Duration::from_millis(self.step_delay_ms),
        })
    }
}

/// MemAvailable of /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_rejected_and_defaults_fill_in() {
        let c: WorkerConfig =
            toml::from_str("model = \"/m\"\n[engine]\nmax_num_seqs = 8\n").unwrap();
        assert_eq!(c.engine.max_num_seqs, 8);
        assert_eq!(c.engine.max_n, EngineConfig::default().max_n);
        assert_eq!(c.device, "auto");
        let e =
            toml::from_str::<WorkerConfig>("model = \"/m\"\n[engine]\nmax_seqs = 8\n").unwrap_err();
        assert!(e.to_string().contains("max_seqs"), "{e}");
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = WorkerConfig::new("/m");
        c.engine.max_num_seqs = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("engine.max_num_seqs"));
        let mut c = WorkerConfig::new("/m");
        c.dtype = Some("int8".into());
        assert!(c.validate().unwrap_err().to_string().contains("dtype"));
        let mut c = WorkerConfig::new("/m");
        c.device = "tpu".into();
        assert!(c.validate().unwrap_err().to_string().contains("device"));
        let mut c = WorkerConfig::new("/m");
        c.server.http_addr = c.server.grpc_addr;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("server.http_addr"));
        assert_eq!(WorkerConfig::new("/a/qwen").model_name(), "qwen");
    }
}
