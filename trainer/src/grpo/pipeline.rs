//! Rollouts requested ahead of training, with bounded staleness (TRL's AsyncGRPO
//! `max_staleness`).
//!
//! With `max_staleness = k`, up to `k` batches beyond the one being trained are being
//! generated while the ranks train. A batch is requested at the version the workers
//! serve (its `min_version`), so when it is trained, `k` rounds later, each of its groups
//! is at most `k` versions old; the workers' log-probs of those tokens feed the
//! truncated importance-sampling correction of the loss. `k = 0` requests each batch when
//! it is needed: generate, then train, exactly the sequential round.
//!
//! Each batch remembers the sampler position before it was drawn (a checkpoint resumes
//! from the oldest batch not yet trained) and the interval its generation ran, from
//! which [`Pipeline::busy_within`] measures how long the workers had none of this
//! rank's requests (their idle time).
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::data::SamplerState;
use crate::rollout::{PromptJob, RolloutClient, RolloutError, RolloutGroup, Sampling};

/// A batch of this rank's prompts whose groups are being generated.
pub struct PendingBatch {
    /// Generation round (0-based over the run): seeds its sampling.
    pub round: u64,
    /// This rank's prompt indices, in job order.
    pub prompts: Vec<usize>,
    /// The global batch this rank's prompts are a slice of (every rank draws the same).
    pub global: Vec<usize>,
    /// The sampler position before this batch was drawn.
    pub sampler_before: SamplerState,
    /// The weight version the workers served when it was requested (its minimum).
    pub min_version: u64,
    started: Instant,
    task: JoinHandle<Result<Vec<RolloutGroup>, RolloutError>>,
}

impl Drop for PendingBatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The batches in flight, oldest first, and the generation intervals of the run.
#[derive(Default)]
pub struct Pipeline {
    queue: VecDeque<PendingBatch>,
    /// `(start, end)` of every generation of the current and recent rounds (`end`
    /// shared with the task, set when it finishes).
    intervals: Vec<(Instant, Arc<Mutex<Option<Instant>>>)>,
}

/// One generation request of a batch: `n` completions of each job (a rank's shares of
/// groups; see [`super::layout::generation_runs`]).
pub struct GenerationPart {
    pub jobs: Vec<PromptJob>,
    pub n: u32,
    pub sampling: Sampling,
}

/// What [`Pipeline::request`] needs to start a batch.
pub struct Request<'a> {
    pub round: u64,
    pub prompts: Vec<usize>,
    pub global: Vec<usize>,
    /// Generated concurrently; their groups are concatenated in this order.
    pub parts: Vec<GenerationPart>,
    pub sampler_before: SamplerState,
    pub min_version: u64,
    pub client: &'a RolloutClient,
}

/// Generates `parts` concurrently at `min_version`; their groups in part order.
pub async fn generate_parts(
    client: &RolloutClient,
    parts: Vec<GenerationPart>,
    min_version: u64,
) -> Result<Vec<RolloutGroup>, RolloutError> {
    let runs = parts
        .into_iter()
        .map(|p| client.generate(p.jobs, p.n, p.sampling, true, min_version, |_| {}));
    Ok(futures::future::try_join_all(runs)
        .await?
        .into_iter()
        .flatten()
        .collect())
}

impl Pipeline {
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The sampler position a checkpoint should record: before the oldest batch not yet
    /// trained (its groups are regenerated after a resume).
    pub fn oldest_sampler_state(&self) -> Option<&SamplerState> {
        self.queue.front().map(|b| &b.sampler_before)
    }

    /// The global prompt batches in flight, oldest first.
    pub fn global_batches(&self) -> Vec<&[usize]> {
        self.queue.iter().map(|b| &b.global[..]).collect()
    }

    /// Starts generating a batch on the runtime (returns at once).
    pub fn request(&mut self, rt: &Runtime, r: Request<'_>) {
        let client = r.client.clone();
        let finished = Arc::new(Mutex::new(None));
        let done = finished.clone();
        let (parts, min_version) = (r.parts, r.min_version);
        let task = rt.spawn(async move {
            let out = generate_parts(&client, parts, min_version).await;
            *done.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            out
        });
        let started = Instant::now();
        self.intervals.push((started, finished));
        self.queue.push_back(PendingBatch {
            round: r.round,
            prompts: r.prompts,
            global: r.global,
            sampler_before: r.sampler_before,
            min_version,
            started,
            task,
        });
    }

    /// Waits for the oldest batch; returns it with its groups (in job order).
    pub fn next(
        &mut self,
        rt: &Runtime,
    ) -> Option<(PendingBatch, Result<Vec<RolloutGroup>, RolloutError>)> {
        let mut batch = self.queue.pop_front()?;
        let out = rt.block_on(&mut batch.task).unwrap_or_else(|e| {
            Err(RolloutError::InvalidInput(format!(
                "the rollout task of round {} ended abnormally: {e}",
                batch.round
            )))
        });
        Some((batch, out))
    }

    /// Waits until every batch in flight has finished generating (their groups stay
    /// queued), so that no generation overlaps what comes next (a weight push before an
    /// evaluation).
    pub fn settle(&mut self, rt: &Runtime) {
        for b in &mut self.queue {
            rt.block_on(async {
                while !b.task.is_finished() {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            });
        }
    }

    /// Seconds within `[from, to]` during which at least one of this rank's batches
    /// was generating; intervals that ended before `from` are forgotten.
    pub fn busy_within(&mut self, from: Instant, to: Instant) -> f64 {
        let mut spans: Vec<(Instant, Instant)> = self
            .intervals
            .iter()
            .map(|(s, e)| {
                let end = e.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(to);
                ((*s).max(from), end.min(to))
            })
            .filter(|(s, e)| s < e)
            .collect();
        self.intervals.retain(|(_, e)| {
            e.lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none_or(|end| end > to)
        });
        spans.sort();
        let mut busy = 0.0;
        let mut cur: Option<(Instant, Instant)> = None;
        for (s, e) in spans {
            match &mut cur {
                Some((_, ce)) if s <= *ce => *ce = (*ce).max(e),
                _ => {
                    if let Some((cs, ce)) = cur {
                        busy += (ce - cs).as_secs_f64();
                    }
                    cur = Some((s, e));
                }
            }
        }
        if let Some((cs, ce)) = cur {
            busy += (ce - cs).as_secs_f64();
        }
        busy
    }
}

impl PendingBatch {
    /// When its generation started.
    pub fn started(&self) -> Instant {
        self.started
    }
}

/// How many versions behind `policy` a group of `version` is; `Err` if it is ahead of
/// every version pushed (`version > policy`: not produced by this trainer's weights).
pub fn staleness(policy: u64, version: u64) -> Result<u64, u64> {
    policy.checked_sub(version).ok_or(version)
}

/// A checkpoint's `pending_batches` that this run cannot request again.
#[derive(Debug, thiserror::Error)]
pub enum PendingStateError {
    #[error("trainer state: pending_batches is not a list of prompt index lists: {reason}")]
    Malformed { reason: String },
    #[error(
        "trainer state: a pending batch of {len} prompts (largest index {max:?}) does not fit \
         this run ({per_round} prompts per round over {num_prompts} rows): resume with the \
         checkpoint's dataset, batch size and world size"
    )]
    Mismatch {
        len: usize,
        max: Option<usize>,
        per_round: usize,
        num_prompts: usize,
    },
}

/// The global prompt batches a checkpoint recorded as in flight (`pending_batches`,
/// absent: none), each checked against this run's batch size and dataset.
pub fn pending_batches(
    state: &serde_json::Value,
    per_round: usize,
    num_prompts: usize,
) -> Result<VecDeque<Vec<usize>>, PendingStateError> {
    let Some(v) = state.get("pending_batches") else {
        return Ok(VecDeque::new());
    };
    let batches: Vec<Vec<usize>> =
        serde_json::from_value(v.clone()).map_err(|e| PendingStateError::Malformed {
            reason: e.to_string(),
        })?;
    for b in &batches {
        if b.len() != per_round || b.iter().any(|&i| i >= num_prompts) {
            return Err(PendingStateError::Mismatch {
                len: b.len(),
                max: b.iter().max().copied(),
                per_round,
                num_prompts,
            });
        }
    }
    Ok(batches.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_batches_are_read_back_and_checked_against_the_run() {
        let state = serde_json::json!({ "pending_batches": [[3, 1], [0, 2]] });
        let got = pending_batches(&state, 2, 4).unwrap();
        assert_eq!(got, VecDeque::from(vec![vec![3, 1], vec![0, 2]]));
        assert!(pending_batches(&serde_json::json!({}), 2, 4)
            .unwrap()
            .is_empty());
        let e = pending_batches(&state, 3, 4).unwrap_err().to_string();
        assert!(e.contains("does not fit this run"), "{e}");
        let e = pending_batches(&state, 2, 3).unwrap_err().to_string();
        assert!(
            e.contains("3 prompts per round") || e.contains("over 3 rows"),
            "{e}"
        );
    }

    #[test]
    fn staleness_is_bounded_below_by_the_pushed_version() {
        assert_eq!(staleness(5, 5), Ok(0));
        assert_eq!(staleness(5, 3), Ok(2));
        assert_eq!(staleness(5, 6), Err(6));
        assert_eq!(staleness(0, u64::MAX), Err(u64::MAX));
    }
}
