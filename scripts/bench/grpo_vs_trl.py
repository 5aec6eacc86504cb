#!/usr/bin/env python3
"""Side-by-side figures of `trainer grpo` and TRL's GRPOTrainer (scripts/bench/grpo_vs_trl.sh).

    python3 grpo_vs_trl.py --warmup 2 --label "1 rank + 1 worker" \\
        --run OURS_LOG TRL_JSON [--run OURS_LOG TRL_JSON ...]

OURS_LOG is the trainer's output with logging_steps=1: one tracing line per step holding
every metric (`time/step=...`, `tokens/completion=...`); TRL_JSON is the last line of
scripts/bench/trl_grpo.py (its "rows"). Standard library only.

Both sides are reduced the same way, over the steps after the first --warmup:
  step time         = mean wall seconds per step
  gen tokens/s      = sum of completion tokens / sum of generation seconds
  train tokens/s    = sum of (prompt + completion) tokens, unpadded
                      / sum of (step - generation) seconds
  e2e tokens/s      = sum of (prompt + completion) tokens / sum of step seconds
Sums over steps, not means of per-step rates, so a slow step weighs what it cost.
"step - generation" is everything else in the step: for TRL rewards, advantages, the
forward/backward and the optimizer step; for ours the same plus the weight push to the
rollout workers and the statistics all-reduce. Our times are rank 0's; token counts are
summed over ranks.
"""

import argparse
import json
import re
import statistics
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"([A-Za-z_][\w/.\-]*)=(-?[0-9][0-9.eE+\-]*)")


def parse_ours(text):
    """Per-step rows from the trainer's log: the tracing lines that carry `time/step=`."""
    rows = []
    for line in text.splitlines():
        line = ANSI.sub("", line)
        if "time/step=" not in line:
            continue
        f = {k: float(v) for k, v in FIELD.findall(line)}
        missing = [k for k in ("step", "time/step", "time/generate", "tokens/prompt",
                               "tokens/completion") if k not in f]
        if missing:
            raise ValueError(f"trainer log line lacks {', '.join(missing)} (a trainer without "
                             f"the tokens/* metrics?): {line[:200]}")
        rows.append({
            "step": int(f["step"]), "step_s": f["time/step"], "gen_s": f["time/generate"],
            "prompt_tokens": f["tokens/prompt"], "completion_tokens": f["tokens/completion"],
            "reward_s": f.get("time/reward", 0.0),
            "forward_backward_s": f.get("time/forward_backward", 0.0),
            "optimizer_s": f.get("time/optimizer", 0.0),
            "weight_push_s": f.get("time/weight_push", 0.0),
        })
    return rows


def parse_trl(text):
    """Per-step rows from trl_grpo.py's JSON line (the last line starting with `{`)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise ValueError("no JSON summary line in the TRL output")
    summary = json.loads(lines[-1])
    if "rows" not in summary:
        raise ValueError("the TRL summary has no per-step 'rows' (an older trl_grpo.py?)")
    return summary["rows"], summary


def figures(rows, warmup, what):
    """The reductions of the module doc over rows[warmup:], plus mean seconds of each phase."""
    steady = sorted(rows, key=lambda r: r["step"])[warmup:]
    if not steady:
        raise ValueError(f"{what}: {len(rows)} steps logged, none left after "
                         f"--warmup {warmup}; run more steps")
    s = lambda k: sum(r[k] for r in steady)  # noqa: E731
    tokens = s("prompt_tokens") + s("completion_tokens")
    rest = s("step_s") - s("gen_s")
    out = {
        "steps": len(steady),
        "step_s": s("step_s") / len(steady),
        "gen_s": s("gen_s") / len(steady),
        "rest_s": rest / len(steady),
        "gen_tokens_per_s": s("completion_tokens") / max(s("gen_s"), 1e-9),
        "train_tokens_per_s": tokens / max(rest, 1e-9),
        "e2e_tokens_per_s": tokens / max(s("step_s"), 1e-9),
        "completion_tokens_per_step": s("completion_tokens") / len(steady),
        "prompt_tokens_per_step": s("prompt_tokens") / len(steady),
    }
    for k in ("reward_s", "forward_backward_s", "optimizer_s", "weight_push_s"):
        if k in steady[0]:
            out[k] = s(k) / len(steady)
    return out


ROWS = [  # key, label, format, higher is better
    ("step_s", "step time (s)", "{:.3f}", False),
    ("gen_s", "  generation (s)", "{:.3f}", False),
    ("rest_s", "  rest: reward+train+opt(+push) (s)", "{:.3f}", False),
    ("gen_tokens_per_s", "generated tokens/s", "{:.0f}", True),
    ("train_tokens_per_s", "training tokens/s", "{:.0f}", True),
    ("e2e_tokens_per_s", "end-to-end tokens/s", "{:.0f}", True),
    ("completion_tokens_per_step", "completion tokens/step", "{:.0f}", None),
]


def table(ours, trl):
    """Markdown table: ours, TRL, ours/TRL and the speedup (>1: ours is faster)."""
    out = ["| metric | ours | TRL | ours / TRL | speedup |", "| --- | --- | --- | --- | --- |"]
    # With max_staleness >= 1 our ranks barely wait for rollouts (generation runs beside
    # training): the generation time is the wait, and its ratios mean nothing.
    overlapped = ours["gen_s"] < 0.01 * ours["step_s"]
    for key, label, fmt, higher in ROWS:
        a, b = ours[key], trl[key]
        ratio = a / b if b else float("nan")
        speedup = "" if higher is None else f"{(ratio if higher else 1 / ratio):.2f}x"
        if overlapped and key in ("gen_s", "gen_tokens_per_s"):
            speedup = "overlapped (ours: time waited)"
        out.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.3f} | {speedup} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of both")
    ap.add_argument("--label", default="", help="a line printed above the figures")
    ap.add_argument("--run", nargs=2, action="append", required=True,
                    metavar=("OURS_LOG", "TRL_OUTPUT"), help="one repetition's outputs")
    args = ap.parse_args()
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    runs = []
    for i, (ours_path, trl_path) in enumerate(args.run, 1):
        with open(ours_path) as f:
            ours_rows = parse_ours(f.read())
        with open(trl_path) as f:
            trl_rows, trl_summary = parse_trl(f.read())
        if not ours_rows:
            sys.exit(f"{ours_path}: no per-step metric lines (is logging_steps 1?)")
        ours = figures(ours_rows, args.warmup, ours_path)
        trl = figures(trl_rows, args.warmup, trl_path)
        runs.append({"ours": ours, "trl": trl, "trl_threads": trl_summary.get("threads")})
        print(f"\nrun {i}{' - ' + args.label if args.label else ''} "
              f"(steps {args.warmup + 1}.. of {len(ours_rows)}; TRL torch threads "
              f"{trl_summary.get('threads')})")
        print(table(ours, trl))
        print(f"ours per step: generate {ours['gen_s']:.3f} s, reward {ours['reward_s']:.4f} s, "
              f"forward+backward {ours['forward_backward_s']:.3f} s, optimizer "
              f"{ours['optimizer_s']:.3f} s, weight push {ours['weight_push_s']:.3f} s")
    if len(runs) > 1:
        med = lambda side: {k: statistics.median(r[side][k] for r in runs)  # noqa: E731
                            for k in runs[0][side]}
        print(f"\nmedian of {len(runs)} runs (each side's median, then the ratio)")
        print(table(med("ours"), med("trl")))
    print(json.dumps({"bench": "grpo_vs_trl", "label": args.label, "warmup": args.warmup,
                      "runs": runs}))


if __name__ == "__main__":
    main()
