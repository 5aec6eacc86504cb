//! Timeouts consistent by construction: no rank may wait on I/O longer than its peers
//! wait for it in a collective.
//!
//! While one rank waits on a rollout worker or a reward service, the others may already
//! sit in the step's next collective, which gives up after `dist.timeout_secs` and kills
//! the job. A slow worker is meant to be failed over (its groups re-sent elsewhere), a
//! slow reward service to fail the step with its name; neither should surface as a
//! collective timeout blaming the waiting rank. So every single I/O wait a rank makes
//! inside a step must end, with [`SLACK_SECS`] to spare, before a collective's wait does:
//!
//! - `rollout.connect_timeout_secs + rollout.request_timeout_secs` (a probe, then a
//!   stream that stays silent),
//! - each `rewards.external[i].timeout_secs`.
//!
//! Checkpoint writes are bounded differently: every rank writes its own shards, then the
//! ranks agree on the outcome, so a rank whose disk fails reports it to all (see
//! `zero::checkpoint`); a disk slower than `dist.timeout_secs` for one shard is a
//! misconfigured job, which docs/security.md says how to size.
use crate::config::invalid::{bad, InvalidConfig};
use crate::dist::DistConfig;
use crate::rewards::RewardsConfig;
use crate::rollout::RolloutConfig;

/// Seconds every I/O wait must end before the collective timeout: room for the
/// failover itself (re-sending, the error report) and clock noise.
pub const SLACK_SECS: f64 = 30.0;

/// Refuses settings where a rank's I/O wait can outlast its peers' collective wait; the
/// error names both fields and a value that fits (its `field()` is the I/O timeout).
pub fn check(
    dist: &DistConfig,
    rollout: &RolloutConfig,
    rewards: &RewardsConfig,
) -> Result<(), InvalidConfig> {
    let collective = dist.timeout_secs as f64;
    let budget = collective - SLACK_SECS;
    let worker = rollout.connect_timeout_secs + rollout.request_timeout_secs;
    if worker > budget {
        return Err(bad(
            "rollout.request_timeout_secs",
            format!(
            "rollout.connect_timeout_secs + rollout.request_timeout_secs = {worker}s must be at most \
             dist.timeout_secs - {SLACK_SECS} = {budget}s: other ranks wait in a collective for \
             dist.timeout_secs = {collective}s while this one waits on a worker, so a slow worker \
             would kill the job instead of failing over; lower rollout.request_timeout_secs or \
             raise dist.timeout_secs"
        ),
        ));
    }
    for (i, e) in rewards.external.iter().enumerate() {
        if e.timeout_secs > budget {
            return Err(bad(
                &format!("rewards.external[{i}].timeout_secs"),
                format!(
                "rewards.external[{i}] ({}) timeout_secs = {}s must be at most dist.timeout_secs - \
                 {SLACK_SECS} = {budget}s, or a slow reward service trips the collective timeout \
                 of the other ranks first",
                e.name, e.timeout_secs
            ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_and_each_overlong_wait_is_named() {
        let (d, r, w) = (
            DistConfig::default(),
            RolloutConfig::default(),
            RewardsConfig::default(),
        );
        check(&d, &r, &w).unwrap();
        let slow = RolloutConfig {
            request_timeout_secs: 600.0,
            ..RolloutConfig::default()
        };
        let e = check(&d, &slow, &w).unwrap_err().to_string();
        assert!(
            e.contains("rollout.request_timeout_secs") && e.contains("dist.timeout_secs"),
            "{e}"
        );
        let long = DistConfig {
            timeout_secs: 1000,
            ..DistConfig::default()
        };
        check(&long, &slow, &w).unwrap();
        let mut rewards = RewardsConfig::default();
        rewards.external.push(
            serde_json::from_value(serde_json::json!({
                "name": "judge", "url": "http://127.0.0.1:1", "timeout_secs": 290.0
            }))
            .unwrap(),
        );
        let e = check(&d, &r, &rewards).unwrap_err().to_string();
        assert!(e.contains("rewards.external[0] (judge)"), "{e}");
    }
}
