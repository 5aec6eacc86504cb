//! Bookkeeping of one `generate` call: plain state, no sockets.
//!
//! Jobs `0..num_jobs` are cut into requests of consecutive jobs. A request sent to a
//! worker becomes a *flight*; each group it streams back is accepted once. When a flight
//! fails, its jobs not yet received go back to the front of the queue, again as runs of
//! consecutive jobs. Consecutive runs keep sampling reproducible: a request starting at
//! job `f` is seeded with `seed + f * n`, so completion `j` of job `g` always draws from
//! stream `seed + g * n + j` (the worker seeds prompt `i` of a request with
//! `seed + i * n + j`), whichever worker serves it and however often it was re-sent.

use std::collections::{HashMap, VecDeque};

pub type FlightId = u64;

/// A request in flight on one worker.
#[derive(Debug)]
pub struct Flight {
    pub worker: usize,
    /// Job indices, consecutive; prompt `i` of the request is job `jobs[i]`.
    pub jobs: Vec<usize>,
    received: Vec<bool>,
}

/// What a group that arrived on a flight stands for.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The flight was already failed or finished: its jobs were re-queued; drop the group.
    Stale,
    /// The worker broke the protocol (index out of range, or a group sent twice).
    Invalid(String),
    /// The group answers this job.
    Job(usize),
}

#[derive(Debug)]
pub struct Dispatch {
    queue: VecDeque<Vec<usize>>,
    flights: HashMap<FlightId, Flight>,
    next_id: FlightId,
    remaining: usize,
}

/// Splits sorted job indices into runs of consecutive ones.
fn consecutive_runs(jobs: &[usize]) -> Vec<Vec<usize>> {
    let mut runs: Vec<Vec<usize>> = vec![];
    for &j in jobs {
        match runs.last_mut() {
            Some(run) if j > 0 && run.last() == Some(&(j - 1)) => run.push(j),
            _ => runs.push(vec![j]),
        }
    }
    runs
}

impl Dispatch {
    /// Jobs `0..num_jobs` in requests of at most `max_per_request` (>= 1).
    pub fn new(num_jobs: usize, max_per_request: usize) -> Self {
        let all: Vec<usize> = (0..num_jobs).collect();
        Dispatch {
            queue: all
                .chunks(max_per_request.max(1))
                .map(|c| c.to_vec())
                .collect(),
            flights: HashMap::new(),
            next_id: 0,
            remaining: num_jobs,
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Every job has its group.
    pub fn is_complete(&self) -> bool {
        self.remaining == 0
    }

    /// Takes the next queued request and records it as in flight on `worker`.
    pub fn start(&mut self, worker: usize) -> Option<(FlightId, &Flight)> {
        let jobs = self.queue.pop_front()?;
        let id = self.next_id;
        self.next_id += 1;
        let received = vec![false; jobs.len()];
        let flight = self.flights.entry(id).or_insert(Flight {
            worker,
            jobs,
            received,
        });
        Some((id, flight))
    }

    pub fn flight(&self, id: FlightId) -> Option<&Flight> {
        self.flights.get(&id)
    }

    /// Flights in progress on `worker`.
    pub fn flights_on(&self, worker: usize) -> Vec<FlightId> {
        let mut ids: Vec<FlightId> = self
            .flights
            .iter()
            .filter(|(_, f)| f.worker == worker)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Which job the group at `prompt_index` of flight `id` answers (nothing changes).
    pub fn lookup(&self, id: FlightId, prompt_index: u32) -> Lookup {
        let Some(f) = self.flights.get(&id) else {
            return Lookup::Stale;
        };
        let i = prompt_index as usize;
        match f.received.get(i) {
            None => Lookup::Invalid(format!(
                "group for prompt_index {prompt_index} of a request with {} prompts",
                f.jobs.len()
            )),
            Some(true) => {
                Lookup::Invalid(format!("group for prompt_index {prompt_index} sent twice"))
            }
            Some(false) => Lookup::Job(f.jobs[i]),
        }
    }

    /// Records the group at `prompt_index` of flight `id` (after [`Dispatch::lookup`]
    /// returned [`Lookup::Job`]).
    pub fn receive(&mut self, id: FlightId, prompt_index: u32) {
        if let Some(r) = self
            .flights
            .get_mut(&id)
            .and_then(|f| f.received.get_mut(prompt_index as usize))
        {
            if !*r {
                *r = true;
                self.remaining -= 1;
            }
        }
    }

    /// The flight's stream ended. `Err(missing)` if groups are missing (then the caller
    /// fails it); otherwise the flight is done.
    pub fn finish(&mut self, id: FlightId) -> Result<(), usize> {
        let Some(f) = self.flights.get(&id) else {
            return Ok(());
        };
        let missing = f.received.iter().filter(|r| !**r).count();
        if missing > 0 {
            return Err(missing);
        }
        self.flights.remove(&id);
        Ok(())
    }

    /// Abandons flight `id`: its jobs not yet received go back to the front of the
    /// queue, as runs of consecutive jobs, ahead of requests never sent. Returns how many.
    pub fn fail(&mut self, id: FlightId) -> usize {
        let Some(f) = self.flights.remove(&id) else {
            return 0;
        };
        let missing: Vec<usize> = f
            .jobs
            .iter()
            .zip(&f.received)
            .filter(|(_, r)| !**r)
            .map(|(j, _)| *j)
            .collect();
        for run in consecutive_runs(&missing).into_iter().rev() {
            self.queue.push_front(run);
        }
        missing.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cover_every_job_once() {
        let mut d = Dispatch::new(10, 4);
        let mut seen = vec![];
        while let Some((id, f)) = d.start(0) {
            let jobs = f.jobs.clone();
            for (i, j) in jobs.iter().enumerate() {
                assert_eq!(d.lookup(id, i as u32), Lookup::Job(*j));
                d.receive(id, i as u32);
                seen.push(*j);
            }
            d.finish(id).unwrap();
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert!(d.is_complete());
    }

    #[test]
    fn a_failed_flight_requeues_only_missing_jobs_in_consecutive_runs() {
        let mut d = Dispatch::new(12, 6);
        let (a, _) = d.start(0).unwrap(); // jobs 0..6
        let (b, _) = d.start(1).unwrap(); // jobs 6..12
        for i in [0, 2, 3] {
            d.receive(a, i);
        }
        assert_eq!(
            d.lookup(a, 2),
            Lookup::Invalid("group for prompt_index 2 sent twice".into())
        );
        assert!(matches!(d.lookup(a, 6), Lookup::Invalid(_)));
        assert_eq!(d.finish(a), Err(3), "the stream ended early");
        assert_eq!(d.flights_on(0), vec![a]);
        assert_eq!(d.fail(a), 3);
        assert_eq!(
            d.lookup(a, 1),
            Lookup::Stale,
            "late groups of a failed flight are dropped"
        );
        // Jobs 1, 4 and 5 come back first, as runs [1] and [4, 5].
        let (c, f) = d.start(1).unwrap();
        assert_eq!(f.jobs, vec![1]);
        let (e, f) = d.start(1).unwrap();
        assert_eq!(f.jobs, vec![4, 5]);
        assert!(!d.has_pending());
        assert_eq!(d.lookup(e, 1), Lookup::Job(5));
        for (id, n) in [(b, 6), (c, 1), (e, 2)] {
            for i in 0..n {
                d.receive(id, i);
            }
            d.finish(id).unwrap();
        }
        assert!(d.is_complete());
    }

    #[test]
    fn runs() {
        assert_eq!(
            consecutive_runs(&[0, 1, 3, 4, 5, 9]),
            vec![vec![0, 1], vec![3, 4, 5], vec![9]]
        );
        assert!(consecutive_runs(&[]).is_empty());
    }
}
