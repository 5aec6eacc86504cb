//! One communicator used by several owners on the same thread (the policy and the
//! reference model's engines): every rank issues the same sequence of collectives from
//! its owners in the same order, so sharing one connection keeps them matched.
use std::sync::{Arc, Mutex};

use tch::Tensor;

use super::{CommError, Communicator, ReduceOp};

/// A cloneable handle to one communicator.
#[derive(Clone)]
pub struct SharedComm(Arc<Mutex<Box<dyn Communicator>>>);

impl SharedComm {
    pub fn new(inner: Box<dyn Communicator>) -> SharedComm {
        SharedComm(Arc::new(Mutex::new(inner)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut dyn Communicator) -> T) -> T {
        // A panic while holding the lock leaves the communicator in an unknown state;
        // the next collective would then fail on its own, so poisoning is ignored.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_mut())
    }
}

impl Communicator for SharedComm {
    fn backend(&self) -> &'static str {
        self.with(|c| c.backend())
    }
    fn rank(&self) -> usize {
        self.with(|c| c.rank())
    }
    fn world_size(&self) -> usize {
        self.with(|c| c.world_size())
    }
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        self.with(|c| c.all_reduce(tensor, op))
    }
    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        self.with(|c| c.reduce_scatter(input, op))
    }
    fn all_gather(&mut self, shard: &Tensor, len: usize) -> Result<Tensor, CommError> {
        self.with(|c| c.all_gather(shard, len))
    }
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        self.with(|c| c.broadcast(tensor, root))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.with(|c| c.barrier())
    }
}
