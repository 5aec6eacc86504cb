//! The worker pool: plain state, no sockets. Which workers are healthy, which weight
//! version each serves, how many calls each has in flight, and when a failed one is
//! probed again. Generic over the connection type so it is unit-tested without a network.

use std::time::{Duration, Instant};

use super::config::MAX_RETRY_BACKOFF;

/// What the client knows about one worker, as [`super::RolloutClient::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub url: String,
    /// Answered its last probe and no call to it has failed since.
    pub healthy: bool,
    /// The weight version it serves, as last seen (probe, push or group); `None` before
    /// it ever answered.
    pub weight_version: Option<u64>,
    /// `Generate` calls in flight on it.
    pub in_flight: usize,
    /// Failed calls, streams, pushes and probes so far.
    pub failures: u64,
    /// Groups received from it.
    pub groups_done: u64,
}

/// One worker's state.
#[derive(Debug)]
pub struct Slot<C> {
    pub url: String,
    /// The connection while healthy; dropped on failure so a probe reconnects afresh.
    pub conn: Option<C>,
    /// The data-plane port the worker announced (`GetInfo.data_port`, 0: none) over
    /// `conn`: asked at the first push on a connection, forgotten with the connection.
    pub data_port: Option<u32>,
    pub version: Option<u64>,
    pub in_flight: usize,
    pub failures: u64,
    pub groups_done: u64,
    pub last_error: Option<String>,
    backoff: Duration,
    next_probe: Instant,
    probing: bool,
    /// Gone from the resolved worker set (elastic workers): never probed nor used.
    retired: bool,
}

impl<C> Slot<C> {
    /// Drops the connection (and what was learnt over it); `true` if there was one.
    fn drop_conn(&mut self) -> bool {
        self.data_port = None;
        self.conn.take().is_some()
    }

    fn fresh(url: &str, base_backoff: Duration, now: Instant) -> Self {
        Slot {
            url: url.to_string(),
            conn: None,
            data_port: None,
            version: None,
            in_flight: 0,
            failures: 0,
            groups_done: 0,
            last_error: Some("not probed yet".into()),
            backoff: base_backoff,
            next_probe: now,
            probing: false,
            retired: false,
        }
    }
}

/// All workers of a client.
#[derive(Debug)]
pub struct Pool<C> {
    pub slots: Vec<Slot<C>>,
    max_in_flight: usize,
    base_backoff: Duration,
    /// Where the least-loaded search starts, so ties rotate over the workers.
    cursor: usize,
}

impl<C: Clone> Pool<C> {
    /// Every worker starts failed with a probe due now.
    pub fn new(
        urls: &[String],
        max_in_flight: usize,
        base_backoff: Duration,
        now: Instant,
    ) -> Self {
        Pool {
            slots: urls
                .iter()
                .map(|u| Slot::fresh(u, base_backoff, now))
                .collect(),
            max_in_flight,
            base_backoff,
            cursor: 0,
        }
    }

    /// Makes the pool's workers `urls` (the newly resolved set): unknown ones are
    /// appended with a probe due now, known retired ones come back the same way, and
    /// live ones not in `urls` are retired (their connection dropped; a call in flight
    /// finishes on its own). Slot indices never change. Returns (added, retired) urls.
    pub fn sync_urls(&mut self, urls: &[String], now: Instant) -> (Vec<String>, Vec<String>) {
        let (mut added, mut retired) = (vec![], vec![]);
        for u in urls {
            match self.slots.iter_mut().find(|s| &s.url == u) {
                Some(s) if s.retired => {
                    s.retired = false;
                    s.drop_conn();
                    s.version = None;
                    s.next_probe = now;
                    s.backoff = self.base_backoff;
                    s.last_error = Some("not probed yet".into());
                    added.push(u.clone());
                }
                Some(_) => {}
                None => {
                    self.slots.push(Slot::fresh(u, self.base_backoff, now));
                    added.push(u.clone());
                }
            }
        }
        for s in &mut self.slots {
            if !s.retired && !urls.contains(&s.url) {
                s.retired = true;
                s.drop_conn();
                s.last_error = Some("no longer resolved".into());
                retired.push(s.url.clone());
            }
        }
        (added, retired)
    }

    pub fn healthy(&self, i: usize) -> bool {
        self.slots[i].conn.is_some()
    }

    /// Healthy and serving at least `min_version`.
    pub fn usable(&self, i: usize, min_version: u64) -> bool {
        let s = &self.slots[i];
        s.conn.is_some() && s.version.is_some_and(|v| v >= min_version)
    }

    pub fn any_usable(&self, min_version: u64) -> bool {
        (0..self.slots.len()).any(|i| self.usable(i, min_version))
    }

    /// Starts this rank's rotation at worker `rank * n / world`, so the ranks' clients
    /// (each sees only its own calls) spread their first requests of a step over
    /// different workers instead of all picking worker 0, then 1, ... together. The
    /// ranks send as many requests per step (their shares of the prompts are equal), so
    /// the offsets hold from step to step.
    pub fn spread_over_ranks(&mut self, rank: usize, world: usize) {
        let n = self.slots.len();
        if world > 0 && n > 0 {
            self.cursor = rank % world * n / world;
        }
    }

    /// The usable worker with a free request slot and the fewest calls in flight (ties
    /// rotate), with its connection; its in-flight count is taken. `None` if all are busy
    /// or unusable.
    pub fn acquire(&mut self, min_version: u64) -> Option<(usize, C)> {
        let n = self.slots.len();
        let best = (0..n)
            .map(|k| (self.cursor + k) % n)
            .filter(|&i| {
                self.usable(i, min_version) && self.slots[i].in_flight < self.max_in_flight
            })
            .min_by_key(|&i| self.slots[i].in_flight)?;
        self.cursor = (best + 1) % n;
        let s = &mut self.slots[best];
        s.in_flight += 1;
        Some((best, s.conn.clone()?))
    }

    /// Gives back a request slot taken by [`Pool::acquire`].
    pub fn release(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.in_flight = s.in_flight.saturating_sub(1);
    }

    /// A call, stream or push to `i` failed: drop the connection and schedule a probe.
    /// Only the first failure of a healthy worker starts a new backoff period.
    pub fn mark_failed(&mut self, i: usize, error: String, now: Instant) {
        let s = &mut self.slots[i];
        s.failures += 1;
        s.last_error = Some(error);
        if s.drop_conn() {
            s.next_probe = now + s.backoff;
        }
    }

    /// The worker served a group (or a push) at `version`. A version below the known one
    /// means it restarted: the known version is lowered so `min_version` filters it.
    pub fn observe_version(&mut self, i: usize, version: u64) {
        self.slots[i].version = Some(version);
    }

    pub fn count_group(&mut self, i: usize) {
        self.slots[i].groups_done += 1;
    }

    /// Failed workers whose probe is due (or all failed ones with `force`), now marked as
    /// being probed so no second probe starts before this one reports.
    pub fn take_due_probes(&mut self, now: Instant, force: bool) -> Vec<(usize, String)> {
        let mut due = vec![];
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.conn.is_none() && !s.probing && !s.retired && (force || s.next_probe <= now) {
                s.probing = true;
                due.push((i, s.url.clone()));
            }
        }
        due
    }

    /// Every worker not already being probed (healthy ones included), now marked as
    /// being probed: a refresh of what the client knows (e.g. versions pushed by another
    /// rank's client).
    pub fn take_all_probes(&mut self) -> Vec<(usize, String)> {
        let mut all = vec![];
        for (i, s) in self.slots.iter_mut().enumerate() {
            if !s.probing && !s.retired {
                s.probing = true;
                all.push((i, s.url.clone()));
            }
        }
        all
    }

    /// When the next probe falls due (`None` if no failed worker waits for one).
    pub fn next_probe_at(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter(|s| s.conn.is_none() && !s.probing && !s.retired)
            .map(|s| s.next_probe)
            .min()
    }

    /// The probe answered: the worker is healthy again at `version`, backoff reset.
    pub fn probe_succeeded(&mut self, i: usize, conn: C, version: u64) {
        let s = &mut self.slots[i];
        s.probing = false;
        if s.retired {
            return;
        }
        s.conn = Some(conn);
        s.version = Some(version);
        s.last_error = None;
        s.backoff = self.base_backoff;
    }

    /// The probe failed: the worker is failed (its connection dropped), the backoff
    /// doubles (capped at 30 s) and the next probe waits that long.
    pub fn refresh_failed(&mut self, i: usize, error: String, now: Instant) {
        self.slots[i].drop_conn();
        self.probe_failed(i, error, now);
    }

    /// The probe failed: the backoff doubles (capped at 30 s) and the next probe waits that long.
    pub fn probe_failed(&mut self, i: usize, error: String, now: Instant) {
        let s = &mut self.slots[i];
        s.probing = false;
        s.failures += 1;
        s.last_error = Some(error);
        s.backoff = (s.backoff * 2).min(MAX_RETRY_BACKOFF);
        s.next_probe = now + s.backoff;
    }

    /// The live workers (retired ones left out).
    pub fn status(&self) -> Vec<WorkerStatus> {
        self.slots
            .iter()
            .filter(|s| !s.retired)
            .map(|s| WorkerStatus {
                url: s.url.clone(),
                healthy: s.conn.is_some(),
                weight_version: s.version,
                in_flight: s.in_flight,
                failures: s.failures,
                groups_done: s.groups_done,
            })
            .collect()
    }

    /// One line per worker for error messages: url, health, version, load, last error.
    pub fn describe(&self) -> String {
        self.slots
            .iter()
            .filter(|s| !s.retired)
            .map(|s| {
                let version = s.version.map_or("unknown".into(), |v| v.to_string());
                let state = if s.conn.is_some() {
                    "healthy"
                } else {
                    "failed"
                };
                let err = s
                    .last_error
                    .as_deref()
                    .map_or(String::new(), |e| format!(", last error: {e}"));
                format!(
                    "{} ({state}, weight version {version}, {} in flight, {} failures{err})",
                    s.url, s.in_flight, s.failures
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, now: Instant) -> Pool<()> {
        let urls: Vec<String> = (0..n).map(|i| format!("http://w{i}:1")).collect();
        let mut p = Pool::new(&urls, 2, Duration::from_secs(1), now);
        let due = p.take_due_probes(now, false);
        assert_eq!(due.len(), n, "every worker is probed at the start");
        for (i, _) in due {
            p.probe_succeeded(i, (), 0);
        }
        p
    }

    #[test]
    fn acquire_spreads_load_and_respects_the_bound() {
        let now = Instant::now();
        let mut p = pool(3, now);
        let picks: Vec<usize> = (0..6).map(|_| p.acquire(0).unwrap().0).collect();
        let mut counts = [0; 3];
        for i in &picks {
            counts[*i] += 1;
        }
        assert_eq!(counts, [2, 2, 2], "{picks:?}");
        assert!(
            p.acquire(0).is_none(),
            "every worker is at max_requests_per_worker"
        );
        p.release(1);
        assert_eq!(p.acquire(0).unwrap().0, 1);
    }

    #[test]
    fn ranks_start_their_rotation_on_different_workers() {
        let now = Instant::now();
        // Picks of `per_rank` requests by each of `world` ranks over `n` workers.
        let load = |n: usize, world: usize, per_rank: usize| {
            let mut counts = vec![0; n];
            for rank in 0..world {
                let mut p = pool(n, now);
                p.spread_over_ranks(rank, world);
                for _ in 0..per_rank {
                    counts[p.acquire(0).unwrap().0] += 1;
                }
            }
            counts
        };
        assert_eq!(load(2, 2, 1), [1, 1], "one request per rank");
        assert_eq!(load(4, 2, 2), [1, 1, 1, 1]);
        assert_eq!(load(2, 4, 1), [2, 2]);
        assert_eq!(load(3, 2, 1), [1, 1, 0]);
        // Without the offsets every rank's first request goes to worker 0.
        let mut counts = [0; 2];
        for _ in 0..2 {
            counts[pool(2, now).acquire(0).unwrap().0] += 1;
        }
        assert_eq!(counts, [2, 0]);
    }

    #[test]
    fn min_version_filters_stale_workers() {
        let now = Instant::now();
        let mut p = pool(2, now);
        p.observe_version(0, 3);
        assert!(p.usable(0, 3) && !p.usable(1, 3));
        assert_eq!(p.acquire(3).unwrap().0, 0);
        assert_eq!(p.acquire(3).unwrap().0, 0);
        assert!(p.acquire(3).is_none(), "worker 1 serves version 0 only");
        assert!(p.any_usable(3) && !p.any_usable(4));
    }

    #[test]
    fn failed_workers_back_off_doubling_and_recover() {
        let t0 = Instant::now();
        let mut p = pool(2, t0);
        p.mark_failed(0, "stream broke".into(), t0);
        p.mark_failed(0, "second stream broke".into(), t0);
        assert!(!p.healthy(0));
        assert_eq!(p.slots[0].failures, 2);
        assert_eq!(p.next_probe_at(), Some(t0 + Duration::from_secs(1)));
        assert!(p.take_due_probes(t0, false).is_empty());
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            p.take_due_probes(t1, false),
            vec![(0, "http://w0:1".into())]
        );
        assert!(
            p.take_due_probes(t1, false).is_empty(),
            "one probe at a time"
        );
        assert_eq!(p.next_probe_at(), None);
        p.probe_failed(0, "refused".into(), t1);
        assert_eq!(p.next_probe_at(), Some(t1 + Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        p.take_due_probes(t2, false);
        p.probe_failed(0, "refused".into(), t2);
        assert_eq!(p.next_probe_at(), Some(t2 + Duration::from_secs(4)));
        // A forced probe (weight push) does not wait for the backoff.
        assert_eq!(p.take_due_probes(t2, true).len(), 1);
        p.probe_succeeded(0, (), 5);
        assert!(p.usable(0, 5));
        p.mark_failed(0, "again".into(), t2);
        assert_eq!(
            p.next_probe_at(),
            Some(t2 + Duration::from_secs(1)),
            "backoff resets after a successful probe"
        );
        assert!(p
            .describe()
            .contains("http://w0:1 (failed, weight version 5"));
    }

    #[test]
    fn resolved_workers_join_unusable_until_they_serve_the_version_and_leave() {
        let now = Instant::now();
        let mut p = pool(2, now);
        p.observe_version(0, 4);
        p.observe_version(1, 4);
        let urls = |ids: &[usize]| -> Vec<String> {
            ids.iter().map(|i| format!("http://w{i}:1")).collect()
        };
        // Scale up: w2 appears, probed at once, serving the starting checkpoint (0).
        let (added, retired) = p.sync_urls(&urls(&[0, 1, 2]), now);
        assert_eq!((added, retired), (urls(&[2]), vec![]));
        assert_eq!(
            p.take_due_probes(now, false),
            vec![(2, "http://w2:1".into())]
        );
        p.probe_succeeded(2, (), 0);
        assert!(
            p.healthy(2) && !p.usable(2, 4),
            "no group before the current weights"
        );
        let picks: Vec<usize> = (0..4).map(|_| p.acquire(4).unwrap().0).collect();
        assert!(!picks.contains(&2), "{picks:?}");
        // The next push gives it the new version; then it serves.
        p.observe_version(2, 5);
        assert!(p.usable(2, 5));
        // Scale down: w0 vanishes; a call in flight on it still releases its slot.
        let (added, retired) = p.sync_urls(&urls(&[1, 2]), now);
        assert_eq!((added, retired), (vec![], urls(&[0])));
        assert!(!p.usable(0, 0) && p.take_all_probes().iter().all(|(i, _)| *i != 0));
        p.release(0);
        assert_eq!(p.status().len(), 2);
        assert!(!p.describe().contains("w0"));
        assert!(p.take_due_probes(now, true).iter().all(|(i, _)| *i != 0));
        // It comes back (same pod address): probed again as a new worker.
        let (added, _) = p.sync_urls(&urls(&[0, 1, 2]), now);
        assert_eq!(added, urls(&[0]));
        assert_eq!(p.slots.len(), 3, "indices are stable");
    }

    #[test]
    fn backoff_is_capped_at_30s() {
        let t = Instant::now();
        let mut p = pool(1, t);
        p.mark_failed(0, "x".into(), t);
        for _ in 0..10 {
            p.take_due_probes(t, true);
            p.probe_failed(0, "x".into(), t);
        }
        assert_eq!(p.next_probe_at(), Some(t + MAX_RETRY_BACKOFF));
    }
}
