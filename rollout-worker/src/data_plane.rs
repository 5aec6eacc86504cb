//! The bulk weight data plane: a raw TCP listener beside gRPC that receives the tensors
//! of an update straight into their staging tensors, and forwards them down a chain.
//!
//! Data flow: an `UpdateWeights` call (authenticated like every gRPC call) opens with a
//! `DataPlaneOffer{token}`; the handler [`DataPlane::register`]s the token and gets a
//! [`Pending`]. A sender then connects to [`DataPlane::port`] and presents the token
//! (one use; an unknown token is refused with a message); the connection's thread
//! validates each header against the architecture ([`WeightAssembler::stage`]: a known
//! name, its exact shape and byte length, once) and `read`s the bytes into the staging
//! tensor's memory, with no buffer in between. When the route names a next hop, every
//! header and every piece of bytes, as it lands, is queued to a forwarding thread that
//! writes it to the next worker from that same memory, with a per-hop write deadline; a
//! hop that misses it, or fails, is cut (its receiver sees the stream end and rejects
//! its update) while this worker keeps receiving. The complete update reaches the gRPC
//! handler through the [`Pending`], which applies it at the `Commit`: the old version
//! serves until then, and a sender that dies mid-stream leaves it serving.
//!
//! Bounds: an update holds one copy of the model in the wire dtype (the staging permit
//! of the gRPC handler covers it), and the last applied update's copy is kept as the
//! next one's staging (already faulted in); reads time out after the idle timeout (or the
//! route's hop timeout, if shorter); at most [`MAX_CONNECTIONS`] connections at once.
//! Framing: `proto::data_plane`.
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use model::ParamSpec;
use proto::data_plane::{self as dp, Hop, Route, Token};
use tch::Tensor;
use tokio::sync::oneshot;

use crate::error::EngineError;
use crate::weights::{StagedWeights, WeightAssembler, WireDType};

/// Connections served at once (each holds a thread; only registered tokens get far).
pub const MAX_CONNECTIONS: usize = 16;
/// Time a connection has to present its token.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a presented token may wait for its `DataPlaneOffer` to be registered: the
/// sender opens the connection as it sends the offer on gRPC, so the hello can win the
/// race. An unknown token is refused after this.
pub const TOKEN_WAIT: Duration = Duration::from_secs(3);
/// Bytes read per `read` call, and forwarded per message to the next hop.
const PIECE_BYTES: usize = 4 << 20;

type Outcome = Result<StagedWeights, EngineError>;

struct Slot {
    done: oneshot::Sender<Outcome>,
    connected: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Shared {
    specs: Vec<ParamSpec>,
    idle: Duration,
    slots: Mutex<HashMap<Token, SlotCell>>,
    /// Signalled at every registration.
    registered: std::sync::Condvar,
    connections: AtomicUsize,
    /// The staging tensors of the last applied update, by name: the next update reads
    /// into them (already faulted in) instead of fresh allocations.
    spare: Arc<Mutex<HashMap<String, Tensor>>>,
}

// `Slot` holds a oneshot sender (not Debug); wrapped so `Shared` can derive Debug.
struct SlotCell(Slot);
impl std::fmt::Debug for SlotCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

/// The data plane of one worker: its port and the tokens awaiting a connection.
#[derive(Debug, Clone)]
pub struct DataPlane {
    port: u16,
    shared: Arc<Shared>,
}

/// An update announced over gRPC whose bytes come over the data plane. Dropping it
/// (the gRPC call ended) withdraws the token.
pub struct Pending {
    token: Token,
    shared: Arc<Shared>,
    rx: oneshot::Receiver<Outcome>,
    connected: Arc<AtomicBool>,
}

/// No Nagle; 8 MiB buffers where the kernel allows them (else its autotuning).
pub fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    if let Some(n) = proto::data_plane::explicit_buffer_bytes() {
        let r = socket2::SockRef::from(s);
        let _ = r.set_send_buffer_size(n);
        let _ = r.set_recv_buffer_size(n);
    }
}

fn io_error(what: &str, e: io::Error, timeout: Duration) -> EngineError {
    let why = match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no data for {:.1}s", timeout.as_secs_f64())
        }
        io::ErrorKind::UnexpectedEof => "the sender closed the stream mid-update".into(),
        _ => e.to_string(),
    };
    EngineError::Unavailable(format!("data plane: {what}: {why}; nothing was applied"))
}

impl DataPlane {
    /// Listens on `ip`, port `port` (0: any), for updates of the parameters `specs`,
    /// rejecting a stream silent for `idle`. The accept loop runs until the returned
    /// handle is aborted.
    pub async fn start(
        ip: IpAddr,
        port: u16,
        specs: Vec<ParamSpec>,
        idle: Duration,
    ) -> io::Result<(DataPlane, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, port)).await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            specs,
            idle,
            slots: Mutex::new(HashMap::new()),
            registered: std::sync::Condvar::new(),
            connections: AtomicUsize::new(0),
            spare: Arc::default(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else {
                    continue;
                };
                let Ok(conn) = conn.into_std().and_then(|c| {
                    c.set_nonblocking(false)?;
                    Ok(c)
                }) else {
                    continue;
                };
                let s = s.clone();
                if s.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    s.connections.fetch_sub(1, Ordering::SeqCst);
                    let mut conn = conn;
                    let _ = dp::write_status(
                        &mut conn,
                        Err(&format!(
                            "{MAX_CONNECTIONS} data-plane connections are open; retry later"
                        )),
                    );
                    continue;
                }
                std::thread::spawn(move || {
                    serve_connection(conn, peer, &s);
                    s.connections.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        tracing::info!(port, "weight data plane listening");
        Ok((DataPlane { port, shared }, task))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Awaits the update whose connection presents `token` (from a `DataPlaneOffer`).
    pub fn register(&self, token: Token) -> Result<Pending, EngineError> {
        let (tx, rx) = oneshot::channel();
        let connected = Arc::new(AtomicBool::new(false));
        let mut slots = self.shared.slots.lock().expect("slots lock");
        if slots.contains_key(&token) {
            return Err(EngineError::InvalidArgument(
                "data-plane token already in use".into(),
            ));
        }
        slots.insert(
            token,
            SlotCell(Slot {
                done: tx,
                connected: connected.clone(),
            }),
        );
        drop(slots);
        self.shared.registered.notify_all();
        Ok(Pending {
            token,
            shared: self.shared.clone(),
            rx,
            connected,
        })
    }
}

impl Pending {
    /// The received update. Fails if no connection presented the token within the idle
    /// timeout, or the connection failed (a bad header, a read timeout, the sender gone).
    /// Cancel-safe: polling it again after a cancellation keeps waiting for the same
    /// outcome (the connection timeout restarts).
    pub async fn wait(&mut self) -> Outcome {
        let idle = self.shared.idle;
        loop {
            tokio::select! {
                r = &mut self.rx => {
                    return r.unwrap_or_else(|_| Err(EngineError::Internal(
                        "data-plane connection thread ended without an outcome".into(),
                    )));
                }
                _ = tokio::time::sleep(idle) => {
                    if !self.connected.load(Ordering::SeqCst) {
                        return Err(EngineError::Unavailable(format!(
                            "data plane: no connection presented the update's token within {:.1}s; nothing was applied",
                            idle.as_secs_f64()
                        )));
                    }
                }
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.shared.slots.lock() {
            slots.remove(&self.token);
        }
    }
}

fn serve_connection(mut s: TcpStream, peer: SocketAddr, shared: &Shared) {
    tune(&s);
    let _ = s.set_read_timeout(Some(HELLO_TIMEOUT));
    let _ = s.set_write_timeout(Some(shared.idle));
    let token = match dp::read_hello(&mut s) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "data-plane connection refused");
            refuse(&mut s, &format!("refused: {e}"));
            return;
        }
    };
    let Some(SlotCell(slot)) = take_slot(shared, &token) else {
        tracing::warn!(%peer, "data-plane connection with an unknown token refused");
        refuse(
            &mut s,
            "refused: unknown or expired data-plane token (tokens come with an \
             authenticated UpdateWeights call and serve one connection)",
        );
        return;
    };
    slot.connected.store(true, Ordering::SeqCst);
    if dp::write_status(&mut s, Ok(())).is_err() {
        let _ = slot.done.send(Err(EngineError::Unavailable(
            "data plane: the sender left after the hello".into(),
        )));
        return;
    }
    let outcome = receive(&mut s, shared);
    let status = match &outcome {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "data-plane update rejected");
            Err(e.to_string())
        }
    };
    let _ = slot.done.send(outcome);
    match status {
        Ok(()) => {
            let _ = dp::write_status(&mut s, Ok(()));
        }
        Err(m) => refuse(&mut s, &m),
    }
}

/// The slot of `token`, waiting up to [`TOKEN_WAIT`] for its registration.
fn take_slot(shared: &Shared, token: &Token) -> Option<SlotCell> {
    let deadline = std::time::Instant::now() + TOKEN_WAIT;
    let mut slots = shared.slots.lock().expect("slots lock");
    loop {
        if let Some(s) = slots.remove(token) {
            return Some(s);
        }
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        slots = shared
            .registered
            .wait_timeout(slots, left)
            .expect("slots lock")
            .0;
    }
}

/// Writes an error status, then drains what the peer still sends (briefly), so the
/// status is not lost to a reset.
fn refuse(s: &mut TcpStream, message: &str) {
    let _ = dp::write_status(s, Err(message));
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 64 << 10];
    let mut left = 256usize;
    while left > 0 && matches!(s.read(&mut sink), Ok(n) if n > 0) {
        left -= 1;
    }
}

fn receive(s: &mut TcpStream, shared: &Shared) -> Outcome {
    let idle = shared.idle;
    let route = dp::read_route(s).map_err(|e| io_error("reading the route", e, idle))?;
    let timeout = match route.hop_timeout_ms {
        0 => idle,
        ms => idle.min(Duration::from_millis(ms as u64)),
    };
    let _ = s.set_read_timeout(Some(timeout));
    let forward = route.hops.split_first().map(|(first, rest)| {
        Forwarder::start(
            first.clone(),
            Route {
                hop_timeout_ms: route.hop_timeout_ms,
                hops: rest.to_vec(),
            },
            Duration::from_millis(route.hop_timeout_ms.max(1) as u64),
        )
    });
    let mut asm = WeightAssembler::new(&shared.specs);
    while let Some(h) = dp::read_header(s).map_err(|e| io_error("reading a header", e, timeout))? {
        let dtype = match h.dtype {
            1 => Some(WireDType::F32),
            2 => Some(WireDType::BF16),
            3 => Some(WireDType::F16),
            _ => None,
        };
        let spare = shared.spare.lock().expect("spare lock").remove(&h.name);
        let tensor = asm.stage_reusing(&h.name, dtype, &h.shape, h.num_bytes, spare)?;
        if let Some(f) = &forward {
            f.send(Piece::Header(dp::encode_header(&h)));
        }
        let total = h.num_bytes as usize;
        let base = tensor.data_ptr() as *mut u8;
        let mut filled = 0;
        let mut forwarded = 0;
        while filled < total {
            let want = (total - filled).min(PIECE_BYTES);
            // SAFETY: `tensor` is a fresh contiguous CPU tensor of `total` bytes
            // (`stage` checked the length); this range lies past `filled`, so no
            // reference to it exists (the forwarder reads only below `forwarded`).
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(filled), want) };
            match s.read(dst) {
                Ok(0) => {
                    return Err(io_error(
                        &format!("reading tensor {}", h.name),
                        io::ErrorKind::UnexpectedEof.into(),
                        timeout,
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(&format!("reading tensor {}", h.name), e, timeout)),
            }
            if let Some(f) = &forward {
                if filled - forwarded >= PIECE_BYTES || filled == total {
                    f.send(Piece::Bytes(
                        tensor.shallow_clone(),
                        forwarded,
                        filled - forwarded,
                    ));
                    forwarded = filled;
                }
            }
        }
    }
    if let Some(f) = &forward {
        f.send(Piece::End);
    }
    let mut staged = asm.finish()?;
    // Once applied (or dropped) the tensors become the next update's staging; not while
    // the forwarder may still write from them (then they are freed instead).
    let spare = shared.spare.clone();
    let forwarded = forward.map(|f| f.finished);
    staged.recycle = Some(Box::new(move |tensors| {
        if forwarded.is_some_and(|d| !d.load(Ordering::SeqCst)) {
            return;
        }
        if let Ok(mut spare) = spare.lock() {
            spare.extend(tensors);
        }
    }));
    Ok(staged)
}

enum Piece {
    Header(Vec<u8>),
    /// `len` bytes at `offset` of a staging tensor, already received.
    Bytes(Tensor, usize, usize),
    End,
}

/// Forwards one update to the next hop on a thread of its own, so the receiver never
/// waits on it. The queue holds only headers and views of the staging tensors.
struct Forwarder {
    tx: mpsc::Sender<Piece>,
    /// Set when the forwarding thread has ended (it holds no staging tensor any more).
    finished: Arc<AtomicBool>,
}

impl Forwarder {
    fn start(hop: Hop, rest: Route, deadline: Duration) -> Forwarder {
        let (tx, rx) = mpsc::channel();
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        std::thread::spawn(move || {
            if let Err(e) = forward(&hop, &rest, deadline, rx) {
                tracing::warn!(next = %hop.addr, error = %e,
                    "next worker cut from the weight chain; it keeps its old version until a later push");
            }
            done.store(true, Ordering::SeqCst);
        });
        Forwarder { tx, finished }
    }

    /// Queues `p`; a forwarder that stopped (its hop was cut) ignores it.
    fn send(&self, p: Piece) {
        let _ = self.tx.send(p);
    }
}

fn forward(
    hop: &Hop,
    rest: &Route,
    deadline: Duration,
    rx: mpsc::Receiver<Piece>,
) -> io::Result<()> {
    let addr = hop
        .addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, deadline)?;
    tune(&s);
    s.set_write_timeout(Some(deadline))?;
    // The next hop may hold the hello up to TOKEN_WAIT for its offer (sent on gRPC).
    s.set_read_timeout(Some(deadline + TOKEN_WAIT))?;
    dp::write_hello(&mut s, &hop.token)?;
    if let Err(m) = dp::read_status(&mut s)? {
        return Err(io::Error::other(m));
    }
    s.set_read_timeout(Some(deadline))?;
    dp::write_route(&mut s, rest)?;
    for p in rx {
        match p {
            Piece::Header(h) => s.write_all(&h)?,
            Piece::Bytes(t, offset, len) => {
                // SAFETY: these bytes of the staging tensor were written before the piece
                // was queued and are never written again; `t` keeps the storage alive.
                let src = unsafe {
                    std::slice::from_raw_parts((t.data_ptr() as *const u8).add(offset), len)
                };
                s.write_all(src)?;
            }
            Piece::End => {
                s.write_all(&dp::END)?;
                return match dp::read_status(&mut s)? {
                    Ok(()) => Ok(()),
                    Err(m) => Err(io::Error::other(format!("it rejected the update: {m}"))),
                };
            }
        }
    }
    // The receiver failed before the end: dropping the socket tells the next hop.
    Err(io::Error::other("the update failed upstream"))
}
