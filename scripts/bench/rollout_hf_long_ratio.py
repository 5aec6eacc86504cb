"""Ratios of the long-completion benchmark: ours (long_ours.json) against transformers'
figures (the JSON line given as argv[2]) measured in the same run."""

import json
import os
import sys

ours = json.load(open(os.path.join(sys.argv[1], "long_ours.json")))
hf = {r["new_tokens"]: r for r in json.loads(sys.argv[2])["long"]}
print(f"memcpy bandwidth {ours['memcpy_bytes_per_s'] / 1e9:.2f} GB/s "
      f"({ours['cpu_memcpy_bytes_per_s'] / 1e9:.2f} GB/s in CPU time), {ours['num_params']} parameters, 1 thread")
# Wall clock, then CPU time (each side's own process; the figures that hold on a loaded
# machine).
for label, pre in [("wall clock", ""), ("CPU time", "cpu_")]:
    print(f"{label}:")
    print(f"{'new tokens':>10} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'roofline':>9}")
    for r in ours["long"]:
        h = hf[r["new_tokens"]]
        print(f"{r['new_tokens']:>10} {r[pre + 'tokens_per_s']:>11.1f} {h[pre + 'tokens_per_s']:>9.1f} "
              f"{r[pre + 'tokens_per_s'] / h[pre + 'tokens_per_s']:>5.2f}x "
              f"{100 * r[pre + 'tokens_per_s'] / r[pre + 'roofline_tokens_per_s']:>8.0f}%")
    first, last = ours["long"][0], ours["long"][-1]
    print(f"throughput at {last['new_tokens']} / at {first['new_tokens']}: "
          f"{100 * last[pre + 'tokens_per_s'] / first[pre + 'tokens_per_s']:.0f}%")
on, off = ours["sharing"]
print(f"prefix sharing (1024-token prompt, n=16, 64 new): prefill {off['prefill_tokens']} -> {on['prefill_tokens']} "
      f"tokens ({off['prefill_tokens'] / max(on['prefill_tokens'], 1):.1f}x less), KV per group "
      f"{off['kv_bytes'] / 2**20:.1f} -> {on['kv_bytes'] / 2**20:.1f} MiB ({off['kv_bytes'] / max(on['kv_bytes'], 1):.1f}x less)")
