//! The trainer's side of the workers' bulk weight data plane (framing in
//! `proto::data_plane`, the worker's side in `rollout_worker::data_plane`).
//!
//! Data flow: [`Feed::start`] opens one TCP connection on a thread of its own to the
//! first worker of a route (or, to a single worker, `lanes` parallel ones), presents that
//! worker's one-time token (issued in a `DataPlaneOffer` on its authenticated
//! `UpdateWeights` call) and sends the rest of the route, which that worker forwards down
//! the chain. [`Feed::send`] queues a tensor's header and its bytes (the [`Bytes`] of
//! `push::wire_bytes`: the tensor's own memory when it already is a contiguous host
//! tensor of the wire dtype), over lanes as pieces of at most [`LANE_PIECE_BYTES`], and
//! returns at once; each connection's thread takes the next frame of the one queue as
//! soon as it has written the last (so the lanes end together however fast each drains)
//! and `write`s it straight from that memory into the socket. [`Feed::finish`] sends the
//! end marker and returns the worker's verdict on what it received.
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::data_plane::{self as dp, Hop, Lane, Route, TensorHeader};

/// The largest piece of a tensor one lane takes: small enough that the lanes of a
/// feed end within a piece of each other, large enough that headers cost nothing.
pub const LANE_PIECE_BYTES: usize = 4 << 20;

/// Why a feed's stream to one worker failed.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("data plane {addr}: cannot connect: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("data plane {addr} refused the connection: {message}")]
    Refused { addr: String, message: String },
    #[error("data plane {addr}: streaming failed: {source}{}", peer.as_ref().map(|m| format!(" (the worker says: {m})")).unwrap_or_default())]
    Stream {
        addr: String,
        source: io::Error,
        peer: Option<String>,
    },
    #[error("data plane {addr} rejected the update: {message}")]
    Rejected { addr: String, message: String },
    #[error("data plane feed thread panicked")]
    Panicked,
}

/// How a feed ended: the workers of its route it had to cut (dead, refusing, stalled
/// past the deadline: they miss this version), and the verdict of the worker that took
/// the stream to its end (`None`: it accepted; the route's other workers answer at the
/// commit).
#[derive(Debug, Default)]
pub struct FeedEnd {
    pub cut: Vec<(usize, FeedError)>,
    pub rejected: Option<FeedError>,
}

enum Frame {
    Tensor { header: Vec<u8>, bytes: Bytes },
    End,
}

/// How a feed's queue was closed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Close {
    /// After the frames queued: each lane writes the end marker.
    End,
    /// The push was dropped without a commit: the lanes stop at once.
    Abandon,
}

/// The frames of one feed, taken in order by whichever of its lanes is free.
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

struct QueueState {
    frames: VecDeque<Frame>,
    close: Option<Close>,
    /// Lanes still streaming: once none is, frames are dropped, not kept.
    lanes: u8,
}

impl Queue {
    fn new(lanes: u8) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                frames: VecDeque::new(),
                close: None,
                lanes,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, f: Frame) {
        let mut st = self.lock();
        if st.lanes > 0 {
            st.frames.push_back(f);
            drop(st);
            self.ready.notify_one();
        }
    }

    /// Closes the queue (the first close counts).
    fn close(&self, how: Close) {
        self.lock().close.get_or_insert(how);
        self.ready.notify_all();
    }

    /// A lane's thread ends: the last one drops what is still queued.
    fn leave(&self) {
        let mut st = self.lock();
        st.lanes = st.lanes.saturating_sub(1);
        if st.lanes == 0 {
            st.frames.clear();
        }
    }

    /// The next frame to write: a queued one, then [`Frame::End`] (to every lane) once
    /// the queue is drained and ended; `None` once it is abandoned.
    fn next(&self) -> Option<Frame> {
        let mut st = self.lock();
        loop {
            match st.close {
                Some(Close::Abandon) => return None,
                _ if !st.frames.is_empty() => return st.frames.pop_front(),
                Some(Close::End) => return Some(Frame::End),
                None => st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// One data-plane stream down a route, starting at its first reachable worker; to a
/// single worker, over one or more parallel connections (lanes) that share its queue.
pub struct Feed {
    queue: Arc<Queue>,
    /// The outcome each connection's thread reports.
    lanes: Vec<tokio::sync::oneshot::Receiver<FeedEnd>>,
    /// Pool indices of every worker the route reaches.
    pub workers: Vec<usize>,
}

/// No Nagle; 8 MiB buffers where the kernel allows them (else its autotuning).
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    if let Some(n) = proto::data_plane::explicit_buffer_bytes() {
        let r = socket2::SockRef::from(s);
        let _ = r.set_send_buffer_size(n);
        let _ = r.set_recv_buffer_size(n);
    }
}

impl Feed {
    /// Starts streaming down `route` (pool index and hop of each worker, in order; not
    /// empty), each hop writing within `deadline`. The first worker takes the stream and
    /// forwards it to the rest; one that cannot be reached, refuses, or misses the
    /// deadline (before or during the stream) is cut and the feed starts again at the
    /// next worker, sending the update from its start (it keeps views of what it sent).
    /// A route of one worker gets `lanes` parallel connections (a chain gets one).
    pub fn start(route: Vec<(usize, Hop)>, deadline: Duration, lanes: u8) -> Feed {
        let workers = route.iter().map(|(w, _)| *w).collect();
        let count = if route.len() == 1 {
            lanes.clamp(1, dp::MAX_LANES)
        } else {
            1
        };
        let route = Arc::new(route);
        let queue = Arc::new(Queue::new(count));
        let lanes = (0..count)
            .map(|index| {
                let (done, end) = tokio::sync::oneshot::channel();
                let (route, queue) = (route.clone(), queue.clone());
                let lane = Lane { index, count };
                // A panic drops `done` unsent: `finish` reports it.
                std::thread::spawn(move || {
                    let end = run(&route, deadline, lane, &queue);
                    queue.leave();
                    let _ = done.send(end);
                });
                end
            })
            .collect();
        Feed {
            queue,
            lanes,
            workers,
        }
    }

    /// Queues one tensor (`header`: the whole tensor's, offset 0) and returns at once;
    /// over several lanes in pieces of at most [`LANE_PIECE_BYTES`] (views of `bytes`),
    /// each taken by the next free lane. A feed that already cut every worker ignores it.
    pub fn send(&mut self, header: &TensorHeader, bytes: Bytes) {
        let piece = if self.lanes.len() > 1 {
            LANE_PIECE_BYTES
        } else {
            bytes.len().max(1)
        };
        for range in super::push::chunk_ranges(bytes.len(), piece) {
            let header = dp::encode_header(&TensorHeader {
                offset: range.start as u64,
                num_bytes: range.len() as u64,
                ..header.clone()
            });
            self.queue.push(Frame::Tensor {
                header,
                bytes: bytes.slice(range),
            });
        }
    }

    /// Ends the update and waits for the outcome: every worker a lane cut (once), and
    /// the first lane's rejection.
    pub async fn finish(mut self) -> FeedEnd {
        self.queue.close(Close::End);
        let mut end = FeedEnd::default();
        for lane in std::mem::take(&mut self.lanes) {
            let lane = lane.await.unwrap_or_else(|_| FeedEnd {
                cut: self
                    .workers
                    .iter()
                    .map(|&w| (w, FeedError::Panicked))
                    .collect(),
                rejected: None,
            });
            for (w, e) in lane.cut {
                if !end.cut.iter().any(|(c, _)| *c == w) {
                    end.cut.push((w, e));
                }
            }
            end.rejected = end.rejected.or(lane.rejected);
        }
        end
    }
}

impl Drop for Feed {
    /// A feed dropped before [`Feed::finish`] (the push dropped without a commit) stops
    /// its lanes; after it, this does nothing.
    fn drop(&mut self) {
        self.queue.close(Close::Abandon);
    }
}

/// How long a worker holds a data connection whose offer has not arrived yet
/// (`rollout_worker::data_plane::TOKEN_WAIT`).
const OFFER_WAIT: Duration = Duration::from_secs(3);

/// Why one hop's stream ended.
enum HopEnd {
    /// The worker answered the end marker (accepted or rejected).
    Verdict(Option<FeedError>),
    /// The push was dropped without a commit.
    Abandoned,
    /// The worker failed or missed the deadline: cut it.
    Cut(FeedError),
}

fn run(route: &[(usize, Hop)], deadline: Duration, lane: Lane, queue: &Queue) -> FeedEnd {
    let mut end = FeedEnd::default();
    let mut sent: Vec<Frame> = vec![];
    for (i, (worker, hop)) in route.iter().enumerate() {
        // A worker after this one keeps its token for `rejoin_ms` when its stream
        // breaks, so the feed (or a forwarder) can start again at it.
        let rest = Route {
            hop_timeout_ms: deadline.as_millis().clamp(1, u32::MAX as u128) as u32,
            rejoin_ms: (deadline + OFFER_WAIT).as_millis().min(u32::MAX as u128) as u32,
            hops: route[i + 1..].iter().map(|(_, h)| h.clone()).collect(),
        };
        match stream_to(hop, &rest, deadline, lane, queue, &mut sent) {
            HopEnd::Verdict(rejected) => {
                end.rejected = rejected;
                return end;
            }
            HopEnd::Abandoned => return end,
            HopEnd::Cut(e) => {
                tracing::warn!(worker = %hop.addr, error = %e,
                    rerouted_to = route.get(i + 1).map(|(_, h)| h.addr.as_str()).unwrap_or("none"),
                    "first worker of the weight chain cut; the feed starts at the next one");
                end.cut.push((*worker, e));
            }
        }
    }
    end
}

/// Connects to `hop`, presents its token and the route `rest`.
fn connect(
    hop: &Hop,
    rest: &Route,
    deadline: Duration,
    lane: Lane,
) -> Result<TcpStream, FeedError> {
    let addr = hop.addr.clone();
    let connect = |source| FeedError::Connect {
        addr: addr.clone(),
        source,
    };
    let sock = hop
        .addr
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| connect(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
    let mut s = TcpStream::connect_timeout(&sock, deadline).map_err(connect)?;
    tune(&s);
    s.set_write_timeout(Some(deadline)).map_err(connect)?;
    // The offer travels on the gRPC stream opened at the same moment: the worker may
    // hold the hello up to its token wait before it answers, so the answer gets that
    // long on top of the hop deadline.
    s.set_read_timeout(Some(deadline + OFFER_WAIT))
        .map_err(connect)?;
    dp::write_hello(&mut s, &hop.token, lane).map_err(connect)?;
    match dp::read_status(&mut s).map_err(connect)? {
        Ok(()) => {}
        Err(message) => return Err(FeedError::Refused { addr, message }),
    }
    s.set_read_timeout(Some(deadline)).map_err(connect)?;
    if let Err(e) = dp::write_route(&mut s, rest) {
        return Err(stream_error(&mut s, &hop.addr, e));
    }
    Ok(s)
}

/// A failed write, with the worker's reason if it sent one (waiting at most a second:
/// a stalled worker sends none, and the workers after it wait for the feed to rejoin).
fn stream_error(s: &mut TcpStream, addr: &str, source: io::Error) -> FeedError {
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    FeedError::Stream {
        addr: addr.to_string(),
        peer: dp::read_status(s).ok().and_then(|r| r.err()),
        source,
    }
}

/// Writes `a` then `b`, in one `writev` while both have bytes left (a header and its
/// tensor's bytes leave in one call, not a small segment of their own).
fn write_both(s: &mut TcpStream, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        match s.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if n < a.len() => a = &a[n..],
            Ok(n) => {
                b = &b[n - a.len()..];
                a = &[];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    s.write_all(b)
}

fn write_frame(s: &mut TcpStream, f: &Frame) -> io::Result<()> {
    match f {
        Frame::Tensor { header, bytes } => write_both(s, header, bytes),
        Frame::End => s.write_all(&dp::END).and_then(|_| s.flush()),
    }
}

/// Streams the update to `hop`: first `sent` (what a cut worker before it got), then
/// this lane's share of the queue, adding each frame to `sent`.
fn stream_to(
    hop: &Hop,
    rest: &Route,
    deadline: Duration,
    lane: Lane,
    queue: &Queue,
    sent: &mut Vec<Frame>,
) -> HopEnd {
    let mut s = match connect(hop, rest, deadline, lane) {
        Ok(s) => s,
        Err(e) => return HopEnd::Cut(e),
    };
    let verdict = |s: &mut TcpStream| match dp::read_status(s) {
        Ok(Ok(())) => HopEnd::Verdict(None),
        Ok(Err(message)) => HopEnd::Verdict(Some(FeedError::Rejected {
            addr: hop.addr.clone(),
            message,
        })),
        // No verdict within the deadline (a stall) or the connection broke: the worker
        // may hold every byte, but without a verdict it is cut (its call is dropped, so
        // it cannot commit) and the next one takes the update.
        Err(e) => HopEnd::Cut(FeedError::Stream {
            addr: hop.addr.clone(),
            source: e,
            peer: None,
        }),
    };
    for f in sent.iter() {
        if let Err(e) = write_frame(&mut s, f) {
            return HopEnd::Cut(stream_error(&mut s, &hop.addr, e));
        }
        if matches!(f, Frame::End) {
            return verdict(&mut s);
        }
    }
    while let Some(f) = queue.next() {
        let r = write_frame(&mut s, &f);
        let is_end = matches!(f, Frame::End);
        sent.push(f);
        if let Err(e) = r {
            return HopEnd::Cut(stream_error(&mut s, &hop.addr, e));
        }
        if is_end {
            return verdict(&mut s);
        }
    }
    // The push was dropped without a commit: closing the socket tells the worker.
    let _ = s.shutdown(std::net::Shutdown::Both);
    let mut sink = [0u8; 1];
    let _ = s.read(&mut sink);
    HopEnd::Abandoned
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::ParamSpec;
    use rollout_worker::data_plane::DataPlane;

    fn header(name: &str, numel: usize) -> TensorHeader {
        TensorHeader {
            name: name.into(),
            dtype: 1,
            shape: vec![numel as i64],
            offset: 0,
            num_bytes: numel as u64 * 4,
        }
    }

    /// A real worker data plane: a tensor of several pieces and a small one go over two
    /// lanes and arrive byte for byte; a feed dropped before its end fails the update.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lanes_carry_pieces_byte_exact_and_a_dropped_feed_fails_the_update() {
        let big = 3 * LANE_PIECE_BYTES / 4 + 5;
        let specs = vec![
            ParamSpec {
                name: "big".into(),
                shape: vec![big as i64],
            },
            ParamSpec {
                name: "small".into(),
                shape: vec![7],
            },
        ];
        let (plane, _task) =
            DataPlane::start([127, 0, 0, 1].into(), 0, specs, Duration::from_secs(10))
                .await
                .unwrap();
        let hop = |token| {
            vec![(
                0,
                Hop {
                    addr: format!("127.0.0.1:{}", plane.port()),
                    token,
                },
            )]
        };
        let data: Vec<Vec<u8>> = [big, 7]
            .iter()
            .map(|&n| (0..n * 4).map(|i| (i * 7 % 251) as u8).collect())
            .collect();

        let token = [9u8; dp::TOKEN_BYTES];
        let mut pending = plane.register(token).unwrap();
        let mut feed = Feed::start(hop(token), Duration::from_secs(10), 2);
        feed.send(&header("big", big), Bytes::from(data[0].clone()));
        feed.send(&header("small", 7), Bytes::from(data[1].clone()));
        let end = feed.finish().await;
        assert!(end.cut.is_empty(), "{:?}", end.cut);
        assert!(end.rejected.is_none(), "{:?}", end.rejected);
        let staged = pending.wait().await.unwrap();
        for ((name, t), want) in staged.tensors.iter().zip(&data) {
            let mut got = vec![0u8; want.len()];
            t.copy_data_u8(&mut got, t.numel());
            assert!(got == *want, "{name} differs");
        }

        let token = [10u8; dp::TOKEN_BYTES];
        let mut pending = plane.register(token).unwrap();
        let mut feed = Feed::start(hop(token), Duration::from_secs(10), 2);
        feed.send(&header("big", big), Bytes::from(data[0].clone()));
        drop(feed);
        let e = pending.wait().await.unwrap_err().to_string();
        assert!(e.contains("nothing was applied"), "{e}");
    }
}
