//! The measuring half of `scripts/gpu-check.sh` (a check and benchmark, not a test): each
//! subcommand runs one section on a device and prints one JSON object on stdout, which
//! the script collects into its report. `--device cpu` with small sizes is the script's
//! CPU dry run, so every section's plumbing is exercised on a machine without a GPU.
//!
//!   env          libtorch sees CUDA (libtorch_cuda mapped into the process), devices
//!   collectives  NCCL at world size 1 against the CPU ring on the same inputs, bitwise
//!   parity       forward + backward of every fixture on the device against CPU fp32
//!   decode       a worker process on the device: decode and prefill tokens/s against
//!                context length, mixed-length batches, over gRPC
//!   train        a random Qwen2 (0.5B shape) training step in bf16 with gradient
//!                checkpointing through the ZeRO engine: tokens/s and MFU
//!   push         the trainer's weight push from device tensors to a worker process on
//!                the device: GB/s
//!
//!     cargo run --release -p trainer --example gpu_check -- parity --device cuda
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use model::{ForwardInput, ModelConfig, Transformer, Weights};
use proto::v1 as pb;
use proto::v1::rollout_service_client::RolloutServiceClient;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use trainer::dist::{self, Backend, Communicator, DistConfig, ReduceOp, RendezvousEnv};
use trainer::rollout::{RolloutClient, RolloutConfig};
use trainer::zero::{LossOutput, MicroBatch, OptimConfig, ZeroConfig, ZeroEngine, ZeroStage};

/// H200 SXM dense bf16 tensor-core peak (NVIDIA's datasheet: 1,979 TFLOP/s with
/// sparsity, half of it dense).
const H200_BF16_PEAK_FLOPS: f64 = 989.4e12;

#[derive(Parser)]
struct Args {
    /// `cuda`, `cuda:N` or `cpu` (the dry run).
    #[arg(long, default_value = "cuda", global = true)]
    device: String,
    #[command(subcommand)]
    section: Section,
}

#[derive(Subcommand)]
enum Section {
    Env,
    Collectives {
        #[arg(long, default_value_t = 1 << 20)]
        numel: i64,
    },
    Parity {
        /// Directory whose subdirectories (and `zoo/*`) are fixture checkpoints.
        #[arg(long, default_value = "fixtures/generated")]
        fixtures: PathBuf,
    },
    Decode {
        #[arg(long)]
        worker_bin: PathBuf,
        /// Model shape: `0.5b` (Qwen2.5-0.5B) or `tiny` (the dry run's).
        #[arg(long, default_value = "0.5b")]
        shape: String,
        /// Context lengths to measure; each batch mixes prompts of L/2 to L tokens.
        #[arg(long, value_delimiter = ',', default_value = "256,1024,2048,4096,8192")]
        contexts: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        num_seqs: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long, default_value = "target/gpu-check/models")]
        work: PathBuf,
    },
    Train {
        #[arg(long, default_value = "0.5b")]
        shape: String,
        #[arg(long, default_value_t = 8)]
        batch: i64,
        #[arg(long, default_value_t = 2048)]
        seq_len: i64,
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
    Push {
        #[arg(long)]
        worker_bin: PathBuf,
        #[arg(long, default_value = "0.5b")]
        shape: String,
        /// `float32` or `bfloat16` on the wire (the trainer's `rollout.weight_dtype`).
        #[arg(long, default_value = "bfloat16")]
        wire_dtype: String,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value = "target/gpu-check/models")]
        work: PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    let out = model::parse_device(&args.device)
        .map_err(anyhow::Error::from)
        .and_then(|device| run(&args.section, device));
    match out {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            std::process::exit(1);
        }
    }
}

fn run(section: &Section, device: Device) -> Result<Value> {
    if let Device::Cuda(i) = device {
        ensure!(
            tch::Cuda::is_available() && (i as i64) < tch::Cuda::device_count(),
            "libtorch sees {} CUDA device(s); cuda:{i} is not one of them",
            tch::Cuda::device_count()
        );
    }
    match section {
        Section::Env => Ok(env_report(device)),
        Section::Collectives { numel } => collectives(device, *numel),
        Section::Parity { fixtures } => parity(device, fixtures),
        Section::Decode {
            worker_bin,
            shape,
            contexts,
            num_seqs,
            new_tokens,
            work,
        } => decode(
            device,
            worker_bin,
            &shape_config(
                shape,
                contexts.iter().max().copied().unwrap_or(256) + new_tokens,
            )?,
            contexts,
            *num_seqs,
            *new_tokens,
            &work.join(format!("decode-{shape}")),
        ),
        Section::Train {
            shape,
            batch,
            seq_len,
            steps,
        } => train(
            device,
            &shape_config(shape, *seq_len as usize)?,
            *batch,
            *seq_len,
            *steps,
        ),
        Section::Push {
            worker_bin,
            shape,
            wire_dtype,
            repeats,
            work,
        } => push(
            device,
            worker_bin,
            &shape_config(shape, 1024)?,
            wire_dtype,
            *repeats,
            &work.join(format!("push-{shape}")),
        ),
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Qwen2.5-0.5B's shape (494M parameters, tied) or a ~3M-parameter one for the dry run.
fn shape_config(shape: &str, positions: usize) -> Result<ModelConfig> {
    let (v, h, l, heads, kv, i) = match shape {
        "0.5b" => (151_936, 896, 24, 14, 2, 4864),
        "tiny" => (4096, 128, 4, 4, 2, 512),
        other => bail!("unknown shape {other:?}; use 0.5b or tiny"),
    };
    let raw = json!({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": v, "hidden_size": h, "num_hidden_layers": l,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": i,
        "max_position_embeddings": positions.next_power_of_two().max(1024),
        "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    });
    Ok(ModelConfig::from_json(raw, Path::new(shape))?)
}

fn env_report(device: Device) -> Value {
    // libtorch_cuda has no symbol we call; it is mapped only if the link kept it.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mapped = |lib: &str| maps.lines().any(|l| l.contains(lib));
    json!({
        // The dry run on the CPU needs no CUDA.
        "ok": !device.is_cuda() || tch::Cuda::is_available(),
        "cuda_available": tch::Cuda::is_available(),
        "device_count": tch::Cuda::device_count(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "libtorch_cuda_mapped": mapped("libtorch_cuda.so"),
        "libtorch_cpu_mapped": mapped("libtorch_cpu.so"),
        "torch_threads": tch::get_num_threads(),
        "nccl_probe": match dist::nccl::probe(0) {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        },
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The collectives of one rank on `device` with backend `backend`; world size 1.
fn connect_one(backend: Backend, device: Device) -> Result<Box<dyn Communicator>> {
    let cfg = DistConfig {
        backend,
        timeout_secs: 60,
        ..DistConfig::default()
    };
    Ok(dist::connect(
        &cfg,
        &RendezvousEnv::loopback(0, 1, free_port()?),
        device,
    )?)
}

/// Every collective of `comm` on the same seeded inputs, results moved to the CPU.
fn run_collectives(comm: &mut dyn Communicator, device: Device, n: i64) -> Result<Vec<Tensor>> {
    tch::manual_seed(7);
    let base = Tensor::randn([n], (Kind::Float, Device::Cpu));
    let ints = Tensor::randint(1 << 20, [n], (Kind::Int64, Device::Cpu));
    let mut out = vec![];
    for (kind, op) in [
        (Kind::Float, ReduceOp::Sum),
        (Kind::BFloat16, ReduceOp::Sum),
        (Kind::Float, ReduceOp::Max),
    ] {
        let mut x = base.to_kind(kind).to_device(device);
        comm.all_reduce(&mut x, op)?;
        out.push(x.to_device(Device::Cpu));
    }
    let x = ints.to_device(device);
    out.push(
        comm.reduce_scatter(&x, ReduceOp::Sum)?
            .to_device(Device::Cpu),
    );
    let x = base.to_kind(Kind::BFloat16).to_device(device);
    out.push(comm.all_gather(&x, n as usize)?.to_device(Device::Cpu));
    let mut x = ints.to_device(device);
    comm.broadcast(&mut x, 0)?;
    out.push(x.to_device(Device::Cpu));
    comm.barrier()?;
    Ok(out)
}

fn collectives(device: Device, n: i64) -> Result<Value> {
    // On CUDA the device side is NCCL; in the dry run the single-rank backend.
    let backend = if device.is_cuda() {
        Backend::Nccl
    } else {
        Backend::Single
    };
    let mut comm = connect_one(backend, device)?;
    let name = comm.backend().to_string();
    let t = Instant::now();
    let got = run_collectives(comm.as_mut(), device, n)?;
    sync(device);
    let secs = t.elapsed().as_secs_f64();
    let mut ring = connect_one(Backend::Ring, Device::Cpu)?;
    let want = run_collectives(ring.as_mut(), Device::Cpu, n)?;
    let names = [
        "all_reduce_sum_f32",
        "all_reduce_sum_bf16",
        "all_reduce_max_f32",
        "reduce_scatter_sum_i64",
        "all_gather_bf16",
        "broadcast_i64",
    ];
    let mut equal = serde_json::Map::new();
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        equal.insert(name.to_string(), json!(g.equal(w)));
    }
    let ok = equal.values().all(|v| v == &json!(true));
    Ok(json!({
        "ok": ok, "backend": name, "reference": "ring (CPU), world size 1",
        "numel": n, "bitwise_equal": equal, "seconds": secs,
    }))
}

fn fixture_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![];
    for parent in [root.to_path_buf(), root.join("zoo")] {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries {
            let p = e?.path();
            if p.join("config.json").exists() && p.file_name().is_some_and(|n| n != "tokenizer") {
                dirs.push(p);
            }
        }
    }
    dirs.sort();
    ensure!(
        !dirs.is_empty(),
        "no fixture checkpoints under {} (run scripts/prepare.sh)",
        root.display()
    );
    Ok(dirs)
}

/// Logits `[B, T, V]` (f32, CPU) and the gradient of every parameter (f32, CPU) of the
/// masked next-token log-likelihood, for `dir` loaded on `device` in `kind`.
fn forward_backward(
    dir: &Path,
    device: Device,
    kind: Kind,
    ids: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Vec<(String, Tensor)>)> {
    let mut m = Transformer::from_pretrained(dir, device, Some(kind))?;
    m.weights.set_requires_grad(true);
    let (ids, mask) = (ids.to_device(device), mask.to_device(device));
    let logits = m.forward(&ForwardInput::new(&ids).with_mask(&mask), None)?;
    let t = ids.size()[1];
    let logp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
    let picked = logp
        .gather(-1, &ids.narrow(1, 1, t - 1).unsqueeze(-1), false)
        .squeeze_dim(-1);
    let weight = mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    (picked * weight).sum(Kind::Float).backward();
    let grads = m
        .weights
        .named()
        .into_iter()
        .map(|(n, p)| (n, p.grad().to_kind(Kind::Float).to_device(Device::Cpu)))
        .collect();
    Ok((logits.to_kind(Kind::Float).to_device(Device::Cpu), grads))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn scale(a: &Tensor) -> f64 {
    a.abs().max().double_value(&[]).max(1.0)
}

/// Errors of one run against the CPU fp32 reference: logits max |diff| over valid
/// positions, and per parameter the gradient error (fp32: max |diff| / max(1, max |ref|);
/// bf16: relative L2 error), with the worst parameter's name.
struct Errors {
    logits: f64,
    worst_grad: f64,
    worst_param: String,
}

fn errors(
    (logits, grads): &(Tensor, Vec<(String, Tensor)>),
    (ref_logits, ref_grads): &(Tensor, Vec<(String, Tensor)>),
    valid: &Tensor,
    relative_l2: bool,
) -> Errors {
    // Padded positions attend to nothing real; compare only valid ones.
    let logits = max_abs(&(logits * valid), &(ref_logits * valid));
    let mut e = Errors {
        logits,
        worst_grad: 0.0,
        worst_param: String::new(),
    };
    for ((n, g), (_, r)) in grads.iter().zip(ref_grads) {
        let err = if relative_l2 {
            (g - r).norm().double_value(&[]) / r.norm().double_value(&[]).max(1e-12)
        } else {
            max_abs(g, r) / scale(r)
        };
        if err > e.worst_grad {
            e.worst_grad = err;
            e.worst_param = n.clone();
        }
    }
    e
}

/// fp32 on the device against CPU fp32: logits and each gradient max |diff| <= 1e-4 x
/// max(1, max |reference|). bf16 rounds weights and activations to 8 mantissa bits, so
/// its error grows with depth; the device's bf16 run must be within twice the CPU's own
/// bf16 error (both against CPU fp32), and never further than 5e-2 x max(1, max |logit|)
/// for logits or 5e-2 relative L2 for a gradient when the CPU's error is smaller.
fn parity(device: Device, fixtures: &Path) -> Result<Value> {
    let mut rows = vec![];
    let mut ok = true;
    for dir in fixture_dirs(fixtures)? {
        let cfg = ModelConfig::from_dir(&dir)?;
        tch::manual_seed(11);
        let ids = Tensor::randint(cfg.vocab_size, [3, 24], (Kind::Int64, Device::Cpu));
        // Mixed lengths: the second row is left-padded by 5, the third by 11.
        let mask = Tensor::ones([3, 24], (Kind::Int64, Device::Cpu));
        let _ = mask.get(1).narrow(0, 0, 5).fill_(0);
        let _ = mask.get(2).narrow(0, 0, 11).fill_(0);
        let valid = mask.unsqueeze(-1).to_kind(Kind::Float);
        let reference = forward_backward(&dir, Device::Cpu, Kind::Float, &ids, &mask)?;
        let cpu_bf16 = errors(
            &forward_backward(&dir, Device::Cpu, Kind::BFloat16, &ids, &mask)?,
            &reference,
            &valid,
            true,
        );
        let fp32 = errors(
            &forward_backward(&dir, device, Kind::Float, &ids, &mask)?,
            &reference,
            &valid,
            false,
        );
        let bf16 = errors(
            &forward_backward(&dir, device, Kind::BFloat16, &ids, &mask)?,
            &reference,
            &valid,
            true,
        );
        let fp32_tol = 1e-4 * scale(&reference.0);
        let bf16_logit_tol = (5e-2 * scale(&reference.0)).max(2.0 * cpu_bf16.logits);
        let bf16_grad_tol = 5e-2f64.max(2.0 * cpu_bf16.worst_grad);
        let fp32_ok = fp32.logits <= fp32_tol && fp32.worst_grad <= 1e-4;
        let bf16_ok = bf16.logits <= bf16_logit_tol && bf16.worst_grad <= bf16_grad_tol;
        ok &= fp32_ok && bf16_ok;
        rows.push(json!({
            "fixture": dir.file_name().unwrap_or_default().to_string_lossy(),
            "fp32_ok": fp32_ok, "fp32_logits_max_abs_diff": fp32.logits,
            "fp32_logits_tolerance": fp32_tol, "fp32_worst_grad_error": fp32.worst_grad,
            "fp32_worst_grad_param": fp32.worst_param,
            "bf16_ok": bf16_ok, "bf16_logits_max_abs_diff": bf16.logits,
            "bf16_logits_tolerance": bf16_logit_tol, "bf16_worst_grad_error": bf16.worst_grad,
            "bf16_grad_tolerance": bf16_grad_tol, "bf16_worst_grad_param": bf16.worst_param,
            "cpu_bf16_logits_max_abs_diff": cpu_bf16.logits,
            "cpu_bf16_worst_grad_error": cpu_bf16.worst_grad,
        }));
    }
    Ok(json!({
        "ok": ok,
        "tolerances": "reference: CPU fp32. fp32: max|diff| <= 1e-4 * max(1, max|ref|) for logits \
                       and each gradient. bf16: logits max|diff| <= max(5e-2 * max(1, max|logit|), \
                       2 * CPU bf16's), each gradient's relative L2 error <= max(5e-2, 2 * CPU bf16's)",
        "fixtures": rows,
    }))
}

/// A random checkpoint of `cfg` in bf16 under `dir` (written once), with the fixtures'
/// tokenizer so the worker starts.
fn write_random_model(cfg: &ModelConfig, dir: &Path) -> Result<()> {
    if dir.join("config.json").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    tch::manual_seed(0);
    let w = Weights::random(cfg, Kind::Float, Device::Cpu);
    model::save_pretrained(
        dir,
        cfg,
        &w,
        Kind::BFloat16,
        model::checkpoint::DEFAULT_MAX_SHARD_BYTES,
    )?;
    let tokenizer = Path::new("fixtures/generated/qwen2-tiny");
    model::checkpoint::copy_auxiliary_files(tokenizer, dir)
        .with_context(|| format!("copying the tokenizer from {}", tokenizer.display()))?;
    Ok(())
}

/// A `rollout-worker serve` child process; killed on drop.
struct Worker {
    child: Child,
    url: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_worker(bin: &Path, dir: &Path, device: Device, extra: &[&str]) -> Result<Worker> {
    let port = free_port()?;
    let device = match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    let log = dir.join("worker.log");
    let child = Command::new(bin)
        .args(["serve", "--model"])
        .arg(dir)
        .args(["--device", &device, "--dtype", "bfloat16"])
        .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
        .args(["--http-addr", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(std::fs::File::create(dir.join("worker.err"))?))
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut w = Worker {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Some(status) = w.child.try_wait()? {
            let err = std::fs::read_to_string(dir.join("worker.err")).unwrap_or_default();
            bail!("worker exited with {status} before serving: {err}");
        }
        if std::fs::read_to_string(&log)?.contains("serving") {
            return Ok(w);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    w.child.kill()?;
    bail!("worker did not start serving within 300 s")
}

/// Generates one completion of `max_new` tokens (ignore_eos) for each prompt at once;
/// returns (generated tokens, seconds).
async fn generate_all(url: &str, prompts: &[Vec<i64>], max_new: usize) -> Result<(usize, f64)> {
    let start = Instant::now();
    let tasks: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (url, ids) = (url.to_string(), p.clone());
            tokio::spawn(async move {
                let req = pb::GenerateRequest {
                    prompts: vec![pb::Prompt {
                        id: String::new(),
                        input: Some(pb::prompt::Input::TokenIds(pb::TokenIds { ids })),
                    }],
                    n: 1,
                    sampling: Some(pb::SamplingParams {
                        temperature: Some(1.0),
                        max_new_tokens: max_new as u32,
                        ignore_eos: true,
                        seed: Some(i as u64),
                        ..Default::default()
                    }),
                    return_text: false,
                };
                let mut c = RolloutServiceClient::connect(url).await?;
                let mut s = c.generate(req).await?.into_inner();
                let mut n = 0;
                while let Some(g) = s.message().await? {
                    n += g
                        .completions
                        .iter()
                        .map(|c| c.token_ids.len())
                        .sum::<usize>();
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

/// Prompts of lengths spread evenly over `[ctx / 2, ctx]` (mixed lengths in one batch).
fn mixed_prompts(n: usize, ctx: usize, vocab: i64) -> Vec<Vec<i64>> {
    (0..n)
        .map(|i| {
            let len = ctx / 2 + (ctx / 2) * i / n.max(1);
            (0..len.max(1))
                .map(|t| ((i * 7919 + t * 104_729 + 3) as i64) % vocab)
                .collect()
        })
        .collect()
}

fn decode(
    device: Device,
    worker_bin: &Path,
    cfg: &ModelConfig,
    contexts: &[usize],
    num_seqs: usize,
    new_tokens: usize,
    dir: &Path,
) -> Result<Value> {
    write_random_model(cfg, dir)?;
    let max_len = contexts.iter().max().copied().unwrap_or(256) + new_tokens;
    let seqs = num_seqs.to_string();
    let max_len_s = max_len.to_string();
    // KV budget: every sequence at the longest context, bf16, with headroom.
    let kv = 2 * cfg.num_hidden_layers * (cfg.num_key_value_heads * cfg.head_dim * 2) as usize;
    let kv_bytes = ((kv * max_len * num_seqs) as f64 * 1.25) as u64;
    let kv_s = kv_bytes.to_string();
    let worker = start_worker(
        worker_bin,
        dir,
        device,
        &[
            "--max-num-seqs",
            &seqs,
            "--max-model-len",
            &max_len_s,
            "--kv-cache-bytes",
            &kv_s,
            "--max-n",
            "1",
        ],
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let vocab = cfg.vocab_size.min(4096);
    rt.block_on(generate_all(&worker.url, &mixed_prompts(4, 64, vocab), 8))?; // warm-up
    let mut rows = vec![];
    for &ctx in contexts {
        let prompts = mixed_prompts(num_seqs, ctx, vocab);
        let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
        // One new token: the time of the prefills (plus one sampled token each).
        let (_, prefill_s) = rt.block_on(generate_all(&worker.url, &prompts, 1))?;
        let (generated, total_s) = rt.block_on(generate_all(&worker.url, &prompts, new_tokens))?;
        let decode_s = (total_s - prefill_s).max(1e-9);
        let decoded = generated.saturating_sub(prompts.len());
        rows.push(json!({
            "context": ctx, "num_seqs": prompts.len(), "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "prefill_tokens_per_s": prompt_tokens as f64 / prefill_s,
            "decode_tokens_per_s": decoded as f64 / decode_s,
            "decode_step_ms": 1e3 * decode_s / (new_tokens.saturating_sub(1).max(1)) as f64,
            "seconds": total_s + prefill_s,
        }));
    }
    drop(worker);
    Ok(json!({
        "ok": true,
        "model": format!("qwen2 random, {} layers, hidden {}, bf16", cfg.num_hidden_layers, cfg.hidden_size),
        "method": "per context L: num_seqs prompts of L/2..L tokens in one batch; prefill = time \
                   of max_new_tokens=1; decode tokens/s = (generated - num_seqs) / (time at \
                   new_tokens - prefill time); sampled, ignore_eos, over gRPC on loopback",
        "rows": rows,
    }))
}

/// Model FLOPs per token of a training step (forward + backward, no recompute counted):
/// 6 x parameters in matmuls (all but the embedding lookup; the tied head counts) plus
/// 12 x layers x hidden x sequence length for attention scores and values (PaLM's formula).
fn flops_per_token(cfg: &ModelConfig, params: i64, seq_len: i64) -> f64 {
    6.0 * params as f64
        + 12.0 * (cfg.num_hidden_layers as i64 * cfg.hidden_size) as f64 * seq_len as f64
}

fn train(device: Device, cfg: &ModelConfig, b: i64, t: i64, steps: usize) -> Result<Value> {
    let comm = connect_one(Backend::Auto, device)?;
    tch::manual_seed(0);
    let weights = Weights::random(cfg, Kind::Float, Device::Cpu);
    let params = weights.num_params();
    let zero = ZeroConfig {
        stage: ZeroStage::Stage2,
        gradient_checkpointing: true,
        compute_dtype: "bfloat16".into(),
        overlap_comm: true,
    };
    let mut e = ZeroEngine::new(
        cfg.clone(),
        &weights,
        zero,
        OptimConfig::default(),
        (steps + 1) as u64,
        device,
        comm,
    )?;
    drop(weights);
    let ids = Tensor::randint(cfg.vocab_size, [b, t], (Kind::Int64, device));
    let step = |e: &mut ZeroEngine| -> Result<f64> {
        let mb = MicroBatch {
            input_ids: ids.shallow_clone(),
            attention_mask: None,
            position_ids: None,
            segment_ids: None,
        };
        e.forward_backward(&mb, |h, head| {
            let logp = h
                .narrow(1, 0, t - 1)
                .linear::<Tensor>(head, None)
                .log_softmax(-1, Kind::Float);
            let nll = -logp
                .gather(-1, &ids.narrow(1, 1, t - 1).unsqueeze(-1), false)
                .sum(Kind::Float);
            Ok(LossOutput {
                loss_sum: nll,
                count: b * (t - 1),
            })
        })?;
        Ok(e.step()?.loss)
    };
    step(&mut e)?; // warm-up: allocator, kernels
    sync(device);
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(&mut e)?;
    }
    sync(device);
    let secs = start.elapsed().as_secs_f64() / steps as f64;
    let tokens_per_s = (b * t) as f64 / secs;
    let achieved = tokens_per_s * flops_per_token(cfg, params, t);
    Ok(json!({
        "ok": loss.is_finite(),
        "params": params, "batch": b, "seq_len": t, "steps": steps,
        "dtype": "bfloat16 compute, f32 master + AdamW", "gradient_checkpointing": true,
        "step_seconds": secs, "tokens_per_s": tokens_per_s, "model_flops_per_s": achieved,
        "mfu_vs_989_tflops": achieved / H200_BF16_PEAK_FLOPS,
        "flops_formula": "6 * params + 12 * layers * hidden * seq_len per token (recompute not counted)",
        "final_loss": loss,
    }))
}

fn push(
    device: Device,
    worker_bin: &Path,
    cfg: &ModelConfig,
    wire_dtype: &str,
    repeats: usize,
    dir: &Path,
) -> Result<Value> {
    write_random_model(cfg, dir)?;
    let worker = start_worker(worker_bin, dir, device, &[])?;
    // The trainer's copy: f32 tensors on the device (what ZeRO's publish reads from).
    tch::manual_seed(1);
    let weights = Weights::random(cfg, Kind::Float, device);
    let named = weights.named();
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(RolloutClient::connect(RolloutConfig {
        workers: vec![worker.url.clone()],
        weight_dtype: wire_dtype.to_string(),
        ..RolloutConfig::default()
    }))?;
    let mut rows = vec![];
    for version in 1..=repeats.max(1) as u64 {
        sync(device);
        let start = Instant::now();
        let report = rt.block_on(async {
            let mut push = client.begin_push(version).await?;
            for (name, t) in &named {
                push.send(name, t).await?;
            }
            push.commit().await
        })?;
        let secs = start.elapsed().as_secs_f64();
        ensure!(
            report.failed.is_empty(),
            "push {version} failed: {:?}",
            report.failed
        );
        rows.push(json!({
            "version": version, "bytes": report.bytes, "seconds": secs,
            "gb_per_s": report.bytes as f64 / secs / 1e9,
        }));
    }
    drop(worker);
    let best = rows
        .iter()
        .filter_map(|r| r["gb_per_s"].as_f64())
        .fold(0.0, f64::max);
    Ok(json!({
        "ok": true, "params": weights.num_params(), "wire_dtype": wire_dtype,
        "path": "device tensors -> trainer push (gRPC UpdateWeights, loopback) -> worker process on the device",
        "best_gb_per_s": best, "pushes": rows,
    }))
}
