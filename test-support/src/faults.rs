//! Fault injection for tests: a TCP proxy on `127.0.0.1:0` in front of a worker that can
//! kill or hang it as the client sees it, without touching the worker.
//!
//! - [`FaultProxy::cut`]: every proxied connection is reset (RST to the client, the
//!   worker's side closed so it cancels its work) and new connections are reset as soon
//!   as they are accepted: a killed worker.
//! - [`FaultProxy::stall`]: no byte moves in either direction, sockets stay open and new
//!   connections are accepted but never served: a hung worker (only timeouts notice).
//! - [`FaultProxy::restore`]: forwarding resumes (stalled bytes flow on; cut connections
//!   stay gone).
//! - [`FaultProxy::retarget`]: later connections go to another address (a worker
//!   restarted elsewhere).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Stalled,
    Cut,
}

/// The proxy's state as connections see it. `cuts` counts calls to `cut`, so a
/// connection dies even when `restore` follows before it looked (a watch shows only the
/// latest value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    mode: Mode,
    cuts: u64,
}

struct Shared {
    state: watch::Sender<State>,
    target: Mutex<SocketAddr>,
}

impl Shared {
    fn set(&self, mode: Mode) {
        self.state.send_modify(|s| {
            s.mode = mode;
            if mode == Mode::Cut {
                s.cuts += 1;
            }
        });
    }
}

/// A fault-injecting TCP proxy; dropping it cuts every connection and stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// `"http://127.0.0.1:5000"` or `"127.0.0.1:5000"` to a socket address.
fn parse_target(target: &str) -> io::Result<SocketAddr> {
    let hostport = target
        .strip_prefix("http://")
        .unwrap_or(target)
        .trim_end_matches('/');
    hostport.parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("proxy target {target:?} is not ip:port: {e}"),
        )
    })
}

impl FaultProxy {
    /// Starts forwarding from a fresh port on 127.0.0.1 to `target` (`ip:port`, with or
    /// without `http://`).
    pub async fn start(target: &str) -> io::Result<FaultProxy> {
        let target = parse_target(target)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: watch::Sender::new(State {
                mode: Mode::Forward,
                cuts: 0,
            }),
            target: Mutex::new(target),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The proxy's url, `http://127.0.0.1:PORT`, to give the client instead of the worker's.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every connection and every new one until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.shared.set(Mode::Cut);
    }

    /// Stops forwarding bytes, keeping the sockets, until [`FaultProxy::restore`].
    pub fn stall(&self) {
        self.shared.set(Mode::Stalled);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.shared.set(Mode::Forward);
    }

    /// Sends connections accepted from now on to `target` (existing ones keep theirs).
    pub fn retarget(&self, target: &str) -> io::Result<()> {
        let t = parse_target(target)?;
        *self.shared.target.lock().unwrap_or_else(|p| p.into_inner()) = t;
        Ok(())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.set(Mode::Cut);
        self.accept.abort();
    }
}

/// Closes `s` with a reset rather than an orderly shutdown.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let state = *shared.state.borrow();
        if state.mode == Mode::Cut {
            reset(client);
            continue;
        }
        let target = *shared.target.lock().unwrap_or_else(|p| p.into_inner());
        let conn = Conn {
            state: shared.state.subscribe(),
            cuts: state.cuts,
        };
        tokio::spawn(proxy_connection(client, target, conn));
    }
}

/// A connection's view of the proxy state: it was opened after `cuts` cuts.
#[derive(Clone)]
struct Conn {
    state: watch::Receiver<State>,
    cuts: u64,
}

/// Whether a connection opened after `cuts` cuts must die in state `s`.
fn cut_since(cuts: u64, s: &State) -> bool {
    s.cuts != cuts || s.mode == Mode::Cut
}

impl Conn {
    /// Waits until bytes may move; `Err` once the proxy has cut this connection.
    async fn wait_forward(&mut self) -> io::Result<()> {
        let cuts = self.cuts;
        match self
            .state
            .wait_for(|s| cut_since(cuts, s) || s.mode == Mode::Forward)
            .await
        {
            Ok(s) if !cut_since(cuts, &s) => Ok(()),
            _ => Err(io::ErrorKind::ConnectionReset.into()),
        }
    }

    /// Resolves once the proxy has cut this connection.
    async fn cut(&mut self) {
        let cuts = self.cuts;
        let _ = self.state.wait_for(|s| cut_since(cuts, s)).await;
    }
}

/// Copies `from` to `to`, holding bytes while stalled.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut conn: Conn) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        conn.wait_forward().await?;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        conn.wait_forward().await?;
        to.write_all(&buf[..n]).await?;
    }
}

async fn proxy_connection(client: TcpStream, target: SocketAddr, mut conn: Conn) {
    let upstream = tokio::select! {
        r = TcpStream::connect(target) => r,
        _ = conn.cut() => {
            reset(client);
            return;
        }
    };
    let Ok(upstream) = upstream else {
        // The worker is not there: the client sees a reset, as from a dead host.
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Any close from here on is a reset, so a cut is abrupt on both sides.
    let _ = client.set_zero_linger();
    let _ = upstream.set_zero_linger();
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, conn.clone());
    let down = pump(ur, cw, conn.clone());
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = conn.cut() => {}
    }
    // Dropping the halves closes both sockets (with a reset).
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn forwards_stalls_cuts_and_restores() {
        let echo = echo_server().await;
        let p = FaultProxy::start(&format!("http://{echo}")).await.unwrap();
        assert!(p.url().starts_with("http://127.0.0.1:"));
        let mut c = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"hello").await.unwrap(), b"hello");

        p.stall();
        c.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_millis(200), c.read_exact(&mut buf)).await;
        assert!(r.is_err(), "no byte moves while stalled");
        p.restore();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"held", "stalled bytes flow on after restore");

        p.cut();
        let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut c, b"x")).await;
        assert!(r.unwrap().is_err(), "a cut connection is reset");
        // New connections are reset at once.
        let mut d = TcpStream::connect(p.addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut d, b"y")).await;
        assert!(r.unwrap().is_err());

        p.restore();
        let mut e = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut e, b"again").await.unwrap(), b"again");

        // A cut followed at once by a restore still kills the connections open before it.
        let mut g = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut g, b"1").await.unwrap(), b"1");
        p.cut();
        p.restore();
        let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut g, b"2")).await;
        assert!(r.unwrap().is_err(), "the connection survived a cut");

        let echo2 = echo_server().await;
        p.retarget(&echo2.to_string()).unwrap();
        let mut f = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut f, b"moved").await.unwrap(), b"moved");
        assert!(p.retarget("not an address").is_err());
    }
}
