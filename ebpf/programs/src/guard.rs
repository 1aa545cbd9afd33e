//! The splice guard: `splice()` and `sendfile()` from a redirected socket
//! fail with EINVAL instead of losing data (docs/RELIABILITY.md, "splice").
//!
//! A redirected message lands in the receiver's psock queue, which
//! `tcp_splice_read` never looks at: on kernels without a sockmap
//! `splice_read`, `splice(socket → pipe)` finds nothing, and once the
//! peer's FIN has arrived over TCP it returns 0, which every caller reads as
//! end of stream (Go's `io.Copy` between two `*net.TCPConn`: every byte
//! lost). A refusal with EINVAL before anything is read is what callers
//! already handle: Go's `poll.Splice` falls back to read/write when the
//! first splice fails with EINVAL ("the kernel does not support splice for
//! the socket type of src", no byte consumed), HAProxy turns splicing off
//! for the connection.
//!
//! The hook is the LSM `file_permission` hook, which `rw_verify_area` calls
//! before any splice or sendfile reads from a file (and before `read()`,
//! which must go on: it is told apart by the syscall number). It is a
//! cgroup LSM program attached to the pod cgroup where sockops is, so it
//! runs only for pod processes. It refuses a call when all hold:
//! - the mask asks to read, from a socket (`bpf_sock_from_file`);
//! - the calling task is in `splice` or `sendfile` (the syscall number in
//!   its `pt_regs`, at an offset and with numbers the loader took from the
//!   kernel's BTF and its own architecture);
//! - the socket has a psock (`SK_USER_DATA_PSOCK` in `sk_user_data`): it is
//!   in a sockmap, ours or anyone's, so the psock queue may hold its data;
//! - meshd has not found that this kernel's redirect path serves splice
//!   itself (`CONFIG_NO_SPLICE_GUARD`).
//! Any missing offset (0) leaves the guard inert; the loader then records it
//! as not armed and stops new redirects (fail safe).

use core::{
    intrinsics::AtomicOrdering,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    helpers::{bpf_get_current_task_btf, bpf_set_retval, bpf_sock_from_file, bpf_task_pt_regs},
    macros::{lsm_cgroup, map},
    maps::Array,
    programs::LsmContext,
};
use spright_common::{CONFIG_NO_SPLICE_GUARD, guard};

use crate::programs::config_flags;

/// Guard state and counters ([`guard`] slots).
#[map(name = "spr_guard_v1")]
static GUARD: Array<u64> = Array::pinned(guard::SLOTS, 0);

/// Read-only globals set by the loader (`spright_common::names::GUARD_*`);
/// the verifier sees their values as constants, so `pointer + offset` is a
/// fixed-offset BTF access it checks against the kernel's types.
#[unsafe(no_mangle)]
static SPR_GUARD_SYSNR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SPR_GUARD_NR_SPLICE: u32 = 0;
#[unsafe(no_mangle)]
static SPR_GUARD_NR_SENDFILE: u32 = 0;
#[unsafe(no_mangle)]
static SPR_GUARD_SK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SPR_GUARD_UDATA_OFF: u32 = 0;

/// cgroup LSM verdicts: 1 lets the call go on, 0 refuses it with the error
/// set by `bpf_set_retval`.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[lsm_cgroup(hook = "file_permission")]
pub(crate) fn spright_splice_guard(ctx: LsmContext) -> i32 {
    if !refuses(&ctx) {
        return ALLOW;
    }
    // SAFETY: a helper of cgroup LSM programs; the value is a plain errno.
    unsafe { bpf_set_retval(-guard::EINVAL) };
    if let Some(slot) = GUARD.get_ptr_mut(guard::REFUSED) {
        // SAFETY: an aligned array slot, only ever updated atomically.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1);
        }
    }
    REFUSE
}

#[inline(always)]
fn refuses(ctx: &LsmContext) -> bool {
    let mask: u32 = ctx.arg(1);
    if mask & guard::MAY_READ == 0 {
        return false;
    }
    // SAFETY: read-only globals.
    let (nr_off, nr_splice, nr_sendfile, sk_off, udata_off) = unsafe {
        (
            read_volatile(addr_of!(SPR_GUARD_SYSNR_OFF)),
            read_volatile(addr_of!(SPR_GUARD_NR_SPLICE)),
            read_volatile(addr_of!(SPR_GUARD_NR_SENDFILE)),
            read_volatile(addr_of!(SPR_GUARD_SK_OFF)),
            read_volatile(addr_of!(SPR_GUARD_UDATA_OFF)),
        )
    };
    if nr_off == 0 || sk_off == 0 || udata_off == 0 || nr_splice == 0 {
        return false;
    }
    // SAFETY: the helpers return the current task and its user registers
    // as BTF pointers; the load is BTF-typed (the low 32 bits of x86's
    // `orig_ax`, arm64's `syscallno`), checked by the verifier.
    let nr = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        read_volatile(regs.add(nr_off as usize).cast::<u32>())
    };
    if nr != nr_splice && nr != nr_sendfile {
        return false;
    }
    if config_flags() & CONFIG_NO_SPLICE_GUARD != 0 {
        return false;
    }
    // SAFETY: the hook's first argument is the file; `bpf_sock_from_file`
    // returns its socket or NULL; both loads are BTF-typed and fault-safe.
    unsafe {
        let file = ctx.arg::<*mut aya_ebpf::bindings::file>(0);
        let sock = bpf_sock_from_file(file).cast::<u8>();
        if sock.is_null() {
            return false;
        }
        let sk = read_volatile(sock.add(sk_off as usize).cast::<*const u8>());
        if sk.is_null() {
            return false;
        }
        let udata = read_volatile(sk.add(udata_off as usize).cast::<u64>());
        udata & guard::SK_USER_DATA_PSOCK != 0
    }
}
