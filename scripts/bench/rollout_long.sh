#!/usr/bin/env bash
# Long-completion benchmark of the rollout engine against transformers' `generate`, one
# run, one thread each (see rollout-worker/benches/long_completions.rs for the
# workloads). Prints tokens/s of both, the ratio, the share of the memory-bandwidth
# roofline, throughput at the longest length over the shortest, and the prefix-sharing
# figures.
#
#   bash scripts/bench/rollout_long.sh                 # 256, 1024, 2048 new tokens
#   BENCH_LENGTHS=256,1024 bash scripts/bench/rollout_long.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export BENCH_LENGTHS=${BENCH_LENGTHS:-256,1024,2048}
# BENCH_CARGO_FLAGS adds cargo flags (e.g. --profile dev on a machine without a release build).
cargo bench -p rollout-worker --bench long_completions ${BENCH_CARGO_FLAGS:-}
out=target/bench-models
.venv/bin/python scripts/bench/rollout_hf_long_ratio.py "$out" \
    "$(.venv/bin/python scripts/bench/rollout_long_hf.py "$out")"
