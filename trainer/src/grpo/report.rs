//! The end of a round: metrics under TRL's names to the registry and the log, and one
//! progress line on the console (with a bar and an ETA when stdout is a terminal).
use std::io::IsTerminal;

use super::phases::Timings;
use super::stats::RoundStats;
use super::trainer::Grpo;
use crate::metrics::StepLog;
use crate::session::record_memory;
use crate::zero::StepStats;

/// `[#####-----]` of `width` cells for `done` of `total`.
pub fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done.min(total) as f64 / total as f64) * width as f64).round() as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// `1h02m`, `3m05s` or `12s`.
pub fn format_eta(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

impl Grpo<'_> {
    pub(super) fn report(&self, stats: &RoundStats, step: &StepStats, times: &Timings, secs: f64) {
        let mut log = StepLog::new();
        stats.finish(&self.cfg.reward_funcs, &mut log);
        let world = self.sess.env.world_size as f64;
        for (k, v) in [
            ("loss", step.loss),
            ("grad_norm", step.grad_norm),
            ("learning_rate", step.learning_rate),
            ("epoch", self.sampler.epoch() as f64),
            ("weight_version", self.version as f64),
            ("time/step", secs),
            ("time/generate", times.rollout),
            ("time/reward", times.reward),
            ("time/advantage", times.advantage),
            ("time/forward_backward", times.forward_backward),
            ("time/optimizer", times.optimizer),
            ("time/weight_push", times.weight_sync),
            ("time/rollout_wait", stats.rollout_wait / world),
            ("time/workers_idle", stats.workers_idle),
            (
                "tokens_per_second/generation",
                stats.completion_tokens / times.rollout.max(1e-9),
            ),
            (
                "tokens_per_second/train",
                stats.train_tokens * self.cfg.num_iterations as f64 / times.train().max(1e-9),
            ),
        ] {
            log.insert(k.into(), v);
        }
        let workers = self.client.status();
        // Only the live workers (elastic ones that left drop out of the series).
        self.sess.metrics.worker_healthy.reset();
        self.sess.metrics.worker_weight_version.reset();
        for w in &workers {
            let healthy = if w.healthy { 1.0 } else { 0.0 };
            self.sess
                .metrics
                .worker_healthy
                .with_label_values(&[w.url.as_str()])
                .set(healthy);
            if let Some(v) = w.weight_version {
                self.sess
                    .metrics
                    .worker_weight_version
                    .with_label_values(&[w.url.as_str()])
                    .set(v as f64);
            }
        }
        record_memory(&self.sess.metrics, self.engine.memory());
        let (main, out) = (self.sess.is_main(), &self.cfg.args.output_dir);
        crate::runlog::publish_step(&self.sess.metrics, main, out, step.step, &log);
        if !self.sess.is_main() {
            return;
        }
        let first_func = self
            .cfg
            .reward_funcs
            .first()
            .map(String::as_str)
            .unwrap_or("");
        let healthy = workers.iter().filter(|w| w.healthy).count();
        let stale = if self.cfg.max_staleness > 0 {
            format!(
                " | stale {:.2} (dropped {})",
                log["staleness/mean"], stats.stale_dropped
            )
        } else {
            String::new()
        };
        let dynamic = if self.cfg.dynamic_sampling {
            format!(
                " | gen rounds {} | dropped {} | padded {}",
                stats.ds_rounds, stats.ds_dropped, stats.ds_padding
            )
        } else {
            String::new()
        };
        let line = format!(
            "step {}/{} | reward {:.3} ± {:.3} | {first_func} {:.3} | len {:.1} | clipped {:.2} | loss {:+.4} | grad {:.3} | groups {}{dynamic} | workers {healthy}/{}{stale} | {:.1} s (gen {:.1}, reward {:.2}, train {:.1}, opt {:.2}, push {:.2})",
            step.step,
            self.total,
            log["reward"],
            log["reward_std"],
            log.get(&format!("rewards/{first_func}/mean")).copied().unwrap_or(0.0),
            log["completions/mean_length"],
            log["completions/clipped_ratio"],
            step.loss,
            step.grad_norm,
            stats.groups,
            workers.len(),
            secs,
            times.rollout,
            times.reward,
            times.forward_backward,
            times.optimizer,
            times.weight_sync
        );
        if std::io::stdout().is_terminal() {
            let done = step.step - self.steps_at_start;
            let left = self.total - step.step;
            let per_step = self.started.elapsed().as_secs_f64() / done.max(1) as f64;
            println!(
                "{} ETA {} {line}",
                progress_bar(step.step, self.total, 20),
                format_eta(per_step * left as f64)
            );
        } else {
            println!("{line}");
        }
        let log_every = self.cfg.args.log_interval(self.steps_per_epoch, self.total);
        if log_every.due(step.step) || step.step == self.total {
            let fields: Vec<String> = log.iter().map(|(k, v)| format!("{k}={v:.6}")).collect();
            tracing::info!(step = step.step, "{}", fields.join(" "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_and_eta() {
        assert_eq!(progress_bar(0, 10, 4), "[----]");
        assert_eq!(progress_bar(5, 10, 4), "[##--]");
        assert_eq!(progress_bar(12, 10, 4), "[####]");
        assert_eq!(format_eta(9.4), "9s");
        assert_eq!(format_eta(185.0), "3m05s");
        assert_eq!(format_eta(3720.0), "1h02m");
    }
}
