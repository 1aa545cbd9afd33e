//! The only unsafe code of the SDK: the shared mapping, atomics placed in it,
//! and byte slices over it.

use std::{
    fs::File,
    sync::atomic::{AtomicU32, AtomicU64},
};

use memmap2::MmapRaw;

/// A read-write shared mapping of a whole pool file.
pub(crate) struct Mapping {
    map: MmapRaw,
}

impl Mapping {
    pub(crate) fn new(file: &File) -> std::io::Result<Self> {
        Ok(Self {
            map: MmapRaw::map_raw(file)?,
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.map.len() as u64
    }

    fn ptr(&self, offset: u64, len: u64, align: u64) -> *mut u8 {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len()),
            "offset {offset}+{len} outside the mapping"
        );
        assert!(
            offset.is_multiple_of(align),
            "offset {offset} not {align}-aligned"
        );
        let offset = usize::try_from(offset).expect("mapping fits the address space");
        // SAFETY: `offset + len` is within the mapping (asserted above), so the
        // pointer stays inside the same allocation.
        unsafe { self.map.as_mut_ptr().add(offset) }
    }

    pub(crate) fn u32_at(&self, offset: u64) -> &AtomicU32 {
        let p = self.ptr(offset, 4, 4);
        // SAFETY: in bounds and 4-aligned (checked by `ptr`); the mapping lives
        // as long as `self`; every access to this word, in every process, is
        // atomic (the pool never reads or writes its metadata otherwise).
        unsafe { AtomicU32::from_ptr(p.cast()) }
    }

    pub(crate) fn u64_at(&self, offset: u64) -> &AtomicU64 {
        let p = self.ptr(offset, 8, 8);
        // SAFETY: as for `u32_at`, with 8-byte alignment.
        unsafe { AtomicU64::from_ptr(p.cast()) }
    }

    /// The bytes at `offset..offset+len`.
    ///
    /// # Safety
    /// The caller must hold the only live slice over this range in any
    /// process: the pool guarantees it by giving each slot at most one owner
    /// (`Buf`) at a time, through the slot's atomic state word.
    #[expect(
        clippy::mut_from_ref,
        reason = "exclusivity comes from the slot's owner state"
    )]
    pub(crate) unsafe fn bytes(&self, offset: u64, len: u64) -> &mut [u8] {
        let p = self.ptr(offset, len, 1);
        let len = usize::try_from(len).expect("fits");
        // SAFETY: in bounds (checked by `ptr`), valid for reads and writes for
        // the mapping's lifetime; exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }
}
