//! The bulk weight data plane: a raw TCP listener beside gRPC that receives the tensors
//! of an update straight into their staging tensors, and forwards them down a chain.
//!
//! Data flow: an `UpdateWeights` call (authenticated like every gRPC call) opens with a
//! `DataPlaneOffer{token}`; the handler [`DataPlane::register`]s the token and gets a
//! [`Pending`]. A sender then connects to [`DataPlane::port`] and presents the token
//! (one use; an unknown token is refused with a message); the connection's thread
//! validates each header against the architecture ([`WeightAssembler::stage`]: a known
//! name, its exact shape, once; [`pieces`]: a tensor whole or in disjoint pieces that
//! cover it) and `read`s the bytes into the staging tensor's memory, with no buffer in
//! between. When the route names a next hop, every
//! header and every piece of bytes, as it lands, is queued to a forwarding thread that
//! writes it to the next worker from that same memory, with a per-hop write deadline; a
//! hop that misses it, or fails, is cut while this worker keeps receiving, and the
//! forwarder reconnects to the hop after it (the route lists every downstream worker
//! with its token), sending the update again from its start: only the cut worker misses
//! it. A forwarded receiver whose stream breaks keeps its token for the route's
//! `rejoin_ms` for that reconnection, and a newer connection presenting a token whose
//! update is still arriving replaces the older one. The complete update reaches the gRPC
//! handler through the [`Pending`], which applies it at the `Commit`: the old version
//! serves until then, and a sender that dies mid-stream leaves it serving. An update
//! may also come over parallel connections (lanes) to this one worker: [`lanes`].
//! Headers are parsed from a small read-ahead buffer; the bytes past it go straight
//! from the socket into the staging tensor.
//!
//! Bounds: an update holds one copy of the model in the wire dtype (the staging permit
//! of the gRPC handler covers it), and the last applied update's copy is kept as the
//! next one's staging (already faulted in; with a swap at the commit, the storage the
//! model gave up), never while a forwarder may still read it; reads time out after the idle timeout (or the
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
use tch::{Device, Tensor};
use tokio::sync::oneshot;

use crate::error::EngineError;
use crate::weights::{StagedWeights, WeightAssembler, WireDType};

mod lanes;
mod pieces;

/// Connections served at once (each holds a thread; only registered tokens get far).
pub const MAX_CONNECTIONS: usize = 16;
/// Time a connection has to present its token.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a presented token may wait for its `DataPlaneOffer` to be registered: the
/// sender opens the connection as it sends the offer on gRPC, so the hello can win the
/// race. An unknown token is refused after this.
pub const TOKEN_WAIT: Duration = Duration::from_secs(3);
/// Why a connection presenting a token no update awaits is refused.
const UNKNOWN_TOKEN: &str = "unknown or expired data-plane token (tokens come with an \
     authenticated UpdateWeights call and serve one update)";
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
    /// Connections receiving an update, by token (id, a handle on the socket): a newer
    /// connection presenting the same token (the upstream rerouting around a cut hop)
    /// shuts the older one down and takes its place.
    active: Mutex<HashMap<Token, (u64, TcpStream)>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Forwarding threads running: they read staging memory (or, once applied, memory
    /// the model's parameters took over), so no update's tensors are recycled as
    /// staging, to be written again, while any runs.
    forwarding: Arc<AtomicUsize>,
    /// Multi-lane updates being received, by token (`lanes`).
    gathers: Mutex<HashMap<Token, Arc<lanes::Gather>>>,
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
            active: Mutex::new(HashMap::new()),
            next_id: Default::default(),
            forwarding: Arc::default(),
            gathers: Mutex::new(HashMap::new()),
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
            if let Ok(mut gathers) = self.shared.gathers.lock() {
                gathers.remove(&self.token);
            }
        }
    }
}

fn serve_connection(mut s: TcpStream, peer: SocketAddr, shared: &Shared) {
    tune(&s);
    let _ = s.set_read_timeout(Some(HELLO_TIMEOUT));
    let _ = s.set_write_timeout(Some(shared.idle));
    let (token, lane) = match dp::read_hello(&mut s) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "data-plane connection refused");
            refuse(&mut s, &format!("refused: {e}"));
            return;
        }
    };
    if lane.count > 1 {
        return lanes::serve(s, peer, shared, token, lane);
    }
    // A token whose update another connection is receiving: the upstream rerouting
    // around a cut hop. The older connection is shut down; it hands the slot back.
    let replaced = shared
        .active
        .lock()
        .expect("active lock")
        .remove(&token)
        .map(|(_, old)| old.shutdown(std::net::Shutdown::Both));
    let Some(SlotCell(slot)) = take_slot(shared, &token) else {
        tracing::warn!(%peer, "data-plane connection with an unknown token refused");
        refuse(&mut s, &format!("refused: {UNKNOWN_TOKEN}"));
        return;
    };
    if replaced.is_some() {
        tracing::info!(%peer, "data-plane update restarted on a new connection (upstream rerouted)");
    }
    slot.connected.store(true, Ordering::SeqCst);
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    if let Ok(handle) = s.try_clone() {
        shared
            .active
            .lock()
            .expect("active lock")
            .insert(token, (id, handle));
    }
    let ok = dp::write_status(&mut s, Ok(()));
    let (outcome, rejoin_wait) = match ok {
        Ok(()) => receive(&mut s, shared),
        Err(_) => (
            Err(EngineError::Unavailable(
                "data plane: the sender left after the hello".into(),
            )),
            Duration::ZERO,
        ),
    };
    {
        let mut active = shared.active.lock().expect("active lock");
        if active.get(&token).is_some_and(|(i, _)| *i == id) {
            active.remove(&token);
        }
    }
    let status = match &outcome {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "data-plane update rejected");
            Err(e.to_string())
        }
    };
    let rejoin = match outcome {
        // A broken stream from a forwarding worker: it may reconnect around a cut hop.
        Err(e @ EngineError::Unavailable(_)) if !rejoin_wait.is_zero() => Some((slot, e)),
        outcome => {
            let _ = slot.done.send(outcome);
            None
        }
    };
    match status {
        Ok(()) => {
            let _ = dp::write_status(&mut s, Ok(()));
        }
        Err(m) => refuse(&mut s, &m),
    }
    if let Some((slot, e)) = rejoin {
        rejoin_or_fail(shared, token, slot, e, rejoin_wait);
    }
}

/// Puts `slot` back under `token` for `wait`, so the upstream can present the token
/// again on a new connection (the update then starts over); fails it with `error` if
/// none does.
fn rejoin_or_fail(shared: &Shared, token: Token, slot: Slot, error: EngineError, wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    shared
        .slots
        .lock()
        .expect("slots lock")
        .insert(token, SlotCell(slot));
    shared.registered.notify_all();
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if !shared
            .slots
            .lock()
            .expect("slots lock")
            .contains_key(&token)
        {
            return; // taken by a new connection (or withdrawn with its call)
        }
    }
    if let Some(SlotCell(slot)) = shared.slots.lock().expect("slots lock").remove(&token) {
        let _ = slot.done.send(Err(error));
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

/// Receives one update; with the time the token may wait for the upstream to reconnect
/// if the stream breaks (the route's `rejoin_ms`, 0 before the route is read).
fn receive(s: &mut TcpStream, shared: &Shared) -> (Outcome, Duration) {
    let idle = shared.idle;
    let mut r = headers(s);
    let route = match dp::read_route(&mut r) {
        Ok(r) => r,
        Err(e) => return (Err(io_error("reading the route", e, idle)), Duration::ZERO),
    };
    let rejoin = Duration::from_millis(route.rejoin_ms as u64).min(idle);
    (receive_tensors(s, &mut r, shared, &route), rejoin)
}

/// Bytes read ahead to parse headers (and the route) from memory rather than with a
/// `read` per field; a tensor's bytes past what was read ahead go straight from the
/// socket into its staging tensor (`BufReader` passes reads of its capacity or more
/// through).
const HEADER_READ_AHEAD: usize = 4 << 10;

/// The reader an update's frames are parsed from.
fn headers(s: &TcpStream) -> io::BufReader<&TcpStream> {
    io::BufReader::with_capacity(HEADER_READ_AHEAD, s)
}

/// The read timeout of an update's stream: the idle timeout, or the route's hop
/// timeout if shorter.
fn stream_timeout(idle: Duration, route: &Route) -> Duration {
    match route.hop_timeout_ms {
        0 => idle,
        ms => idle.min(Duration::from_millis(ms as u64)),
    }
}

fn receive_tensors(
    s: &TcpStream,
    r: &mut io::BufReader<&TcpStream>,
    shared: &Shared,
    route: &Route,
) -> Outcome {
    let timeout = stream_timeout(shared.idle, route);
    let _ = s.set_read_timeout(Some(timeout));
    let forward = (!route.hops.is_empty()).then(|| {
        Forwarder::start(
            route.hops.clone(),
            Duration::from_millis(route.hop_timeout_ms.max(1) as u64),
            &shared.forwarding,
        )
    });
    let mut asm = WeightAssembler::new(&shared.specs);
    let mut pieces = pieces::Pieces::default();
    while let Some(h) = dp::read_header(r).map_err(|e| io_error("reading a header", e, timeout))? {
        let tensor = pieces.place(&mut asm, shared, &h)?;
        if let Some(f) = &forward {
            f.send(Piece::Header(dp::encode_header(&h)));
        }
        read_tensor(r, &tensor, &h, timeout, forward.as_ref())?;
    }
    // A tensor missing pieces fails the update here; the forwarder, dropped without
    // the end marker, drops its stream so the next hop fails it too.
    pieces.complete()?;
    if let Some(f) = &forward {
        f.send(Piece::End);
    }
    drop(forward);
    staged_outcome(asm, shared)
}

/// The `WireDType` of a header's `rollout.v1.Dtype` value.
fn wire_dtype(v: u8) -> Option<WireDType> {
    match v {
        1 => Some(WireDType::F32),
        2 => Some(WireDType::BF16),
        3 => Some(WireDType::F16),
        _ => None,
    }
}

/// Reads the `h.num_bytes` bytes of piece `h` into `tensor` at `h.offset` (a staging
/// tensor whose range `pieces::Pieces::place` claimed for this piece), queueing each
/// part to `forward` as it lands.
fn read_tensor(
    s: &mut impl Read,
    tensor: &Tensor,
    h: &dp::TensorHeader,
    timeout: Duration,
    forward: Option<&Forwarder>,
) -> Result<(), EngineError> {
    let total = h.num_bytes as usize;
    let start = h.offset as usize;
    // SAFETY: `place` checked that `start + total` lies within the tensor's bytes.
    let base = unsafe { (tensor.data_ptr() as *mut u8).add(start) };
    let mut filled = 0;
    let mut forwarded = 0;
    while filled < total {
        let want = (total - filled).min(PIECE_BYTES);
        // SAFETY: `tensor` is a contiguous CPU tensor whose bytes `start..start + total`
        // only this piece writes (`place` gives each range to one piece, and a tensor
        // serves nothing before the update is complete); this part lies past `filled`,
        // so no reference to it exists (the forwarder reads only below `forwarded`).
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
        if let Some(f) = forward {
            if filled - forwarded >= PIECE_BYTES || filled == total {
                f.send(Piece::Bytes(
                    tensor.shallow_clone(),
                    start + forwarded,
                    filled - forwarded,
                ));
                forwarded = filled;
            }
        }
    }
    Ok(())
}

/// The staging tensor for `h` in `asm`, reusing the previous update's storage of that
/// name when there is one.
fn stage(
    asm: &mut WeightAssembler,
    shared: &Shared,
    h: &dp::TensorHeader,
) -> Result<Tensor, EngineError> {
    let spare = shared.spare.lock().expect("spare lock").remove(&h.name);
    Ok(asm.stage_reusing(
        &h.name,
        wire_dtype(h.dtype),
        &h.shape,
        h.num_bytes,
        spare,
        Device::Cpu,
    )?)
}

/// The complete update of `asm`, its tensors set to become the next update's staging
/// once applied (or dropped); not while any forwarder may still write from them (then
/// they are freed instead).
fn staged_outcome(asm: WeightAssembler, shared: &Shared) -> Outcome {
    let mut staged = asm.finish()?;
    let spare = shared.spare.clone();
    let forwarding = shared.forwarding.clone();
    staged.recycle = Some(Box::new(move |tensors| {
        if forwarding.load(Ordering::SeqCst) > 0 {
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

impl Piece {
    /// A second handle on the same bytes (kept to send the update again after a cut).
    fn share(&self) -> Piece {
        match self {
            Piece::Header(h) => Piece::Header(h.clone()),
            Piece::Bytes(t, o, l) => Piece::Bytes(t.shallow_clone(), *o, *l),
            Piece::End => Piece::End,
        }
    }
}

/// Forwards one update down the rest of the chain on a thread of its own, so the
/// receiver never waits on it. The queue holds only headers and views of the staging
/// tensors. A hop that fails or misses the write deadline is cut and the thread
/// reconnects to the hop after it (with that hop's token, the route minus the cut hop,
/// and `rejoin_ms` set so each receiver waits for such a reconnection), sending what it
/// sent so far again, then the rest: only the cut worker misses the update.
struct Forwarder {
    tx: mpsc::Sender<Piece>,
}

/// Decrements the running-forwarder count when the thread ends, however it ends.
struct Running(Arc<AtomicUsize>);
impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a hop's stream ended.
enum HopEnd {
    /// The hop answered the end marker: the update reached it (and it forwards on).
    Done,
    /// The receiver failed before the end: nothing more to forward.
    Upstream,
    /// The hop failed or missed the deadline: cut it.
    Cut(io::Error),
}

impl Forwarder {
    fn start(hops: Vec<Hop>, deadline: Duration, running: &Arc<AtomicUsize>) -> Forwarder {
        let (tx, rx) = mpsc::channel();
        running.fetch_add(1, Ordering::SeqCst);
        let running = Running(running.clone());
        std::thread::spawn(move || {
            let _running = running;
            let mut sent: Vec<Piece> = vec![];
            for i in 0..hops.len() {
                let rest = Route {
                    hop_timeout_ms: deadline.as_millis().min(u32::MAX as u128) as u32,
                    rejoin_ms: rejoin_ms(deadline),
                    hops: hops[i + 1..].to_vec(),
                };
                match forward(&hops[i], &rest, deadline, &rx, &mut sent) {
                    HopEnd::Done => return,
                    HopEnd::Upstream => return,
                    HopEnd::Cut(e) => tracing::warn!(next = %hops[i].addr, error = %e,
                        rerouted_to = hops.get(i + 1).map(|h| h.addr.as_str()).unwrap_or("none"),
                        "next worker cut from the weight chain; it keeps its old version until a later push"),
                }
            }
        });
        Forwarder { tx }
    }

    /// Queues `p`; a forwarder that stopped (every hop after it was cut) ignores it.
    fn send(&self, p: Piece) {
        let _ = self.tx.send(p);
    }
}

/// How long a forwarded receiver keeps its token after its stream broke: the forwarder
/// notices a cut within its write deadline, then reconnects (the hello may wait up to
/// [`TOKEN_WAIT`] for a slot being handed back).
fn rejoin_ms(deadline: Duration) -> u32 {
    (deadline + TOKEN_WAIT).as_millis().min(u32::MAX as u128) as u32
}

fn write_piece(s: &mut TcpStream, p: &Piece) -> io::Result<()> {
    match p {
        Piece::Header(h) => s.write_all(h),
        Piece::Bytes(t, offset, len) => {
            // SAFETY: these bytes of the staging tensor were written before the piece was
            // queued and are never written again while a forwarder runs (recycling waits
            // for every forwarder to end); `t` keeps the storage alive.
            let src = unsafe {
                std::slice::from_raw_parts((t.data_ptr() as *const u8).add(*offset), *len)
            };
            s.write_all(src)
        }
        Piece::End => s.write_all(&dp::END),
    }
}

/// Streams the update to `hop`: first `sent` (what earlier hops got), then the queue,
/// adding each piece to `sent`.
fn forward(
    hop: &Hop,
    rest: &Route,
    deadline: Duration,
    rx: &mpsc::Receiver<Piece>,
    sent: &mut Vec<Piece>,
) -> HopEnd {
    let mut s = match connect_hop(hop, rest, deadline) {
        Ok(s) => s,
        Err(e) => return HopEnd::Cut(e),
    };
    let end = |s: &mut TcpStream| match dp::read_status(s) {
        Ok(Ok(())) => HopEnd::Done,
        Ok(Err(m)) => HopEnd::Cut(io::Error::other(format!("it rejected the update: {m}"))),
        Err(e) => HopEnd::Cut(e),
    };
    for p in sent.iter() {
        if let Err(e) = write_piece(&mut s, p) {
            return HopEnd::Cut(e);
        }
        if matches!(p, Piece::End) {
            return end(&mut s);
        }
    }
    // Dropping the socket on the way out tells the next hop the update failed.
    for p in rx.iter() {
        let r = write_piece(&mut s, &p);
        let last = matches!(p, Piece::End);
        sent.push(p.share());
        if let Err(e) = r {
            return HopEnd::Cut(e);
        }
        if last {
            return end(&mut s);
        }
    }
    HopEnd::Upstream
}

fn connect_hop(hop: &Hop, rest: &Route, deadline: Duration) -> io::Result<TcpStream> {
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
    dp::write_hello(&mut s, &hop.token, dp::Lane::SOLE)?;
    if let Err(m) = dp::read_status(&mut s)? {
        return Err(io::Error::other(m));
    }
    s.set_read_timeout(Some(deadline))?;
    dp::write_route(&mut s, rest)?;
    Ok(s)
}
