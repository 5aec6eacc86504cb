#!/usr/bin/env python3
"""Independent PyTorch reference for the GRPO math (trainer/src/grpo), written from the
formulas of TRL's GRPOTrainer, in float64. The Rust golden test (trainer/tests/grpo_golden.rs)
pipes cases in and compares.

Usage: grpo_reference.py [IN.json|-] [OUT.json|-]   (default: stdin to stdout)

Input:
  {"loss_cases": [{"name": str,
                   "logprobs": [[..]] (B x T), "old": [[..]] | null, "ref": [[..]] | null,
                   "sampler": [[..]] | null, "advantages": [..] (B), "mask": [[..]] (B x T),
                   "config": {"epsilon", "epsilon_high", "beta", "loss_type",
                              "max_completion_length", "tis_cap": float | null}}],
   "advantage_cases": [{"rewards": [..], "num_generations": int,
                        "scale_rewards": "group" | "batch" | "none"}]}
Output:
  {"loss_cases": [{"name", "loss", "grad": [[..]] (d loss / d logprobs), "stats": {...}}],
   "advantage_cases": [{"advantages": [..]}]}

`loss` is the loss of one micro-batch as a single-process, no-accumulation TRL step would
report it; the stats are sums over the masked-in tokens.
"""
import json
import sys

import torch

DT = torch.float64


def tensor(x):
    return None if x is None else torch.tensor(x, dtype=DT)


def policy_loss(case):
    cfg = case["config"]
    logps = tensor(case["logprobs"]).requires_grad_(True)
    mask = tensor(case["mask"])
    adv = tensor(case["advantages"])
    old = tensor(case["old"])
    ref = tensor(case["ref"])
    sampler = tensor(case["sampler"])
    # TRL: without a stored old policy the ratio is taken against the detached current one.
    old_logps = logps.detach() if old is None else old

    # Token-level importance ratio and PPO-style clipping with asymmetric bounds.
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - cfg["epsilon"], 1 + cfg["epsilon_high"])
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)

    # Truncated importance sampling against the sampler's (vLLM's) log-probs.
    is_ratio = None
    if cfg["tis_cap"] is not None:
        is_ratio = torch.clamp(torch.exp(old_logps - sampler), max=cfg["tis_cap"])
        per_token_loss = per_token_loss * is_ratio

    # k3 estimator of KL(pi || ref).
    kl = None
    if ref is not None:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
    if cfg["beta"] != 0.0:
        per_token_loss = per_token_loss + cfg["beta"] * kl

    lt = cfg["loss_type"]
    if lt == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif lt == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif lt == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * cfg["max_completion_length"])
    elif lt == "dapo":
        # num_items_in_batch: the number of completion tokens in the whole step.
        loss = (per_token_loss * mask).sum() / mask.sum()
    else:
        raise ValueError(f"unknown loss_type {lt!r}")
    loss.backward()

    with torch.no_grad():
        low = ((coef_1 < 1 - cfg["epsilon"]) & (a < 0)).to(DT)
        high = ((coef_1 > 1 + cfg["epsilon_high"]) & (a > 0)).to(DT)
        region = ((low + high) > 0).to(DT)
        stats = {
            "tokens": mask.sum().item(),
            "kl_sum": 0.0 if kl is None else (kl * mask).sum().item(),
            "low_clipped": (low * mask).sum().item(),
            "high_clipped": (high * mask).sum().item(),
            "region_clipped": (region * mask).sum().item(),
            "tis_ratio_sum": 0.0 if is_ratio is None else (is_ratio * mask).sum().item(),
        }
    return {"name": case["name"], "loss": loss.item(), "grad": logps.grad.tolist(), "stats": stats}


def advantages(case):
    g = case["num_generations"]
    rewards = tensor(case["rewards"])
    grouped = rewards.view(-1, g)
    mean = grouped.mean(dim=1).repeat_interleave(g)
    centred = rewards - mean
    scale = case["scale_rewards"]
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(g)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return {"advantages": centred.tolist()}
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return {"advantages": (centred / (std + 1e-4)).tolist()}


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "-"
    dst = sys.argv[2] if len(sys.argv) > 2 else "-"
    inp = json.load(sys.stdin if src == "-" else open(src))
    out = {
        "loss_cases": [policy_loss(c) for c in inp.get("loss_cases", [])],
        "advantage_cases": [advantages(c) for c in inp.get("advantage_cases", [])],
    }
    text = json.dumps(out)
    if dst == "-":
        sys.stdout.write(text)
    else:
        with open(dst, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
