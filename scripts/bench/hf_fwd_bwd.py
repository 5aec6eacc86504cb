#!/usr/bin/env python3
"""transformers reference for `cargo bench -p model --bench model`'s fwd_bwd case: the
same ~20M-parameter Qwen2 shape, batch 4 x 512 tokens, fp32 on CPU, loss = mean token
log-prob (log_softmax over the full logits, as TRL computes it), forward+backward."""
import resource
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, attn_implementation="sdpa")
model = Qwen2ForCausalLM(cfg)
params = sum(p.numel() for p in model.parameters())
b, t = 4, 512
ids = torch.randint(0, cfg.vocab_size, (b, t))
targets = ids.roll(-1, 1)


def step():
    logits = model(ids).logits.float()
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    lp.mean().backward()
    model.zero_grad(set_to_none=False)


step()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
iters = 3
start = time.perf_counter()
for _ in range(iters):
    step()
secs = (time.perf_counter() - start) / iters
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, whole process
print(f"hf_fwd_bwd params={params} batch={b} seq={t} step_s={secs:.3f} "
      f"tokens_per_s={b * t / secs:.0f} threads={torch.get_num_threads()} "
      f"process_peak_mib={peak / 1024:.0f}")
