// RMSNorm and rotary embeddings of the CUDA driver (f32 activations).

// Sum of `v` over the block (blockDim.x a multiple of 32, <= 1024), by
// warp shuffles and one step through shared memory; every thread gets it.
__device__ __forceinline__ float pie_block_sum(float v) {
    __shared__ float warp_sums[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // warp_sums may still be read from a previous call
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One block per group of `group` features; blockDim.x a power of two,
// 32..1024. out = x / rms(x) * (offset + w), w optional (has_weight = 0:
// no scale); out_bf16 (optional) gets the same values rounded to bf16.
extern "C" __global__ void pie_rms_norm(float* out, pie_u16* out_bf16, const float* x, const float* w,
                                        int has_weight, int group, float eps, float offset) {
    const float* xg = x + (long long)blockIdx.x * group;
    float* og = out + (long long)blockIdx.x * group;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < group; i += blockDim.x) sum += xg[i] * xg[i];
    float inv = rsqrtf(pie_block_sum(sum) / (float)group + eps);
    for (int i = threadIdx.x; i < group; i += blockDim.x) {
        float v = xg[i] * inv;
        v = has_weight ? v * (offset + w[i % group]) : v;
        og[i] = v;
        if (out_bf16) out_bf16[(long long)blockIdx.x * group + i] = pie_f32_to_bf16(v);
    }
}

// Row norms with the row held in registers, for groups of a multiple of 4
// features (at most 4 * PIE_NORM_CHUNKS per thread): thread t owns the
// float4s t, t + blockDim.x, ..., all loaded at once, so a row costs one
// memory round trip instead of one per blockDim.x features (the strided
// loop above left decode-sized batches waiting on latency).
#define PIE_NORM_CHUNKS 4

// The float4 of chunk c this thread owns, or -1 past the group.
__device__ __forceinline__ int pie_norm_chunk(int c, int group) {
    int i = (c * (int)blockDim.x + (int)threadIdx.x) * 4;
    return i < group ? i : -1;
}

// Loads the thread's chunks of the row at `base` into v: x, or x + y when
// y is set (the sum also written to `sum`, when set). Returns the sum of
// their squares (chunks past the group are zeros).
__device__ __forceinline__ float pie_norm_load4(float4 (&v)[PIE_NORM_CHUNKS], const float* x, const float* y,
                                                float* sum, long long base, int group) {
    float squares = 0.0f;
#pragma unroll
    for (int c = 0; c < PIE_NORM_CHUNKS; c++) {
        int i = pie_norm_chunk(c, group);
        if (i < 0) {
            v[c] = make_float4(0.f, 0.f, 0.f, 0.f);
            continue;
        }
        v[c] = *(const float4*)(x + base + i);
        if (y) {
            float4 b = *(const float4*)(y + base + i);
            v[c] = make_float4(v[c].x + b.x, v[c].y + b.y, v[c].z + b.z, v[c].w + b.w);
        }
        if (sum) *(float4*)(sum + base + i) = v[c];
        squares += v[c].x * v[c].x + v[c].y * v[c].y + v[c].z * v[c].z + v[c].w * v[c].w;
    }
    return squares;
}

// Scales the thread's chunks `v` by 1 / rms (of the block's `squares`) and
// (offset + w), writing them to og (and rounded to bf16 to ob, if set).
__device__ __forceinline__ void pie_norm_store4(float4 (&v)[PIE_NORM_CHUNKS], float squares, float* og, pie_u16* ob,
                                                const float* w, int has_weight, int group, float eps,
                                                float offset) {
    float inv = rsqrtf(pie_block_sum(squares) / (float)group + eps);
#pragma unroll
    for (int c = 0; c < PIE_NORM_CHUNKS; c++) {
        int i = pie_norm_chunk(c, group);
        if (i < 0) break;
        float4 s = make_float4(v[c].x * inv, v[c].y * inv, v[c].z * inv, v[c].w * inv);
        if (has_weight) {
            float4 g = *(const float4*)(w + i);
            s = make_float4(s.x * (offset + g.x), s.y * (offset + g.y), s.z * (offset + g.z), s.w * (offset + g.w));
        }
        *(float4*)(og + i) = s;
        if (ob) {
            uint2 packed = make_uint2(pie_f32_to_bf16(s.x) | ((unsigned int)pie_f32_to_bf16(s.y) << 16),
                                      pie_f32_to_bf16(s.z) | ((unsigned int)pie_f32_to_bf16(s.w) << 16));
            *(uint2*)(ob + i) = packed;
        }
    }
}

// pie_rms_norm for groups the register path takes (`norm_launch`, drivers/cuda/src/fused.rs).
extern "C" __global__ void pie_rms_norm4(float* out, pie_u16* out_bf16, const float* x, const float* w,
                                         int has_weight, int group, float eps, float offset) {
    long long base = (long long)blockIdx.x * group;
    float4 v[PIE_NORM_CHUNKS];
    float squares = pie_norm_load4(v, x, nullptr, nullptr, base, group);
    pie_norm_store4(v, squares, out + base, out_bf16 ? out_bf16 + base : nullptr, w, has_weight, group, eps, offset);
}

// A row's inverse frequencies: the long ones when its sequence is longer
// than `long_from` (LongRoPE; long_from < 0: never).
__device__ __forceinline__ const double* pie_rope_freqs(const int* seq_lens, int row, const double* inv_short,
                                                        const double* inv_long, int long_from) {
    return (long_from >= 0 && seq_lens[row] > long_from) ? inv_long : inv_short;
}

// cos and sin, times `scale`, of the angle position · freq: the angle in
// double (positions reach 1e5 and more), reduced to [-π, π] in double,
// then a float sincosf — float-accurate (the results are floats) at a
// fraction of the cost of double cos and sin, which the decode attention
// (PieQkNormRope) pays before its loop.
__device__ __forceinline__ void pie_rope_cos_sin(int position, double freq, double scale, float* c, float* s) {
    double angle = (double)position * freq;
    double turns = rint(angle * 0.15915494309189533577);  // angle / 2π
    float reduced = (float)fma(-turns, 6.28318530717958647693, angle);
    float sr, cr;
    sincosf(reduced, &sr, &cr);
    *c = (float)((double)cr * scale), *s = (float)((double)sr * scale);
}

// Rotates the first `rotary_dim` features of every head of every row of
// `src` into `x` (src == x: in place; else x's other features are not
// written, so out of place needs rotary_dim == head_dim). One thread per (row, head, pair). A row uses the long frequencies
// when its sequence is longer than `long_from` (LongRoPE; long_from < 0: never).
// interleaved = 1 rotates adjacent pairs (2j, 2j+1), else (j, j + rotary_dim/2).
extern "C" __global__ void pie_rope(float* x, const float* src, const int* positions, const int* seq_lens,
                                    const double* inv_short, const double* inv_long, int long_from,
                                    double scale, int rows, int heads, int head_dim, int rotary_dim,
                                    int interleaved) {
    int half = rotary_dim / 2;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * heads * half) return;
    int j = i % half;
    int h = (i / half) % heads;
    int r = i / ((long long)half * heads);
    float c, s;
    pie_rope_cos_sin(positions[r], pie_rope_freqs(seq_lens, r, inv_short, inv_long, long_from)[j], scale, &c, &s);
    long long base = (long long)r * heads * head_dim + (long long)h * head_dim;
    float* head = x + base;
    int i0 = interleaved ? 2 * j : j;
    int i1 = interleaved ? 2 * j + 1 : j + half;
    float x0 = src[base + i0], x1 = src[base + i1];
    head[i0] = x0 * c - x1 * s;
    head[i1] = x1 * c + x0 * s;
}

// LayerNorm of each row: (x - mean) / sqrt(var + eps) * w + b (w, b
// optional). One block per row; blockDim.x a power of two.
extern "C" __global__ void pie_layer_norm(float* out, const float* x, const float* w, const float* b,
                                          int has_weight, int has_bias, int width, float eps) {
    extern __shared__ float pie_ln[];
    const float* xr = x + (long long)blockIdx.x * width;
    float* o = out + (long long)blockIdx.x * width;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) sum += xr[i];
    pie_ln[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) pie_ln[threadIdx.x] += pie_ln[threadIdx.x + s];
        __syncthreads();
    }
    float mean = pie_ln[0] / (float)width;
    __syncthreads();
    float var = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) var += (xr[i] - mean) * (xr[i] - mean);
    pie_ln[threadIdx.x] = var;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) pie_ln[threadIdx.x] += pie_ln[threadIdx.x + s];
        __syncthreads();
    }
    float inv = rsqrtf(pie_ln[0] / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        o[i] = (xr[i] - mean) * inv * (has_weight ? w[i] : 1.0f) + (has_bias ? b[i] : 0.0f);
}

// sqrt(mean(x²)) of each group of `group` features: one block per group.
extern "C" __global__ void pie_rms(float* out, const float* x, int group) {
    const float* xg = x + (long long)blockIdx.x * group;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < group; i += blockDim.x) sum += xg[i] * xg[i];
    sum = pie_block_sum(sum);
    if (threadIdx.x == 0) out[blockIdx.x] = sqrtf(sum / (float)group);
}

// relu(x − mean − z·std) of each row (population std): one block per row.
extern "C" __global__ void pie_gaussian_topk(float* out, const float* x, int width, float z) {
    const float* xr = x + (long long)blockIdx.x * width;
    float* o = out + (long long)blockIdx.x * width;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) sum += xr[i];
    float mean = pie_block_sum(sum) / (float)width;
    float var = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) var += (xr[i] - mean) * (xr[i] - mean);
    float cutoff = mean + sqrtf(pie_block_sum(var) / (float)width) * z;
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = fmaxf(xr[i] - cutoff, 0.0f);
}
