"""transformers' `generate` on the long-completion benchmark's model and prompts
(rollout-worker/benches/long_completions.rs writes them first), one thread, f32:
4 prompts x n = 8 (`num_return_sequences`), exactly L new tokens each (min_new_tokens =
max_new_tokens, as ignore_eos), temperature 1, KV cache on. Prints one JSON line: wall
seconds, and CPU seconds of this process (`time.process_time()`, the counterpart of the
Rust side's CPU-time figures on a loaded machine).

    .venv/bin/python scripts/bench/rollout_long_hf.py target/bench-models
"""

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "target/bench-models"
    torch.set_num_threads(1)
    spec = json.load(open(os.path.join(out, "long_prompts.json")))
    prompts, n, lengths = spec["prompts"], spec["n"], spec["lengths"]
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(out, "qwen2-3m-8k"), dtype=torch.float32
    ).eval()
    ids = torch.tensor(prompts, dtype=torch.long)

    def run(new):
        with torch.inference_mode():
            start, cpu = time.perf_counter(), time.process_time()
            res = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=n,
                max_new_tokens=new,
                min_new_tokens=new,
                use_cache=True,
                pad_token_id=0,
            )
            secs, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert res.shape == (len(prompts) * n, ids.shape[1] + new)
        return len(prompts) * n * new / secs, secs, cpu

    run(8)  # warm-up
    results = []
    for new in lengths:
        tps, secs, cpu = run(new)
        tps_cpu = len(prompts) * n * new / cpu
        print(f"transformers {new:5} new tokens: {tps:9.1f} tokens/s ({secs:.2f}s); "
              f"CPU time: {tps_cpu:9.1f} tokens/s ({cpu:.2f}s)", file=sys.stderr)
        results.append({"new_tokens": new, "tokens_per_s": tps, "seconds": secs,
                        "cpu_tokens_per_s": tps_cpu, "cpu_seconds": cpu})
    print(json.dumps({"threads": torch.get_num_threads(), "long": results}))


if __name__ == "__main__":
    main()
