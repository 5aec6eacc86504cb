//! Configs with exactly the keys of four published open-r1 recipes (values written for
//! these tests): `recipes/Qwen2.5-Math-7B/grpo/config_simple_rl.yaml`,
//! `recipes/Qwen2.5-Coder-7B-Instruct/grpo/config_codeforces.yaml` (with its duplicated
//! `do_eval` key), `recipes/Qwen2.5-1.5B-Instruct/grpo/config_demo_code.yaml` and
//! `recipes/OlympicCoder-7B/sft/config_v00.00.yaml`. Each loads: no key is unknown, each
//! key handled another way warns once, and the keys that mean the same land where they
//! mean it.
use std::collections::BTreeMap;

use trainer::config::{load_with_env, IntervalStrategy, Loaded, Recipe, Steps};
use trainer::grpo::{GrpoConfig, LossType, ScaleRewards};
use trainer::sft::SftConfig;
use trainer::zero::LrSchedulerType;

const SIMPLE_RL: &str = r#"# Model arguments
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2

# Data training arguments
dataset_name: test-org/math-tiny
dataset_config: default
system_prompt: |-
  Think inside <think> tags, then give the answer.

  #### 3

# GRPO trainer config
model_name_or_path: test-org/tiny-policy
hub_model_id: tiny-policy-rl
output_dir: data/tiny-policy-rl
wandb_project: tests
learning_rate: 2.0e-06
reward_weights:
- 1.0
- 0.25
reward_funcs:
- accuracy
- format
bf16: true
use_vllm: true
vllm_device: auto
vllm_gpu_memory_utilization: 0.5
do_eval: true
eval_strategy: steps
eval_steps: 20
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_strategy: every_save
log_completions: true
log_level: info
logging_first_step: true
logging_steps: 2
logging_strategy: steps
lr_scheduler_type: cosine
max_prompt_length: 256
max_completion_length: 128
max_steps: -1
num_generations: 4
num_train_epochs: 1
overwrite_output_dir: true
per_device_eval_batch_size: 8
per_device_train_batch_size: 8
push_to_hub: true
report_to:
- wandb
save_strategy: "epoch"
seed: 3
warmup_ratio: 0.05
"#;

const CODEFORCES: &str = r#"# Model arguments
model_name_or_path: test-org/tiny-coder
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2
# Data training arguments
dataset_name: test-org/code-tiny
dataset_prompt_column: prompt_cpp

system_prompt: "Reason in <think>\n...\n</think>, then answer in <answer>\n...\n</answer>"

# GRPO trainer config
callbacks:
- push_to_hub_revision
benchmarks:
- lcb_v4
beta: 0.0
loss_type: dr_grpo
scale_rewards: false
bf16: true
do_eval: false
eval_strategy: "no"
use_vllm: true
vllm_device: auto
vllm_gpu_memory_utilization: 0.6
do_eval: false
gradient_accumulation_steps: 4
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: test-org/tiny-coder-grpo
hub_model_revision: v00.01
hub_strategy: every_save
learning_rate: 2.0e-06
log_completions: true
log_level: info
logging_first_step: true
logging_steps: 1
logging_strategy: steps
lr_scheduler_type: constant_with_warmup
max_grad_norm: 0.5
max_prompt_length: 512
max_completion_length: 256
max_steps: -1
num_generations: 8
num_train_epochs: 3
output_dir: data/tiny-coder-grpo
overwrite_output_dir: true
per_device_train_batch_size: 8
push_to_hub: true
report_to:
- wandb
reward_funcs:
- cf_code
- code_format
reward_weights:
- 1.0
- 0.2
save_strategy: "steps"
save_steps: 0.1
save_total_limit: 2
seed: 5
temperature: 0.8
wandb_entity: tests
wandb_project: tests
warmup_ratio: 0.05

mask_truncated_completions: true
code_language: cpp
code_eval_test_batch_size: 4"#;

const DEMO_CODE: &str = r#"# Model arguments
model_name_or_path: test-org/tiny-policy
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2

# Data training arguments
dataset_name: test-org/code-tiny
dataset_configs:
- default
system_prompt: "Think first, then answer."

# GRPO trainer config
beta: 0.02
bf16: true
use_vllm: true
vllm_device: auto
vllm_gpu_memory_utilization: 0.8
do_eval: false
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: tiny-policy-code
hub_strategy: every_save
learning_rate: 1.0e-06
log_completions: true
log_level: info
logging_first_step: true
logging_steps: 1
logging_strategy: steps
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.2
max_prompt_length: 512
max_completion_length: 256
max_steps: 50
num_generations: 4
num_train_epochs: 1
output_dir: data/tiny-policy-code
overwrite_output_dir: true
per_device_train_batch_size: 8
push_to_hub: true
report_to:
- wandb
reward_funcs:
- code
- format
reward_weights:
- 1.0
- 0.2
save_strategy: "steps"
save_steps: 10
save_total_limit: 1
seed: 9
temperature: 0.9
warmup_ratio: 0.05"#;

const OLYMPIC_CODER_SFT: &str = r#"# Model arguments
model_name_or_path: test-org/tiny-coder
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2

# Data training arguments
dataset_name: test-org/code-cots-tiny
dataset_config: solutions
dataset_num_proc: 4

# SFT trainer config
bf16: true
do_eval: false
eval_strategy: 'no'
gradient_accumulation_steps: 4
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: test-org/tiny-olympic
hub_strategy: every_save
learning_rate: 2.0e-05
log_level: info
logging_steps: 1
logging_strategy: steps
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
packing: false
max_grad_norm: 0.5
max_length: 4096
max_steps: -1
num_train_epochs: 2
output_dir: data/tiny-olympic
overwrite_output_dir: true
per_device_eval_batch_size: 1
per_device_train_batch_size: 2
push_to_hub: true
report_to:
- wandb
save_strategy: "steps"
save_steps: 0.25
save_total_limit: 1
seed: 11
use_liger: true
warmup_ratio: 0.03"#;

fn load<T: Recipe>(text: &str) -> Loaded<T> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, text).unwrap();
    load_with_env::<T>(Some(&path), &[], Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The warned keys, each exactly once.
fn warned(l_warnings: &[trainer::config::RecipeWarning]) -> Vec<String> {
    let mut m = BTreeMap::new();
    for w in l_warnings {
        assert!(!w.message.is_empty(), "{}: empty warning", w.key);
        assert!(
            m.insert(w.key.clone(), ()).is_none(),
            "{} warned twice",
            w.key
        );
    }
    m.into_keys().collect()
}

#[test]
fn simple_rl_grpo_recipe_loads() {
    let l: Loaded<GrpoConfig> = load(SIMPLE_RL);
    let (c, a) = (&l.config, &l.config.args);
    assert_eq!(a.zero.compute_dtype, "bfloat16");
    assert_eq!(a.dataset.name.as_deref(), Some("test-org/math-tiny"));
    assert_eq!(a.dataset.config.as_deref(), Some("default"));
    assert!(a
        .dataset
        .system_prompt
        .as_deref()
        .unwrap()
        .ends_with("#### 3"));
    assert_eq!(c.reward_funcs, ["accuracy", "format"]);
    assert_eq!(c.reward_weights, Some(vec![1.0, 0.25]));
    assert_eq!(a.lr_scheduler_type, LrSchedulerType::Cosine);
    assert_eq!(a.save_strategy, IntervalStrategy::Epoch);
    assert_eq!(c.eval_steps, Steps::Count(20));
    // do_eval + eval_strategy steps on a dataset_name: its test split, as open-r1.
    assert_eq!(c.eval_dataset.as_ref().unwrap().split, "test");
    assert_eq!(
        warned(&l.warnings),
        [
            "attn_implementation",
            "hub_model_id",
            "hub_strategy",
            "per_device_eval_batch_size",
            "push_to_hub",
            "report_to",
            "use_vllm",
            "vllm_device",
            "vllm_gpu_memory_utilization",
            "wandb_project",
        ]
    );
}

#[test]
fn codeforces_grpo_recipe_loads_with_its_duplicate_key() {
    let l: Loaded<GrpoConfig> = load(CODEFORCES);
    let (c, a) = (&l.config, &l.config.args);
    assert_eq!(c.loss_type, LossType::DrGrpo);
    assert_eq!(c.scale_rewards, ScaleRewards::None);
    assert!(c.mask_truncated_completions);
    assert_eq!(a.dataset.prompt_column, "prompt_cpp");
    assert_eq!(a.save_steps, Steps::Ratio(0.1));
    assert_eq!(a.lr_scheduler_type, LrSchedulerType::ConstantWithWarmup);
    assert!(c.eval_dataset.is_none());
    let twice = &l
        .warnings
        .iter()
        .find(|w| w.key == "do_eval")
        .unwrap()
        .message;
    assert!(twice.contains("the last value is used"), "{twice}");
    assert_eq!(
        warned(&l.warnings),
        [
            "attn_implementation",
            "benchmarks",
            "callbacks",
            "code_eval_test_batch_size",
            "code_language",
            "do_eval",
            "hub_model_id",
            "hub_model_revision",
            "hub_strategy",
            "push_to_hub",
            "report_to",
            "use_vllm",
            "vllm_device",
            "vllm_gpu_memory_utilization",
            "wandb_entity",
            "wandb_project",
        ]
    );
}

#[test]
fn demo_code_grpo_recipe_loads() {
    let l: Loaded<GrpoConfig> = load(DEMO_CODE);
    let (c, a) = (&l.config, &l.config.args);
    // open-r1's older `dataset_configs: [name]`.
    assert_eq!(a.dataset.config.as_deref(), Some("default"));
    assert_eq!(c.beta, 0.02);
    assert_eq!(a.lr_scheduler_type, LrSchedulerType::CosineWithMinLr);
    assert_eq!(a.lr_scheduler_kwargs.min_lr_rate, Some(0.2));
    assert_eq!(a.max_steps, 50);
    assert_eq!(
        warned(&l.warnings),
        [
            "attn_implementation",
            "hub_model_id",
            "hub_strategy",
            "push_to_hub",
            "report_to",
            "use_vllm",
            "vllm_device",
            "vllm_gpu_memory_utilization",
        ]
    );
}

#[test]
fn olympic_coder_sft_recipe_loads() {
    let l: Loaded<SftConfig> = load(OLYMPIC_CODER_SFT);
    let (c, a) = (&l.config, &l.config.args);
    assert_eq!(a.zero.compute_dtype, "bfloat16");
    assert!(a.zero.gradient_checkpointing);
    assert_eq!(a.dataset.config.as_deref(), Some("solutions"));
    assert_eq!(c.max_length, 4096);
    assert_eq!(a.save_steps, Steps::Ratio(0.25));
    // TRL's SFT defaults: completion loss for prompt/completion rows, every token of
    // messages rows.
    assert_eq!(
        (c.completion_only_loss, c.assistant_only_loss),
        (None, false)
    );
    c.validate().unwrap();
    assert_eq!(
        warned(&l.warnings),
        [
            "attn_implementation",
            "dataset_num_proc",
            "hub_model_id",
            "hub_strategy",
            "per_device_eval_batch_size",
            "push_to_hub",
            "report_to",
            "use_liger",
        ]
    );
}

/// Open-R1's GRPO batch shape, `num_generations: 7` with `per_device_train_batch_size:
/// 16` on 7 processes (16 groups of 7, most spanning two ranks), used to be refused for
/// not giving each rank whole groups; it validates now, as in TRL, and a world size that
/// leaves no whole number of groups is refused naming the numbers.
#[test]
fn open_r1_batch_shape_with_groups_spanning_ranks_validates() {
    let text = SIMPLE_RL
        .replace(
            "gradient_accumulation_steps: 2",
            "gradient_accumulation_steps: 1",
        )
        .replace("num_generations: 4", "num_generations: 7")
        .replace(
            "per_device_train_batch_size: 8",
            "per_device_train_batch_size: 16",
        )
        + "\nrollout:\n  workers: [\"http://127.0.0.1:1\"]";
    let l: Loaded<GrpoConfig> = load(&text);
    let c = &l.config;
    assert_eq!(
        (c.num_generations, c.args.per_device_train_batch_size),
        (7, 16)
    );
    c.validate().unwrap();
    let layout = c.validate_world(7).unwrap();
    assert_eq!(layout.groups(), 16);
    assert!(layout.spans_ranks());
    let e = c.validate_world(4).unwrap_err().to_string();
    assert!(
        e.contains("(16) x world size (4) x gradient_accumulation_steps (1) = 64"),
        "{e}"
    );
    assert!(e.contains("num_generations (7)"), "{e}");
    // Dynamic sampling refills whole groups per rank: that combination is refused.
    let ds: Loaded<GrpoConfig> = load(&format!("{text}\ndynamic_sampling: true"));
    let e = ds.config.validate().unwrap_err().to_string();
    assert!(
        e.contains("dynamic_sampling needs every rank to hold whole groups")
            && e.contains("(16)")
            && e.contains("num_generations (7)"),
        "{e}"
    );
}
