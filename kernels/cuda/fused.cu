// Fused kernels: several ops of a layer in one launch, where codegen found
// the pattern (codegen/src/fusion.rs). Each computes exactly what the ops
// compute one by one (same formulas, f32), so results match the unfused
// path to rounding. Uses pie_gemv_block_t (gemv.cu), pie_glu_value
// (elementwise.cu), pie_block_sum and the rope helpers (norm_rope.cu) and
// pie_pdl_wait (pdl.cu), compiled before this file.

// m = glu(x · Wgᵀ, x · Wuᵀ) for a few rows: each block computes the same
// PIE_GEMV_FEATS features of gate and up in one pass over x (PAIR), then
// the activation, so neither product goes through memory. With limit > 0,
// GPT-OSS's clamped SwiGLU. K > 0 bakes in the input width and FN >= 0
// the activation (the `fn` argument is then not read): the _k<K>_<act>
// entry points codegen instantiates (gemv.cu's top comment).
template <int K, int FN, int MR = PIE_GEMV_MAX_ROWS>
__device__ __forceinline__ void pie_gemv_glu_entry(float* __restrict__ out, const float* __restrict__ x,
                                                   const unsigned short* __restrict__ wg,
                                                   const unsigned short* __restrict__ wu, int m, int n, int k, int fn,
                                                   float limit) {
    int f0 = blockIdx.x * PIE_GEMV_FEATS;
    float u;
    float g = pie_gemv_block_t<false, true, K, MR>(x, wg, wu, m, n, k, f0, PieGemvNorm{}, &u);
    pie_gemv_store(out, pie_glu_value(FN >= 0 ? FN : fn, limit, g, u), m, n, f0);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_glu_bf16(float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ wg,
                  const unsigned short* __restrict__ wu, int m, int n, int k, int fn, float limit) {
    pie_gemv_glu_entry<0, -1>(out, x, wg, wu, m, n, k, fn, limit);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_glu_bf16_m1(float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ wg,
                     const unsigned short* __restrict__ wu, int m, int n, int k, int fn, float limit) {
    pie_gemv_glu_entry<0, -1, 1>(out, x, wg, wu, m, n, k, fn, limit);
}

// pie_gemv_glu_bf16 of rms_norm(x + y) · (offset + g) (y, g optional:
// has_y, has_g), writing x + y to `sum` (has_y only): a residual add, the
// norm after it and the MLP's gate/up in one launch (PieGemvNorm, gemv.cu).
template <int K, int FN, int MR = PIE_GEMV_MAX_ROWS>
__device__ __forceinline__ void pie_gemv_glu_norm_entry(float* __restrict__ out, float* sum,
                                                        const float* __restrict__ x, const float* y, int has_y,
                                                        const float* g, int has_g, float eps, float offset,
                                                        const unsigned short* __restrict__ wg,
                                                        const unsigned short* __restrict__ wu, int m, int n, int k,
                                                        int fn, float limit) {
    int f0 = blockIdx.x * PIE_GEMV_FEATS;
    PieGemvNorm nm = {has_y ? y : nullptr, has_g ? g : nullptr, offset, eps, has_y ? sum : nullptr};
    float up;
    float gate = pie_gemv_block_t<true, true, K, MR>(x, wg, wu, m, n, k, f0, nm, &up);
    pie_gemv_store(out, pie_glu_value(FN >= 0 ? FN : fn, limit, gate, up), m, n, f0);
}

// At most 170 registers, so 3 blocks fit an SM (181 unbounded: 2).
extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS, 3)
pie_gemv_glu_norm_bf16(float* __restrict__ out, float* sum, const float* __restrict__ x, const float* y, int has_y,
                       const float* g, int has_g, float eps, float offset, const unsigned short* __restrict__ wg,
                       const unsigned short* __restrict__ wu, int m, int n, int k, int fn, float limit) {
    pie_gemv_glu_norm_entry<0, -1>(out, sum, x, y, has_y, g, has_g, eps, offset, wg, wu, m, n, k, fn, limit);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_glu_norm_bf16_m1(float* __restrict__ out, float* sum, const float* __restrict__ x, const float* y,
                          int has_y, const float* g, int has_g, float eps, float offset,
                          const unsigned short* __restrict__ wg, const unsigned short* __restrict__ wu, int m, int n,
                          int k, int fn, float limit) {
    pie_gemv_glu_norm_entry<0, -1, 1>(out, sum, x, y, has_y, g, has_g, eps, offset, wg, wu, m, n, k, fn, limit);
}

// sum = x + y, out = rms_norm(sum) over each group of `group` features:
// one block per group (blockDim.x a multiple of 32). Each thread
// normalizes the elements it summed, so no other thread's writes are read.
extern "C" __global__ void pie_add_rms_norm(float* sum, float* out, pie_u16* out_bf16, const float* x,
                                            const float* y, const float* w, int has_weight, int group,
                                            float eps, float offset) {
    long long base = (long long)blockIdx.x * group;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < group; i += blockDim.x) {
        float v = x[base + i] + y[base + i];
        sum[base + i] = v;
        squares += v * v;
    }
    float inv = rsqrtf(pie_block_sum(squares) / (float)group + eps);
    for (int i = threadIdx.x; i < group; i += blockDim.x) {
        float v = sum[base + i] * inv;
        v = has_weight ? v * (offset + w[i]) : v;
        out[base + i] = v;
        if (out_bf16) out_bf16[base + i] = pie_f32_to_bf16(v);
    }
}

// rope(rms_norm(x)) of one head (group == head_dim) by one block: the
// normalized head is staged in shared memory, then rotated as pie_rope
// does (same angle formula, in double); features past rotary_dim pass
// through. `head` indexes [rows × heads] heads. Needs head_dim <= 512.
__device__ __forceinline__ void pie_norm_rope_head(float* out, const float* x, const float* w, int has_weight,
                                                   float eps, float offset, long long head, int row,
                                                   const int* positions, const int* seq_lens,
                                                   const double* inv_short, const double* inv_long, int long_from,
                                                   double scale, int head_dim, int rotary_dim, int interleaved) {
    __shared__ float normed[512];
    const float* xh = x + head * head_dim;
    float* oh = out + head * head_dim;
    // The rotation of this thread's first pair needs only the step's
    // uploaded positions: computed before pie_pdl_wait (pdl.cu), while the
    // kernel writing x may still run.
    const double* freqs = pie_rope_freqs(seq_lens, row, inv_short, inv_long, long_from);
    int half = rotary_dim / 2;
    float c0 = 0.0f, s0 = 0.0f;
    if (threadIdx.x < half) pie_rope_cos_sin(positions[row], freqs[threadIdx.x], scale, &c0, &s0);
    pie_pdl_wait();
    float squares = 0.0f;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) squares += xh[i] * xh[i];
    float inv = rsqrtf(pie_block_sum(squares) / (float)head_dim + eps);
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float v = xh[i] * inv;
        normed[i] = has_weight ? v * (offset + w[i]) : v;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float c = c0, s = s0;
        if (j != threadIdx.x) pie_rope_cos_sin(positions[row], freqs[j], scale, &c, &s);
        int i0 = interleaved ? 2 * j : j;
        int i1 = interleaved ? 2 * j + 1 : j + half;
        float x0 = normed[i0], x1 = normed[i1];
        oh[i0] = x0 * c - x1 * s;
        oh[i1] = x1 * c + x0 * s;
    }
    for (int i = rotary_dim + threadIdx.x; i < head_dim; i += blockDim.x) oh[i] = normed[i];
}

// rope(rms_norm(x)) for per-head norms: one block per (row, head).
extern "C" __global__ void pie_rms_norm_rope(float* out, const float* x, const float* w, int has_weight,
                                             float eps, float offset, const int* positions,
                                             const int* seq_lens, const double* inv_short,
                                             const double* inv_long, int long_from, double scale, int heads,
                                             int head_dim, int rotary_dim, int interleaved) {
    pie_norm_rope_head(out, x, w, has_weight, eps, offset, blockIdx.x, blockIdx.x / heads, positions, seq_lens,
                       inv_short, inv_long, long_from, scale, head_dim, rotary_dim, interleaved);
}

// The same for two activations in one launch (queries and keys): the
// first rows × heads_a blocks take a, the rest b. Same rope for both.
extern "C" __global__ void pie_rms_norm_rope2(float* out_a, const float* x_a, const float* w_a, int has_w_a,
                                              float eps_a, float offset_a, int heads_a, float* out_b,
                                              const float* x_b, const float* w_b, int has_w_b, float eps_b,
                                              float offset_b, int heads_b, int rows, const int* positions,
                                              const int* seq_lens, const double* inv_short,
                                              const double* inv_long, int long_from, double scale, int head_dim,
                                              int rotary_dim, int interleaved) {
    long long b = blockIdx.x, first_b = (long long)rows * heads_a;
    if (b < first_b) {
        pie_norm_rope_head(out_a, x_a, w_a, has_w_a, eps_a, offset_a, b, b / heads_a, positions, seq_lens,
                           inv_short, inv_long, long_from, scale, head_dim, rotary_dim, interleaved);
    } else {
        b -= first_b;
        pie_norm_rope_head(out_b, x_b, w_b, has_w_b, eps_b, offset_b, b, b / heads_b, positions, seq_lens,
                           inv_short, inv_long, long_from, scale, head_dim, rotary_dim, interleaved);
    }
}

// pie_add_rms_norm with the row in registers (pie_rms_norm4, norm_rope.cu).
extern "C" __global__ void pie_add_rms_norm4(float* sum, float* out, pie_u16* out_bf16, const float* x,
                                             const float* y, const float* w, int has_weight, int group,
                                             float eps, float offset) {
    long long base = (long long)blockIdx.x * group;
    float4 v[PIE_NORM_CHUNKS];
    float squares = pie_norm_load4(v, x, y, sum, base, group);
    pie_norm_store4(v, squares, out + base, out_bf16 ? out_bf16 + base : nullptr, w, has_weight, group, eps, offset);
}

// The products of one GEMM over matrices stored together (q/k/v), each
// row [n0 | n1 | n2] wide, copied into their own outputs (n2 may be 0).
extern "C" __global__ void pie_split_joined(float* out0, float* out1, float* out2, const float* x, int rows,
                                            int n0, int n1, int n2) {
    int width = n0 + n1 + n2;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * width) return;
    int r = (int)(i / width), c = (int)(i % width);
    float v = x[i];
    if (c < n0) {
        out0[(long long)r * n0 + c] = v;
    } else if (c < n0 + n1) {
        out1[(long long)r * n1 + c - n0] = v;
    } else {
        out2[(long long)r * n2 + c - n0 - n1] = v;
    }
}

// glu of one GEMM over gate and up stored together: each row of gu holds
// the n gate features, then the n up features. out_bf16 (optional) gets
// the result rounded to bf16 too.
extern "C" __global__ void pie_glu_joined(float* out, pie_u16* out_bf16, const float* gu, int fn, float limit,
                                          int rows, int n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n) return;
    long long r = i / n;
    int c = (int)(i % n);
    const float* row = gu + r * 2 * n;
    float v = pie_glu_value(fn, limit, row[c], row[n + c]);
    out[i] = v;
    if (out_bf16) out_bf16[i] = pie_f32_to_bf16(v);
}

// A pre-norm block's MLP half for one row in one launch (the driver's
// add_norm_mlp, drivers/cuda/src/mlp_fold.rs): s = x + y,
// h = rms_norm(s) · (offset + g), m = glu(h · Wgᵀ, h · Wuᵀ), then
// y += x + m · Wdᵀ in y's memory, so y ends as s + down(m). It replaces the
// GLU GEMV and the down GEMV.
//
// Block b computes the PIE_MLP_FEATS GLU features from PIE_MLP_FEATS · b
// (their gate and up rows), then multiplies them by the down weights of
// those features and adds the products into every output of y with vector
// atomics; block 0 adds x too. The summation order of y varies from run
// to run (its last bits are not deterministic).
//
// y is read (for s) and accumulated into by every block: each block reads
// its part of s, then counts itself in `arrivals`, and adds nothing into y
// before every block of the launch has arrived. The driver launches no
// more blocks than the GPU holds at once, and a block arrives before it
// can wait, so every block runs to its arrival. `arrivals` only grows: a
// launch's blocks wait for the next multiple of the grid size above the
// count they found (the driver keeps one counter per grid size).
//
// Two layouts of the down weights: as stored ([k, n]: each output row
// holds the block's features in one 32-byte slice), or transposed once by
// the driver ([n, k]: the block's features are PIE_MLP_FEATS contiguous
// rows), which the block copies into shared memory asynchronously from
// its start, so they arrive while the gate/up rows load.
// Needs k <= PIE_MLP_MAX_K (one chunk of 8 features per thread), k % 8 ==
// 0 and n % PIE_MLP_FEATS == 0.
#define PIE_MLP_FEATS 16
#define PIE_MLP_MAX_K 1024
// Gate/up rows loaded per step: 4 features' gate and up rows.
#define PIE_MLP_GROUP 8

__device__ __forceinline__ void pie_red_add4(float* p, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
#else
    atomicAdd(p, a), atomicAdd(p + 1, b), atomicAdd(p + 2, c), atomicAdd(p + 3, d);
#endif
}

// 16 bytes from global to shared memory without going through registers.
// Before sm_80 (no cp.async) it is a plain copy through registers, so the
// module still compiles for every arch NVRTC may be asked for at start.
__device__ __forceinline__ void pie_copy_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int to = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(gmem) : "memory");
#else
    *(uint4*)smem = __ldg((const uint4*)gmem);
#endif
}

__device__ __forceinline__ void pie_copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    pie_copy_async_commit();
#endif
}

__device__ __forceinline__ void pie_copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    pie_copy_async_wait_all();
#endif
}

// A load that later reads of other blocks' writes are ordered after.
__device__ __forceinline__ unsigned long long pie_load_acquire(const unsigned long long* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
#else
    unsigned long long v = *(volatile const unsigned long long*)p;
    __threadfence();
    return v;
#endif
}

// Gate/up row i (of the block's 2 · PIE_MLP_FEATS): gate rows first.
__device__ __forceinline__ const pie_u16* pie_mlp_row(const pie_u16* wg, const pie_u16* wu, int k, int f0, int i) {
    return (i < PIE_MLP_FEATS ? wg : wu) + (size_t)(f0 + i % PIE_MLP_FEATS) * k;
}

// Row i of step q's group: features 4q .. 4q + 3, gate rows then up rows.
__device__ __forceinline__ int pie_mlp_group_row(int q, int i) {
    return q * 4 + (i < 4 ? i : PIE_MLP_FEATS - 4 + i);
}

// The block's GLU values m[f0 .. f0 + PIE_MLP_FEATS) into `glu` (shared),
// after counting the block in `arrivals` once it has read y; returns the
// count the launch's blocks all reach (for thread 0 to wait for).
__device__ __forceinline__ unsigned long long pie_mlp_glu(const float* y, const float* __restrict__ x,
                                                          const float* __restrict__ g, int has_g, float eps,
                                                          float offset, const pie_u16* __restrict__ wg,
                                                          const pie_u16* __restrict__ wu, int n, int k, int fn,
                                                          float limit, unsigned long long* arrivals,
                                                          uint4 (&cur)[PIE_MLP_GROUP], float* glu) {
    const int t = threadIdx.x, f0 = blockIdx.x * PIE_MLP_FEATS, c = t * 8;
    const bool has_chunk = c < k;
    // This thread's chunk of s = x + y, its squares, and h's scale.
    float s[8], squares = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) s[i] = 0.0f;
    if (has_chunk) {
        const float4* xc = (const float4*)(x + c);
        const float4* yc = (const float4*)(y + c);
        float4 xa = xc[0], xb = xc[1], ya = yc[0], yb = yc[1];
        float xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        float ys[8] = {ya.x, ya.y, ya.z, ya.w, yb.x, yb.y, yb.z, yb.w};
#pragma unroll
        for (int i = 0; i < 8; i++) {
            s[i] = xs[i] + ys[i];
            squares += s[i] * s[i];
            if (has_g) s[i] *= offset + g[c + i];
        }
    }
    // Every thread of the block has read its part of y: count the block in.
    __syncthreads();
    __shared__ unsigned long long all_in;
    if (t == 0) {
        __threadfence();
        unsigned long long before = atomicAdd(arrivals, 1ull);
        all_in = (before / gridDim.x + 1) * gridDim.x;
    }

    // The 2 · PIE_MLP_FEATS dot products with h (unnormalized: 1 / rms
    // scales them at the end), PIE_MLP_GROUP rows at a time, the next
    // group's loads in flight while this one's are used.
    constexpr int STEPS = 2 * PIE_MLP_FEATS / PIE_MLP_GROUP;
    float acc[2 * PIE_MLP_FEATS];
#pragma unroll
    for (int q = 0; q < STEPS; q++) {
        uint4 next[PIE_MLP_GROUP];
        if (q + 1 < STEPS) {
#pragma unroll
            for (int i = 0; i < PIE_MLP_GROUP; i++)
                next[i] = has_chunk ? __ldg((const uint4*)(pie_mlp_row(wg, wu, k, f0, pie_mlp_group_row(q + 1, i)) + c))
                                    : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < PIE_MLP_GROUP; i++) {
            float w[8];
            pie_unpack_bf16x8(cur[i], w);
            float v = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; e++) v += w[e] * s[e];
            acc[pie_mlp_group_row(q, i)] = v;
        }
        if (q + 1 < STEPS) {
#pragma unroll
            for (int i = 0; i < PIE_MLP_GROUP; i++) cur[i] = next[i];
        }
    }

    // Block sums: warps by shuffle, then across the 4 warps (slot
    // 2 · PIE_MLP_FEATS: the squares).
    __shared__ float partial[PIE_GEMV_THREADS / 32][2 * PIE_MLP_FEATS + 1];
    const int warp = t / 32, lane = t % 32;
#pragma unroll
    for (int i = 0; i <= 2 * PIE_MLP_FEATS; i++) {
        float v = i < 2 * PIE_MLP_FEATS ? acc[i] : squares;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) partial[warp][i] = v;
    }
    __syncthreads();
    if (t < PIE_MLP_FEATS) {
        float gate = 0.0f, up = 0.0f, sq = 0.0f;
#pragma unroll
        for (int w = 0; w < PIE_GEMV_THREADS / 32; w++) {
            gate += partial[w][t];
            up += partial[w][PIE_MLP_FEATS + t];
            sq += partial[w][2 * PIE_MLP_FEATS];
        }
        // The same 1 / rms as pie_rms_norm.
        float inv = rsqrtf(sq / (float)k + eps);
        glu[t] = pie_glu_value(fn, limit, gate * inv, up * inv);
    }
    return all_in;
}

// Thread 0 waits until every block of the launch has read y (long done:
// blocks arrive first), then the block goes on.
__device__ __forceinline__ void pie_mlp_wait_all(const unsigned long long* arrivals, unsigned long long all_in) {
    if (threadIdx.x == 0) {
        unsigned long long seen;
        do {
            seen = pie_load_acquire(arrivals);
        } while (seen < all_in);
    }
    __syncthreads();
}

// Before the wait: the first group's gate/up weights into registers, and
// L2 asked for the rest of the block's gate/up rows (nothing here depends
// on the kernel before).
__device__ __forceinline__ void pie_mlp_prologue(const pie_u16* __restrict__ wg, const pie_u16* __restrict__ wu,
                                                 int k, uint4 (&cur)[PIE_MLP_GROUP]) {
    const int t = threadIdx.x, f0 = blockIdx.x * PIE_MLP_FEATS, c = t * 8;
#pragma unroll
    for (int i = 0; i < PIE_MLP_GROUP; i++)
        cur[i] = c < k ? __ldg((const uint4*)(pie_mlp_row(wg, wu, k, f0, pie_mlp_group_row(0, i)) + c))
                       : make_uint4(0, 0, 0, 0);
    if (t < 2 * PIE_MLP_FEATS) pie_prefetch_l2(pie_mlp_row(wg, wu, k, f0, t), (unsigned int)k * 2u);
}

// Down weights as stored: [k, n].
extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS, 2)
pie_mlp_fold_bf16_m1(float* y, const float* __restrict__ x, const float* __restrict__ g, int has_g, float eps,
                     float offset, const pie_u16* __restrict__ wg, const pie_u16* __restrict__ wu,
                     const pie_u16* __restrict__ wd, int n, int k, int fn, float limit,
                     unsigned long long* arrivals) {
    uint4 cur[PIE_MLP_GROUP];
    pie_mlp_prologue(wg, wu, k, cur);
    pie_pdl_wait();
    __shared__ float glu[PIE_MLP_FEATS];
    unsigned long long all_in = pie_mlp_glu(y, x, g, has_g, eps, offset, wg, wu, n, k, fn, limit, arrivals, cur, glu);
    pie_mlp_wait_all(arrivals, all_in);
    float m[PIE_MLP_FEATS];
#pragma unroll
    for (int i = 0; i < PIE_MLP_FEATS; i++) m[i] = glu[i];
    // 4 output rows per step, each row's weights of these features one
    // 32-byte slice. Blocks start at different rows so that their atomics
    // spread over the output.
    const int f0 = blockIdx.x * PIE_MLP_FEATS, quads = k / 4;
    for (int j = threadIdx.x; j < quads; j += PIE_GEMV_THREADS) {
        int qd = (j + blockIdx.x * 8) % quads;
        float v[4];
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const uint4* row = (const uint4*)(wd + (size_t)(4 * qd + r) * n + f0);
            float w0[8], w1[8];
            pie_unpack_bf16x8(__ldg(row), w0);
            pie_unpack_bf16x8(__ldg(row + 1), w1);
            float sum = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; e++) sum += w0[e] * m[e] + w1[e] * m[8 + e];
            v[r] = blockIdx.x == 0 ? sum + x[4 * qd + r] : sum;
        }
        pie_red_add4(y + 4 * qd, v[0], v[1], v[2], v[3]);
    }
}

// Down weights transposed: wdt [n, k]. The block's PIE_MLP_FEATS rows of
// it go to shared memory by asynchronous copies issued first.
extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS, 2)
pie_mlp_fold_t_bf16_m1(float* y, const float* __restrict__ x, const float* __restrict__ g, int has_g, float eps,
                       float offset, const pie_u16* __restrict__ wg, const pie_u16* __restrict__ wu,
                       const pie_u16* __restrict__ wdt, int n, int k, int fn, float limit,
                       unsigned long long* arrivals) {
    __shared__ __align__(16) pie_u16 tile[PIE_MLP_FEATS * PIE_MLP_MAX_K];
    const int t = threadIdx.x, f0 = blockIdx.x * PIE_MLP_FEATS;
    // The block's rows are contiguous: PIE_MLP_FEATS · k values.
    const pie_u16* rows = wdt + (size_t)f0 * k;
    for (int i = t; i < PIE_MLP_FEATS * k / 8; i += PIE_GEMV_THREADS) pie_copy_async16(tile + 8 * i, rows + 8 * i);
    pie_copy_async_commit();
    uint4 cur[PIE_MLP_GROUP];
    pie_mlp_prologue(wg, wu, k, cur);
    pie_pdl_wait();
    __shared__ float glu[PIE_MLP_FEATS];
    unsigned long long all_in = pie_mlp_glu(y, x, g, has_g, eps, offset, wg, wu, n, k, fn, limit, arrivals, cur, glu);
    pie_copy_async_wait_all();
    pie_mlp_wait_all(arrivals, all_in);  // its __syncthreads also publishes the tile
    float m[PIE_MLP_FEATS];
#pragma unroll
    for (int i = 0; i < PIE_MLP_FEATS; i++) m[i] = glu[i];
    // 8 outputs per step: one 16-byte piece of each feature's row.
    const int octets = k / 8;
    for (int j = t; j < octets; j += PIE_GEMV_THREADS) {
        int o = (j + blockIdx.x * 8) % octets;
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = blockIdx.x == 0 ? x[8 * o + e] : 0.0f;
#pragma unroll
        for (int f = 0; f < PIE_MLP_FEATS; f++) {
            float w[8];
            pie_unpack_bf16x8(*(const uint4*)(tile + f * k + 8 * o), w);
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] += w[e] * m[f];
        }
        pie_red_add4(y + 8 * o, v[0], v[1], v[2], v[3]);
        pie_red_add4(y + 8 * o + 4, v[4], v[5], v[6], v[7]);
    }
}

// out [cols, rows] = inᵀ for a bf16 matrix in [rows, cols] (32 × 32 tiles
// through shared memory; blockDim 32 × 8).
extern "C" __global__ void pie_transpose_bf16(pie_u16* out, const pie_u16* in, int rows, int cols) {
    __shared__ pie_u16 tile[32][33];
    int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int i = threadIdx.y; i < 32; i += 8) {
        int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = in[(size_t)r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        int c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) out[(size_t)c * rows + r] = tile[threadIdx.x][i];
    }
}
