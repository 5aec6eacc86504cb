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
                              "max_completion_length", "importance_sampling_level",
                              "delta": float | null, "sapo_temperature_pos",
                              "sapo_temperature_neg",
                              "correction": {"mode", "cap"} | null}}],
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

    # TRL _generate_and_score_completions: the vLLM importance-sampling correction.
    is_ratio = None
    corr = cfg["correction"]
    if corr is not None:
        diff = (old_logps - sampler) * mask
        mode = corr["mode"]
        if mode in ("sequence_mask", "sequence_truncate"):
            diff = diff.sum(dim=-1, keepdim=True)
        is_ratio = torch.exp(diff)
        if mode in ("sequence_truncate", "token_truncate"):
            is_ratio = torch.clamp(is_ratio, max=corr["cap"])
        elif mode in ("sequence_mask", "token_mask"):
            is_ratio = is_ratio.masked_fill(is_ratio > corr["cap"], value=0.0)
        else:
            raise ValueError(f"unknown correction mode {mode!r}")

    # TRL _compute_loss: token- or sequence-level (GSPO) importance weights.
    log_ratio = logps - old_logps
    level = cfg["importance_sampling_level"]
    if level == "token":
        log_w = log_ratio
    elif level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"unknown importance_sampling_level {level!r}")
    coef_1 = torch.exp(log_w)
    a = adv.unsqueeze(1)
    eps_lo, eps_hi = cfg["epsilon"], cfg["epsilon_high"]
    lt = cfg["loss_type"]
    if lt == "cispo":
        clamped = torch.clamp(coef_1, max=eps_hi).detach()
        per_token_loss = -clamped * a * logps
    elif lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
        c1 = coef_1 if cfg["delta"] is None else torch.clamp(coef_1, max=cfg["delta"])
        per_token_loss = -torch.min(c1 * a, coef_2 * a)
    elif lt == "sapo":
        pos = (a > 0).expand_as(coef_1)
        tau = torch.where(pos, torch.tensor(cfg["sapo_temperature_pos"], dtype=DT),
                          torch.tensor(cfg["sapo_temperature_neg"], dtype=DT))
        gate = torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau
        per_token_loss = -gate * a
    else:
        raise ValueError(f"unknown loss_type {lt!r}")
    if is_ratio is not None:
        per_token_loss = per_token_loss * is_ratio

    # k3 estimator of KL(pi || ref).
    kl = None
    if ref is not None:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
    if cfg["beta"] != 0.0:
        per_token_loss = per_token_loss + cfg["beta"] * kl

    if lt in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif lt == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif lt == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * cfg["max_completion_length"])
    elif lt in ("dapo", "cispo"):
        # num_items_in_batch: the number of completion tokens in the whole step.
        loss = (per_token_loss * mask).sum() / mask.sum()
    else:
        raise ValueError(f"unknown loss_type {lt!r}")
    loss.backward()

    with torch.no_grad():
        zero = torch.zeros_like(coef_1)
        if lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
            low = ((coef_1 < 1 - eps_lo) & (a < 0)).to(DT)
            high = ((coef_1 > 1 + eps_hi) & (a > 0)).to(DT)
        elif lt == "cispo":
            low, high = zero, ((coef_1 > eps_hi) & (a > 0)).to(DT)
        else:
            low, high = zero, zero
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
