"""Time per (gold, prediction) pair of math-verify 0.9.0 (parse both sides + verify) over the
answer-checker corpus, configured as the Rust checker's reference (scripts/checker/make_corpus.py).
Prints one JSON line {"pairs", "us_per_pair", "max_us"}."""

import json
import pathlib
import time

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
CORPUS = pathlib.Path(__file__).resolve().parents[2] / "verify/tests/data/math_verify_corpus.jsonl"


def main():
    rows = [json.loads(l) for l in CORPUS.read_text().splitlines()]
    # Warm-up: regex compilation and sympy imports happen once per process.
    verify(parse("$1$", CONFIG), parse("$1$", CONFIG))
    max_us = 0.0
    start = time.perf_counter()
    for r in rows:
        t = time.perf_counter()
        # parse() keeps a small LRU cache; each pair is parsed once here, as in a reward call.
        verify(parse(r["gold"], CONFIG), parse(r["pred"], CONFIG), float_rounding=6)
        max_us = max(max_us, (time.perf_counter() - t) * 1e6)
    total = time.perf_counter() - start
    print(json.dumps({"pairs": len(rows), "us_per_pair": round(total * 1e6 / len(rows), 1), "max_us": round(max_us, 1)}))


if __name__ == "__main__":
    main()
