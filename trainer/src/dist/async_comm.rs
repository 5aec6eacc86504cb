//! Asynchronous collectives: a queue in front of a blocking [`Communicator`], so the
//! ZeRO engine can compute while a collective runs (prefetch the next unit's
//! all-gather, reduce-scatter a finished unit's gradients during the next backward).
//!
//! Data flow: the caller *issues* a collective ([`AsyncComm::all_gather_async`] and
//! friends), handing over its tensor, and gets a [`Pending`] handle; a dedicated
//! thread, which owns the communicator, runs the queued collectives one at a time in
//! issue order; [`Pending::wait`] returns the result. Because every rank issues the
//! same collectives in the same order (the contract of [`Communicator`]), FIFO
//! execution keeps the ranks' sequences consistent without any extra coordination.
//!
//! Tensor ownership: an issued tensor belongs to the queue until its handle is
//! waited. A caller that keeps an alias of its storage (a `shallow_clone`) must not
//! write it while an input is pending, nor read it before an in-place `all_reduce`
//! is waited. Results are freshly allocated (all-gather, reduce-scatter) or the very
//! tensor handed over (all-reduce), so nothing else is written behind the caller's back.
//!
//! [`AsyncComm`] also implements [`Communicator`]: a blocking call is queued behind
//! everything already issued and waited at once, so synchronous users (checkpoint
//! barriers, the optimizer's scalar all-reduces) stay in the same global order.
//!
//! With `background = false` there is no thread: each collective runs when issued and
//! its handle is ready at once, which is exactly the blocking behaviour (and the same
//! collective sequence), for backends or debugging where overlap is not wanted.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use tch::Tensor;

use super::comm::{Communicator, ReduceOp};
use super::error::CommError;

/// A queued collective: runs on the communication thread with the communicator.
type Job = Box<dyn FnOnce(&mut dyn Communicator) + Send>;

/// The result of an issued collective; [`Pending::wait`] blocks until it is done.
#[must_use = "a collective's result (and any error) is only seen through wait()"]
pub struct Pending<T> {
    state: PendingState<T>,
}

enum PendingState<T> {
    Ready(Result<T, CommError>),
    Queued(Receiver<Result<T, CommError>>),
}

impl<T> Pending<T> {
    fn ready(result: Result<T, CommError>) -> Self {
        Pending {
            state: PendingState::Ready(result),
        }
    }

    /// Blocks until the collective has run and returns its result. A communication
    /// thread that ended early (after a panic) is reported as [`CommError::Poisoned`].
    pub fn wait(self) -> Result<T, CommError> {
        match self.state {
            PendingState::Ready(r) => r,
            PendingState::Queued(rx) => rx.recv().unwrap_or_else(|_| {
                Err(CommError::Poisoned(
                    "the collective returned no result: the communication thread panicked or ended"
                        .into(),
                ))
            }),
        }
    }
}

/// The communication thread and its queue.
struct Worker {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

enum Mode {
    /// Collectives run when issued, on the caller's thread.
    Inline(Box<dyn Communicator>),
    /// Collectives run in issue order on a thread that owns the communicator.
    Background(Worker),
}

/// A [`Communicator`] with non-blocking variants of the collectives the ZeRO engine
/// overlaps with compute. See the module documentation for ordering and ownership.
pub struct AsyncComm {
    backend: &'static str,
    rank: usize,
    world_size: usize,
    mode: Mode,
}

/// The message of a caught panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The communication thread's loop: runs jobs in arrival order until the queue
/// closes. After a panic inside a collective the communicator's state is unknown, so
/// every later job fails with [`CommError::Poisoned`] instead of touching it.
fn serve(mut comm: Box<dyn Communicator>, jobs: Receiver<Job>) {
    let mut poisoned: Option<String> = None;
    for job in jobs {
        if let Some(reason) = &poisoned {
            // Run the job against a communicator that refuses everything.
            let mut dead = Refusing(reason.clone(), comm.rank(), comm.world_size());
            job(&mut dead);
            continue;
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job(comm.as_mut()))) {
            poisoned = Some(format!(
                "a collective panicked on the communication thread: {}",
                panic_message(payload.as_ref())
            ));
        }
    }
}

/// Stands in for the communicator after a panic: every collective fails.
struct Refusing(String, usize, usize);

impl Communicator for Refusing {
    fn backend(&self) -> &'static str {
        "poisoned"
    }
    fn rank(&self) -> usize {
        self.1
    }
    fn world_size(&self) -> usize {
        self.2
    }
    fn all_reduce(&mut self, _: &mut Tensor, _: ReduceOp) -> Result<(), CommError> {
        Err(CommError::Poisoned(self.0.clone()))
    }
    fn reduce_scatter(&mut self, _: &Tensor, _: ReduceOp) -> Result<Tensor, CommError> {
        Err(CommError::Poisoned(self.0.clone()))
    }
    fn all_gather(&mut self, _: &Tensor, _: usize) -> Result<Tensor, CommError> {
        Err(CommError::Poisoned(self.0.clone()))
    }
    fn broadcast(&mut self, _: &mut Tensor, _: usize) -> Result<(), CommError> {
        Err(CommError::Poisoned(self.0.clone()))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        Err(CommError::Poisoned(self.0.clone()))
    }
}

impl AsyncComm {
    /// Wraps `comm`. With `background`, a thread named `comm-rank{r}` takes ownership
    /// of it and runs issued collectives while the caller continues; without, each
    /// collective runs when issued (blocking, no thread).
    pub fn new(comm: Box<dyn Communicator>, background: bool) -> Result<Self, CommError> {
        let (backend, rank, world_size) = (comm.backend(), comm.rank(), comm.world_size());
        let mode = if background {
            let (tx, rx) = mpsc::channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("comm-rank{rank}"))
                .spawn(move || serve(comm, rx))
                .map_err(|source| CommError::Io {
                    context: "spawning the communication thread".into(),
                    source,
                })?;
            Mode::Background(Worker {
                jobs: Some(tx),
                thread: Some(thread),
            })
        } else {
            Mode::Inline(comm)
        };
        Ok(AsyncComm {
            backend,
            rank,
            world_size,
            mode,
        })
    }

    /// Whether collectives run on a background thread (and so can overlap compute).
    pub fn is_background(&self) -> bool {
        matches!(self.mode, Mode::Background(_))
    }

    /// Queues `f` behind every collective issued before it.
    fn issue<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut dyn Communicator) -> Result<T, CommError> + Send + 'static,
    ) -> Pending<T> {
        match &mut self.mode {
            Mode::Inline(comm) => Pending::ready(f(comm.as_mut())),
            Mode::Background(worker) => {
                let (tx, rx) = mpsc::sync_channel(1);
                let job: Job = Box::new(move |comm| {
                    // The receiver may have been dropped (a handle discarded on an
                    // error path); the collective still ran, so the ranks stay in step.
                    let _ = tx.send(f(comm));
                });
                let sent = worker.jobs.as_ref().map(|jobs| jobs.send(job));
                match sent {
                    Some(Ok(())) => Pending {
                        state: PendingState::Queued(rx),
                    },
                    _ => Pending::ready(Err(CommError::Poisoned(
                        "the communication thread has ended".into(),
                    ))),
                }
            }
        }
    }

    /// Issues `all_gather(shard, len)`; the result is the flat `[len]` tensor.
    pub fn all_gather_async(&mut self, shard: Tensor, len: usize) -> Pending<Tensor> {
        self.issue(move |c| c.all_gather(&shard, len))
    }

    /// Issues `reduce_scatter(input, op)`; the result is this rank's shard.
    pub fn reduce_scatter_async(&mut self, input: Tensor, op: ReduceOp) -> Pending<Tensor> {
        self.issue(move |c| c.reduce_scatter(&input, op))
    }

    /// Issues an in-place `all_reduce` of `tensor`; the result is that tensor, reduced
    /// (same storage: aliases of it must not be read before the wait).
    pub fn all_reduce_async(&mut self, mut tensor: Tensor, op: ReduceOp) -> Pending<Tensor> {
        self.issue(move |c| c.all_reduce(&mut tensor, op).map(|()| tensor))
    }
}

impl Drop for AsyncComm {
    /// Closes the queue and joins the thread: collectives already issued still run
    /// (every rank issued them, so skipping one would leave peers waiting), and the
    /// communicator is dropped, closing its links, before this returns.
    fn drop(&mut self) {
        if let Mode::Background(worker) = &mut self.mode {
            drop(worker.jobs.take());
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Blocking use: each call is queued behind the issued collectives and waited.
impl Communicator for AsyncComm {
    fn backend(&self) -> &'static str {
        self.backend
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        if let Mode::Inline(comm) = &mut self.mode {
            return comm.all_reduce(tensor, op);
        }
        // The backend reduces in place; handing back the tensor also covers one that
        // replaced it.
        *tensor = self.all_reduce_async(tensor.shallow_clone(), op).wait()?;
        Ok(())
    }

    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        if let Mode::Inline(comm) = &mut self.mode {
            return comm.reduce_scatter(input, op);
        }
        self.reduce_scatter_async(input.shallow_clone(), op).wait()
    }

    fn all_gather(&mut self, shard: &Tensor, len: usize) -> Result<Tensor, CommError> {
        if let Mode::Inline(comm) = &mut self.mode {
            return comm.all_gather(shard, len);
        }
        self.all_gather_async(shard.shallow_clone(), len).wait()
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        if let Mode::Inline(comm) = &mut self.mode {
            return comm.broadcast(tensor, root);
        }
        let mut t = tensor.shallow_clone();
        *tensor = self
            .issue(move |c| c.broadcast(&mut t, root).map(|()| t))
            .wait()?;
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        if let Mode::Inline(comm) = &mut self.mode {
            return comm.barrier();
        }
        self.issue(|c| c.barrier()).wait()
    }
}

/// Results of issued collectives kept in issue order, at most `depth` unwaited: the
/// caller pushes a handle, and gets back (to consume) the oldest ones beyond the depth.
/// Bounding the depth bounds the memory held by in-flight inputs and results.
pub struct InFlight<K, T> {
    depth: usize,
    queue: VecDeque<(K, Pending<T>)>,
}

impl<K, T> InFlight<K, T> {
    /// A window of at most `depth` unwaited collectives (0: wait for each at once).
    pub fn new(depth: usize) -> Self {
        InFlight {
            depth,
            queue: VecDeque::new(),
        }
    }

    /// Adds `pending`, tagged with `key`; returns the entries that must now be waited
    /// (oldest first) to get back under the depth.
    pub fn push(&mut self, key: K, pending: Pending<T>) -> Vec<(K, Pending<T>)> {
        self.queue.push_back((key, pending));
        let excess = self.queue.len().saturating_sub(self.depth);
        self.queue.drain(..excess).collect()
    }

    /// Removes and returns every entry, oldest first.
    pub fn drain(&mut self) -> Vec<(K, Pending<T>)> {
        self.queue.drain(..).collect()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleComm;
    use std::sync::{Arc, Mutex};
    use tch::{Device, Kind};

    /// A one-rank communicator that records the order collectives ran in and can be
    /// told to stall (so a test can observe that issuing does not block).
    struct Recording {
        log: Arc<Mutex<Vec<String>>>,
        gate: Option<Receiver<()>>,
    }

    impl Communicator for Recording {
        fn backend(&self) -> &'static str {
            "recording"
        }
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
            if let Some(gate) = self.gate.take() {
                gate.recv().unwrap();
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("all_reduce {}", t.numel()));
            SingleComm.all_reduce(t, op)
        }
        fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("reduce_scatter {}", t.numel()));
            SingleComm.reduce_scatter(t, op)
        }
        fn all_gather(&mut self, t: &Tensor, len: usize) -> Result<Tensor, CommError> {
            if len == 99 {
                panic!("injected failure");
            }
            self.log.lock().unwrap().push(format!("all_gather {len}"));
            SingleComm.all_gather(t, len)
        }
        fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
            SingleComm.broadcast(t, root)
        }
        fn barrier(&mut self) -> Result<(), CommError> {
            self.log.lock().unwrap().push("barrier".into());
            Ok(())
        }
    }

    fn recording(gate: Option<Receiver<()>>) -> (Box<dyn Communicator>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(vec![]));
        let comm = Recording {
            log: log.clone(),
            gate,
        };
        (Box::new(comm), log)
    }

    #[test]
    fn issued_collectives_run_in_order_without_blocking_the_caller() {
        let (open, gate) = mpsc::channel();
        let (comm, log) = recording(Some(gate));
        let mut c = AsyncComm::new(comm, true).unwrap();
        assert!(c.is_background());
        let x = Tensor::arange(4, (Kind::Float, Device::Cpu));
        // The first collective stalls on the gate; issuing more must still return.
        let a = c.all_reduce_async(x.shallow_clone(), ReduceOp::Sum);
        let b = c.reduce_scatter_async(x.copy(), ReduceOp::Sum);
        let g = c.all_gather_async(x.copy(), 4);
        assert!(log.lock().unwrap().is_empty(), "ran before the gate opened");
        open.send(()).unwrap();
        // A blocking call queues behind the issued ones.
        c.barrier().unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "all_reduce 4",
                "reduce_scatter 4",
                "all_gather 4",
                "barrier"
            ]
        );
        assert!(a.wait().unwrap().equal(&x));
        assert!(b.wait().unwrap().equal(&x));
        assert!(g.wait().unwrap().equal(&x));
    }

    #[test]
    fn inline_mode_runs_at_issue_and_blocking_calls_write_in_place() {
        let (comm, log) = recording(None);
        let mut c = AsyncComm::new(comm, false).unwrap();
        assert!(!c.is_background());
        let x = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let p = c.reduce_scatter_async(x.copy(), ReduceOp::Sum);
        assert_eq!(*log.lock().unwrap(), ["reduce_scatter 3"]);
        assert!(p.wait().unwrap().equal(&x));
        for background in [false, true] {
            let mut c = AsyncComm::new(Box::new(SingleComm), background).unwrap();
            let mut t = Tensor::ones([2], (Kind::Float, Device::Cpu));
            c.all_reduce(&mut t, ReduceOp::Avg).unwrap();
            assert!(t.equal(&Tensor::ones([2], (Kind::Float, Device::Cpu))));
            // Argument errors come back through the handle.
            let bad = c.all_gather_async(t.copy(), 5).wait().unwrap_err();
            assert!(bad.to_string().contains("all_gather"), "{bad}");
        }
    }

    #[test]
    fn a_panicking_collective_poisons_later_ones() {
        let (comm, _) = recording(None);
        let mut c = AsyncComm::new(comm, true).unwrap();
        let x = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let err = c.all_gather_async(x.copy(), 99).wait().unwrap_err();
        assert!(matches!(err, CommError::Poisoned(_)), "{err}");
        let err = c.barrier().unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
    }

    #[test]
    fn in_flight_window_releases_the_oldest_beyond_its_depth() {
        let mut w: InFlight<usize, ()> = InFlight::new(2);
        assert!(w.push(1, Pending::ready(Ok(()))).is_empty());
        assert!(w.push(2, Pending::ready(Ok(()))).is_empty());
        let out: Vec<usize> = w
            .push(3, Pending::ready(Ok(())))
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(out, [1]);
        assert_eq!(w.len(), 2);
        let rest: Vec<usize> = w.drain().into_iter().map(|e| e.0).collect();
        assert_eq!(rest, [2, 3]);
        assert!(w.is_empty());
        let mut now: InFlight<usize, ()> = InFlight::new(0);
        assert_eq!(now.push(7, Pending::ready(Ok(()))).len(), 1);
    }
}
