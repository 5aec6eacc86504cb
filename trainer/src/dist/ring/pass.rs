//! The data movement of one collective over the two links of a rank (see the
//! module docs of `ring` for the schedule): the pipelined two-thread ring pass (a
//! single-thread one for small buffers) and the chain used by broadcast. Pure socket and buffer work; tensors, headers and
//! failure reporting live in `ring/mod.rs`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::super::comm::{Dtype, ReduceOp};
use super::super::error::CommError;
use super::super::reduce::reduce_into;
use super::super::shard::ShardLayout;
use super::wire::{link_error, PassError};

/// Ring passes whose bytes per rank, times `world_size`, are at most this run on the
/// calling thread ([`Geometry::serial_pass`]): for scalars and small statistics a sender
/// thread costs more than the data. 16 KiB is Linux's default TCP send buffer
/// (`net.ipv4.tcp_wmem`), before the receiver's buffer adds to it.
const SERIAL_LINK_BYTES: usize = 16 * 1024;

/// Counters shared by the sender thread and the receiving thread of one pass.
struct Progress {
    state: Mutex<(usize, usize, bool)>, // (items sent, items received, failed)
    changed: Condvar,
}

impl Progress {
    fn new() -> Self {
        Progress {
            state: Mutex::new((0, 0, false)),
            changed: Condvar::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut (usize, usize, bool))) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
        self.changed.notify_all();
    }

    /// Marks the pass failed; returns `e`, or `Echo` if the other side failed first
    /// (its shutdown of the links is then what made this side fail).
    fn fail(&self, e: PassError) -> PassError {
        let Ok(mut s) = self.state.lock() else {
            return e;
        };
        let first = !s.2;
        s.2 = true;
        drop(s);
        self.changed.notify_all();
        if first {
            e
        } else {
            PassError::Echo
        }
    }

    /// Waits until `ready` holds: `Ok(false)` after `timeout`, `Err(Echo)` as soon as
    /// the other side has failed.
    fn wait(
        &self,
        timeout: Duration,
        ready: impl Fn(&(usize, usize, bool)) -> bool,
    ) -> Result<bool, PassError> {
        let deadline = Instant::now() + timeout;
        let Ok(mut s) = self.state.lock() else {
            return Err(PassError::Local(poisoned_lock()));
        };
        loop {
            if ready(&s) {
                return Ok(true);
            }
            if s.2 {
                return Err(PassError::Echo);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            match self.changed.wait_timeout(s, deadline - now) {
                Ok((guard, _)) => s = guard,
                Err(_) => return Err(PassError::Local(poisoned_lock())),
            }
        }
    }
}

/// The two links of this rank, present when `world_size > 1`.
pub(super) struct Links {
    pub(super) to_next: TcpStream,
    pub(super) from_prev: TcpStream,
}

impl Links {
    /// Unblocks any thread inside a read or write on either link.
    pub(super) fn shutdown(&self) {
        let _ = self.to_next.shutdown(Shutdown::Both);
        let _ = self.from_prev.shutdown(Shutdown::Both);
    }
}

/// Where this rank sits in the ring and how it moves data.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) rank: usize,
    pub(super) world_size: usize,
    /// Bound on every socket operation and every wait between the two threads.
    pub(super) timeout: Duration,
    /// Pipelining granularity (a multiple of 8 bytes).
    pub(super) chunk_bytes: usize,
}

impl Geometry {
    pub(super) fn next(&self) -> usize {
        (self.rank + 1) % self.world_size
    }

    pub(super) fn prev(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }

    pub(super) fn ring_pass(
        &self,
        links: &Links,
        scratch: &mut [u8],
        buf: &mut [u8],
        dtype: Dtype,
        steps: Range<usize>,
        op: ReduceOp,
    ) -> Result<(), PassError> {
        let (w, r, timeout) = (self.world_size, self.rank, self.timeout);
        let (next, prev) = (self.next(), self.prev());
        let esz = dtype.size();
        let layout = ShardLayout::new(buf.len() / esz, w);
        if layout.shard_len == 0 || steps.is_empty() {
            return Ok(());
        }
        if steps.len() * layout.shard_len * esz * w <= SERIAL_LINK_BYTES {
            return self.serial_pass(links, scratch, buf, dtype, &layout, steps, op);
        }
        let chunk_elems = (self.chunk_bytes / esz).max(1);
        let chunks = layout.shard_len.div_ceil(chunk_elems);
        // pieces[seg * chunks + c]: chunk c of segment seg, possibly empty. A Mutex
        // per piece lets the two threads share the buffer without aliasing.
        let mut pieces: Vec<Mutex<&mut [u8]>> = Vec::with_capacity(w * chunks);
        let mut rest: &mut [u8] = buf;
        for seg in 0..w {
            let seg_len = layout.range(seg).len();
            for c in 0..chunks {
                let lo = (c * chunk_elems).min(seg_len);
                let hi = (lo + chunk_elems).min(seg_len);
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut((hi - lo) * esz);
                pieces.push(Mutex::new(piece));
                rest = tail;
            }
        }
        let seg = |back: usize| (r + w - back % w) % w;
        let first = steps.start;
        let items = steps.len() * chunks;
        let reduce_steps = w - 1;
        let progress = Progress::new();
        let fail = |e: PassError| {
            let e = progress.fail(e);
            links.shutdown();
            e
        };

        thread::scope(|scope| {
            let sender = scope.spawn(|| -> Result<(), PassError> {
                let mut out = &links.to_next;
                for i in 0..items {
                    let (t, c) = (first + i / chunks, i % chunks);
                    // Chunk c of step t is what we received in step t-1.
                    if i >= chunks
                        && !progress
                            .wait(timeout, |s| s.1 > i - chunks)
                            .map_err(&fail)?
                    {
                        return Err(fail(PassError::Link {
                            peer: prev,
                            detail: format!("no data from rank {prev} for {timeout:?}"),
                        }));
                    }
                    let piece = pieces[seg(t + 1) * chunks + c]
                        .lock()
                        .map_err(|_| fail(PassError::Local(poisoned_lock())))?;
                    out.write_all(&piece)
                        .map_err(|e| fail(link_error(next, "to", timeout, e)))?;
                    drop(piece);
                    progress.update(|s| s.0 = i + 1);
                }
                Ok(())
            });

            let mut input = &links.from_prev;
            let lag = (w - 1) * chunks;
            let received = (|| -> Result<(), PassError> {
                for j in 0..items {
                    let (t, c) = (first + j / chunks, j % chunks);
                    // The piece we overwrite was sent w-1 steps ago; make sure it left.
                    if j >= lag && !progress.wait(timeout, |s| s.0 > j - lag).map_err(&fail)? {
                        return Err(fail(PassError::Link {
                            peer: next,
                            detail: format!("could not send to rank {next} for {timeout:?}"),
                        }));
                    }
                    let slot = &pieces[seg(t + 2) * chunks + c];
                    let mut piece = slot
                        .lock()
                        .map_err(|_| fail(PassError::Local(poisoned_lock())))?;
                    let n = piece.len();
                    if t < reduce_steps {
                        input
                            .read_exact(&mut scratch[..n])
                            .map_err(|e| fail(link_error(prev, "from", timeout, e)))?;
                        reduce_into(dtype, op, &mut piece, &scratch[..n])
                            .map_err(|e| fail(PassError::Local(e)))?;
                    } else {
                        input
                            .read_exact(&mut piece)
                            .map_err(|e| fail(link_error(prev, "from", timeout, e)))?;
                    }
                    drop(piece);
                    progress.update(|s| s.1 = j + 1);
                }
                Ok(())
            })();
            let sent = sender.join().unwrap_or_else(|_| {
                Err(PassError::Local(CommError::invalid(
                    "ring",
                    "sender thread panicked",
                )))
            });
            // The first failure is the cause; the other side's is its echo.
            match (received, sent) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(PassError::Echo), Err(e)) | (Err(e), _) | (Ok(()), Err(e)) => Err(e),
            }
        })
    }

    /// [`Geometry::ring_pass`] of a small buffer on the calling thread: each step writes
    /// the whole outgoing segment, then reads the incoming one. No write waits on a
    /// reader that waits on it: a rank finishes a pass only after its predecessor
    /// started it, so at most `world_size` of its passes wait unread on the link to its
    /// successor, and their bytes ([`SERIAL_LINK_BYTES`]) fit in the link's buffers.
    #[allow(clippy::too_many_arguments)]
    fn serial_pass(
        &self,
        links: &Links,
        scratch: &mut [u8],
        buf: &mut [u8],
        dtype: Dtype,
        layout: &ShardLayout,
        steps: Range<usize>,
        op: ReduceOp,
    ) -> Result<(), PassError> {
        let (w, r, timeout) = (self.world_size, self.rank, self.timeout);
        let (next, prev) = (self.next(), self.prev());
        let esz = dtype.size();
        let bytes = |seg: usize| {
            let e = layout.range(seg);
            e.start * esz..e.end * esz
        };
        let seg = |back: usize| (r + w - back % w) % w;
        let fail = |e: PassError| {
            links.shutdown();
            e
        };
        for t in steps {
            (&links.to_next)
                .write_all(&buf[bytes(seg(t + 1))])
                .map_err(|e| fail(link_error(next, "to", timeout, e)))?;
            let into = &mut buf[bytes(seg(t + 2))];
            if t + 1 < w {
                for piece in into.chunks_mut(scratch.len()) {
                    let n = piece.len();
                    (&links.from_prev)
                        .read_exact(&mut scratch[..n])
                        .map_err(|e| fail(link_error(prev, "from", timeout, e)))?;
                    reduce_into(dtype, op, piece, &scratch[..n])
                        .map_err(|e| fail(PassError::Local(e)))?;
                }
            } else {
                (&links.from_prev)
                    .read_exact(into)
                    .map_err(|e| fail(link_error(prev, "from", timeout, e)))?;
            }
        }
        Ok(())
    }

    /// Pipelined chain broadcast from `root` along `root → root+1 → … → root-1`:
    /// each rank forwards a chunk as soon as it has it.
    pub(super) fn chain_pass(
        &self,
        links: &Links,
        buf: &mut [u8],
        root: usize,
    ) -> Result<(), PassError> {
        let (w, timeout) = (self.world_size, self.timeout);
        let (next, prev) = (self.next(), self.prev());
        let pos = (self.rank + w - root) % w;
        for piece in buf.chunks_mut(self.chunk_bytes) {
            if pos > 0 {
                (&links.from_prev)
                    .read_exact(piece)
                    .map_err(|e| link_error(prev, "from", timeout, e))?;
            }
            if pos + 1 < w {
                (&links.to_next)
                    .write_all(piece)
                    .map_err(|e| link_error(next, "to", timeout, e))?;
            }
        }
        Ok(())
    }
}

pub(super) fn poisoned_lock() -> CommError {
    CommError::invalid("ring", "buffer lock poisoned by a panicking thread")
}

pub(super) fn configure(s: &TcpStream, timeout: Duration) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}
