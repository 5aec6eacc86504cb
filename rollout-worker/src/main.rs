//! `rollout-worker` command line: `serve` (gRPC + HTTP) and `generate` (offline batch).
//!
//! `serve` builds a [`WorkerConfig`] from an optional TOML file, then environment
//! variables (`ROLLOUT_*`), then flags (each wins over the one before), validates it,
//! loads the model and runs [`rollout_worker::serve`] until Ctrl-C or SIGTERM.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use model::{parse_device, SamplingParams, Tokenizer, Transformer};
use model::{ChatMessage, ChatTemplateOptions};
use rollout_worker::{
    generate, ApiKey, EngineHandle, GenerateOptions, Metrics, ServeOptions, WorkerConfig,
};

#[derive(Parser)]
#[command(version, about = "Rollout worker of the GRPO trainer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve generations over gRPC (rollout.v1) and an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate completions of prompts with a Hugging Face checkpoint and print them.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML file with WorkerConfig fields (model, device, dtype, [engine], [server]).
    #[arg(long, env = "ROLLOUT_CONFIG")]
    config: Option<PathBuf>,
    /// Checkpoint directory, or a Hugging Face Hub id found in the local cache
    /// (HF_HUB_CACHE, HF_HOME); required here or in the file.
    #[arg(long, env = "ROLLOUT_MODEL")]
    model: Option<PathBuf>,
    #[arg(long, env = "ROLLOUT_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "ROLLOUT_DEVICE")]
    device: Option<String>,
    /// float32, bfloat16 or float16.
    #[arg(long, env = "ROLLOUT_DTYPE")]
    dtype: Option<String>,
    #[arg(long, env = "ROLLOUT_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    #[arg(long, env = "ROLLOUT_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Port of the weight data plane on the gRPC host (0: any free one, the default).
    #[arg(long, env = "ROLLOUT_DATA_PORT")]
    data_port: Option<u16>,
    #[arg(long, env = "ROLLOUT_MAX_NUM_SEQS")]
    max_num_seqs: Option<usize>,
    #[arg(long, env = "ROLLOUT_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<u64>,
    #[arg(long, env = "ROLLOUT_MAX_WAITING_SEQS")]
    max_waiting_seqs: Option<usize>,
    #[arg(long, env = "ROLLOUT_MAX_N")]
    max_n: Option<usize>,
    #[arg(long, env = "ROLLOUT_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    /// File holding the API key clients must send (`Authorization: Bearer`); or set
    /// ROLLOUT_API_KEY. There is deliberately no flag taking the key itself.
    #[arg(long, env = "ROLLOUT_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// PEM certificate chain: both front ends serve TLS (with --ssl-keyfile).
    #[arg(long, env = "ROLLOUT_SSL_CERTFILE")]
    ssl_certfile: Option<PathBuf>,
    #[arg(long, env = "ROLLOUT_SSL_KEYFILE")]
    ssl_keyfile: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate they signed (mutual TLS).
    #[arg(long, env = "ROLLOUT_SSL_CA_CERTS")]
    ssl_ca_certs: Option<PathBuf>,
}

/// The worker config and the API key (from ROLLOUT_API_KEY or --api-key-file).
fn worker_config(a: ServeArgs) -> anyhow::Result<(WorkerConfig, Option<ApiKey>)> {
    let env_key = std::env::var("ROLLOUT_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let key = ApiKey::from_sources(env_key.as_deref(), a.api_key_file.as_deref())?;
    let c = worker_settings(a)?;
    Ok((c, key))
}

fn worker_settings(a: ServeArgs) -> anyhow::Result<WorkerConfig> {
    let mut c = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<WorkerConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => {
            let model = a
                .model
                .clone()
                .context("--model (or ROLLOUT_MODEL, or `model` in --config) is required")?;
            WorkerConfig::new(model)
        }
    };
    if let Some(v) = a.model {
        c.model = v;
    }
    if a.served_model_name.is_some() {
        c.served_model_name = a.served_model_name;
    }
    if let Some(v) = a.device {
        c.device = v;
    }
    if a.dtype.is_some() {
        c.dtype = a.dtype;
    }
    if let Some(v) = a.grpc_addr {
        c.server.grpc_addr = v;
    }
    if let Some(v) = a.http_addr {
        c.server.http_addr = v;
    }
    if let Some(v) = a.data_port {
        c.server.data_port = v;
    }
    if a.ssl_certfile.is_some() {
        c.server.ssl_certfile = a.ssl_certfile;
    }
    if a.ssl_keyfile.is_some() {
        c.server.ssl_keyfile = a.ssl_keyfile;
    }
    if a.ssl_ca_certs.is_some() {
        c.server.ssl_ca_certs = a.ssl_ca_certs;
    }
    let e = &mut c.engine;
    if let Some(v) = a.max_num_seqs {
        e.max_num_seqs = v;
    }
    if let Some(v) = a.kv_cache_bytes {
        e.kv_cache_bytes = v;
    }
    if let Some(v) = a.max_waiting_seqs {
        e.max_waiting_seqs = v;
    }
    if let Some(v) = a.max_n {
        e.max_n = v;
    }
    if a.max_model_len.is_some() {
        e.max_model_len = a.max_model_len;
    }
    // A Hub id (`Qwen/Qwen3-0.6B`) serves the local cache's snapshot under its id, as vLLM
    // names it; nothing is downloaded.
    if !c.model.exists() && c.served_model_name.is_none() {
        c.served_model_name = Some(c.model.to_string_lossy().into_owned());
    }
    c.model = model::hub::resolve_model(&c.model, None).context("--model")?;
    c.validate()?;
    Ok(c)
}

fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let (config, key) = worker_config(a)?;
    let opts = ServeOptions::from_config(&config.server, key)?;
    let engine = EngineHandle::load(&config, Arc::new(Metrics::new(&config.model_name())))
        .with_context(|| format!("loading {}", config.model.display()))?;
    // Request validation (tokenizer, chat template) is CPU work on the blocking pool: a
    // thread per core, not tokio's default of up to 512, which a burst of requests
    // would spawn and leave contending for the cores with the engine thread.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(cores.max(2))
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(config.server.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC to {}", config.server.grpc_addr))?;
        let http = tokio::net::TcpListener::bind(config.server.http_addr)
            .await
            .with_context(|| format!("binding HTTP to {}", config.server.http_addr))?;
        let info = engine.info();
        tracing::info!(
            model = %info.name, device = %info.device, dtype = %info.dtype,
            grpc = %grpc.local_addr()?, http = %http.local_addr()?,
            "rollout worker serving"
        );
        let (g, h) = if opts.tls.is_some() {
            ("grpcs", "https")
        } else {
            ("grpc", "http")
        };
        println!(
            "serving {} on {g}://{} and {h}://{}{}",
            info.name,
            grpc.local_addr()?,
            http.local_addr()?,
            if opts.api_key.is_some() {
                " (API key required)"
            } else {
                ""
            }
        );
        rollout_worker::serve_with(grpc, http, engine, opts, shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json), or a Hub id in the
    /// local Hugging Face cache.
    #[arg(long)]
    model: PathBuf,
    /// A prompt; repeat for a batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Render each prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Keep generating past end-of-sequence tokens (exactly max_new_tokens each).
    #[arg(long)]
    ignore_eos: bool,
    /// Sequences decoded together (vLLM's max_num_seqs).
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// KV-cache budget in bytes (paged blocks).
    #[arg(long, default_value_t = 1 << 30)]
    kv_cache_bytes: u64,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    top_k: i64,
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// float32, bfloat16 or float16; the checkpoint's dtype by default.
    #[arg(long)]
    dtype: Option<String>,
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    let kind = match &a.dtype {
        Some(d) => Some(
            model::config::parse_dtype(d)
                .with_context(|| format!("--dtype {d:?}: use float32, bfloat16 or float16"))?,
        ),
        None => None,
    };
    let dir = model::hub::resolve_model(&a.model, None).context("--model")?;
    let tok = Tokenizer::from_dir(&dir)?;
    let model = Transformer::from_pretrained(&dir, device, kind)
        .with_context(|| format!("loading {}", dir.display()))?;
    let mut prompts = vec![];
    for p in &a.prompt {
        let ids = if a.chat {
            let opts = ChatTemplateOptions {
                add_generation_prompt: true,
                ..Default::default()
            };
            tok.encode_chat(&[ChatMessage::user(p.as_str())], &opts)?
        } else {
            tok.encode(p, true)?
        };
        prompts.push(ids.iter().map(|&x| x as i64).collect::<Vec<_>>());
    }
    let num_params = model.weights.num_params();
    let opts = GenerateOptions {
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
        },
        n: a.n,
        max_new_tokens: a.max_new_tokens,
        stop_token_ids: vec![],
        ignore_eos: a.ignore_eos,
        seed: a.seed,
        engine: rollout_worker::EngineConfig {
            max_num_seqs: a.max_num_seqs,
            kv_cache_bytes: a.kv_cache_bytes,
            max_num_batched_tokens: a.max_num_seqs.max(2048),
            ..Default::default()
        },
    };
    let start = std::time::Instant::now();
    let completions = generate(model, Tokenizer::from_dir(&a.model)?, &prompts, &opts)?;
    let secs = start.elapsed().as_secs_f64();
    let mut total = 0;
    for (i, c) in completions.iter().enumerate() {
        let ids: Vec<u32> = c.tokens.iter().map(|&x| x as u32).collect();
        let text = tok.decode(&ids, true)?;
        let mean_lp = c.logprobs.iter().sum::<f32>() / c.logprobs.len().max(1) as f32;
        println!(
            "[{i}] prompt: {:?}\n    completion ({} tokens, {:?}, mean log-prob {mean_lp:.3}): {text:?}",
            a.prompt[i / a.n],
            c.tokens.len(),
            c.finish_reason
        );
        total += c.tokens.len();
    }
    println!(
        "generated {total} tokens in {secs:.2}s ({:.1} tokens/s) on {device:?}, {num_params} parameters",
        total as f64 / secs,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let tuning = model::host_alloc::tune();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    tracing::debug!("host allocator: {tuning:?}");
    match Cli::parse().command {
        Command::Serve(a) => run_serve(a),
        Command::Generate(a) => run_generate(a),
    }
}
