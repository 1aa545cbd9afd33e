//! The pool allocator living in the shared file (see the crate docs for the
//! layout and the crash model).

use std::{
    fs::{File, OpenOptions},
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release},
};

use crate::{Descriptor, Error, map::Mapping};

/// The pool's file name inside the mounted chain region.
pub const POOL_FILE: &str = "spright-pool";
/// Payload capacities of the size classes.
pub const CLASS_SIZES: [u32; 8] = [
    64,
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
];

const MAGIC: u64 = 0x3154_4847_4952_5053; // "SPRIGHT1", little-endian
/// The layout version this SDK writes and reads (the pool header's version
/// field); a pool of another version is refused with [`Error::Version`].
pub const POOL_VERSION: u32 = 1;
const VERSION: u32 = POOL_VERSION;
const HEADER: u64 = 8 << 10;
const CHUNK: u64 = 4 << 20;
const SLOT_HEADER: u64 = 64;
const UNIT: u64 = 64;
/// Chunks the header's class table can describe (16 GiB of pool).
const MAX_CHUNKS: u64 = 4096;

// Header field offsets.
const H_MAGIC: u64 = 0;
const H_VERSION: u64 = 8;
const H_NCHUNKS: u64 = 12;
const H_LEN: u64 = 16;
const H_NEXT_CHUNK: u64 = 24;
const H_HEADS: u64 = 64; // 8 × u64
const H_CLASS_OF_CHUNK: u64 = 4096; // MAX_CHUNKS bytes, packed 4 per u32

// Slot header field offsets (from the slot start).
const S_GENERATION: u64 = 0;
const S_STATE: u64 = 4;
const S_NEXT: u64 = 8;

const FREE: u32 = 0;
const OWNED: u32 = 1;
const SENT: u32 = 2;

/// Bounds every compare-and-swap retry loop (contention, never a livelock).
const MAX_RETRIES: u32 = 1 << 20;

/// A pool mapped into this process.
pub struct Pool {
    map: Mapping,
    path: PathBuf,
}

/// Counters for tests and status output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    pub chunks: u32,
    pub chunks_used: u32,
    /// Free slots on each class's free list.
    pub free: [u32; 8],
    /// Slots carved for each class (all of them are free when nothing is
    /// owned or in flight).
    pub carved: [u32; 8],
}

fn stride(class: usize) -> u64 {
    SLOT_HEADER + u64::from(CLASS_SIZES[class])
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

impl Pool {
    /// Opens the pool of a mounted chain region `dir`, creating it with all
    /// of the region's space on first use.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let vfs = nix::sys::statvfs::statvfs(dir).map_err(|e| Error::Io {
            op: "statvfs",
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        let total = vfs.blocks() * vfs.fragment_size();
        Self::open_file(&dir.join(POOL_FILE), total)
    }

    /// Opens the pool file at `path`; if it is new, sizes it to at most `size`
    /// bytes (rounded down to whole chunks) and reserves the memory.
    pub fn open_file(path: &Path, size: u64) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open", path))?;
        // The creator holds the lock while it formats; the kernel releases it if it dies.
        file.lock().map_err(io("lock", path))?;
        let len = file.metadata().map_err(io("stat", path))?.len();
        let fresh = len == 0;
        if fresh {
            format_file(&file, path, size)?;
        }
        let not_a_pool = || Error::NotAPool {
            path: path.to_path_buf(),
        };
        if !fresh && (len < HEADER + CHUNK || !(len - HEADER).is_multiple_of(CHUNK)) {
            return Err(not_a_pool());
        }
        let map = Mapping::new(&file).map_err(io("map", path))?;
        let pool = Self {
            map,
            path: path.to_path_buf(),
        };
        // A creator that died after sizing the file but before writing the
        // magic left an all-zero header: format it again (we hold the lock).
        let unformatted = pool.map.u64_at(H_MAGIC).load(Acquire) == 0
            && pool.map.u32_at(H_VERSION).load(Acquire) == 0
            && pool.map.u32_at(H_NEXT_CHUNK).load(Acquire) == 0;
        if fresh || unformatted {
            pool.init();
        }
        file.unlock().map_err(io("unlock", path))?;
        let version = pool.map.u32_at(H_VERSION).load(Acquire);
        if pool.map.u64_at(H_MAGIC).load(Acquire) != MAGIC {
            return Err(not_a_pool());
        }
        if version != VERSION {
            return Err(Error::Version {
                path: path.to_path_buf(),
                found: version,
                expected: VERSION,
            });
        }
        Ok(pool)
    }

    fn init(&self) {
        let nchunks = (self.map.len() - HEADER) / CHUNK;
        self.map.u32_at(H_VERSION).store(VERSION, Relaxed);
        self.map.u32_at(H_NCHUNKS).store(
            u32::try_from(nchunks).expect("bounded by MAX_CHUNKS"),
            Relaxed,
        );
        self.map.u64_at(H_LEN).store(self.map.len(), Relaxed);
        // Everything else is zero (a fresh file): no chunks used, empty lists.
        self.map.u64_at(H_MAGIC).store(MAGIC, Release);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn nchunks(&self) -> u32 {
        self.map.u32_at(H_NCHUNKS).load(Relaxed)
    }

    fn head(&self, class: usize) -> &std::sync::atomic::AtomicU64 {
        self.map.u64_at(H_HEADS + 8 * class as u64)
    }

    /// The class of chunk `n` (None when not yet given to a class).
    fn class_of_chunk(&self, n: u32) -> Option<usize> {
        let word = self
            .map
            .u32_at(H_CLASS_OF_CHUNK + 4 * u64::from(n / 4))
            .load(Acquire);
        let byte = (word >> (8 * (n % 4))) & 0xff;
        (byte != 0).then(|| byte as usize - 1)
    }

    fn set_class_of_chunk(&self, n: u32, class: usize) {
        let bits = (u32::try_from(class).expect("8 classes") + 1) << (8 * (n % 4));
        self.map
            .u32_at(H_CLASS_OF_CHUNK + 4 * u64::from(n / 4))
            .fetch_or(bits, Release);
    }

    fn chunk_start(n: u32) -> u64 {
        HEADER + u64::from(n) * CHUNK
    }

    /// Allocates a buffer of `len` bytes (capacity: its class size).
    pub fn alloc(&self, len: usize) -> Result<Buf<'_>, Error> {
        let class = CLASS_SIZES
            .iter()
            .position(|&c| c as usize >= len)
            .ok_or(Error::TooLarge(len))?;
        let slot = match self.pop(class) {
            Some(s) => s,
            None => self.carve(class).ok_or(Error::OutOfMemory(len))?,
        };
        let prev = self.map.u32_at(slot + S_STATE).swap(OWNED, AcqRel);
        debug_assert_eq!(prev, FREE, "a listed slot was not free");
        Ok(Buf {
            pool: self,
            slot,
            class,
            len: u32::try_from(len).expect("bounded by the class size"),
        })
    }

    fn pop(&self, class: usize) -> Option<u64> {
        let head = self.head(class);
        for _ in 0..MAX_RETRIES {
            let h = head.load(Acquire);
            let unit = h & 0xffff_ffff;
            if unit == 0 {
                return None;
            }
            let slot = unit * UNIT;
            // May read a stale link if another process pops concurrently;
            // the tag makes the CAS below fail then.
            let next = u64::from(self.map.u32_at(slot + S_NEXT).load(Acquire));
            let tag = (h >> 32).wrapping_add(1) & 0xffff_ffff;
            if head
                .compare_exchange_weak(h, (tag << 32) | next, AcqRel, Acquire)
                .is_ok()
            {
                return Some(slot);
            }
        }
        None
    }

    /// Pushes the chain of slots `first..=last` (already linked) onto the list.
    fn push_chain(&self, class: usize, first: u64, last: u64) {
        let head = self.head(class);
        for _ in 0..MAX_RETRIES {
            let h = head.load(Acquire);
            self.map.u32_at(last + S_NEXT).store(
                u32::try_from(h & 0xffff_ffff).expect("32-bit unit"),
                Release,
            );
            let tag = (h >> 32).wrapping_add(1) & 0xffff_ffff;
            if head
                .compare_exchange_weak(h, (tag << 32) | (first / UNIT), AcqRel, Acquire)
                .is_ok()
            {
                return;
            }
        }
        // Only reachable under pathological contention: the slots leak.
    }

    /// Gives a fresh chunk to `class`, keeps its first slot for the caller
    /// and lists the rest. Processes that find a class empty at the same
    /// moment each carve a chunk for it: the slots are not lost, but the
    /// class holds more of the pool than it needed.
    fn carve(&self, class: usize) -> Option<u64> {
        let next_chunk = self.map.u32_at(H_NEXT_CHUNK);
        let n = next_chunk
            .fetch_update(AcqRel, Acquire, |n| (n < self.nchunks()).then_some(n + 1))
            .ok()?;
        self.set_class_of_chunk(n, class);
        let start = Self::chunk_start(n);
        let count = CHUNK / stride(class);
        let slot = |i: u64| start + i * stride(class);
        for i in 1..count {
            let next = if i + 1 < count { slot(i + 1) / UNIT } else { 0 };
            self.map
                .u32_at(slot(i) + S_NEXT)
                .store(u32::try_from(next).expect("32-bit unit"), Relaxed);
        }
        if count > 1 {
            self.push_chain(class, slot(1), slot(count - 1));
        }
        Some(slot(0))
    }

    /// Validates `d` and returns its slot, class and the slot's state word value.
    fn locate(&self, d: Descriptor) -> Result<(u64, usize), Error> {
        let offset = d.offset;
        let used = self.map.u32_at(H_NEXT_CHUNK).load(Acquire);
        if offset < HEADER + SLOT_HEADER || offset >= Self::chunk_start(used) {
            return Err(Error::OutOfRange { offset });
        }
        let n =
            u32::try_from((offset - HEADER) / CHUNK).map_err(|_| Error::OutOfRange { offset })?;
        let class = self.class_of_chunk(n).ok_or(Error::OutOfRange { offset })?;
        let within = offset - Self::chunk_start(n);
        let s = stride(class);
        if within < SLOT_HEADER
            || !(within - SLOT_HEADER).is_multiple_of(s)
            || within - SLOT_HEADER + s > CHUNK
        {
            return Err(Error::Misaligned { offset });
        }
        if d.len > CLASS_SIZES[class] {
            return Err(Error::TooLong {
                len: d.len,
                capacity: CLASS_SIZES[class],
            });
        }
        let slot = offset - SLOT_HEADER;
        let current = self.map.u32_at(slot + S_GENERATION).load(Acquire);
        if current != d.generation {
            return Err(Error::Stale {
                offset,
                generation: d.generation,
                current,
            });
        }
        Ok((slot, class))
    }

    /// Takes ownership of the buffer a peer sent. Fails on any invalid,
    /// stale or already taken descriptor.
    pub fn take(&self, d: Descriptor) -> Result<Buf<'_>, Error> {
        let (slot, class) = self.locate(d)?;
        self.map
            .u32_at(slot + S_STATE)
            .compare_exchange(SENT, OWNED, AcqRel, Acquire)
            .map_err(|_| Error::NotSent { offset: d.offset })?;
        // The generation may have moved between the check and the claim only
        // if the slot was freed and re-sent meanwhile; check again now that we own it.
        let current = self.map.u32_at(slot + S_GENERATION).load(Acquire);
        if current != d.generation {
            self.map.u32_at(slot + S_STATE).store(SENT, Release);
            return Err(Error::Stale {
                offset: d.offset,
                generation: d.generation,
                current,
            });
        }
        Ok(Buf {
            pool: self,
            slot,
            class,
            len: d.len,
        })
    }

    /// Checks a descriptor without taking it.
    pub fn validate(&self, d: Descriptor) -> Result<(), Error> {
        self.locate(d).map(drop)
    }

    fn release(&self, slot: u64, class: usize) {
        self.map.u32_at(slot + S_GENERATION).fetch_add(1, AcqRel);
        self.map.u32_at(slot + S_STATE).store(FREE, Release);
        self.push_chain(class, slot, slot);
    }

    pub fn stats(&self) -> Stats {
        let mut free = [0u32; 8];
        for (class, f) in free.iter_mut().enumerate() {
            let mut unit = self.head(class).load(Acquire) & 0xffff_ffff;
            // Bounded walk; a racing writer can make this approximate.
            while unit != 0 && *f < 1 << 24 {
                *f += 1;
                unit = u64::from(self.map.u32_at(unit * UNIT + S_NEXT).load(Acquire));
            }
        }
        let chunks_used = self.map.u32_at(H_NEXT_CHUNK).load(Acquire);
        let mut carved = [0u32; 8];
        for n in 0..chunks_used {
            if let Some(class) = self.class_of_chunk(n) {
                carved[class] += u32::try_from(CHUNK / stride(class)).expect("small");
            }
        }
        Stats {
            chunks: self.nchunks(),
            chunks_used,
            free,
            carved,
        }
    }
}

fn format_file(file: &File, path: &Path, size: u64) -> Result<(), Error> {
    let chunks = size.saturating_sub(HEADER) / CHUNK;
    if chunks == 0 {
        return Err(Error::TooSmall {
            size,
            min: HEADER + CHUNK,
        });
    }
    let len = HEADER + chunks.min(MAX_CHUNKS) * CHUNK;
    // Reserve the memory now, so a full region fails here instead of with
    // SIGBUS on a later page fault.
    nix::fcntl::posix_fallocate(file, 0, i64::try_from(len).expect("fits")).map_err(|e| Error::Io {
        op: "reserve",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// A buffer owned by this process: read and write it in place. Dropping it
/// frees the slot; [`Buf::into_descriptor`] hands it to a peer instead.
pub struct Buf<'p> {
    pool: &'p Pool,
    slot: u64,
    class: usize,
    len: u32,
}

impl Buf<'_> {
    pub fn capacity(&self) -> usize {
        CLASS_SIZES[self.class] as usize
    }

    /// Sets the payload length (at most the capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "length {len} over capacity {}",
            self.capacity()
        );
        self.len = u32::try_from(len).expect("bounded by capacity");
    }

    /// The descriptor of this buffer, without giving it up (e.g. for logs).
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            offset: self.slot + SLOT_HEADER,
            len: self.len,
            generation: self.pool.map.u32_at(self.slot + S_GENERATION).load(Acquire),
        }
    }

    /// Gives the buffer up for a peer to [`Pool::take`].
    pub fn into_descriptor(self) -> Descriptor {
        let d = self.descriptor();
        self.pool
            .map
            .u32_at(self.slot + S_STATE)
            .store(SENT, Release);
        std::mem::forget(self);
        d
    }
}

impl std::fmt::Debug for Buf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buf")
            .field("descriptor", &self.descriptor())
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Deref for Buf<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: this Buf is the slot's only owner (state OWNED, set by one CAS).
        unsafe {
            self.pool
                .map
                .bytes(self.slot + SLOT_HEADER, u64::from(self.len))
        }
    }
}

impl DerefMut for Buf<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the slice unique in this process.
        unsafe {
            self.pool
                .map
                .bytes(self.slot + SLOT_HEADER, u64::from(self.len))
        }
    }
}

impl Drop for Buf<'_> {
    fn drop(&mut self) {
        self.pool.release(self.slot, self.class);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &tempfile::TempDir, size: u64) -> Pool {
        Pool::open_file(&dir.path().join(POOL_FILE), size).unwrap()
    }

    #[test]
    fn alloc_send_take_free() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(&dir, 16 << 20);
        let mut b = p.alloc(100).unwrap();
        assert_eq!((b.len(), b.capacity()), (100, 256));
        b.copy_from_slice(&[7u8; 100]);
        let d = b.into_descriptor();
        // A second mapping of the same file (another process would do the same).
        let q = Pool::open_file(p.path(), 0).unwrap();
        let got = q.take(d).unwrap();
        assert!(got.iter().all(|&x| x == 7));
        drop(got);
        // Freed: the old descriptor is stale now.
        let e = q.take(d).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Stale {
                    generation: 0,
                    current: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("stale descriptor"), "{e}");
    }

    #[test]
    fn rejects_bad_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(&dir, 16 << 20);
        let d = p.alloc(64).unwrap().into_descriptor();
        let e = |d| p.take(d).err().unwrap();
        assert!(matches!(
            e(Descriptor {
                offset: 1 << 40,
                ..d
            }),
            Error::OutOfRange { .. }
        ));
        assert!(matches!(
            e(Descriptor { offset: 3, ..d }),
            Error::OutOfRange { .. }
        ));
        assert!(matches!(
            e(Descriptor {
                offset: d.offset + 8,
                ..d
            }),
            Error::Misaligned { .. }
        ));
        assert!(matches!(
            e(Descriptor { len: 65, ..d }),
            Error::TooLong {
                len: 65,
                capacity: 64
            }
        ));
        assert!(matches!(
            e(Descriptor { generation: 9, ..d }),
            Error::Stale { .. }
        ));
        let b = p.take(d).unwrap();
        assert!(matches!(e(d), Error::NotSent { .. }), "double take");
        drop(b);
        assert!(matches!(
            p.alloc(2 << 20).err().unwrap(),
            Error::TooLarge(_)
        ));
    }

    #[test]
    fn runs_out_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(&dir, HEADER + 2 * CHUNK);
        // 1 MiB slots: 3 per 4 MiB chunk, two chunks.
        let bufs: Vec<_> = (0..6).map(|_| p.alloc(1 << 20).unwrap()).collect();
        assert!(matches!(
            p.alloc(1 << 20).err().unwrap(),
            Error::OutOfMemory(_)
        ));
        assert!(matches!(p.alloc(10).err().unwrap(), Error::OutOfMemory(_)));
        drop(bufs);
        assert_eq!(p.stats().free[7], 6);
        let _again = p.alloc(1 << 20).unwrap();
    }

    #[test]
    fn rejects_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let not_a_pool = |p: &Path| matches!(Pool::open_file(p, 0), Err(Error::NotAPool { .. }));
        std::fs::write(&path, vec![1u8; 16 << 10]).unwrap();
        assert!(not_a_pool(&path));
        std::fs::write(&path, b"tiny").unwrap();
        assert!(not_a_pool(&path));
        let garbage = vec![1u8; usize::try_from(HEADER + CHUNK).unwrap()];
        std::fs::write(&path, &garbage).unwrap();
        assert!(not_a_pool(&path));
        // A creator that died before writing the header: formatted on next open.
        std::fs::write(&path, vec![0u8; garbage.len()]).unwrap();
        let p = Pool::open_file(&path, 0).unwrap();
        drop(p.alloc(10).unwrap());
        assert!(matches!(
            Pool::open_file(&dir.path().join("y"), 4096).err().unwrap(),
            Error::TooSmall { .. }
        ));
    }

    #[test]
    fn refuses_another_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(POOL_FILE);
        drop(Pool::open_file(&path, HEADER + CHUNK).unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        let at = usize::try_from(H_VERSION).unwrap();
        bytes[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = Pool::open_file(&path, 0).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Version {
                    found: 7,
                    expected: VERSION,
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("version 7") && msg.contains("version 1"),
            "{msg}"
        );
    }

    #[test]
    fn threads_under_contention() {
        let dir = tempfile::tempdir().unwrap();
        // Threads that find a class empty at the same time each carve a
        // chunk for it: room for 4 threads × 5 classes.
        let p = pool(&dir, HEADER + 20 * CHUNK);
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let p = &p;
                s.spawn(move || {
                    for i in 0..2000usize {
                        let n = 1 + (i * 37 + usize::from(t)) % 5000;
                        let mut b = p.alloc(n).unwrap();
                        b.fill(t);
                        let d = b.into_descriptor();
                        let b = p.take(d).unwrap();
                        assert!(b.iter().all(|&x| x == t));
                    }
                });
            }
        });
        let s = p.stats();
        assert!(s.chunks_used <= s.chunks);
        assert_eq!(s.free, s.carved, "every slot is back on its list");
    }
}
