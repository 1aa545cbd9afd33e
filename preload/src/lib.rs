//! `libspright_preload.so`: an opt-in `LD_PRELOAD` shim for workloads that
//! read TCP sockets in blocking mode.
//!
//! On the sk_msg redirect path a *blocking* `recv()` can return `EAGAIN`
//! before any data arrived (after the caller's half-close, or when a signal
//! interrupts the wait; a kernel behaviour measured in docs/RELIABILITY.md,
//! limit 1). Event-loop runtimes retry `EAGAIN` anyway; a plain blocking
//! program treats it as an error. With this library preloaded, `read`,
//! `recv`, `recvfrom` and `recvmsg` (and glibc's `_chk` variants) behave as on
//! plain TCP:
//!
//! - The real call runs first; anything but `-1`/`EAGAIN` is returned as is.
//! - `EAGAIN` is returned unchanged whenever it is legitimate: the caller
//!   asked not to block (`MSG_DONTWAIT`, or `O_NONBLOCK` on the descriptor),
//!   the descriptor is not a TCP socket, or its `SO_RCVTIMEO` has run out
//!   (measured from before the first call, so a timeout is never extended).
//! - Otherwise the `EAGAIN` is spurious: wait with `poll(POLLIN)` (at most
//!   the rest of `SO_RCVTIMEO`, when set) and call again. A wait that runs
//!   out returns `EAGAIN`, as the kernel does for a timed-out blocking read.
//!
//! A signal that arrives during the wait is reported as `EINTR` (plain TCP
//! restarts the read when the handler has `SA_RESTART`). The cost outside
//! the spurious case is one monotonic clock read per call.

use std::time::Duration;

use libc::{c_int, c_void, msghdr, size_t, sockaddr, socklen_t, ssize_t};

/// The next definition of `name` after this library (libc's), or null.
fn next_symbol(name: &'static [u8]) -> usize {
    debug_assert_eq!(name.last(), Some(&0));
    // SAFETY: `name` is NUL-terminated; dlsym only reads it.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) as usize }
}

/// Looks up (once) and returns the real function `$name` of type `$ty`.
macro_rules! real {
    ($name:literal, $ty:ty) => {{
        static ADDR: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let addr = *ADDR.get_or_init(|| next_symbol(concat!($name, "\0").as_bytes()));
        if addr == 0 {
            None
        } else {
            // SAFETY: dlsym returned libc's function of this exact signature.
            Some(unsafe { std::mem::transmute::<usize, $ty>(addr) })
        }
    }};
}

type ReadFn = unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t;
type ReadChkFn = unsafe extern "C" fn(c_int, *mut c_void, size_t, size_t) -> ssize_t;
type RecvFn = unsafe extern "C" fn(c_int, *mut c_void, size_t, c_int) -> ssize_t;
type RecvChkFn = unsafe extern "C" fn(c_int, *mut c_void, size_t, size_t, c_int) -> ssize_t;
type RecvFromFn = unsafe extern "C" fn(
    c_int,
    *mut c_void,
    size_t,
    c_int,
    *mut sockaddr,
    *mut socklen_t,
) -> ssize_t;
type RecvFromChkFn = unsafe extern "C" fn(
    c_int,
    *mut c_void,
    size_t,
    size_t,
    c_int,
    *mut sockaddr,
    *mut socklen_t,
) -> ssize_t;
type RecvMsgFn = unsafe extern "C" fn(c_int, *mut msghdr, c_int) -> ssize_t;

/// # Safety
/// Same contract as libc's `read`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    let Some(real) = real!("read", ReadFn) else {
        return missing();
    };
    // SAFETY: forwarded with the caller's arguments.
    retrying(fd, 0, || unsafe { real(fd, buf, count) })
}

/// # Safety
/// Same contract as glibc's `__read_chk`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    count: size_t,
    buflen: size_t,
) -> ssize_t {
    let Some(real) = real!("__read_chk", ReadChkFn) else {
        return missing();
    };
    // SAFETY: forwarded with the caller's arguments.
    retrying(fd, 0, || unsafe { real(fd, buf, count, buflen) })
}

/// # Safety
/// Same contract as libc's `recv`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t {
    let Some(real) = real!("recv", RecvFn) else {
        return missing();
    };
    // SAFETY: forwarded with the caller's arguments.
    retrying(fd, flags, || unsafe { real(fd, buf, len, flags) })
}

/// # Safety
/// Same contract as glibc's `__recv_chk`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    let Some(real) = real!("__recv_chk", RecvChkFn) else {
        return missing();
    };
    // SAFETY: forwarded with the caller's arguments.
    retrying(fd, flags, || unsafe { real(fd, buf, len, buflen, flags) })
}

/// # Safety
/// Same contract as libc's `recvfrom`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> ssize_t {
    let Some(real) = real!("recvfrom", RecvFromFn) else {
        return missing();
    };
    // SAFETY: forwarded with the caller's arguments.
    retrying(fd, flags, || unsafe {
        real(fd, buf, len, flags, addr, addrlen)
    })
}

/// # Safety
/// Same contract as glibc's `__recvfrom_chk`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> ssize_t {
    let Some(real) = real!("__recvfrom_chk", RecvFromChkFn) else {
        return missing();
    };
    // SAFETY: forwarded with the caller's arguments.
    retrying(fd, flags, || unsafe {
        real(fd, buf, len, buflen, flags, addr, addrlen)
    })
}

/// # Safety
/// Same contract as libc's `recvmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    let Some(real) = real!("recvmsg", RecvMsgFn) else {
        return missing();
    };
    // SAFETY: forwarded with the caller's arguments.
    retrying(fd, flags, || unsafe { real(fd, msg, flags) })
}

/// Runs `call` (a read of `fd` with `flags`) until it returns something a
/// blocking read on plain TCP could return.
fn retrying(fd: c_int, flags: c_int, mut call: impl FnMut() -> ssize_t) -> ssize_t {
    let start = now();
    loop {
        let r = call();
        if r >= 0 || errno() != libc::EAGAIN {
            return r;
        }
        let Eagain::Spurious { budget } = classify(fd, flags, start) else {
            set_errno(libc::EAGAIN);
            return r;
        };
        let timeout_ms = budget.map_or(-1, |d| {
            c_int::try_from(d.as_millis().max(1)).unwrap_or(c_int::MAX)
        });
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) } {
            // SO_RCVTIMEO ran out with nothing to read: what TCP returns.
            0 => {
                set_errno(libc::EAGAIN);
                return -1;
            }
            // EINTR (a signal) or a bad descriptor: report it.
            n if n < 0 => return -1,
            // Readable (or hung up / in error): the next call tells.
            _ => {}
        }
    }
}

/// What an `EAGAIN` from a read of `fd` means.
enum Eagain {
    /// What the caller should see.
    Legit,
    /// The redirect path's: wait for data, at most `budget` (the rest of
    /// `SO_RCVTIMEO`; `None` when unset).
    Spurious { budget: Option<Duration> },
}

fn classify(fd: c_int, flags: c_int, start: Duration) -> Eagain {
    if flags & libc::MSG_DONTWAIT != 0 {
        return Eagain::Legit;
    }
    // SAFETY: F_GETFL takes no argument.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 || fl & libc::O_NONBLOCK != 0 {
        return Eagain::Legit;
    }
    if sockopt::<c_int>(fd, libc::SO_PROTOCOL) != Some(libc::IPPROTO_TCP) {
        return Eagain::Legit;
    }
    let Some(tv) = sockopt::<libc::timeval>(fd, libc::SO_RCVTIMEO) else {
        return Eagain::Legit;
    };
    let timeout = Duration::from_secs(u64::try_from(tv.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(tv.tv_usec).unwrap_or(0));
    if timeout.is_zero() {
        return Eagain::Spurious { budget: None };
    }
    match timeout.checked_sub(now().saturating_sub(start)) {
        Some(left) if !left.is_zero() => Eagain::Spurious { budget: Some(left) },
        _ => Eagain::Legit,
    }
}

/// A `SOL_SOCKET` option of `fd`; `None` when it cannot be read (e.g. not a
/// socket). Leaves `errno` as it was.
fn sockopt<T: Copy>(fd: c_int, name: c_int) -> Option<T> {
    let saved = errno();
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = socklen_t::try_from(size_of::<T>()).ok()?;
    // SAFETY: `v` has room for `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            v.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    set_errno(saved);
    // SAFETY: the kernel filled `len` bytes of a zeroed plain-data value.
    (r == 0).then(|| unsafe { v.assume_init() })
}

fn now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one valid timespec; CLOCK_MONOTONIC is served by the vDSO.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn errno() -> c_int {
    // SAFETY: the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: the calling thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// libc without the symbol (cannot happen with glibc or musl).
fn missing() -> ssize_t {
    set_errno(libc::ENOSYS);
    -1
}
