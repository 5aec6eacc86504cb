//! The communicator of a one-rank group: every collective is the identity (an average
//! over one rank is the value itself), but arguments are validated exactly as the
//! multi-rank backends do, so a single-process run catches the same mistakes.

use tch::Tensor;

use super::comm::{check_root, check_shard, Communicator, Dtype, ReduceOp};
use super::error::CommError;
use super::shard::ShardLayout;

/// World size 1, rank 0.
#[derive(Debug, Default)]
pub struct SingleComm;

/// A fresh `[numel]` copy of `tensor` on its own device.
fn flat_copy(op: &'static str, tensor: &Tensor) -> Result<Tensor, CommError> {
    let flat = tensor.f_reshape([-1]).map_err(CommError::torch(op))?;
    let out = Tensor::f_empty_like(&flat).map_err(CommError::torch(op))?;
    let mut out = out;
    out.f_copy_(&flat).map_err(CommError::torch(op))?;
    Ok(out)
}

impl Communicator for SingleComm {
    fn backend(&self) -> &'static str {
        "single"
    }

    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        Dtype::of("all_reduce", tensor)?.check_reduce("all_reduce", op)
    }

    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        Dtype::of("reduce_scatter", input)?.check_reduce("reduce_scatter", op)?;
        flat_copy("reduce_scatter", input)
    }

    fn all_gather(&mut self, shard: &Tensor, len: usize) -> Result<Tensor, CommError> {
        Dtype::of("all_gather", shard)?;
        check_shard("all_gather", shard, &ShardLayout::new(len, 1), 0)?;
        flat_copy("all_gather", shard)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        Dtype::of("broadcast", tensor)?;
        check_root("broadcast", root, 1)
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
}
