//! The C ABI of spright's zero-copy SDK (`spright_shm.h`, `-lspright_shm`).
//!
//! The same pool and the same 16-byte descriptors as the Rust SDK
//! ([`spright_shm`]): a C function can sit anywhere in a chain of Rust,
//! C and Python functions. Every call returns 0 (or a count) on success and
//! a negative errno-style code on failure; [`spright_strerror`] names a
//! code and [`spright_last_error`] gives this thread's full message of the
//! last failure (e.g. both pool versions of a version mismatch).
//!
//! | code | meaning |
//! |---|---|
//! | `-EINVAL` | a NULL or otherwise invalid argument, an empty `spright_buf` |
//! | `-EBADMSG` | the file is not a spright pool |
//! | `-EPROTO` | the pool has another layout version than this library |
//! | `-ENOSPC` | the pool file would be smaller than one chunk |
//! | `-EMSGSIZE` | allocation over the largest size class (1 MiB) |
//! | `-ENOMEM` | the pool has no free buffer of that size |
//! | `-ERANGE` | descriptor outside the pool's allocated chunks |
//! | `-EFAULT` | descriptor not at the start of a slot |
//! | `-EOVERFLOW` | descriptor (or new) length over the slot's capacity |
//! | `-ESTALE` | stale descriptor: its slot was freed or reused |
//! | `-EALREADY` | descriptor already taken (or never sent) |
//! | `-ECONNRESET` | the peer closed the socket in the middle of a descriptor |
//! | other | the system call's errno (open, mmap, read, write, ...) |
//!
//! Nothing allocates on the hot path (alloc, take, send, recv, the stage
//! loop's per-payload work): a `spright_buf` is a plain value the caller
//! keeps (on its stack, in its structs). A `spright_pool` may be used from
//! any number of threads at once; one `spright_buf` by one thread at a time.

use std::{
    cell::RefCell,
    ffi::{CStr, c_char, c_int, c_void},
    fmt::Write as _,
    fs::File,
    mem::{ManuallyDrop, MaybeUninit},
    net::TcpListener,
    os::fd::FromRawFd,
    path::Path,
};

use spright_shm::{Buf, Descriptor, Error, Pool};

/// A pool mapped into this process (opaque).
pub struct SprightPool {
    pool: Pool,
}

/// A buffer's place in the pool as it crosses a socket (16 bytes on the
/// wire, little-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SprightDescriptor {
    /// Offset of the payload from the start of the pool file.
    pub offset: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// Incarnation of the slot (a freed slot's descriptors go stale).
    pub generation: u32,
}

impl From<Descriptor> for SprightDescriptor {
    fn from(d: Descriptor) -> Self {
        Self {
            offset: d.offset,
            len: d.len,
            generation: d.generation,
        }
    }
}

impl From<SprightDescriptor> for Descriptor {
    fn from(d: SprightDescriptor) -> Self {
        Self {
            offset: d.offset,
            len: d.len,
            generation: d.generation,
        }
    }
}

/// A buffer this process owns, held by value. Filled by `spright_alloc` or
/// `spright_take`; emptied by `spright_buf_into_descriptor` or
/// `spright_buf_release`. An all-zero `spright_buf` is empty. Copying a
/// non-empty one and using both copies is undefined behaviour.
#[repr(C)]
pub struct SprightBuf {
    private: [u64; 6],
}

/// Pool counters (tests, status output): when nothing is owned or in
/// flight, `free` equals `carved` for every size class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SprightStats {
    pub chunks: u32,
    pub chunks_used: u32,
    pub free: [u32; 8],
    pub carved: [u32; 8],
}

/// A stage's function: transforms the payload in `buf` in place (or
/// releases it and puts another buffer of the same pool in `buf`). Returns
/// 0 to forward `buf`, or a negative code to stop the loop, which then
/// frees whatever `buf` holds and returns that code.
pub type SprightStageFn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, buf: *mut SprightBuf) -> c_int>;

/// The pool layout version this library reads and writes.
pub const SPRIGHT_POOL_VERSION: u32 = 1;
const _: () = assert!(SPRIGHT_POOL_VERSION == spright_shm::POOL_VERSION);
/// The largest payload (the largest size class), in bytes.
pub const SPRIGHT_MAX_PAYLOAD: u32 = 1 << 20;
const _: () = assert!(SPRIGHT_MAX_PAYLOAD == spright_shm::CLASS_SIZES[7]);
/// The size of a descriptor on the wire.
pub const SPRIGHT_DESCRIPTOR_WIRE_SIZE: u32 = 16;

/// What a non-empty `SprightBuf` holds.
#[repr(C)]
struct Slot {
    live: u64,
    buf: MaybeUninit<Buf<'static>>,
}

/// Marks a `SprightBuf` that holds a buffer.
const LIVE: u64 = 0x5350_5242_5546_4c56;

const _: () = assert!(
    size_of::<Slot>() <= size_of::<SprightBuf>() && align_of::<Slot>() <= align_of::<SprightBuf>()
);

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records `why` as this thread's last error and returns `-errno`.
fn fail(errno: c_int, why: impl std::fmt::Display) -> c_int {
    LAST_ERROR.with(|l| {
        let mut l = l.borrow_mut();
        l.clear();
        let _ = write!(l, "{why}");
    });
    -errno
}

fn io_errno(e: &std::io::Error) -> c_int {
    e.raw_os_error().unwrap_or(match e.kind() {
        std::io::ErrorKind::UnexpectedEof => libc::ECONNRESET,
        std::io::ErrorKind::WriteZero => libc::EPIPE,
        std::io::ErrorKind::InvalidInput => libc::EINVAL,
        _ => libc::EIO,
    })
}

fn pool_error(e: &Error) -> c_int {
    let errno = match e {
        Error::Io { source, .. } => io_errno(source),
        Error::NotAPool { .. } => libc::EBADMSG,
        Error::Version { .. } => libc::EPROTO,
        Error::TooSmall { .. } => libc::ENOSPC,
        Error::TooLarge(_) => libc::EMSGSIZE,
        Error::OutOfMemory(_) => libc::ENOMEM,
        Error::OutOfRange { .. } => libc::ERANGE,
        Error::Misaligned { .. } => libc::EFAULT,
        Error::TooLong { .. } => libc::EOVERFLOW,
        Error::Stale { .. } => libc::ESTALE,
        Error::NotSent { .. } => libc::EALREADY,
    };
    // The full chain: "failed to open pool file x: Permission denied".
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(why, ": {s}");
        source = s.source();
    }
    fail(errno, why)
}

fn io_error(e: &std::io::Error) -> c_int {
    fail(io_errno(e), e)
}

fn invalid(why: &str) -> c_int {
    fail(libc::EINVAL, why)
}

/// The slot behind a `SprightBuf` pointer.
///
/// # Safety
/// `b` is NULL or valid for reads and writes of a `SprightBuf`.
unsafe fn slot<'a>(b: *mut SprightBuf) -> Option<&'a mut Slot> {
    // SAFETY: the caller's contract; `Slot` fits `SprightBuf`'s size and alignment.
    unsafe { b.cast::<Slot>().as_mut() }
}

fn put(s: &mut Slot, buf: Buf<'_>) {
    // SAFETY: only the lifetime changes; the C contract is that the pool
    // outlives its buffers (spright_pool_close after the last release).
    let buf = unsafe { std::mem::transmute::<Buf<'_>, Buf<'static>>(buf) };
    s.buf = MaybeUninit::new(buf);
    s.live = LIVE;
}

fn take_out(s: &mut Slot) -> Option<Buf<'static>> {
    if s.live != LIVE {
        return None;
    }
    s.live = 0;
    // SAFETY: `live` says `buf` was written by `put` and not taken since.
    Some(unsafe { s.buf.assume_init_read() })
}

fn live(s: &mut Slot) -> Option<&mut Buf<'static>> {
    if s.live != LIVE {
        return None;
    }
    // SAFETY: as in `take_out`.
    Some(unsafe { s.buf.assume_init_mut() })
}

/// Opens a chain's pool. `path` is either the mounted chain region (a
/// directory: the pool file in it is created with all of its space on first
/// use; `size` is ignored) or a pool file (created with at most `size`
/// bytes, rounded down to whole 4 MiB chunks, if it does not exist). On
/// success `*out` is the pool; close it with `spright_pool_close` after the
/// last buffer of it is released.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for a
/// pointer write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_pool_open(
    path: *const c_char,
    size: u64,
    out: *mut *mut SprightPool,
) -> c_int {
    if path.is_null() || out.is_null() {
        return invalid("spright_pool_open: NULL path or out");
    }
    // SAFETY: the caller's contract.
    let path = unsafe { CStr::from_ptr(path) };
    let Ok(path) = path.to_str() else {
        return invalid("spright_pool_open: path is not UTF-8");
    };
    let path = Path::new(path);
    let pool = if path.is_dir() {
        Pool::open(path)
    } else {
        Pool::open_file(path, size)
    };
    match pool {
        Ok(pool) => {
            // SAFETY: checked non-NULL; the caller's contract.
            unsafe { out.write(Box::into_raw(Box::new(SprightPool { pool }))) };
            0
        }
        Err(e) => pool_error(&e),
    }
}

/// Unmaps a pool. Buffers still owned leak (until the region is freed).
///
/// # Safety
/// `pool` is NULL or from `spright_pool_open`, not closed before, and no
/// `spright_buf` of it is used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_pool_close(pool: *mut SprightPool) {
    if !pool.is_null() {
        // SAFETY: the caller's contract: a pointer from Box::into_raw, once.
        let p = unsafe { Box::from_raw(pool) };
        drop(p);
    }
}

/// Fills `*out` with the pool's counters.
///
/// # Safety
/// `pool` is NULL or an open pool; `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_pool_stats(
    pool: *const SprightPool,
    out: *mut SprightStats,
) -> c_int {
    // SAFETY: the caller's contract.
    let (Some(p), false) = (unsafe { pool.as_ref() }, out.is_null()) else {
        return invalid("spright_pool_stats: NULL pool or out");
    };
    let s = p.pool.stats();
    // SAFETY: checked non-NULL; the caller's contract.
    unsafe {
        out.write(SprightStats {
            chunks: s.chunks,
            chunks_used: s.chunks_used,
            free: s.free,
            carved: s.carved,
        });
    }
    0
}

/// The pool layout version this library reads and writes.
#[unsafe(no_mangle)]
pub extern "C" fn spright_pool_version() -> u32 {
    spright_shm::POOL_VERSION
}

/// Allocates a buffer for `len` bytes (its capacity is the size class) and
/// puts it in `*out` (overwritten: it must not hold a buffer).
///
/// # Safety
/// `pool` is NULL or an open pool; `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_alloc(
    pool: *const SprightPool,
    len: usize,
    out: *mut SprightBuf,
) -> c_int {
    // SAFETY: the caller's contract.
    let (Some(p), Some(s)) = (unsafe { pool.as_ref() }, unsafe { slot(out) }) else {
        return invalid("spright_alloc: NULL pool or out");
    };
    match p.pool.alloc(len) {
        Ok(b) => {
            put(s, b);
            0
        }
        Err(e) => pool_error(&e),
    }
}

/// Takes ownership of the buffer a peer sent: validates `d` (range,
/// alignment, length, generation, state) and puts the buffer in `*out`
/// (overwritten).
///
/// # Safety
/// `pool` is NULL or an open pool; `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_take(
    pool: *const SprightPool,
    d: SprightDescriptor,
    out: *mut SprightBuf,
) -> c_int {
    // SAFETY: the caller's contract.
    let (Some(p), Some(s)) = (unsafe { pool.as_ref() }, unsafe { slot(out) }) else {
        return invalid("spright_take: NULL pool or out");
    };
    match p.pool.take(d.into()) {
        Ok(b) => {
            put(s, b);
            0
        }
        Err(e) => pool_error(&e),
    }
}

/// The payload's first byte (writable, `spright_buf_capacity` bytes), or
/// NULL for an empty or NULL `buf`.
///
/// # Safety
/// `buf` is NULL or valid for reads and writes. The pointer is valid until
/// the buffer is released or turned into a descriptor.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_buf_data(buf: *mut SprightBuf) -> *mut u8 {
    // SAFETY: the caller's contract.
    match unsafe { slot(buf) }.and_then(live) {
        Some(b) => b.as_mut_ptr(),
        None => std::ptr::null_mut(),
    }
}

/// The payload length (0 for an empty or NULL `buf`).
///
/// # Safety
/// `buf` is NULL or valid for reads and writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_buf_len(buf: *mut SprightBuf) -> usize {
    // SAFETY: the caller's contract.
    unsafe { slot(buf) }.and_then(live).map_or(0, |b| b.len())
}

/// The buffer's capacity (its size class; 0 for an empty or NULL `buf`).
///
/// # Safety
/// `buf` is NULL or valid for reads and writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_buf_capacity(buf: *mut SprightBuf) -> usize {
    // SAFETY: the caller's contract.
    unsafe { slot(buf) }
        .and_then(live)
        .map_or(0, |b| b.capacity())
}

/// Sets the payload length: -EOVERFLOW over the capacity.
///
/// # Safety
/// `buf` is NULL or valid for reads and writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_buf_set_len(buf: *mut SprightBuf, len: usize) -> c_int {
    // SAFETY: the caller's contract.
    let Some(b) = unsafe { slot(buf) }.and_then(live) else {
        return invalid("spright_buf_set_len: NULL or empty buffer");
    };
    if len > b.capacity() {
        return fail(
            libc::EOVERFLOW,
            format_args!("length {len} over the buffer's capacity {}", b.capacity()),
        );
    }
    b.set_len(len);
    0
}

/// Gives the buffer up for a peer to take: `*out` is its descriptor, `buf`
/// is empty afterwards.
///
/// # Safety
/// `buf` is NULL or valid for reads and writes; `out` is NULL or valid for
/// a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_buf_into_descriptor(
    buf: *mut SprightBuf,
    out: *mut SprightDescriptor,
) -> c_int {
    if out.is_null() {
        return invalid("spright_buf_into_descriptor: NULL out");
    }
    // SAFETY: the caller's contract.
    let Some(b) = unsafe { slot(buf) }.and_then(take_out) else {
        return invalid("spright_buf_into_descriptor: NULL or empty buffer");
    };
    // SAFETY: checked non-NULL; the caller's contract.
    unsafe { out.write(b.into_descriptor().into()) };
    0
}

/// Frees the buffer (its slot goes back to the pool; its descriptors go
/// stale); `buf` is empty afterwards.
///
/// # Safety
/// `buf` is NULL or valid for reads and writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_buf_release(buf: *mut SprightBuf) -> c_int {
    // SAFETY: the caller's contract.
    match unsafe { slot(buf) }.and_then(take_out) {
        Some(b) => {
            drop(b);
            0
        }
        None => invalid("spright_buf_release: NULL or empty buffer"),
    }
}

/// Runs `f` on the (blocking) stream socket `fd` without taking it over.
fn on_fd<T>(fd: c_int, f: impl FnOnce(&mut File) -> T) -> Option<T> {
    if fd < 0 {
        return None;
    }
    // SAFETY: a non-negative fd the caller owns; ManuallyDrop never closes it.
    let mut file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    Some(f(&mut file))
}

/// Writes one descriptor (16 bytes) to the blocking stream socket `fd`
/// (with MSG_NOSIGNAL: a closed peer is -EPIPE, never SIGPIPE).
#[unsafe(no_mangle)]
pub extern "C" fn spright_send(fd: c_int, d: SprightDescriptor) -> c_int {
    if fd < 0 {
        return fail(libc::EBADF, "spright_send: negative fd");
    }
    let bytes = Descriptor::from(d).to_bytes();
    let mut sent = 0;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        // SAFETY: `rest` is valid for reads of its length.
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if let Ok(n) = usize::try_from(n) {
            sent += n;
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return io_error(&e);
        }
    }
    0
}

/// Blocks until one descriptor arrives on the blocking stream socket `fd`:
/// 1 with `*out` set, 0 when the peer closed the connection cleanly.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_recv(fd: c_int, out: *mut SprightDescriptor) -> c_int {
    if out.is_null() {
        return invalid("spright_recv: NULL out");
    }
    match on_fd(fd, spright_shm::recv) {
        None => fail(libc::EBADF, "spright_recv: negative fd"),
        Some(Ok(Some(d))) => {
            // SAFETY: checked non-NULL; the caller's contract.
            unsafe { out.write(d.into()) };
            1
        }
        Some(Ok(None)) => 0,
        Some(Err(e)) => io_error(&e),
    }
}

/// Runs an event-driven stage, as the Rust SDK's `event::stage`: for every
/// descriptor that arrives on the connections of the listening socket
/// `listen_fd`, `f(ctx, buf)` transforms the payload, and the result goes to
/// `next` ("host:port") whose answer goes back to the sender, or straight
/// back to the sender when `next` is NULL (the chain's last stage). One
/// thread, asleep in epoll between wake-ups. `listen_fd` stays open and the
/// caller's. SIGPIPE is set to ignored if it has its default disposition
/// (a closed peer is then an error of its connection, not the process's
/// death). Returns `f`'s negative code when `f` stopped the loop, or the
/// error of the listener or of epoll.
///
/// # Safety
/// `pool` is NULL or an open pool; `next` is NULL or a NUL-terminated
/// string; `f` is safe to call with `ctx` and a valid `spright_buf`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_stage_run(
    pool: *const SprightPool,
    listen_fd: c_int,
    next: *const c_char,
    f: SprightStageFn,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    let (Some(p), Some(f)) = (unsafe { pool.as_ref() }, f) else {
        return invalid("spright_stage_run: NULL pool or function");
    };
    let next = if next.is_null() {
        None
    } else {
        // SAFETY: the caller's contract.
        match unsafe { CStr::from_ptr(next) }.to_str() {
            Ok(s) => Some(s),
            Err(_) => return invalid("spright_stage_run: next is not UTF-8"),
        }
    };
    if listen_fd < 0 {
        return fail(libc::EBADF, "spright_stage_run: negative listen_fd");
    }
    // SAFETY: a non-negative fd the caller owns; we use a duplicate of it.
    let borrowed = ManuallyDrop::new(unsafe { TcpListener::from_raw_fd(listen_fd) });
    let listener = match borrowed.try_clone() {
        Ok(l) => l,
        Err(e) => return io_error(&e),
    };
    ignore_sigpipe();
    let mut stopped = 0;
    let result = spright_shm::event::try_stage(&p.pool, listener, next, |buf| {
        let mut holder = SprightBuf { private: [0; 6] };
        // SAFETY: `holder` is a local SprightBuf.
        let s = unsafe { slot(&raw mut holder) }.expect("not NULL");
        put(s, buf);
        // SAFETY: the caller's contract for `f` and `ctx`.
        let rc = unsafe { f(ctx, &raw mut holder) };
        // SAFETY: as above.
        let out = take_out(unsafe { slot(&raw mut holder) }.expect("not NULL"));
        if rc < 0 {
            stopped = rc;
            return None;
        }
        if out.is_none() {
            stopped = invalid("spright_stage_run: the function left no buffer to forward");
        }
        out
    });
    match result {
        Ok(()) => stopped,
        Err(e) => io_error(&e),
    }
}

/// The stage loop writes with `writev`, which raises SIGPIPE on a closed
/// peer: a C program (unlike a Rust or Python one) would die of it. Ignore
/// it when it has its default disposition (a program's own handler stays).
fn ignore_sigpipe() {
    // SAFETY: querying and setting a signal disposition; no handler code runs.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &raw mut old) == 0
            && old.sa_sigaction == libc::SIG_DFL
        {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    }
}

/// Copies this thread's message of its last failure into `buf` (at most
/// `cap` bytes, NUL-terminated when `cap > 0`); returns the message's full
/// length, as snprintf does. The message is "" before any failure.
///
/// # Safety
/// `buf` is NULL (with `cap == 0`) or valid for `cap` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn spright_last_error(buf: *mut c_char, cap: usize) -> usize {
    LAST_ERROR.with(|l| {
        let l = l.borrow();
        if !buf.is_null() && cap > 0 {
            let n = l.len().min(cap - 1);
            // SAFETY: the caller's contract: `cap` writable bytes; n + 1 <= cap.
            unsafe {
                std::ptr::copy_nonoverlapping(l.as_ptr(), buf.cast::<u8>(), n);
                buf.add(n).write(0);
            }
        }
        l.len()
    })
}

/// A static, NUL-terminated description of a code returned by this
/// library, naming the errno and what it means here.
#[unsafe(no_mangle)]
pub extern "C" fn spright_strerror(code: c_int) -> *const c_char {
    let s: &'static CStr = match code.checked_neg().unwrap_or(0) {
        0 if code == 0 => c"0: success",
        libc::EINVAL => c"EINVAL: invalid argument (NULL pointer or empty spright_buf)",
        libc::EBADMSG => c"EBADMSG: not a spright pool (bad magic or size)",
        libc::EPROTO => {
            c"EPROTO: the pool has another layout version than this library (see spright_last_error)"
        }
        libc::ENOSPC => c"ENOSPC: pool too small (less than one 4 MiB chunk) or no space left",
        libc::EMSGSIZE => c"EMSGSIZE: allocation over the largest size class (1 MiB)",
        libc::ENOMEM => c"ENOMEM: the pool (or the system) is out of memory",
        libc::ERANGE => c"ERANGE: descriptor outside the pool's allocated chunks",
        libc::EFAULT => c"EFAULT: descriptor not at the start of a slot",
        libc::EOVERFLOW => c"EOVERFLOW: length over the buffer's capacity",
        libc::ESTALE => c"ESTALE: stale descriptor (its slot was freed or reused)",
        libc::EALREADY => c"EALREADY: descriptor already taken (or never sent)",
        libc::ECONNRESET => c"ECONNRESET: connection reset (or closed mid-descriptor)",
        libc::EPIPE => c"EPIPE: broken pipe (the peer closed the connection)",
        libc::EBADF => c"EBADF: bad file descriptor",
        libc::ENOTSOCK => c"ENOTSOCK: not a socket",
        libc::ENOENT => c"ENOENT: no such file or directory",
        libc::EACCES => c"EACCES: permission denied",
        libc::EIO => c"EIO: input/output error",
        libc::EAGAIN => c"EAGAIN: resource temporarily unavailable",
        libc::ECONNREFUSED => c"ECONNREFUSED: connection refused",
        libc::EADDRINUSE => c"EADDRINUSE: address in use",
        _ => c"unknown error code",
    };
    s.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pool_error_has_its_own_named_code() {
        let codes = [
            libc::EBADMSG,
            libc::EPROTO,
            libc::ENOSPC,
            libc::EMSGSIZE,
            libc::ENOMEM,
            libc::ERANGE,
            libc::EFAULT,
            libc::EOVERFLOW,
            libc::ESTALE,
            libc::EALREADY,
        ];
        for c in codes {
            // SAFETY: a static NUL-terminated string.
            let s = unsafe { CStr::from_ptr(spright_strerror(-c)) };
            assert!(!s.to_str().unwrap().starts_with("unknown"), "{c}");
        }
        let s = |c| {
            // SAFETY: as above.
            unsafe { CStr::from_ptr(spright_strerror(c)) }
                .to_str()
                .unwrap()
        };
        assert!(s(-libc::ESTALE).starts_with("ESTALE"));
        assert_eq!(s(0), "0: success");
        assert_eq!(s(12345), "unknown error code");
        assert_eq!(s(i32::MIN), "unknown error code");
    }
}
