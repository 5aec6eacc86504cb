//! The block pool's bookkeeping, without tensors: which KV blocks are free, how many
//! sequences reference each one, and which full blocks hold a known token prefix
//! (vLLM's automatic prefix caching).
//!
//! A block holds `block_size` consecutive positions of one sequence. A sequence's block
//! table lists its blocks in order; sequences that share a prefix list the same blocks
//! (reference counts). A block whose count drops to zero is free but keeps its content
//! and its prefix key until it is reused (least recently freed first), so a later request
//! or a preempted sequence with the same prefix finds it again ([`BlockPool::lookup`]).
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Index of a block in the pool (the first dimension of each layer's pool tensor).
pub type BlockId = u32;

/// Chain hash of a full block: its tokens and the hash of the block before it (0 for
/// the first), so equal hashes mean equal prefixes up to a 64-bit collision, which
/// [`BlockPool::lookup`] rules out by comparing the tokens and the parent too.
pub fn block_hash(parent: u64, tokens: &[i64]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    // 0 is reserved for "no parent".
    h.finish().max(1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Content {
    parent: u64,
    hash: u64,
    tokens: Vec<i64>,
}

/// Free list, reference counts and the prefix index of a pool of `num_blocks` blocks.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    refcount: Vec<u32>,
    /// Bumped whenever a block leaves the free list, so stale free-list entries are
    /// skipped (a revived cached block stays in the queue until popped).
    generation: Vec<u32>,
    free: VecDeque<(BlockId, u32)>,
    num_free: usize,
    content: Vec<Option<Content>>,
    index: HashMap<u64, BlockId>,
    /// Tokens looked up and found in the prefix index (vLLM's prefix_cache_queries/hits).
    pub queries: u64,
    pub hits: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be > 0");
        BlockPool {
            block_size,
            refcount: vec![0; num_blocks],
            generation: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).map(|b| (b, 0)).collect(),
            num_free: num_blocks,
            content: vec![None; num_blocks],
            index: HashMap::new(),
            queries: 0,
            hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks no sequence references (cached ones included: they can be reused).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free
    }

    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refcount[b as usize]
    }

    /// Takes a free block (the least recently freed), dropping any cached content;
    /// `None` when every block is referenced.
    pub fn allocate(&mut self) -> Option<BlockId> {
        while let Some((b, gen)) = self.free.pop_front() {
            let i = b as usize;
            if self.generation[i] != gen || self.refcount[i] != 0 {
                continue;
            }
            self.generation[i] = self.generation[i].wrapping_add(1);
            if let Some(c) = self.content[i].take() {
                if self.index.get(&c.hash) == Some(&b) {
                    self.index.remove(&c.hash);
                }
            }
            self.refcount[i] = 1;
            self.num_free -= 1;
            return Some(b);
        }
        None
    }

    /// One more reference to `b` (a sequence forked from another shares it).
    pub fn share(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert!(self.refcount[i] > 0, "sharing a free block");
        self.refcount[i] += 1;
    }

    /// Drops one reference; at zero the block is free (content kept until reused).
    pub fn release(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert!(self.refcount[i] > 0, "releasing a free block");
        self.refcount[i] -= 1;
        if self.refcount[i] == 0 {
            self.num_free += 1;
            self.free.push_back((b, self.generation[i]));
        }
    }

    /// Records that `b` now holds exactly `tokens` (a full block) after the prefix
    /// whose last block hash is `parent`; returns the block's hash.
    pub fn register(&mut self, b: BlockId, parent: u64, tokens: &[i64]) -> u64 {
        let hash = block_hash(parent, tokens);
        self.content[b as usize] = Some(Content {
            parent,
            hash,
            tokens: tokens.to_vec(),
        });
        self.index.entry(hash).or_insert(b);
        hash
    }

    /// Finds a block holding `tokens` after `parent` and takes a reference to it
    /// (reviving it if it was free). Counts `tokens.len()` queried and, on a hit, hit.
    pub fn lookup(&mut self, parent: u64, tokens: &[i64]) -> Option<(BlockId, u64)> {
        self.queries += tokens.len() as u64;
        let hash = block_hash(parent, tokens);
        let b = *self.index.get(&hash)?;
        let i = b as usize;
        match &self.content[i] {
            Some(c) if c.parent == parent && c.tokens == tokens => {}
            _ => return None,
        }
        if self.refcount[i] == 0 {
            self.num_free -= 1;
            self.generation[i] = self.generation[i].wrapping_add(1);
        }
        self.refcount[i] += 1;
        self.hits += tokens.len() as u64;
        Some((b, hash))
    }

    /// Forgets every cached prefix (after a weight update the cached keys are stale).
    pub fn reset_prefix_cache(&mut self) {
        self.index.clear();
        for c in &mut self.content {
            *c = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_release_reuses_oldest_first() {
        let mut p = BlockPool::new(3, 4);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        let c = p.allocate().unwrap();
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(p.allocate(), None);
        assert_eq!(p.num_free(), 0);
        p.release(b);
        p.release(a);
        assert_eq!(p.num_free(), 2);
        assert_eq!(p.allocate(), Some(b));
        assert_eq!(p.allocate(), Some(a));
    }

    #[test]
    fn shared_blocks_free_only_at_the_last_release() {
        let mut p = BlockPool::new(2, 4);
        let a = p.allocate().unwrap();
        p.share(a);
        p.share(a);
        assert_eq!(p.refcount(a), 3);
        p.release(a);
        p.release(a);
        assert_eq!(p.num_free(), 1);
        p.release(a);
        assert_eq!(p.num_free(), 2);
    }

    #[test]
    fn prefix_lookup_hits_registered_blocks_even_after_free_until_reused() {
        let mut p = BlockPool::new(2, 2);
        let a = p.allocate().unwrap();
        let h = p.register(a, 0, &[5, 6]);
        // A live block is shared by a lookup.
        assert_eq!(p.lookup(0, &[5, 6]), Some((a, h)));
        assert_eq!(p.refcount(a), 2);
        // Different parent or tokens: miss.
        assert_eq!(p.lookup(h, &[5, 6]), None);
        assert_eq!(p.lookup(0, &[5, 7]), None);
        p.release(a);
        p.release(a);
        assert_eq!(p.num_free(), 2);
        // Free but cached: revived, and no longer counted free.
        assert_eq!(p.lookup(0, &[5, 6]), Some((a, h)));
        assert_eq!(p.num_free(), 1);
        // The stale free-list entry of `a` is skipped: allocation gives the other block.
        let b = p.allocate().unwrap();
        assert_ne!(a, b);
        assert_eq!(p.allocate(), None);
        assert_eq!((p.queries, p.hits), (8, 4));
        // Once reused for something else, the prefix is gone.
        p.release(a);
        let again = p.allocate().unwrap();
        assert_eq!(again, a);
        assert_eq!(p.lookup(0, &[5, 6]), None);
    }

    #[test]
    fn reset_forgets_prefixes() {
        let mut p = BlockPool::new(1, 1);
        let a = p.allocate().unwrap();
        p.register(a, 0, &[1]);
        p.reset_prefix_cache();
        assert_eq!(p.lookup(0, &[1]), None);
    }
}
