"""How reproducible transformers' own bf16 argmax is on the parity fixtures.

For each tiny fixture model: transformers' bf16 forward, rerun here (eager and sdpa),
against the bf16 logits stored in reference.safetensors (max |diff|, argmax agreement),
and the fp32 top-2 margins. model/tests/parity.rs cites these figures for its 80%
argmax-agreement bound. Run after scripts/prepare.sh:

    .venv/bin/python scripts/checks/bf16_argmax.py
"""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = "fixtures/generated/"

for name in ["qwen2-tiny", "qwen3-tiny", "llama-tiny"]:
    r = load_file(ROOT + name + "/reference.safetensors")
    m32 = AutoModelForCausalLM.from_pretrained(ROOT + name, dtype=torch.float32).eval()
    margins = []
    i = 0
    while f"seq{i}.ids" in r:
        with torch.no_grad():
            top = m32(r[f"seq{i}.ids"].unsqueeze(0)).logits[0].topk(2, -1).values
        margins += (top[:, 0] - top[:, 1]).tolist()
        i += 1
    margins.sort()
    print(f"{name}: fp32 top-2 margin median {margins[len(margins) // 2]:.3f}, min {margins[0]:.4f}")
    for attn in ["eager", "sdpa"]:
        m16 = AutoModelForCausalLM.from_pretrained(
            ROOT + name, dtype=torch.bfloat16, attn_implementation=attn
        ).eval()
        rows = []
        for j in range(i):
            with torch.no_grad():
                got = m16(r[f"seq{j}.ids"].unsqueeze(0)).logits[0].float()
            ref = r[f"seq{j}.logits_bf16"].float()
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            rows.append(f"seq{j} diff {(got - ref).abs().max().item():.3f} agree {agree:.3f}")
        print(f"  bf16 rerun ({attn}) vs stored bf16 reference: " + "; ".join(rows))
