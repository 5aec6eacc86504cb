//! The rest of transformers' `TrainingArguments` (5.x) and TRL's `GRPOConfig` /
//! `SFTConfig` fields that a recipe may carry and that this system does another way:
//! accepted with one warning each saying what happens instead (checked against
//! `dataclasses.fields(transformers.TrainingArguments)`; keys that would change training
//! are refused in `recipe.rs` instead).
const REPORTING: &str = "not used: metrics go to the log, output_dir/metrics.jsonl and \
     Prometheus (metrics_port)";
const EVAL: &str = "not used: evaluation is held-out accuracy through the rollout workers \
     (eval_dataset), before, during and after training; the final model is the last step's";
const DIST: &str = "not used: parameters, gradients and optimizer state are sharded by the \
     ZeRO engine (zero.stage); accelerate launch configs go to scripts/launch --config_file";
const DATA: &str = "not used: rows are read once, in this process, and drawn by the seeded \
     sampler (a resumed run continues at the checkpoint's exact data position)";
const COMPILE: &str = "not used: there is no graph compiler or kernel patching; kernels are \
     libtorch's";
const GENERATION: &str = "not used: generation runs on the rollout workers in rollout.workers";
const OPTIM: &str = "not used: the optimizer is AdamW (adam_beta1, adam_beta2, adam_epsilon, \
     weight_decay) over every parameter";
use serde_json::{Map, Value};

use super::{Command, ConfigError, RecipeWarning};

const SFT_PACKING: &str = "not used: examples are not packed; each micro-batch is padded to \
     its longest example";

pub(super) const MORE_WARN_KEYS: &[(&str, &str)] = &[
    ("project", REPORTING),
    ("trackio_space_id", REPORTING),
    ("trackio_bucket_id", REPORTING),
    ("trackio_static_space_id", REPORTING),
    ("disable_tqdm", REPORTING),
    ("include_num_input_tokens_seen", REPORTING),
    ("logging_nan_inf_filter", REPORTING),
    ("skip_memory_metrics", REPORTING),
    ("debug", REPORTING),
    ("do_train", "not needed: the command (trainer grpo / trainer sft) trains"),
    ("do_predict", EVAL),
    ("eval_delay", EVAL),
    ("prediction_loss_only", EVAL),
    ("eval_do_concat_batches", EVAL),
    ("eval_use_gather_object", EVAL),
    ("eval_accumulation_steps", EVAL),
    ("include_for_metrics", EVAL),
    ("batch_eval_metrics", EVAL),
    ("metric_for_best_model", EVAL),
    ("greater_is_better", EVAL),
    ("load_best_model_at_end", EVAL),
    ("label_names", EVAL),
    ("ddp_bucket_cap_mb", DIST),
    ("ddp_broadcast_buffers", DIST),
    ("ddp_static_graph", DIST),
    ("accelerator_config", DIST),
    ("parallelism_config", DIST),
    ("fsdp", DIST),
    ("fsdp_config", DIST),
    ("deepspeed", DIST),
    ("num_processes", "not used: the world size comes from the launcher (WORLD_SIZE; scripts/launch)"),
    ("use_cpu", "not used: the device is `device` (cpu or cuda)"),
    (
        "save_on_each_node",
        "not used: every rank writes its shard of a checkpoint, rank 0 the exported model",
    ),
    (
        "enable_jit_checkpoint",
        "not used: a SIGTERM agreed by every rank finishes the step, checkpoints and exits",
    ),
    (
        "restore_callback_states_from_checkpoint",
        "not used: there are no callbacks; a checkpoint holds the engine, optimizer and sampler state",
    ),
    ("dataloader_multiprocessing_context", DATA),
    ("dataloader_in_order", DATA),
    ("train_sampling_strategy", DATA),
    ("length_column_name", DATA),
    ("ignore_data_skip", DATA),
    ("dataset_streaming", DATA),
    ("torch_compile_backend", COMPILE),
    ("torch_compile_mode", COMPILE),
    ("liger_kernel_config", COMPILE),
    ("use_cache", "not used: the KV cache is used by generation on the workers; training needs none"),
    (
        "torch_empty_cache_steps",
        "not used: device memory is managed by libtorch's caching allocator",
    ),
    (
        "activation_checkpointing",
        "not used: activation checkpointing is gradient_checkpointing (zero.gradient_checkpointing)",
    ),
    (
        "activation_checkpointing_kwargs",
        "not used: activation checkpointing is gradient_checkpointing (zero.gradient_checkpointing)",
    ),
    (
        "activation_offloading",
        "not used: activations stay on the device; gradient_checkpointing saves their memory",
    ),
    ("optim_args", OPTIM),
    ("optim_target_modules", OPTIM),
    (
        "average_tokens_across_devices",
        "not needed: loss normalisers (token counts) are summed over every rank's micro-batches",
    ),
    ("cache_implementation", GENERATION),
    ("use_transformers_paged", GENERATION),
    (
        "ref_model_mixup_alpha",
        "not used: the reference model is the initial policy and is never synced",
    ),
    (
        "ref_model_sync_steps",
        "not used: the reference model is the initial policy and is never synced",
    ),
    ("packing_strategy", SFT_PACKING),
    ("padding_free", SFT_PACKING),
    ("eval_packing", SFT_PACKING),
    ("pad_to_multiple_of", SFT_PACKING),
];

const NO_LORA: &str =
    "not used: LoRA is off (use_peft: true is refused); every parameter is trained";
const NO_QUANT: &str =
    "not used: quantization is off (load_in_4bit / load_in_8bit: true are refused)";
const CODE: &str = "not used: code rewards run as external rewards ([[rewards.external]])";
const ENTROPY: &str = "not used: adaptive entropy control is off (use_adaptive_entropy: true is \
     refused) and no entropy bonus is added (entropy_coef: 0)";
const VESPO: &str = "not used: it only shapes loss_type vespo, which is not available here \
     (loss_type: grpo, bnpo, dr_grpo, dapo, cispo or sapo)";

/// TRL 1.16 fields (checked against `dataclasses.fields` in scripts/checks/trl_fields.py):
/// accepted with one warning each.
pub(super) const TRL_WARN_KEYS: &[(&str, &str)] = &[
    ("vespo_k_pos", VESPO),
    ("vespo_lambda_pos", VESPO),
    ("vespo_k_neg", VESPO),
    ("vespo_lambda_neg", VESPO),
    ("entropy_coef_min", ENTROPY),
    ("entropy_coef_max", ENTROPY),
    ("entropy_coef_delta", ENTROPY),
    ("entropy_target", ENTROPY),
    (
        "log_multimodal",
        "not used: prompts and completions are text only",
    ),
    ("use_transformers_continuous_batching", GENERATION),
    ("transformers_continuous_batching_config", GENERATION),
    ("lora_r", NO_LORA),
    ("lora_alpha", NO_LORA),
    ("lora_dropout", NO_LORA),
    ("lora_target_modules", NO_LORA),
    ("lora_target_parameters", NO_LORA),
    ("lora_modules_to_save", NO_LORA),
    ("lora_task_type", NO_LORA),
    ("use_rslora", NO_LORA),
    ("use_dora", NO_LORA),
    ("bnb_4bit_quant_type", NO_QUANT),
    ("use_bnb_nested_quant", NO_QUANT),
    ("bnb_4bit_quant_storage", NO_QUANT),
    (
        "ignore_bias_buffers",
        "not used: there are no DDP bias buffers; gradients are reduced by the ZeRO engine",
    ),
    ("code_eval_scoring_mode", CODE),
    (
        "truncation_mode",
        "not used: an example over max_length is counted unusable and skipped, never truncated",
    ),
];

/// TRL 1.16's renamed and new fields, before the generic rules of `translate` run:
/// - `vllm_importance_sampling_clip_max` is the cap (`vllm_importance_sampling_cap`, TRL's
///   deprecated name); a null cap is TRL's "use clip_max";
/// - null `eval_steps`, `min_p`, `lr_scheduler_kwargs`, `num_generations_eval` mean unset
///   (our defaults: logging_steps, 0, none, num_generations);
/// - `use_bias_correction_kl` (TRL's default true) means nothing while beta is 0 and is
///   refused otherwise; `router_aux_loss_coef`, `vllm_importance_sampling_clip_min`,
///   `max_tool_calling_iterations`, `entropy_coef` and `use_adaptive_entropy` are accepted
///   at the values that ask for nothing;
/// - open-r1's `soft_punish_cache` is `rewards.soft_punish_cache`; its `max_completion_len`
///   warns that the punishment is measured against max_completion_length.
pub(super) fn trl_keys(
    table: &mut Map<String, Value>,
    command: Command,
    warnings: &mut Vec<RecipeWarning>,
) -> Result<(), ConfigError> {
    for key in [
        "eval_steps",
        "min_p",
        "vllm_importance_sampling_cap",
        "lr_scheduler_kwargs",
        "num_generations_eval",
    ] {
        if table.get(key).is_some_and(Value::is_null) {
            table.remove(key);
        }
    }
    if command == Command::Grpo {
        if let Some(v) = table.remove("vllm_importance_sampling_clip_max") {
            if v.is_null() {
                return Err(ConfigError::Recipe {
                    key: "vllm_importance_sampling_clip_max".into(),
                    message: "null (no upper bound) is not supported; give a cap such as 3.0"
                        .into(),
                });
            }
            super::recipe::put(
                table,
                "vllm_importance_sampling_cap",
                v,
                "vllm_importance_sampling_clip_max",
            )?;
        }
        if let Some(v) = table.remove("soft_punish_cache") {
            super::recipe::put(table, "rewards.soft_punish_cache", v, "soft_punish_cache")?;
        }
        if let Some(v) = table.remove("max_completion_len") {
            warnings.push(RecipeWarning {
                key: "max_completion_len".into(),
                message: format!(
                    "not used ({v}): soft_overlong_punishment measures completions against \
                     max_completion_length, the generation limit"
                ),
            });
        }
        if let Some(v) = table.remove("use_bias_correction_kl") {
            let beta = table.get("beta").and_then(Value::as_f64).unwrap_or(0.0);
            match v {
                Value::Bool(false) | Value::Null => {}
                Value::Bool(true) if beta == 0.0 => {}
                Value::Bool(true) => {
                    return Err(ConfigError::Recipe {
                        key: "use_bias_correction_kl".into(),
                        message: format!(
                            "true is not supported with beta {beta}: the k3 KL estimator is used \
                             without the importance-sampling ratio; set use_bias_correction_kl: false"
                        ),
                    })
                }
                other => {
                    return Err(ConfigError::Recipe {
                        key: "use_bias_correction_kl".into(),
                        message: format!("expected true or false, got {other}"),
                    })
                }
            }
        }
    }
    if command == Command::Sft {
        if let Some(v) = table.remove("loss_type") {
            if !(v.is_null() || v == "nll") {
                return Err(ConfigError::Recipe {
                    key: "loss_type".into(),
                    message: format!(
                        "only \"nll\" is supported for SFT (the negative log-likelihood), got {v}"
                    ),
                });
            }
        }
        // TRL's SFTTrainer shuffles once when true; transformers' random sampler draws
        // every epoch in a seeded random order either way, as the sampler here does.
        if let Some(v) = table.remove("shuffle_dataset") {
            if !(v.is_null() || v.is_boolean()) {
                return Err(ConfigError::Recipe {
                    key: "shuffle_dataset".into(),
                    message: format!("expected true or false, got {v}"),
                });
            }
        }
        chat_template_path(table)?;
    }
    let at_default: [(&str, Value, &str); 5] = [
        (
            "router_aux_loss_coef",
            Value::Null,
            "the models are dense: there is no MoE router",
        ),
        (
            "vllm_importance_sampling_clip_min",
            Value::Null,
            "ratios are bounded from above only (vllm_importance_sampling_cap)",
        ),
        (
            "max_tool_calling_iterations",
            Value::Null,
            "completions are single turns: there is no tool calling",
        ),
        (
            "entropy_coef",
            0.0.into(),
            "no entropy bonus is added to the loss",
        ),
        (
            "use_adaptive_entropy",
            false.into(),
            "there is no adaptive entropy control",
        ),
    ];
    for (key, want, why) in at_default {
        let Some(v) = table.remove(key) else {
            continue;
        };
        let same =
            v.is_null() || v == want || (v.as_f64().is_some() && v.as_f64() == want.as_f64());
        if !same {
            return Err(ConfigError::Recipe {
                key: key.into(),
                message: format!("only {want} is supported ({why}), got {v}"),
            });
        }
    }
    Ok(())
}

/// TRL's `chat_template_path`: a Jinja file, or a tokenizer directory
/// (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`), read into
/// `chat_template`.
fn chat_template_path(table: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let Some(v) = table.remove("chat_template_path") else {
        return Ok(());
    };
    let path = match v {
        Value::Null => return Ok(()),
        Value::String(s) => std::path::PathBuf::from(s),
        other => {
            return Err(ConfigError::Recipe {
                key: "chat_template_path".into(),
                message: format!("expected a path, got {other}"),
            })
        }
    };
    let bad = |message: String| ConfigError::Recipe {
        key: "chat_template_path".into(),
        message,
    };
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| bad(format!("reading {}: {e}", p.display())))
    };
    let text = if path.is_dir() {
        let jinja = path.join("chat_template.jinja");
        let config = path.join("tokenizer_config.json");
        if jinja.is_file() {
            read(&jinja)?
        } else if config.is_file() {
            let json: Value = serde_json::from_str(&read(&config)?)
                .map_err(|e| bad(format!("{}: {e}", config.display())))?;
            match json.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return Err(bad(format!(
                        "{} has no chat_template string",
                        config.display()
                    )))
                }
            }
        } else {
            return Err(bad(format!(
                "{} has neither chat_template.jinja nor tokenizer_config.json",
                path.display()
            )));
        }
    } else if path.is_file() {
        read(&path)?
    } else {
        return Err(bad(format!(
            "{} is not a file or directory (a Hub id is not resolved here; give a local path)",
            path.display()
        )));
    };
    super::recipe::put(table, "chat_template", text.into(), "chat_template_path")
}
