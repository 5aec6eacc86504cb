//! The collective-communication interface every backend implements.
//!
//! Tensors are treated as flat buffers: `all_reduce` and `broadcast` work in place on
//! any shape; `reduce_scatter` returns this rank's shard of the flattened input and
//! `all_gather` concatenates every rank's shard into one flat tensor. Shard
//! boundaries always come from [`ShardLayout`](super::shard::ShardLayout). Every rank
//! must call the same collectives in the same order with the same lengths and dtypes;
//! the ring backend checks this on each call and reports a mismatch instead of hanging.
//!
//! On any error the contents of an in-place tensor are unspecified and, for errors
//! that involve another rank, the communicator refuses further calls
//! ([`CommError::Poisoned`]); a failed collective is never reported as success.

use std::fmt;

use tch::{Kind, Tensor};

use super::error::CommError;
use super::shard::ShardLayout;

/// How `all_reduce` and `reduce_scatter` combine the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum (wrapping for i64).
    Sum,
    /// Sum divided by the world size, in the tensor's dtype. Floating dtypes only.
    Avg,
    /// Elementwise maximum; NaN wins.
    Max,
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
        })
    }
}

/// The element types collectives support: the training dtypes and i64 for metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    I64,
}

impl Dtype {
    /// The dtype of `tensor`, or an error naming the allowed ones.
    pub fn of(op: &'static str, tensor: &Tensor) -> Result<Dtype, CommError> {
        if !tensor.defined() {
            return Err(CommError::invalid(op, "tensor is undefined"));
        }
        match tensor.f_kind().map_err(CommError::torch(op))? {
            Kind::Float => Ok(Dtype::F32),
            Kind::BFloat16 => Ok(Dtype::Bf16),
            Kind::Half => Ok(Dtype::F16),
            Kind::Int64 => Ok(Dtype::I64),
            other => Err(CommError::invalid(
                op,
                format!("dtype {other:?} is not supported (allowed: f32, bf16, f16, i64)"),
            )),
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
            Dtype::F16 => Kind::Half,
            Dtype::I64 => Kind::Int64,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::I64 => 8,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Dtype::F32 => 1,
            Dtype::Bf16 => 2,
            Dtype::F16 => 3,
            Dtype::I64 => 4,
        }
    }

    /// Rejects reductions that have no meaning for the dtype (an integer average).
    pub fn check_reduce(self, op: &'static str, reduce: ReduceOp) -> Result<(), CommError> {
        if self == Dtype::I64 && reduce == ReduceOp::Avg {
            return Err(CommError::invalid(
                op,
                "avg is not defined for i64 (allowed: sum, max); reduce with sum and divide",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::I64 => "i64",
        })
    }
}

/// Collective operations over a fixed group of ranks. One implementation per backend:
/// [`SingleComm`](super::single::SingleComm), [`RingComm`](super::ring::RingComm),
/// [`NcclComm`](super::nccl::NcclComm); [`connect`](super::connect) picks one.
pub trait Communicator: Send {
    /// Backend name for logs: "single", "ring" or "nccl".
    fn backend(&self) -> &'static str;

    /// This process's rank in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Combines `tensor` across ranks in place; every rank ends with the same values.
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError>;

    /// Combines the flattened `input` (`[len]`, same `len` on every rank) across ranks
    /// and returns this rank's shard, `[ShardLayout::new(len, world).range(rank).len()]`,
    /// on `input`'s device. `input` is not modified.
    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor, CommError>;

    /// Concatenates every rank's `shard` (this rank's part of a `[len]` buffer, as
    /// [`ShardLayout`] defines it) into one flat `[len]` tensor on `shard`'s device.
    fn all_gather(&mut self, shard: &Tensor, len: usize) -> Result<Tensor, CommError>;

    /// `reduce_scatter` into `out`, a caller-owned tensor of this rank's shard length
    /// and `input`'s dtype, so a training loop can reuse its gradient-shard buffer.
    fn reduce_scatter_into(
        &mut self,
        input: &Tensor,
        out: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let layout = ShardLayout::new(input.numel(), self.world_size());
        check_out(
            "reduce_scatter_into",
            out,
            input,
            layout.range(self.rank()).len(),
        )?;
        let shard = self.reduce_scatter(input, op)?;
        copy_into("reduce_scatter_into", out, &shard)
    }

    /// `all_gather` into `out`, a caller-owned tensor of `len = out.numel()` elements
    /// and `shard`'s dtype (e.g. the flat parameter buffer of a ZeRO-3 unit).
    fn all_gather_into(&mut self, shard: &Tensor, out: &mut Tensor) -> Result<(), CommError> {
        check_out("all_gather_into", out, shard, out.numel())?;
        let full = self.all_gather(shard, out.numel())?;
        copy_into("all_gather_into", out, &full)
    }

    /// Copies `root`'s `tensor` into every other rank's `tensor` (same shape and dtype).
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CommError>;

    /// Returns only after every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CommError>;
}

/// Checks an output tensor: defined, `like`'s dtype, `numel` elements.
pub(crate) fn check_out(
    op: &'static str,
    out: &Tensor,
    like: &Tensor,
    numel: usize,
) -> Result<(), CommError> {
    let (kind, want) = (Dtype::of(op, out)?, Dtype::of(op, like)?);
    if kind != want {
        return Err(CommError::invalid(
            op,
            format!("output dtype {kind} differs from input dtype {want}"),
        ));
    }
    if out.numel() != numel {
        return Err(CommError::invalid(
            op,
            format!("output has {} elements, expected {numel}", out.numel()),
        ));
    }
    Ok(())
}

/// `out.copy_(flat)` with `flat` reshaped to `out`'s shape (device moves included).
pub(crate) fn copy_into(
    op: &'static str,
    out: &mut Tensor,
    flat: &Tensor,
) -> Result<(), CommError> {
    let src = flat.f_reshape(out.size()).map_err(CommError::torch(op))?;
    out.f_copy_(&src).map_err(CommError::torch(op))
}

/// Checks that `shard` has the length `layout` assigns to `rank`.
pub(crate) fn check_shard(
    op: &'static str,
    shard: &Tensor,
    layout: &ShardLayout,
    rank: usize,
) -> Result<(), CommError> {
    let want = layout.range(rank).len();
    let got = shard.numel();
    if got != want {
        return Err(CommError::invalid(
            op,
            format!(
                "rank {rank}'s shard of a {}-element buffer over {} ranks has {want} elements, got {got}",
                layout.len, layout.world_size
            ),
        ));
    }
    Ok(())
}

/// Checks that `root` names a rank.
pub(crate) fn check_root(
    op: &'static str,
    root: usize,
    world_size: usize,
) -> Result<(), CommError> {
    if root >= world_size {
        return Err(CommError::invalid(
            op,
            format!("root {root} is not a rank (world size {world_size})"),
        ));
    }
    Ok(())
}
