#!/usr/bin/env python3
"""Writes the test fixtures, deterministically, with transformers as the reference.

    .venv/bin/python scripts/make_fixtures.py fixtures/generated

Produces, under the output directory:
  tokenizer/            a tiny byte-level BPE tokenizer trained here (Qwen2-style split regex),
                        saved by transformers (tokenizer.json, tokenizer_config.json, chat template)
  qwen2-tiny/           random Qwen2: GQA (4 heads, 2 kv heads), q/k/v bias, tied embeddings, f32,
                        one model.safetensors; plus the tokenizer with a ChatML template
  qwen2-tiny-bf16/      the same weights saved in bf16
  qwen3-tiny/           random Qwen3 (dense): per-head q/k RMSNorm, GQA (6 heads, 2 kv heads),
                        explicit head_dim 16 (hidden 64), untied, same references as qwen2-tiny
  llama-tiny/           random Llama: untied, GQA (6 heads, 2 kv heads), llama3 rope scaling,
                        f32, sharded (model.safetensors.index.json); plus the tokenizer with a
                        Llama-3-style template inlined in tokenizer_config.json
  <model>/reference.safetensors
                        transformers' outputs in fp32 for sequences of different lengths:
                        seq{i}.ids [T] i64, seq{i}.logits [T, V] f32, seq{i}.logprobs [T-1] f32
                        (log-prob of token t+1 given the prefix), seq{i}.greedy [N] i64 (greedy
                        continuation, N new tokens), seq{i}.logits_bf16 [T, V] f32 (the model run
                        in bf16, logits cast to f32)
  zoo/<variant>/        more shapes of both families, each with reference.safetensors holding
                        `ids` [B, T] and transformers' fp32 `logits` [B, T, V] (see ZOO)
  chat_reference.json   prompts rendered by apply_chat_template, their token ids, and decodes
  .stamp                sha256 of this script; scripts/test.sh regenerates when it differs
"""

import hashlib
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SEED = 1234
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>",
           "<|start_header_id|>", "<|end_header_id|>", "<think>", "</think>"]

CHATML_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>tools\\n' }}
    {%- for tool in tools %}
        {{- tool | tojson }}
        {{- '\\n' }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role in ['user', 'assistant'] %}
        {%- set content = message.content %}
        {%- if message.role == 'assistant' and '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\\n' + content | trim + '<|im_end|>' + '\\n' }}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n<think>\\n' }}
{%- endif %}
"""

LLAMA_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be system, user or assistant') }}
    {%- endif %}
    {%- if message['role'] != 'system' %}{% set ns.turns = ns.turns + 1 %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {{- message['content'] | tojson(indent=2) }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{#- turns: {{ ns.turns }} #}
"""


def corpus():
    """A deterministic training text: arithmetic, words, code-ish lines and some non-ASCII."""
    g = torch.Generator().manual_seed(SEED)
    words = ("the model reasons step by step about numbers and answers with a boxed result "
             "think answer because therefore sum product difference quotient equals prime "
             "über café naïve 数学 答案 привет λ").split()
    lines = []
    for i in range(3000):
        a, b = (torch.randint(0, 1000, (2,), generator=g)).tolist()
        n = torch.randint(3, 12, (1,), generator=g).item()
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        lines.append(" ".join(words[j] for j in idx))
        lines.append(f"What is {a} + {b}? <think>{a} plus {b} is {a + b}.</think> \\boxed{{{a + b}}}")
        if i % 7 == 0:
            lines.append(f"def f(x):\n    return x * {a} - {b}  # comment\n")
    return lines


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def fast_tokenizer(tok, template, bos):
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|im_end|>" if bos is None else "<|eot_id|>",
        pad_token="<|endoftext|>",
        chat_template=template,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def randomize(model, seed):
    """Random weights of a realistic scale; norms and biases are not left at 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))


def reference(model, seqs, greedy_tokens=8):
    model.eval()
    out = {}
    bf16 = None
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            x = torch.tensor([ids], dtype=torch.long)
            logits = model(x).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            out[f"seq{i}.ids"] = x[0].clone()
            out[f"seq{i}.logits"] = logits.contiguous()
            out[f"seq{i}.logprobs"] = logp[:-1].gather(-1, x[0, 1:, None])[:, 0].contiguous()
            cur = x
            for _ in range(greedy_tokens):
                nxt = model(cur).logits[0, -1].argmax()
                cur = torch.cat([cur, nxt.view(1, 1)], dim=1)
            out[f"seq{i}.greedy"] = cur[0, len(ids):].clone()
        bf16 = model.to(torch.bfloat16)
        for i, ids in enumerate(seqs):
            x = torch.tensor([ids], dtype=torch.long)
            out[f"seq{i}.logits_bf16"] = bf16(x).logits[0].float().contiguous()
        model.to(torch.float32)
    return out


def conversations():
    return [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "system", "content": "You are a careful mathematician."},
         {"role": "user", "content": "  Compute 17 * 3.  "},
         {"role": "assistant", "content": "<think>\n17 * 3 = 51</think>\n\\boxed{51}"},
         {"role": "user", "content": "And \"quoted\" naïve café 数学?\nTwo lines."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]


TOOLS = [{"type": "function", "function": {"name": "add", "description": "Adds — two numbers",
                                           "parameters": {"a": 1, "b": [1.5, True, None, "é"]}}}]


def chat_reference(tokenizers_by_name):
    cases = []
    for name, tk in tokenizers_by_name.items():
        for ci, conv in enumerate(conversations()):
            for agp in (False, True):
                tools = TOOLS if (name == "qwen2-tiny" and ci == 0) else None
                text = tk.apply_chat_template(conv, tools=tools, tokenize=False,
                                              add_generation_prompt=agp)
                ids = tk(text, add_special_tokens=False)["input_ids"]
                cases.append({"model": name, "messages": conv, "tools": tools,
                              "add_generation_prompt": agp, "text": text, "ids": ids,
                              "decoded": tk.decode(ids, skip_special_tokens=False),
                              "decoded_skip_special": tk.decode(ids, skip_special_tokens=True)})
        # Structured content: the Llama template renders it with tojson(indent=2).
        if name == "llama-tiny":
            conv = [{"role": "user", "content": [{"type": "text", "text": "ünïcode & <tags>",
                                                  "n": 3.25, "ok": False}]}]
            text = tk.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            ids = tk(text, add_special_tokens=False)["input_ids"]
            cases.append({"model": name, "messages": conv, "tools": None,
                          "add_generation_prompt": True, "text": text, "ids": ids,
                          "decoded": tk.decode(ids, skip_special_tokens=False),
                          "decoded_skip_special": tk.decode(ids, skip_special_tokens=True)})
    # A bad role must raise through raise_exception.
    errors = []
    for name, tk in tokenizers_by_name.items():
        try:
            tk.apply_chat_template([{"role": "wizard", "content": "x"}], tokenize=False)
            raise SystemExit(f"{name}: expected raise_exception")
        except Exception as e:  # jinja2's TemplateError
            errors.append({"model": name, "messages": [{"role": "wizard", "content": "x"}],
                           "message": str(e)})
    return {"cases": cases, "errors": errors}


# Variants of both families that transformers can save: (name, architecture, config,
# saved dtype, rewrite config.json into the transformers 4 layout, max_shard_size).
ZOO = [
    ("llama-mqa-headdim-bias-tied", "llama",
     dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=1, head_dim=24, attention_bias=True, mlp_bias=True,
          tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     torch.float16, False, None),
    ("qwen2-mha-untied-v4-bf16", "qwen2",
     dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
          num_key_value_heads=3, tie_word_embeddings=False, rope_theta=1e6),
     torch.bfloat16, True, None),
    ("llama3-rope-v4-odd", "llama",
     dict(hidden_size=40, intermediate_size=97, num_hidden_layers=1, num_attention_heads=5,
          num_key_value_heads=5, vocab_size=333, rms_norm_eps=1e-5, rope_theta=500000.0,
          rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
     torch.float32, True, None),
    ("qwen3-tied-bias-mha", "qwen3",
     dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=3,
          num_key_value_heads=3, head_dim=16, attention_bias=True, tie_word_embeddings=True,
          rope_theta=1e6),
     torch.bfloat16, False, None),
    ("qwen3-gqa-headdim-v4", "qwen3",
     dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rms_norm_eps=1e-5),
     torch.float32, True, None),
    ("qwen2-deep-sharded", "qwen2",
     dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
          num_key_value_heads=1, tie_word_embeddings=True, eos_token_id=[1, 2]),
     torch.float32, False, "40KB"),
]


def to_v4_layout(path):
    """Rewrites a transformers 5 config.json the way transformers 4 wrote it."""
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    cfg["transformers_version"] = "4.46.0"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def zoo(out, vocab):
    from transformers import AutoModelForCausalLM
    for k, (name, arch, kwargs, dtype, v4, shard) in enumerate(ZOO):
        kwargs = dict(kwargs)
        v = kwargs.pop("vocab_size", vocab)
        cfg_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                              "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                              "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
        model = model_cls(cfg_cls(vocab_size=v, max_position_embeddings=128, **kwargs))
        randomize(model, SEED + 100 + k)
        if kwargs.get("tie_word_embeddings"):
            model.tie_weights()
        d = os.path.join(out, "zoo", name)
        model.to(dtype).save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        if v4:
            to_v4_layout(os.path.join(d, "config.json"))
        # The reference is transformers' own load of what was written, in fp32.
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(SEED + k)
        ids = torch.randint(0, v, (2, 9), generator=g)
        with torch.no_grad():
            logits = ref(ids).logits.float().contiguous()
        save_file({"ids": ids, "logits": logits}, os.path.join(d, "reference.safetensors"))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "fixtures/generated"
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    tok = train_tokenizer()
    qwen_tok = fast_tokenizer(tok, CHATML_TEMPLATE, None)
    llama_tok = fast_tokenizer(tok, LLAMA_TEMPLATE, "<|begin_of_text|>")
    qwen_tok.save_pretrained(os.path.join(out, "tokenizer"))
    vocab = (len(qwen_tok) + 31) // 32 * 32  # padded like real checkpoints (V > tokenizer size)

    qcfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=qwen_tok.convert_tokens_to_ids("<|im_end|>"))
    qwen = Qwen2ForCausalLM(qcfg)
    randomize(qwen, SEED + 1)
    qwen.tie_weights()

    lcfg = LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                       rope_theta=500000.0,
                       bos_token_id=llama_tok.convert_tokens_to_ids("<|begin_of_text|>"),
                       eos_token_id=llama_tok.convert_tokens_to_ids("<|eot_id|>"))
    llama = LlamaForCausalLM(lcfg)
    randomize(llama, SEED + 2)

    # Qwen3 dense: per-head q/k RMSNorm, head_dim (16) apart from hidden / heads, untied.
    q3cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=256, rope_theta=1000000.0, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
                        bos_token_id=None, eos_token_id=qwen_tok.convert_tokens_to_ids("<|im_end|>"))
    qwen3 = Qwen3ForCausalLM(q3cfg)
    randomize(qwen3, SEED + 3)

    texts = ["What is 12 + 30? <think>", "def f(x):\n    return x * 3 - 1", "über 数学 答案",
             "the model reasons step by step about numbers and answers 42 + 17 = 59 therefore"]
    seqs = [qwen_tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    qdir = os.path.join(out, "qwen2-tiny")
    qwen.save_pretrained(qdir)
    qwen_tok.save_pretrained(qdir)
    save_file(reference(qwen, seqs), os.path.join(qdir, "reference.safetensors"))

    q3dir = os.path.join(out, "qwen3-tiny")
    qwen3.save_pretrained(q3dir)
    qwen_tok.save_pretrained(q3dir)
    save_file(reference(qwen3, seqs), os.path.join(q3dir, "reference.safetensors"))

    qbf = os.path.join(out, "qwen2-tiny-bf16")
    qwen.to(torch.bfloat16).save_pretrained(qbf)
    qwen_tok.save_pretrained(qbf)
    qwen.to(torch.float32)

    ldir = os.path.join(out, "llama-tiny")
    llama.save_pretrained(ldir, max_shard_size="100KB")
    llama_tok.save_pretrained(ldir)
    # Inline the template in tokenizer_config.json (the older layout), so both are covered.
    tpl_file = os.path.join(ldir, "chat_template.jinja")
    cfg_file = os.path.join(ldir, "tokenizer_config.json")
    with open(cfg_file) as f:
        tcfg = json.load(f)
    if os.path.exists(tpl_file):
        with open(tpl_file) as f:
            tcfg["chat_template"] = f.read()
        os.remove(tpl_file)
    with open(cfg_file, "w") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
    save_file(reference(llama, [[lcfg.bos_token_id] + s for s in seqs]),
              os.path.join(ldir, "reference.safetensors"))

    zoo(out, vocab)

    ref = chat_reference({"qwen2-tiny": qwen_tok, "llama-tiny": llama_tok})
    with open(os.path.join(out, "chat_reference.json"), "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)

    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(out, ".stamp"), "w") as f:
        f.write(digest + "\n")
    print(f"fixtures written to {out}")


if __name__ == "__main__":
    main()
