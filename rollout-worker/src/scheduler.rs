//! Continuous-batching scheduler over a paged KV cache: which sequences compute which
//! tokens in the next engine step, and which blocks hold them.
//!
//! Pure state, no tensors or channels (vLLM's scheduler and block manager): the engine
//! adds sequences as requests arrive, asks [`Scheduler::schedule`] before every step,
//! appends each sampled token ([`Scheduler::append_token`]) and reports finished
//! sequences with [`Scheduler::remove`]. The budget is exact: a sequence holds
//! `ceil(len / block_size)` blocks of the pool, blocks shared by a prefix count once,
//! and nothing is padding.
//!
//! Per step, in order, under a budget of `max_num_batched_tokens` computed tokens:
//! 1. Decoding sequences (one pending token each) get a slot for it: a new block at a
//!    block boundary, or a private copy of a shared partial block (copy-on-write).
//!    While the pool has no block, the most recently admitted sequence is preempted
//!    (LIFO, as vLLM): its blocks are freed, and it is recomputed from its tokens
//!    (prompt + generated) when readmitted, so its output does not change.
//! 2. Sequences in prefill get their next chunk (chunked prefill), oldest first.
//! 3. If nothing was preempted, waiting sequences are admitted first-come first-served
//!    while a row, tokens of the budget and blocks are left. A fresh sequence whose
//!    group sibling is still prefilling the same prompt follows it instead of computing:
//!    when the sibling's prefill completes, the follower is forked (shares every block)
//!    and samples from the same logits (one prefill per group). Other sequences first
//!    take whatever full blocks of their tokens the prefix index holds (automatic
//!    prefix caching), then compute the rest. Sequences the caller marks inadmissible
//!    (new groups while a weight update drains) are skipped, not blocking.
use std::collections::{HashMap, VecDeque};

use model::paged::{BlockId, BlockPool};

/// Engine-wide sequence identifier.
pub type SeqId = u64;

/// Capacity the scheduler enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Rows of the running batch (vLLM's `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Blocks in the KV pool.
    pub num_blocks: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Tokens computed per step, decode and prefill together.
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// Fresh siblings follow a prefilling sequence of their group (one prefill).
    pub share_group_prompts: bool,
}

/// One sequence's work in a step: compute tokens `start..start + len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the last known token: sample the next one from its logits.
    pub sample: bool,
    /// Siblings forked from this sequence now: they share its blocks and sample from
    /// the same logits row (each with its own random stream).
    pub forks: Vec<SeqId>,
}

/// What the engine must do this step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Freed and waiting again; they will be recomputed.
    pub preempted: Vec<SeqId>,
    /// Copy block `.0` into block `.1` (in every layer) before the step.
    pub copies: Vec<(BlockId, BlockId)>,
    /// In packed order.
    pub scheduled: Vec<Scheduled>,
    /// Left the queue this step (computing or following).
    pub admitted: Vec<SeqId>,
}

impl Decision {
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.len).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Waiting,
    Running,
    /// Admitted, waiting for this sibling's prefill to finish.
    Following(SeqId),
}

#[derive(Debug)]
struct SeqState {
    group: u64,
    prompt_len: usize,
    /// Prompt + generated tokens; the last one is pending (not yet computed) once the
    /// prefill is done.
    tokens: Vec<i64>,
    computed: usize,
    blocks: Vec<BlockId>,
    /// Chain hashes of the leading full blocks already in the prefix index.
    hashes: Vec<u64>,
    status: Status,
}

impl SeqState {
    fn fresh(&self) -> bool {
        self.tokens.len() == self.prompt_len
    }
}

#[derive(Debug)]
pub struct Scheduler {
    limits: SchedulerLimits,
    pool: BlockPool,
    seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    /// Admission order (the last is preempted first); followers included.
    running: Vec<SeqId>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(limits: SchedulerLimits) -> Self {
        Scheduler {
            limits,
            pool: BlockPool::new(limits.num_blocks, limits.block_size),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Queues a new sequence of group `group` whose prompt is `prompt`.
    pub fn add(&mut self, id: SeqId, group: u64, prompt: Vec<i64>) {
        self.seqs.insert(
            id,
            SeqState {
                group,
                prompt_len: prompt.len(),
                tokens: prompt,
                computed: 0,
                blocks: vec![],
                hashes: vec![],
                status: Status::Waiting,
            },
        );
        self.waiting.push_back(id);
    }

    /// Records the token sampled for `id` (it becomes the pending token).
    pub fn append_token(&mut self, id: SeqId, token: i64) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Prompt + generated tokens of `id`.
    pub fn tokens(&self, id: SeqId) -> &[i64] {
        self.seqs.get(&id).map_or(&[], |s| &s.tokens)
    }

    /// The block table of `id`.
    pub fn blocks(&self, id: SeqId) -> &[BlockId] {
        self.seqs.get(&id).map_or(&[], |s| &s.blocks)
    }

    /// Forgets a sequence, waiting or running (finished or cancelled), freeing its
    /// blocks. Its followers go back to the queue. Returns whether it was known.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let Some(mut s) = self.seqs.remove(&id) else {
            return false;
        };
        for b in s.blocks.drain(..) {
            self.pool.release(b);
        }
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        let followers: Vec<SeqId> = self.followers_of(id);
        for f in followers.into_iter().rev() {
            self.running.retain(|&r| r != f);
            self.seqs.get_mut(&f).expect("follower").status = Status::Waiting;
            self.waiting.push_front(f);
        }
        true
    }

    fn followers_of(&self, id: SeqId) -> Vec<SeqId> {
        self.running
            .iter()
            .copied()
            .filter(|r| self.seqs[r].status == Status::Following(id))
            .collect()
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

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Blocks referenced by some sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.pool.num_used()
    }

    /// Fraction of the pool in use (vLLM's `kv_cache_usage_perc`, 0..1).
    pub fn kv_cache_usage(&self) -> f64 {
        self.pool.num_used() as f64 / self.pool.num_blocks().max(1) as f64
    }

    /// `(queried, hit)` prompt tokens of the prefix index so far.
    pub fn prefix_cache_stats(&self) -> (u64, u64) {
        (self.pool.queries, self.pool.hits)
    }

    /// Forgets the prefix index (the weights changed).
    pub fn reset_prefix_cache(&mut self) {
        self.pool.reset_prefix_cache();
        for s in self.seqs.values_mut() {
            s.hashes.clear();
        }
    }

    pub fn limits(&self) -> SchedulerLimits {
        self.limits
    }

    fn preempt(&mut self, id: SeqId, decision: &mut Decision) {
        let followers = self.followers_of(id);
        let s = self.seqs.get_mut(&id).expect("running");
        for b in s.blocks.drain(..) {
            self.pool.release(b);
        }
        s.computed = 0;
        s.hashes.clear();
        s.status = Status::Waiting;
        self.running.retain(|&r| r != id && !followers.contains(&r));
        for &f in followers.iter().rev() {
            self.seqs.get_mut(&f).expect("follower").status = Status::Waiting;
            self.waiting.push_front(f);
        }
        self.waiting.push_front(id);
        decision.preempted.push(id);
        decision.preempted.extend(followers);
        self.num_preemptions += 1;
    }

    /// Gives `id` room for `chunk` more tokens: copy-on-write of a shared partial last
    /// block, then new blocks. All or nothing; false when the pool is short.
    fn grow(&mut self, id: SeqId, chunk: usize, copies: &mut Vec<(BlockId, BlockId)>) -> bool {
        let bs = self.limits.block_size;
        let s = &self.seqs[&id];
        let cow =
            !s.computed.is_multiple_of(bs) && self.pool.refcount(s.blocks[s.computed / bs]) > 1;
        let new = (s.computed + chunk)
            .div_ceil(bs)
            .saturating_sub(s.blocks.len());
        if cow as usize + new > self.pool.num_free() {
            return false;
        }
        let s = self.seqs.get_mut(&id).expect("known");
        if cow {
            let i = s.computed / bs;
            let dst = self.pool.allocate().expect("counted free");
            copies.push((s.blocks[i], dst));
            self.pool.release(s.blocks[i]);
            s.blocks[i] = dst;
        }
        for _ in 0..new {
            s.blocks.push(self.pool.allocate().expect("counted free"));
        }
        true
    }

    /// Makes room for `id`'s chunk, preempting the newest running sequences not yet
    /// scheduled this step (possibly `id` itself, unless it is alone). Returns whether
    /// `id` got its room; false leaves it out of this step.
    fn grow_or_preempt(&mut self, id: SeqId, chunk: usize, decision: &mut Decision) -> bool {
        loop {
            if self.grow(id, chunk, &mut decision.copies) {
                return true;
            }
            let victim = self.running.iter().rev().copied().find(|r| {
                self.seqs[r].status == Status::Running
                    && !decision.scheduled.iter().any(|d| d.id == *r)
            });
            let Some(victim) = victim else {
                return false;
            };
            let alone = self
                .running
                .iter()
                .all(|r| *r == id || self.seqs[r].status != Status::Running);
            if victim == id && alone {
                // A lone sequence always fits (validated): nothing to free.
                return false;
            }
            self.preempt(victim, decision);
            if victim == id {
                return false;
            }
        }
    }

    /// Registers the full blocks `id` will hold after computing up to `upto` tokens.
    fn register_full_blocks(&mut self, id: SeqId, upto: usize) {
        if !self.limits.enable_prefix_caching {
            return;
        }
        let bs = self.limits.block_size;
        let s = self.seqs.get_mut(&id).expect("known");
        while s.hashes.len() < upto / bs {
            let i = s.hashes.len();
            let parent = s.hashes.last().copied().unwrap_or(0);
            let h = self
                .pool
                .register(s.blocks[i], parent, &s.tokens[i * bs..(i + 1) * bs]);
            s.hashes.push(h);
        }
    }

    fn commit(&mut self, id: SeqId, len: usize, decision: &mut Decision) {
        let s = &self.seqs[&id];
        let start = s.computed;
        let sample = start + len == s.tokens.len();
        let fresh = s.fresh();
        self.register_full_blocks(id, start + len);
        self.seqs.get_mut(&id).expect("known").computed = start + len;
        decision.scheduled.push(Scheduled {
            id,
            start,
            len,
            sample,
            forks: vec![],
        });
        if sample && fresh {
            let at = decision.scheduled.len() - 1;
            self.fork_followers(id, at, decision);
        }
    }

    /// Forks the followers of `id` (scheduled at `decision.scheduled[at]`).
    fn fork_followers(&mut self, id: SeqId, at: usize, decision: &mut Decision) {
        let followers = self.followers_of(id);
        if followers.is_empty() {
            return;
        }
        let (blocks, hashes, computed) = {
            let s = &self.seqs[&id];
            (s.blocks.clone(), s.hashes.clone(), s.computed)
        };
        for &f in &followers {
            for &b in &blocks {
                self.pool.share(b);
            }
            let fs = self.seqs.get_mut(&f).expect("follower");
            fs.blocks = blocks.clone();
            fs.hashes = hashes.clone();
            fs.computed = computed;
            fs.status = Status::Running;
        }
        decision.scheduled[at].forks.extend(followers);
    }

    /// Plans the next step and commits it: afterwards each scheduled sequence counts
    /// its chunk as computed.
    pub fn schedule(&mut self, admissible: impl Fn(SeqId) -> bool) -> Decision {
        let mut decision = Decision::default();
        let mut budget = self.limits.max_num_batched_tokens;
        // 1. Decodes, oldest first.
        let decoding: Vec<SeqId> = self
            .running
            .iter()
            .copied()
            .filter(|r| {
                let s = &self.seqs[r];
                s.status == Status::Running && s.tokens.len() == s.computed + 1 && !s.fresh()
            })
            .collect();
        for id in decoding {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted for an older one
            }
            if self.grow_or_preempt(id, 1, &mut decision) {
                self.commit(id, 1, &mut decision);
                budget -= 1;
            }
        }
        // 2. Prefill chunks of running sequences.
        let prefilling: Vec<SeqId> = self
            .running
            .iter()
            .copied()
            .filter(|r| {
                let s = &self.seqs[r];
                s.status == Status::Running && !decision.scheduled.iter().any(|d| d.id == *r)
            })
            .collect();
        for id in prefilling {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue;
            }
            let s = &self.seqs[&id];
            let chunk = (s.tokens.len() - s.computed).min(budget);
            if chunk == 0 {
                continue;
            }
            if self.grow_or_preempt(id, chunk, &mut decision) {
                self.commit(id, chunk, &mut decision);
                budget -= chunk;
            }
        }
        // 3. Admission.
        if decision.preempted.is_empty() {
            self.admit(&mut decision, &mut budget, &admissible);
        }
        decision
    }

    fn admit(
        &mut self,
        decision: &mut Decision,
        budget: &mut usize,
        admissible: &impl Fn(SeqId) -> bool,
    ) {
        let bs = self.limits.block_size;
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.limits.max_num_seqs {
            let id = self.waiting[i];
            if !admissible(id) {
                i += 1;
                continue;
            }
            // Follow a sibling still prefilling the same prompt.
            let s = &self.seqs[&id];
            if s.fresh() && self.limits.share_group_prompts {
                let leader = self.running.iter().copied().find(|r| {
                    let o = &self.seqs[r];
                    o.group == s.group && o.status == Status::Running && o.fresh()
                });
                if let Some(leader) = leader {
                    self.waiting.remove(i);
                    self.running.push(id);
                    decision.admitted.push(id);
                    self.seqs.get_mut(&id).expect("known").status = Status::Following(leader);
                    let at = decision
                        .scheduled
                        .iter()
                        .position(|d| d.id == leader && d.sample);
                    if let Some(at) = at {
                        // The leader's prefill completes this step: fork right away.
                        self.fork_followers(leader, at, decision);
                    }
                    continue;
                }
            }
            if *budget == 0 {
                break;
            }
            // Prefix cache: full blocks of all tokens but the last (it must be computed
            // for its logits).
            if self.limits.enable_prefix_caching && s.computed == 0 {
                let s = self.seqs.get_mut(&id).expect("known");
                let full = (s.tokens.len() - 1) / bs;
                while s.blocks.len() < full {
                    let j = s.blocks.len();
                    let parent = s.hashes.last().copied().unwrap_or(0);
                    match self.pool.lookup(parent, &s.tokens[j * bs..(j + 1) * bs]) {
                        Some((b, h)) => {
                            s.blocks.push(b);
                            s.hashes.push(h);
                        }
                        None => break,
                    }
                }
                s.computed = s.blocks.len() * bs;
            }
            let s = &self.seqs[&id];
            let chunk = (s.tokens.len() - s.computed).min(*budget);
            if !self.grow(id, chunk, &mut decision.copies) {
                // Undo the prefix hits; stop admitting (first-come first-served).
                let s = self.seqs.get_mut(&id).expect("known");
                for b in s.blocks.drain(..) {
                    self.pool.release(b);
                }
                s.hashes.clear();
                s.computed = 0;
                break;
            }
            self.waiting.remove(i);
            self.running.push(id);
            self.seqs.get_mut(&id).expect("known").status = Status::Running;
            decision.admitted.push(id);
            self.commit(id, chunk, decision);
            *budget -= chunk;
        }
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
