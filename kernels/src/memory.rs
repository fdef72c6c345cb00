//! Memory hints for the large, long-lived buffers the kernels stream.
//!
//! Decode reads every weight once per token: ~100 MB for SmolLM2-135M in
//! Q4_1, far more than the TLB covers in 4 KiB pages. Backing those buffers
//! with transparent huge pages (2 MiB) removes most page walks from the
//! stream. Linux's default THP mode, `madvise`, only does so for ranges a
//! process asks for, so [`advise_huge_pages`] asks.

/// The huge page size on x86_64 and aarch64 Linux (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole 2 MiB pages inside `buf` with
/// transparent huge pages. Call it before the buffer is first written: the
/// pages faulted in afterwards come as huge pages (a buffer already touched
/// is only collapsed later, by `khugepaged`, if at all). A hint: it does
/// nothing on other systems, for buffers below 2 MiB, or where THP is off.
fn advise_huge_pages<T>(buf: &mut [T]) {
    let start = buf.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(buf);
    let first = start.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let last = end / HUGE_PAGE * HUGE_PAGE;
    if last > first {
        advise(first, last - first);
    }
}

#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) {
    // SAFETY: [addr, addr + len) lies inside a live allocation we hold a
    // mutable borrow of; MADV_HUGEPAGE changes how its pages are backed,
    // never their contents. A failure (THP disabled) leaves it as it was.
    unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize) {}

/// A zeroed, fixed-length buffer of `T` carved out of a shared arena of
/// huge-page-backed chunks. Weights are many matrices of a few hundred KB
/// each (too small for a huge page of their own); packing them side by
/// side lets the whole model stream from 2 MiB pages.
///
/// Chunks are freed when the last buffer in them is dropped (the arena
/// keeps the chunk it is filling).
pub struct HugeBuf<T: bytemuck::Pod> {
    chunk: std::sync::Arc<Chunk>,
    /// Byte offset of the buffer in the chunk (a multiple of [`ALIGN`]).
    offset: usize,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

/// Alignment of every buffer: a cache line, so SIMD loads of one buffer
/// never share a line with another.
const ALIGN: usize = 64;

/// Arena chunk size; larger requests get a chunk of their own.
const CHUNK: usize = 32 << 20;

struct Chunk {
    /// Zeroed by `calloc` (an untouched anonymous mapping at these sizes),
    /// so the huge-page advice precedes the first write.
    bytes: std::cell::UnsafeCell<Box<[u8]>>,
    /// Index of the first [`ALIGN`]-aligned byte: buffers start there.
    start: usize,
}

// SAFETY: every HugeBuf owns a disjoint byte range of its chunk and only
// touches that range; the chunk's memory never moves while shared.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    /// A chunk with at least `size` usable, aligned bytes.
    fn new(size: usize) -> std::sync::Arc<Self> {
        let mut bytes = vec![0u8; size + ALIGN].into_boxed_slice();
        advise_huge_pages(&mut bytes);
        let start = bytes.as_ptr().align_offset(ALIGN);
        std::sync::Arc::new(Chunk {
            bytes: std::cell::UnsafeCell::new(bytes),
            start,
        })
    }

    /// The aligned start of the usable bytes.
    fn base(&self) -> *mut u8 {
        // SAFETY: the box is never replaced; only its contents are written,
        // each buffer within its own range.
        unsafe { (*self.bytes.get()).as_mut_ptr().add(self.start) }
    }

    /// Usable bytes from [`Chunk::base`].
    fn size(&self) -> usize {
        // SAFETY: as in `base`.
        unsafe { (&*self.bytes.get()).len() - self.start }
    }
}

/// The chunk being filled and how many of its bytes are handed out.
static ARENA: std::sync::Mutex<Option<(std::sync::Arc<Chunk>, usize)>> =
    std::sync::Mutex::new(None);

impl<T: bytemuck::Pod> HugeBuf<T> {
    /// `len` zeroed values.
    pub fn zeroed(len: usize) -> Self {
        let bytes = (len * std::mem::size_of::<T>()).next_multiple_of(ALIGN);
        let (chunk, offset) = if bytes > CHUNK / 4 {
            (Chunk::new(bytes), 0)
        } else {
            let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
            match arena.as_mut() {
                Some((chunk, used)) if *used + bytes <= chunk.size() => {
                    let at = *used;
                    *used += bytes;
                    (chunk.clone(), at)
                }
                _ => {
                    let chunk = Chunk::new(CHUNK);
                    *arena = Some((chunk.clone(), bytes));
                    (chunk, 0)
                }
            }
        };
        HugeBuf {
            chunk,
            offset,
            len,
            _values: std::marker::PhantomData,
        }
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `offset..offset + len·size_of::<T>()` lies inside the chunk,
        // is aligned for T (ALIGN ≥ align_of::<T>() for the Pod scalars
        // used here, checked below), zero-initialized and owned by `self`.
        debug_assert!(std::mem::align_of::<T>() <= ALIGN);
        unsafe {
            std::slice::from_raw_parts(self.chunk.base().add(self.offset) as *const T, self.len)
        }
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes the access unique, as no
        // other buffer covers this range.
        unsafe {
            std::slice::from_raw_parts_mut(self.chunk.base().add(self.offset) as *mut T, self.len)
        }
    }
}

impl<T: bytemuck::Pod + std::fmt::Debug> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_disjoint() {
        let mut a = HugeBuf::<u16>::zeroed(1000);
        let mut b = HugeBuf::<u8>::zeroed(3);
        let mut c = HugeBuf::<f32>::zeroed(CHUNK); // a chunk of its own
        for buf in [
            a.as_ptr() as usize,
            b.as_ptr() as usize,
            c.as_ptr() as usize,
        ] {
            assert_eq!(buf % ALIGN, 0);
        }
        assert!(a.iter().all(|&x| x == 0) && b.iter().all(|&x| x == 0));
        a.fill(0xffff);
        b.fill(7);
        c[CHUNK - 1] = 1.5;
        assert!(a.iter().all(|&x| x == 0xffff));
        assert_eq!(&b[..], &[7, 7, 7]);
        assert_eq!((a.len(), b.len(), c.len()), (1000, 3, CHUNK));
        assert_eq!(c[CHUNK - 1], 1.5);
    }

    #[test]
    fn an_empty_buffer_is_fine() {
        let e = HugeBuf::<u8>::zeroed(0);
        assert!(e.is_empty());
    }
}
