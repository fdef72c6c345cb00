//! Returning freed heap memory to the system at the points of loading where
//! large transients die.
//!
//! Weights live in huge-page arenas outside the heap (`pie_kernels::memory`),
//! so the heap holes left by loading — GGUF vocabulary arrays, rewritten
//! tensor copies — are never reused by them and would stay resident for the
//! life of the process. `malloc_trim` hands their whole pages back.

/// Gives the free pages of the heap back to the system (glibc only; a no-op
/// elsewhere).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes every thread allocate from glibc's main arena. By default each
/// thread that allocates gets an arena of its own (up to 8 per core) whose
/// freed memory stays resident: at two portable-driver threads that was
/// 0–6 MB of peak RSS, varying run to run (SmolLM2 Q4_1: 133–139 MB, one
/// arena: 133 MB every run). After load the allocations are few and short
/// (activations, per-task scratch), so one arena costs no measurable time
/// (interleaved A/B at 2 threads: 113–135 tok/s decode with per-thread
/// arenas, 121–149 with one). Call before the first thread starts.
pub fn use_one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's policy for new arenas.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
