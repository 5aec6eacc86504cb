#!/usr/bin/env python3
"""Runs a checkpoint directory through transformers and writes its fp32 logits.

    hf_logits.py MODEL_DIR IDS_JSON OUT.safetensors

IDS_JSON is a JSON list of token-id lists; OUT gets `seq{i}.logits` [T, V] (fp32) per
sequence, each run alone. The parity tests use it to check that transformers loads a
checkpoint written by this project and computes what we compute.
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main():
    model_dir, ids_path, out = sys.argv[1:4]
    with open(ids_path) as f:
        seqs = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    result = {}
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            x = torch.tensor([ids], dtype=torch.long)
            result[f"seq{i}.logits"] = model(x).logits[0].float().contiguous()
    save_file(result, out)


if __name__ == "__main__":
    main()
