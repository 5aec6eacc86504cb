#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints executions and crashes per target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#   scripts/fuzz.sh --afl [SECONDS]          (coverage-guided: scripts/fuzz-afl.sh)
#
# The targets are the `fuzz_*` tests (test_support::fuzz, a mutation fuzzer on the
# stable toolchain): trainer/tests/fuzz.rs (answer checker, store frames, JSONL and
# Parquet rows, checkpoint manifests, rank metadata and shards), trainer/tests/
# fuzz_ring.rs (the ring's link hello and collective frames), rollout-worker/tests/
# fuzz.rs (HTTP bodies, gRPC Generate requests, UpdateWeights chunk sequences) and
# model/tests/fuzz.rs (safetensors files, config.json, chat-template inputs). In the
# normal test suite each runs a few hundred inputs; here each runs for the time given.
# A crash prints the input in hex: add it to the target's seeds as a regression case.
# FUZZ_SEED varies the inputs (default fixed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--afl" ]; then
    shift
    exec bash scripts/fuzz-afl.sh "$@"
fi
secs="${1:-60}"
export FUZZ_SECS="$secs"
log="$(mktemp)"
status=0
for spec in "trainer fuzz" "trainer fuzz_ring" "rollout-worker fuzz" "model fuzz"; do
    set -- $spec
    # One target at a time, so each gets the machine to itself for its seconds.
    if ! cargo test -q -p "$1" --test "$2" -- --test-threads=1 --nocapture 2>&1 | tee -a "$log"; then
        status=1
    fi
done
echo
echo "target                              execs   crashes"
grep -o 'FUZZ target=[^ ]* execs=[0-9]* crashes=[0-9]*' "$log" |
    sed -E 's/FUZZ target=([^ ]*) execs=([0-9]*) crashes=([0-9]*)/\1 \2 \3/' |
    awk '{ printf "%-34s %8d %9d\n", $1, $2, $3 }'
rm -f "$log"
exit "$status"
