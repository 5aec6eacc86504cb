//! Real-token packing for training forwards: every token-wise op of a block (norms,
//! projections, RoPE, MLP) runs over the `N` real tokens of a padded `[B, T]` batch as
//! one `[1, N, ...]` row; only attention sees the padded `[B, heads, T, d]` layout, its
//! queries, keys and values scattered into it (zeros at padding) and its output
//! gathered back. What a real token computes is unchanged (padding keys are masked
//! for every real query); the padding positions simply are not computed.
use tch::Tensor;

/// Where the real tokens of a padded `[B, T]` batch lie.
#[derive(Debug)]
pub struct TokenPacking {
    /// `[N]` i64 flat indices into `B * T` of the real positions, ascending.
    index: Tensor,
    batch: i64,
    seq: i64,
}

impl TokenPacking {
    /// The packing of the positions where `real` (`[B, T]` bool) holds, or `None` when
    /// at most `max_padding_share` of them are padding (packing costs a scatter and a
    /// gather around each attention, so little padding is cheaper left in).
    pub fn new(real: &Tensor, max_padding_share: f64) -> Option<TokenPacking> {
        let (batch, seq) = (real.size()[0], real.size()[1]);
        let index = real.reshape([-1]).nonzero().squeeze_dim(1);
        let n = index.size()[0];
        let total = batch * seq;
        if n == 0 || ((total - n) as f64) <= max_padding_share * total as f64 {
            return None;
        }
        Some(TokenPacking { index, batch, seq })
    }

    /// Real tokens `N`.
    pub fn real_tokens(&self) -> i64 {
        self.index.size()[0]
    }

    /// `[B, T, ...]` to the real positions' `[1, N, ...]`.
    pub fn pack(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let mut flat = vec![self.batch * self.seq];
        flat.extend_from_slice(&size[2..]);
        x.reshape(flat.as_slice())
            .index_select(0, &self.index)
            .unsqueeze(0)
    }

    /// `[1, N, ...]` back to `[B, T, ...]`, zeros at the padding positions.
    pub fn unpack(&self, x: &Tensor) -> Tensor {
        let x = x.squeeze_dim(0);
        let size = x.size();
        let mut flat = vec![self.batch * self.seq];
        flat.extend_from_slice(&size[1..]);
        let mut shape = vec![self.batch, self.seq];
        shape.extend_from_slice(&size[1..]);
        Tensor::zeros(flat.as_slice(), (x.kind(), x.device()))
            .index_copy(0, &self.index, &x)
            .view(shape.as_slice())
    }

    /// Heads-first `[1, heads, N, d]` to SDPA's `[B, heads, T, d]` (zeros at padding).
    pub fn unpack_heads(&self, x: &Tensor) -> Tensor {
        self.unpack(&x.transpose(1, 2)).transpose(1, 2)
    }

    /// SDPA's output `[B, heads, T, d]` to `[1, N, heads * d]`.
    pub fn pack_heads(&self, x: &Tensor) -> Tensor {
        let (h, d) = (x.size()[1], x.size()[3]);
        self.pack(&x.transpose(1, 2).reshape([self.batch, self.seq, h * d]))
    }

    /// Token ids `[B, T]` of the real positions as `[1, N]`.
    pub fn pack_ids(&self, ids: &Tensor) -> Tensor {
        ids.reshape([-1]).index_select(0, &self.index).unsqueeze(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn pack_unpack_round_trip_and_threshold() {
        let real = Tensor::from_slice(&[1i64, 1, 0, 1, 1, 1])
            .view([2, 3])
            .to_kind(Kind::Bool);
        assert!(TokenPacking::new(&real, 0.2).is_none(), "1 of 6 is padding");
        let p = TokenPacking::new(&real, 0.1).unwrap();
        assert_eq!(p.real_tokens(), 5);
        let x = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([2, 3, 2]);
        let packed = p.pack(&x);
        assert_eq!(packed.size(), [1, 5, 2]);
        let back = p.unpack(&packed);
        let mask = real.unsqueeze(-1).to_kind(Kind::Float);
        assert!(back.equal(&(&x * mask)));
        let ids = Tensor::from_slice(&[7i64, 8, 0, 9, 10, 11]).view([2, 3]);
        let got: Vec<i64> = p.pack_ids(&ids).reshape([-1]).try_into().unwrap();
        assert_eq!(got, [7, 8, 9, 10, 11]);
        // Heads: [1, h, N, d] -> [B, h, T, d] -> [1, N, h * d].
        let q = Tensor::arange(20, (Kind::Float, tch::Device::Cpu)).view([1, 2, 5, 2]);
        let padded = p.unpack_heads(&q);
        assert_eq!(padded.size(), [2, 2, 3, 2]);
        let again = p.pack_heads(&padded);
        assert!(again.equal(&q.transpose(1, 2).reshape([1, 5, 4])));
    }
}
