#!/usr/bin/env bash
# Reproduces the demo's starting checkpoint (demo/checkpoint) with the project's own
# `trainer sft`: generate the task (random-init 0.6M-parameter Qwen2 + tokenizer + the
# sloppy-teacher SFT data), fine-tune it with scripts/demo/sft.yaml (1000 steps, about
# 2 minutes on 2 CPU cores), and copy the final model into demo/checkpoint.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

bash scripts/prepare.sh
cargo build --release -p trainer
work=${CARGO_TARGET_DIR:-$root/target}/demo-checkpoint
rm -rf "$work"
.venv/bin/python scripts/demo/make_task.py --out "$work/task"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "${CARGO_TARGET_DIR:-$root/target}/release/trainer" sft \
    --config scripts/demo/sft.yaml \
    --set "model_name_or_path=$work/task/init" \
    --set "output_dir=$work/sft" \
    --set "dataset.path=$work/task/sft.jsonl"
rm -rf demo/checkpoint
mkdir -p demo/checkpoint
cp "$work"/sft/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,chat_template.jinja} demo/checkpoint/
echo "demo/checkpoint written"
