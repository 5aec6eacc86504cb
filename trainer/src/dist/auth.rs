//! The job secret: how ranks prove to each other that they belong to the same job.
//!
//! Every rank of a job is started with the same secret (`GRPO_JOB_SECRET`, or a file
//! named by `GRPO_JOB_SECRET_FILE`; `scripts/launch` generates one for its children, a
//! Kubernetes job mounts one from a Secret). It never travels: connections prove
//! knowledge of it with HMAC-SHA256 over fresh nonces.
//!
//! - Store (rank 0's key-value server, [`super::store`]): a mutual challenge-response.
//!   The server sends a 32-byte nonce `ns`; the client answers with its own nonce `nc`
//!   and `HMAC(k, "grpo-store-client" | ns | nc)`; the server checks it (constant time)
//!   and answers `HMAC(k, "grpo-store-server" | ns | nc)`, which the client checks. A
//!   process without the secret can neither read nor write keys, nor pose as the store.
//! - Ring links ([`super::ring`]): each rank publishes a fresh nonce beside its ring
//!   address in the (authenticated) store; the predecessor's hello carries
//!   `HMAC(k, "grpo-ring-link" | rank | world | nonce of the acceptor)`, so only a job
//!   member can take the predecessor's place, and a recorded hello does not open a later
//!   ring (every ring build draws a new nonce).
//!
//! Without a secret the key is empty: the handshakes still run (one code path, and a
//! rank with a secret cannot talk to one without), but protect nothing; rank 0 warns.
//! Traffic is not encrypted: the secret authenticates who connects, it does not hide or
//! integrity-protect tensors on the wire (docs/security.md).

use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::CommError;

/// Bytes of a nonce and of a MAC.
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;

/// The secret shared by every rank of a job (empty: none configured).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JobSecret(Vec<u8>);

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("JobSecret(none)")
        } else {
            f.write_str("JobSecret(<redacted>)")
        }
    }
}

impl JobSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> JobSecret {
        JobSecret(bytes.into())
    }

    /// No secret: handshakes authenticate nothing.
    pub fn none() -> JobSecret {
        JobSecret(vec![])
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// `GRPO_JOB_SECRET` (the value) or `GRPO_JOB_SECRET_FILE` (a file holding it;
    /// surrounding whitespace is trimmed), as `get` returns them; both set is an error.
    pub fn from_vars(get: &impl Fn(&str) -> Option<String>) -> Result<JobSecret, CommError> {
        match (get("GRPO_JOB_SECRET"), get("GRPO_JOB_SECRET_FILE")) {
            (Some(_), Some(_)) => Err(CommError::Env {
                var: "GRPO_JOB_SECRET_FILE",
                detail: "is set together with GRPO_JOB_SECRET; set one".into(),
            }),
            (Some(v), None) => Ok(JobSecret::new(v.trim().as_bytes())),
            (None, Some(path)) => Self::from_file(Path::new(path.trim())),
            (None, None) => Ok(JobSecret::none()),
        }
    }

    /// Reads the secret from `path`; an empty or unreadable file is an error.
    pub fn from_file(path: &Path) -> Result<JobSecret, CommError> {
        let text = std::fs::read(path).map_err(|e| CommError::Env {
            var: "GRPO_JOB_SECRET_FILE",
            detail: format!("cannot read {}: {e}", path.display()),
        })?;
        let trimmed = text.trim_ascii();
        if trimmed.is_empty() {
            return Err(CommError::Env {
                var: "GRPO_JOB_SECRET_FILE",
                detail: format!("{} is empty", path.display()),
            });
        }
        Ok(JobSecret::new(trimmed))
    }

    /// `HMAC-SHA256(secret, label | parts...)` (RFC 2104).
    pub fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
        hmac_sha256(&self.0, label, parts)
    }

    /// Checks `tag` against the MAC of `label | parts` in constant time.
    pub fn verify(&self, tag: &[u8], label: &[u8], parts: &[&[u8]]) -> bool {
        ct_eq(&self.mac(label, parts), tag)
    }
}

/// A fresh random nonce from the operating system.
pub fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("random nonce: {e}")))?;
    Ok(n)
}

fn hmac_sha256(key: &[u8], label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.map(|x| x ^ b);
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    inner.update(label);
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Equality whose time depends only on the lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 (short key) and 6 (a key longer than the block).
        let t2 = hmac_sha256(b"Jefe", b"what do ya want ", &[b"for nothing?"]);
        assert_eq!(
            hex(&t2),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let key = [0xaau8; 131];
        let t6 = hmac_sha256(
            &key,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
            &[],
        );
        assert_eq!(
            hex(&t6),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn verify_and_secret_sources() {
        let s = JobSecret::new("k1");
        let tag = s.mac(b"l", &[b"a", b"b"]);
        assert!(s.verify(&tag, b"l", &[b"ab"]));
        assert!(!JobSecret::new("k2").verify(&tag, b"l", &[b"ab"]));
        assert!(!s.verify(&tag[..31], b"l", &[b"ab"]));
        assert!(!ct_eq(b"ab", b"ac"));

        let none = |_: &str| None;
        assert!(!JobSecret::from_vars(&none).unwrap().is_set());
        let env = |k: &str| (k == "GRPO_JOB_SECRET").then(|| " s3cret\n".to_string());
        assert_eq!(
            JobSecret::from_vars(&env).unwrap(),
            JobSecret::new("s3cret")
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "from-file\n").unwrap();
        let path = f.display().to_string();
        let file = |k: &str| (k == "GRPO_JOB_SECRET_FILE").then(|| path.clone());
        assert_eq!(
            JobSecret::from_vars(&file).unwrap(),
            JobSecret::new("from-file")
        );
        std::fs::write(&f, "  \n").unwrap();
        let e = JobSecret::from_vars(&file).unwrap_err().to_string();
        assert!(
            e.contains("GRPO_JOB_SECRET_FILE") && e.contains("empty"),
            "{e}"
        );
        let both = |_: &str| Some("x".to_string());
        assert!(JobSecret::from_vars(&both).is_err());
        assert_eq!(
            format!("{:?}", JobSecret::new("k")),
            "JobSecret(<redacted>)"
        );
    }
}
