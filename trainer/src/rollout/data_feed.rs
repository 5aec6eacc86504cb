//! The trainer's side of the workers' bulk weight data plane (framing in
//! `proto::data_plane`, the worker's side in `rollout_worker::data_plane`).
//!
//! Data flow: [`Feed::start`] opens one TCP connection on a thread of its own to the
//! first worker of a route, presents that worker's one-time token (issued in a
//! `DataPlaneOffer` on its authenticated `UpdateWeights` call) and sends the rest of the
//! route, which that worker forwards down the chain. [`Feed::send`] queues a tensor's
//! header and its bytes (the [`Bytes`] of `push::wire_bytes`: the tensor's own memory
//! when it already is a contiguous host tensor of the wire dtype) and returns at once;
//! the thread `write`s them straight from that memory into the socket. [`Feed::finish`]
//! sends the end marker and returns the worker's verdict on what it received.
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use proto::data_plane::{self as dp, Hop, Route};

/// Why a feed failed. `Connect` and `Refused` mean nothing reached any worker of the route.
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

impl FeedError {
    /// True when no byte reached the route's first worker (the whole route missed it).
    pub fn nothing_delivered(&self) -> bool {
        matches!(
            self,
            FeedError::Connect { .. } | FeedError::Refused { .. } | FeedError::Panicked
        )
    }
}

enum Frame {
    Tensor { header: Vec<u8>, bytes: Bytes },
    End,
}

/// One data-plane stream to the first worker of a route.
pub struct Feed {
    tx: mpsc::Sender<Frame>,
    thread: JoinHandle<Result<(), FeedError>>,
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
    /// Starts streaming to `first`, which forwards to `rest` (each hop writing within
    /// `deadline`); `workers` are the pool indices of `first` and of the hops of `rest`.
    pub fn start(first: Hop, rest: Route, deadline: Duration, workers: Vec<usize>) -> Feed {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || run(&first, &rest, deadline, rx));
        Feed {
            tx,
            thread,
            workers,
        }
    }

    /// Queues one tensor (`header` from `proto::data_plane::encode_header`); returns at
    /// once. A feed that already failed ignores it (its error comes from `finish`).
    pub fn send(&self, header: Vec<u8>, bytes: Bytes) {
        let _ = self.tx.send(Frame::Tensor { header, bytes });
    }

    /// Ends the update and waits (blocking) for the first worker's verdict.
    pub fn finish(self) -> Result<(), FeedError> {
        let _ = self.tx.send(Frame::End);
        drop(self.tx);
        self.thread.join().unwrap_or(Err(FeedError::Panicked))
    }
}

/// How long a worker holds a data connection whose offer has not arrived yet
/// (`rollout_worker::data_plane::TOKEN_WAIT`).
const OFFER_WAIT: Duration = Duration::from_secs(3);

fn run(
    first: &Hop,
    rest: &Route,
    deadline: Duration,
    rx: mpsc::Receiver<Frame>,
) -> Result<(), FeedError> {
    let addr = first.addr.clone();
    let connect = |source| FeedError::Connect {
        addr: addr.clone(),
        source,
    };
    let sock = first
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
    dp::write_hello(&mut s, &first.token).map_err(connect)?;
    match dp::read_status(&mut s).map_err(connect)? {
        Ok(()) => {}
        Err(message) => return Err(FeedError::Refused { addr, message }),
    }
    s.set_read_timeout(Some(deadline)).map_err(connect)?;
    let stream = |s: &mut TcpStream, source: io::Error| FeedError::Stream {
        addr: addr.clone(),
        peer: dp::read_status(s).ok().and_then(|r| r.err()),
        source,
    };
    if let Err(e) = dp::write_route(&mut s, rest) {
        return Err(stream(&mut s, e));
    }
    for f in rx {
        match f {
            Frame::Tensor { header, bytes } => {
                if let Err(e) = s.write_all(&header).and_then(|_| s.write_all(&bytes)) {
                    return Err(stream(&mut s, e));
                }
            }
            Frame::End => {
                if let Err(e) = s.write_all(&dp::END).and_then(|_| s.flush()) {
                    return Err(stream(&mut s, e));
                }
                return match dp::read_status(&mut s) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(message)) => Err(FeedError::Rejected { addr, message }),
                    Err(e) => Err(FeedError::Stream {
                        addr: addr.clone(),
                        source: e,
                        peer: None,
                    }),
                };
            }
        }
    }
    // The push was dropped without a commit: closing the socket tells the worker.
    let _ = s.shutdown(std::net::Shutdown::Both);
    let mut sink = [0u8; 1];
    let _ = s.read(&mut sink);
    Ok(())
}
