//! Answering an HTTP/1.1 request the way a chain function must: Nagle's
//! algorithm off on the socket and every response in one write.
//!
//! A response written in pieces (status line, headers, body) on a socket
//! with Nagle on makes the kernel hold the last small piece until the
//! client acknowledges the first; a client that delays its ACK (40 ms on
//! Linux) then stalls every request by that much. [`ResponseWriter`] makes
//! the right thing the default: its constructor turns Nagle off, and
//! [`ResponseWriter::respond`] assembles a small response in one buffer and
//! hands it to the kernel in one `write`; a large body goes out with the
//! head in one `writev`, without being copied.

use std::{
    io::{self, IoSlice, Write},
    net::TcpStream,
};

/// Bodies up to this size are copied next to the head and written with it
/// in one `write`; larger ones go out in one `writev` of head and body.
pub const COPY_LIMIT: usize = 16 * 1024;

/// Writes complete HTTP/1.1 responses, each in one write.
pub struct ResponseWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl ResponseWriter<TcpStream> {
    /// Takes a connection (or a `try_clone` of it) and turns Nagle's
    /// algorithm off on its socket.
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Self::over(stream))
    }
}

impl<W: Write> ResponseWriter<W> {
    /// Wraps any writer as it is (for sockets, use [`ResponseWriter::new`]).
    pub fn over(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(256),
        }
    }

    /// Sends one response: `status` and `reason`, a `content-length`
    /// header and `body`, in one write (one `writev` above [`COPY_LIMIT`]).
    pub fn respond(&mut self, status: u16, reason: &str, body: &[u8]) -> io::Result<()> {
        self.buf.clear();
        write!(
            self.buf,
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )?;
        if body.len() <= COPY_LIMIT {
            self.buf.extend_from_slice(body);
            return self.inner.write_all(&self.buf);
        }
        let head_len = self.buf.len();
        let mut bufs = [IoSlice::new(&self.buf), IoSlice::new(body)];
        let mut slices = &mut bufs[..];
        let mut left = head_len + body.len();
        while left > 0 {
            match self.inner.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left -= n;
                    IoSlice::advance_slices(&mut slices, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The wrapped writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every call the writer makes.
    #[derive(Default)]
    struct Calls {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            self.bytes.extend_from_slice(b);
            Ok(b.len())
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.writes += 1;
            let mut n = 0;
            for b in bufs {
                self.bytes.extend_from_slice(b);
                n += b.len();
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn small_and_large_responses_are_one_write_each() {
        let mut w = ResponseWriter::over(Calls::default());
        w.respond(200, "OK", b"hello").unwrap();
        assert_eq!(w.get_mut().writes, 1);
        assert_eq!(
            w.get_mut().bytes,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        );
        let big = vec![7u8; 1 << 20];
        w.get_mut().bytes.clear();
        w.respond(200, "OK", &big).unwrap();
        assert_eq!(w.get_mut().writes, 2, "one more write for the large one");
        assert!(w.get_mut().bytes.ends_with(&big));
        assert!(
            w.get_mut()
                .bytes
                .starts_with(b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n")
        );
    }
}
