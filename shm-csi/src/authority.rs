//! Any valid `:authority`, including a unix socket's path.
//!
//! gRPC clients disagree on the `:authority` of a call over a unix socket:
//! kubelet and grpc-go send `localhost`, Python's grpcio (C-core since 1.57)
//! sends the percent-encoded socket path, grpc-java the path itself. The
//! HTTP/2 server under tonic (h2 0.4, `server.rs`, `convert_poll_message`)
//! parses `:authority` as a URI authority and answers a request whose value
//! is not one with RST_STREAM PROTOCOL_ERROR, before tonic or this driver
//! sees it; h2 has no setting to relax that (hyperium/h2#487 is still open).
//!
//! So every accepted connection goes through a small relay in front of
//! tonic: frames from the client are copied as they are, except header
//! blocks with an `:authority` that does not parse, whose value becomes
//! `localhost` (cut to the original's length: an HPACK dynamic-table entry
//! must never grow, or the server's table would evict entries the client
//! still refers to). Everything else, and the server's direction, passes
//! byte for byte. A block the relay cannot parse is passed unchanged, so h2
//! answers it as it always did.

use std::{collections::HashMap, sync::OnceLock};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may have: rewritten header
/// blocks are cut into frames of at most this.
const FRAME: usize = 16_384;
/// Header blocks larger than this are not collected (h2 refuses them anyway).
const MAX_BLOCK: usize = 1 << 20;
/// The replacement for an `:authority` that is not one.
const LOCALHOST: &[u8] = b"localhost";

/// Why a header block could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("header block has an integer that overflows")]
    Overflow,
    #[error("header block has an invalid Huffman string")]
    Huffman,
}

/// Relays one accepted connection to the returned stream, which tonic
/// serves; the relay runs on the current tokio runtime until either side
/// closes.
pub fn front<S>(client: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(ours);
        let up = async {
            let r = client_to_server(&mut cr, &mut sw).await;
            let _ = sw.shutdown().await;
            r
        };
        let down = async {
            let r = tokio::io::copy(&mut sr, &mut cw).await;
            let _ = cw.shutdown().await;
            r
        };
        let (up, down) = tokio::join!(up, down);
        if let Err(e) = up.and(down.map(drop)) {
            tracing::debug!(error = %e, "CSI connection ended");
        }
    });
    theirs
}

/// Reads exactly `buf.len()` bytes; `false` on a clean end of stream before
/// the first byte.
async fn read_all(r: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> std::io::Result<bool> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

async fn client_to_server(
    r: &mut (impl AsyncRead + Unpin),
    w: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    if !read_all(r, &mut preface).await? {
        return Ok(());
    }
    w.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: h2 will refuse it; stay out of the way.
        tokio::io::copy(r, w).await?;
        return Ok(());
    }
    let mut pending: Option<([u8; 9], Vec<u8>)> = None;
    loop {
        let (head, payload) = match pending.take() {
            Some(f) => f,
            None => match read_frame(r).await? {
                Some(f) => f,
                None => return Ok(()),
            },
        };
        if head[3] != HEADERS {
            w.write_all(&head).await?;
            w.write_all(&payload).await?;
            continue;
        }
        // Collect the header block: HEADERS, then CONTINUATION frames.
        let Ok((priority, mut block)) = headers_fragment(head[4], &payload) else {
            w.write_all(&head).await?;
            w.write_all(&payload).await?;
            continue;
        };
        let mut end = head[4] & END_HEADERS != 0;
        let mut frames = vec![(head, payload)];
        while !end && block.len() <= MAX_BLOCK {
            let Some(next) = read_frame(r).await? else {
                break;
            };
            if next.0[3] != CONTINUATION {
                pending = Some(next);
                break;
            }
            end = next.0[4] & END_HEADERS != 0;
            block.extend_from_slice(&next.1);
            frames.push(next);
        }
        match rewrite_block(&block) {
            Ok(Some(new)) if end => {
                write_headers(w, &head, &priority, &new).await?;
            }
            _ => {
                for (h, p) in frames {
                    w.write_all(&h).await?;
                    w.write_all(&p).await?;
                }
            }
        }
    }
}

async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<([u8; 9], Vec<u8>)>> {
    let mut head = [0u8; 9];
    if !read_all(r, &mut head).await? {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head, payload)))
}

/// The priority fields and the header block fragment of a HEADERS payload
/// (padding removed).
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p.split_first().ok_or(HpackError::Truncated)?;
        pad = usize::from(n);
        p = rest;
    }
    p = p
        .get(..p.len().checked_sub(pad).ok_or(HpackError::Truncated)?)
        .ok_or(HpackError::Truncated)?;
    let prio = if flags & PRIORITY != 0 { 5 } else { 0 };
    let priority = p.get(..prio).ok_or(HpackError::Truncated)?.to_vec();
    Ok((priority, p[prio..].to_vec()))
}

/// Writes `block` as a HEADERS frame like `head` (same stream, END_STREAM
/// and PRIORITY as they were, no padding), in CONTINUATION frames when it
/// does not fit in one.
async fn write_headers(
    w: &mut (impl AsyncWrite + Unpin),
    head: &[u8; 9],
    priority: &[u8],
    block: &[u8],
) -> std::io::Result<()> {
    let stream = &head[5..9];
    let first_len = block.len().min(FRAME - priority.len());
    let mut flags = head[4] & !(PADDED | END_HEADERS);
    if first_len == block.len() {
        flags |= END_HEADERS;
    }
    let mut frame = frame_head(priority.len() + first_len, HEADERS, flags, stream);
    frame.extend_from_slice(priority);
    frame.extend_from_slice(&block[..first_len]);
    let mut rest = &block[first_len..];
    while !rest.is_empty() {
        let n = rest.len().min(FRAME);
        let flags = if n == rest.len() { END_HEADERS } else { 0 };
        frame.extend_from_slice(&frame_head(n, CONTINUATION, flags, stream));
        frame.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    w.write_all(&frame).await
}

/// A 9-byte frame header.
pub fn frame_head(len: usize, kind: u8, flags: u8, stream: &[u8]) -> Vec<u8> {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    let mut h = vec![len[1], len[2], len[3], kind, flags];
    h.extend_from_slice(stream);
    h
}

/// `block` with every `:authority` literal that is not a valid authority
/// replaced by `localhost` (cut to the original's length); `None` when
/// nothing needed replacing. Indexed fields are left alone: they refer to
/// table entries this relay already rewrote when the client added them.
pub fn rewrite_block(block: &[u8]) -> Result<Option<Vec<u8>>, HpackError> {
    let mut out = Vec::with_capacity(block.len());
    let mut changed = false;
    let mut i = 0;
    while let Some(&b) = block.get(i) {
        let start = i;
        if b & 0x80 != 0 {
            // Indexed field.
            i = integer(block, i, 7)?.1;
            out.extend_from_slice(&block[start..i]);
            continue;
        }
        if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            i = integer(block, i, 5)?.1;
            out.extend_from_slice(&block[start..i]);
            continue;
        }
        // A literal: with incremental indexing (01), without or never
        // indexed (0000, 0001).
        let prefix = if b & 0xc0 == 0x40 { 6 } else { 4 };
        let (index, next) = integer(block, i, prefix)?;
        i = next;
        let is_authority = if index == 0 {
            let (name, next) = string(block, i)?;
            i = next;
            name == b":authority"
        } else {
            // Static table entry 1 is `:authority`; an encoder names it by
            // the static index, never by a dynamic entry's name.
            index == 1
        };
        let name_end = i;
        let (value, next) = string(block, i)?;
        i = next;
        let valid = tonic::codegen::http::uri::Authority::try_from(value.as_slice()).is_ok();
        if is_authority && !valid && !value.is_empty() {
            out.extend_from_slice(&block[start..name_end]);
            let new = &LOCALHOST[..value.len().min(LOCALHOST.len())];
            put_integer(&mut out, 0, 7, new.len());
            out.extend_from_slice(new);
            changed = true;
        } else {
            out.extend_from_slice(&block[start..i]);
        }
    }
    Ok(changed.then_some(out))
}

/// An HPACK integer with an `n`-bit prefix at `block[i]` (RFC 7541 §5.1):
/// its value and the index after it.
fn integer(block: &[u8], i: usize, n: u8) -> Result<(usize, usize), HpackError> {
    let mask = u8::MAX >> (8 - n);
    let first = block.get(i).ok_or(HpackError::Truncated)? & mask;
    if first < mask {
        return Ok((usize::from(first), i + 1));
    }
    let mut v = usize::from(mask);
    let mut j = i + 1;
    for shift in (0..=28).step_by(7) {
        let b = *block.get(j).ok_or(HpackError::Truncated)?;
        j += 1;
        v = v
            .checked_add(usize::from(b & 0x7f) << shift)
            .ok_or(HpackError::Overflow)?;
        if b & 0x80 == 0 {
            return Ok((v, j));
        }
    }
    Err(HpackError::Overflow)
}

/// Appends `v` as an HPACK integer with an `n`-bit prefix, the prefix byte's
/// other bits being `high`.
pub fn put_integer(out: &mut Vec<u8>, high: u8, n: u8, v: usize) {
    let mask = u8::MAX >> (8 - n);
    if v < usize::from(mask) {
        out.push(high | u8::try_from(v).unwrap_or(mask));
        return;
    }
    out.push(high | mask);
    let mut rest = v - usize::from(mask);
    while rest >= 0x80 {
        out.push(0x80 | low_byte(rest as u64 & 0x7f));
        rest >>= 7;
    }
    out.push(low_byte(rest as u64));
}

/// The low 8 bits of `v` (callers mask or shift first).
fn low_byte(v: u64) -> u8 {
    v.to_le_bytes()[0]
}

/// An HPACK string literal at `block[i]` (RFC 7541 §5.2), decoded, and the
/// index after it.
fn string(block: &[u8], i: usize) -> Result<(Vec<u8>, usize), HpackError> {
    let huffman = block.get(i).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let (len, start) = integer(block, i, 7)?;
    let end = start.checked_add(len).ok_or(HpackError::Overflow)?;
    let raw = block.get(start..end).ok_or(HpackError::Truncated)?;
    let v = if huffman {
        huffman_decode(raw)?
    } else {
        raw.to_vec()
    };
    Ok((v, end))
}

fn decode_table() -> &'static HashMap<(u8, u32), u8> {
    static TABLE: OnceLock<HashMap<(u8, u32), u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=255u8)
            .map(|s| ((CODE_LENGTHS[usize::from(s)], CODES[usize::from(s)]), s))
            .collect()
    })
}

/// Decodes an HPACK Huffman string (RFC 7541 §5.2, Appendix B).
pub fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let table = decode_table();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0u8);
    for byte in src {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if let Some(&s) = table.get(&(len, code)) {
                out.push(s);
                (code, len) = (0, 0);
            } else if len >= 30 {
                // The longest code is 30 bits; only EOS is left, and it must
                // not appear in a string.
                return Err(HpackError::Huffman);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

/// Encodes `src` as an HPACK Huffman string (for clients and tests).
pub fn huffman_encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &s in src {
        let n = u32::from(CODE_LENGTHS[usize::from(s)]);
        acc = (acc << n) | u64::from(CODES[usize::from(s)]);
        bits += n;
        while bits >= 8 {
            bits -= 8;
            out.push(low_byte(acc >> bits));
        }
        acc &= (1u64 << bits) - 1;
    }
    if bits > 0 {
        out.push(low_byte((acc << (8 - bits)) | ((1u64 << (8 - bits)) - 1)));
    }
    out
}

// The canonical Huffman code of RFC 7541 Appendix B (symbols 0-255; EOS is
// never decoded), as h2 0.4.20 generates it (src/hpack/huffman/table.rs, MIT).
#[expect(
    clippy::unreadable_literal,
    reason = "copied verbatim from h2's generated table, easier to compare as it is"
)]
const CODES: [u32; 256] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8,
    0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed,
    0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4,
    0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8,
    0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb,
    0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0,
    0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
    0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe,
    0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4,
    0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb,
    0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda,
    0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd,
    0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0,
    0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7,
    0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf,
    0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7,
    0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4,
    0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb,
    0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb,
    0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
];

const CODE_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huffman_matches_rfc_7541_examples() {
        // RFC 7541 C.4.1: "www.example.com".
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(huffman_encode(b"www.example.com"), www);
        assert_eq!(huffman_decode(&www).unwrap(), b"www.example.com");
        let path = b"%2Fvar%2Flib%2Fkubelet%2Fplugins%2Fshm.spright.dev%2Fcsi.sock";
        assert_eq!(huffman_decode(&huffman_encode(path)).unwrap(), path);
        assert_eq!(
            huffman_decode(&[0x00]),
            Err(HpackError::Huffman),
            "bad padding"
        );
    }

    #[test]
    fn integers_round_trip() {
        for v in [0, 5, 30, 31, 127, 128, 1337, 1 << 20] {
            let mut b = Vec::new();
            put_integer(&mut b, 0x40, 5, v);
            assert_eq!(integer(&b, 0, 5).unwrap(), (v, b.len()), "{v}");
        }
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut b = Vec::new();
        put_integer(&mut b, 0, 5, 1337);
        assert_eq!(b, [31, 154, 10]);
    }

    fn literal(high: u8, n: u8, index: usize, value: &[u8], huffman: bool) -> Vec<u8> {
        let mut b = Vec::new();
        put_integer(&mut b, high, n, index);
        let v = if huffman {
            huffman_encode(value)
        } else {
            value.to_vec()
        };
        put_integer(&mut b, if huffman { 0x80 } else { 0 }, 7, v.len());
        b.extend_from_slice(&v);
        b
    }

    #[test]
    fn only_invalid_authorities_are_replaced() {
        // :method POST (indexed), :authority as a literal with indexing.
        let valid = [vec![0x83], literal(0x40, 6, 1, b"localhost", true)].concat();
        assert_eq!(rewrite_block(&valid).unwrap(), None);
        for (value, huffman) in [
            (&b"/run/csi/csi.sock"[..], false),
            (b"%2Frun%2Fcsi%2Fcsi.sock", true),
        ] {
            for (high, n) in [(0x40, 6), (0x00, 4), (0x10, 4)] {
                let block = [
                    vec![0x83],
                    literal(high, n, 1, value, huffman),
                    literal(0x00, 4, 4, b"/csi.v1.Identity/Probe", false),
                ]
                .concat();
                let want = [
                    vec![0x83, high | 1, 9],
                    b"localhost".to_vec(),
                    literal(0x00, 4, 4, b"/csi.v1.Identity/Probe", false),
                ]
                .concat();
                assert_eq!(rewrite_block(&block).unwrap(), Some(want), "{value:?}");
            }
        }
        // A literal name, and a value shorter than `localhost`.
        let mut block = vec![0x40];
        put_integer(&mut block, 0, 7, 10);
        block.extend_from_slice(b":authority");
        put_integer(&mut block, 0, 7, 3);
        block.extend_from_slice(b"/a/");
        let mut want = block[..12].to_vec();
        want.extend_from_slice(&[3, b'l', b'o', b'c']);
        assert_eq!(rewrite_block(&block).unwrap(), Some(want));
        assert_eq!(
            rewrite_block(&[0x41, 0x05, b'a']),
            Err(HpackError::Truncated)
        );
    }
}
