#!/usr/bin/env bash
# Answer checker: Rust `verify::check` against math-verify 0.9.0 (Python) per (gold, prediction)
# pair over verify/tests/data/math_verify_corpus.jsonl, in one run; prints both and the ratio.
#   bash scripts/bench/checker.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
rust=$(cargo bench -q -p verify --bench checker 2>/dev/null | tail -1)
py=$("$PY" scripts/bench/checker_math_verify.py 2>/dev/null | tail -1)
echo "rust:        $rust"
echo "math-verify: $py"
"$PY" - "$rust" "$py" <<'PY'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"per pair: rust {r['us_per_pair']:.2f} us, math-verify {p['us_per_pair']:.1f} us -> {p['us_per_pair'] / r['us_per_pair']:.0f}x faster")
print(f"slowest pair: rust {r['max_us']:.0f} us (mean over rounds), math-verify {p['max_us']:.0f} us (one call)")
PY
