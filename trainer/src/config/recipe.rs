//! TRL, transformers and Open-R1 recipe keys, carried over.
//!
//! A recipe written for TRL's `GRPOConfig` / `SFTConfig` (with transformers'
//! `TrainingArguments`, TRL's `ModelConfig` and `ScriptArguments`, and Open-R1's script
//! arguments) is read unchanged. Before the typed config is deserialised, [`translate`]
//! rewrites the merged table of settings:
//!
//! - keys whose meaning is the same but whose place here differs are moved
//!   (`bf16: true` -> `zero.compute_dtype: bfloat16`, `dataset_name` -> `dataset.name`,
//!   `system_prompt` -> `dataset.system_prompt`, `ddp_timeout` -> `dist.timeout_secs`...);
//!   a key that disagrees with a setting given in our own place is an error;
//! - keys of what this system does another way (`use_vllm` and `vllm_*`, `report_to`,
//!   `push_to_hub` and `hub_*`, `attn_implementation`...) are removed, each with one
//!   [`RecipeWarning`] that says what happens instead;
//! - values that would change the training in a way not built here (`fp16: true`,
//!   `use_peft: true`, an optimizer other than AdamW) are errors naming the key.
//!
//! Keys that mean the same under the same name (`learning_rate`, `num_generations`,
//! `beta`, `save_strategy`, ...) are fields of the typed configs and pass through.
use serde_json::{Map, Value};

use super::ConfigError;

/// Which command's configuration is being read: some keys belong to one only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Grpo,
    Sft,
    /// `trainer eval` and `trainer generate`: settings of our own, no recipe keys.
    Eval,
    Generate,
}

/// A recipe key accepted but handled another way here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeWarning {
    pub key: String,
    /// What happens instead, e.g. "generation runs on the rollout workers...".
    pub message: String,
}

impl std::fmt::Display for RecipeWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recipe key `{}` is accepted but {}",
            self.key, self.message
        )
    }
}

const GENERATION: &str = "not used: generation runs on the rollout workers in rollout.workers \
     (`rollout-worker serve`), which take their settings on their own command line";
const HUB: &str = "not used: nothing is uploaded; the final model is written to output_dir \
     (Hugging Face format)";
const REPORTING: &str = "not used: metrics go to the log and to Prometheus (metrics_port)";
const KERNELS: &str = "not used: log-probs and the loss are computed in chunks of \
     logprob_chunk_size positions, without Liger kernels";
const ATTENTION: &str =
    "not used: attention is the model crate's own (exact, SDPA-equivalent) implementation";
const DATA_PROC: &str = "not used: rows are read and tokenized once, in this process";
const CALLBACKS: &str = "not used: there are no Open-R1 callbacks or post-training benchmarks; \
     run evaluations on the exported model in output_dir";

/// Keys accepted with a warning: exact names, then prefixes.
const WARN_KEYS: &[(&str, &str)] = &[
    ("use_vllm", GENERATION),
    ("attn_implementation", ATTENTION),
    ("use_liger_kernel", KERNELS),
    ("use_liger", KERNELS),
    ("use_liger_loss", KERNELS),
    ("report_to", REPORTING),
    ("run_name", REPORTING),
    ("logging_dir", REPORTING),
    ("log_level_replica", REPORTING),
    ("log_on_each_node", REPORTING),
    ("log_unique_prompts", REPORTING),
    ("log_completions_hub_repo", HUB),
    ("push_to_hub", HUB),
    ("push_to_hub_revision", HUB),
    ("overwrite_hub_revision", HUB),
    ("callbacks", CALLBACKS),
    ("benchmarks", CALLBACKS),
    ("dataset_num_proc", DATA_PROC),
    ("dataloader_num_workers", DATA_PROC),
    ("dataloader_pin_memory", DATA_PROC),
    ("dataloader_persistent_workers", DATA_PROC),
    ("dataloader_prefetch_factor", DATA_PROC),
    ("dataloader_drop_last", DATA_PROC),
    (
        "remove_unused_columns",
        "not used: every column of a row is passed to the reward functions",
    ),
    (
        "trust_remote_code",
        "not used: no repository code is run; the architecture (qwen2, qwen3, llama) is built in",
    ),
    ("torch_compile", "not used: there is no graph compiler; kernels are libtorch's"),
    ("tf32", "not used: matmul precision is libtorch's default"),
    ("bf16_full_eval", "not used: evaluation runs on the rollout workers"),
    ("fp16_full_eval", "not used: evaluation runs on the rollout workers"),
    (
        "ds3_gather_for_generation",
        "not used: generation runs on the rollout workers, which receive whole weights after each round",
    ),
    (
        "cast_lm_head_to_fp32",
        "not used: the head runs in zero.compute_dtype and log-probs are taken in float32",
    ),
    (
        "save_only_model",
        "not used: checkpoints always hold the optimizer state too, so every checkpoint resumes",
    ),
    ("model_init_kwargs", "not used: the model is built from config.json"),
    ("ddp_find_unused_parameters", "not used: gradients are reduced by the ZeRO engine"),
    ("ddp_backend", "not used: the backend is dist.backend (auto: nccl on cuda, ring on cpu)"),
    ("local_rank", "not used: each rank reads LOCAL_RANK from the launcher's environment"),
    ("auto_find_batch_size", "not used: per_device_train_batch_size is taken as given"),
    ("data_seed", "not used: the sampler is seeded with seed"),
    ("full_determinism", "not used: runs are deterministic for a given seed and world size"),
    (
        "dataset_kwargs",
        "not used: rows are read as they are (prompt/completion or messages columns)",
    ),
    (
        "dataset_text_field",
        "not used: rows are prompt/completion pairs or messages conversations",
    ),
    (
        "pad_token",
        "not used: padded positions are masked out, so the pad id does not matter",
    ),
    (
        "code_language",
        "not used: code rewards run as external rewards ([[rewards.external]])",
    ),
    (
        "code_eval_test_batch_size",
        "not used: code rewards run as external rewards ([[rewards.external]])",
    ),
    (
        "parallel_code_exec_per_proc",
        "not used: code rewards run as external rewards ([[rewards.external]])",
    ),
    ("code_provider", "not used: code rewards run as external rewards ([[rewards.external]])"),
    ("ioi_provider", "not used: code rewards run as external rewards ([[rewards.external]])"),
    ("e2b_router_url", "not used: code rewards run as external rewards ([[rewards.external]])"),
    ("morph_router_url", "not used: code rewards run as external rewards ([[rewards.external]])"),
    (
        "eval_on_start",
        "not needed: evaluation always runs before training (and after it) when eval_dataset is set",
    ),
    ("per_device_eval_batch_size", "not used: evaluation prompts are batched by the rollout workers (continuous batching)"),
];

/// Keys whose meaning holds here without a setting: removed without a warning.
/// `overwrite_output_dir`: output_dir is written into either way (transformers no longer
/// refuses a non-empty one either); `disable_dropout`: the models have no dropout;
/// `save_safetensors`: weights are always safetensors.
const SILENT_KEYS: &[&str] = &[
    "overwrite_output_dir",
    "disable_dropout",
    "save_safetensors",
];

const WARN_PREFIXES: &[(&str, &str)] = &[
    ("vllm_importance_sampling_", ""),
    ("vllm_", GENERATION),
    ("hub_", HUB),
    ("wandb_", REPORTING),
];

/// Where a key whose meaning is the same lives here (a dotted path).
const MOVES: &[(&str, &str, Option<Command>)] = &[
    (
        "gradient_checkpointing",
        "zero.gradient_checkpointing",
        None,
    ),
    ("system_prompt", "dataset.system_prompt", None),
    ("dataset_name", "dataset.name", None),
    ("dataset_config", "dataset.config", None),
    ("dataset_train_split", "dataset.split", None),
    ("dataset_prompt_column", "dataset.prompt_column", None),
    ("ddp_timeout", "dist.timeout_secs", None),
    (
        "num_generations_eval",
        "eval_num_generations",
        Some(Command::Grpo),
    ),
    ("max_seq_length", "max_length", Some(Command::Sft)),
    (
        "cosine_min_value_wrong",
        "rewards.cosine_min_value_wrong",
        Some(Command::Grpo),
    ),
    (
        "cosine_max_value_wrong",
        "rewards.cosine_max_value_wrong",
        Some(Command::Grpo),
    ),
    (
        "cosine_min_value_correct",
        "rewards.cosine_min_value_correct",
        Some(Command::Grpo),
    ),
    (
        "cosine_max_value_correct",
        "rewards.cosine_max_value_correct",
        Some(Command::Grpo),
    ),
    (
        "cosine_max_len",
        "rewards.cosine_max_len",
        Some(Command::Grpo),
    ),
    (
        "repetition_n_grams",
        "rewards.repetition_n_grams",
        Some(Command::Grpo),
    ),
    (
        "repetition_max_penalty",
        "rewards.repetition_max_penalty",
        Some(Command::Grpo),
    ),
];

/// Rewrites TRL / Open-R1 keys of `table` in place; returns one warning per key that
/// was accepted but is handled another way. See the module docs.
pub fn translate(
    table: &mut Map<String, Value>,
    command: Command,
) -> Result<Vec<RecipeWarning>, ConfigError> {
    if matches!(command, Command::Eval | Command::Generate) {
        return Ok(vec![]);
    }
    let mut warnings = Vec::new();
    super::more_keys::trl_keys(table, command, &mut warnings)?;
    precision(table)?;
    gradient_checkpointing_kwargs(table, &mut warnings)?;
    dataset_keys(table, command)?;
    refusals(table)?;
    if command == Command::Sft {
        sft_keys(table, &mut warnings);
    }
    for &(from, to, only) in MOVES {
        if only.is_some_and(|c| c != command) {
            continue;
        }
        if let Some(v) = table.remove(from) {
            put(table, to, v, from)?;
        }
    }
    if let Some(v) = table.remove("optim") {
        let name = v.as_str().unwrap_or_default().to_string();
        if !matches!(
            name.as_str(),
            "adamw_torch" | "adamw_torch_fused" | "adamw_hf" | "adamw_apex_fused" | "adamw"
        ) {
            return Err(ConfigError::Recipe {
                key: "optim".into(),
                message: format!(
                    "{v} is not available: the optimizer is AdamW (torch.optim.AdamW); allowed: adamw_torch, adamw_torch_fused"
                ),
            });
        }
    }
    if let Some(v) = table.get("resume_from_checkpoint").cloned() {
        match v {
            Value::Bool(true) => {
                table.insert("resume_from_checkpoint".into(), "latest".into());
            }
            Value::Bool(false) | Value::Null => {
                table.remove("resume_from_checkpoint");
            }
            _ => {}
        }
    }
    if let Some(v) = table.remove("steps_per_generation") {
        let accumulation = table
            .get("gradient_accumulation_steps")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        if !v.is_null() && v.as_u64() != Some(accumulation) {
            return Err(ConfigError::Recipe {
                key: "steps_per_generation".into(),
                message: format!(
                    "{v} differs from gradient_accumulation_steps ({accumulation}); here one generation round \
                     always feeds gradient_accumulation_steps micro-batches (docs/configuration.md, batch layout)"
                ),
            });
        }
    }
    if command == Command::Grpo {
        if let Some(v) = table.remove("generation_batch_size") {
            if !v.is_null() {
                warnings.push(RecipeWarning {
                    key: "generation_batch_size".into(),
                    message: "not used: a generation round is per_device_train_batch_size * \
                              gradient_accumulation_steps completions per rank"
                        .into(),
                });
            }
        }
    }
    for key in SILENT_KEYS {
        table.remove(*key);
    }
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let message = WARN_KEYS
            .iter()
            .chain(super::more_keys::MORE_WARN_KEYS)
            .chain(super::more_keys::TRL_WARN_KEYS)
            .find(|(k, _)| *k == key)
            .map(|(_, m)| *m)
            .or_else(|| {
                WARN_PREFIXES
                    .iter()
                    .find(|(p, _)| key.starts_with(p))
                    .map(|(_, m)| *m)
            });
        match message {
            // TRL's own names for the correction are fields here.
            Some("") => {}
            Some(message) => {
                table.remove(&key);
                warnings.push(RecipeWarning {
                    key,
                    message: message.into(),
                });
            }
            None => {}
        }
    }
    Ok(warnings)
}

/// `bf16`, `fp16`, `torch_dtype` / `dtype` -> `zero.compute_dtype` (master weights and
/// Adam moments are float32 either way, as DeepSpeed's bf16 mode keeps them).
fn precision(table: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let flag = |table: &mut Map<String, Value>, key: &str| -> Result<Option<bool>, ConfigError> {
        match table.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(ConfigError::Recipe {
                key: key.into(),
                message: format!("expected true or false, got {v}"),
            }),
        }
    };
    let bf16 = flag(table, "bf16")?;
    let fp16 = flag(table, "fp16")?;
    let dtype = match (table.remove("torch_dtype"), table.remove("dtype")) {
        (Some(a), Some(b)) if a != b => {
            return Err(ConfigError::Conflict {
                key: "torch_dtype".into(),
                other: "dtype".into(),
                message: format!("{a} vs {b}"),
            })
        }
        (Some(a), _) | (None, Some(a)) => Some(a),
        (None, None) => None,
    };
    if fp16 == Some(true) {
        return Err(ConfigError::Recipe {
            key: "fp16".into(),
            message: "float16 compute is not supported; use bf16: true (bfloat16 compute, float32 master weights)".into(),
        });
    }
    let from_dtype = match dtype.as_ref().map(|v| v.as_str().map(str::to_string)) {
        None => None,
        Some(Some(s)) => match s.as_str() {
            "auto" => None,
            "bfloat16" | "bf16" => Some("bfloat16"),
            "float32" | "fp32" | "float" => Some("float32"),
            "float16" | "fp16" | "half" => {
                return Err(ConfigError::Recipe {
                    key: "torch_dtype".into(),
                    message: "float16 is not supported; use bfloat16".into(),
                })
            }
            other => {
                return Err(ConfigError::Recipe {
                    key: "torch_dtype".into(),
                    message: format!("{other:?} is not a dtype (allowed: auto, bfloat16, float32)"),
                })
            }
        },
        Some(None) => {
            return Err(ConfigError::Recipe {
                key: "torch_dtype".into(),
                message: format!("expected a dtype name, got {}", dtype.unwrap_or_default()),
            })
        }
    };
    let (source, want) = match (bf16, from_dtype) {
        (Some(true), _) => ("bf16", Some("bfloat16")),
        (Some(false), _) => ("bf16", Some("float32")),
        (None, Some(d)) => ("torch_dtype", Some(d)),
        (None, None) => return Ok(()),
    };
    if let Some(want) = want {
        put(table, "zero.compute_dtype", want.into(), source)?;
    }
    Ok(())
}

fn gradient_checkpointing_kwargs(
    table: &mut Map<String, Value>,
    warnings: &mut Vec<RecipeWarning>,
) -> Result<(), ConfigError> {
    let Some(v) = table.remove("gradient_checkpointing_kwargs") else {
        return Ok(());
    };
    match v {
        Value::Null => Ok(()),
        Value::Object(m) => {
            let others: Vec<&String> = m.keys().filter(|k| *k != "use_reentrant").collect();
            if !others.is_empty() {
                warnings.push(RecipeWarning {
                    key: "gradient_checkpointing_kwargs".into(),
                    message: format!(
                        "only use_reentrant is understood (and either value recomputes each block the same way); \
                         not used: {others:?}"
                    ),
                });
            }
            Ok(())
        }
        other => Err(ConfigError::Recipe {
            key: "gradient_checkpointing_kwargs".into(),
            message: format!("expected a table such as {{use_reentrant: false}}, got {other}"),
        }),
    }
}

/// Open-R1's older `dataset_configs: [name]`, and `dataset_test_split` (the eval split
/// when evaluation is on).
fn dataset_keys(table: &mut Map<String, Value>, command: Command) -> Result<(), ConfigError> {
    if let Some(v) = table.remove("dataset_configs") {
        let one = match &v {
            Value::Array(a) if a.len() == 1 => a[0].clone(),
            Value::String(_) => v.clone(),
            Value::Null => Value::Null,
            _ => {
                return Err(ConfigError::Recipe {
                    key: "dataset_configs".into(),
                    message: format!("one config name is supported, got {v}"),
                })
            }
        };
        if !one.is_null() {
            put(table, "dataset.config", one, "dataset_configs")?;
        }
    }
    if let Some(v) = table.remove("dataset_mixture") {
        if !v.is_null() {
            return Err(ConfigError::Recipe {
                key: "dataset_mixture".into(),
                message:
                    "dataset mixtures are not supported; give one dataset_name (or dataset.path)"
                        .into(),
            });
        }
    }
    let test_split = table.remove("dataset_test_split");
    if command == Command::Grpo {
        let evaluating = table
            .get("eval_strategy")
            .and_then(Value::as_str)
            .is_some_and(|s| s != "no");
        if evaluating && !table.contains_key("eval_dataset") {
            if let Some(name) = table.get("dataset_name").cloned() {
                let mut eval = Map::new();
                eval.insert("name".into(), name);
                if let Some(c) = table.get("dataset_config").cloned() {
                    eval.insert("config".into(), c);
                }
                eval.insert(
                    "split".into(),
                    test_split.unwrap_or_else(|| Value::from("test")),
                );
                if let Some(c) = table.get("dataset_prompt_column").cloned() {
                    eval.insert("prompt_column".into(), c);
                }
                if let Some(c) = table.get("system_prompt").cloned() {
                    eval.insert("system_prompt".into(), c);
                }
                table.insert("eval_dataset".into(), Value::Object(eval));
            }
        }
    }
    // do_eval only tells a script whether to evaluate; eval_strategy decides here.
    if let Some(v) = table.remove("do_eval") {
        if v == Value::Bool(false) && !table.contains_key("eval_strategy") {
            table.insert("eval_strategy".into(), "no".into());
        }
    }
    Ok(())
}

/// SFT has no evaluation loop and does not pack; those keys are accepted with a warning
/// unless they ask for nothing.
fn sft_keys(table: &mut Map<String, Value>, warnings: &mut Vec<RecipeWarning>) {
    let evaluating = table
        .remove("eval_strategy")
        .is_some_and(|v| v.as_str() != Some("no") && !v.is_null());
    for key in ["eval_steps", "eval_on_start", "eval_dataset"] {
        table.remove(key);
    }
    if evaluating {
        warnings.push(RecipeWarning {
            key: "eval_strategy".into(),
            message: "not used: `trainer sft` has no evaluation loop; evaluate the exported model"
                .into(),
        });
    }
    if table.remove("packing") == Some(Value::Bool(true)) {
        warnings.push(RecipeWarning {
            key: "packing".into(),
            message: "not used: examples are not packed; each micro-batch holds \
                      per_device_train_batch_size examples, padded, and the loss is the same \
                      completion-token mean"
                .into(),
        });
    }
}

/// Settings that would change training in a way that is not built here.
fn refusals(table: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let refuse_true = [
        (
            "use_peft",
            "LoRA/PEFT is not supported: every parameter is trained",
        ),
        ("load_in_4bit", "quantized training is not supported"),
        ("load_in_8bit", "quantized training is not supported"),
        (
            "sync_ref_model",
            "the reference model is the initial policy and is never synced",
        ),
        (
            "use_bias_correction_kl",
            "the k3 KL estimator is used without the IS correction",
        ),
        ("gradient_checkpointing_use_reentrant", "not supported"),
    ];
    for (key, why) in refuse_true {
        match table.remove(key) {
            Some(Value::Bool(true)) => {
                return Err(ConfigError::Recipe {
                    key: key.into(),
                    message: format!("true is not supported: {why}"),
                })
            }
            Some(Value::Bool(false) | Value::Null) | None => {}
            Some(v) => {
                return Err(ConfigError::Recipe {
                    key: key.into(),
                    message: format!("expected true or false, got {v}"),
                })
            }
        }
    }
    let must_equal: [(&str, Value, &str); 6] = [
        (
            "neftune_noise_alpha",
            Value::Null,
            "no noise is added to the embeddings",
        ),
        (
            "label_smoothing_factor",
            0.0.into(),
            "the loss is the plain negative log-likelihood",
        ),
        (
            "repetition_penalty",
            1.0.into(),
            "the workers sample without a repetition penalty",
        ),
        (
            "top_entropy_quantile",
            1.0.into(),
            "every completion token is in the loss",
        ),
        (
            "multi_objective_aggregation",
            "sum_then_normalize".into(),
            "weighted rewards are summed, then normalised",
        ),
        (
            "shuffle_dataset",
            true.into(),
            "the sampler always shuffles (seeded)",
        ),
    ];
    for (key, want, why) in must_equal {
        if let Some(v) = table.remove(key) {
            let same =
                v.is_null() || v == want || (v.as_f64().is_some() && v.as_f64() == want.as_f64());
            if !same {
                return Err(ConfigError::Recipe {
                    key: key.into(),
                    message: format!("only {want} is supported ({why}), got {v}"),
                });
            }
        }
    }
    for key in [
        "off_policy_mask_threshold",
        "generation_kwargs",
        "chat_template_kwargs",
    ] {
        match table.remove(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(v) => {
                return Err(ConfigError::Recipe {
                    key: key.into(),
                    message: format!("is not supported, got {v}"),
                })
            }
        }
    }
    Ok(())
}

/// Sets dotted `path` to `value`, unless it already holds a different value (an error
/// naming both keys) — an explicit setting in our own place is never overridden silently.
pub(super) fn put(
    table: &mut Map<String, Value>,
    path: &str,
    value: Value,
    from: &str,
) -> Result<(), ConfigError> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or(path);
    let mut cur = table;
    for p in parts {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match entry {
            Value::Object(m) => m,
            other => {
                return Err(ConfigError::Recipe {
                    key: from.into(),
                    message: format!("`{p}` must be a table to hold `{path}`, got {other}"),
                })
            }
        };
    }
    match cur.get(last) {
        Some(existing) if !same_value(existing, &value) => Err(ConfigError::Conflict {
            key: from.into(),
            other: path.into(),
            message: format!("{value} vs {existing}"),
        }),
        _ => {
            cur.insert(last.to_string(), value);
            Ok(())
        }
    }
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        // Environment values arrive as strings.
        (Value::String(s), v) | (v, Value::String(s)) if !v.is_string() => {
            let text = v.to_string();
            s.as_str() == text.as_str()
        }
        _ => a == b,
    }
}
