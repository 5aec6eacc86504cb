//! `rollout-worker` command line.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use model::{ChatMessage, ChatTemplateOptions};
use model::{parse_device, SamplingParams, Tokenizer, Transformer};
use rollout_worker::{generate, GenerateOptions};

#[derive(Parser)]
#[command(version, about = "Rollout worker of the GRPO trainer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate completions of prompts with a Hugging Face checkpoint and print them.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A prompt; repeat for a batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Render each prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    top_k: i64,
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// float32, bfloat16 or float16; the checkpoint's dtype by default.
    #[arg(long)]
    dtype: Option<String>,
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    let kind = match &a.dtype {
        Some(d) => Some(
            model::config::parse_dtype(d)
                .with_context(|| format!("--dtype {d:?}: use float32, bfloat16 or float16"))?,
        ),
        None => None,
    };
    let tok = Tokenizer::from_dir(&a.model)?;
    let model = Transformer::from_pretrained(&a.model, device, kind)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let mut prompts = vec![];
    for p in &a.prompt {
        let ids = if a.chat {
            let opts = ChatTemplateOptions {
                add_generation_prompt: true,
                ..Default::default()
            };
            tok.encode_chat(&[ChatMessage::user(p.as_str())], &opts)?
        } else {
            tok.encode(p, true)?
        };
        for _ in 0..a.n {
            prompts.push(ids.iter().map(|&x| x as i64).collect::<Vec<_>>());
        }
    }
    let mut stop: Vec<i64> = tok.eos_token_ids().iter().map(|&x| x as i64).collect();
    stop.extend(model.config.eos_token_ids.iter().copied());
    let opts = GenerateOptions {
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
        },
        max_new_tokens: a.max_new_tokens,
        stop_token_ids: stop,
        seed: a.seed,
    };
    let start = std::time::Instant::now();
    let completions = generate(&model, &prompts, &opts)?;
    let secs = start.elapsed().as_secs_f64();
    let mut total = 0;
    for (i, c) in completions.iter().enumerate() {
        let ids: Vec<u32> = c.tokens.iter().map(|&x| x as u32).collect();
        let text = tok.decode(&ids, true)?;
        let mean_lp = c.logprobs.iter().sum::<f32>() / c.logprobs.len().max(1) as f32;
        println!(
            "[{i}] prompt: {:?}\n    completion ({} tokens, {:?}, mean log-prob {mean_lp:.3}): {text:?}",
            a.prompt[i / a.n],
            c.tokens.len(),
            c.finish_reason
        );
        total += c.tokens.len();
    }
    println!(
        "generated {total} tokens in {secs:.2}s ({:.1} tokens/s) on {device:?}, {} parameters",
        total as f64 / secs,
        model.weights.num_params()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    match Cli::parse().command {
        Command::Generate(a) => run_generate(a),
    }
}
