//! Framing of the bulk weight data plane: a raw TCP stream beside gRPC that carries the
//! tensors of one update (the control path, `UpdateWeights` with its
//! `DataPlaneOffer` and `Commit`, stays on gRPC).
//!
//! One connection carries one update. All integers are little-endian.
//!
//! ```text
//! sender -> worker  hello   MAGIC (8 bytes) | token (32 bytes, from a DataPlaneOffer) |
//!                           u8 lane | u8 lanes (1..=MAX_LANES; lane < lanes)
//! worker -> sender  status  u8 0 = ok | u8 1, u32 len, UTF-8 message (then it closes)
//! sender -> worker  route   u32 hop_timeout_ms | u32 rejoin_ms | u32 hops |
//!                           per hop: u16 len, "host:port", token (32)
//! sender -> worker  piece   u16 name len (> 0) | name | u8 dtype (rollout.v1.Dtype) |
//!                           u8 ndim | ndim x i64 shape | u64 offset | u64 byte length |
//!                           the bytes `offset..offset + length` of the tensor
//!                   ...     every parameter's bytes exactly once: whole (offset 0, its
//!                           full length) or in disjoint pieces, in any order
//! sender -> worker  end     u16 0
//! worker -> sender  status  as above: the update was received in full (or why not)
//! ```
//!
//! The route lists the workers after this one: the worker forwards the route's tail and
//! every tensor, as its bytes arrive, to the route's first hop (a chain), writing with a
//! deadline of `hop_timeout_ms`. A hop that fails or misses the deadline is cut and the
//! worker reconnects to the hop after it with the same route minus the cut hop, sending
//! the update again from its start; so a worker whose incoming stream breaks keeps its
//! token for `rejoin_ms` (set by a forwarding worker; 0 from the trainer, which does not
//! reconnect) for the upstream to come back, and a newer connection presenting a token
//! whose update is still being received replaces the older one.
//!
//! Lanes: an update may come over `lanes` parallel connections that present the same
//! token, each with its own index and a share of the pieces (a tensor's pieces may be
//! spread over several lanes); the update is complete when every lane has sent its end
//! marker and every byte of every parameter arrived on one of them. Each lane answers its own end marker; the lane that
//! completes the update answers for all of it. A multi-lane update goes to one worker
//! (its route has no hops) and a lane that breaks fails the update (no rejoin).
use std::io::{self, Read, Write};

use crate::frame::{
    invalid, put_u32_prefixed, read_magic, read_u16, read_u32, read_u32_prefixed, read_u64,
    read_u8, read_vec,
};

/// Opens every connection: "RWDP", protocol version 4, three zero bytes.
pub const MAGIC: [u8; 8] = *b"RWDP\x04\0\0\0";
/// Most parallel connections (lanes) one update may use.
pub const MAX_LANES: u8 = 8;
/// Length of a data-plane token.
pub const TOKEN_BYTES: usize = 32;
/// Longest tensor name, route entry or status message accepted.
pub const MAX_NAME_BYTES: usize = 1024;
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;
/// Most dimensions of a tensor and most hops of a route.
pub const MAX_NDIM: usize = 8;
pub const MAX_HOPS: usize = 1024;

pub type Token = [u8; TOKEN_BYTES];

/// Socket buffer size the data plane asks for.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// The buffer size to set explicitly on data-plane sockets, if any: on Linux an explicit
/// SO_RCVBUF/SO_SNDBUF turns off the kernel's autotuning (which grows to `tcp_rmem`'s
/// maximum, often 6-32 MiB) and is capped at `net.core.[rw]mem_max`, so
/// [`SOCKET_BUFFER_BYTES`] is set only where both caps allow it; else autotuning stays.
pub fn explicit_buffer_bytes() -> Option<usize> {
    let read = |p: &str| -> Option<usize> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let caps = [
        read("/proc/sys/net/core/rmem_max")?,
        read("/proc/sys/net/core/wmem_max")?,
    ];
    caps.iter()
        .all(|&c| c >= SOCKET_BUFFER_BYTES)
        .then_some(SOCKET_BUFFER_BYTES)
}

/// One hop of a chain: the next worker's data-plane address and its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub addr: String,
    pub token: Token,
}

/// What the sender asks of the worker besides storing the tensors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// Write deadline per hop, and the longest silence a forwarded receiver accepts.
    pub hop_timeout_ms: u32,
    /// How long the receiver keeps its token after its stream broke, for the upstream
    /// to reconnect around a cut hop (0: the failure is final at once).
    pub rejoin_ms: u32,
    pub hops: Vec<Hop>,
}

/// The header that precedes a piece of one tensor's bytes (the whole tensor when
/// `offset` is 0 and `num_bytes` its full length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorHeader {
    pub name: String,
    /// A `rollout.v1.Dtype` value.
    pub dtype: u8,
    /// The whole tensor's shape.
    pub shape: Vec<i64>,
    /// Where in the tensor's bytes this piece starts.
    pub offset: u64,
    /// The piece's length.
    pub num_bytes: u64,
}

/// The byte length of a whole tensor of `shape` with `elt` bytes per element; `None`
/// for a negative dimension or one that overflows.
pub fn tensor_bytes(shape: &[i64], elt: u64) -> Option<u64> {
    shape
        .iter()
        .try_fold(elt, |n, &d| n.checked_mul(u64::try_from(d).ok()?))
}

fn bad(message: String) -> io::Error {
    invalid(message)
}

fn read_string(r: &mut impl Read, len: usize, what: &str) -> io::Result<String> {
    let b = read_vec(r, len, MAX_NAME_BYTES, what)?;
    String::from_utf8(b).map_err(|_| bad(format!("{what} is not UTF-8")))
}

/// Which of an update's parallel connections this one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    pub index: u8,
    pub count: u8,
}

impl Lane {
    /// The only connection of its update.
    pub const SOLE: Lane = Lane { index: 0, count: 1 };
}

pub fn write_hello(w: &mut impl Write, token: &Token, lane: Lane) -> io::Result<()> {
    let mut b = [0u8; 8 + TOKEN_BYTES + 2];
    b[..8].copy_from_slice(&MAGIC);
    b[8..8 + TOKEN_BYTES].copy_from_slice(token);
    b[8 + TOKEN_BYTES] = lane.index;
    b[9 + TOKEN_BYTES] = lane.count;
    w.write_all(&b)
}

/// The token and lane of a hello; errors if the magic is wrong or the lane impossible.
pub fn read_hello(r: &mut impl Read) -> io::Result<(Token, Lane)> {
    if !read_magic(r, &MAGIC)? {
        return Err(bad(
            "not a weight data-plane hello (wrong magic or protocol version)".into(),
        ));
    }
    let mut t = [0u8; TOKEN_BYTES];
    r.read_exact(&mut t)?;
    let lane = Lane {
        index: read_u8(r)?,
        count: read_u8(r)?,
    };
    if lane.count == 0 || lane.count > MAX_LANES || lane.index >= lane.count {
        return Err(bad(format!(
            "lane {} of {} (lanes: 1 to {MAX_LANES}, the index below the count)",
            lane.index, lane.count
        )));
    }
    Ok((t, lane))
}

/// `Ok(())` or the error message the peer reports.
pub fn write_status(w: &mut impl Write, status: Result<(), &str>) -> io::Result<()> {
    match status {
        Ok(()) => w.write_all(&[0]),
        Err(m) => {
            let m = &m.as_bytes()[..m.len().min(MAX_MESSAGE_BYTES)];
            let mut b = Vec::with_capacity(5 + m.len());
            b.push(1);
            put_u32_prefixed(&mut b, m);
            w.write_all(&b)
        }
    }
}

/// The peer's status: `Ok(Ok(()))`, `Ok(Err(message))`, or an I/O error reading it.
pub fn read_status(r: &mut impl Read) -> io::Result<Result<(), String>> {
    match read_u8(r)? {
        0 => Ok(Ok(())),
        1 => {
            let b = read_u32_prefixed(r, MAX_MESSAGE_BYTES, "status message")?;
            Ok(Err(String::from_utf8_lossy(&b).into_owned()))
        }
        other => Err(bad(format!("status byte {other} (expected 0 or 1)"))),
    }
}

pub fn write_route(w: &mut impl Write, route: &Route) -> io::Result<()> {
    let mut b = Vec::with_capacity(8 + route.hops.len() * 64);
    b.extend_from_slice(&route.hop_timeout_ms.to_le_bytes());
    b.extend_from_slice(&route.rejoin_ms.to_le_bytes());
    b.extend_from_slice(&(route.hops.len() as u32).to_le_bytes());
    for h in &route.hops {
        b.extend_from_slice(&(h.addr.len() as u16).to_le_bytes());
        b.extend_from_slice(h.addr.as_bytes());
        b.extend_from_slice(&h.token);
    }
    w.write_all(&b)
}

pub fn read_route(r: &mut impl Read) -> io::Result<Route> {
    let hop_timeout_ms = read_u32(r)?;
    let rejoin_ms = read_u32(r)?;
    let n = read_u32(r)? as usize;
    if n > MAX_HOPS {
        return Err(bad(format!("route of {n} hops (at most {MAX_HOPS})")));
    }
    let mut hops = Vec::with_capacity(n);
    for _ in 0..n {
        let len = read_u16(r)? as usize;
        let addr = read_string(r, len, "hop address")?;
        let mut token = [0u8; TOKEN_BYTES];
        r.read_exact(&mut token)?;
        hops.push(Hop { addr, token });
    }
    Ok(Route {
        hop_timeout_ms,
        rejoin_ms,
        hops,
    })
}

/// The encoded header (written, then the bytes follow).
pub fn encode_header(h: &TensorHeader) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + h.name.len() + 8 * h.shape.len());
    b.extend_from_slice(&(h.name.len() as u16).to_le_bytes());
    b.extend_from_slice(h.name.as_bytes());
    b.push(h.dtype);
    b.push(h.shape.len() as u8);
    for d in &h.shape {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&h.offset.to_le_bytes());
    b.extend_from_slice(&h.num_bytes.to_le_bytes());
    b
}

/// The end-of-update marker.
pub const END: [u8; 2] = [0, 0];

/// The next header, or `None` at the end marker.
pub fn read_header(r: &mut impl Read) -> io::Result<Option<TensorHeader>> {
    let len = read_u16(r)? as usize;
    if len == 0 {
        return Ok(None);
    }
    let name = read_string(r, len, "tensor name")?;
    let dtype = read_u8(r)?;
    let ndim = read_u8(r)? as usize;
    if ndim > MAX_NDIM {
        return Err(bad(format!(
            "tensor {name}: {ndim} dimensions (at most {MAX_NDIM})"
        )));
    }
    let mut shape = Vec::with_capacity(ndim);
    for _ in 0..ndim {
        shape.push(read_u64(r)? as i64);
    }
    let offset = read_u64(r)?;
    let num_bytes = read_u64(r)?;
    if offset.checked_add(num_bytes).is_none() {
        return Err(bad(format!(
            "tensor {name}: a piece of {num_bytes} bytes at offset {offset} overflows"
        )));
    }
    Ok(Some(TensorHeader {
        name,
        dtype,
        shape,
        offset,
        num_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut b = vec![];
        let token = [7u8; TOKEN_BYTES];
        write_hello(&mut b, &token, Lane { index: 1, count: 3 }).unwrap();
        let route = Route {
            hop_timeout_ms: 1500,
            rejoin_ms: 700,
            hops: vec![Hop {
                addr: "127.0.0.1:9".into(),
                token: [3u8; TOKEN_BYTES],
            }],
        };
        write_route(&mut b, &route).unwrap();
        let h = TensorHeader {
            name: "model.norm.weight".into(),
            dtype: 2,
            shape: vec![4, -1],
            offset: 8,
            num_bytes: 16,
        };
        b.extend(encode_header(&h));
        b.extend(END);
        write_status(&mut b, Err("no")).unwrap();
        let mut r = &b[..];
        assert_eq!(
            read_hello(&mut r).unwrap(),
            (token, Lane { index: 1, count: 3 })
        );
        assert_eq!(read_route(&mut r).unwrap(), route);
        assert_eq!(read_header(&mut r).unwrap(), Some(h.clone()));
        assert_eq!(read_header(&mut r).unwrap(), None);
        assert_eq!(read_status(&mut r).unwrap(), Err("no".to_string()));
        assert!(r.is_empty());
        let mut over = h.clone();
        over.offset = u64::MAX;
        let e = read_header(&mut &encode_header(&over)[..]).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        assert_eq!(tensor_bytes(&[3, 4], 2), Some(24));
        assert_eq!(tensor_bytes(&[], 4), Some(4));
        assert_eq!(tensor_bytes(&[3, -1], 2), None);
        assert_eq!(tensor_bytes(&[i64::MAX, 4], 2), None);
        let e = read_hello(&mut &[0u8; 42][..]).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        for (index, count) in [(0, 0), (2, 2), (0, MAX_LANES + 1)] {
            let mut b = vec![];
            write_hello(&mut b, &token, Lane { index, count }).unwrap();
            let e = read_hello(&mut &b[..]).unwrap_err();
            assert!(
                e.to_string().contains(&format!("lane {index} of {count}")),
                "{e}"
            );
        }
    }
}
