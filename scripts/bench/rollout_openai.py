"""Short completions through the OpenAI API: the real `openai` Python client
(AsyncOpenAI, one request per sequence, all in flight at once, as a user batching a
dataset would) against the worker's OpenAI-compatible HTTP server, and transformers'
`generate` on the same model and prompts in the same run (one batch of all prompts,
its best case: same lengths, no padding). Tiny fixture, 32-token prompts, 32 new tokens
each (ignore_eos / min_new_tokens), temperature 1, f32, one thread each.

    .venv/bin/python scripts/bench/rollout_openai.py URL MODEL_DIR [64,256]

scripts/bench/rollout_openai.sh starts the worker and calls this.
"""

import asyncio
import json
import sys
import time

import torch
from openai import AsyncOpenAI
from transformers import AutoModelForCausalLM

NEW_TOKENS = 32
PROMPT_LEN = 32


def prompts(count, vocab):
    return [[(i * 131 + t * 17 + 5) % vocab for t in range(PROMPT_LEN)] for i in range(count)]


async def ours(url, model, ps):
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    async def one(p):
        r = await client.completions.create(
            model=model,
            prompt=[p],
            max_tokens=NEW_TOKENS,
            temperature=1.0,
            top_p=1.0,
            extra_body={"ignore_eos": True},
        )
        return r.usage.completion_tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(p) for p in ps))
    secs = time.perf_counter() - start
    await client.close()
    assert all(t == NEW_TOKENS for t in tokens), tokens
    return sum(tokens) / secs


def hf(model, ps):
    ids = torch.tensor(ps, dtype=torch.long)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            use_cache=True,
            pad_token_id=0,
        )
        secs = time.perf_counter() - start
    assert out.shape == (len(ps), PROMPT_LEN + NEW_TOKENS)
    return len(ps) * NEW_TOKENS / secs


def main():
    url, model_dir = sys.argv[1], sys.argv[2]
    levels = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "64,256").split(",")]
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    name = "qwen2-tiny"
    asyncio.run(ours(url, name, prompts(8, vocab)))  # warm-up
    hf(model, prompts(8, vocab))
    rows = []
    print(f"{'sequences':>9} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6}")
    for n in levels:
        ps = prompts(n, vocab)
        a = asyncio.run(ours(url, name, ps))
        b = hf(model, ps)
        print(f"{n:>9} {a:>11.1f} {b:>9.1f} {a / b:>5.2f}x")
        rows.append({"sequences": n, "ours_tokens_per_s": a, "hf_tokens_per_s": b})
    print(json.dumps({"new_tokens": NEW_TOKENS, "short": rows}))


if __name__ == "__main__":
    main()
