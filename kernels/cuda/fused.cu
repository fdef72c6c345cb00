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
