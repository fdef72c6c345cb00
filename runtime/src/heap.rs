//! Returning freed heap memory to the system at the points of loading where
//! large transients die.
//!
//! Weights live in huge-page arenas outside the heap (`pie_kernels::memory`),
//! so the heap holes left by loading — GGUF vocabulary arrays, rewritten
//! tensor copies — are never reused by them and would stay resident for the
//! life of the process. `malloc_trim` hands their whole pages back.

/// Gives the free pages of the heap back to the system (glibc only; a no-op
/// elsewhere).
pub(crate) fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
