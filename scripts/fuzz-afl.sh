#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ on the stable toolchain (cargo-afl): the targets of
# fuzz/afl/ (a crate outside the workspace; CI never builds it), each for a bounded time.
#
#   scripts/fuzz-afl.sh [SECONDS_PER_TARGET]     (default 60; or `scripts/fuzz.sh --afl SECONDS`)
#
# Installs what it needs, idempotently: Debian's afl++ (apt-get) and cargo-afl
# (crates.io), whose `cargo afl config --build` compiles AFL's runtime. Prints
# executions, paths found and crashes per target; crashing inputs stay in
# fuzz/afl/out/TARGET/default/crashes/ (add each as a regression case of the
# matching `fuzz_*` test).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
if ! command -v afl-fuzz >/dev/null; then
    apt-get update -qq && apt-get install -y -qq afl++
fi
if ! cargo afl --version >/dev/null 2>&1; then
    cargo install --locked cargo-afl
fi
if ! cargo afl config --help >/dev/null 2>&1 || [ ! -d "${XDG_DATA_HOME:-$HOME/.local/share}/afl.rs" ]; then
    cargo afl config --build --force
fi

cd fuzz/afl
# The workspace's lock file, so the targets build the versions the tests use.
[ -f Cargo.lock ] || cp ../../Cargo.lock .
cargo afl build --release
targets=(answer_checker)
for t in "${targets[@]}"; do
    rm -rf "out/$t"; mkdir -p out
    AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
        AFL_NO_AFFINITY=1 \
        cargo afl fuzz -V "$secs" -t 5000+ -i "seeds/$t" -o "out/$t" \
        "${CARGO_TARGET_DIR:-target}/release/$t" >"out-$t.log" 2>&1 || true
done
echo
echo "target                 execs    paths  crashes"
for t in "${targets[@]}"; do
    stats="out/$t/default/fuzzer_stats"
    if [ -f "$stats" ]; then
        get() { awk -F': *' -v k="$1" '$1 ~ "^"k" *$" { print $2 }' "$stats"; }
        printf '%-20s %8s %8s %8s\n' "$t" "$(get execs_done)" "$(get corpus_count)" "$(get saved_crashes)"
    else
        printf '%-20s did not run (see fuzz/afl/out-%s.log)\n' "$t" "$t"
    fi
done
