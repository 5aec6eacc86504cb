#!/usr/bin/env bash
# GPU validation: proves the CUDA and NCCL paths on one GPU and measures them, writing
# report.txt and report.json (docs/gpu-check.md explains every section and figure).
#
#   scripts/gpu-check.sh [--out DIR] [--bin-dir DIR] [--cpu-dry-run]
#   scripts/gpu-check.sh --pack DIR     # build here, copy the stripped binaries to DIR
#
# Sections: 1 env + collectives (libtorch_cuda linked, NCCL at world size 1 against the
# CPU ring), 2 parity (forward/backward of every fixture on CUDA against CPU fp32, and
# bf16), 3 grpo (a few GRPO steps of the demo task, trainer rank and worker on cuda:0),
# 4 decode (tokens/s against context length 256..8k, mixed-length batches; prefill
# tokens/s), 5 train (a ~0.5B random Qwen2 step, bf16, gradient checkpointing: tokens/s,
# MFU), 6 push (weight push GB/s from CUDA tensors to a CUDA worker).
#
# Without a GPU it says so, writes a report saying so and exits 0. --cpu-dry-run runs
# every section on the CPU with small sizes instead, to prove the script itself.
# Binaries: built with cargo when it is there; on a machine without Rust, give
# --bin-dir with what `--pack` made (trainer, rollout-worker, gpu_check) and keep
# fixtures/generated in the tree. libtorch: the project's .libtorch, else python3's torch.
# The whole run is bounded by GPU_CHECK_BUDGET_SECS (default 540).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

out=$root/target/gpu-check
bin_dir=
pack=
mode=gpu
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --pack) pack=$2; shift 2 ;;
        --cpu-dry-run) mode=cpu; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
budget=${GPU_CHECK_BUDGET_SECS:-540}
started=$SECONDS

python=python3
[[ -x $root/.venv/bin/python ]] && python=$root/.venv/bin/python

build() {
    bash scripts/setup.sh >&2 || return 1
    cargo build --release -p trainer -p rollout-worker --bins >&2 || return 1
    cargo build --release -p trainer --example gpu_check >&2 || return 1
    local target=${CARGO_TARGET_DIR:-$root/target}/release
    bin_dir=$target
    cp "$target/examples/gpu_check" "$target/gpu_check"
}

if [[ -n $pack ]]; then
    build || { echo "gpu-check: build failed" >&2; exit 1; }
    mkdir -p "$pack"
    for b in trainer rollout-worker gpu_check; do
        cp "$bin_dir/$b" "$pack/$b" && strip "$pack/$b" 2>/dev/null
    done
    du -sh "$pack"
    exit 0
fi

mkdir -p "$out"
gpu_info=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
if [[ $mode == gpu && -z $gpu_info ]]; then
    msg="no NVIDIA GPU on this machine (nvidia-smi found none): nothing was checked"
    echo "gpu-check: $msg"
    printf 'gpu-check report\n%s\n' "$msg" >"$out/report.txt"
    printf '{"gpu": false, "ok": null, "message": "%s", "sections": {}}\n' "$msg" >"$out/report.json"
    exit 0
fi

# libtorch for the binaries: their RUNPATH names the build machine's copy; where that
# is missing (a GPU machine with its own PyTorch 2.11.0), use python3's torch.
if [[ ! -e $root/.libtorch/lib/libtorch_cpu.so ]]; then
    torch_dir=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)
    if [[ -n $torch_dir ]]; then
        nccl=$(dirname "$torch_dir")/nvidia/nccl/lib
        [[ -e $nccl/libnccl.so.2 && ! -e $nccl/libnccl.so ]] && ln -s libnccl.so.2 "$nccl/libnccl.so" 2>/dev/null
        export LD_LIBRARY_PATH=$torch_dir/lib:$nccl:${LD_LIBRARY_PATH:-}
        python=python3
    fi
fi

if [[ -z $bin_dir ]]; then
    if command -v cargo >/dev/null; then
        build || { echo "gpu-check: build failed" >&2; exit 1; }
    else
        echo "gpu-check: no cargo here; build with --pack DIR elsewhere and pass --bin-dir DIR" >&2
        exit 2
    fi
fi
for b in trainer rollout-worker gpu_check; do
    [[ -x $bin_dir/$b ]] || { echo "gpu-check: $bin_dir/$b is missing" >&2; exit 2; }
done

if [[ $mode == gpu ]]; then
    dev=cuda:0 shape=0.5b contexts=256,1024,2048,4096,8192 seqs=32 new=64
    tb=8 tt=2048
else
    dev=cpu shape=tiny contexts=64,128,256 seqs=8 new=16 tb=2 tt=128
    gpu_info="none (CPU dry run)"
fi
work=$out/work
mkdir -p "$work"
export root bin_dir dev work python
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
declare -A status seconds

# run_section NAME LIMIT CMD...: stdout's last JSON line -> $out/NAME.json, the rest
# -> $out/NAME.log; status pass/fail/timeout/skipped.
run_section() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - started)))
    if ((left < 10)); then
        status[$name]=skipped seconds[$name]=0
        echo "{\"ok\": false, \"error\": \"skipped: the ${budget}s budget is spent\"}" >"$out/$name.json"
        return
    fi
    ((limit > left)) && limit=$left
    echo "gpu-check: $name (limit ${limit}s)" >&2
    local t0=$SECONDS
    # A shell function runs in a child bash (timeout runs programs, not functions).
    if declare -F "$1" >/dev/null; then
        export -f "$1" free_port
        set -- bash -c "$*"
    fi
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    seconds[$name]=$((SECONDS - t0))
    grep -E '^\{.*\}$' "$out/$name.log" | tail -1 >"$out/$name.json"
    [[ -s $out/$name.json ]] || echo "{\"ok\": false, \"error\": \"no result (exit $rc)\"}" >"$out/$name.json"
    if ((rc == 124 || rc == 137)); then
        status[$name]=timeout
    elif ((rc == 0)) && grep -q '"ok": *true' "$out/$name.json"; then
        status[$name]=pass
    else
        status[$name]=fail
    fi
    echo "gpu-check: $name ${status[$name]} in ${seconds[$name]}s" >&2
}

# 1. CUDA and NCCL. dist-check runs the trainer binary itself under the launcher.
run_section env 60 "$bin_dir/gpu_check" --device "$dev" env
linked=$(ldd "$bin_dir/trainer" 2>/dev/null | grep -c 'libtorch_cuda.so' || true)
if [[ $mode == gpu ]]; then
    dist_args=(--cuda --backend nccl)
else
    dist_args=(--backend ring)
fi
dist_check() {
    python3 scripts/launch --nproc-per-node 1 --master-port "$(free_port)" -- \
        "$bin_dir/trainer" dist-check "$@"
    local rc=$?
    printf '{"ok": %s, "exit": %d}\n' "$([[ $rc == 0 ]] && echo true || echo false)" "$rc"
}
run_section dist_check 120 dist_check "${dist_args[@]}"
run_section collectives 120 "$bin_dir/gpu_check" --device "$dev" collectives

# 2. Forward/backward parity on the fixtures.
run_section parity 180 "$bin_dir/gpu_check" --device "$dev" parity --fixtures fixtures/generated

# 3. GRPO steps on the demo task: one worker and one trainer rank on the device.
grpo() {
    local task=$work/task log=$work/grpo-worker.log
    if [[ ! -s $task/train.jsonl ]]; then
        "$python" scripts/demo/make_task.py --out "$task" --no-model >/dev/null || return 1
    fi
    "$bin_dir/rollout-worker" serve --model demo/checkpoint --device "$dev" \
        --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$log" 2>&1 &
    local wpid=$!
    trap 'kill $wpid 2>/dev/null' RETURN
    local url=
    for _ in $(seq 1 600); do
        url=$(sed -n 's/^serving .* on grpc:\/\/\([^ ]*\) and.*/http:\/\/\1/p' "$log")
        [[ -n $url ]] && break
        kill -0 $wpid 2>/dev/null || { cat "$log"; return 1; }
        sleep 0.2
    done
    [[ -n $url ]] || return 1
    local device=cuda
    [[ $dev == cpu ]] && device=cpu
    python3 scripts/launch --nproc-per-node 1 --master-port "$(free_port)" -- \
        "$bin_dir/trainer" grpo --config scripts/demo/grpo.yaml \
        --set model_name_or_path=demo/checkpoint --set "output_dir=$work/grpo" \
        --set "dataset.path=$task/train.jsonl" --set "eval_dataset.path=$task/heldout.jsonl" \
        --set "rollout.workers=[\"$url\"]" --set max_steps=3 --set device=$device \
        --set per_device_train_batch_size=128 >"$work/grpo-train.log" 2>&1
    local rc=$?
    cat "$work/grpo-train.log"
    "$python" - "$work/grpo-train.log" "$rc" <<'EOF'
import json, re, sys
text = open(sys.argv[1], errors="replace").read()
steps = re.findall(r"step (\d+)/(\d+)\b", text)
evals = re.findall(r"eval (before|after) (.*)", text)
done = {int(s) for s, _ in steps}
print(json.dumps({"ok": sys.argv[2] == "0" and 3 in done, "exit": int(sys.argv[2]),
                  "steps_seen": sorted(done), "evals": [f"{k} {v.strip()}" for k, v in evals]}))
EOF
}
run_section grpo 240 grpo

# 4-6. Measurements.
run_section decode 240 "$bin_dir/gpu_check" --device "$dev" decode \
    --worker-bin "$bin_dir/rollout-worker" --shape "$shape" --contexts "$contexts" \
    --num-seqs "$seqs" --new-tokens "$new" --work "$work/models"
run_section train 180 "$bin_dir/gpu_check" --device "$dev" train --shape "$shape" \
    --batch "$tb" --seq-len "$tt" --steps 3
run_section push 180 "$bin_dir/gpu_check" --device "$dev" push \
    --worker-bin "$bin_dir/rollout-worker" --shape "$shape" --wire-dtype bfloat16 \
    --work "$work/models"

# The report: every section's JSON, its status and time, and a text summary.
summary=$out/sections.tsv
: >"$summary"
for s in env dist_check collectives parity grpo decode train push; do
    printf '%s\t%s\t%s\n' "$s" "${status[$s]:-skipped}" "${seconds[$s]:-0}" >>"$summary"
done
"$python" - "$out" "$mode" "$gpu_info" "$linked" <<'EOF'
import json, os, sys
out, mode, gpu, linked = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sections, lines = {}, []
for row in open(os.path.join(out, "sections.tsv")):
    name, status, secs = row.rstrip("\n").split("\t")
    try:
        result = json.load(open(os.path.join(out, name + ".json")))
    except (OSError, ValueError) as e:
        result = {"ok": False, "error": f"unreadable result: {e}"}
    sections[name] = {"status": status, "seconds": int(secs), "result": result}
report = {"gpu": mode == "gpu", "mode": mode, "device": gpu,
          "trainer_links_libtorch_cuda": linked not in ("", "0"),
          "ok": all(s["status"] == "pass" for s in sections.values()), "sections": sections}
json.dump(report, open(os.path.join(out, "report.json"), "w"), indent=1)

def fmt(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)
lines.append(f"gpu-check report ({mode}): device {gpu}")
lines.append(f"trainer binary links libtorch_cuda: {report['trainer_links_libtorch_cuda']}")
for name, s in sections.items():
    r = s["result"]
    lines.append(f"\n[{name}] {s['status']} in {s['seconds']}s" + (f": {r['error']}" if "error" in r else ""))
    if name == "env":
        lines.append("  " + ", ".join(f"{k} {fmt(v)}" for k, v in r.items() if k != "ok"))
    elif name == "collectives" and "bitwise_equal" in r:
        lines.append(f"  backend {r['backend']} vs {r['reference']}: " +
                     ", ".join(f"{k} {'equal' if v else 'DIFFERS'}" for k, v in r["bitwise_equal"].items()))
    elif name == "parity":
        for f in r.get("fixtures", []):
            lines.append(f"  {f['fixture']}: fp32 logits {fmt(f['fp32_logits_max_abs_diff'])} "
                         f"(tol {fmt(f['fp32_logits_tolerance'])}), grads {fmt(f['fp32_worst_grad_error'])}; "
                         f"bf16 logits {fmt(f['bf16_logits_max_abs_diff'])} (tol {fmt(f['bf16_logits_tolerance'])}), "
                         f"grads rel {fmt(f['bf16_worst_grad_error'])} (tol {fmt(f['bf16_grad_tolerance'])})")
    elif name == "grpo":
        lines.append(f"  steps {r.get('steps_seen')}; " + "; ".join(r.get("evals", [])))
    elif name == "decode":
        lines.append(f"  {r.get('model', '')}")
        for row in r.get("rows", []):
            lines.append(f"  context {row['context']:>5}: decode {fmt(row['decode_tokens_per_s'])} tok/s "
                         f"({fmt(row['decode_step_ms'])} ms/step, {row['num_seqs']} seqs), "
                         f"prefill {fmt(row['prefill_tokens_per_s'])} tok/s")
    elif name == "train" and "tokens_per_s" in r:
        lines.append(f"  {r['params']} params, {r['batch']}x{r['seq_len']} tokens: {fmt(r['tokens_per_s'])} tok/s, "
                     f"step {fmt(r['step_seconds'])} s, MFU {100 * r['mfu_vs_989_tflops']:.1f}% of 989 TFLOP/s")
    elif name == "push" and "best_gb_per_s" in r:
        lines.append(f"  {r['params']} params, {r['wire_dtype']} on the wire: best {fmt(r['best_gb_per_s'])} GB/s "
                     f"({len(r['pushes'])} pushes)")
lines.append(f"\noverall: {'PASS' if report['ok'] else 'FAIL'}")
open(os.path.join(out, "report.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if report["ok"] else 1)
EOF
