"""transformers' `generate` on the rollout benchmark's models, prompts and lengths, for a
side-by-side comparison with the worker (rollout-worker/benches/rollout.rs writes the
models and prompts first):

    cargo bench -p rollout-worker --bench rollout
    .venv/bin/python scripts/bench/rollout_hf_generate.py target/bench-models

Sampling at temperature 1 with top-k/top-p off, KV cache on, exactly max_new_tokens new
tokens per sequence (min_new_tokens = max_new_tokens, as the worker's ignore_eos). A batch
of `concurrency` prompts is one `generate` call: transformers has no continuous batching,
so this is its best case (all prompts the same length, nothing to pad). Tokens/s =
concurrency * max_new_tokens / wall time, after one warm-up call.
"""

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "target/bench-models"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = json.load(open(os.path.join(out, "prompts.json")))
    prompts, new, levels = spec["prompts"], spec["max_new_tokens"], spec["concurrency"]
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")
    models = [
        ("qwen2-tiny", os.path.join(root, "fixtures/generated/qwen2-tiny")),
        ("rollout-20m", os.path.join(out, "rollout-20m")),
    ]
    for name, path in models:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        def run(c, n):
            ids = torch.tensor(prompts[:c], dtype=torch.long)
            with torch.inference_mode():
                start = time.perf_counter()
                res = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    use_cache=True,
                    pad_token_id=0,
                )
                secs = time.perf_counter() - start
            assert res.shape[1] - ids.shape[1] == n
            return c * n / secs

        run(min(max(levels), 4), 8)
        for c in levels:
            print(f"{name:12} concurrency {c:3}: {run(c, new):9.1f} generated tokens/s "
                  f"(transformers generate, {new} new tokens each)")


if __name__ == "__main__":
    main()
