#!/usr/bin/env bash
# Installs what the project needs outside the repository, idempotently:
#   - a Python venv with PyTorch 2.11.0 (libtorch for tch 0.24) and the packages of
#     scripts/requirements.txt, in ${XDG_CACHE_HOME:-$HOME/.cache}/grpo-rs/torch-2.11.0;
#   - the ignored links `.libtorch` (the torch package: include/ and lib/) and `.venv`
#     in the repository root, which .cargo/config.toml points the build at;
#   - a libnccl.so link beside the wheel's libnccl.so.2 (cudarc opens libnccl.so);
#   - Debian's prometheus package (promtool, prometheus) for the deploy tests.
# A second run with nothing changed takes well under a second.
#
# To build against a PyTorch you already have instead, export LIBTORCH=/path/to/torch
# (the directory holding include/ and lib/, e.g. `python -c 'import torch,os;
# print(os.path.dirname(torch.__file__))'`) before running cargo; an environment
# variable wins over .cargo/config.toml. It must be PyTorch 2.11.0.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/grpo-rs
venv=${GRPO_VENV:-$cache/torch-2.11.0}
req=$root/scripts/requirements.txt
stamp=$venv/.grpo-requirements

python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating venv $venv" >&2
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi

if ! cmp -s "$req" "$stamp" 2>/dev/null; then
    echo "setup: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
fi

torch_dir=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" "$root/.libtorch"
ln -sfn "$venv" "$root/.venv"

# cudarc dlopens "libnccl.so"; the nvidia-nccl wheel ships only libnccl.so.2.
nccl_dir=$(dirname "$torch_dir")/nvidia/nccl/lib
if [ -e "$nccl_dir/libnccl.so.2" ] && [ ! -e "$nccl_dir/libnccl.so" ]; then
    ln -s libnccl.so.2 "$nccl_dir/libnccl.so"
fi

# promtool and prometheus for the deploy/monitoring tests: Debian's prometheus package,
# installed when missing (CI may run on a fresh machine). The image build skips it
# (GRPO_SKIP_TEST_TOOLS=1).
if [ -z "${GRPO_SKIP_TEST_TOOLS:-}" ] \
    && ! { command -v promtool && command -v prometheus; } >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian's prometheus package (promtool)" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            prometheus >/dev/null
    else
        echo "setup: promtool/prometheus missing and apt-get unavailable (not root?):" \
             "install Debian's prometheus package, or the deploy tests fail" >&2
    fi
fi

# protoc for the proto crate's build script comes from the protoc-bin-vendored crate;
# nothing to install here.
echo "setup: libtorch at $torch_dir" >&2
