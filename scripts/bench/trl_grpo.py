#!/usr/bin/env python3
"""TRL's GRPOTrainer on the demo task, on CPU without vLLM: the baseline for our trainer.

    bash scripts/bench/trl.sh [--task DIR] [--model DIR] [--prompts-per-step 16] ...

(trl.sh installs TRL into its own venv and runs this file there.) The data and reward are
the demo's (scripts/demo/make_task.py): each `prompt` becomes one user message, so TRL
applies the model's chat template, and the reward is make_task.accuracy_reward against
`solution`. The recipe mirrors the demo's: beta 0, loss_type "dapo", epsilon 0.2,
temperature --temperature (default 1), no top-k/top-p, one optimizer step per generation batch
(per_device_train_batch_size = prompts_per_step * num_generations, steps_per_generation 1,
so no extra forward for old log-probs), AdamW, fp32, no gradient checkpointing.

Per step it prints the wall time, the time inside generation (transformers' generate,
timed around GRPOTrainer._generate_single_turn), the rest of the step ("train": rewards,
the policy forward/backward and the optimizer step), and the token rates:
  gen_tokens_per_s   = completion tokens generated / generation seconds
  train_tokens_per_s = (prompt + completion tokens, no padding) / train seconds
At the end one JSON line holds the config, the means over the steps after the first
(the first includes one-off warm-up) and every step's row under "rows" (for
scripts/bench/grpo_vs_trl.sh, which chooses its own warm-up).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo"))
from make_task import accuracy_reward  # noqa: E402


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def reward_accuracy(completions, solution, **_):
    """make_task.accuracy_reward of each completion (conversational: the assistant text)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [accuracy_reward(t, s) for t, s in zip(texts, solution)]


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records, per generation call, its seconds and token counts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen_seconds = 0.0
        self.gen_completion_tokens = 0
        self.gen_prompt_tokens = 0

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        start = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self.gen_seconds += time.perf_counter() - start
        if len(prompt_ids) != len(completion_ids):
            raise RuntimeError(f"expected one prompt per completion, got {len(prompt_ids)} "
                               f"prompts for {len(completion_ids)} completions")
        self.gen_completion_tokens += sum(len(c) for c in completion_ids)
        self.gen_prompt_tokens += sum(len(p) for p in prompt_ids)
        return completion_ids, logprobs


class StepTimer(TrainerCallback):
    """One row per optimizer step: wall time, generation time and tokens, reward."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref
        self.rows = []
        self.start = None

    def on_step_begin(self, args, state, control, **kwargs):
        t = self.trainer_ref[0]
        t.gen_seconds, t.gen_completion_tokens, t.gen_prompt_tokens = 0.0, 0, 0
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer_ref[0]
        step_s = time.perf_counter() - self.start
        train_s = step_s - t.gen_seconds
        tokens = t.gen_prompt_tokens + t.gen_completion_tokens
        row = {"step": state.global_step, "step_s": step_s, "gen_s": t.gen_seconds,
               "train_s": train_s, "completion_tokens": t.gen_completion_tokens,
               "prompt_tokens": t.gen_prompt_tokens,
               "gen_tokens_per_s": t.gen_completion_tokens / max(t.gen_seconds, 1e-9),
               "train_tokens_per_s": tokens / max(train_s, 1e-9)}
        self.rows.append(row)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # GRPOTrainer logs its metrics (the reward among them) after on_step_end.
        if not (logs and "reward" in logs and self.rows):
            return
        row, reward = self.rows[-1], logs["reward"]
        print(f"trl step {row['step']}: {row['step_s']:.2f}s (gen {row['gen_s']:.2f}s, "
              f"train {row['train_s']:.2f}s) completion_tokens {row['completion_tokens']} "
              f"gen {row['gen_tokens_per_s']:.0f} tok/s train {row['train_tokens_per_s']:.0f} tok/s"
              + (f" reward {reward:.3f}" if reward is not None else ""), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="directory written by make_task.py")
    ap.add_argument("--model", help="model directory (default: TASK/init)")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default=None, help="TRL's output_dir (default: a temp dir)")
    args = ap.parse_args()
    for name in ("prompts_per_step", "num_generations", "max_completion_length", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        ap.error(f"--temperature must be > 0, got {args.temperature}")
    if args.num_generations < 2:
        ap.error("--num-generations must be at least 2 (group advantages need a group)")
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = args.model or os.path.join(args.task, "init")
    rows = read_jsonl(os.path.join(args.task, "train.jsonl"))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "solution": r["solution"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    out = args.output_dir or tempfile.mkdtemp(prefix="trl-grpo-bench-")
    config = GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        max_steps=args.steps, learning_rate=args.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0,
        beta=0.0, loss_type="dapo", epsilon=0.2, scale_rewards="group",
        temperature=args.temperature, top_p=1.0, top_k=0, logging_steps=1, save_strategy="no",
        report_to="none", seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer_ref = []
    timer = StepTimer(trainer_ref)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=reward_accuracy, args=config,
                               train_dataset=dataset, processing_class=tokenizer,
                               callbacks=[timer])
    trainer_ref.append(trainer)
    trainer.remove_callback(PrinterCallback)  # our rows replace its dict dumps
    trainer.train()

    steady = timer.rows[1:] or timer.rows
    mean = lambda k: sum(r[k] for r in steady) / len(steady)  # noqa: E731
    gen_s, train_s = mean("gen_s"), mean("train_s")
    summary = {
        "bench": "trl_grpo", "trl": trl.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": model_dir,
        "params": sum(p.numel() for p in model.parameters()),
        "prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length, "steps": args.steps,
        "learning_rate": args.learning_rate, "temperature": args.temperature,
        "steps_averaged": len(steady),
        "step_s": round(mean("step_s"), 4), "gen_s": round(gen_s, 4),
        "train_s": round(train_s, 4),
        "completion_tokens_per_step": round(mean("completion_tokens"), 1),
        "prompt_tokens_per_step": round(mean("prompt_tokens"), 1),
        "gen_tokens_per_s": round(mean("completion_tokens") / gen_s, 1),
        "train_tokens_per_s": round((mean("completion_tokens") + mean("prompt_tokens"))
                                    / train_s, 1),
        "per_step_s": [round(r["step_s"], 3) for r in timer.rows],
        "rows": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in timer.rows],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
