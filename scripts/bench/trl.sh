#!/usr/bin/env bash
# TRL's GRPOTrainer on the demo task, on CPU without vLLM (scripts/bench/trl_grpo.py):
#
#   bash scripts/bench/trl.sh [--task DIR] [--model DIR] [--prompts-per-step 16]
#        [--num-generations 8] [--max-completion-length 16] [--steps 5] [--threads N] ...
#
# Installs TRL (pinned below) once into its own venv, ${XDG_CACHE_HOME:-~/.cache}/grpo-rs/
# trl-bench, layered on the project's venv so torch 2.11.0 and transformers 5.23.0 are
# reused, not reinstalled: the bench venv is made by the project venv's interpreter with
# --system-site-packages, and a .pth file adds the project venv's site-packages (a venv
# made from a venv otherwise sees only the base interpreter's packages). Without --task,
# the task is generated with scripts/demo/make_task.py into that cache (seed 0); without
# --model, TASK/init (the random-init model) is trained.
#
# TRL 1.16.0 requires transformers>=4.56.2, so the project's 5.23.0 is kept; the pins are
# what pip resolved for it with transformers and torch held (constraints below).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

bash scripts/setup.sh
base_python=$root/.venv/bin/python
cache=${XDG_CACHE_HOME:-$HOME/.cache}/grpo-rs
venv=$cache/trl-bench
pins="trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 pandas==3.1.1 psutil==7.2.2 dill==0.4.1
multiprocess==0.70.19 xxhash==4.1.0"
held="transformers==5.23.0 torch==2.11.0"
stamp=$venv/.grpo-trl-pins

if [ ! -x "$venv/bin/python" ]; then
    echo "trl.sh: creating venv $venv" >&2
    mkdir -p "$cache"
    "$base_python" -m venv --system-site-packages "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$base_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$site/grpo-base.pth"

if [ "$(cat "$stamp" 2>/dev/null)" != "$pins $held" ]; then
    echo "trl.sh: installing $pins into $venv" >&2
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    printf '%s\n' $held >"$constraints"
    # shellcheck disable=SC2086  # the pins are separate words on purpose
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" $pins
    echo "$pins $held" >"$stamp"
fi
"$venv/bin/python" - <<'EOF'
import torch, transformers, trl
if transformers.__version__ != "5.23.0" or not torch.__version__.startswith("2.11.0"):
    raise SystemExit(f"trl.sh: expected transformers 5.23.0 and torch 2.11.0, found "
                     f"{transformers.__version__} and {torch.__version__}")
EOF

args=("$@")
has_task=0
for a in "$@"; do
    [ "$a" = "--task" ] && has_task=1
done
if [ $has_task = 0 ]; then
    task=$cache/trl-bench-task
    want=$(sha256sum scripts/demo/make_task.py | cut -d' ' -f1)
    if [ "$(cat "$task/.stamp" 2>/dev/null)" != "$want" ]; then
        "$base_python" scripts/demo/make_task.py --out "$task" >/dev/null
        echo "$want" >"$task/.stamp"
    fi
    args=(--task "$task" "${args[@]}")
fi
exec "$venv/bin/python" scripts/bench/trl_grpo.py "${args[@]}"
