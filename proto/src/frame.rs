//! Little-endian framing shared by the project's raw TCP protocols: the weight data
//! plane ([`crate::data_plane`]) and the trainer ranks' rendezvous store
//! (`trainer::dist::store`). Both open with an 8-byte magic, then exchange integers
//! and length-prefixed byte strings; these are the readers and writers they share.
use std::io::{self, Read};

/// An `InvalidData` error carrying `message`.
pub fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

pub fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}

pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// `len` bytes, refused (before allocating) when `len > max`; `what` names the field.
pub fn read_vec(r: &mut impl Read, len: usize, max: usize, what: &str) -> io::Result<Vec<u8>> {
    if len > max {
        return Err(invalid(format!("{what} of {len} bytes (at most {max})")));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// A `u32`-length-prefixed byte string of at most `max` bytes.
pub fn read_u32_prefixed(r: &mut impl Read, max: usize, what: &str) -> io::Result<Vec<u8>> {
    let len = read_u32(r)? as usize;
    read_vec(r, len, max, what)
}

/// Appends `bytes` with its `u32` length in front (what [`read_u32_prefixed`] reads).
pub fn put_u32_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Reads `magic.len()` bytes and tells whether they are `magic`.
pub fn read_magic(r: &mut impl Read, magic: &[u8]) -> io::Result<bool> {
    let mut b = vec![0u8; magic.len()];
    r.read_exact(&mut b)?;
    Ok(b == magic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_prefixed_bytes_round_trip_and_bounds_hold() {
        let mut b = vec![7u8];
        b.extend(300u16.to_le_bytes());
        b.extend(70_000u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        put_u32_prefixed(&mut b, b"key");
        put_u32_prefixed(&mut b, b"too long");
        b.extend(b"MAGICxyz");
        let mut r = &b[..];
        assert_eq!(read_u8(&mut r).unwrap(), 7);
        assert_eq!(read_u16(&mut r).unwrap(), 300);
        assert_eq!(read_u32(&mut r).unwrap(), 70_000);
        assert_eq!(read_u64(&mut r).unwrap(), u64::MAX);
        assert_eq!(read_u32_prefixed(&mut r, 3, "key").unwrap(), b"key");
        let e = read_u32_prefixed(&mut r, 3, "key").unwrap_err();
        assert_eq!(e.to_string(), "key of 8 bytes (at most 3)");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut r = &b[b.len() - 8..];
        assert!(read_magic(&mut r, b"MAGICxyz").unwrap());
        assert!(!read_magic(&mut &b"MAGICxyY"[..], b"MAGICxyz").unwrap());
        assert!(
            read_u32(&mut &[1u8, 2][..]).is_err(),
            "short input is an error"
        );
    }
}
