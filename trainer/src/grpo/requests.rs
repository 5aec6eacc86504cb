//! The generation requests of a rank's shares of a round's groups (see
//! [`super::layout`]): whole groups in one request, a group's partial share in one of
//! its own, each seeded so that completion `c` of the global batch draws from stream
//! `seed + c`.
use super::layout::{generation_runs, Share};
use super::pipeline::GenerationPart;
use super::trainer::Grpo;
use crate::rollout::PromptJob;

impl Grpo<'_> {
    /// The requests generating `shares` (of prompts `prompts`, one per share) from round
    /// seed `seed`; job keys are the shares' positions, so the groups come back in order.
    pub(super) fn generation_parts(
        &self,
        prompts: &[usize],
        shares: &[Share],
        seed: u64,
    ) -> Vec<GenerationPart> {
        generation_runs(shares, self.cfg.num_generations)
            .into_iter()
            .map(|run| GenerationPart {
                jobs: run
                    .shares
                    .clone()
                    .map(|i| PromptJob {
                        key: i as u64,
                        token_ids: self.prompts[prompts[i]].prompt_ids.clone(),
                    })
                    .collect(),
                n: run.n as u32,
                sampling: self.cfg.sampling(Some(seed.wrapping_add(run.seed_offset))),
            })
            .collect()
    }
}
