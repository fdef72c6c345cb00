// Fused kernels: several ops of a layer in one launch, where codegen found
// the pattern (codegen/src/fusion.rs). Each computes exactly what the ops
// compute one by one (same formulas, f32), so results match the unfused
// path to rounding. Uses pie_gemv_block (gemv.cu), pie_act (elementwise.cu)
// and pie_block_sum (norm_rope.cu), compiled before this file.

// m = glu(x · Wgᵀ, x · Wuᵀ) for a few rows: each block computes the same
// PIE_GEMV_FEATS features of gate and up, then the activation, so neither
// product goes through memory. With limit > 0, GPT-OSS's clamped SwiGLU.
extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_glu_bf16(float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ wg,
                  const unsigned short* __restrict__ wu, int m, int n, int k, int fn, float limit) {
    int f0 = blockIdx.x * PIE_GEMV_FEATS;
    float g = pie_gemv_block(x, wg, m, n, k, f0);
    float u = pie_gemv_block(x, wu, m, n, k, f0);
    float v;
    if (limit > 0.0f) {
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        v = g / (1.0f + expf(-1.702f * g)) * (u + 1.0f);
    } else {
        v = pie_act(fn, g) * u;
    }
    pie_gemv_store(out, v, m, n, f0);
}

// sum = x + y, out = rms_norm(sum) over each group of `group` features:
// one block per group (blockDim.x a multiple of 32). Each thread
// normalizes the elements it summed, so no other thread's writes are read.
extern "C" __global__ void pie_add_rms_norm(float* sum, float* out, const float* x, const float* y,
                                            const float* w, int has_weight, int group, float eps,
                                            float offset) {
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
        out[base + i] = has_weight ? v * (offset + w[i]) : v;
    }
}

// rope(rms_norm(x)) for per-head norms (group == head_dim): one block per
// (row, head). The normalized head is staged in shared memory, then
// rotated as pie_rope does (same angle formula, in double); features past
// rotary_dim pass through. Needs head_dim <= 512.
extern "C" __global__ void pie_rms_norm_rope(float* out, const float* x, const float* w, int has_weight,
                                             float eps, float offset, const int* positions,
                                             const int* seq_lens, const double* inv_short,
                                             const double* inv_long, int long_from, double scale, int heads,
                                             int head_dim, int rotary_dim, int interleaved) {
    __shared__ float normed[512];
    int r = blockIdx.x / heads;
    const float* xh = x + (long long)blockIdx.x * head_dim;
    float* oh = out + (long long)blockIdx.x * head_dim;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) squares += xh[i] * xh[i];
    float inv = rsqrtf(pie_block_sum(squares) / (float)head_dim + eps);
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float v = xh[i] * inv;
        normed[i] = has_weight ? v * (offset + w[i]) : v;
    }
    __syncthreads();
    const double* freqs = (long_from >= 0 && seq_lens[r] > long_from) ? inv_long : inv_short;
    int half = rotary_dim / 2;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double angle = (double)positions[r] * freqs[j];
        float c = (float)(cos(angle) * scale), s = (float)(sin(angle) * scale);
        int i0 = interleaved ? 2 * j : j;
        int i1 = interleaved ? 2 * j + 1 : j + half;
        float x0 = normed[i0], x1 = normed[i1];
        oh[i0] = x0 * c - x1 * s;
        oh[i1] = x1 * c + x0 * s;
    }
    for (int i = rotary_dim + threadIdx.x; i < head_dim; i += blockDim.x) oh[i] = normed[i];
}
