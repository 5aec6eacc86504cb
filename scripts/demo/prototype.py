#!/usr/bin/env python3
"""The demo's recipe in plain PyTorch + transformers: the evidence that it works.

    .venv/bin/python scripts/demo/make_task.py --out /tmp/task
    .venv/bin/python scripts/demo/prototype.py --task /tmp/task [--seed 0]

1. SFT from DIR/init on DIR/sft.jsonl: NLL of the completion tokens (the completion and
   the eos `<|im_end|>`; prompt tokens masked), averaged over the completion tokens of the
   batch; AdamW, linear warmup then linear decay to 0 (TRL SFTTrainer's scheduler).
2. GRPO from the SFT model on DIR/train.jsonl: each step samples `--num-generations`
   completions (temperature 1, no top-k/top-p) for each of `--prompts-per-step` prompts,
   scores them with the accuracy reward (make_task.accuracy_reward), and takes one AdamW
   step on the clipped surrogate with group advantages (r - mean) / (std + 1e-4) (std with
   Bessel's correction, as TRL's torch.std), beta 0, aggregated "dapo"-style: the sum of
   per-token losses over the batch divided by the number of completion tokens in the batch.
3. Held-out accuracy (DIR/heldout.jsonl) before and after GRPO: the mean reward of
   `--eval-samples` samples per prompt at temperature 1, and of greedy decoding.

Run single-threaded (`--threads 1`, the default) to size the demo for a shared 2-core
machine. Prints one line per SFT log interval and per GRPO step, then a JSON summary.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_task import accuracy_reward  # noqa: E402


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_ids(tokenizer, prompt):
    """The chat-templated prompt (one user message, generation header appended)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sft_batch(tokenizer, rows):
    """Right-padded ids [B, T], labels [B, T] (-100 on prompt and padding) for SFT."""
    seqs, labels = [], []
    for row in rows:
        p = prompt_ids(tokenizer, row["prompt"])
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        c = c + [tokenizer.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return ids, lab, mask


def lr_at(step, total, peak, warmup):
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def run_sft(model, tokenizer, rows, args, log):
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.sft_weight_decay)
    model.train()
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    start = time.perf_counter()
    pos, running = 0, []
    for step in range(args.sft_steps):
        if pos + args.sft_batch > len(order):
            order = torch.randperm(len(rows), generator=g).tolist()
            pos = 0
        batch = [rows[i] for i in order[pos:pos + args.sft_batch]]
        pos += args.sft_batch
        ids, labels, mask = sft_batch(tokenizer, batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.sft_steps, args.sft_lr, args.sft_warmup)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.sft_steps:
            log(f"sft step {step + 1}/{args.sft_steps} loss {sum(running) / len(running):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} elapsed {time.perf_counter() - start:.1f}s")
            running = []
    return time.perf_counter() - start


def left_pad(tokenizer, seqs):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts, n, greedy, max_new_tokens):
    """`n` completions per prompt: token ids [B*n, C] (padded after eos) and decoded texts.
    Prompt i's completions are rows i*n .. i*n+n-1."""
    model.eval()
    seqs = [prompt_ids(tokenizer, p) for p in prompts for _ in range(n)]
    ids, mask = left_pad(tokenizer, seqs)
    cfg = GenerationConfig(do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    completion = out[:, ids.shape[1]:]
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    return completion, texts


def evaluate(model, tokenizer, rows, args):
    """Held-out accuracy: mean reward of samples at temperature 1, and of greedy decoding."""
    prompts = [r["prompt"] for r in rows]
    solutions = [r["solution"] for r in rows]
    _, texts = generate(model, tokenizer, prompts, args.eval_samples, False,
                        args.max_completion_length)
    sampled = [accuracy_reward(t, solutions[i // args.eval_samples]) for i, t in enumerate(texts)]
    _, texts = generate(model, tokenizer, prompts, 1, True, args.max_completion_length)
    greedy = [accuracy_reward(t, s) for t, s in zip(texts, solutions)]
    return sum(sampled) / len(sampled), sum(greedy) / len(greedy), texts[:4]


def completion_mask(tokenizer, completion):
    """1 up to and including the first eos, 0 after it (padding)."""
    is_eos = completion == tokenizer.eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1),
                        torch.full((completion.shape[0],), completion.shape[1]))
    return (torch.arange(completion.shape[1])[None, :] <= first[:, None]).long()


def group_advantages(rewards, n):
    """(r - group mean) / (group std + 1e-4), std with Bessel's correction (n - 1)."""
    r = rewards.view(-1, n)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


def grpo_loss(logp, old_logp, adv, mask, epsilon):
    """Clipped surrogate, dapo token-mean: sum over tokens / number of completion tokens.
    logp, old_logp, mask: [B, C]; adv: [B]."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def run_grpo(model, tokenizer, rows, heldout, args, log):
    opt = torch.optim.AdamW(model.parameters(), lr=args.grpo_lr, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(len(rows), generator=g).tolist()
    n = args.num_generations
    history = []
    t_gen = t_train = 0.0
    for step in range(args.grpo_steps):
        batch = [rows[i] for i in order[step * args.prompts_per_step:
                                        (step + 1) * args.prompts_per_step]]
        t0 = time.perf_counter()
        completion, texts = generate(model, tokenizer, [r["prompt"] for r in batch], n, False,
                                     args.max_completion_length)
        t1 = time.perf_counter()
        rewards = torch.tensor([accuracy_reward(t, batch[i // n]["solution"])
                                for i, t in enumerate(texts)])
        adv = group_advantages(rewards, n)
        cmask = completion_mask(tokenizer, completion)
        prompts = [prompt_ids(tokenizer, r["prompt"]) for r in batch for _ in range(n)]
        pids, pmask = left_pad(tokenizer, prompts)
        ids = torch.cat([pids, completion], 1)
        attn = torch.cat([pmask, cmask], 1)
        model.train()
        logits = model(input_ids=ids, attention_mask=attn).logits[:, pids.shape[1] - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, completion[..., None])[..., 0]
        loss = grpo_loss(logp, logp.detach(), adv, cmask.float(), args.epsilon)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        t2 = time.perf_counter()
        t_gen += t1 - t0
        t_train += t2 - t1
        r = rewards.view(-1, n)
        zero_std = (r.std(1) == 0).float().mean().item()
        history.append(rewards.mean().item())
        log(f"grpo step {step + 1}/{args.grpo_steps} reward {rewards.mean():.3f} "
            f"zero_std_groups {zero_std:.2f} completion_tokens {int(cmask.sum())} "
            f"gen {t1 - t0:.2f}s train {t2 - t1:.2f}s")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.grpo_steps:
            acc, greedy, _ = evaluate(model, tokenizer, heldout, args)
            log(f"  heldout after step {step + 1}: sampled {acc:.3f} greedy {greedy:.3f}")
    return history, t_gen, t_train


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="directory written by make_task.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sft-steps", type=int, default=1000)
    ap.add_argument("--sft-batch", type=int, default=64)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--sft-warmup", type=int, default=50)
    ap.add_argument("--sft-weight-decay", type=float, default=0.0)
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--grpo-lr", type=float, default=1e-4)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=16)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=0, help="held-out eval every N GRPO steps")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--save-sft", help="save the SFT model here")
    ap.add_argument("--load-sft", help="skip SFT and start GRPO from this model")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda s: print(s, flush=True)  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.task, "init"))
    heldout = read_jsonl(os.path.join(args.task, "heldout.jsonl"))
    summary = {"seed": args.seed, "threads": args.threads}

    if args.load_sft:
        model = Qwen2ForCausalLM.from_pretrained(args.load_sft, dtype=torch.float32)
    else:
        model = Qwen2ForCausalLM.from_pretrained(os.path.join(args.task, "init"),
                                                 dtype=torch.float32)
        acc, greedy, _ = evaluate(model, tokenizer, heldout, args)
        log(f"init heldout: sampled {acc:.3f} greedy {greedy:.3f}")
        sft_rows = read_jsonl(os.path.join(args.task, "sft.jsonl"))
        secs = run_sft(model, tokenizer, sft_rows, args, log)
        summary.update(sft_steps=args.sft_steps, sft_batch=args.sft_batch, sft_lr=args.sft_lr,
                       sft_warmup=args.sft_warmup, sft_seconds=round(secs, 1))
        if args.save_sft:
            model.save_pretrained(args.save_sft)
            tokenizer.save_pretrained(args.save_sft)

    t0 = time.perf_counter()
    acc, greedy, samples = evaluate(model, tokenizer, heldout, args)
    log(f"before GRPO heldout: sampled {acc:.3f} greedy {greedy:.3f} "
        f"(eval {time.perf_counter() - t0:.1f}s) e.g. {samples}")
    summary.update(before_sampled=acc, before_greedy=greedy)

    train = read_jsonl(os.path.join(args.task, "train.jsonl"))
    start = time.perf_counter()
    history, t_gen, t_train = run_grpo(model, tokenizer, train, heldout, args, log)
    secs = time.perf_counter() - start
    acc, greedy, samples = evaluate(model, tokenizer, heldout, args)
    log(f"after GRPO heldout: sampled {acc:.3f} greedy {greedy:.3f} e.g. {samples}")
    summary.update(after_sampled=acc, after_greedy=greedy, grpo_steps=args.grpo_steps,
                   grpo_lr=args.grpo_lr, grpo_seconds=round(secs, 1),
                   grpo_generate_seconds=round(t_gen, 1), grpo_train_seconds=round(t_train, 1),
                   reward_per_step=[round(r, 3) for r in history])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
