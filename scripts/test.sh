#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing (scripts/setup.sh),
# regenerates the transformers fixtures when their script changed, then runs every
# workspace test. Extra arguments go to `cargo test`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/prepare.sh

# The suite is CPU-only; tests that need a GPU are named *_gpu and skip themselves.
cargo test --workspace "$@"
