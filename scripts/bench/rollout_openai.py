"""Short completions through the OpenAI API: the real `openai` Python client
(AsyncOpenAI, one request per sequence, all in flight at once, as a user batching a
dataset would) against the worker's OpenAI-compatible HTTP server, and transformers'
`generate` on the same model and prompts in the same run (one batch of all prompts,
its best case: same lengths, no padding). Tiny fixture, 32-token prompts, 32 new tokens
each (ignore_eos / min_new_tokens), temperature 1, f32, one thread each.

    .venv/bin/python scripts/bench/rollout_openai.py URL MODEL_DIR [64,256] [WORKER_PID]

Rows per number of sequences, all against the same transformers measurement (its work
is the same: that many 32-token prompts, 32 new tokens each):
- `plain`: one non-streaming request per sequence (the target row).
- `stream`: the same requests with `stream=True`, every chunk read.
- `n=8`: one request per 8 sequences (`n=8`, as a GRPO group).
- `client alone`: the `plain` client against a canned server (a subprocess that answers
  every request at once with a response the worker gave, under the worker's idle
  keep-alive rule): what the client costs by itself, so `hf / client alone` is the
  most any server could reach with this client on this machine.
For each row the client's CPU seconds, and with WORKER_PID the worker's CPU seconds per
thread (engine, tokio), are printed too (the breakdown of where the time went).

scripts/bench/rollout_openai.sh starts the worker and calls this.
"""

import asyncio
import collections
import json
import os
import subprocess
import sys
import time

import torch
from openai import AsyncOpenAI
from transformers import AutoModelForCausalLM

NEW_TOKENS = 32
PROMPT_LEN = 32
GROUP = 8
# The worker's default `server.max_idle_connections`, applied by the canned server too.
MAX_IDLE = 16

CANNED_SERVER = r"""
import asyncio, sys
body = sys.stdin.buffer.read()
max_idle = int(sys.argv[1])
state = {"open": 0, "busy": 0}

async def handle(r, w):
    state["open"] += 1
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            state["busy"] += 1
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            await r.readexactly(n)
            state["busy"] -= 1
            close = state["open"] - state["busy"] > max_idle
            w.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + (b"connection: close\r\n" if close else b"")
                + b"content-length: %d\r\n\r\n" % len(body)
                + body
            )
            await w.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        state["open"] -= 1
        w.close()

async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()

asyncio.run(main())
"""


def prompts(count, vocab):
    return [[(i * 131 + t * 17 + 5) % vocab for t in range(PROMPT_LEN)] for i in range(count)]


def thread_cpu(pid):
    """CPU seconds per thread name of process `pid` (Linux /proc)."""
    out = collections.Counter()
    if pid is None:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                s = f.read()
        except FileNotFoundError:
            continue
        name = s[s.index("(") + 1 : s.rindex(")")]
        fields = s[s.rindex(")") + 2 :].split()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return out


async def ours(url, model, ps, mode="plain", pid=None):
    """Tokens/s of `ps` through the API; also the client's and the worker's CPU seconds."""
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    common = dict(model=model, max_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0)

    async def one(p):
        r = await client.completions.create(prompt=[p], extra_body={"ignore_eos": True}, **common)
        return r.usage.completion_tokens

    async def streamed(p):
        s = await client.completions.create(
            prompt=[p], stream=True, extra_body={"ignore_eos": True}, **common
        )
        chunks = 0
        async for c in s:
            chunks += c.choices[0].finish_reason is None
        return chunks

    async def group(p):
        r = await client.completions.create(
            prompt=[p], n=GROUP, extra_body={"ignore_eos": True}, **common
        )
        return r.usage.completion_tokens

    if mode == "n=8":
        jobs = [group(p) for p in ps[::GROUP]]
    else:
        jobs = [(streamed if mode == "stream" else one)(p) for p in ps]
    cpu0, server0 = time.process_time(), thread_cpu(pid)
    start = time.perf_counter()
    tokens = await asyncio.gather(*jobs)
    secs = time.perf_counter() - start
    cpu, server = time.process_time() - cpu0, thread_cpu(pid)
    server.subtract(server0)
    await client.close()
    total = sum(tokens)
    assert total == len(ps) * NEW_TOKENS, (mode, tokens)
    return total / secs, cpu, server


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


def canned_server(url, model, p):
    """Starts the canned server replaying the worker's response to `p`; (process, URL)."""
    import urllib.request

    req = urllib.request.Request(
        url + "/completions",
        data=json.dumps(
            {"model": model, "prompt": [p], "max_tokens": NEW_TOKENS, "ignore_eos": True}
        ).encode(),
        headers={"content-type": "application/json"},
    )
    body = urllib.request.urlopen(req).read()
    proc = subprocess.Popen(
        [sys.executable, "-c", CANNED_SERVER, str(MAX_IDLE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=False,
    )
    proc.stdin.write(body)
    proc.stdin.close()
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def main():
    url, model_dir = sys.argv[1], sys.argv[2]
    levels = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "64,256").split(",")]
    pid = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    name = "qwen2-tiny"
    canned, canned_url = canned_server(url, name, prompts(1, vocab)[0])
    try:
        for mode in ("plain", "stream", "n=8"):  # warm-up
            asyncio.run(ours(url, name, prompts(GROUP, vocab), mode))
        asyncio.run(ours(canned_url, name, prompts(GROUP, vocab)))
        hf(model, prompts(8, vocab))
        rows = []
        print(
            f"{'sequences':>9} {'row':>12} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6}"
            f" {'client cpu s':>12}  worker cpu s"
        )
        for n in levels:
            ps = prompts(n, vocab)
            b = hf(model, ps)
            runs = [(mode, mode, url, pid) for mode in ("plain", "stream", "n=8")]
            runs.append(("client alone", "plain", canned_url, None))
            for row, mode, u, p in runs:
                a, cpu, server = asyncio.run(ours(u, name, ps, mode, p))
                threads = ", ".join(f"{k} {v:.2f}" for k, v in server.most_common()) or "-"
                print(f"{n:>9} {row:>12} {a:>11.1f} {b:>9.1f} {a / b:>5.2f}x {cpu:>12.2f}  {threads}")
                rows.append(
                    {
                        "sequences": n,
                        "row": row,
                        "ours_tokens_per_s": a,
                        "hf_tokens_per_s": b,
                        "client_cpu_s": cpu,
                        "worker_cpu_s": dict(server),
                    }
                )
        print(json.dumps({"new_tokens": NEW_TOKENS, "short": rows}))
    finally:
        canned.kill()


if __name__ == "__main__":
    main()
