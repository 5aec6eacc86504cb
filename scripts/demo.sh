#!/usr/bin/env bash
# The main job, from a fresh clone: set up, build, and generate text with the tiny Qwen2
# fixture model (random weights and a tokenizer trained here, so expect gibberish: this
# shows the pipeline working end to end, not a trained model).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/prepare.sh
cargo build --release -p rollout-worker
./target/release/rollout-worker generate --model fixtures/generated/qwen2-tiny --chat \
    --prompt "What is 12 + 30?" --prompt "Think step by step: 7 * 6" \
    --n 2 --max-new-tokens 24 --temperature 0.8 --top-p 0.95 --seed 0 "$@"
