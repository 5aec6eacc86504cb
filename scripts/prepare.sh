#!/usr/bin/env bash
# Shared first step of scripts/demo.sh and scripts/test.sh: installs what is missing
# (scripts/setup.sh) and regenerates the transformers fixtures when their script changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
fixtures=fixtures/generated
want=$(sha256sum scripts/make_fixtures.py | cut -d' ' -f1)
if [ "$(cat "$fixtures/.stamp" 2>/dev/null)" != "$want" ]; then
    echo "prepare: generating fixtures with transformers ($fixtures)" >&2
    .venv/bin/python scripts/make_fixtures.py "$fixtures" >/dev/null
fi
