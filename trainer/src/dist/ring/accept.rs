//! Accepting the ring predecessor's link: every incoming connection's hello is read and
//! verified on its own thread, so a connection that sends part of a hello and then
//! idles (a port scanner, a slow-loris client) delays no one; the first authenticated
//! hello from the predecessor wins. At most [`MAX_PENDING`] hellos are checked at once;
//! connections beyond that are dropped unread.
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use super::super::auth::JobSecret;
use super::pass::configure;
use super::wire::LINK_MAGIC;
use super::{HELLO_LEN, LINK_LABEL};

/// Hellos read concurrently during one ring build.
pub(super) const MAX_PENDING: usize = 64;

/// Why no predecessor link was accepted.
pub(super) enum AcceptError {
    /// No authenticated hello before the deadline.
    Deadline,
    Io(io::Error),
}

/// What an authenticated hello must carry.
#[derive(Clone)]
pub(super) struct Expected {
    pub(super) rank: usize,
    pub(super) prev: usize,
    pub(super) world_size: usize,
    pub(super) secret: JobSecret,
    pub(super) nonce: [u8; super::NONCE_LEN],
    pub(super) timeout: Duration,
}

/// Whether `got` is `e.prev`'s authenticated hello.
fn is_predecessor(got: &[u8; HELLO_LEN], e: &Expected) -> bool {
    let field = |i: usize| u32::from_le_bytes([got[i], got[i + 1], got[i + 2], got[i + 3]]);
    field(0) == LINK_MAGIC
        && field(4) as usize == e.prev
        && field(8) as usize == e.world_size
        && e.secret
            .verify(&got[12..], LINK_LABEL, &[&got[4..12], &e.nonce])
}

/// Accepts on the (non-blocking) `listener` until the predecessor's hello arrives or
/// `deadline` passes.
pub(super) fn accept_predecessor(
    listener: &TcpListener,
    e: &Expected,
    deadline: Instant,
) -> Result<TcpStream, AcceptError> {
    let (tx, rx) = mpsc::channel::<TcpStream>();
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        if let Ok(s) = rx.try_recv() {
            return Ok(s);
        }
        match listener.accept() {
            Ok((s, _)) => {
                if pending.load(Ordering::Acquire) >= MAX_PENDING {
                    tracing::warn!(
                        rank = e.rank,
                        "ring: {MAX_PENDING} connections are sending hellos; dropped another"
                    );
                    continue;
                }
                pending.fetch_add(1, Ordering::AcqRel);
                let (tx, pending, e) = (tx.clone(), pending.clone(), e.clone());
                thread::spawn(move || {
                    let mut got = [0u8; HELLO_LEN];
                    let ok = s
                        .set_nonblocking(false)
                        .and_then(|_| configure(&s, e.timeout))
                        .and_then(|_| (&s).read_exact(&mut got))
                        .is_ok();
                    pending.fetch_sub(1, Ordering::AcqRel);
                    // Anything but our predecessor's authenticated hello is dropped.
                    if ok && is_predecessor(&got, &e) {
                        let _ = tx.send(s);
                    } else if ok {
                        tracing::warn!(
                            rank = e.rank,
                            "ring: dropped a connection that is not rank {}'s authenticated hello",
                            e.prev
                        );
                    }
                });
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(AcceptError::Deadline);
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(err) => return Err(AcceptError::Io(err)),
        }
    }
}
