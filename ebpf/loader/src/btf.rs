//! Field offsets of the running kernel's types, from its BTF
//! (`/sys/kernel/btf/vmlinux`), for the kernel memory bound.
//!
//! aya-ebpf programs have no CO-RE relocations and aya none for kfuncs, so
//! the sk_msg program reads the receiver's queued memory at offsets the
//! loader hands it in read-only globals (`names::RMEM_OFFSET_GLOBAL`,
//! `names::REDIR_OFFSET_GLOBAL`), and calls `bpf_cast_to_kern_ctx` by an id
//! the loader patches in. This module finds those offsets and that id. It reads only what it needs of the BTF format (the type section
//! and the string section; see the kernel's `Documentation/bpf/btf.rst`)
//! and answers `None` for anything it does not understand, which leaves the
//! bound to meshd's poll.

use std::path::Path;

/// Where the running kernel describes its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// What the sk_msg program needs from the running kernel to enforce the
/// memory bound itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelBoundBtf {
    /// Offset of `sk_backlog.rmem_alloc` (4-byte `atomic_t`) in `struct sock`.
    pub rmem_offset: u32,
    /// Offset of `sk_redir` (a pointer) in the kernel's `struct sk_msg`.
    pub redir_offset: u32,
    /// BTF id of the kfunc `bpf_cast_to_kern_ctx`.
    pub kern_ctx_kfunc: u32,
}

/// What the splice guard (`ebpf/programs/src/guard.rs`) needs from the
/// running kernel and this build's architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardBtf {
    /// Offset of the syscall number in `struct pt_regs` (x86-64 `orig_ax`,
    /// arm64 `syscallno`; the guard reads its low 32 bits).
    pub sysnr_offset: u32,
    /// This architecture's syscall numbers of `splice` and `sendfile`.
    pub nr_splice: u32,
    /// See `nr_splice`.
    pub nr_sendfile: u32,
    /// Offset of `sk` (a pointer) in `struct socket`.
    pub sock_sk_offset: u32,
    /// Offset of `sk_user_data` (a pointer) in `struct sock`.
    pub user_data_offset: u32,
}

/// Everything the loader takes from the running kernel's BTF, read once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelBtf {
    /// For the kernel memory bound; `None` leaves it to meshd's poll.
    pub bound: Option<KernelBoundBtf>,
    /// For the splice guard; `None` leaves it inert.
    pub guard: Option<GuardBtf>,
}

/// Reads [`KernelBtf`] from the BTF file `path`: each part is `None` when
/// the file is missing, unreadable or lacks any of it.
#[must_use]
pub fn kernel_btf(path: &Path) -> KernelBtf {
    let Some(data) = std::fs::read(path).ok() else {
        return KernelBtf::default();
    };
    let Some(btf) = Btf::parse(&data) else {
        return KernelBtf::default();
    };
    KernelBtf {
        bound: bound_of(&btf),
        guard: guard_of(&btf),
    }
}

/// Reads [`KernelBoundBtf`] from the BTF file `path`; `None` when the file
/// is missing, unreadable or lacks any of it.
#[must_use]
pub fn kernel_bound_btf(path: &Path) -> Option<KernelBoundBtf> {
    kernel_btf(path).bound
}

/// The syscall-number field of `struct pt_regs` and the numbers of
/// `splice` and `sendfile` on the architecture this loader was built for.
#[cfg(target_arch = "x86_64")]
const SYSCALLS: Option<(&str, u32, u32)> = Some(("orig_ax", 275, 40));
#[cfg(target_arch = "aarch64")]
const SYSCALLS: Option<(&str, u32, u32)> = Some(("syscallno", 76, 71));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYSCALLS: Option<(&str, u32, u32)> = None;

fn guard_of(btf: &Btf<'_>) -> Option<GuardBtf> {
    let (field, nr_splice, nr_sendfile) = SYSCALLS?;
    let (sysnr_offset, size) = btf.member_offset("pt_regs", &[field])?;
    // A 4-byte load of the low half (little-endian) must stay inside it.
    if size < 4 || sysnr_offset == 0 || sysnr_offset % 4 != 0 {
        return None;
    }
    let (sock_sk_offset, size) = btf.member_offset("socket", &["sk"])?;
    if size != 8 || sock_sk_offset == 0 || sock_sk_offset % 8 != 0 {
        return None;
    }
    let (user_data_offset, size) = btf.member_offset("sock", &["sk_user_data"])?;
    if size != 8 || user_data_offset == 0 || user_data_offset % 8 != 0 {
        return None;
    }
    Some(GuardBtf {
        sysnr_offset,
        nr_splice,
        nr_sendfile,
        sock_sk_offset,
        user_data_offset,
    })
}

fn bound_of(btf: &Btf<'_>) -> Option<KernelBoundBtf> {
    let (rmem_offset, size) = btf.member_offset("sock", &["sk_backlog", "rmem_alloc"])?;
    if size != 4 || rmem_offset == 0 || rmem_offset % 4 != 0 {
        return None;
    }
    let (redir_offset, size) = btf.member_offset("sk_msg", &["sk_redir"])?;
    if size != 8 || redir_offset == 0 || redir_offset % 8 != 0 {
        return None;
    }
    let kern_ctx_kfunc = btf.func_id("bpf_cast_to_kern_ctx")?;
    Some(KernelBoundBtf {
        rmem_offset,
        redir_offset,
        kern_ctx_kfunc,
    })
}

/// Offset in bytes of `sk_rmem_alloc` in `struct sock` on the kernel
/// described by the BTF file `path`, when the kernel bound can use it.
#[must_use]
pub fn rmem_alloc_offset(path: &Path) -> Option<u32> {
    kernel_bound_btf(path).map(|k| k.rmem_offset)
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Type {
    name_off: u32,
    info: u32,
    /// `size` for structs, unions, ints; `type` for typedefs and modifiers.
    size_or_ref: u32,
    /// Offset of the kind-specific data in the type section.
    extra: usize,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

struct Btf<'a> {
    types_sec: &'a [u8],
    strings: &'a [u8],
    /// Index = type id (id 0 is `void`, a placeholder here).
    types: Vec<Type>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        // Little-endian only: the loader runs on the machine whose kernel
        // it reads, and spright's programs are built for bpfel.
        if data.get(0..2)? != [0x9f, 0xeb] {
            return None;
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_sec = data.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
        let strings = data.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
        let mut types = vec![Type {
            name_off: 0,
            info: 0,
            size_or_ref: 0,
            extra: 0,
        }];
        let mut at = 0;
        while at < types_sec.len() {
            let t = Type {
                name_off: u32_at(types_sec, at)?,
                info: u32_at(types_sec, at + 4)?,
                size_or_ref: u32_at(types_sec, at + 8)?,
                extra: at + 12,
            };
            let extra = match t.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * t.vlen(),
                KIND_ENUM | KIND_FUNC_PROTO => 8 * t.vlen(),
                0 | 20.. => return None,
                _ => 0,
            };
            at = t.extra + extra;
            types.push(t);
        }
        Some(Self {
            types_sec,
            strings,
            types,
        })
    }

    fn name(&self, off: u32) -> Option<&'a str> {
        let rest = self.strings.get(off as usize..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_ref;
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Members of a struct or union: (name, type id, offset in bytes).
    /// Bitfields (not byte-aligned) are left out.
    fn members(&self, t: &Type) -> Vec<(&'a str, u32, u32)> {
        if !matches!(t.kind(), KIND_STRUCT | KIND_UNION) {
            return Vec::new();
        }
        (0..t.vlen())
            .filter_map(|i| {
                let at = t.extra + 12 * i;
                let name = self.name(u32_at(self.types_sec, at)?)?;
                let ty = u32_at(self.types_sec, at + 4)?;
                let raw = u32_at(self.types_sec, at + 8)?;
                let bits = if t.kind_flag() {
                    raw & 0x00ff_ffff
                } else {
                    raw
                };
                (bits % 8 == 0).then_some((name, ty, bits / 8))
            })
            .collect()
    }

    /// Finds `field` in `t`, also inside its anonymous members: (offset,
    /// type id).
    fn find(&self, t: &Type, field: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let members = self.members(t);
        if let Some((_, ty, off)) = members.iter().find(|(n, _, _)| *n == field) {
            return Some((*off, *ty));
        }
        members
            .iter()
            .filter(|(n, _, _)| n.is_empty())
            .find_map(|(_, ty, off)| {
                let (inner, ty) = self.find(self.resolve(*ty)?, field, depth + 1)?;
                Some((off + inner, ty))
            })
    }

    /// Offset and size in bytes of the member at `path` of struct `root`.
    fn member_offset(&self, root: &str, path: &[&str]) -> Option<(u32, u32)> {
        let mut t = self
            .types
            .iter()
            .find(|t| t.kind() == KIND_STRUCT && self.name(t.name_off) == Some(root))?;
        let mut off = 0;
        for field in path {
            let (inner, ty) = self.find(t, field, 0)?;
            off += inner;
            t = self.resolve(ty)?;
        }
        match t.kind() {
            KIND_STRUCT | KIND_UNION | KIND_INT => Some((off, t.size_or_ref)),
            // 64-bit kernels only (bpfel programs, x86-64/arm64 nodes).
            KIND_PTR => Some((off, 8)),
            _ => None,
        }
    }

    /// The type id of the function `name`.
    fn func_id(&self, name: &str) -> Option<u32> {
        let i = self
            .types
            .iter()
            .position(|t| t.kind() == KIND_FUNC && self.name(t.name_off) == Some(name))?;
        u32::try_from(i).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_rmem_alloc_offset_when_it_has_btf() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            return;
        }
        let k = kernel_bound_btf(path).expect("the kernel bound's fields in this kernel's BTF");
        // `sk_backlog` follows `sock_common` (136 bytes on 64-bit kernels)
        // and a few more fields; it is never far from the start.
        assert!((136..1024).contains(&k.rmem_offset), "{k:?}");
        assert!(k.redir_offset < 4096 && k.kern_ctx_kfunc > 0, "{k:?}");
    }

    #[test]
    fn no_offset_without_btf() {
        assert_eq!(rmem_alloc_offset(Path::new("/nonexistent/vmlinux")), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("vmlinux");
        std::fs::write(&junk, b"not btf at all").expect("write");
        assert_eq!(rmem_alloc_offset(&junk), None);
    }
}
