// Programmatic dependent launch (Hopper and later). The driver launches the
// decode kernels listed in launch.rs with the programmatic-serialization
// attribute: such a kernel's blocks may start while the kernel before it
// still runs. Until pie_pdl_wait returns they may only read what no kernel
// of this step writes (weights, the step's uploaded tables) and write
// nothing; a GEMV uses that time to load its weights. pie_pdl_wait waits
// until the kernel before has finished and its writes are visible, then
// lets the next kernel start launching (after the wait, so at most two
// kernels overlap). Compiled for older GPUs both helpers are empty, and
// the driver launches every kernel plainly (pie_pdl_probe says which).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PIE_PDL_COMPILED 1
__device__ __forceinline__ void pie_pdl_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
// Asks L2 for `bytes` (a multiple of 16) at the 16-byte aligned `p`.
__device__ __forceinline__ void pie_prefetch_l2(const void* p, unsigned int bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}
#else
#define PIE_PDL_COMPILED 0
__device__ __forceinline__ void pie_pdl_wait() {}
__device__ __forceinline__ void pie_prefetch_l2(const void*, unsigned int) {}
#endif

// Whether this image's kernels carry the waits (compiled for sm_90+).
extern "C" __global__ void pie_pdl_probe(int* out) {
    if (threadIdx.x == 0) out[0] = PIE_PDL_COMPILED;
}
