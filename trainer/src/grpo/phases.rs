//! The phases of a GRPO round, each a tracing span named after it (`rollout`, `reward`,
//! `advantage`, `forward_backward`, `optimizer`, `weight_sync`), and the wall-clock time
//! the round spent in each. [`Timings::time`] opens the span and adds the elapsed time.
use std::time::Instant;

/// A phase of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for this round's groups (and, with `max_staleness = 0`, generating them).
    Rollout,
    /// The reward functions.
    Reward,
    /// Group-relative advantages and packing.
    Advantage,
    /// Old and reference log-probs, forward and backward of every micro-batch.
    ForwardBackward,
    /// The optimizer step (reduction, clipping, AdamW, parameter all-gather).
    Optimizer,
    /// Streaming the new weights to the workers.
    WeightSync,
}

impl Phase {
    fn span(self) -> tracing::Span {
        // Span names must be literals; one arm per phase.
        match self {
            Phase::Rollout => tracing::info_span!("rollout"),
            Phase::Reward => tracing::info_span!("reward"),
            Phase::Advantage => tracing::info_span!("advantage"),
            Phase::ForwardBackward => tracing::info_span!("forward_backward"),
            Phase::Optimizer => tracing::info_span!("optimizer"),
            Phase::WeightSync => tracing::info_span!("weight_sync"),
        }
    }
}

/// Seconds a round spent in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub rollout: f64,
    pub reward: f64,
    pub advantage: f64,
    pub forward_backward: f64,
    pub optimizer: f64,
    pub weight_sync: f64,
}

impl Timings {
    fn slot(&mut self, phase: Phase) -> &mut f64 {
        match phase {
            Phase::Rollout => &mut self.rollout,
            Phase::Reward => &mut self.reward,
            Phase::Advantage => &mut self.advantage,
            Phase::ForwardBackward => &mut self.forward_backward,
            Phase::Optimizer => &mut self.optimizer,
            Phase::WeightSync => &mut self.weight_sync,
        }
    }

    /// Runs `f` inside `phase`'s span and adds its wall-clock time to the phase.
    pub fn time<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let _span = phase.span().entered();
        let t = Instant::now();
        let out = f();
        *self.slot(phase) += t.elapsed().as_secs_f64();
        out
    }

    /// Training time: forward/backward plus optimizer.
    pub fn train(&self) -> f64 {
        self.forward_backward + self.optimizer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_adds_to_its_phase_only() {
        let mut t = Timings::default();
        let v = t.time(Phase::Reward, || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            7
        });
        assert_eq!(v, 7);
        t.time(Phase::Reward, || ());
        assert!(t.reward >= 0.005);
        assert_eq!(
            (t.rollout, t.advantage, t.train(), t.weight_sync),
            (0.0, 0.0, 0.0, 0.0)
        );
    }
}
