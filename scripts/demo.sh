#!/usr/bin/env bash
# The demo, from a fresh clone: GRPO that visibly learns on 2 CPU cores.
#
# It launches 2 rollout workers and 2 trainer ranks (ZeRO-2 on the CPU ring) on the
# shipped starting checkpoint (demo/checkpoint: a 0.6M-parameter Qwen2 made by
# `trainer sft` with scripts/demo/make_checkpoint.sh) and a generated two-digit addition
# task, trains GRPO with the accuracy reward for 40 steps (a progress line per step), and
# prints held-out accuracy before and after (greedy, and sampled at temperature 1).
#
# Extra arguments are passed to `trainer grpo` (e.g. `--set max_steps=40`).
# DEMO_BUILD=debug uses debug binaries (the test suite's); the default is release.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/prepare.sh
profile=${DEMO_BUILD:-release}
if [[ $profile == release ]]; then
    cargo build --release -p trainer -p rollout-worker
else
    cargo build -p trainer -p rollout-worker
fi
bin=${CARGO_TARGET_DIR:-$root/target}/$profile
work=${DEMO_WORK:-$root/target/demo}
rm -rf "$work"
mkdir -p "$work"

# The task data is regenerated (deterministic, seconds); the checkpoint is shipped.
.venv/bin/python scripts/demo/make_task.py --out "$work/task" --no-model >/dev/null

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Two workers, one intra-op thread each (4 processes share 2 cores).
workers=()
for i in 0 1; do
    log="$work/worker$i.log"
    OMP_NUM_THREADS=1 "$bin/rollout-worker" serve --model demo/checkpoint \
        --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --max-num-seqs 128 >"$log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 600); do
        grep -q "^serving" "$log" && break
        kill -0 "${pids[-1]}" 2>/dev/null || { cat "$log"; echo "worker $i failed to start" >&2; exit 1; }
        sleep 0.1
    done
    url=$(sed -n 's/^serving .* on grpc:\/\/\([^ ]*\) and.*/http:\/\/\1/p' "$log")
    [[ -n $url ]] || { cat "$log"; echo "worker $i did not report its address" >&2; exit 1; }
    workers+=("\"$url\"")
    echo "rollout worker $i: $url"
done
list=$(IFS=,; echo "[${workers[*]}]")

OMP_NUM_THREADS=1 python3 scripts/launch --nproc-per-node 2 --master-port "${DEMO_MASTER_PORT:-29731}" -- \
    "$bin/trainer" grpo --config scripts/demo/grpo.yaml \
    --set model_name_or_path=demo/checkpoint \
    --set "output_dir=$work/grpo" \
    --set "dataset.path=$work/task/train.jsonl" \
    --set "eval_dataset.path=$work/task/heldout.jsonl" \
    --set "rollout.workers=$list" "$@" 2>&1 | tee "$work/train.log" | grep -v "^\[rank1\]"

echo
echo "held-out accuracy (256 prompts), before -> after GRPO:"
grep -oE "eval (before|after) .*" "$work/train.log" | sed "s/^/  /"
echo
echo "training curves (reward, accuracy, KL, length, time split): $work/grpo/metrics.png"
echo "  (from $work/grpo/metrics.jsonl; redraw with: $bin/trainer plot $work/grpo)"
