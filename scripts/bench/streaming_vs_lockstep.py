"""Lock-step batches against streaming at the same concurrency, on one rollout worker.

The seed's observation: a synthetic-data job that sends requests in batches and waits for the
whole batch lets the worker idle while the batch's longest completion finishes; keeping
`concurrency` requests in flight and starting a new one as soon as any finishes (what
`trainer generate` does) keeps the worker's running batch full.

Both modes send the same requests (mixed completion lengths: `ignore_eos` with max_tokens drawn
from a short/long mixture) to one worker over its OpenAI-compatible API, `concurrency` at a time.
The worker's own gauge `vllm:num_requests_running` is sampled every 25 ms (occupancy over time).
Writes scripts/bench/results/streaming_vs_lockstep.json and .png.

    .venv/bin/python scripts/bench/streaming_vs_lockstep.py [--worker target/debug/rollout-worker]
"""

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"{url}: HTTP {e.code}: {e.read().decode()}")


def running(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:num_requests_running "):
                return float(line.split()[1])
    return 0.0


class Sampler(threading.Thread):
    def __init__(self, url, t0):
        super().__init__(daemon=True)
        self.url, self.t0, self.samples, self.stop = url, t0, [], False

    def run(self):
        while not self.stop:
            try:
                self.samples.append((time.perf_counter() - self.t0, running(self.url)))
            except OSError:
                pass
            time.sleep(0.025)


def one(url, model, max_tokens, i):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Request {i}: write a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": i,
    }
    r = post(url + "/v1/chat/completions", body)
    return r["usage"]["completion_tokens"]


def run_mode(url, model, lengths, concurrency, mode):
    t0 = time.perf_counter()
    sampler = Sampler(url, t0)
    sampler.start()
    tokens = 0
    with cf.ThreadPoolExecutor(max_workers=concurrency) as ex:
        if mode == "streaming":
            futs = [ex.submit(one, url, model, n, i) for i, n in enumerate(lengths)]
            tokens = sum(f.result() for f in futs)
        else:
            for b in range(0, len(lengths), concurrency):
                batch = lengths[b : b + concurrency]
                futs = [ex.submit(one, url, model, n, b + i) for i, n in enumerate(batch)]
                tokens += sum(f.result() for f in futs)
    wall = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    occ = [v for _, v in sampler.samples]
    return {
        "mode": mode,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "mean_running": sum(occ) / max(1, len(occ)),
        "occupancy": sampler.samples,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=str(ROOT / "target/debug/rollout-worker"))
    ap.add_argument("--model", default=str(ROOT / "fixtures/generated/qwen2-tiny"))
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # Mixed lengths: most completions short, one in four long (reasoning traces vary ~10x).
    lengths = [rng.randint(120, 170) if rng.random() < 0.25 else rng.randint(8, 24) for _ in range(args.requests)]
    port, gport = free_port(), free_port()
    env = dict(os.environ, ROLLOUT_MODEL=args.model, ROLLOUT_DEVICE="cpu", ROLLOUT_HTTP_ADDR=f"127.0.0.1:{port}",
               ROLLOUT_GRPC_ADDR=f"127.0.0.1:{gport}", ROLLOUT_MAX_NUM_SEQS=str(args.concurrency), ROLLOUT_MAX_N="8")
    worker = subprocess.Popen([args.worker, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                model = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=2).read())["data"][0]["id"]
                break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("the worker did not come up")
        one(url, model, 4, 10**6)  # warm-up
        results = [run_mode(url, model, lengths, args.concurrency, m) for m in ("lockstep", "streaming")]
    finally:
        worker.terminate()
        worker.wait()
    lock, stream = results
    summary = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": lengths,
        "lockstep": {k: v for k, v in lock.items() if k != "occupancy"},
        "streaming": {k: v for k, v in stream.items() if k != "occupancy"},
        "speedup": stream["tokens_per_s"] / lock["tokens_per_s"],
        "occupancy": {"lockstep": lock["occupancy"], "streaming": stream["occupancy"]},
    }
    out = ROOT / "scripts/bench/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming_vs_lockstep.json").write_text(json.dumps(summary, indent=1) + "\n")
    for r in results:
        print(f"{r['mode']:>9}: {r['completion_tokens']} tokens in {r['wall_s']:.1f} s = {r['tokens_per_s']:.0f} tok/s, "
              f"mean running sequences {r['mean_running']:.2f} of {args.concurrency}")
    print(f"streaming / lock-step throughput: {summary['speedup']:.2f}x")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        for r, color in zip(results, ("tab:red", "tab:blue")):
            t, v = zip(*r["occupancy"]) if r["occupancy"] else ([], [])
            ax.plot(t, v, color=color, lw=1,
                    label=f"{r['mode']}: {r['tokens_per_s']:.0f} tok/s, mean {r['mean_running']:.1f} running")
        ax.axhline(args.concurrency, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("seconds")
        ax.set_ylabel("running sequences (worker gauge)")
        ax.set_title(f"One worker, {args.requests} requests of mixed length, {args.concurrency} in flight")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "streaming_vs_lockstep.png", dpi=120)
        print(f"plot: {out / 'streaming_vs_lockstep.png'}")
    except ImportError:
        print("matplotlib is not installed; no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
