//! Stopping a run on SIGTERM without losing work (a Kubernetes pod being deleted,
//! evicted or preempted; `scripts/launch` forwarding a signal).
//!
//! The signal only sets a flag. Once per optimizer step the training loop calls
//! [`Shutdown::agreed`], a one-element all-reduce (max) of every rank's flag, so all
//! ranks see the same answer at the same step even when the signal reached only some
//! of them (one pod of an Indexed Job evicted); they then finish the step they are in,
//! write a checkpoint and return, and the binary exits with the run's
//! `sigterm_exit_code` (0 by default). The grace period a rank needs is therefore the
//! longest step plus one checkpoint: Kubernetes' `terminationGracePeriodSeconds` must
//! cover it (deploy/ and docs/operations.md size it). SIGINT keeps its default (an
//! immediate stop), so Ctrl-C on a terminal still ends a run at once.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::dist::{CommError, Communicator, ReduceOp};

/// Set once the ranks agreed to stop on a signal (read by the binary for its exit code).
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Whether this process stopped its run early because of SIGTERM.
pub fn stopped_by_signal() -> bool {
    STOPPED.load(Ordering::SeqCst)
}

/// This rank's view of a stop request.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: Arc<AtomicBool>,
}

impl Shutdown {
    /// Listens for SIGTERM on `rt` from now on.
    pub fn install(rt: &tokio::runtime::Runtime) -> std::io::Result<Shutdown> {
        let s = Shutdown::default();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = rt.block_on(async { signal(SignalKind::terminate()) })?;
            let flag = s.requested.clone();
            rt.spawn(async move {
                while term.recv().await.is_some() {
                    if !flag.swap(true, Ordering::SeqCst) {
                        tracing::warn!(
                            "SIGTERM: finishing this step, then checkpointing and stopping"
                        );
                    }
                }
            });
        }
        #[cfg(not(unix))]
        let _ = rt;
        Ok(s)
    }

    /// Marks a stop as requested (what the signal does).
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Whether this rank has been asked to stop (no communication).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Collective: true on every rank when any rank has been asked to stop. Call it at
    /// the same point of every step on every rank; `device` is where the
    /// communicator's tensors live (CUDA for NCCL).
    pub fn agreed(&self, comm: &mut dyn Communicator, device: Device) -> Result<bool, CommError> {
        let mine = f32::from(u8::from(self.requested()));
        let mut flag = Tensor::from_slice(&[mine])
            .to_kind(Kind::Float)
            .to_device(device);
        comm.all_reduce(&mut flag, ReduceOp::Max)?;
        let stop = flag.to_device(Device::Cpu).double_value(&[0]) > 0.0;
        if stop {
            STOPPED.store(true, Ordering::SeqCst);
        }
        Ok(stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleComm;

    #[test]
    fn a_request_is_agreed_and_remembered() {
        let s = Shutdown::default();
        let mut comm = SingleComm;
        assert!(!s.agreed(&mut comm, Device::Cpu).unwrap());
        s.request();
        assert!(s.requested());
        assert!(s.agreed(&mut comm, Device::Cpu).unwrap());
        assert!(stopped_by_signal());
    }

    #[test]
    fn sigterm_sets_the_flag() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = Shutdown::install(&rt).unwrap();
        assert!(!s.requested());
        // SAFETY: raise sends a signal to this process; tokio's handler catches it.
        unsafe { libc_raise_sigterm() };
        rt.block_on(async {
            for _ in 0..200 {
                if s.requested() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        assert!(s.requested(), "SIGTERM did not reach the handler");
    }

    extern "C" {
        fn raise(sig: i32) -> i32;
    }

    /// SIGTERM is 15 on every Unix the trainer runs on (Linux, macOS).
    unsafe fn libc_raise_sigterm() {
        raise(15);
    }
}
