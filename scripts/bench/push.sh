#!/usr/bin/env bash
# Weight-push throughput of the trainer's rollout client to in-process workers on
# loopback (trainer/examples/push_bench.rs), f32 and bf16 on the wire, 1/2/4 workers,
# against one plain loopback TCP stream measured in the same run.
#
#   bash scripts/bench/push.sh                 # BENCH_WORKERS=1,2,4 BENCH_REPEAT=3
#
# Built in the dev profile (dependencies at opt-level 2, as the tests): tonic, h2 and
# prost, where a push spends its time, are dependencies.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
exec cargo run -q -p trainer --example push_bench
