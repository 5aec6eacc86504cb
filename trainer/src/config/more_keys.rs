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
