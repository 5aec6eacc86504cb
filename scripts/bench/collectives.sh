#!/usr/bin/env bash
# Collectives benchmark: the trainer's CPU ring and PyTorch gloo side by side, two
# ranks on loopback, f32 buffers of 1, 16 and 256 MiB (override with
# BENCH_SIZES_MIB=1,16), printed beside memcpy bandwidth, then the ring's latency at 8 B,
# 1 KiB and 16 KiB (BENCH_SMALL_BYTES=4,1024,16384). Not a test: numbers only.
#
#   scripts/bench/collectives.sh            # NPROC=2 by default
#
# Both sides get OMP_NUM_THREADS=1 per rank, torchrun's default for several ranks.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
nproc=${NPROC:-2}
port=${BENCH_PORT:-29650}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

cargo build --quiet --release -p trainer --example collectives_bench --manifest-path "$root/Cargo.toml"
target=$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
    | "$root/.venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

echo "== trainer ring (scripts/launch --nproc-per-node $nproc)"
"$root/scripts/launch" --nproc-per-node "$nproc" --master-port "$port" -- \
    "$target/release/examples/collectives_bench"
echo
echo "== PyTorch gloo (torchrun --nproc-per-node $nproc)"
"$root/.venv/bin/torchrun" --nproc-per-node "$nproc" --master-port "$((port + 10))" \
    "$root/scripts/bench/gloo_collectives.py" 2> >(grep -v '^W[0-9]' >&2)
