//! The one definition of how a flat buffer of `len` elements is split across
//! `world_size` ranks. Every backend (ring, NCCL, single) and, later, the ZeRO engine
//! derive their shard boundaries from [`ShardLayout`], so a gradient shard produced by
//! `reduce_scatter` is exactly the parameter shard that `all_gather` expects back.
//!
//! The split pads the buffer to `padded_len = shard_len * world_size` with
//! `shard_len = ceil(len / world_size)`: rank `r` owns `[r * shard_len, (r + 1) * shard_len)`
//! clipped to `len`. Equal padded shards are what NCCL's reduce-scatter/all-gather
//! require; the clipping means the padding never appears in a result. Trailing ranks
//! may own a short or empty shard (e.g. `len = 5, world_size = 4` gives 2, 2, 1, 0).

use std::ops::Range;

/// Shard boundaries of a flat buffer of `len` elements over `world_size` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    /// Elements in the unpadded buffer.
    pub len: usize,
    /// Number of ranks (at least 1).
    pub world_size: usize,
    /// Elements per padded shard: `ceil(len / world_size)`.
    pub shard_len: usize,
    /// `shard_len * world_size`, the buffer length NCCL sees.
    pub padded_len: usize,
}

impl ShardLayout {
    /// The layout of `len` elements over `world_size` ranks. A `world_size` of 0 is
    /// treated as 1 so the function is total; communicators never have 0 ranks.
    pub fn new(len: usize, world_size: usize) -> Self {
        let world_size = world_size.max(1);
        let shard_len = len.div_ceil(world_size);
        ShardLayout {
            len,
            world_size,
            shard_len,
            padded_len: shard_len * world_size,
        }
    }

    /// The unpadded element range owned by `rank`, clipped to `len` (may be empty).
    /// Ranks at or beyond `world_size` get the empty range at `len`.
    pub fn range(&self, rank: usize) -> Range<usize> {
        let start = rank.saturating_mul(self.shard_len).min(self.len);
        let end = start.saturating_add(self.shard_len).min(self.len);
        if rank >= self.world_size {
            return self.len..self.len;
        }
        start..end
    }

    /// Padding elements appended after the real data of `rank`'s shard so that every
    /// shard has `shard_len` elements.
    pub fn padding(&self, rank: usize) -> usize {
        self.shard_len - self.range(rank).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisible_length_gives_equal_unpadded_shards() {
        let l = ShardLayout::new(12, 4);
        assert_eq!((l.shard_len, l.padded_len), (3, 12));
        let ranges: Vec<_> = (0..4).map(|r| l.range(r)).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..9, 9..12]);
        assert!((0..4).all(|r| l.padding(r) == 0));
    }

    #[test]
    fn odd_length_pads_the_trailing_ranks() {
        let l = ShardLayout::new(5, 4);
        assert_eq!((l.shard_len, l.padded_len), (2, 8));
        let ranges: Vec<_> = (0..4).map(|r| l.range(r)).collect();
        assert_eq!(ranges, vec![0..2, 2..4, 4..5, 5..5]);
        let padding: Vec<_> = (0..4).map(|r| l.padding(r)).collect();
        assert_eq!(padding, vec![0, 0, 1, 2]);
    }

    #[test]
    fn empty_and_tiny_buffers() {
        let l = ShardLayout::new(0, 3);
        assert_eq!((l.shard_len, l.padded_len), (0, 0));
        assert!((0..3).all(|r| l.range(r).is_empty()));
        let l = ShardLayout::new(1, 3);
        assert_eq!(l.range(0), 0..1);
        assert_eq!(l.range(1), 1..1);
        assert_eq!(l.range(2), 1..1);
    }

    #[test]
    fn world_size_one_owns_everything_and_zero_is_one() {
        assert_eq!(ShardLayout::new(7, 1).range(0), 0..7);
        assert_eq!(ShardLayout::new(7, 0), ShardLayout::new(7, 1));
    }

    #[test]
    fn ranges_tile_the_buffer_for_many_shapes() {
        for world in 1..=9 {
            for len in 0..=40 {
                let l = ShardLayout::new(len, world);
                let mut next = 0;
                for r in 0..world {
                    let range = l.range(r);
                    assert_eq!(range.start, next, "len {len} world {world} rank {r}");
                    assert!(range.len() <= l.shard_len);
                    assert_eq!(range.len() + l.padding(r), l.shard_len);
                    next = range.end;
                }
                assert_eq!(next, len);
                assert!(l.padded_len >= len && l.padded_len - len < world);
                assert_eq!(l.range(world), len..len);
            }
        }
    }
}
