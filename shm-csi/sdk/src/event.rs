//! The event-driven function runtime: one thread per function, asleep in
//! `epoll` until descriptors (or HTTP requests) arrive, then each one run to
//! completion, as SPRIGHT's functions are.
//!
//! A function author writes only what happens to one payload:
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! let pool = spright_shm::Pool::open("/var/run/spright-shm".as_ref()).unwrap();
//! let listener = std::net::TcpListener::bind("0.0.0.0:8080")?;
//! spright_shm::event::stage(&pool, listener, Some("10.0.0.7:8080"), |mut buf| {
//!     buf.make_ascii_uppercase();
//!     buf
//! })
//! # }
//! ```
//!
//! # How a request travels
//!
//! Between two functions there is one TCP connection (spright redirects it
//! socket to socket) that carries 16-byte descriptors in both directions,
//! pipelined: a function sends every descriptor it has ready in one write,
//! and its peer answers them in the order they came. A stage runs its
//! function on each descriptor, forwards the result to the next stage (if
//! any) and returns, in order, what the next stage returns. The
//! [`gateway`] is the chain's HTTP front: it reads each request body
//! straight into the pool, sends its descriptor into the chain and writes
//! what comes back as the response, in one write with Nagle off.
//!
//! # Batching
//!
//! Every wake-up handles all ready sockets, runs the function on every
//! complete descriptor, and only then writes: all the descriptors for the
//! next function leave in one write, so under load one wake-up (and one
//! context switch) carries many requests. An idle function uses no CPU.
//!
//! # Failures
//!
//! A peer that sends a descriptor the pool refuses (stale, out of range) has
//! its connection closed. When the next stage's connection fails, every
//! request waiting on it fails: a stage closes the connections that sent
//! them (their senders see the chain end), the gateway answers each with
//! `502 Bad Gateway`. The next request connects again. A function that can
//! fail (the C and Python SDKs' callbacks) runs under [`try_stage`]: its
//! failure frees its payload and ends the loop.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, Read, Write},
    net::{SocketAddr, TcpStream as StdStream, ToSocketAddrs},
};

use mio::{
    Events, Interest, Poll, Token,
    net::{TcpListener, TcpStream},
};

use crate::{Buf, COPY_LIMIT, Descriptor, Pool};

const LISTENER: Token = Token(0);
const NEXT: Token = Token(1);
/// Tokens of accepted connections start here (slot index + FIRST).
const FIRST: usize = 2;
/// The largest request head (request line and headers) the gateway reads.
pub const MAX_HEAD: usize = 16 * 1024;
/// Bytes read from a socket per `read` call while draining it.
const READ_CHUNK: usize = 64 * 1024;

/// One piece of pending output: bytes of our own, or a response body still
/// in the pool (sent from there, never copied).
enum Chunk<'p> {
    Bytes(Vec<u8>),
    Shm(Buf<'p>),
}

impl Chunk<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Bytes(v) => v,
            Chunk::Shm(b) => b,
        }
    }
}

/// A non-blocking connection with its unsent output.
struct Link<'p> {
    stream: TcpStream,
    out: VecDeque<Chunk<'p>>,
    /// Bytes of `out`'s first chunk already written.
    sent: usize,
    /// Distinguishes this connection from a later one in the same slot.
    serial: u64,
}

impl Link<'_> {
    fn new(stream: TcpStream, serial: u64) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            out: VecDeque::new(),
            sent: 0,
            serial,
        })
    }

    /// Queues bytes, joining them to the last queued chunk if it is ours.
    fn queue(&mut self, bytes: &[u8]) {
        if let Some(Chunk::Bytes(v)) = self.out.back_mut() {
            v.extend_from_slice(bytes);
        } else {
            self.out.push_back(Chunk::Bytes(bytes.to_vec()));
        }
    }

    /// Writes what is pending until done or the socket is full (the
    /// writable event brings us back). Everything pending goes in one
    /// `writev` when the socket takes it.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 16];
            let mut n = 0;
            for (i, c) in self.out.iter().take(slices.len()).enumerate() {
                let b = c.bytes();
                slices[n] = IoSlice::new(if i == 0 { &b[self.sent..] } else { b });
                n += 1;
            }
            let mut wrote = match self.stream.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while wrote > 0 {
                let left = self.out[0].bytes().len() - self.sent;
                if wrote < left {
                    self.sent += wrote;
                    break;
                }
                wrote -= left;
                self.sent = 0;
                self.out.pop_front();
            }
        }
        Ok(())
    }

    /// Reads everything the socket has into `sink`. Returns false at end of
    /// stream. A read that fills less than `buf` took all there was (the
    /// kernel copies every queued byte, redirected or not, up to the
    /// length asked): anything later brings a new event, so no second read
    /// is spent to see `WouldBlock`. A socket in spright's sockmap may wake
    /// us with nothing to read; that is `WouldBlock`, as for any
    /// non-blocking socket, and we wait for the next event.
    fn drain(&mut self, buf: &mut [u8], mut sink: impl FnMut(&[u8])) -> io::Result<bool> {
        loop {
            match read_some(&mut self.stream, buf)? {
                Got::Eof => return Ok(false),
                Got::Nothing => return Ok(true),
                Got::Data(n) => {
                    sink(&buf[..n]);
                    if n < buf.len() {
                        return Ok(true);
                    }
                }
            }
        }
    }
}

/// Splits a byte stream into descriptors, keeping a partial one for later.
#[derive(Default)]
struct Framer {
    partial: Vec<u8>,
}

impl Framer {
    fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<Descriptor>) {
        if !self.partial.is_empty() {
            let need = Descriptor::WIRE_SIZE - self.partial.len();
            let take = need.min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() < Descriptor::WIRE_SIZE {
                return;
            }
            out.push(Descriptor::from_bytes(
                self.partial[..].try_into().expect("16 bytes"),
            ));
            self.partial.clear();
        }
        let mut it = bytes.chunks_exact(Descriptor::WIRE_SIZE);
        for c in &mut it {
            out.push(Descriptor::from_bytes(c.try_into().expect("16 bytes")));
        }
        self.partial.extend_from_slice(it.remainder());
    }
}

/// An accepted connection and what its protocol keeps about it.
struct Conn<'p, S> {
    link: Link<'p>,
    state: S,
}

/// Accepted connections, indexed by token.
struct Slots<'p, S> {
    items: Vec<Option<Conn<'p, S>>>,
    serial: u64,
}

impl<'p, S> Slots<'p, S> {
    fn new() -> Self {
        Self {
            items: Vec::new(),
            serial: 0,
        }
    }

    /// Registers a new connection and stores it; returns its slot.
    fn accept(&mut self, reactor: &Poll, s: TcpStream, state: S) -> io::Result<usize> {
        let i = self
            .items
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.items.len());
        self.serial += 1;
        let mut link = Link::new(s, self.serial)?;
        reactor.registry().register(
            &mut link.stream,
            Token(i + FIRST),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        if i == self.items.len() {
            self.items.push(None);
        }
        self.items[i] = Some(Conn { link, state });
        Ok(i)
    }

    fn get(&mut self, i: usize) -> Option<&mut Conn<'p, S>> {
        self.items.get_mut(i).and_then(Option::as_mut)
    }

    /// The connection in slot `i` if it is still the one with `serial`.
    fn get_serial(&mut self, (i, serial): Waiter) -> Option<&mut Conn<'p, S>> {
        self.get(i).filter(|c| c.link.serial == serial)
    }

    fn close(&mut self, reactor: &Poll, i: usize) {
        if let Some(mut c) = self.items.get_mut(i).and_then(Option::take) {
            let _ = reactor.registry().deregister(&mut c.link.stream);
        }
    }

    /// Accepts every pending connection on `listener`.
    fn accept_all(
        &mut self,
        reactor: &Poll,
        listener: &TcpListener,
        state: impl Fn() -> S,
    ) -> io::Result<()> {
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    if let Err(e) = self.accept(reactor, s, state()) {
                        eprintln!("accepting a connection: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connection waiting for an answer: its slot and serial.
type Waiter = (usize, u64);

/// The connection to the next function, made on first use, and who waits
/// for each descriptor sent on it (in order).
struct Next<'p> {
    addr: SocketAddr,
    link: Option<Link<'p>>,
    framer: Framer,
    /// (slot, serial) of the connection each sent descriptor answers.
    waiting: VecDeque<Waiter>,
}

impl Next<'_> {
    fn new(addr: &str) -> io::Result<Self> {
        let addr = addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: no address"))
        })?;
        Ok(Self {
            addr,
            link: None,
            framer: Framer::default(),
            waiting: VecDeque::new(),
        })
    }

    /// Queues `d` for the next function on behalf of connection `from`.
    fn send(&mut self, reactor: &Poll, d: Descriptor, from: Waiter) -> io::Result<()> {
        if self.link.is_none() {
            // A blocking connect on the node (or its redirect): short.
            let s = StdStream::connect(self.addr)?;
            s.set_nonblocking(true)?;
            let mut link = Link::new(TcpStream::from_std(s), 0)?;
            reactor.registry().register(
                &mut link.stream,
                NEXT,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            self.framer = Framer::default();
            self.link = Some(link);
        }
        self.link
            .as_mut()
            .expect("connected above")
            .queue(&d.to_bytes());
        self.waiting.push_back(from);
        Ok(())
    }

    /// Drops the connection after a failure; returns who was waiting.
    fn fail(&mut self, reactor: &Poll, why: &io::Error) -> VecDeque<Waiter> {
        if let Some(mut l) = self.link.take() {
            let _ = reactor.registry().deregister(&mut l.stream);
        }
        eprintln!("next function {}: {why}", self.addr);
        std::mem::take(&mut self.waiting)
    }

    /// Reads the next function's answers, each with the connection it
    /// answers (in order: the oldest waiting); an answer nobody asked for
    /// is freed and fails the connection. The error, if any, is for
    /// [`Next::fail`].
    fn receive(
        &mut self,
        pool: &Pool,
        rbuf: &mut [u8],
    ) -> (Vec<(Descriptor, Waiter)>, Option<io::Error>) {
        let Some(link) = self.link.as_mut() else {
            return (Vec::new(), None);
        };
        let mut ds = Vec::new();
        let framer = &mut self.framer;
        let mut failed = match link.drain(rbuf, |b| framer.feed(b, &mut ds)) {
            Ok(true) => None,
            Ok(false) => Some(io::ErrorKind::UnexpectedEof.into()),
            Err(e) => Some(e),
        };
        let mut out = Vec::with_capacity(ds.len());
        for d in ds {
            if let Some(w) = self.waiting.pop_front() {
                out.push((d, w));
            } else {
                release(pool, [d]);
                failed = Some(io::Error::other("an answer nobody asked for"));
            }
        }
        (out, failed)
    }

    /// Writes what is queued; on a failure, who was waiting and why.
    fn flush(&mut self, reactor: &Poll) -> Result<(), (VecDeque<Waiter>, io::Error)> {
        match self.link.as_mut().map(Link::flush) {
            Some(Err(e)) => Err((self.fail(reactor, &e), e)),
            _ => Ok(()),
        }
    }
}

/// Takes descriptors nobody waits for any more back into the pool (freed).
fn release(pool: &Pool, ds: impl IntoIterator<Item = Descriptor>) {
    for d in ds {
        if let Err(e) = pool.take(d) {
            eprintln!("dropping an orphaned descriptor: {e}");
        }
    }
}

/// What every function's loop has: the listener, `epoll`, its events and
/// one read buffer.
struct Reactor {
    poll: Poll,
    listener: TcpListener,
    events: Events,
    rbuf: Vec<u8>,
}

impl Reactor {
    fn new(l: std::net::TcpListener) -> io::Result<Self> {
        l.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(l);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Self {
            poll,
            listener,
            events: Events::with_capacity(256),
            rbuf: vec![0u8; READ_CHUNK],
        })
    }

    /// Sleeps until something is ready; then the registry, the listener,
    /// what is ready and the read buffer.
    fn wait(&mut self) -> io::Result<(&Poll, &TcpListener, &Events, &mut [u8])> {
        loop {
            match self.poll.poll(&mut self.events, None) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
                Ok(()) => return Ok((&self.poll, &self.listener, &self.events, &mut self.rbuf)),
            }
        }
    }
}

/// Runs a stage: for every descriptor that arrives on `listener`'s
/// connections, `f` gets the payload, and what it returns goes to `next`
/// (whose answer goes back to the sender), or straight back to the sender
/// when this is the chain's last stage. Returns only on an error of the
/// listener or of `epoll`.
pub fn stage<'p>(
    pool: &'p Pool,
    listener: std::net::TcpListener,
    next: Option<&str>,
    mut f: impl FnMut(Buf<'p>) -> Buf<'p>,
) -> io::Result<()> {
    try_stage(pool, listener, next, |b| Some(f(b)))
}

/// [`stage`] for a function that can fail, as functions written in other
/// languages can (an exception, an error code): when `f` returns `None`
/// (having dropped, and so freed, the buffer it got), the loop stops after
/// this wake-up's output is written and returns `Ok(())`. The descriptors
/// of the same batch it did not reach go back to the pool. What the
/// stopped stage still owed its peers (answers that did not fit the
/// socket, descriptors in flight to or from it) is what a crash leaks
/// (see the crate docs).
pub fn try_stage<'p>(
    pool: &'p Pool,
    listener: std::net::TcpListener,
    next: Option<&str>,
    mut f: impl FnMut(Buf<'p>) -> Option<Buf<'p>>,
) -> io::Result<()> {
    let mut stopped = false;
    let mut r = Reactor::new(listener)?;
    let mut next = next.map(Next::new).transpose()?;
    let mut ups: Slots<'p, Framer> = Slots::new();
    let mut ds = Vec::new();
    let mut dirty: Vec<usize> = Vec::new();
    loop {
        let (reactor, listener, events, rbuf) = r.wait()?;
        let mut next_dirty = false;
        for ev in events {
            match ev.token() {
                LISTENER => ups.accept_all(reactor, listener, Framer::default)?,
                NEXT => {
                    let Some(n) = next.as_mut() else { continue };
                    next_dirty |= ev.is_writable();
                    if !ev.is_readable() {
                        continue;
                    }
                    let (answers, failed) = n.receive(pool, rbuf);
                    for (d, w) in answers {
                        if let Some(c) = ups.get_serial(w) {
                            c.link.queue(&d.to_bytes());
                            dirty.push(w.0);
                        } else {
                            release(pool, [d]);
                        }
                    }
                    if let Some(e) = failed {
                        close_waiting(reactor, &mut ups, n.fail(reactor, &e));
                    }
                }
                // A stopped function runs no more.
                Token(_) if stopped => {}
                Token(t) => {
                    let i = t - FIRST;
                    let Some(Conn {
                        link,
                        state: framer,
                    }) = ups.get(i)
                    else {
                        continue;
                    };
                    let mut open = true;
                    if ev.is_readable() {
                        ds.clear();
                        match link.drain(rbuf, |b| framer.feed(b, &mut ds)) {
                            Ok(o) => open = o,
                            Err(e) => {
                                eprintln!("connection {t}: {e}");
                                open = false;
                            }
                        }
                    }
                    let serial = link.serial;
                    // Run the function on each descriptor, to completion.
                    let mut batch = ds.drain(..);
                    for d in batch.by_ref() {
                        let buf = match pool.take(d) {
                            Ok(b) => b,
                            Err(e) => {
                                eprintln!("connection {t}: refused descriptor: {e}");
                                open = false;
                                break;
                            }
                        };
                        let Some(out) = f(buf) else {
                            stopped = true;
                            break;
                        };
                        let out = out.into_descriptor();
                        if let Some(n) = next.as_mut() {
                            if let Err(e) = n.send(reactor, out, (i, serial)) {
                                release(pool, [out]);
                                close_waiting(reactor, &mut ups, n.fail(reactor, &e));
                                open = false;
                                break;
                            }
                            next_dirty = true;
                        } else if let Some(c) = ups.get(i) {
                            c.link.queue(&out.to_bytes());
                        }
                    }
                    // What a failure left unprocessed goes back to the pool.
                    release(pool, batch);
                    dirty.push(i);
                    if !open {
                        ups.close(reactor, i);
                    }
                }
            }
        }
        // Everything this wake-up produced leaves now, one write per peer.
        if next_dirty
            && let Some(n) = next.as_mut()
            && let Err((waiting, _)) = n.flush(reactor)
        {
            close_waiting(reactor, &mut ups, waiting);
        }
        for i in dirty.drain(..) {
            if let Some(c) = ups.get(i)
                && let Err(e) = c.link.flush()
            {
                eprintln!("connection {}: {e}", i + FIRST);
                ups.close(reactor, i);
            }
        }
        if stopped {
            return Ok(());
        }
    }
}

/// Closes every connection that waited on a failed next function: their
/// pipelines cannot be answered in order any more.
fn close_waiting<S>(reactor: &Poll, slots: &mut Slots<'_, S>, waiting: VecDeque<Waiter>) {
    for w in waiting {
        if slots.get_serial(w).is_some() {
            slots.close(reactor, w.0);
        }
    }
}

/// What one non-blocking read brought.
enum Got {
    Data(usize),
    Eof,
    Nothing,
}

fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<Got> {
    loop {
        return match s.read(buf) {
            Ok(0) => Ok(Got::Eof),
            Ok(n) => Ok(Got::Data(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Got::Nothing),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

/// An HTTP/1.1 client of the gateway, one request at a time (a pipelining
/// client's next request waits in `head` until the current one is
/// answered, so responses stay in order).
struct Http<'p> {
    /// Bytes read and not yet parsed.
    head: Vec<u8>,
    /// The body being read into the pool, and how much of it has arrived.
    body: Option<(Buf<'p>, usize)>,
    /// Body bytes of a refused request still to skip, and its answer.
    discard: Option<(usize, Vec<u8>)>,
    /// The current request is in the chain.
    in_flight: bool,
    /// The current request asked for the connection to close after it.
    close_after: bool,
    /// Its answer is queued: close once the output is written.
    closing: bool,
}

impl Http<'_> {
    fn new() -> Self {
        Self {
            head: Vec::new(),
            body: None,
            discard: None,
            in_flight: false,
            close_after: false,
            closing: false,
        }
    }
}

/// Formats one response head (status line and `content-length`).
fn response_head(status: u16, reason: &str, len: usize, close: bool) -> Vec<u8> {
    let mut h = Vec::with_capacity(96);
    let _ = write!(
        h,
        "HTTP/1.1 {status} {reason}\r\ncontent-length: {len}\r\n{}\r\n",
        if close { "connection: close\r\n" } else { "" }
    );
    h
}

/// Queues the answer to the current request; small bodies are copied next
/// to the head, so each response leaves in one write.
fn respond<'p>(c: &mut Conn<'p, Http<'p>>, status: u16, reason: &str, body: Chunk<'p>) {
    let len = body.bytes().len();
    c.state.in_flight = false;
    c.state.closing = c.state.close_after;
    let mut bytes = response_head(status, reason, len, c.state.close_after);
    if len <= COPY_LIMIT {
        bytes.extend_from_slice(body.bytes());
        c.link.queue(&bytes);
    } else {
        c.link.queue(&bytes);
        c.link.out.push_back(body);
    }
}

/// A parsed request head: body length and whether to close after it.
struct Head {
    len: usize,
    close: bool,
}

/// A request refused before it reached the chain: the answer, after which
/// the connection closes.
type Refusal = (u16, &'static str, String);

/// Parses one request head from `buf`: `Ok(None)` if incomplete, else the
/// head and the bytes it took.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err((
                431,
                "Request Header Fields Too Large",
                format!("request head over {MAX_HEAD} bytes"),
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err((400, "Bad Request", format!("malformed request: {e}"))),
    };
    let mut head = Head {
        len: 0,
        close: req.version == Some(0),
    };
    for h in req.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            head.len = v
                .parse()
                .map_err(|_| (400, "Bad Request", format!("content-length {v:?}")))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err((
                501,
                "Not Implemented",
                "transfer-encoding is not supported; send content-length".to_owned(),
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if v.eq_ignore_ascii_case("close") {
                head.close = true;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                head.close = false;
            }
        }
    }
    Ok(Some((head, n)))
}

/// Runs the chain's HTTP gateway: every request body on `listener`'s
/// connections is read straight into a pool buffer, `f` does the
/// gateway's own work on it, its descriptor goes to `next`, and what comes
/// back is the response (`200 OK`). A body the pool cannot hold is answered
/// `413`, a malformed request `400` (then the connection closes), a failed
/// chain `502`. Returns only on an error of the listener or of `epoll`.
pub fn gateway<'p>(
    pool: &'p Pool,
    listener: std::net::TcpListener,
    next: &str,
    mut f: impl FnMut(&mut Buf<'p>),
) -> io::Result<()> {
    let mut r = Reactor::new(listener)?;
    let mut next = Next::new(next)?;
    let mut clients: Slots<'p, Http<'p>> = Slots::new();
    let mut dirty: Vec<usize> = Vec::new();
    let mut ready: Vec<usize> = Vec::new();
    loop {
        let (reactor, listener, events, rbuf) = r.wait()?;
        let mut next_dirty = false;
        for ev in events {
            match ev.token() {
                LISTENER => clients.accept_all(reactor, listener, Http::new)?,
                NEXT => {
                    next_dirty |= ev.is_writable();
                    if !ev.is_readable() {
                        continue;
                    }
                    let (answers, failed) = next.receive(pool, rbuf);
                    for (d, w) in answers {
                        let Some(c) = clients.get_serial(w) else {
                            release(pool, [d]);
                            continue;
                        };
                        match pool.take(d) {
                            Ok(b) => respond(c, 200, "OK", Chunk::Shm(b)),
                            Err(e) => {
                                let msg = format!("the chain answered with a bad descriptor: {e}");
                                respond(c, 502, "Bad Gateway", Chunk::Bytes(msg.into_bytes()));
                            }
                        }
                        dirty.push(w.0);
                        ready.push(w.0);
                    }
                    if let Some(e) = failed {
                        let waiting = next.fail(reactor, &e);
                        let from = dirty.len();
                        chain_failed(&mut clients, waiting, &e, &mut dirty);
                        ready.extend_from_slice(&dirty[from..]);
                    }
                }
                Token(t) => {
                    if ev.is_readable() {
                        ready.push(t - FIRST);
                    }
                    if ev.is_writable() {
                        dirty.push(t - FIRST);
                    }
                }
            }
        }
        for i in ready.drain(..) {
            match serve(pool, reactor, &mut clients, i, &mut next, rbuf, &mut f) {
                Ok(sent) => next_dirty |= sent,
                Err(e) => {
                    eprintln!("client {}: {e}", i + FIRST);
                    clients.close(reactor, i);
                }
            }
            dirty.push(i);
        }
        if next_dirty && let Err((waiting, e)) = next.flush(reactor) {
            chain_failed(&mut clients, waiting, &e, &mut dirty);
        }
        dirty.sort_unstable();
        dirty.dedup();
        for i in dirty.drain(..) {
            let Some(c) = clients.get(i) else { continue };
            match c.link.flush() {
                Ok(()) if c.state.closing && c.link.out.is_empty() && !c.state.in_flight => {
                    clients.close(reactor, i);
                }
                Ok(()) => {}
                Err(e) => {
                    eprintln!("client {}: {e}", i + FIRST);
                    clients.close(reactor, i);
                }
            }
        }
    }
}

/// Answers `502` to every client whose request was waiting on the failed
/// next function; their slots go into `touched`.
fn chain_failed<'p>(
    clients: &mut Slots<'p, Http<'p>>,
    waiting: VecDeque<Waiter>,
    e: &io::Error,
    touched: &mut Vec<usize>,
) {
    for w in waiting {
        if let Some(c) = clients.get_serial(w) {
            let msg = format!("the chain failed: {e}");
            respond(c, 502, "Bad Gateway", Chunk::Bytes(msg.into_bytes()));
            touched.push(w.0);
        }
    }
}

/// Moves client `i` along as far as its input allows: parses requests,
/// reads bodies into the pool, sends each complete one into the chain.
/// Returns whether a descriptor was queued for the next function.
fn serve<'p>(
    pool: &'p Pool,
    reactor: &Poll,
    clients: &mut Slots<'p, Http<'p>>,
    i: usize,
    next: &mut Next<'p>,
    rbuf: &mut [u8],
    f: &mut impl FnMut(&mut Buf<'p>),
) -> io::Result<bool> {
    let Some(c) = clients.get(i) else {
        return Ok(false);
    };
    let serial = c.link.serial;
    loop {
        if c.state.in_flight || c.state.closing {
            return Ok(false);
        }
        // A body on its way into the pool: buffered bytes first, then
        // straight from the socket.
        if let Some((buf, got)) = c.state.body.as_mut() {
            let from_head = (buf.len() - *got).min(c.state.head.len());
            buf[*got..*got + from_head].copy_from_slice(&c.state.head[..from_head]);
            c.state.head.drain(..from_head);
            *got += from_head;
            while *got < buf.len() {
                match read_some(&mut c.link.stream, &mut buf[*got..])? {
                    Got::Data(n) => *got += n,
                    Got::Eof => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Got::Nothing => return Ok(false),
                }
            }
            let (mut buf, _) = c.state.body.take().expect("checked above");
            f(&mut buf);
            let d = buf.into_descriptor();
            if let Err(e) = next.send(reactor, d, (i, serial)) {
                release(pool, [d]);
                let msg = format!("the chain is unreachable: {e}");
                respond(c, 502, "Bad Gateway", Chunk::Bytes(msg.into_bytes()));
                continue;
            }
            c.state.in_flight = true;
            return Ok(true);
        }
        if let Some((left, answer)) = c.state.discard.as_mut() {
            let from_head = (*left).min(c.state.head.len());
            c.state.head.drain(..from_head);
            *left -= from_head;
            while *left > 0 {
                let room = (*left).min(rbuf.len());
                match read_some(&mut c.link.stream, &mut rbuf[..room])? {
                    Got::Data(n) => *left -= n,
                    Got::Eof => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Got::Nothing => return Ok(false),
                }
            }
            let answer = std::mem::take(answer);
            c.state.discard = None;
            respond(c, 413, "Payload Too Large", Chunk::Bytes(answer));
            continue;
        }
        match parse_head(&c.state.head) {
            Ok(Some((head, n))) => {
                c.state.head.drain(..n);
                c.state.close_after = head.close;
                match pool.alloc(head.len) {
                    Ok(b) => c.state.body = Some((b, 0)),
                    // Read the body anyway, so the client sees the answer
                    // instead of a reset.
                    Err(e) => c.state.discard = Some((head.len, e.to_string().into_bytes())),
                }
            }
            Ok(None) => match read_some(&mut c.link.stream, rbuf)? {
                Got::Data(n) => c.state.head.extend_from_slice(&rbuf[..n]),
                Got::Eof if c.state.head.is_empty() => {
                    c.state.closing = true;
                    return Ok(false);
                }
                Got::Eof => return Err(io::ErrorKind::UnexpectedEof.into()),
                Got::Nothing => return Ok(false),
            },
            Err((status, reason, msg)) => {
                c.state.close_after = true;
                respond(c, status, reason, Chunk::Bytes(msg.into_bytes()));
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        net::TcpListener as StdListener,
    };

    use super::*;
    use crate::POOL_FILE;

    /// A pool that lives as long as the test process (the event loops run
    /// on threads that never return).
    fn pool(size: u64) -> &'static Pool {
        let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        Box::leak(Box::new(
            Pool::open_file(&dir.path().join(POOL_FILE), size).unwrap(),
        ))
    }

    fn all_free(p: &Pool) {
        let s = p.stats();
        assert_eq!(s.free, s.carved, "every buffer went back to the pool");
    }

    fn bind() -> (StdListener, String) {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap().to_string();
        (l, a)
    }

    /// gateway -> upper -> reverse, each on its own thread; returns the
    /// gateway's address.
    fn chain(pool: &'static Pool) -> String {
        let (l2, a2) = bind();
        std::thread::spawn(move || {
            stage(pool, l2, None, |mut b| {
                b.reverse();
                b
            })
        });
        let (l1, a1) = bind();
        std::thread::spawn(move || {
            stage(pool, l1, Some(&a2), |mut b| {
                b.make_ascii_uppercase();
                b
            })
        });
        let (l0, a0) = bind();
        std::thread::spawn(move || gateway(pool, l0, &a1, |_| {}));
        a0
    }

    /// Reads one response: status, headers (lower-cased names) and body.
    fn response(r: &mut impl BufRead) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .unwrap()
            .1
            .parse()
            .unwrap();
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        (status, headers, body)
    }

    fn post(body: &[u8], extra: &str) -> Vec<u8> {
        let mut v = format!(
            "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v
    }

    fn expected(body: &[u8]) -> Vec<u8> {
        let mut e = body.to_ascii_uppercase();
        e.reverse();
        e
    }

    #[test]
    fn a_failing_function_stops_its_stage_and_frees_its_buffer() {
        let p = pool(16 << 20);
        let (l, a) = bind();
        let t = std::thread::spawn(move || {
            try_stage(p, l, None, |b| (b.first() != Some(&b'!')).then_some(b))
        });
        let mut s = StdStream::connect(&a).unwrap();
        let mut b = p.alloc(3).unwrap();
        b.copy_from_slice(b"ok.");
        crate::send(&mut s, b.into_descriptor()).unwrap();
        let back = p.take(crate::recv(&mut s).unwrap().unwrap()).unwrap();
        assert_eq!(&back[..], b"ok.");
        drop(back);
        let mut b = p.alloc(3).unwrap();
        b.copy_from_slice(b"!no");
        crate::send(&mut s, b.into_descriptor()).unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(crate::recv(&mut s).unwrap(), None, "the stage closed");
        all_free(p);
    }

    #[test]
    fn pipelined_requests_of_every_size_come_back_in_order() {
        let p = pool(64 << 20);
        let gw = chain(p);
        let sizes = [
            0usize,
            1,
            64,
            1000,
            16 * 1024,
            16 * 1024 + 1,
            64 * 1024,
            1 << 20,
        ];
        let bodies: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| b"abcdefghijklmnopqrstuvwxyz"[i % 26])
                    .collect()
            })
            .collect();
        // All requests in one write: the gateway must answer them in order.
        let s = StdStream::connect(&gw).unwrap();
        let all: Vec<u8> = bodies.iter().flat_map(|b| post(b, "")).collect();
        let writer = {
            let mut s = s.try_clone().unwrap();
            std::thread::spawn(move || s.write_all(&all).unwrap())
        };
        let mut r = BufReader::new(s.try_clone().unwrap());
        for b in &bodies {
            let (status, _, got) = response(&mut r);
            assert_eq!(status, 200);
            assert!(got == expected(b), "{} bytes came back wrong", b.len());
        }
        writer.join().unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing after the last answer");
        all_free(p);
    }

    #[test]
    fn many_clients_at_once_each_get_their_own_answers() {
        let p = pool(64 << 20);
        let gw = chain(p);
        let clients: Vec<_> = (0..16u8)
            .map(|c| {
                let gw = gw.clone();
                std::thread::spawn(move || {
                    let mut s = StdStream::connect(&gw).unwrap();
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    for n in 0..50usize {
                        let body = vec![b'a' + c; 100 + n * 37];
                        s.write_all(&post(&body, "")).unwrap();
                        let (status, _, got) = response(&mut r);
                        assert_eq!(status, 200);
                        assert_eq!(got, expected(&body), "client {c} request {n}");
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
    }

    #[test]
    fn refusals_are_http_answers() {
        let p = pool(16 << 20);
        let gw = chain(p);
        // Over the largest size class: 413, the body is read, the
        // connection stays usable.
        let s = StdStream::connect(&gw).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let big = vec![b'x'; (1 << 20) + 1];
        let w = {
            let mut s = s.try_clone().unwrap();
            let req = [post(&big, ""), post(b"ok", "")].concat();
            std::thread::spawn(move || s.write_all(&req).unwrap())
        };
        let (status, _, msg) = response(&mut r);
        assert_eq!(status, 413);
        assert!(String::from_utf8_lossy(&msg).contains("largest size class"));
        let (status, _, body) = response(&mut r);
        assert_eq!((status, body), (200, b"KO".to_vec()));
        w.join().unwrap();
        // Malformed and chunked requests: an answer, then the close.
        for (req, want) in [
            (&b"NOT HTTP\x00\r\n\r\n"[..], 400),
            (
                &b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                501,
            ),
            (&b"POST / HTTP/1.1\r\ncontent-length: -3\r\n\r\n"[..], 400),
        ] {
            let mut s = StdStream::connect(&gw).unwrap();
            s.write_all(req).unwrap();
            let mut r = BufReader::new(s);
            let (status, headers, _) = response(&mut r);
            assert_eq!(status, want);
            assert!(headers.contains(&("connection".into(), "close".into())));
            let mut rest = Vec::new();
            assert_eq!(r.read_to_end(&mut rest).unwrap(), 0, "closed");
        }
        // `connection: close` is honoured after the answer.
        let mut s = StdStream::connect(&gw).unwrap();
        s.write_all(&post(b"bye", "connection: close\r\n")).unwrap();
        let mut r = BufReader::new(s);
        let (status, headers, body) = response(&mut r);
        assert_eq!((status, body), (200, b"EYB".to_vec()));
        assert!(headers.contains(&("connection".into(), "close".into())));
        let mut rest = Vec::new();
        assert_eq!(r.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn a_missing_next_function_is_a_502_and_the_gateway_goes_on() {
        let p = pool(16 << 20);
        // Nothing listens there.
        let (dead, addr) = bind();
        drop(dead);
        let (l0, gw) = bind();
        std::thread::spawn(move || gateway(p, l0, &addr, |_| {}));
        let mut s = StdStream::connect(&gw).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        for _ in 0..2 {
            s.write_all(&post(b"hello", "")).unwrap();
            let (status, _, msg) = response(&mut r);
            assert_eq!(status, 502);
            assert!(String::from_utf8_lossy(&msg).contains("unreachable"));
        }
        all_free(p);
    }

    #[test]
    fn framer_keeps_partial_descriptors() {
        let d = |o| Descriptor {
            offset: o,
            len: 3,
            generation: 1,
        };
        let bytes: Vec<u8> = [d(1), d(2), d(3)]
            .iter()
            .flat_map(|x| x.to_bytes())
            .collect();
        for cut in [1, 15, 16, 17, 40] {
            let mut f = Framer::default();
            let mut out = Vec::new();
            f.feed(&bytes[..cut], &mut out);
            f.feed(&bytes[cut..], &mut out);
            assert_eq!(out, vec![d(1), d(2), d(3)], "cut at {cut}");
        }
    }
}
