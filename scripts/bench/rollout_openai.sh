#!/usr/bin/env bash
# Short completions through the OpenAI API (see scripts/bench/rollout_openai.py): starts
# `rollout-worker serve` on the tiny fixture (loopback, port 0, one thread), then runs the
# real `openai` client against it and transformers' `generate` in the same run.
#
#   bash scripts/bench/rollout_openai.sh              # 64 and 256 sequences
#   BENCH_SEQS=64 bash scripts/bench/rollout_openai.sh
#   BENCH_PROFILE=dev bash scripts/bench/rollout_openai.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
model=fixtures/generated/qwen2-tiny
# BENCH_PROFILE=dev builds and runs the dev profile (no release build on this machine).
profile=${BENCH_PROFILE:-release}
cargo build -p rollout-worker --bin rollout-worker --profile "$profile"
dir=$profile
[ "$profile" = dev ] && dir=debug
bin=${CARGO_TARGET_DIR:-target}/$dir/rollout-worker
log=$(mktemp)
"$bin" serve --model "$model" --served-model-name qwen2-tiny --dtype float32 \
    --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --max-num-seqs 256 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 600); do
    grep -q "^serving" "$log" && break
    kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
http=$(sed -n 's/^serving .* and \(http:\/\/[^ ]*\).*/\1/p' "$log")
[ -n "$http" ] || { cat "$log"; exit 1; }
.venv/bin/python scripts/bench/rollout_openai.py "$http/v1" "$model" "${BENCH_SEQS:-64,256}" "$pid"
