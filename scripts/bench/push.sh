#!/usr/bin/env bash
# Weight-push throughput of the trainer's rollout client to in-process workers on
# loopback (trainer/examples/push_bench.rs), f32 and bf16 on the wire, 1/2/4 workers,
# over gRPC chunks, the TCP data plane with one stream per worker, and the data plane's
# chain, against one plain loopback TCP stream measured in the same run.
#
#   bash scripts/bench/push.sh                 # BENCH_WORKERS=1,2,4 BENCH_REPEAT=3
#   BENCH_TRANSPORTS=chain bash scripts/bench/push.sh
#   BENCH_CASES=f32,bf16 bash scripts/bench/push.sh   # f32, f32-bf16 (f32 policy, bf16 wire), bf16 (bf16 policy to bf16 workers)
#
# Built in the dev profile with opt-level 3 for the workspace's own crates
# (dependencies are at opt-level 2, as for the tests), so the build shares the test
# build's dependencies; BENCH_RELEASE=1 builds it in release instead.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
# The bench model is shaped after the generated fixtures.
[[ -f fixtures/generated/qwen2-tiny/config.json ]] || bash scripts/prepare.sh
if [[ "${BENCH_RELEASE:-0}" == 1 ]]; then
  exec cargo run -q --release -p trainer --example push_bench
fi
export CARGO_PROFILE_DEV_OPT_LEVEL=3
exec cargo run -q -p trainer --example push_bench
