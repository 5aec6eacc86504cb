//! TRL / Open-R1 recipes carried over unchanged, and Hub ids resolved in a Hugging Face
//! cache laid out (as `huggingface-cli download` leaves it) in a temporary directory.
//!
//! The recipes below are written for these tests in the shape of Open-R1's
//! `recipes/*/grpo/config_demo.yaml` and `recipes/*/sft/config_*.yaml`: TRL's GRPOConfig /
//! SFTConfig keys, transformers' TrainingArguments, TRL's ModelConfig and ScriptArguments,
//! and Open-R1's own (system_prompt, chat_template, wandb_*, callbacks, benchmarks).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use trainer::config::{load_with_env, ConfigError, IntervalStrategy, Loaded, LogLevel};
use trainer::data::{load_prompts, DatasetConfig};
use trainer::grpo::loss::{ImportanceSamplingLevel, IsCorrectionMode};
use trainer::grpo::{GrpoConfig, LossType, ScaleRewards};
use trainer::sft::SftConfig;
use trainer::zero::LrSchedulerType;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Hugging Face cache in a temporary directory, exported as HF_HUB_CACHE once for this
/// test binary: the fixture Qwen3 model under `models--test-org--Qwen3-Tiny` and a math
/// dataset under `datasets--test-org--Math-Mini` with a card whose `configs:` name the
/// files of each split.
fn hub_cache() -> &'static Path {
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let hub = dir.path().join("hub");
            let snap = |repo: &str, hash: &str| {
                let r = hub.join(repo);
                std::fs::create_dir_all(r.join("refs")).unwrap();
                std::fs::write(r.join("refs/main"), hash).unwrap();
                let s = r.join("snapshots").join(hash);
                std::fs::create_dir_all(&s).unwrap();
                s
            };
            let model = snap("models--test-org--Qwen3-Tiny", "0123abcd");
            let fixture = root().join("fixtures/generated/qwen3-tiny");
            for entry in std::fs::read_dir(&fixture).unwrap() {
                let p = entry.unwrap().path();
                std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
            }
            let data = snap("datasets--test-org--Math-Mini", "feedbeef");
            std::fs::write(
                data.join("README.md"),
                "---\nlicense: apache-2.0\nconfigs:\n- config_name: default\n  data_files:\n  \
                 - split: train\n    path: data/train-*\n  - split: test\n    path: data/test-*\n\
                 - config_name: hard\n  data_files: hard/*.jsonl\n---\n# Math-Mini\n",
            )
            .unwrap();
            std::fs::create_dir_all(data.join("data")).unwrap();
            std::fs::create_dir_all(data.join("hard")).unwrap();
            let rows = |n: usize, tag: &str| -> String {
                (0..n)
                    .map(|i| {
                        format!(
                            "{{\"problem\": \"{tag} {i} + 1?\", \"solution\": \"{}\"}}\n",
                            i + 1
                        )
                    })
                    .collect()
            };
            std::fs::write(data.join("data/train-00000-of-00002.jsonl"), rows(3, "a")).unwrap();
            std::fs::write(data.join("data/train-00001-of-00002.jsonl"), rows(2, "b")).unwrap();
            std::fs::write(data.join("data/test-00000-of-00001.jsonl"), rows(2, "t")).unwrap();
            std::fs::write(data.join("hard/part.jsonl"), rows(4, "h")).unwrap();
            std::env::set_var("HF_HUB_CACHE", &hub);
            dir
        })
        .path()
}

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n<think>\\n'}}{% endif %}";

/// Open-R1's GRPO demo shape (DeepSeek-R1-Distill-Qwen-1.5B/grpo/config_demo.yaml).
fn grpo_recipe() -> String {
    format!(
        r#"# Model arguments
model_name_or_path: test-org/Qwen3-Tiny
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2

# Data training arguments
chat_template: "{template}"
dataset_name: test-org/Math-Mini
dataset_prompt_column: problem
system_prompt: "You are a helpful AI Assistant. Think in <think> tags."

# GRPO trainer config
bf16: true
use_vllm: true
vllm_device: auto
vllm_gpu_memory_utilization: 0.7
do_eval: true
eval_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 4
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: Qwen3-Tiny-GRPO
hub_strategy: every_save
learning_rate: 1.0e-06
log_completions: true
num_completions_to_print: 2
log_level: info
logging_first_step: true
logging_steps: 1
logging_strategy: steps
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
max_prompt_length: 512
max_completion_length: 1024
max_steps: -1
num_generations: 8
num_train_epochs: 1
output_dir: data/Qwen3-Tiny-GRPO
overwrite_output_dir: true
per_device_eval_batch_size: 16
per_device_train_batch_size: 16
push_to_hub: true
report_to:
- wandb
reward_funcs:
- accuracy
- format
- tag_count
reward_weights:
- 1.0
- 1.0
- 1.0
cosine_max_len: 1000
repetition_n_grams: 3
scale_rewards: false
loss_type: dr_grpo
importance_sampling_level: sequence
vllm_importance_sampling_correction: true
vllm_importance_sampling_mode: token_truncate
vllm_importance_sampling_cap: 2.0
save_strategy: "epoch"
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
wandb_project: open-r1
wandb_entity: someone
callbacks:
- push_to_hub_revision
benchmarks:
- math_500
"#,
        template = CHAT_TEMPLATE.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

/// Open-R1's SFT shape (R1-Distill-Qwen3-8B/sft/config_v00.00.yaml).
const SFT_RECIPE: &str = r#"model_name_or_path: test-org/Qwen3-Tiny
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2
dataset_name: test-org/Math-Mini
dataset_config: hard
dataset_num_proc: 12
eos_token: <|im_end|>
bf16: true
do_eval: false
eval_strategy: 'no'
gradient_accumulation_steps: 4
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: true
hub_model_id: open-r1/R1-Distill-Qwen3-Tiny
hub_model_revision: v00.00
hub_strategy: every_save
learning_rate: 4.0e-05
log_level: warning
logging_steps: 1
logging_strategy: steps
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
packing: false
max_grad_norm: 0.2
max_length: 32768
max_steps: -1
num_train_epochs: 5
output_dir: data/R1-Distill-Qwen3-Tiny
overwrite_output_dir: true
per_device_eval_batch_size: 2
per_device_train_batch_size: 2
push_to_hub: true
report_to:
- wandb
save_strategy: epoch
save_total_limit: 1
seed: 42
use_liger_kernel: true
warmup_steps: 10
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load<T: trainer::config::Recipe>(
    text: &str,
    sets: &[&str],
    env: &[(&str, &str)],
) -> Result<Loaded<T>, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "recipe.yaml", text);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_with_env::<T>(Some(&path), &sets, env)
}

/// Warnings by key, asserting each key warned exactly once.
fn warned(warnings: &[trainer::config::RecipeWarning]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for w in warnings {
        assert!(
            m.insert(w.key.clone(), w.message.clone()).is_none(),
            "{} warned twice",
            w.key
        );
    }
    m
}

#[test]
fn open_r1_grpo_recipe_loads_unchanged() {
    hub_cache();
    let l: Loaded<GrpoConfig> = load(
        &grpo_recipe(),
        &["rollout.workers=[\"http://127.0.0.1:50051\"]"],
        &[("TRAINER_ID", "unrelated"), ("TRAINER__SEED", "7")],
    )
    .unwrap();
    let c = &l.config;
    let a = &c.args;
    // Same meaning, another place.
    assert_eq!(a.zero.compute_dtype, "bfloat16");
    assert!(a.zero.gradient_checkpointing);
    assert_eq!(a.dataset.name.as_deref(), Some("test-org/Math-Mini"));
    assert_eq!(a.dataset.prompt_column, "problem");
    assert!(a
        .dataset
        .system_prompt
        .as_deref()
        .unwrap()
        .contains("<think>"));
    assert_eq!(a.chat_template.as_deref(), Some(CHAT_TEMPLATE));
    // eval_strategy steps with a dataset_name evaluates on its test split, as Open-R1.
    let eval = c.eval_dataset.as_ref().unwrap();
    assert_eq!(
        (eval.name.as_deref(), eval.split.as_str()),
        (Some("test-org/Math-Mini"), "test")
    );
    assert_eq!(eval.prompt_column, "problem");
    assert_eq!(c.rewards.cosine_max_len, Some(1000));
    // Same meaning, same name.
    assert_eq!(a.lr_scheduler_type, LrSchedulerType::CosineWithMinLr);
    assert_eq!(a.lr_scheduler_kwargs.min_lr_rate, Some(0.1));
    assert_eq!(a.save_strategy, IntervalStrategy::Epoch);
    assert_eq!(a.logging_strategy, IntervalStrategy::Steps);
    assert!(a.logging_first_step);
    assert_eq!(a.log_level, LogLevel::Info);
    assert_eq!(a.model_revision.as_deref(), Some("main"));
    assert_eq!(c.scale_rewards, ScaleRewards::None);
    assert_eq!(c.loss_type, LossType::DrGrpo);
    assert_eq!(
        c.importance_sampling_level,
        ImportanceSamplingLevel::Sequence
    );
    assert_eq!(
        c.vllm_importance_sampling_mode,
        IsCorrectionMode::TokenTruncate
    );
    assert_eq!(c.vllm_importance_sampling_cap, 2.0);
    assert!(c.log_completions);
    assert_eq!(c.num_completions_to_print, Some(2));
    assert_eq!(c.eval_steps, trainer::config::Steps::Count(100));
    // The environment layer: TRAINER__ only; TRAINER_ID is not a setting.
    assert_eq!(a.seed, 7);
    c.validate().unwrap();

    // Handled another way: one warning each, saying what happens instead.
    let w = warned(&l.warnings);
    let keys: Vec<&str> = w.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        keys,
        [
            "attn_implementation",
            "benchmarks",
            "callbacks",
            "hub_model_id",
            "hub_strategy",
            "per_device_eval_batch_size",
            "push_to_hub",
            "report_to",
            "use_vllm",
            "vllm_device",
            "vllm_gpu_memory_utilization",
            "wandb_entity",
            "wandb_project",
        ]
    );
    assert!(
        w["use_vllm"].contains("rollout workers"),
        "{}",
        w["use_vllm"]
    );
    assert!(
        w["push_to_hub"].contains("output_dir"),
        "{}",
        w["push_to_hub"]
    );
    assert!(w["report_to"].contains("Prometheus"), "{}", w["report_to"]);

    // The Hub ids resolve in the cache: the model's snapshot, the dataset's card configs.
    let dir =
        model::hub::resolve_model(&a.model_name_or_path, a.model_revision.as_deref()).unwrap();
    assert!(
        dir.ends_with("models--test-org--Qwen3-Tiny/snapshots/0123abcd"),
        "{}",
        dir.display()
    );
    let mut tok = model::Tokenizer::from_dir(&dir).unwrap();
    tok.set_chat_template(a.chat_template.as_deref().unwrap(), Path::new("recipe"))
        .unwrap();
    let (prompts, report) = load_prompts(&a.dataset, &tok, c.max_prompt_length).unwrap();
    assert_eq!((report.total_rows, prompts.len()), (5, 5));
    let (test, _) = load_prompts(eval, &tok, c.max_prompt_length).unwrap();
    assert_eq!(test.len(), 2);
}

#[test]
fn open_r1_sft_recipe_loads_unchanged() {
    hub_cache();
    let l: Loaded<SftConfig> = load(SFT_RECIPE, &[], &[]).unwrap();
    let c = &l.config;
    assert_eq!(c.args.zero.compute_dtype, "bfloat16");
    assert_eq!(c.args.dataset.config.as_deref(), Some("hard"));
    assert_eq!(c.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(c.max_length, 32768);
    assert_eq!(c.args.warmup_steps, 10);
    assert_eq!(c.args.log_level, LogLevel::Warning);
    assert_eq!(c.args.max_grad_norm, 0.2);
    c.validate().unwrap();
    let w = warned(&l.warnings);
    let keys: Vec<&str> = w.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        keys,
        [
            "attn_implementation",
            "dataset_num_proc",
            "hub_model_id",
            "hub_model_revision",
            "hub_strategy",
            "per_device_eval_batch_size",
            "push_to_hub",
            "report_to",
            "use_liger_kernel",
        ]
    );
    // The config "hard" of the card: its one pattern is the train split.
    let dir = model::hub::resolve_model(&c.args.model_name_or_path, None).unwrap();
    let mut tok = model::Tokenizer::from_dir(&dir).unwrap();
    tok.set_eos_token("<|im_end|>").unwrap();
    assert!(tok.set_eos_token("<|not a token|>").is_err());
    let files = trainer::data::hub::dataset_files(
        &model::hub::HubCache::from_env(),
        "test-org/Math-Mini",
        Some("hard"),
        "train",
    )
    .unwrap();
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with("hard/part.jsonl"));
    // packing: true is accepted with a warning (examples are padded, not packed).
    let packed = SFT_RECIPE.replace("packing: false", "packing: true");
    let l: Loaded<SftConfig> = load(&packed, &[], &[]).unwrap();
    assert!(warned(&l.warnings).contains_key("packing"));
    // OlympicCoder-7B/sft/config_v00.00.yaml saves every 0.2 of the run (transformers'
    // fractional `save_steps`): every 20 steps of 100, rounded up as transformers does.
    let fraction = SFT_RECIPE.replace(
        "save_strategy: epoch",
        "save_strategy: \"steps\"\nsave_steps: 0.2",
    );
    let l: Loaded<SftConfig> = load(&fraction, &[], &[]).unwrap();
    assert_eq!(l.config.args.save_steps, trainer::config::Steps::Ratio(0.2));
    l.config.validate().unwrap();
    assert_eq!(l.config.args.save_interval(7, 100).every, Some(20));
    assert_eq!(l.config.args.save_interval(7, 101).every, Some(21));
    let bad = SFT_RECIPE.replace("save_strategy: epoch", "save_steps: 2.5");
    let l: Loaded<SftConfig> = load(&bad, &[], &[]).unwrap();
    let e = l.config.validate().unwrap_err();
    assert_eq!(e.field(), "save_steps");
    assert!(
        e.to_string().contains("fraction of the run in (0, 1)"),
        "{e}"
    );
}

/// The transformers `TrainingArguments` (5.x) and TRL fields beyond Open-R1's recipes
/// that this system does another way: each is accepted with one warning; the two that
/// would change the loss are refused unless at their defaults.
#[test]
fn the_rest_of_training_arguments_warns_once_each() {
    let keys = [
        "project",
        "disable_tqdm",
        "include_num_input_tokens_seen",
        "logging_nan_inf_filter",
        "skip_memory_metrics",
        "do_train",
        "do_predict",
        "eval_delay",
        "prediction_loss_only",
        "eval_accumulation_steps",
        "batch_eval_metrics",
        "metric_for_best_model",
        "greater_is_better",
        "load_best_model_at_end",
        "ddp_bucket_cap_mb",
        "ddp_static_graph",
        "fsdp",
        "deepspeed",
        "num_processes",
        "use_cpu",
        "save_on_each_node",
        "enable_jit_checkpoint",
        "dataloader_in_order",
        "ignore_data_skip",
        "torch_compile_backend",
        "torch_compile_mode",
        "use_cache",
        "torch_empty_cache_steps",
        "activation_offloading",
        "optim_args",
        "average_tokens_across_devices",
        "cache_implementation",
        "use_transformers_paged",
        "ref_model_mixup_alpha",
        "ref_model_sync_steps",
    ];
    let mut text = String::from("model_name_or_path: m\noutput_dir: o\n");
    for k in keys {
        text.push_str(&format!("{k}: 1\n"));
    }
    text.push_str("label_smoothing_factor: 0.0\nneftune_noise_alpha: null\n");
    let l: Loaded<GrpoConfig> = load(&text, &[], &[]).unwrap();
    let w = warned(&l.warnings);
    for k in keys {
        assert!(w.contains_key(k), "{k} did not warn: {w:?}");
    }
    assert_eq!(w.len(), keys.len(), "{w:?}");
    let base = "model_name_or_path: m\noutput_dir: o\n";
    let e = load::<SftConfig>(&format!("{base}neftune_noise_alpha: 5\n"), &[], &[]).unwrap_err();
    assert!(e.to_string().contains("neftune_noise_alpha"), "{e}");
    let e =
        load::<SftConfig>(&format!("{base}label_smoothing_factor: 0.1\n"), &[], &[]).unwrap_err();
    assert!(e.to_string().contains("label_smoothing_factor"), "{e}");
}

#[test]
fn unknown_and_unsupported_keys_are_errors_that_say_why() {
    let base = "model_name_or_path: m\noutput_dir: o\n";
    let e = load::<GrpoConfig>(&format!("{base}learnig_rate: 1e-6\n"), &[], &[]).unwrap_err();
    assert!(
        e.to_string().contains("did you mean `learning_rate`"),
        "{e}"
    );
    let e = load::<GrpoConfig>(&format!("{base}fp16: true\n"), &[], &[]).unwrap_err();
    assert!(
        e.to_string().contains("`fp16`") && e.to_string().contains("bf16"),
        "{e}"
    );
    let e = load::<GrpoConfig>(&format!("{base}use_peft: true\n"), &[], &[]).unwrap_err();
    assert!(e.to_string().contains("LoRA"), "{e}");
    let e = load::<GrpoConfig>(&format!("{base}optim: adafactor\n"), &[], &[]).unwrap_err();
    assert!(e.to_string().contains("AdamW"), "{e}");
    // A recipe key that disagrees with the setting in our own place.
    let e = load::<GrpoConfig>(
        &format!("{base}bf16: true\nzero:\n  compute_dtype: float32\n"),
        &[],
        &[],
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("`bf16` and `zero.compute_dtype` disagree"),
        "{e}"
    );
    // GRPO-only keys stay unknown to SFT.
    let e = load::<SftConfig>(&format!("{base}num_generations: 8\n"), &[], &[]).unwrap_err();
    assert!(
        e.to_string().contains("unknown field `num_generations`"),
        "{e}"
    );
    // The environment prefix is TRAINER__: a TRAINER__ typo is an error, TRAINER_X is not read.
    let e = load::<GrpoConfig>(base, &[], &[("TRAINER__LERNING_RATE", "1")]).unwrap_err();
    assert!(
        e.to_string().contains("did you mean `learning_rate`"),
        "{e}"
    );
    assert!(load::<GrpoConfig>(base, &[], &[("TRAINER_LERNING_RATE", "1")]).is_ok());
    // TRL's defaults for the correction: sequence_mask at 3.0.
    let l: Loaded<GrpoConfig> = load(base, &[], &[]).unwrap();
    assert_eq!(
        (
            l.config.vllm_importance_sampling_mode,
            l.config.vllm_importance_sampling_cap
        ),
        (IsCorrectionMode::SequenceMask, 3.0)
    );
    assert!(l.warnings.is_empty());
}

#[test]
fn hub_misses_name_the_places_and_the_download_command() {
    hub_cache();
    let e = model::hub::resolve_model(Path::new("Qwen/Qwen2.5-1.5B-Instruct"), None).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("models--Qwen--Qwen2.5-1.5B-Instruct"), "{msg}");
    assert!(
        msg.contains("huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct"),
        "{msg}"
    );
    let cfg = DatasetConfig {
        name: Some("open-r1/OpenR1-Math-220k".into()),
        ..DatasetConfig::default()
    };
    let tok = model::Tokenizer::from_dir(root().join("fixtures/generated/qwen3-tiny")).unwrap();
    let msg = load_prompts(&cfg, &tok, 64).unwrap_err().to_string();
    assert!(
        msg.contains("huggingface-cli download open-r1/OpenR1-Math-220k --repo-type dataset"),
        "{msg}"
    );
    // A split the card does not list, and a config it does not have.
    let cache = model::hub::HubCache::from_env();
    let msg = trainer::data::hub::dataset_files(&cache, "test-org/Math-Mini", None, "validation")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no split \"validation\"") && msg.contains("test"),
        "{msg}"
    );
    let msg = trainer::data::hub::dataset_files(&cache, "test-org/Math-Mini", Some("x"), "train")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no config \"x\"") && msg.contains("hard"),
        "{msg}"
    );
}

#[test]
fn datasets_without_a_card_use_the_usual_layout() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("local-dataset");
    std::fs::create_dir_all(repo.join("data")).unwrap();
    std::fs::create_dir_all(repo.join("main")).unwrap();
    for f in [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/test-00000-of-00001.parquet",
        "main/train.jsonl",
        "main/test.jsonl",
    ] {
        std::fs::write(repo.join(f), "").unwrap();
    }
    let cache = model::hub::HubCache {
        root: dir.path().join("empty"),
    };
    let name = repo.to_str().unwrap();
    let files = |config: Option<&str>, split: &str| -> Vec<String> {
        trainer::data::hub::dataset_files(&cache, name, config, split)
            .unwrap()
            .iter()
            .map(|p| {
                p.strip_prefix(&repo)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    assert_eq!(
        files(None, "train"),
        [
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "main/train.jsonl"
        ]
    );
    assert_eq!(files(Some("main"), "test"), ["main/test.jsonl"]);
    let e = trainer::data::hub::dataset_files(&cache, name, None, "validation").unwrap_err();
    assert!(
        e.to_string()
            .contains("no data files of split \"validation\""),
        "{e}"
    );
}
