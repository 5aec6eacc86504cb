//! What travels on the ring's links besides tensor bytes: the per-collective header
//! that lets neighbours detect a mismatch, and the failure records posted to the
//! rendezvous store (`fail/{rank}` = "peer<TAB>terminal<TAB>message").

use std::io;
use std::time::Duration;

use super::super::comm::ReduceOp;
use super::super::error::CommError;

pub(super) const LINK_MAGIC: u32 = 0x4752_4c4b; // "GRLK"
pub(super) const HEADER_MAGIC: u32 = 0x4752_4844; // "GRHD"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Collective {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    Broadcast = 4,
    Barrier = 5,
}

/// What a rank announces to its successor at the start of each collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) seq: u64,
    pub(super) collective: u8,
    pub(super) dtype: u8,
    pub(super) op: u8,
    pub(super) root: u32,
    pub(super) len: u64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        b[4..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12] = self.collective;
        b[13] = self.dtype;
        b[14] = self.op;
        b[16..20].copy_from_slice(&self.root.to_le_bytes());
        b[20..28].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; 32]) -> Option<Header> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        (u32_at(0) == HEADER_MAGIC).then(|| Header {
            seq: u64_at(4),
            collective: b[12],
            dtype: b[13],
            op: b[14],
            root: u32_at(16),
            len: u64_at(20),
        })
    }

    pub(super) fn describe(&self) -> String {
        let name = match self.collective {
            1 => "all_reduce",
            2 => "reduce_scatter",
            3 => "all_gather",
            4 => "broadcast",
            5 => "barrier",
            _ => "an unknown collective",
        };
        let dtype = match self.dtype {
            1 => "f32",
            2 => "bf16",
            3 => "f16",
            4 => "i64",
            _ => "?",
        };
        let op = match self.op {
            1 => "sum, ",
            2 => "avg, ",
            3 => "max, ",
            _ => "",
        };
        let root = if self.collective == Collective::Broadcast as u8 {
            format!(", root {}", self.root)
        } else {
            String::new()
        };
        format!(
            "{name}({op}{dtype}, {} elements{root}) as collective #{}",
            self.len, self.seq
        )
    }
}

pub(super) fn op_code(op: Option<ReduceOp>) -> u8 {
    match op {
        None => 0,
        Some(ReduceOp::Sum) => 1,
        Some(ReduceOp::Avg) => 2,
        Some(ReduceOp::Max) => 3,
    }
}

/// Why a collective stopped.
pub(super) enum PassError {
    /// The link to `peer` failed (closed, reset or silent past the timeout).
    Link { peer: usize, detail: String },
    /// The predecessor announced a different collective.
    Mismatch {
        peer: usize,
        ours: String,
        theirs: String,
    },
    /// A local failure (should not happen; reported rather than panicking).
    Local(CommError),
    /// This thread stopped because the other thread of the pass failed first.
    Echo,
}

/// Describes a socket error as seen from this rank.
pub(super) fn link_error(peer: usize, dir: &str, timeout: Duration, e: io::Error) -> PassError {
    let detail = match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("no progress {dir} rank {peer} for {timeout:?} (stalled or hung)")
        }
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected => {
            format!("connection {dir} rank {peer} closed (process exited, crashed or aborted)")
        }
        _ => format!("link {dir} rank {peer} failed: {e}"),
    };
    PassError::Link { peer, detail }
}

/// A failure record: the rank blamed, whether the record is final (the cause is
/// known) or points further along the ring, and a message.
pub(super) fn record(peer: usize, terminal: bool, msg: &str) -> String {
    format!("{peer}\t{}\t{msg}", u8::from(terminal))
}

pub(super) fn parse_record(bytes: &[u8]) -> Option<(usize, bool, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '\t');
    let peer = parts.next()?.parse().ok()?;
    let terminal = parts.next()? == "1";
    Some((peer, terminal, parts.next()?.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::super::comm::Dtype;
    use super::*;

    #[test]
    fn header_round_trip_and_description() {
        let h = Header {
            seq: 7,
            collective: Collective::Broadcast as u8,
            dtype: Dtype::Bf16.code(),
            op: 0,
            root: 3,
            len: 1001,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        assert_eq!(
            h.describe(),
            "broadcast(bf16, 1001 elements, root 3) as collective #7"
        );
        let mut junk = h.encode();
        junk[0] ^= 1;
        assert_eq!(Header::decode(&junk), None);
    }

    #[test]
    fn failure_records_round_trip() {
        assert_eq!(
            parse_record(record(2, false, "a\tb").as_bytes()),
            Some((2, false, "a\tb".to_string()))
        );
        assert_eq!(parse_record(b"x\t0\ty"), None);
        assert_eq!(parse_record(b"\xff"), None);
    }
}
