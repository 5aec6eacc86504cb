//! The scheduler and block accounting without a model.
use super::*;

fn sched(max_num_seqs: usize, num_blocks: usize, budget: usize) -> Scheduler {
    Scheduler::new(SchedulerLimits {
        max_num_seqs,
        num_blocks,
        block_size: 4,
        max_num_batched_tokens: budget,
        enable_prefix_caching: true,
        share_group_prompts: true,
    })
}

fn prompt(len: usize, salt: i64) -> Vec<i64> {
    (0..len as i64).map(|i| i * 10 + salt).collect()
}

/// Appends a token to every sequence that sampled (as the engine does).
fn sampled(s: &mut Scheduler, d: &Decision) {
    for x in &d.scheduled {
        if x.sample {
            for id in std::iter::once(x.id).chain(x.forks.iter().copied()) {
                s.append_token(id, 1000 + id as i64);
            }
        }
    }
}

fn ids(d: &Decision) -> Vec<(SeqId, usize, usize, bool)> {
    d.scheduled
        .iter()
        .map(|x| (x.id, x.start, x.len, x.sample))
        .collect()
}

#[test]
fn admits_up_to_max_num_seqs_then_as_rows_finish() {
    let mut s = sched(2, 100, 1000);
    for id in 0..4 {
        s.add(id, id, prompt(5, id as i64));
    }
    let d = s.schedule(|_| true);
    assert_eq!(d.admitted, vec![0, 1]);
    assert_eq!(ids(&d), vec![(0, 0, 5, true), (1, 0, 5, true)]);
    // 5 tokens = 2 blocks each, exactly.
    assert_eq!(s.num_used_blocks(), 4);
    sampled(&mut s, &d);
    let d = s.schedule(|_| true);
    assert_eq!(ids(&d), vec![(0, 5, 1, true), (1, 5, 1, true)]);
    assert!(d.admitted.is_empty());
    sampled(&mut s, &d);
    assert!(s.remove(0));
    assert_eq!(s.num_used_blocks(), 2);
    // A finished row frees its slot at the very next step.
    let d = s.schedule(|_| true);
    assert_eq!(d.admitted, vec![2]);
    assert!(!s.remove(0));
}

#[test]
fn chunked_prefill_keeps_decodes_going_under_the_token_budget() {
    let mut s = sched(4, 100, 8);
    s.add(0, 0, prompt(3, 0));
    let d = s.schedule(|_| true);
    sampled(&mut s, &d);
    s.add(1, 1, prompt(20, 1));
    // Decode of 0 first (1 token), then 7 of the long prompt.
    let d = s.schedule(|_| true);
    assert_eq!(ids(&d), vec![(0, 3, 1, true), (1, 0, 7, false)]);
    sampled(&mut s, &d);
    let d = s.schedule(|_| true);
    assert_eq!(ids(&d), vec![(0, 4, 1, true), (1, 7, 7, false)]);
    sampled(&mut s, &d);
    let d = s.schedule(|_| true);
    assert_eq!(ids(&d), vec![(0, 5, 1, true), (1, 14, 6, true)]);
    assert!(d.num_tokens() <= 8);
}

#[test]
fn a_group_prefills_once_and_shares_blocks_with_copy_on_write() {
    let mut s = sched(8, 100, 1000);
    // One group of 3 with a 6-token prompt: blocks [full, partial].
    for id in 0..3 {
        s.add(id, 7, prompt(6, 0));
    }
    let d = s.schedule(|_| true);
    assert_eq!(d.admitted, vec![0, 1, 2]);
    assert_eq!(ids(&d), vec![(0, 0, 6, true)]);
    assert_eq!(d.scheduled[0].forks, vec![1, 2]);
    assert_eq!(s.num_used_blocks(), 2, "one copy of the prompt");
    assert_eq!(s.blocks(1), s.blocks(0));
    sampled(&mut s, &d);
    // Each writes position 6 into the shared partial block: two copies, the last
    // writer keeps the original.
    let d = s.schedule(|_| true);
    assert_eq!(d.scheduled.len(), 3);
    assert_eq!(d.copies.len(), 2);
    assert_eq!(s.num_used_blocks(), 4);
    assert_eq!(s.blocks(0)[0], s.blocks(2)[0], "full block still shared");
    assert_ne!(s.blocks(0)[1], s.blocks(1)[1]);
    for (src, _) in &d.copies {
        assert_eq!(*src, s.blocks(2)[1]);
    }
}

#[test]
fn followers_wait_for_a_chunked_leader() {
    let mut s = sched(8, 100, 5);
    s.add(0, 1, prompt(9, 0));
    s.add(1, 1, prompt(9, 0));
    let d = s.schedule(|_| true);
    assert_eq!(ids(&d), vec![(0, 0, 5, false)]);
    assert_eq!(d.admitted, vec![0, 1]);
    let d = s.schedule(|_| true);
    assert_eq!(ids(&d), vec![(0, 5, 4, true)]);
    assert_eq!(d.scheduled[0].forks, vec![1]);
}

#[test]
fn prefix_cache_hits_full_blocks_across_requests_and_counts_them() {
    let mut s = sched(8, 100, 1000);
    s.add(0, 0, prompt(10, 0));
    let d = s.schedule(|_| true);
    sampled(&mut s, &d);
    // Another group, same first 8 tokens: 2 full blocks hit, computes from 8.
    let mut p = prompt(10, 0);
    p[9] = 77;
    s.add(1, 1, p);
    let d = s.schedule(|_| true);
    assert_eq!(ids(&d)[1], (1, 8, 2, true));
    assert_eq!(s.blocks(1)[..2], s.blocks(0)[..2]);
    let (queried, hit) = s.prefix_cache_stats();
    // The first looked up one block (a miss stops the chain), the second two (hits).
    assert_eq!((queried, hit), (4 + 8, 8));
    // Even after the first finishes, its blocks stay findable until reused.
    s.remove(0);
    s.remove(1);
    assert_eq!(s.num_used_blocks(), 0);
    s.add(2, 2, prompt(12, 0));
    let d = s.schedule(|_| true);
    assert_eq!(ids(&d), vec![(2, 8, 4, true)]);
    s.reset_prefix_cache();
    s.remove(2);
    s.add(3, 3, prompt(12, 0));
    assert_eq!(ids(&s.schedule(|_| true)), vec![(3, 0, 12, true)]);
}

#[test]
fn growth_past_the_pool_preempts_the_newest_which_resumes_with_its_tokens() {
    // 6 blocks of 4. Three sequences of 4 tokens: 3 blocks; each decode past 4 needs
    // a new block.
    let mut s = sched(4, 6, 1000);
    for id in 0..3 {
        s.add(id, id, prompt(4, id as i64));
    }
    let d = s.schedule(|_| true);
    sampled(&mut s, &d);
    let mut steps = 0;
    let preempted = loop {
        let d = s.schedule(|_| true);
        sampled(&mut s, &d);
        steps += 1;
        if !d.preempted.is_empty() {
            break d;
        }
        assert!(steps < 10);
    };
    // Positions 4..8 took blocks 4..6; at position 8 the newest (2) goes.
    assert_eq!(preempted.preempted, vec![2]);
    assert_eq!(s.num_preemptions(), 1);
    assert!(preempted.admitted.is_empty());
    assert!(s.blocks(2).is_empty());
    let tokens = s.tokens(2).to_vec();
    s.remove(0);
    // 2 resumes first and recomputes everything it has (prompt + generated).
    let d = s.schedule(|_| true);
    assert_eq!(d.admitted, vec![2]);
    let x = d.scheduled.iter().find(|x| x.id == 2).unwrap();
    assert_eq!((x.start + x.len, x.sample), (tokens.len(), true));
    assert_eq!(s.tokens(2), &tokens[..]);
}

#[test]
fn a_lone_sequence_is_never_preempted() {
    let mut s = sched(2, 3, 1000);
    s.add(0, 0, prompt(4, 0));
    for _ in 0..8 {
        let d = s.schedule(|_| true);
        assert!(d.preempted.is_empty());
        sampled(&mut s, &d);
    }
    assert_eq!(s.num_running(), 1);
    assert_eq!(s.num_used_blocks(), 3);
}

#[test]
fn inadmissible_sequences_are_skipped_not_blocking() {
    let mut s = sched(4, 100, 1000);
    s.add(0, 0, prompt(3, 0));
    s.add(1, 1, prompt(3, 1));
    s.add(2, 2, prompt(3, 2));
    assert_eq!(s.schedule(|id| id != 0).admitted, vec![1, 2]);
    assert_eq!(s.num_waiting(), 1);
    assert_eq!(s.schedule(|_| true).admitted, vec![0]);
}
