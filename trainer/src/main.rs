//! The trainer binary: a thin command-line layer over the `trainer` library.
//!
//! `trainer sft --config FILE` and `trainer grpo --config FILE` train; settings come from
//! the file, then `TRAINER__*` environment variables, then `--set key=value` flags (see
//! docs/configuration.md). Launch one process per rank with torchrun or scripts/launch.
//!
//! `trainer eval --config FILE` and `trainer generate --config FILE` run against
//! OpenAI-compatible servers (docs/evaluation.md).
//!
//! `trainer plot OUTPUT_DIR` draws a run's `metrics.jsonl` into `metrics.png`.
//!
//! `trainer dist-check` joins the job described by the launcher's environment
//! (torchrun or scripts/launch), runs each collective once on values whose result
//! is known exactly, and exits non-zero on any mismatch or communication error.

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};
use tch::{Device, Kind, Tensor};
use trainer::dist::{self, Backend, Communicator, DistConfig, ReduceOp};

#[derive(Parser)]
#[command(name = "trainer", about = "GRPO trainer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Supervised fine-tuning (NLL on completion tokens) on the ZeRO engine.
    Sft(TrainArgs),
    /// GRPO with rollouts from the configured workers.
    Grpo(TrainArgs),
    /// Rendezvous with the other ranks and verify every collective.
    DistCheck(DistCheckArgs),
    /// Score a MATH-500-style dataset against OpenAI-compatible servers (pass@1, pass@k).
    Eval(TrainArgs),
    /// Generate synthetic reasoning data through OpenAI-compatible servers.
    Generate(TrainArgs),
    /// Draw OUTPUT_DIR/metrics.jsonl into OUTPUT_DIR/metrics.png (done at the end of
    /// every run too).
    Plot {
        /// A run's output_dir.
        output_dir: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Configuration file (.toml, .yaml or .json).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Override one setting, e.g. `--set learning_rate=1e-5 --set zero.stage=3`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(clap::Args)]
struct DistCheckArgs {
    /// Communication backend.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
    /// Bound in seconds on every wait for another rank.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Elements per test tensor (odd by default so shards are uneven).
    #[arg(long, default_value_t = 100_003)]
    numel: usize,
    /// Intra-op threads; default: OMP_NUM_THREADS, else cores / ranks per host.
    #[arg(long)]
    num_threads: Option<usize>,
    /// Put the tensors on this rank's GPU (cuda:LOCAL_RANK).
    #[arg(long)]
    cuda: bool,
}

fn main() -> Result<()> {
    model::host_alloc::tune();
    match Cli::parse().command {
        Command::Sft(args) => {
            let loaded: trainer::config::Loaded<trainer::sft::SftConfig> =
                trainer::config::load(args.config.as_deref(), &args.sets)?;
            init_tracing(loaded.config.args.log_level);
            loaded.log_warnings();
            trainer::sft::run(&loaded.config)?;
            exit_after_sigterm(loaded.config.args.sigterm_exit_code)
        }
        Command::Grpo(args) => {
            let loaded: trainer::config::Loaded<trainer::grpo::GrpoConfig> =
                trainer::config::load(args.config.as_deref(), &args.sets)?;
            init_tracing(loaded.config.args.log_level);
            loaded.log_warnings();
            trainer::grpo::trainer::run(&loaded.config)?;
            exit_after_sigterm(loaded.config.args.sigterm_exit_code)
        }
        Command::DistCheck(args) => {
            init_tracing(trainer::config::LogLevel::Passive);
            dist_check(&args)
        }
        Command::Eval(args) => {
            init_tracing(trainer::config::LogLevel::Passive);
            let loaded: trainer::config::Loaded<trainer::inference::eval::EvalConfig> =
                trainer::config::load(args.config.as_deref(), &args.sets)?;
            trainer::inference::eval::run(&loaded.config)?;
            Ok(())
        }
        Command::Generate(args) => {
            init_tracing(trainer::config::LogLevel::Passive);
            let loaded: trainer::config::Loaded<trainer::inference::generate::GenerateConfig> =
                trainer::config::load(args.config.as_deref(), &args.sets)?;
            trainer::inference::generate::run(&loaded.config)?;
            Ok(())
        }
        Command::Plot { output_dir } => {
            let png = trainer::plot::plot_run(&output_dir)?;
            println!("{}", png.display());
            Ok(())
        }
    }
}

/// A run stopped by SIGTERM (at a checkpoint) exits with the configured status.
fn exit_after_sigterm(code: u8) -> Result<()> {
    if trainer::shutdown::stopped_by_signal() && code != 0 {
        std::process::exit(code.into());
    }
    Ok(())
}

/// Logs to stderr; `RUST_LOG` filters, else the recipe's `log_level` (default: warnings,
/// and info from the trainer).
fn init_tracing(level: trainer::config::LogLevel) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.filter()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    tracing::debug!("host allocator: {:?}", model::host_alloc::tune());
}

fn dist_check(args: &DistCheckArgs) -> Result<()> {
    let (env, threads) = trainer::session::join_environment(args.num_threads)?;
    let device = if args.cuda {
        Device::Cuda(env.local_rank)
    } else {
        Device::Cpu
    };
    let cfg = DistConfig {
        backend: args.backend,
        timeout_secs: args.timeout_secs,
        ..DistConfig::default()
    };
    let mut comm = dist::connect(&cfg, &env, device)
        .with_context(|| format!("rank {}: joining {} ranks", env.rank, env.world_size))?;
    check_collectives(comm.as_mut(), args.numel, device)
        .with_context(|| format!("rank {}: dist-check", env.rank))?;
    println!(
        "rank {}/{} (local {}/{}, restart {}): dist-check ok: backend {}, {} intra-op threads, \
         {} elements",
        env.rank,
        env.world_size,
        env.local_rank,
        env.local_world_size,
        env.restart_count,
        comm.backend(),
        threads,
        args.numel
    );
    Ok(())
}

/// Runs every collective on integer-valued data (exact in every dtype used) and
/// compares with the closed-form result.
fn check_collectives(comm: &mut dyn Communicator, n: usize, device: Device) -> Result<()> {
    let (rank, w) = (comm.rank() as i64, comm.world_size() as i64);
    let n64 = n as i64;
    let idx = Tensor::arange(n64, (Kind::Int64, device)).remainder(7);

    // all_reduce(sum), f32: sum over ranks of (i % 7 + rank).
    let mut x = (&idx + rank).to_kind(Kind::Float);
    comm.all_reduce(&mut x, ReduceOp::Sum)?;
    let want = (&idx * w + w * (w - 1) / 2).to_kind(Kind::Float);
    ensure!(
        x.equal(&want),
        "all_reduce(sum, f32) differs from the closed form"
    );

    // all_reduce(max), bf16.
    let mut x = (&idx * (rank + 1)).to_kind(Kind::BFloat16);
    comm.all_reduce(&mut x, ReduceOp::Max)?;
    ensure!(
        x.equal(&(&idx * w).to_kind(Kind::BFloat16)),
        "all_reduce(max, bf16) differs"
    );

    // reduce_scatter(sum), i64: this rank's shard of w * idx.
    let shard = comm.reduce_scatter(&idx, ReduceOp::Sum)?;
    let range = dist::ShardLayout::new(n, w as usize).range(rank as usize);
    let want = (&idx * w).narrow(0, range.start as i64, range.len() as i64);
    ensure!(shard.equal(&want), "reduce_scatter(sum, i64) differs");

    // all_gather, f16: the shards of idx reassemble idx.
    let mine = idx
        .narrow(0, range.start as i64, range.len() as i64)
        .to_kind(Kind::Half);
    let full = comm.all_gather(&mine, n)?;
    ensure!(
        full.equal(&idx.to_kind(Kind::Half)),
        "all_gather(f16) differs"
    );

    // broadcast from the last rank.
    let root = w - 1;
    let mut x = Tensor::full([3, 5], rank, (Kind::Int64, device));
    comm.broadcast(&mut x, root as usize)?;
    ensure!(
        x.equal(&Tensor::full([3, 5], root, (Kind::Int64, device))),
        "broadcast differs"
    );

    comm.barrier()?;
    Ok(())
}
