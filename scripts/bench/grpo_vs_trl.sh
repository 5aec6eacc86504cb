#!/usr/bin/env bash
# GRPO step time of `trainer grpo` against TRL's GRPOTrainer, same recipe, on CPU:
#
#   bash scripts/bench/grpo_vs_trl.sh [--ranks 1] [--workers 1] [--threads-per-process 1]
#        [--trl-threads N] [--prompts-per-step 16] [--num-generations 8]
#        [--max-completion-length 16] [--steps 12] [--warmup 2] [--learning-rate 3e-4]
#        [--temperature 1.0] [--max-staleness K] [--repeat 1] [--no-build] [--work DIR]
#        [--set KEY=VALUE ...]   (passed to `trainer grpo` after the recipe's settings)
#
# Shared-prefix training is on for our side (shared_prefix_training=true: each group's
# prompt is forwarded once and its completions attend to it; the same objective, equal
# to the unpacked layout within f32 rounding, trainer/tests/grpo_shared_prefix.rs);
# `--set shared_prefix_training=false` measures the unpacked layout.
#
# What runs. Both sides train the shipped demo model (demo/checkpoint, 0.6M-parameter
# Qwen2) on the demo task (scripts/demo/make_task.py --no-model, seed 0: two-digit
# addition, accuracy reward) with the demo recipe (scripts/demo/grpo.yaml: DAPO loss,
# beta 0, epsilon 0.2, group-scaled advantages, AdamW betas 0.9/0.99, constant lr, grad
# clip 1, fp32, one optimizer step per generated batch) and the same prompts per step,
# num_generations, max_completion_length, steps, learning rate and sampling (temperature,
# no top-k/top-p/min-p). Ours: `trainer grpo` (release build) with --ranks trainer ranks
# (ZeRO-2 on the CPU ring) fed by --workers `rollout-worker serve` processes over gRPC;
# TRL: GRPOTrainer 1.16 on CPU without vLLM (scripts/bench/trl.sh, generation with
# transformers' generate in the training process). No evaluation set on either side,
# no checkpoint inside the timed steps (ours writes its final one after the last step).
# Our recipe keeps its truncated importance-sampling correction (the workers are a
# separate engine; TRL applies it only with vLLM): one elementwise min/exp per token.
#
# Fairness. Every one of our processes gets OMP_NUM_THREADS=--threads-per-process; TRL
# gets --trl-threads torch threads, by default as many as ours keep busy in any phase:
# max(ranks, workers) x threads-per-process, capped at the machine's cores. A GRPO step
# is sequential (generate, then train), so while the workers generate the trainer ranks
# wait and the other way round; TRL's single process uses all its threads in both
# phases. The default, 1 rank + 1 worker with 1 thread each, thus meets TRL with 1
# thread: one core of compute in every phase on both sides; `--ranks 2 --workers 2`
# (the demo's layout) meets TRL with 2. `--trl-threads 2` with 1 + 1 gives TRL twice
# our threads per phase and as many in total. On a shared machine, compare TRL at 1 and
# 2 threads: with another process on a core, torch's 2 OpenMP threads wait for each
# other and TRL's steps got up to 15x slower (docs/benchmarks.md). The first --warmup
# steps of each side are left out (one-off allocation, first gRPC calls, lazy init).
#
# Overlap. Ours runs with --max-staleness (TRL AsyncGRPO's name): with 1 the workers
# generate the next step's groups while the ranks train this one (one version old, with
# the truncated importance-sampling correction); 0 is the sequential round. The default
# is 1 when every process can have its cores, (ranks + workers) x threads-per-process <=
# the machine's cores, else 0: on fewer cores the overlapped phases only take turns on
# the same cores, and the round is slower than the sequential one (2 + 2 on 2 cores:
# 0.178 s against 0.166 s a step, docs/benchmarks.md). TRL's GRPOTrainer is sequential
# either way.
#
# Figures (scripts/bench/grpo_vs_trl.py, same reduction on both sides): step time; generated
# tokens/s = completion tokens / generation seconds; training tokens/s = (prompt +
# completion) tokens, unpadded / (step - generation) seconds; their ratio ours / TRL. Our
# per-step numbers come from the trainer's own metric line (logging_steps=1: time/step,
# time/generate, tokens/prompt, tokens/completion, ...); TRL's from trl_grpo.py's timers.
# With --repeat N the two sides alternate N times (ours, TRL, ours, TRL, ...) so load from
# other processes hits both, and the medians are printed after the runs.
#
# Binaries: `cargo build --release -p trainer -p rollout-worker` (skipped with --no-build),
# then copied into WORK/bin. The build directory may be shared with other checkouts, so a
# target/release/trainer whose --help does not list `grpo` is replaced by the newest
# target/release/deps/trainer-<hash> that does (likewise rollout-worker and `serve`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

ranks=1 workers=1 tpp=1 trl_threads="" prompts=16 gens=8 max_len=16 steps=12 warmup=2
lr=3e-4 temperature=1.0 staleness="" repeat=1 build=1 work=$root/target/bench-grpo-vs-trl
extra=(--set shared_prefix_training=true)
while [ $# -gt 0 ]; do
    case $1 in
        --ranks) ranks=$2; shift 2 ;;
        --workers) workers=$2; shift 2 ;;
        --threads-per-process) tpp=$2; shift 2 ;;
        --trl-threads) trl_threads=$2; shift 2 ;;
        --prompts-per-step) prompts=$2; shift 2 ;;
        --num-generations) gens=$2; shift 2 ;;
        --max-completion-length) max_len=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --learning-rate) lr=$2; shift 2 ;;
        --temperature) temperature=$2; shift 2 ;;
        --max-staleness) staleness=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --set) extra+=(--set "$2"); shift 2 ;;
        --work) work=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "grpo_vs_trl.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in ranks workers tpp prompts gens max_len steps repeat; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "grpo_vs_trl.sh: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
[[ -z $staleness || $staleness =~ ^[0-9]+$ ]] || { echo "grpo_vs_trl.sh: --max-staleness must be >= 0, got '$staleness'" >&2; exit 2; }
[[ $warmup =~ ^[0-9]+$ ]] || { echo "grpo_vs_trl.sh: --warmup must be >= 0, got '$warmup'" >&2; exit 2; }
((steps > warmup)) || { echo "grpo_vs_trl.sh: --steps ($steps) must exceed --warmup ($warmup)" >&2; exit 2; }
((gens >= 2)) || { echo "grpo_vs_trl.sh: --num-generations must be at least 2" >&2; exit 2; }
((prompts % ranks == 0)) || { echo "grpo_vs_trl.sh: --prompts-per-step ($prompts) must be a multiple of --ranks ($ranks)" >&2; exit 2; }
cores=$(nproc)
if [ -z "$staleness" ]; then
    staleness=0
    (((ranks + workers) * tpp <= cores)) && staleness=1
fi
if [ -z "$trl_threads" ]; then
    trl_threads=$(((ranks > workers ? ranks : workers) * tpp))
    ((trl_threads > cores)) && trl_threads=$cores
fi
[[ $trl_threads =~ ^[1-9][0-9]*$ ]] || { echo "grpo_vs_trl.sh: --trl-threads must be a positive integer" >&2; exit 2; }

bash scripts/prepare.sh
python=$root/.venv/bin/python
target=${CARGO_TARGET_DIR:-$root/target}
if [ $build = 1 ]; then
    cargo build --release -p trainer -p rollout-worker
fi

# pick NAME DEPS_PREFIX SUBCOMMAND: the release binary whose --help lists SUBCOMMAND.
pick() {
    local name=$1 prefix=$2 sub=$3 c
    for c in "$target/release/$name" $(ls -t "$target/release/deps/$prefix"-* 2>/dev/null); do
        [[ -x $c && $c != *.d ]] || continue
        if "$c" --help 2>/dev/null | grep -qE "^  $sub( |$)"; then
            echo "$c"
            return
        fi
    done
    echo "grpo_vs_trl.sh: no release $name under $target/release lists '$sub' in --help; build with cargo build --release -p $name" >&2
    exit 1
}
rm -rf "$work"
mkdir -p "$work/bin"
trainer_bin=$(pick trainer trainer grpo)
worker_bin=$(pick rollout-worker rollout_worker serve)
cp "$trainer_bin" "$work/bin/trainer"
cp "$worker_bin" "$work/bin/rollout-worker"
echo "binaries: $trainer_bin, $worker_bin"
bin=$work/bin
"$python" scripts/demo/make_task.py --out "$work/task" --no-model >/dev/null
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
stop_workers() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
trap stop_workers EXIT

# run_ours DIR: starts the workers, trains, stops the workers; the log is DIR/ours.log.
run_ours() {
    local dir=$1 i log url urls=()
    for ((i = 0; i < workers; i++)); do
        log=$dir/worker$i.log
        OMP_NUM_THREADS=$tpp "$bin/rollout-worker" serve --model demo/checkpoint \
            --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --max-num-seqs 128 >"$log" 2>&1 &
        pids+=($!)
        for _ in $(seq 1 600); do
            grep -q "^serving" "$log" && break
            kill -0 "${pids[-1]}" 2>/dev/null || { cat "$log"; echo "worker $i failed to start" >&2; exit 1; }
            sleep 0.1
        done
        url=$(sed -n 's/^serving .* on grpc:\/\/\([^ ]*\) and.*/http:\/\/\1/p' "$log")
        [[ -n $url ]] || { cat "$log"; echo "worker $i did not report its address" >&2; exit 1; }
        urls+=("\"$url\"")
    done
    local list
    list=$(IFS=,; echo "[${urls[*]}]")
    OMP_NUM_THREADS=$tpp python3 scripts/launch --nproc-per-node "$ranks" --master-port "$port" -- \
        "$bin/trainer" grpo --config scripts/demo/grpo.yaml \
        --set model_name_or_path=demo/checkpoint \
        --set "output_dir=$dir/grpo" \
        --set "dataset.path=$work/task/train.jsonl" \
        --set "rollout.workers=$list" \
        --set "per_device_train_batch_size=$((prompts * gens / ranks))" \
        --set gradient_accumulation_steps=1 \
        --set "num_generations=$gens" \
        --set "max_completion_length=$max_len" \
        --set "max_steps=$steps" \
        --set "learning_rate=$lr" \
        --set "temperature=$temperature" \
        --set "max_staleness=$staleness" \
        --set logging_steps=1 --set save_steps=0 "${extra[@]}" >"$dir/ours.log" 2>&1 ||
        { tail -30 "$dir/ours.log"; echo "trainer failed (log: $dir/ours.log)" >&2; exit 1; }
    stop_workers
}

run_trl() {
    local dir=$1
    OMP_NUM_THREADS=$trl_threads bash scripts/bench/trl.sh --task "$work/task" --model demo/checkpoint \
        --prompts-per-step "$prompts" --num-generations "$gens" \
        --max-completion-length "$max_len" --steps "$steps" --learning-rate "$lr" \
        --temperature "$temperature" --threads "$trl_threads" --seed 0 \
        --output-dir "$dir/trl-out" >"$dir/trl.log" 2>&1 ||
        { tail -30 "$dir/trl.log"; echo "TRL failed (log: $dir/trl.log)" >&2; exit 1; }
}

label="ours: $ranks rank(s) + $workers worker(s) x OMP_NUM_THREADS=$tpp, max_staleness=$staleness; TRL: $trl_threads torch threads; $prompts prompts x $gens generations, max $max_len new tokens, $steps steps, warm-up $warmup"
echo "$label"
runs=()
for ((r = 1; r <= repeat; r++)); do
    dir=$work/run$r
    mkdir -p "$dir"
    echo "run $r: ours (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    run_ours "$dir"
    echo "run $r: TRL (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    run_trl "$dir"
    runs+=(--run "$dir/ours.log" "$dir/trl.log")
done
"$python" scripts/bench/grpo_vs_trl.py --warmup "$warmup" --label "$label" "${runs[@]}" | tee "$work/summary.txt"
