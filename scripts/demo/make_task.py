#!/usr/bin/env python3
"""Writes the demo's task and starting model, deterministically.

    .venv/bin/python scripts/demo/make_task.py --out DIR [--seed 0]

The task is two-number addition ("What is 47+38?", two-digit operands, 10..99). Under DIR:

  init/           a tiny random-init Qwen2 (float32, tied embeddings; MODEL below) saved with
                  save_pretrained, and its tokenizer (see build_tokenizer: byte-level BPE in
                  Qwen2's layout, ~290 tokens, one token per digit, ChatML template, pad
                  `<|endoftext|>`, eos `<|im_end|>`).
  sft.jsonl       {"prompt", "completion"}: the user message and the assistant's reply, a
                  one-step scratchpad and the answer: "<think>7+8=15</think><answer>85</answer>"
                  (12-13 tokens with the eos). The replies come from a *sloppy teacher*: the
                  scratchpad is always right but only P_CORRECT of the answers are; the others
                  are systematically off (+1 or +10, see TEACHER). Each SFT prompt appears
                  SFT_COPIES times with independent draws, so supervised training learns the
                  teacher's distribution over answers, not one memorised answer per prompt.
                  The SFT model therefore samples the right answer about 40% of the time; GRPO
                  with an exact-answer reward has a clear, prompt-independent error to unlearn.
                  (The scratchpad carries the units into the tens, which makes the addition
                  learnable by a 3-layer model in ~500 SFT steps on every seed tried; without
                  it, SFT stalled on a loss plateau for a seed-dependent 400-1100+ steps.)
  train.jsonl     {"prompt", "solution"}: GRPO prompts (the SFT prompts, reshuffled).
  heldout.jsonl   {"prompt", "solution"}: HELDOUT_SIZE prompts in neither file above.

Conventions shared with the trainer: `prompt` is the text of one user message, rendered
with the tokenizer's chat template and add_generation_prompt=True; the SFT target is the
completion's tokens followed by the eos token `<|im_end|>`; `solution` is the exact sum as
a decimal string, which the accuracy reward (`accuracy_reward` below: \\boxed{...}, then
<answer>...</answer>, then the last number) compares as a number.
"""

import argparse
import json
import os
import random
import re
import shutil

import torch
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, trainers)
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# The sloppy teacher: P(correct) and the systematic errors (offset added to the true sum,
# probability). "+1" is the single most likely answer, yet the SFT model's greedy decoding
# is mostly right (it puts less mass on a+b+1 than taught); sampled accuracy starts near
# P_CORRECT, which is what GRPO raises.
P_CORRECT = 0.35
TEACHER = [(+1, 0.45), (+10, 0.20)]
MIN_OPERAND = 10
MAX_OPERAND = 99
HELDOUT_SIZE = 256
SFT_COPIES = 4

MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=True)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
# Words merged into single tokens; digits and punctuation stay one byte-level token each.
WORDS = ["system", "user", "assistant", "What", " is", "boxed", "answer", "think"]
# Qwen2's pre-tokenizer split (one token per digit), which transformers' Qwen2Tokenizer
# rebuilds around whatever vocab and merges a Qwen2 checkpoint ships.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = """{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def build_tokenizer():
    """A byte-level BPE tokenizer in Qwen2's layout (NFC, Qwen2 split, byte-level), with the
    256 byte symbols plus merges that make each of WORDS one token: every text encodes, each
    digit is one token, and the chat tags and ChatML markers are added tokens (~290 in all).

    The layout matters: for a `qwen2` config, transformers' AutoTokenizer always builds a
    Qwen2Tokenizer (byte-level BPE with this split) from tokenizer.json's vocab and merges,
    so any other tokenizer model would load wrongly there."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Every word of the corpus is merged fully: the trainer stops when no pair is left.
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(WORDS, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL["max_position_embeddings"],
    )


def build_model(tokenizer, seed):
    """A random-init Qwen2 (transformers' own initialisation, seeded) sized by MODEL."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=None,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      **MODEL)
    return Qwen2ForCausalLM(cfg).float()


def prompt_text(a, b):
    return f"What is {a}+{b}?"


def completion_text(a, b, answer):
    """The assistant's reply: a one-step scratchpad (the units digits' sum, which carries
    into the tens) and the answer, e.g. "<think>7+8=15</think><answer>85</answer>"."""
    return f"<think>{a % 10}+{b % 10}={a % 10 + b % 10}</think><answer>{answer}</answer>"


def teacher_answer(total, rng):
    """The sloppy teacher's answer for a true sum: right with P_CORRECT, else off by one of
    the TEACHER offsets."""
    u = rng.random()
    if u < P_CORRECT:
        return total
    u -= P_CORRECT
    for offset, p in TEACHER:
        if u < p:
            return total + offset
        u -= p
    return total + TEACHER[-1][0]


_NUMBER = r"-?\d+(?:\.\d+)?"


def extract_answer(text):
    """The final answer of a completion: the last \\boxed{...}, else the last
    <answer>...</answer>, else the last number; None if there is none."""
    for pattern in (r"\\boxed\{([^{}]*)\}", r"<answer>(.*?)</answer>"):
        found = re.findall(pattern, text, flags=re.S)
        if found:
            return found[-1].strip()
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def accuracy_reward(completion, solution):
    """1.0 when the extracted answer equals `solution` as a number, else 0.0."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    try:
        return 1.0 if float(answer) == float(solution) else 0.0
    except ValueError:
        return 0.0


def split_prompts(seed):
    """All operand pairs, shuffled; the first HELDOUT_SIZE are held out."""
    pairs = [(a, b) for a in range(MIN_OPERAND, MAX_OPERAND + 1)
             for b in range(MIN_OPERAND, MAX_OPERAND + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs[HELDOUT_SIZE:], pairs[:HELDOUT_SIZE]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0, help="seed for data and initial weights")
    ap.add_argument("--no-model", action="store_true",
                    help="write only the datasets (the demo ships its checkpoint)")
    args = ap.parse_args()

    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)

    tokenizer = build_tokenizer()
    model = None
    if not args.no_model:
        model = build_model(tokenizer, args.seed)
        init = os.path.join(args.out, "init")
        model.save_pretrained(init)
        tokenizer.save_pretrained(init)

    train, heldout = split_prompts(args.seed)
    rng = random.Random(args.seed + 1)
    sft = []
    for _ in range(SFT_COPIES):
        for a, b in train:
            sft.append({"prompt": prompt_text(a, b),
                        "completion": completion_text(a, b, teacher_answer(a + b, rng))})
    rng.shuffle(sft)
    write_jsonl(os.path.join(args.out, "sft.jsonl"), sft)

    grpo = [{"prompt": prompt_text(a, b), "solution": str(a + b)} for a, b in train]
    rng.shuffle(grpo)
    write_jsonl(os.path.join(args.out, "train.jsonl"), grpo)
    write_jsonl(os.path.join(args.out, "heldout.jsonl"),
                [{"prompt": prompt_text(a, b), "solution": str(a + b)} for a, b in heldout])

    params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    print(f"task written to {args.out}: model {params} parameters, vocab {len(tokenizer)}, "
          f"sft {len(sft)} rows, train {len(grpo)} prompts, heldout {len(heldout)} prompts")


if __name__ == "__main__":
    main()
