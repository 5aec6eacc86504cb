//! A small TCP key-value store for rendezvous: rank 0 serves it, every rank (rank 0
//! included) talks to it through a [`StoreClient`]. Ranks publish their ring
//! addresses, the NCCL unique id and failure reports here.
//!
//! Wire protocol (little endian; `str`/`bytes` are a u32 length then the bytes):
//! the client opens with the 8-byte magic `GRPOKV02`, which the server echoes, so a
//! client pointed at a different service (say torchrun's own TCPStore) fails with a
//! clear message instead of waiting forever. The job-secret handshake follows
//! ([`super::auth`]): the server's 32-byte nonce, the client's nonce and MAC, the
//! server's MAC; a client without the secret is disconnected before any request.
//! Requests are a u8 opcode and fields:
//! - `SET key value` → `0`
//! - `GET key timeout_ms` → `0 value` | `1` (not set before the timeout)
//! - `WAIT n key*n timeout_ms` → `0` | `1 n key*n` (the keys still missing)
//!
//! The server never trusts lengths: keys are at most 1 KiB, values 16 MiB, and a
//! malformed request closes that connection only.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use proto::frame::{self, put_u32_prefixed as put_bytes, read_u32, read_u64};

use super::auth::{self, JobSecret, MAC_LEN, NONCE_LEN};
use super::error::CommError;

const MAGIC: &[u8; 8] = b"GRPOKV02";
const LABEL_CLIENT: &[u8] = b"grpo-store-client";
const LABEL_SERVER: &[u8] = b"grpo-store-server";
/// A connection that has not completed the handshake within this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_WAIT: u8 = 3;
const REPLY_OK: u8 = 0;
const REPLY_TIMEOUT: u8 = 1;
const MAX_KEY: usize = 1024;
const MAX_VALUE: usize = 16 << 20;
const MAX_KEYS: usize = 1 << 16;
/// How much longer than the server-side wait a client waits for the reply before
/// declaring the server dead.
const REPLY_SLACK: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl State {
    /// Blocks until all `keys` are set or `timeout` passes; returns the missing keys.
    fn wait(&self, keys: &[String], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let Ok(mut map) = self.map.lock() else {
            return keys.to_vec();
        };
        loop {
            let missing: Vec<String> = keys
                .iter()
                .filter(|k| !map.contains_key(*k))
                .cloned()
                .collect();
            let now = Instant::now();
            if missing.is_empty() || now >= deadline {
                return missing;
            }
            match self.changed.wait_timeout(map, deadline - now) {
                Ok((guard, _)) => map = guard,
                Err(_) => return missing,
            }
        }
    }
}

/// The store server. Dropping it stops accepting connections; connections already
/// open end when their clients disconnect.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept_thread: Option<thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `bind` (e.g. `0.0.0.0:29500`, or port 0 for any free port); only
    /// clients proving knowledge of `secret` get past the handshake.
    pub fn bind(bind: SocketAddr, secret: JobSecret) -> Result<StoreServer, CommError> {
        let listener = TcpListener::bind(bind).map_err(|source| CommError::Io {
            context: format!("store: cannot listen on {bind}"),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| CommError::Io {
            context: "store: listener address".into(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State::default());
        let accept_stop = stop.clone();
        let accept_thread = thread::Builder::new()
            .name("kv-store".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if accept_stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    let secret = secret.clone();
                    // A failing connection only ends its own thread.
                    let _ = thread::Builder::new()
                        .name("kv-store-conn".into())
                        .spawn(move || {
                            let _ = serve_connection(conn, &state, &secret);
                        });
                }
            })
            .map_err(|source| CommError::Io {
                context: "store: spawning the accept thread".into(),
                source,
            })?;
        Ok(StoreServer {
            addr,
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let wake = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], self.addr.port()))
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.addr.port()))
            }
            _ => self.addr,
        };
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok() {
            if let Some(handle) = self.accept_thread.take() {
                let _ = handle.join();
            }
        }
    }
}

/// The server side of the handshake: magic, then the job-secret challenge.
fn accept_handshake(conn: &mut TcpStream, secret: &JobSecret) -> io::Result<()> {
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    conn.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    if !frame::read_magic(conn, MAGIC)? {
        return Err(frame::invalid("bad magic"));
    }
    let ns = auth::nonce()?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&ns);
    conn.write_all(&hello)?;
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    conn.read_exact(&mut answer)?;
    let (nc, tag) = answer.split_at(NONCE_LEN);
    if !secret.verify(tag, LABEL_CLIENT, &[&ns, nc]) {
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(%peer, "store: refused a connection that does not know the job secret");
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "wrong job secret",
        ));
    }
    conn.write_all(&secret.mac(LABEL_SERVER, &[&ns, nc]))?;
    // Authenticated: requests may be far apart (ranks wait in the store for minutes).
    conn.set_read_timeout(None)?;
    conn.set_write_timeout(None)
}

fn serve_connection(mut conn: TcpStream, state: &State, secret: &JobSecret) -> io::Result<()> {
    conn.set_nodelay(true)?;
    accept_handshake(&mut conn, secret)?;
    loop {
        let mut op = [0u8; 1];
        match conn.read_exact(&mut op) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            other => other?,
        }
        let mut reply = Vec::new();
        match op[0] {
            OP_SET => {
                let key = read_str(&mut conn)?;
                let value = read_bytes(&mut conn, MAX_VALUE)?;
                let mut map = state
                    .map
                    .lock()
                    .map_err(|_| io::Error::other("store state poisoned"))?;
                map.insert(key, value);
                state.changed.notify_all();
                reply.push(REPLY_OK);
            }
            OP_GET => {
                let key = read_str(&mut conn)?;
                let timeout = Duration::from_millis(read_u64(&mut conn)?);
                let missing = state.wait(std::slice::from_ref(&key), timeout);
                let value = state
                    .map
                    .lock()
                    .map_err(|_| io::Error::other("store state poisoned"))?
                    .get(&key)
                    .cloned();
                match value {
                    Some(value) if missing.is_empty() => {
                        reply.push(REPLY_OK);
                        put_bytes(&mut reply, &value);
                    }
                    _ => reply.push(REPLY_TIMEOUT),
                }
            }
            OP_WAIT => {
                let n = read_u32(&mut conn)? as usize;
                if n > MAX_KEYS {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "too many keys"));
                }
                let keys = (0..n)
                    .map(|_| read_str(&mut conn))
                    .collect::<io::Result<Vec<_>>>()?;
                let timeout = Duration::from_millis(read_u64(&mut conn)?);
                let missing = state.wait(&keys, timeout);
                if missing.is_empty() {
                    reply.push(REPLY_OK);
                } else {
                    reply.push(REPLY_TIMEOUT);
                    reply.extend_from_slice(&(missing.len() as u32).to_le_bytes());
                    for key in &missing {
                        put_bytes(&mut reply, key.as_bytes());
                    }
                }
            }
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad opcode")),
        }
        conn.write_all(&reply)?;
    }
}

fn read_bytes(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    frame::read_u32_prefixed(r, max, "value")
}

fn read_str(r: &mut impl Read) -> io::Result<String> {
    String::from_utf8(frame::read_u32_prefixed(r, MAX_KEY, "key")?)
        .map_err(|_| frame::invalid("key is not UTF-8"))
}

/// One connection to the store. Calls are blocking and each is bounded by its
/// timeout plus a few seconds of slack for the reply.
pub struct StoreClient {
    addr: String,
    conn: Mutex<TcpStream>,
}

impl StoreClient {
    /// Connects to `host:port`, retrying until `timeout` while the server is not up
    /// yet (rank 0 may start after the others), and proves knowledge of `secret`.
    pub fn connect(
        host: &str,
        port: u16,
        timeout: Duration,
        secret: &JobSecret,
    ) -> Result<StoreClient, CommError> {
        let addr = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(10);
        loop {
            let attempt = addr
                .as_str()
                .to_socket_addrs()
                .and_then(|mut addrs| {
                    addrs.next().ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "no address for host")
                    })
                })
                .and_then(|sa| {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(10));
                    TcpStream::connect_timeout(&sa, left)
                });
            match attempt {
                Ok(conn) => return Self::handshake(&addr, conn, timeout, secret),
                // Not up yet (or not resolvable yet): retry with backoff until the deadline.
                Err(_) if Instant::now() + delay < deadline => {
                    thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(CommError::Store {
                        addr: addr.clone(),
                        detail: format!("not reachable within {timeout:?}: {e}"),
                    })
                }
            }
        }
    }

    fn handshake(
        addr: &str,
        mut conn: TcpStream,
        timeout: Duration,
        secret: &JobSecret,
    ) -> Result<Self, CommError> {
        let err = |detail: String| CommError::Store {
            addr: addr.to_string(),
            detail,
        };
        conn.set_nodelay(true)
            .and_then(|_| conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT)))
            .and_then(|_| conn.set_write_timeout(Some(timeout + REPLY_SLACK)))
            .and_then(|_| conn.write_all(MAGIC))
            .map_err(|e| err(format!("handshake: {e}")))?;
        let mut hello = [0u8; 8 + NONCE_LEN];
        match conn.read_exact(&mut hello) {
            Ok(()) if &hello[..8] == MAGIC => {}
            Ok(()) | Err(_) => {
                return Err(err(
                    "did not answer the store handshake: is this port served by something else, \
                     e.g. torchrun's own TCPStore, or a rank of another version? \
                     (see GRPO_STORE_PORT in docs/collectives.md)"
                        .into(),
                ))
            }
        }
        let ns = &hello[8..];
        let nc = auth::nonce().map_err(|e| err(format!("handshake: {e}")))?;
        let mut answer = nc.to_vec();
        answer.extend_from_slice(&secret.mac(LABEL_CLIENT, &[ns, &nc]));
        let mut tag = [0u8; MAC_LEN];
        conn.write_all(&answer)
            .and_then(|_| conn.read_exact(&mut tag))
            .map_err(|_| {
                err(
                    "the store refused this rank's job secret: GRPO_JOB_SECRET (or \
                     GRPO_JOB_SECRET_FILE) must be the same on every rank"
                        .into(),
                )
            })?;
        if !secret.verify(&tag, LABEL_SERVER, &[ns, &nc]) {
            return Err(err(
                "the store did not prove it knows the job secret: another process may \
                 be listening on the store port"
                    .into(),
            ));
        }
        conn.set_read_timeout(Some(timeout + REPLY_SLACK))
            .map_err(|e| err(format!("handshake: {e}")))?;
        Ok(StoreClient {
            addr: addr.to_string(),
            conn: Mutex::new(conn),
        })
    }

    /// The local address of the connection: the interface this host uses to reach
    /// the store, which is also where peers on other hosts can reach this rank.
    pub fn local_ip(&self) -> Result<IpAddr, CommError> {
        let conn = self.lock()?;
        conn.local_addr()
            .map(|a| a.ip())
            .map_err(|e| self.io_error("local address", e))
    }

    /// Sets `key` to `value`, waking every waiter.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let mut req = vec![OP_SET];
        put_bytes(&mut req, key.as_bytes());
        put_bytes(&mut req, value);
        let mut conn = self.lock()?;
        self.call(&mut conn, &req, Duration::ZERO)?;
        Ok(())
    }

    /// The value of `key`, waiting up to `timeout` for it to be set.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, CommError> {
        let mut req = vec![OP_GET];
        put_bytes(&mut req, key.as_bytes());
        req.extend_from_slice(&millis(timeout).to_le_bytes());
        let mut conn = self.lock()?;
        match self.call(&mut conn, &req, timeout)? {
            REPLY_OK => read_bytes(&mut *conn, MAX_VALUE).map_err(|e| self.io_error("get", e)),
            _ => Err(CommError::StoreTimeout {
                missing: vec![key.to_string()],
                timeout,
            }),
        }
    }

    /// Waits up to `timeout` until every key is set; the error lists the missing ones.
    pub fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), CommError> {
        let mut req = vec![OP_WAIT];
        req.extend_from_slice(&(keys.len() as u32).to_le_bytes());
        for key in keys {
            put_bytes(&mut req, key.as_bytes());
        }
        req.extend_from_slice(&millis(timeout).to_le_bytes());
        let mut conn = self.lock()?;
        match self.call(&mut conn, &req, timeout)? {
            REPLY_OK => Ok(()),
            _ => {
                let n = read_u32(&mut *conn).map_err(|e| self.io_error("wait", e))? as usize;
                if n > MAX_KEYS {
                    return Err(self.io_error(
                        "wait",
                        io::Error::new(io::ErrorKind::InvalidData, "too many keys"),
                    ));
                }
                let missing = (0..n)
                    .map(|_| read_str(&mut *conn))
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(|e| self.io_error("wait", e))?;
                Err(CommError::StoreTimeout { missing, timeout })
            }
        }
    }

    /// Sends `req` and returns the reply's status byte.
    fn call(&self, conn: &mut TcpStream, req: &[u8], wait: Duration) -> Result<u8, CommError> {
        conn.set_read_timeout(Some(wait + REPLY_SLACK))
            .and_then(|_| conn.write_all(req))
            .and_then(|_| {
                let mut status = [0u8; 1];
                conn.read_exact(&mut status).map(|_| status[0])
            })
            .map_err(|e| self.io_error("request", e))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, TcpStream>, CommError> {
        self.conn.lock().map_err(|_| CommError::Store {
            addr: self.addr.clone(),
            detail: "connection unusable after a panic in another thread".into(),
        })
    }

    fn io_error(&self, what: &str, e: io::Error) -> CommError {
        CommError::Store {
            addr: self.addr.clone(),
            detail: format!("{what}: {e}"),
        }
    }

    /// Closes the connection (used when aborting, to fail fast).
    pub fn close(&self) {
        if let Ok(conn) = self.conn.lock() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> JobSecret {
        JobSecret::new("test-job-secret")
    }

    fn server() -> StoreServer {
        StoreServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), secret()).unwrap()
    }

    fn client(port: u16, timeout: Duration) -> Result<StoreClient, CommError> {
        StoreClient::connect("127.0.0.1", port, timeout, &secret())
    }

    #[test]
    fn set_get_and_wait() {
        let s = server();
        let port = s.addr().port();
        let a = client(port, Duration::from_secs(5)).unwrap();
        let b = client(port, Duration::from_secs(5)).unwrap();
        a.set("x", b"hello").unwrap();
        assert_eq!(b.get("x", Duration::ZERO).unwrap(), b"hello");
        a.set("x", b"").unwrap();
        assert_eq!(b.get("x", Duration::ZERO).unwrap(), b"");
        let keys = vec!["x".to_string(), "y".to_string(), "z".to_string()];
        match b.wait(&keys, Duration::from_millis(50)) {
            Err(CommError::StoreTimeout { missing, .. }) => assert_eq!(missing, vec!["y", "z"]),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(matches!(
            b.get("y", Duration::from_millis(20)),
            Err(CommError::StoreTimeout { .. })
        ));
    }

    #[test]
    fn get_waits_for_a_later_set() {
        let s = server();
        let port = s.addr().port();
        let a = client(port, Duration::from_secs(5)).unwrap();
        let setter = thread::spawn(move || {
            let b = client(port, Duration::from_secs(5)).unwrap();
            thread::sleep(Duration::from_millis(50));
            b.set("late", b"v").unwrap();
        });
        assert_eq!(a.get("late", Duration::from_secs(30)).unwrap(), b"v");
        a.wait(&["late".to_string()], Duration::ZERO).unwrap();
        setter.join().unwrap();
    }

    #[test]
    fn a_foreign_service_fails_the_handshake_and_garbage_does_not_kill_the_server() {
        // A listener that accepts and closes, like a service speaking another protocol.
        let foreign = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = foreign.local_addr().unwrap().port();
        let t = thread::spawn(move || {
            let (c, _) = foreign.accept().unwrap();
            drop(c);
        });
        let err = client(port, Duration::from_secs(2))
            .err()
            .expect("handshake must fail");
        assert!(err.to_string().contains("handshake"), "{err}");
        t.join().unwrap();

        let s = server();
        let mut raw = TcpStream::connect(s.addr()).unwrap();
        raw.write_all(b"GRPOKV02\xff\xff\xff\xff").unwrap();
        let good = client(s.addr().port(), Duration::from_secs(2)).unwrap();
        good.set("k", b"v").unwrap();
        assert_eq!(good.get("k", Duration::ZERO).unwrap(), b"v");
    }

    #[test]
    fn connecting_to_nothing_times_out() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = client(port, Duration::from_millis(200))
            .err()
            .expect("nothing listens");
        assert!(matches!(err, CommError::Store { .. }), "{err}");
    }

    #[test]
    fn a_process_without_the_job_secret_cannot_read_or_write_keys() {
        let s = server();
        let port = s.addr().port();
        let good = client(port, Duration::from_secs(2)).unwrap();
        good.set("rank/0", b"addr").unwrap();
        for wrong in [JobSecret::none(), JobSecret::new("another-job")] {
            let err = StoreClient::connect("127.0.0.1", port, Duration::from_secs(2), &wrong)
                .err()
                .expect("a wrong secret must be refused");
            assert!(err.to_string().contains("job secret"), "{err}");
        }
        // A raw client that skips the MAC and sends a SET is cut off before the SET.
        let mut raw = TcpStream::connect(s.addr()).unwrap();
        raw.write_all(MAGIC).unwrap();
        let mut hello = [0u8; 8 + NONCE_LEN];
        raw.read_exact(&mut hello).unwrap();
        let mut forged = vec![0u8; NONCE_LEN + MAC_LEN];
        forged.push(OP_SET);
        put_bytes(&mut forged, b"rank/0");
        put_bytes(&mut forged, b"evil");
        let _ = raw.write_all(&forged);
        let mut rest = vec![];
        let _ = raw.read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "the server answered a forged client: {rest:?}"
        );
        assert_eq!(good.get("rank/0", Duration::ZERO).unwrap(), b"addr");

        // A server with another secret cannot pose as the store.
        let impostor =
            StoreServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), JobSecret::new("x")).unwrap();
        let err = client(impostor.addr().port(), Duration::from_secs(2))
            .err()
            .expect("the impostor must not be trusted");
        assert!(err.to_string().contains("job secret"), "{err}");
    }
}
