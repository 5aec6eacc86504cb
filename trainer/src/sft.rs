//! `trainer sft`: supervised fine-tuning on the ZeRO engine (R1's cold start and
//! distillation step), as TRL's SFTTrainer: the loss is the NLL of the tokens TRL's
//! `completion_only_loss` / `assistant_only_loss` select (by default the completion of a
//! prompt/completion row, every token of a messages row; [`data::SftLoss`]), averaged
//! over all such tokens of the step (every rank and micro-batch), so it does not change
//! with world size or accumulation.
//!
//! Each step draws `per_device_train_batch_size * gradient_accumulation_steps *
//! world_size` examples with the seeded epoch sampler; rank r trains on its contiguous
//! slice. Checkpoints carry the sampler position, so a resumed run sees the same data.
use std::time::Instant;

use crate::error::{Context, Result, RunError};
use model::LogprobOptions;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::Kind;

use crate::data::{self, Sampler, SftExample};
use crate::grpo::batch::{pack, split_even, Sample};
use crate::metrics::{Phase, StepLog};
use crate::objective::logprob_objective_at;
use crate::session::{record_memory, RunSkeleton, Session, TrainingArgs};
use crate::shutdown::Shutdown;
use crate::zero::{MicroBatch, ZeroEngine};

/// The `trainer sft` configuration: the shared training settings plus SFT's own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SftConfig {
    #[serde(flatten)]
    pub args: TrainingArgs,
    /// Longest prompt + completion in tokens; longer rows are unusable (counted).
    pub max_length: usize,
    /// Positions per chunk when computing log-probs (peak memory `B * chunk * V`).
    pub logprob_chunk_size: i64,
    /// The token that ends each completion, replacing the tokenizer's `eos_token` (TRL's
    /// `SFTConfig.eos_token`, e.g. `<|im_end|>` for a base model's ChatML template).
    pub eos_token: Option<String>,
    /// TRL's `completion_only_loss`: unset = the completion of prompt/completion rows and
    /// every token of messages rows; true = the completion only; false = every token.
    pub completion_only_loss: Option<bool>,
    /// TRL's `assistant_only_loss`: the loss only on the tokens of assistant turns, every
    /// turn of a conversation (needs the chat template).
    pub assistant_only_loss: bool,
}

impl crate::config::Recipe for SftConfig {
    const COMMAND: crate::config::Command = crate::config::Command::Sft;
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            args: TrainingArgs {
                learning_rate: 2e-5,
                ..TrainingArgs::default()
            },
            max_length: 1024,
            logprob_chunk_size: 512,
            eos_token: None,
            completion_only_loss: None,
            assistant_only_loss: false,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> Result<(), crate::config::InvalidConfig> {
        use crate::config::invalid::bad;
        self.args.validate()?;
        if self.max_length < 2 {
            return Err(bad(
                "max_length",
                format!("max_length must be at least 2, got {}", self.max_length),
            ));
        }
        if self.logprob_chunk_size < 1 {
            return Err(bad(
                "logprob_chunk_size",
                "logprob_chunk_size must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Runs SFT on this rank until the last step; rank 0 writes the final model into
/// `output_dir`.
pub fn run(cfg: &SftConfig) -> Result<()> {
    cfg.validate().map_err(RunError::Configuration)?;
    let args = &cfg.args;
    let mut sess = Session::start(args)?;
    if let Some(eos) = &cfg.eos_token {
        sess.tokenizer.set_eos_token(eos).context("eos_token")?;
    }
    let loss = data::SftLoss {
        completion_only: cfg.completion_only_loss,
        assistant_only: cfg.assistant_only_loss,
    };
    let (examples, report) =
        data::load_sft_with(&args.dataset, &sess.tokenizer, cfg.max_length, loss)
            .with_context(|| format!("loading {}", args.dataset.label().display()))?;
    if sess.is_main() {
        println!("dataset: {}", report.summary());
    }
    let world = sess.env.world_size;
    let per_rank = args.per_device_train_batch_size * args.gradient_accumulation_steps;
    let per_step = per_rank * world;
    let total = args.total_steps(examples.len(), per_step);
    let steps_per_epoch = examples.len().div_ceil(per_step.max(1)) as u64;
    let log_every = args.log_interval(steps_per_epoch, total);
    let mut engine = ZeroEngine::new(
        sess.model_cfg.clone(),
        &sess.weights.take().expect("weights are taken once"),
        args.zero.clone(),
        args.optim(),
        total,
        sess.device,
        sess.comm.take().expect("communicator is taken once"),
    )?;
    record_memory(&sess.metrics, engine.memory());
    let mut sampler = Sampler::new(examples.len(), args.seed);
    let run = RunSkeleton::new(args, total, &sess.model_dir, steps_per_epoch);
    run.resume(&mut engine, &mut sampler, sess.is_main())?;
    let pad = sess.tokenizer.pad_token_id().unwrap_or(0) as i64;
    let opts = LogprobOptions {
        chunk_size: cfg.logprob_chunk_size,
        temperature: 1.0,
        with_entropy: false,
    };
    let shutdown = Shutdown::install(&sess.rt).context("listening for SIGTERM")?;
    while engine.steps_done() < total && !run.should_stop() {
        sess.metrics.enter_phase(Phase::ForwardBackward);
        let t0 = Instant::now();
        let batch = sampler.next_batch(per_step);
        let mine = &batch[split_even(per_step, world)[sess.env.rank].clone()];
        let mut tokens = 0usize;
        for part in split_even(mine.len(), args.gradient_accumulation_steps) {
            if part.is_empty() {
                continue;
            }
            let rows: Vec<&SftExample> = mine[part].iter().map(|&i| &examples[i]).collect();
            let samples: Vec<Sample> = rows.iter().map(|e| sample(e)).collect();
            tokens += samples
                .iter()
                .map(|s| s.prompt_ids.len() + s.completion_ids.len())
                .sum::<usize>();
            let mut packed = pack(&samples, pad)?;
            packed.loss_mask = loss_mask(&rows, packed.loss_mask.size()[1]);
            let mb = MicroBatch {
                input_ids: packed.forward_ids(),
                attention_mask: None,
                position_ids: None,
                segment_ids: None,
            };
            engine.forward_backward(&mb, |hidden, head| {
                logprob_objective_at(
                    hidden,
                    head,
                    &packed.targets,
                    &packed.loss_mask,
                    &opts,
                    |v| {
                        let nll = -(v.logprobs * &packed.loss_mask).sum(Kind::Float);
                        let count = packed.loss_mask.sum(Kind::Float).double_value(&[]) as i64;
                        Ok((nll, count))
                    },
                )
                .map_err(Into::into)
            })?;
        }
        let stats = engine.step()?;
        let secs = t0.elapsed().as_secs_f64();
        let step = stats.step;
        sess.metrics.steps_total.inc();
        if sess.is_main() {
            println!(
                "sft step {step}/{total} | loss {:.4} | grad_norm {:.3} | lr {:.3e} | {:.0} tok/s | {:.2} s",
                stats.loss,
                stats.grad_norm,
                stats.learning_rate,
                (tokens * world) as f64 / secs,
                secs
            );
        }
        let log: StepLog = [
            ("loss", stats.loss),
            ("grad_norm", stats.grad_norm),
            ("learning_rate", stats.learning_rate),
            ("num_tokens", stats.num_items as f64),
            ("epoch", sampler.epoch() as f64),
            ("time/step", secs),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        crate::runlog::publish_step(&sess.metrics, sess.is_main(), &args.output_dir, step, &log);
        if log_every.due(step) || step == total {
            tracing::info!(step, loss = stats.loss, grad_norm = stats.grad_norm, "sft");
        }
        let stop = shutdown.agreed(engine.comm(), sess.device)?;
        if stop || run.save_due(step) {
            sess.metrics.enter_phase(Phase::Checkpoint);
        }
        run.save_if_due(
            &mut engine,
            step,
            stop,
            || json!({ "command": "sft", "sampler": sampler.state() }),
            sess.is_main(),
        )?;
        if stop && step < total {
            sess.metrics.enter_phase(Phase::Done);
            if sess.is_main() {
                println!("stopped by SIGTERM after step {step}: resume_from_checkpoint: latest continues");
            }
            crate::plot::at_end_of_run(sess.is_main(), &args.output_dir);
            return Ok(());
        }
    }
    sess.metrics.enter_phase(Phase::Done);
    crate::plot::at_end_of_run(sess.is_main(), &args.output_dir);
    Ok(())
}

/// `[B, L - 1]` f32 in the shifted layout of [`pack`]: position `t - 1` is 1 when token
/// `t` of the row is in the loss.
fn loss_mask(rows: &[&SftExample], shifted: i64) -> tch::Tensor {
    let width = shifted as usize;
    let mut mask = vec![0f32; rows.len() * width];
    for (r, e) in rows.iter().enumerate() {
        for (t, &m) in e.loss_mask.iter().enumerate().skip(1) {
            if m {
                mask[r * width + t - 1] = 1.0;
            }
        }
    }
    tch::Tensor::from_slice(&mask).view([rows.len() as i64, shifted])
}

/// An SFT example as a packed sample: tokens from the first loss token on are the
/// "completion" (the loss mask then comes from [`loss_mask`]).
fn sample(e: &SftExample) -> Sample {
    let (prompt, completion) = e.input_ids.split_at(e.completion_start);
    Sample {
        prompt_ids: prompt.to_vec(),
        completion_ids: completion.to_vec(),
        sampler_logprobs: vec![0.0; completion.len()],
        advantage: 0.0,
        in_loss: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_mask_marks_the_position_that_predicts_each_loss_token() {
        let e = |mask: &[bool]| SftExample {
            row: 0,
            input_ids: (0..mask.len() as i64).collect(),
            completion_start: mask.iter().position(|&m| m).unwrap(),
            loss_mask: mask.to_vec(),
        };
        let (a, b) = (e(&[false, true, false, true]), e(&[false, false, true]));
        // Shifted layout: position t - 1 predicts token t; rows padded to width L - 1 = 3.
        let m = loss_mask(&[&a, &b], 3);
        let got: Vec<f32> = Vec::try_from(m.flatten(0, -1)).unwrap();
        assert_eq!(got, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        let s = sample(&a);
        assert_eq!((s.prompt_ids, s.completion_ids), (vec![0], vec![1, 2, 3]));
    }
}
