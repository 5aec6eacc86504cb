"""Dataset fixtures for trainer/tests/data.rs, written as Hugging Face `datasets` exports them.

Usage: make_data_fixtures.py OUT_DIR QWEN_TOKENIZER_DIR LLAMA_TOKENIZER_DIR

Writes into OUT_DIR:
  prompts.parquet (snappy), prompts.zstd.parquet, prompts.gzip.parquet, prompts.jsonl
      GRPO rows: a string or conversational `prompt`, an int `id`, a string `solution`;
  shards/train-0000{0,1,2}-of-00003.parquet   the same rows split in three;
  sft.parquet, sft.jsonl    SFT rows: prompt/completion (strings or messages) and messages rows;
  expected.json   the ids transformers' apply_chat_template / tokenizer give for each row.

Parquet is written with pyarrow.parquet.write_table (what `Dataset.to_parquet` calls), with a
schema holding string, int64 and list<struct<role: string, content: string>> columns; the
JSONL files as `Dataset.to_json` writes them (one object per line, non-ASCII kept).
"""

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

SYSTEM = "Reason step by step, then give the answer in \\boxed{}."

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def grpo_rows():
    """Rows of a GRPO dataset: each prompt either a string or a message list (separate
    columns in Parquet, since a column has one type: `prompt` strings, `conversation` lists)."""
    rows = []
    for i in range(12):
        a, b = 3 * i + 1, 7 * i + 2
        rows.append({"prompt": f"What is {a} + {b}? über 数学", "id": i,
                     "solution": str(a + b)})
    return rows


def conv_rows():
    rows = []
    for i in range(6):
        conv = [{"role": "user", "content": f"Compute {i} * 17."}]
        if i % 2 == 1:
            conv.insert(0, {"role": "system", "content": "You are terse."})
        if i == 4:
            conv = conv + [{"role": "assistant", "content": "Let me think."},
                           {"role": "user", "content": "Go on."}]
        rows.append({"prompt": conv, "id": 100 + i, "solution": str(17 * i)})
    return rows


def write_parquet(rows, schema, path, compression):
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, compression=compression)


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def grpo_prompt_ids(tok, prompt, system):
    if isinstance(prompt, str):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # apply_chat_template(tokenize=True) must agree with render-then-encode.
    direct = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                     return_dict=False)
    assert list(direct) == ids, (direct, ids)
    return {"text": text, "ids": ids}


def sft_rows():
    rows = []
    for i in range(4):
        rows.append({"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}.",
                     "messages": None})
    rows.append({"prompt": None, "completion": None, "messages": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"}]})
    rows.append({"prompt": None, "completion": None, "messages": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"}]})
    return rows


def sft_expected(tok, row, system):
    """TRL SFTTrainer's tokens of one row (conversational) and its first loss token."""
    if row["messages"] is not None:
        prompt, completion = row["messages"][:-1], row["messages"][-1:]
    else:
        prompt = [{"role": "user", "content": row["prompt"]}]
        completion = [{"role": "assistant", "content": row["completion"]}]
    if system and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}] + prompt
    prompt_ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                         return_dict=False)
    ids = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
    # TRL's defaults: the completion of a prompt/completion row, every token (from the
    # first predicted one) of a messages row.
    start = 1 if row["messages"] is not None else len(prompt_ids)
    return {"ids": list(ids), "completion_start": start,
            "prefix_ok": list(ids[:len(prompt_ids)]) == list(prompt_ids)}


# A ChatML template with transformers' {% generation %} markers around what each assistant
# turn adds after its generation prompt (content, <|im_end|> and the newline after it).
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def assistant_mask_cases(tok):
    """Multi-turn conversations with transformers' own assistant-token masks
    (apply_chat_template(return_assistant_tokens_mask=True) on GENERATION_TEMPLATE): the
    independent reference for SFT's assistant_only_loss."""
    conversations = [
        [{"role": "system", "content": "Be exact."},
         {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "5"},
         {"role": "user", "content": "And 4 + 4?"},
         {"role": "assistant", "content": "It is 8."}],
        [{"role": "user", "content": "Name a prime."},
         {"role": "assistant", "content": "7"},
         {"role": "user", "content": "Another one, larger?"},
         {"role": "assistant", "content": "11, then 13."},
         {"role": "user", "content": "Thanks!"}],
        [{"role": "user", "content": "Count to three."},
         {"role": "assistant", "content": "1"},
         {"role": "user", "content": "go on"},
         {"role": "assistant", "content": "2"},
         {"role": "user", "content": "and?"},
         {"role": "assistant", "content": "3, done."}],
    ]
    rows = []
    for messages in conversations:
        out = tok.apply_chat_template(messages, chat_template=GENERATION_TEMPLATE, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        mask = list(out["assistant_masks"])
        assert 1 in mask
        rows.append({"messages": messages, "ids": list(out["input_ids"]), "mask": mask})
    return {"template": GENERATION_TEMPLATE, "rows": rows}


def main():
    out, qwen_dir, llama_dir = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    qwen = AutoTokenizer.from_pretrained(qwen_dir)
    llama = AutoTokenizer.from_pretrained(llama_dir)

    grpo = grpo_rows()
    grpo_schema = pa.schema([("prompt", pa.string()), ("id", pa.int64()),
                             ("solution", pa.string())])
    for name, compression in [("prompts.parquet", "snappy"), ("prompts.zstd.parquet", "zstd"),
                              ("prompts.gzip.parquet", "gzip")]:
        write_parquet(grpo, grpo_schema, os.path.join(out, name), compression)
    write_jsonl(grpo, os.path.join(out, "prompts.jsonl"))
    shards = os.path.join(out, "shards")
    os.makedirs(shards, exist_ok=True)
    for k, part in enumerate([grpo[:5], grpo[5:9], grpo[9:]]):
        write_parquet(part, grpo_schema, os.path.join(shards, f"train-{k:05d}-of-00003.parquet"),
                      "snappy")

    conv = conv_rows()
    conv_schema = pa.schema([("prompt", pa.list_(MESSAGE)), ("id", pa.int64()),
                             ("solution", pa.string())])
    write_parquet(conv, conv_schema, os.path.join(out, "conv.parquet"), "zstd")
    write_jsonl(conv, os.path.join(out, "conv.jsonl"))

    sft = sft_rows()
    sft_schema = pa.schema([("prompt", pa.string()), ("completion", pa.string()),
                            ("messages", pa.list_(MESSAGE))])
    write_parquet(sft, sft_schema, os.path.join(out, "sft.parquet"), "snappy")
    write_jsonl([{k: v for k, v in r.items() if v is not None} for r in sft],
                os.path.join(out, "sft.jsonl"))

    expected = {
        "grpo": [grpo_prompt_ids(qwen, r["prompt"], None) for r in grpo],
        "grpo_system": [grpo_prompt_ids(qwen, r["prompt"], SYSTEM) for r in grpo],
        "conv": [grpo_prompt_ids(qwen, r["prompt"], SYSTEM) for r in conv],
        "grpo_plain_llama": [llama(SYSTEM + "\n\n" + r["prompt"])["input_ids"] for r in grpo],
        "sft_llama": [sft_expected(llama, r, SYSTEM) for r in sft],
        "sft_qwen": [sft_expected(qwen, r, None) for r in sft],
        "sft_plain_llama": [
            {"prompt": llama(r["prompt"])["input_ids"],
             "completion": llama(r["completion"], add_special_tokens=False)["input_ids"]
             + [llama.eos_token_id]}
            for r in sft if r["prompt"] is not None],
        "system": SYSTEM,
        "assistant_masks_qwen": assistant_mask_cases(qwen),
    }
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
