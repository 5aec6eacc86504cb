//! Collectives benchmark (not a test): algorithm and bus bandwidth of all_reduce,
//! reduce_scatter and all_gather on f32 buffers of 1, 16 and 256 MiB (`BENCH_SIZES_MIB`),
//! then their latency at 8 B, 1 KiB and 16 KiB (`BENCH_SMALL_BYTES`), printed by
//! rank 0 beside this machine's single-thread memcpy bandwidth. Run one process per
//! rank under a launcher; `scripts/bench/collectives.sh` does that, and
//! `scripts/bench/gloo_collectives.py` measures PyTorch gloo the same way.
//!
//! Definitions follow nccl-tests: `S` is the full buffer (all_reduce's tensor,
//! reduce_scatter's input, all_gather's output), `t` the slowest rank's mean time per
//! call, `algbw = S / t`, `busbw = algbw * 2(n-1)/n` for all_reduce and
//! `algbw * (n-1)/n` for the other two: the bytes each rank's link must carry.

use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};
use trainer::dist::{self, Communicator, DistConfig, ReduceOp, RendezvousEnv};

const MIB: usize = 1 << 20;

fn main() -> Result<()> {
    let env = RendezvousEnv::from_env().context("launcher environment")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let omp = std::env::var("OMP_NUM_THREADS").ok();
    tch::set_num_threads(
        dist::intra_op_threads(None, omp.as_deref(), cores, env.local_world_size) as i32,
    );
    let sizes_mib = sizes("BENCH_SIZES_MIB", "1,16,256")?;
    let small_bytes = sizes("BENCH_SMALL_BYTES", "4,1024,16384")?;
    let mut cfg = DistConfig::default();
    if let Ok(kib) = std::env::var("BENCH_CHUNK_KIB") {
        cfg.ring_chunk_bytes = kib.trim().parse::<usize>().context("BENCH_CHUNK_KIB")? * 1024;
    }
    let mut comm = dist::connect(&cfg, &env, Device::Cpu)?;
    let (n, rank) = (comm.world_size(), comm.rank());
    if rank == 0 {
        println!(
            "backend {}, {n} ranks, f32, chunk {} KiB; memcpy (1 thread, 256 MiB): {:.2} GB/s",
            comm.backend(),
            cfg.ring_chunk_bytes / 1024,
            memcpy_gbps(256 * MIB)
        );
        println!(
            "{:<15} {:>8} {:>10} {:>12} {:>12}",
            "collective", "size", "time ms", "algbw GB/s", "busbw GB/s"
        );
    }
    for name in ["all_reduce", "reduce_scatter", "all_gather"] {
        for &mib in &sizes_mib {
            let bytes = mib * MIB;
            let numel = bytes / 4;
            let iters = (512 / mib).clamp(3, 50);
            let secs = time_collective(comm.as_mut(), name, numel, iters)?;
            let algbw = bytes as f64 / secs / 1e9;
            let factor = if name == "all_reduce" { 2.0 } else { 1.0 } * (n - 1) as f64 / n as f64;
            if rank == 0 {
                println!(
                    "{name:<15} {:>5} MiB {:>10.2} {:>12.2} {:>12.2}",
                    mib,
                    secs * 1e3,
                    algbw,
                    algbw * factor
                );
            }
        }
    }
    // Latency: the small collectives of a training step (loss and token counts, grad
    // norm, a small model's units).
    if rank == 0 {
        println!("{:<15} {:>8} {:>10}", "collective", "bytes", "time us");
    }
    for name in ["all_reduce", "reduce_scatter", "all_gather"] {
        for &bytes in &small_bytes {
            let numel = (bytes / 4).max(n);
            let secs = time_collective(comm.as_mut(), name, numel, 2000)?;
            if rank == 0 {
                println!("{name:<15} {:>8} {:>10.1}", numel * 4, secs * 1e6);
            }
        }
    }
    Ok(())
}

/// A comma-separated list of sizes from the environment variable `var`.
fn sizes(var: &str, default: &str) -> Result<Vec<usize>> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().parse().context(var.to_string()))
        .collect()
}

/// Mean seconds per call over `iters` calls after one warm-up, slowest rank.
fn time_collective(
    comm: &mut dyn Communicator,
    name: &str,
    numel: usize,
    iters: usize,
) -> Result<f64> {
    let (n, rank) = (comm.world_size(), comm.rank());
    let layout = dist::ShardLayout::new(numel, n);
    // Preallocated outputs, as a training loop (and the gloo script) uses them.
    let mut full = Tensor::ones([numel as i64], (Kind::Float, Device::Cpu));
    let mut shard = Tensor::ones(
        [layout.range(rank).len() as i64],
        (Kind::Float, Device::Cpu),
    );
    let mut run = |comm: &mut dyn Communicator| -> Result<()> {
        match name {
            "all_reduce" => comm.all_reduce(&mut full, ReduceOp::Sum)?,
            "reduce_scatter" => comm.reduce_scatter_into(&full, &mut shard, ReduceOp::Sum)?,
            _ => comm.all_gather_into(&shard, &mut full)?,
        }
        Ok(())
    };
    run(comm)?;
    comm.barrier()?;
    let start = Instant::now();
    for _ in 0..iters {
        run(comm)?;
    }
    let mut secs = Tensor::from_slice(&[start.elapsed().as_secs_f32() / iters as f32]);
    comm.all_reduce(&mut secs, ReduceOp::Max)?;
    Ok(secs.double_value(&[0]))
}

/// Single-thread memcpy bandwidth in GB/s (bytes copied per second).
fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    (bytes * reps) as f64 / start.elapsed().as_secs_f64() / 1e9
}
