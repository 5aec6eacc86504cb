//! Continuous-batching scheduler: which sequences run in the next engine step.
//!
//! Pure state, no tensors or channels (TGI's queue, vLLM's scheduler): the engine adds
//! sequences as requests arrive, asks [`Scheduler::schedule`] before every step, and
//! reports finished sequences with [`Scheduler::remove`]. The scheduler mirrors the KV
//! cache's size exactly: the engine keeps one left-padded cache of `rows x S` positions,
//! where `S` is the longest running sequence, so the cost of a batch is
//! `rows * max(len)` positions and that is what the KV budget bounds.
//!
//! Per step, in order:
//! 1. Running sequences each grow by one position. While that overflows the budget, the
//!    most recently admitted one is preempted (LIFO, as vLLM): it goes back to the front
//!    of the queue and is recomputed (prompt + tokens so far) when readmitted.
//! 2. If nothing was preempted, waiting sequences are admitted first-come first-served
//!    while there is a free row and the batch still fits. Sequences the caller marks
//!    inadmissible (new groups while a weight update drains) are skipped, not blocking.
use std::collections::VecDeque;

/// Engine-wide sequence identifier.
pub type SeqId = u64;

/// Capacity the scheduler enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Rows of the running batch.
    pub max_num_seqs: usize,
    /// KV positions (padding included) the running batch may hold.
    pub kv_cache_tokens: usize,
}

/// What the engine must do this step. Both lists are in scheduling order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Drop these rows from the batch; they are waiting again and will be recomputed.
    pub preempted: Vec<SeqId>,
    /// Prefill these (prompt + tokens generated before a preemption) and add them.
    pub admitted: Vec<SeqId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: SeqId,
    /// Waiting: tokens to prefill. Running: positions in the KV cache after the last step.
    len: usize,
}

#[derive(Debug)]
pub struct Scheduler {
    limits: SchedulerLimits,
    waiting: VecDeque<Entry>,
    /// In admission order (the last is preempted first).
    running: Vec<Entry>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(limits: SchedulerLimits) -> Self {
        Scheduler {
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Queues a new sequence whose prompt has `prompt_len` tokens.
    pub fn add(&mut self, id: SeqId, prompt_len: usize) {
        self.waiting.push_back(Entry {
            id,
            len: prompt_len,
        });
    }

    /// Forgets a sequence, waiting or running (finished or cancelled). Returns whether it
    /// was known.
    pub fn remove(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.running.iter().position(|e| e.id == id) {
            self.running.remove(i);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|e| e.id == id) {
            self.waiting.remove(i);
            return true;
        }
        false
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Preemptions so far.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// KV positions the running batch holds now (`rows * longest`).
    pub fn kv_tokens_used(&self) -> usize {
        self.running.len() * self.running.iter().map(|e| e.len).max().unwrap_or(0)
    }

    pub fn limits(&self) -> SchedulerLimits {
        self.limits
    }

    /// Plans the next step and commits it: afterwards running sequences count one more
    /// position and admitted ones their prefill length.
    pub fn schedule(&mut self, admissible: impl Fn(SeqId) -> bool) -> Decision {
        let budget = self.limits.kv_cache_tokens;
        let mut decision = Decision::default();
        let cost = |rows: usize, longest: usize| rows * longest;
        // 1. Growth of the running batch; preempt the newest while it does not fit. The
        //    last running sequence always stays (a lone sequence fits by validation).
        while self.running.len() > 1 {
            let longest = self.running.iter().map(|e| e.len + 1).max().unwrap_or(0);
            if cost(self.running.len(), longest) <= budget {
                break;
            }
            let e = self.running.pop().expect("len > 1");
            // Recomputing covers the cached positions and the sampled token not yet fed.
            self.waiting.push_front(Entry {
                id: e.id,
                len: e.len + 1,
            });
            decision.preempted.push(e.id);
            self.num_preemptions += 1;
        }
        for e in &mut self.running {
            e.len += 1;
        }
        // 2. Admission, only when nothing was just preempted (no thrashing).
        if decision.preempted.is_empty() {
            let mut longest = self.running.iter().map(|e| e.len).max().unwrap_or(0);
            let mut i = 0;
            while i < self.waiting.len() && self.running.len() < self.limits.max_num_seqs {
                let e = self.waiting[i];
                if !admissible(e.id) {
                    i += 1;
                    continue;
                }
                let new_longest = longest.max(e.len);
                if !self.running.is_empty() && cost(self.running.len() + 1, new_longest) > budget {
                    break;
                }
                self.waiting.remove(i);
                self.running.push(e);
                longest = new_longest;
                decision.admitted.push(e.id);
            }
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_num_seqs: usize, kv: usize) -> Scheduler {
        Scheduler::new(SchedulerLimits {
            max_num_seqs,
            kv_cache_tokens: kv,
        })
    }

    #[test]
    fn admits_up_to_max_num_seqs_then_as_rows_finish() {
        let mut s = sched(2, 1000);
        for id in 0..4 {
            s.add(id, 5);
        }
        assert_eq!(s.schedule(|_| true).admitted, vec![0, 1]);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 2));
        assert_eq!(s.schedule(|_| true), Decision::default());
        assert!(s.remove(0));
        // A finished row frees its slot at the very next step.
        assert_eq!(s.schedule(|_| true).admitted, vec![2]);
        assert_eq!(s.kv_tokens_used(), 2 * 7);
        s.remove(1);
        s.remove(2);
        assert_eq!(s.schedule(|_| true).admitted, vec![3]);
        s.remove(3);
        assert!(s.is_idle());
        assert!(!s.remove(3));
    }

    #[test]
    fn kv_budget_counts_padding_and_blocks_admission_in_order() {
        // Running: one sequence at 10 positions. A 30-token prompt would make the
        // padded batch 2 x 30 = 60 > 50, so it waits, and so does the short one behind it.
        let mut s = sched(8, 50);
        s.add(0, 9);
        assert_eq!(s.schedule(|_| true).admitted, vec![0]);
        s.add(1, 30);
        s.add(2, 2);
        assert_eq!(s.schedule(|_| true).admitted, Vec::<SeqId>::new());
        assert_eq!(s.kv_tokens_used(), 10);
        s.remove(0);
        assert_eq!(s.schedule(|_| true).admitted, vec![1]);
    }

    #[test]
    fn growth_past_the_budget_preempts_the_newest_which_resumes_first() {
        let mut s = sched(4, 24);
        s.add(0, 5);
        s.add(1, 5);
        s.add(2, 5);
        assert_eq!(s.schedule(|_| true).admitted, vec![0, 1, 2]); // 3 x 5 = 15
        assert!(s.schedule(|_| true).admitted.is_empty()); // 3 x 6 = 18
        assert!(s.schedule(|_| true).admitted.is_empty()); // 3 x 7 = 21
        let d = s.schedule(|_| true); // 3 x 8 = 24 fits
        assert!(d.preempted.is_empty());
        let d = s.schedule(|_| true); // 3 x 9 = 27 > 24: preempt 2
        assert_eq!(d.preempted, vec![2]);
        assert!(d.admitted.is_empty());
        assert_eq!(s.num_preemptions(), 1);
        assert_eq!(s.kv_tokens_used(), 2 * 9);
        s.add(3, 1);
        s.remove(0);
        // Sequence 2 is readmitted before the newer 3, with 8 cached + 1 pending tokens;
        // 3 would make the batch 3 x 10 > 24 and waits.
        let d = s.schedule(|_| true);
        assert_eq!(d.admitted, vec![2]);
        assert_eq!(s.kv_tokens_used(), 2 * 10);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn a_lone_sequence_is_never_preempted() {
        let mut s = sched(2, 4);
        s.add(0, 4);
        s.schedule(|_| true);
        for _ in 0..10 {
            assert!(s.schedule(|_| true).preempted.is_empty());
        }
        assert_eq!(s.num_running(), 1);
    }

    #[test]
    fn inadmissible_sequences_are_skipped_not_blocking() {
        let mut s = sched(4, 1000);
        s.add(0, 3);
        s.add(1, 3);
        s.add(2, 3);
        assert_eq!(s.schedule(|id| id != 0).admitted, vec![1, 2]);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.schedule(|_| true).admitted, vec![0]);
    }
}
