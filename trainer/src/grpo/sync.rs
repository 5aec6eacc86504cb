//! Handing the policy to the rollout workers: the push after a step (streamed unit by
//! unit: rank 0 sends, every rank takes part in the gathers) and the version check at
//! start, which pushes when the workers serve other weights (a resumed run).
use std::time::Instant;

use crate::error::{Result, RunError};
use tch::Tensor;

use super::phases::{Phase, Timings};
use super::trainer::Grpo;
use crate::metrics::Phase as RunPhase;

impl Grpo<'_> {
    /// Pushes the policy if it stepped since the last push (collective).
    pub(super) fn sync_pending(&mut self, times: &mut Timings) -> Result<()> {
        if !self.pending_push {
            return Ok(());
        }
        let next = self
            .version
            .checked_add(1)
            .ok_or(RunError::VersionOverflow {
                version: self.version,
            })?;
        times.time(Phase::WeightSync, || self.push_weights(next))?;
        self.pending_push = false;
        Ok(())
    }

    /// Makes every worker serve this policy: rank 0 compares the workers' versions
    /// with the policy's and, if any differs (a resumed run, or workers started from
    /// another checkpoint), pushes the weights under a version above all of them.
    pub(super) fn sync_workers(&mut self) -> Result<()> {
        let mut decision = Tensor::from_slice(&[0i64, self.version as i64]);
        if self.sess.is_main() {
            let versions: Vec<u64> = self
                .client
                .status()
                .iter()
                .filter_map(|w| w.weight_version)
                .collect();
            let resumed = self.engine.steps_done() > 0;
            let differs = versions.iter().any(|&v| v != self.version);
            if resumed || differs {
                let highest = versions
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(0)
                    .max(self.version);
                // Versions travel as i64 between ranks; one that large is not ours.
                if highest >= i64::MAX as u64 {
                    return Err(RunError::WorkerAhead { highest });
                }
                decision = Tensor::from_slice(&[1i64, highest as i64 + 1]);
            }
        }
        self.engine.comm().broadcast(&mut decision, 0)?;
        if decision.int64_value(&[0]) == 1 {
            self.push_weights(decision.int64_value(&[1]) as u64)?;
        }
        Ok(())
    }

    /// Streams the policy to every worker under `version` (collective).
    fn push_weights(&mut self, version: u64) -> Result<f64> {
        self.sess.metrics.enter_phase(RunPhase::WeightSync);
        let t0 = Instant::now();
        let main = self.sess.is_main();
        let rt = &self.sess.rt;
        let mut push = None;
        let mut failure: Option<String> = None;
        if main {
            match rt.block_on(self.client.begin_push(version)) {
                Ok(p) => push = Some(p),
                Err(e) => failure = Some(e.to_string()),
            }
        }
        let wire = self.client.wire_dtype().kind();
        let visited = self
            .engine
            .visit_weights(wire, |name, t| match push.as_mut() {
                Some(p) => rt.block_on(p.send(name, t)).map_err(Into::into),
                None => Ok(()),
            });
        if let Err(e) = visited {
            failure.get_or_insert(e.to_string());
        }
        if let (Some(p), None) = (push, &failure) {
            match rt.block_on(p.commit()) {
                Ok(report) => {
                    for (worker, why) in &report.failed {
                        tracing::warn!(%worker, %why, version, "worker missed the weight update");
                    }
                }
                Err(e) => failure = Some(e.to_string()),
            }
        }
        // 1: committed; 0: failed; 2: the NCCL path failed, so every rank streams the
        // weights once more and the push takes gRPC / the data plane.
        let retry = main && failure.is_some() && self.client.take_nccl_failure();
        let state = if retry {
            2
        } else {
            i64::from(failure.is_none())
        };
        let mut ok = Tensor::from_slice(&[state]);
        self.engine.comm().broadcast(&mut ok, 0)?;
        if ok.int64_value(&[0]) == 2 {
            tracing::warn!(version, why = ?failure, "NCCL weight push failed; pushing again over gRPC / the data plane");
            return self.push_weights(version);
        }
        if ok.int64_value(&[0]) == 0 {
            return Err(RunError::WeightPush {
                version,
                why: failure,
            });
        }
        self.version = version;
        self.sess.rt.block_on(self.client.refresh());
        Ok(t0.elapsed().as_secs_f64())
    }
}
