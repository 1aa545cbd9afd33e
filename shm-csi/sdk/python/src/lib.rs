//! `spright._spright`: the Rust SDK (`spright-shm`) for Python. The package
//! `spright` (python/spright) re-exports it and adds the socket helpers.
//!
//! A `Buf` keeps its pool alive (an `Arc`) and holds the Rust `Buf` with its
//! lifetime erased; the buffer protocol gives Python a writable
//! `memoryview` straight onto the payload in the shared mapping. While a
//! view is exported the buffer cannot be resized, sent or released
//! (`BufferError`), so no view ever outlives its slot's ownership.

use std::{
    ffi::c_int,
    mem::ManuallyDrop,
    net::TcpListener,
    os::fd::{FromRawFd, RawFd},
    path::PathBuf,
    sync::Arc,
};

use pyo3::{
    create_exception,
    exceptions::{PyBufferError, PyException, PyOSError, PyValueError},
    ffi,
    prelude::*,
    types::PyBytes,
};
use spright_shm::Error;

create_exception!(
    _spright,
    SprightError,
    PyException,
    "Base of the SDK's errors."
);
create_exception!(
    _spright,
    NotAPool,
    SprightError,
    "The file is not a spright pool."
);
create_exception!(
    _spright,
    VersionMismatch,
    SprightError,
    "The pool has another layout version than this SDK (the message names both)."
);
create_exception!(
    _spright,
    OutOfMemory,
    SprightError,
    "The pool has no free buffer of that size."
);
create_exception!(
    _spright,
    TooLarge,
    SprightError,
    "An allocation over the largest size class (1 MiB), or a pool under one chunk."
);
create_exception!(
    _spright,
    InvalidDescriptor,
    SprightError,
    "A descriptor out of range, misaligned or longer than its slot."
);
create_exception!(
    _spright,
    StaleDescriptor,
    InvalidDescriptor,
    "A descriptor of a slot that was freed (or freed and reused)."
);
create_exception!(
    _spright,
    AlreadyTaken,
    InvalidDescriptor,
    "A descriptor that was already taken (or never sent)."
);

fn error(e: &Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, format!("{msg}: {source}"))),
            None => PyOSError::new_err(format!("{msg}: {source}")),
        },
        Error::NotAPool { .. } => NotAPool::new_err(msg),
        Error::Version { .. } => VersionMismatch::new_err(msg),
        Error::TooSmall { .. } | Error::TooLarge(_) => TooLarge::new_err(msg),
        Error::OutOfMemory(_) => OutOfMemory::new_err(msg),
        Error::OutOfRange { .. } | Error::Misaligned { .. } | Error::TooLong { .. } => {
            InvalidDescriptor::new_err(msg)
        }
        Error::Stale { .. } => StaleDescriptor::new_err(msg),
        Error::NotSent { .. } => AlreadyTaken::new_err(msg),
    }
}

/// A buffer's place in the pool as it crosses a socket.
#[pyclass(frozen, eq, hash, module = "spright")]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Descriptor {
    #[pyo3(get)]
    offset: u64,
    #[pyo3(get)]
    len: u32,
    #[pyo3(get)]
    generation: u32,
}

impl From<spright_shm::Descriptor> for Descriptor {
    fn from(d: spright_shm::Descriptor) -> Self {
        Self {
            offset: d.offset,
            len: d.len,
            generation: d.generation,
        }
    }
}

impl From<Descriptor> for spright_shm::Descriptor {
    fn from(d: Descriptor) -> Self {
        Self {
            offset: d.offset,
            len: d.len,
            generation: d.generation,
        }
    }
}

#[pymethods]
impl Descriptor {
    #[classattr]
    const WIRE_SIZE: usize = spright_shm::Descriptor::WIRE_SIZE;

    #[new]
    fn new(offset: u64, len: u32, generation: u32) -> Self {
        Self {
            offset,
            len,
            generation,
        }
    }

    /// The 16-byte wire form (little-endian offset, len, generation).
    #[expect(
        clippy::wrong_self_convention,
        reason = "Python methods take self by reference"
    )]
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &spright_shm::Descriptor::from(*self).to_bytes())
    }

    #[staticmethod]
    fn from_bytes(b: &[u8]) -> PyResult<Self> {
        let b: [u8; 16] = b.try_into().map_err(|_| {
            PyValueError::new_err(format!("a descriptor is 16 bytes, not {}", b.len()))
        })?;
        Ok(spright_shm::Descriptor::from_bytes(b).into())
    }

    fn __repr__(&self) -> String {
        format!(
            "Descriptor(offset={}, len={}, generation={})",
            self.offset, self.len, self.generation
        )
    }
}

/// Pool counters: with nothing owned or in flight, `free == carved`.
#[pyclass(frozen, get_all, module = "spright")]
struct Stats {
    chunks: u32,
    chunks_used: u32,
    free: Vec<u32>,
    carved: Vec<u32>,
}

#[pymethods]
impl Stats {
    /// Whether every carved slot is back on its free list.
    fn all_free(&self) -> bool {
        self.free == self.carved
    }

    fn __repr__(&self) -> String {
        format!(
            "Stats(chunks={}, chunks_used={}, free={:?}, carved={:?})",
            self.chunks, self.chunks_used, self.free, self.carved
        )
    }
}

/// A chain's pool, mapped into this process.
#[pyclass(frozen, module = "spright")]
struct Pool {
    inner: Arc<spright_shm::Pool>,
}

#[pymethods]
impl Pool {
    /// Opens the pool of a mounted chain region (a directory: created with
    /// all of its space on first use) or a pool file (created with at most
    /// `size` bytes if it does not exist).
    #[new]
    #[pyo3(signature = (path, size = 0))]
    fn new(py: Python<'_>, path: PathBuf, size: u64) -> PyResult<Self> {
        let pool = py.detach(|| {
            if path.is_dir() {
                spright_shm::Pool::open(&path)
            } else {
                spright_shm::Pool::open_file(&path, size)
            }
        });
        Ok(Self {
            inner: Arc::new(pool.map_err(|e| error(&e))?),
        })
    }

    /// Allocates a buffer of `len` bytes (its capacity is the size class).
    fn alloc(&self, len: usize) -> PyResult<Buf> {
        let b = self.inner.alloc(len).map_err(|e| error(&e))?;
        Ok(Buf::new(&self.inner, b))
    }

    /// Takes ownership of the buffer a peer sent.
    fn take(&self, d: Descriptor) -> PyResult<Buf> {
        let b = self.inner.take(d.into()).map_err(|e| error(&e))?;
        Ok(Buf::new(&self.inner, b))
    }

    fn stats(&self) -> Stats {
        let s = self.inner.stats();
        Stats {
            chunks: s.chunks,
            chunks_used: s.chunks_used,
            free: s.free.to_vec(),
            carved: s.carved.to_vec(),
        }
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    fn __repr__(&self) -> String {
        format!("Pool({:?})", self.inner.path().display().to_string())
    }
}

/// A buffer this process owns. `memoryview(buf)` is a writable view of the
/// payload in shared memory (no copy). `into_descriptor()` gives it up to a
/// peer; `release()` (or the end of a `with` block, or garbage collection)
/// frees it.
#[pyclass(module = "spright")]
struct Buf {
    // Declared before `pool`: dropped first, while the mapping is alive.
    inner: Option<spright_shm::Buf<'static>>,
    pool: Arc<spright_shm::Pool>,
    exports: usize,
}

impl Buf {
    fn new(pool: &Arc<spright_shm::Pool>, b: spright_shm::Buf<'_>) -> Self {
        // SAFETY: only the lifetime changes: the Buf borrows the pool that
        // `self.pool` keeps alive, and is dropped before it (field order).
        let buf =
            unsafe { std::mem::transmute::<spright_shm::Buf<'_>, spright_shm::Buf<'static>>(b) };
        Self {
            inner: Some(buf),
            pool: Arc::clone(pool),
            exports: 0,
        }
    }

    fn live(&mut self) -> PyResult<&mut spright_shm::Buf<'static>> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("the buffer was sent or released"))
    }

    /// Takes the buffer out (to send or free it), refused while a
    /// memoryview of it is alive.
    fn give_up(&mut self) -> PyResult<spright_shm::Buf<'static>> {
        if self.exports > 0 {
            return Err(PyBufferError::new_err(
                "a memoryview of the buffer is still alive (release it first)",
            ));
        }
        self.live()?;
        Ok(self.inner.take().expect("checked above"))
    }
}

#[pymethods]
impl Buf {
    fn __len__(&self) -> usize {
        self.inner.as_ref().map_or(0, |b| b.len())
    }

    /// The size class: the most `set_len` accepts.
    #[getter]
    fn capacity(&self) -> usize {
        self.inner.as_ref().map_or(0, spright_shm::Buf::capacity)
    }

    /// Whether this object still owns its buffer.
    #[getter]
    fn owned(&self) -> bool {
        self.inner.is_some()
    }

    /// Sets the payload length (at most the capacity).
    fn set_len(&mut self, len: usize) -> PyResult<()> {
        if self.exports > 0 {
            return Err(PyBufferError::new_err(
                "cannot resize a buffer while a memoryview of it is alive",
            ));
        }
        let b = self.live()?;
        if len > b.capacity() {
            return Err(PyValueError::new_err(format!(
                "length {len} over the buffer's capacity {}",
                b.capacity()
            )));
        }
        b.set_len(len);
        Ok(())
    }

    /// Gives the buffer up for a peer to take.
    #[expect(
        clippy::wrong_self_convention,
        reason = "Python methods take self by reference"
    )]
    fn into_descriptor(&mut self) -> PyResult<Descriptor> {
        Ok(self.give_up()?.into_descriptor().into())
    }

    /// Frees the buffer now (its descriptors go stale).
    fn release(&mut self) -> PyResult<()> {
        drop(self.give_up()?);
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&mut self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        if self.inner.is_some() {
            self.release()?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Some(b) => format!("Buf(len={}, capacity={})", b.len(), b.capacity()),
            None => "Buf(<sent or released>)".into(),
        }
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let mut me = slf.borrow_mut();
            let b = me.live()?;
            let (ptr, len) = (b.as_mut_ptr(), b.len());
            me.exports += 1;
            (ptr, len)
        };
        let len = isize::try_from(len).expect("at most 1 MiB");
        // SAFETY: `view` is the caller's Py_buffer; `ptr..ptr+len` is this
        // buffer's payload, valid while it is owned, which `exports` keeps
        // so until `__releasebuffer__`; the view holds a reference to `slf`.
        let rc = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len, 0, flags) };
        if rc != 0 {
            slf.borrow_mut().exports -= 1;
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(slf: Bound<'_, Self>, _view: *mut ffi::Py_buffer) {
        let mut me = slf.borrow_mut();
        me.exports = me.exports.saturating_sub(1);
    }
}

/// The pool layout version this SDK reads and writes.
#[pyfunction]
fn pool_version() -> u32 {
    spright_shm::POOL_VERSION
}

/// Runs an event-driven stage (see `spright.stage`). `fd` is a listening
/// TCP socket's descriptor; it stays open and the caller's.
#[pyfunction]
#[pyo3(signature = (pool, fd, next, function))]
fn stage_fd(
    py: Python<'_>,
    pool: &Pool,
    fd: RawFd,
    next: Option<String>,
    function: Py<PyAny>,
) -> PyResult<()> {
    if fd < 0 {
        return Err(PyValueError::new_err("a negative file descriptor"));
    }
    // SAFETY: a non-negative fd the caller owns; we use a duplicate of it.
    let borrowed = ManuallyDrop::new(unsafe { TcpListener::from_raw_fd(fd) });
    let listener = borrowed.try_clone()?;
    let arc = Arc::clone(&pool.inner);
    let mut failed: Option<PyErr> = None;
    let result = py.detach(|| {
        spright_shm::event::try_stage(&arc, listener, next.as_deref(), |b| {
            Python::attach(|py| match run_one(py, &arc, b, &function) {
                Ok(out) => Some(out),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            })
        })
    });
    if let Some(e) = failed {
        return Err(e);
    }
    result?;
    Ok(())
}

/// Calls the stage function on one payload; frees the payload if it raises.
fn run_one(
    py: Python<'_>,
    pool: &Arc<spright_shm::Pool>,
    b: spright_shm::Buf<'_>,
    function: &Py<PyAny>,
) -> PyResult<spright_shm::Buf<'static>> {
    py.check_signals()?;
    let input = Py::new(py, Buf::new(pool, b))?;
    match function.call1(py, (input.clone_ref(py),)) {
        Ok(out) => {
            let out = out.bind(py).cast::<Buf>().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err("a stage function must return a spright.Buf")
            })?;
            let mut out = out.borrow_mut();
            if !Arc::ptr_eq(&out.pool, pool) {
                return Err(PyValueError::new_err(
                    "a stage function must return a buffer of the stage's pool",
                ));
            }
            out.give_up()
        }
        Err(e) => {
            // The frames of the traceback hold the function's locals (the
            // buffer, views of it): clear them so the payload is freed now.
            if let Some(tb) = e.traceback(py) {
                let _ = py
                    .import("traceback")
                    .and_then(|m| m.call_method1("clear_frames", (tb,)));
            }
            // Still exported or in use elsewhere: freed when its object goes.
            if let Ok(mut input) = input.try_borrow_mut(py)
                && input.exports == 0
            {
                input.inner = None;
            }
            Err(e)
        }
    }
}

#[pymodule]
fn _spright(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Pool>()?;
    m.add_class::<Buf>()?;
    m.add_class::<Descriptor>()?;
    m.add_class::<Stats>()?;
    m.add_function(wrap_pyfunction!(pool_version, m)?)?;
    m.add_function(wrap_pyfunction!(stage_fd, m)?)?;
    m.add("POOL_VERSION", spright_shm::POOL_VERSION)?;
    m.add("MAX_PAYLOAD", spright_shm::CLASS_SIZES[7])?;
    m.add("Error", py.get_type::<SprightError>())?;
    m.add("NotAPool", py.get_type::<NotAPool>())?;
    m.add("VersionMismatch", py.get_type::<VersionMismatch>())?;
    m.add("OutOfMemory", py.get_type::<OutOfMemory>())?;
    m.add("TooLarge", py.get_type::<TooLarge>())?;
    m.add("InvalidDescriptor", py.get_type::<InvalidDescriptor>())?;
    m.add("StaleDescriptor", py.get_type::<StaleDescriptor>())?;
    m.add("AlreadyTaken", py.get_type::<AlreadyTaken>())?;
    Ok(())
}
