//! Helpers shared by the `dist` integration tests: worlds of threads or processes
//! over loopback, and the exhaustive collective check every rank runs.

#![allow(dead_code)]

use std::net::TcpListener;
use std::thread;

use tch::{Device, Kind, Tensor};
use trainer::dist::{
    self, Backend, Communicator, DistConfig, ReduceOp, RendezvousEnv, ShardLayout,
};

/// A port that was free a moment ago (bind to 0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two consecutive free ports (torchrun's agent store uses P, ours P + 1).
pub fn free_port_pair() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

pub fn ring_config(timeout_secs: u64, chunk: usize) -> DistConfig {
    DistConfig {
        backend: Backend::Ring,
        timeout_secs,
        ring_chunk_bytes: chunk,
    }
}

/// Runs `f` on every rank of a `world`-rank ring made of threads; returns each
/// rank's result in rank order.
pub fn run_world<R: Send>(
    world: usize,
    cfg: &DistConfig,
    f: impl Fn(&mut dyn Communicator) -> R + Sync,
) -> Vec<R> {
    run_world_on(world, cfg, Device::Cpu, f)
}

/// `run_world` for communicators meant for tensors on `device`.
pub fn run_world_on<R: Send>(
    world: usize,
    cfg: &DistConfig,
    device: Device,
    f: impl Fn(&mut dyn Communicator) -> R + Sync,
) -> Vec<R> {
    let port = free_port();
    thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let f = &f;
                s.spawn(move || {
                    let env = RendezvousEnv::loopback(r, world, port);
                    let mut comm = dist::connect(cfg, &env, device).unwrap();
                    f(comm.as_mut())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Deterministic small integers in [-8, 8] (splitmix64): sums of up to 4 ranks are
/// exact in bf16, f16, f32 and i64, so every result below is compared bit for bit.
pub fn ints(seed: u64, n: usize) -> Vec<i64> {
    (0..n as u64)
        .map(|i| {
            let mut z = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z % 17) as i64 - 8
        })
        .collect()
}

/// Rank `rank`'s input for test case `case`, on the CPU.
pub fn input(case: u64, rank: usize, n: usize, kind: Kind) -> Tensor {
    Tensor::from_slice(&ints(case * 1000 + rank as u64, n)).to_kind(kind)
}

pub const KINDS: [Kind; 4] = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Int64];
pub const LENS: [usize; 10] = [0, 1, 2, 3, 5, 7, 13, 64, 1001, 4099];

fn same(what: &str, got: &Tensor, want: &Tensor) -> Result<(), String> {
    let got = &got.to_device(Device::Cpu);
    if got.size() == want.size() && got.kind() == want.kind() && got.equal(want) {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?} want {want:?}"))
    }
}

/// Every collective, every dtype, every length in `LENS` (plus `extra_len`),
/// checked exactly against the result computed locally from all ranks' inputs.
/// Tensors are passed on `device`; results are compared on the CPU. Returns the
/// number of collectives checked.
pub fn check_all_collectives(
    comm: &mut dyn Communicator,
    extra_len: usize,
    device: Device,
) -> Result<usize, String> {
    let (rank, w) = (comm.rank(), comm.world_size());
    let mut checked = 0;
    let mut case = 0u64;
    for kind in KINDS {
        for &n in LENS.iter().chain([extra_len].iter()) {
            case += 1;
            let ctx = |what: &str| format!("{what} {kind:?} len {n} world {w} rank {rank}");
            let inputs: Vec<Tensor> = (0..w).map(|r| input(case, r, n, kind)).collect();
            let stacked = Tensor::stack(&inputs, 0);
            // Integer sums are exact, so summing in f64 then casting is the exact sum.
            let sum = stacked
                .to_kind(Kind::Double)
                .sum_dim_intlist(0, false, Kind::Double)
                .to_kind(kind);
            let max = stacked.amax(0, false);
            let layout = ShardLayout::new(n, w);
            let range = layout.range(rank);
            let narrow = |t: &Tensor| t.narrow(0, range.start as i64, range.len() as i64);

            let mut ops = vec![(ReduceOp::Sum, sum.shallow_clone()), (ReduceOp::Max, max)];
            if kind != Kind::Int64 {
                ops.push((ReduceOp::Avg, sum.f_div_scalar(w as f64).unwrap()));
            }
            for (op, want) in &ops {
                let mut x = inputs[rank].to_device(device).copy();
                comm.all_reduce(&mut x, *op)
                    .map_err(|e| format!("{}: {e}", ctx("all_reduce")))?;
                same(&ctx(&format!("all_reduce {op}")), &x, want)?;
                let mine = inputs[rank].to_device(device).copy();
                let before = mine.copy();
                let shard = comm
                    .reduce_scatter(&mine, *op)
                    .map_err(|e| format!("{}: {e}", ctx("reduce_scatter")))?;
                same(&ctx(&format!("reduce_scatter {op}")), &shard, &narrow(want))?;
                same(
                    &ctx("reduce_scatter leaves its input alone"),
                    &mine,
                    &before,
                )?;
                let mut out = Tensor::zeros([range.len() as i64], (kind, device));
                comm.reduce_scatter_into(&mine, &mut out, *op)
                    .map_err(|e| format!("{}: {e}", ctx("reduce_scatter_into")))?;
                same(
                    &ctx(&format!("reduce_scatter_into {op}")),
                    &out,
                    &narrow(want),
                )?;
                checked += 3;
            }
            let full = input(case, 99, n, kind);
            let gathered = comm
                .all_gather(&narrow(&full).to_device(device), n)
                .map_err(|e| format!("{}: {e}", ctx("all_gather")))?;
            same(&ctx("all_gather"), &gathered, &full)?;
            // Into a caller-owned [n, 1] buffer that holds stale values.
            let mut out = Tensor::full([n as i64, 1], 5, (kind, device));
            comm.all_gather_into(&narrow(&full).to_device(device), &mut out)
                .map_err(|e| format!("{}: {e}", ctx("all_gather_into")))?;
            same(&ctx("all_gather_into"), &out, &full.view([n as i64, 1]))?;

            let root = (case as usize) % w;
            let mut x = inputs[rank].to_device(device).copy();
            comm.broadcast(&mut x, root)
                .map_err(|e| format!("{}: {e}", ctx("broadcast")))?;
            same(&ctx("broadcast"), &x, &inputs[root])?;
            comm.barrier()
                .map_err(|e| format!("{}: {e}", ctx("barrier")))?;
            checked += 4;
        }
    }
    // Non-contiguous and multi-dimensional tensors go through a contiguous copy.
    let base: Vec<Tensor> = (0..w)
        .map(|r| input(777, r, 21, Kind::Float).view([7, 3]))
        .collect();
    let mut x = base[rank].to_device(device).copy().transpose(0, 1);
    comm.all_reduce(&mut x, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    let want = Tensor::stack(&base, 0)
        .sum_dim_intlist(0, false, Kind::Float)
        .transpose(0, 1);
    same("all_reduce of a transposed view", &x, &want)?;
    Ok(checked + 1)
}
