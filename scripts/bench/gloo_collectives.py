"""PyTorch gloo on the same collectives, sizes and definitions as
trainer/examples/collectives_bench.rs, for a side-by-side comparison.

    .venv/bin/torchrun --nproc-per-node 2 scripts/bench/gloo_collectives.py

algbw = S / t with S the full buffer and t the slowest rank's mean time per call;
busbw = algbw * 2(n-1)/n for all_reduce and algbw * (n-1)/n for the other two.
"""

import os
import time

import torch
import torch.distributed as dist

MIB = 1 << 20


def memcpy_gbps(nbytes):
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return nbytes * reps / (time.perf_counter() - start) / 1e9


def time_collective(name, numel, iters):
    n, rank = dist.get_world_size(), dist.get_rank()
    shard_len = numel // n
    full = torch.ones(numel, dtype=torch.float32)
    shard = torch.ones(shard_len, dtype=torch.float32)

    def run():
        if name == "all_reduce":
            dist.all_reduce(full)
        elif name == "reduce_scatter":
            dist.reduce_scatter_tensor(shard, full)
        else:
            dist.all_gather_into_tensor(full, shard)

    run()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    secs = torch.tensor([(time.perf_counter() - start) / iters])
    dist.all_reduce(secs, op=dist.ReduceOp.MAX)
    return secs.item()


def main():
    dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    sizes = [int(s) for s in os.environ.get("BENCH_SIZES_MIB", "1,16,256").split(",")]
    if rank == 0:
        print(f"backend gloo, {n} ranks, f32, torch {torch.__version__}, "
              f"{torch.get_num_threads()} intra-op threads; memcpy (256 MiB): "
              f"{memcpy_gbps(256 * MIB):.2f} GB/s")
        print(f"{'collective':<15} {'size':>8} {'time ms':>10} {'algbw GB/s':>12} {'busbw GB/s':>12}")
    for name in ("all_reduce", "reduce_scatter", "all_gather"):
        for mib in sizes:
            nbytes = mib * MIB
            iters = min(max(512 // mib, 3), 50)
            try:
                secs = time_collective(name, nbytes // 4, iters)
            except RuntimeError as e:  # a collective gloo does not implement
                if rank == 0:
                    print(f"{name:<15} {mib:>5} MiB  unsupported by gloo: {str(e).splitlines()[0]}")
                continue
            algbw = nbytes / secs / 1e9
            factor = (2.0 if name == "all_reduce" else 1.0) * (n - 1) / n
            if rank == 0:
                print(f"{name:<15} {mib:>5} MiB {secs * 1e3:>10.2f} {algbw:>12.2f} {algbw * factor:>12.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
