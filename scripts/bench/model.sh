#!/usr/bin/env bash
# Model benchmarks side by side: ours (cargo bench) and transformers on the same shape.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash scripts/setup.sh
cargo bench -p model --bench model
.venv/bin/python scripts/bench/hf_fwd_bwd.py
