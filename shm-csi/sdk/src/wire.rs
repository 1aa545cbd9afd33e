//! The descriptor and its 16-byte wire form.

use std::io::{self, Read, Write};

/// A buffer in the pool as it crosses a socket: where, how long, which
/// incarnation of the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// Offset of the payload from the start of the pool file.
    pub offset: u64,
    pub len: u32,
    pub generation: u32,
}

impl Descriptor {
    pub const WIRE_SIZE: usize = 16;

    /// Little-endian `offset, len, generation`.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    pub fn from_bytes(b: [u8; 16]) -> Self {
        Self {
            offset: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            generation: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// Writes one descriptor (16 bytes) to a blocking stream.
pub fn send(w: &mut impl Write, d: Descriptor) -> io::Result<()> {
    w.write_all(&d.to_bytes())
}

/// Blocks until one descriptor arrives; `None` on a clean end of stream.
///
/// A socket in spright's sockmap can return EAGAIN from a blocking `recv`
/// (a wake-up that brought no data); that is retried, as the kernel's plain
/// TCP path would have waited again. Each retry blocks again: no polling.
pub fn recv(r: &mut impl Read) -> io::Result<Option<Descriptor>> {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(Descriptor::from_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let d = Descriptor {
            offset: 0x0102_0304_0506_0708,
            len: 77,
            generation: 9,
        };
        assert_eq!(Descriptor::from_bytes(d.to_bytes()), d);
        let mut v = Vec::new();
        send(&mut v, d).unwrap();
        send(&mut v, d).unwrap();
        let mut r = &v[..];
        assert_eq!(recv(&mut r).unwrap(), Some(d));
        assert_eq!(recv(&mut r).unwrap(), Some(d));
        assert_eq!(recv(&mut r).unwrap(), None);
        let mut short = &v[..5];
        assert!(recv(&mut short).is_err());
    }
}
