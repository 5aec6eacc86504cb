//! The CPU backend: a bandwidth-optimal ring over TCP.
//!
//! Rank `r` holds one connection to `next = r + 1` (it only writes there) and one
//! from `prev = r - 1` (it only reads there), mod the world size. A buffer of `len`
//! elements is cut into `world_size` segments by [`ShardLayout`], each segment into
//! chunks of at most `chunk_bytes`. At global step `t` rank `r` sends segment
//! `r - t - 1` and receives segment `r - t - 2`:
//! - steps `0 .. w-1` are the reduce-scatter phase: received chunks are reduced into
//!   the local segment, and after them rank `r` holds the reduced segment `r`;
//! - steps `w-1 .. 2w-2` are the all-gather phase: received chunks are copied in.
//!
//! `all_reduce` runs both phases, `reduce_scatter` the first and `all_gather` the
//! second, so each rank sends `2(w-1)/w` (resp. `(w-1)/w`) of the buffer: the
//! bus-bandwidth optimum. A sender thread and the calling (receiving) thread run
//! concurrently and are pipelined per chunk: chunk `c` of step `t+1` leaves as soon
//! as chunk `c` of step `t` has been received and reduced. `broadcast` pipelines the
//! chunks along the chain `root → root+1 → … → root-1`.
//!
//! Every collective starts with a 32-byte header (sequence number, collective,
//! dtype, op, root, length) that each rank checks against its predecessor's, so
//! ranks that disagree get [`CommError::Mismatch`] instead of corrupt data or a hang.
//!
//! Failures: every socket read and write has the communicator's timeout, and waits
//! between the two threads are bounded by it too. A rank that sees a link fail
//! posts `fail/{rank}` (the neighbour it lost) to the rendezvous store before closing
//! its own links, so the closure cascades around the ring within milliseconds and
//! each rank follows the posted records to the rank that posted none, which is
//! the one that died or stalled; that rank is named in every rank's error.

mod accept;
mod pass;
mod wire;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::thread;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use super::auth::{self, MAC_LEN, NONCE_LEN};
use super::comm::{check_out, check_root, check_shard, copy_into, Communicator, Dtype, ReduceOp};
use super::error::CommError;
use super::rendezvous::Rendezvous;
use super::shard::ShardLayout;
use pass::{configure, Geometry, Links};
use wire::{link_error, op_code, parse_record, record, Collective, Header, PassError, LINK_MAGIC};

/// Label of the ring hello's MAC (dist::auth).
const LINK_LABEL: &[u8] = b"grpo-ring-link";
/// Magic, rank, world size, MAC.
const HELLO_LEN: usize = 12 + MAC_LEN;

/// The CPU ring communicator.
pub struct RingComm {
    rank: usize,
    world_size: usize,
    rdzv: Rendezvous,
    timeout: Duration,
    geo: Geometry,
    links: Option<Links>,
    seq: u64,
    poisoned: Option<String>,
    /// Receive buffer of one chunk; u64 storage keeps it aligned for every dtype.
    scratch: Vec<u64>,
    /// reduce_scatter's working copy of its input, kept between calls so that a
    /// training loop does not pay for allocating (and page-faulting) it every step.
    /// Holds the largest buffer seen so far.
    work: Option<Tensor>,
}

impl RingComm {
    /// Builds the ring: listens on the interface that reaches the store, publishes
    /// the address as `ring/{rank}`, connects to `next` and accepts `prev`.
    pub fn connect(rdzv: Rendezvous, chunk_bytes: usize) -> Result<RingComm, CommError> {
        let (rank, world_size, timeout) = (rdzv.env.rank, rdzv.env.world_size, rdzv.timeout);
        let chunk_bytes = chunk_bytes.max(8) / 8 * 8;
        let mut comm = RingComm {
            rank,
            world_size,
            rdzv,
            timeout,
            geo: Geometry {
                rank,
                world_size,
                timeout,
                chunk_bytes,
            },
            links: None,
            seq: 0,
            poisoned: None,
            scratch: vec![0u64; chunk_bytes / 8],
            work: None,
        };
        if world_size > 1 {
            comm.links = Some(comm.build_links()?);
        }
        Ok(comm)
    }

    fn build_links(&self) -> Result<Links, CommError> {
        let (rank, w, timeout) = (self.rank, self.world_size, self.timeout);
        let next = (rank + 1) % w;
        let prev = (rank + w - 1) % w;
        let deadline = Instant::now() + timeout;
        let ip = self.rdzv.store.local_ip()?;
        let io_err = |context: String| move |source| CommError::Io { context, source };
        let listener =
            TcpListener::bind((ip, 0)).map_err(io_err(format!("ring: cannot listen on {ip}")))?;
        let addr = listener
            .local_addr()
            .map_err(io_err("ring: listener address".into()))?;
        let store = &self.rdzv.store;
        let secret = &self.rdzv.env.job_secret;
        // A fresh nonce beside the address: the predecessor's hello must carry a MAC of
        // it under the job secret (dist::auth), so no other process can take its place.
        let nonce = auth::nonce().map_err(io_err("ring: nonce".into()))?;
        let mut published = nonce.to_vec();
        published.extend_from_slice(addr.to_string().as_bytes());
        store.set(&format!("ring/{rank}"), &published)?;
        let setup_failed = |peer: usize, detail: String| CommError::PeerFailed {
            op: "ring setup".into(),
            rank,
            peer,
            observed_by: rank,
            detail,
        };
        let next_addr = store
            .get(&format!("ring/{next}"), timeout)
            .map_err(|e| setup_failed(next, format!("did not publish its ring address: {e}")))?;
        if next_addr.len() <= NONCE_LEN {
            return Err(setup_failed(
                next,
                "published a truncated ring address".into(),
            ));
        }
        let (next_nonce, next_addr) = next_addr.split_at(NONCE_LEN);
        let next_addr: SocketAddr = String::from_utf8_lossy(next_addr)
            .parse()
            .map_err(|_| setup_failed(next, "published an unparsable ring address".into()))?;

        // Connecting never waits for the peer's accept (the kernel completes the
        // handshake), so connect-then-accept cannot deadlock around the ring.
        let mut to_next = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&next_addr, left.max(Duration::from_millis(1))) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(setup_failed(next, format!("connect to {next_addr}: {e}")))
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut hello = [0u8; HELLO_LEN];
        hello[0..4].copy_from_slice(&LINK_MAGIC.to_le_bytes());
        hello[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
        hello[8..12].copy_from_slice(&(w as u32).to_le_bytes());
        let tag = secret.mac(LINK_LABEL, &[&hello[4..12], next_nonce]);
        hello[12..].copy_from_slice(&tag);
        configure(&to_next, timeout)
            .and_then(|_| to_next.write_all(&hello))
            .map_err(|e| setup_failed(next, format!("handshake: {e}")))?;

        listener
            .set_nonblocking(true)
            .map_err(io_err("ring: listener".into()))?;
        let expected = accept::Expected {
            rank,
            prev,
            world_size: w,
            secret: secret.clone(),
            nonce,
            timeout,
        };
        let from_prev =
            accept::accept_predecessor(&listener, &expected, deadline).map_err(|e| match e {
                accept::AcceptError::Deadline => {
                    setup_failed(prev, format!("did not connect within {timeout:?}"))
                }
                accept::AcceptError::Io(source) => CommError::Io {
                    context: "ring: accept".into(),
                    source,
                },
            })?;
        Ok(Links { to_next, from_prev })
    }

    fn next(&self) -> usize {
        self.geo.next()
    }

    fn prev(&self) -> usize {
        self.geo.prev()
    }

    /// Starts a collective: refuses if poisoned, otherwise numbers it.
    fn begin(
        &mut self,
        collective: Collective,
        dtype: Dtype,
        op: Option<ReduceOp>,
        root: usize,
        len: usize,
    ) -> Result<Header, CommError> {
        if let Some(reason) = &self.poisoned {
            return Err(CommError::Poisoned(reason.clone()));
        }
        self.seq += 1;
        Ok(Header {
            seq: self.seq,
            collective: collective as u8,
            dtype: dtype.code(),
            op: op_code(op),
            root: root as u32,
            len: len as u64,
        })
    }

    /// Runs ring steps `steps` of a collective over `buf` (see the module docs),
    /// turning any failure into the caller's error after the failure protocol.
    fn run_ring(
        &mut self,
        header: Header,
        buf: &mut [u8],
        dtype: Dtype,
        steps: Range<usize>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let result = self
            .exchange_header(header)
            .and_then(|_| match &self.links {
                Some(links) => {
                    let scratch = bytemuck::cast_slice_mut(&mut self.scratch);
                    self.geo.ring_pass(links, scratch, buf, dtype, steps, op)
                }
                None => Ok(()),
            });
        result.map_err(|e| self.abort(header, e))
    }

    /// Runs a broadcast from `root` over `buf`.
    fn run_chain(&mut self, header: Header, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let result = self
            .exchange_header(header)
            .and_then(|_| match &self.links {
                Some(links) => self.geo.chain_pass(links, buf, root),
                None => Ok(()),
            });
        result.map_err(|e| self.abort(header, e))
    }

    /// A CPU buffer of at least `len` elements of `dtype`, reused between calls.
    fn work(&mut self, dtype: Dtype, len: usize) -> Result<Tensor, CommError> {
        let fits = |t: &Tensor| t.kind() == dtype.kind() && t.numel() >= len;
        if !self.work.as_ref().is_some_and(fits) {
            self.work = None; // free the old buffer before allocating the new one
            let t = Tensor::f_empty([len as i64], (dtype.kind(), Device::Cpu))
                .map_err(CommError::torch("reduce_scatter"))?;
            self.work = Some(t);
        }
        let work = self.work.as_ref().map(|t| t.narrow(0, 0, len as i64));
        work.ok_or_else(|| CommError::invalid("reduce_scatter", "work buffer missing"))
    }

    fn exchange_header(&mut self, header: Header) -> Result<(), PassError> {
        let (next, prev, timeout) = (self.next(), self.prev(), self.timeout);
        let Some(links) = &self.links else {
            return Ok(());
        };
        (&links.to_next)
            .write_all(&header.encode())
            .map_err(|e| link_error(next, "to", timeout, e))?;
        let mut theirs = [0u8; 32];
        (&links.from_prev)
            .read_exact(&mut theirs)
            .map_err(|e| link_error(prev, "from", timeout, e))?;
        match Header::decode(&theirs) {
            Some(h) if h == header => Ok(()),
            Some(h) => Err(PassError::Mismatch {
                peer: prev,
                ours: header.describe(),
                theirs: h.describe(),
            }),
            None => Err(PassError::Mismatch {
                peer: prev,
                ours: header.describe(),
                theirs: "something that is not a collective header (stream out of sync)".into(),
            }),
        }
    }

    /// The failure protocol: post what this rank saw, close the links so neighbours
    /// notice at once, trace the posted records to the culprit, poison.
    fn abort(&mut self, header: Header, e: PassError) -> CommError {
        let store = &self.rdzv.store;
        let me = self.rank;
        let op = header.describe();
        let err = match e {
            PassError::Link { peer, detail } => {
                let _ = store.set(
                    &format!("fail/{me}"),
                    record(peer, false, &detail).as_bytes(),
                );
                self.close_links();
                let (peer, detail, observed_by) = self.trace(peer, detail);
                CommError::PeerFailed {
                    op,
                    rank: me,
                    peer,
                    observed_by,
                    detail,
                }
            }
            PassError::Mismatch { peer, ours, theirs } => {
                let msg = format!("rank {peer} called {theirs} but rank {me} called {ours}");
                let _ = store.set(&format!("fail/{me}"), record(peer, true, &msg).as_bytes());
                self.close_links();
                CommError::Mismatch {
                    op,
                    rank: me,
                    peer,
                    ours,
                    theirs,
                }
            }
            PassError::Echo => {
                let msg = "internal: a collective stopped without a cause";
                let _ = store.set(&format!("fail/{me}"), record(me, true, msg).as_bytes());
                self.close_links();
                CommError::invalid("ring", msg)
            }
            PassError::Local(err) => {
                let _ = store.set(
                    &format!("fail/{me}"),
                    record(me, true, &err.to_string()).as_bytes(),
                );
                self.close_links();
                err
            }
        };
        if me == 0 {
            // Rank 0 serves the store: keep it up while the others trace.
            let grace = self.grace();
            let keys: Vec<String> = (0..self.world_size).map(|r| format!("fail/{r}")).collect();
            let _ = self.rdzv.store.wait(&keys, grace);
            thread::sleep(grace);
        }
        self.poisoned = Some(err.to_string());
        err
    }

    fn close_links(&mut self) {
        if let Some(links) = self.links.take() {
            links.shutdown();
        }
    }

    /// How long to wait for a neighbour's failure record before concluding that
    /// the neighbour itself died or stalled.
    fn grace(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(2))
    }

    /// Follows `fail/*` records from `peer` to the rank that posted none (it died or
    /// stalled) or to a terminal record. Returns (culprit, detail, who observed it).
    fn trace(&self, peer: usize, detail: String) -> (usize, String, usize) {
        let (mut cur, mut detail, mut observer) = (peer, detail, self.rank);
        let mut visited = vec![self.rank];
        let grace = self.grace();
        while !visited.contains(&cur) {
            visited.push(cur);
            match self.rdzv.store.get(&format!("fail/{cur}"), grace) {
                Ok(bytes) => match parse_record(&bytes) {
                    Some((culprit, true, msg)) => return (culprit, msg, cur),
                    Some((next, false, msg)) if next < self.world_size => {
                        observer = cur;
                        detail = msg;
                        cur = next;
                    }
                    _ => break,
                },
                Err(CommError::StoreTimeout { .. }) => break,
                // Only rank 0 serves the store; unreachable means rank 0 is gone.
                Err(_) if self.rank != 0 => {
                    return (
                        0,
                        "rank 0 (which serves the rendezvous store) is unreachable: it exited or crashed"
                            .into(),
                        self.rank,
                    )
                }
                Err(_) => break,
            }
        }
        (cur, detail, observer)
    }
}

/// Runs `f` on the bytes of `tensor`: in place for a contiguous CPU tensor,
/// otherwise on a contiguous CPU copy that is copied back (a device sync point
/// for CUDA tensors).
fn with_cpu_bytes<R>(
    op: &'static str,
    tensor: &mut Tensor,
    dtype: Dtype,
    f: impl FnOnce(&mut [u8]) -> Result<R, CommError>,
) -> Result<R, CommError> {
    if tensor.device() == Device::Cpu && tensor.is_contiguous() {
        return f(bytes_mut(tensor, dtype));
    }
    let mut work = tensor
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(CommError::torch(op))?;
    let out = f(bytes_mut(&mut work, dtype))?;
    tensor.f_copy_(&work).map_err(CommError::torch(op))?;
    Ok(out)
}

/// The bytes of a contiguous CPU tensor of `dtype`.
fn bytes_mut(tensor: &mut Tensor, dtype: Dtype) -> &mut [u8] {
    let n = tensor.numel() * dtype.size();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: callers pass a defined, contiguous CPU tensor whose dtype is `dtype`,
    // so `data_ptr` addresses `n` initialised bytes (libtorch allocations are
    // aligned for every dtype). The slice borrows `tensor` mutably, so this handle
    // is not used while the slice lives; other handles to the same storage are the
    // caller's business, as for any in-place tensor op.
    unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<u8>(), n) }
}

impl Communicator for RingComm {
    fn backend(&self) -> &'static str {
        "ring"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        let dtype = Dtype::of("all_reduce", tensor)?;
        dtype.check_reduce("all_reduce", op)?;
        let header = self.begin(Collective::AllReduce, dtype, Some(op), 0, tensor.numel())?;
        if self.world_size == 1 {
            return Ok(());
        }
        let steps = 0..2 * (self.world_size - 1);
        with_cpu_bytes("all_reduce", tensor, dtype, |bytes| {
            self.run_ring(header, bytes, dtype, steps, op)
        })?;
        if op == ReduceOp::Avg {
            let _ = tensor
                .f_div_scalar_(self.world_size as f64)
                .map_err(CommError::torch("all_reduce"))?;
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        let dtype = Dtype::of("reduce_scatter", input)?;
        let range = ShardLayout::new(input.numel(), self.world_size).range(self.rank);
        let mut out = Tensor::f_empty([range.len() as i64], (dtype.kind(), input.device()))
            .map_err(CommError::torch("reduce_scatter"))?;
        self.reduce_scatter_into(input, &mut out, op)?;
        Ok(out)
    }

    fn reduce_scatter_into(
        &mut self,
        input: &Tensor,
        out: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        const OP: &str = "reduce_scatter";
        let dtype = Dtype::of(OP, input)?;
        dtype.check_reduce(OP, op)?;
        let len = input.numel();
        let range = ShardLayout::new(len, self.world_size).range(self.rank);
        check_out(OP, out, input, range.len())?;
        let header = self.begin(Collective::ReduceScatter, dtype, Some(op), 0, len)?;
        // The ring reduces in place, so it works on a copy of the input.
        let mut work = self.work(dtype, len)?;
        let flat = input.f_reshape([-1]).map_err(CommError::torch(OP))?;
        work.f_copy_(&flat).map_err(CommError::torch(OP))?;
        let steps = 0..self.world_size - 1;
        self.run_ring(header, bytes_mut(&mut work, dtype), dtype, steps, op)?;
        let shard = work
            .f_narrow(0, range.start as i64, range.len() as i64)
            .map_err(CommError::torch(OP))?;
        copy_into(OP, out, &shard)?;
        if op == ReduceOp::Avg && self.world_size > 1 {
            let _ = out
                .f_div_scalar_(self.world_size as f64)
                .map_err(CommError::torch(OP))?;
        }
        Ok(())
    }

    fn all_gather(&mut self, shard: &Tensor, len: usize) -> Result<Tensor, CommError> {
        let dtype = Dtype::of("all_gather", shard)?;
        let mut out = Tensor::f_empty([len as i64], (dtype.kind(), shard.device()))
            .map_err(CommError::torch("all_gather"))?;
        self.all_gather_into(shard, &mut out)?;
        Ok(out)
    }

    fn all_gather_into(&mut self, shard: &Tensor, out: &mut Tensor) -> Result<(), CommError> {
        const OP: &str = "all_gather";
        let dtype = Dtype::of(OP, shard)?;
        let len = out.numel();
        check_out(OP, out, shard, len)?;
        let layout = ShardLayout::new(len, self.world_size);
        check_shard(OP, shard, &layout, self.rank)?;
        let header = self.begin(Collective::AllGather, dtype, None, 0, len)?;
        let w = self.world_size;
        let range = layout.range(self.rank);
        let own = shard.f_reshape([-1]).map_err(CommError::torch(OP))?;
        with_cpu_bytes(OP, out, dtype, |bytes| {
            // Place our shard, then the ring fills in everybody else's.
            let esz = dtype.size();
            let mine = &mut bytes[range.start * esz..range.end * esz];
            copy_from_tensor(OP, mine, &own, dtype)?;
            self.run_ring(header, bytes, dtype, w - 1..2 * (w - 1), ReduceOp::Sum)
        })
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CommError> {
        let dtype = Dtype::of("broadcast", tensor)?;
        check_root("broadcast", root, self.world_size)?;
        let header = self.begin(Collective::Broadcast, dtype, None, root, tensor.numel())?;
        if self.world_size == 1 {
            return Ok(());
        }
        with_cpu_bytes("broadcast", tensor, dtype, |bytes| {
            self.run_chain(header, bytes, root)
        })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let w = self.world_size;
        let header = self.begin(Collective::Barrier, Dtype::I64, Some(ReduceOp::Sum), 0, w)?;
        if w == 1 {
            return Ok(());
        }
        // One element per rank, so every segment crosses every rank: nobody leaves
        // before everybody has entered.
        let mut token = Tensor::f_ones([w as i64], (tch::Kind::Int64, Device::Cpu))
            .map_err(CommError::torch("barrier"))?;
        let steps = 0..2 * (w - 1);
        self.run_ring(
            header,
            bytes_mut(&mut token, Dtype::I64),
            Dtype::I64,
            steps,
            ReduceOp::Sum,
        )
    }
}

/// Copies the elements of `src` (any device, `dtype`, `dst.len() / size` elements)
/// into `dst`.
fn copy_from_tensor(
    op: &'static str,
    dst: &mut [u8],
    src: &Tensor,
    dtype: Dtype,
) -> Result<(), CommError> {
    let mut cpu = src
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(CommError::torch(op))?;
    let bytes = bytes_mut(&mut cpu, dtype);
    if bytes.len() != dst.len() {
        return Err(CommError::invalid(
            op,
            "shard length changed during the call",
        ));
    }
    dst.copy_from_slice(bytes);
    Ok(())
}
