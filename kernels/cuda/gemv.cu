// Decode-shaped products out[m, n] = x[m, k] · W[n, k]ᵀ for a few rows
// (m ≤ PIE_GEMV_MAX_ROWS): x f32, W bf16 bits, f32 accumulation.
// cuBLAS's GEMMs take 3-4x the weight-read time at this shape and need x
// cast to bf16 first; this reads W once, 16 bytes per lane per load.
//
// A block of 128 threads (4 warps) computes PIE_GEMV_FEATS consecutive
// output features for every row; its threads split k in chunks of 8
// (one 16-byte load of each feature's weights), then the block reduces.
// Requires k % 8 == 0 and 16-byte aligned rows (the driver checks).

#define PIE_GEMV_MAX_ROWS 4
#define PIE_GEMV_FEATS 4
#define PIE_GEMV_THREADS 128

__device__ __forceinline__ void pie_unpack_bf16x8(uint4 raw, float* out) {
    unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(words[i] << 16);
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_bf16(float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ w,
              int m, int n, int k) {
    int f0 = blockIdx.x * PIE_GEMV_FEATS;
    float acc[PIE_GEMV_MAX_ROWS][PIE_GEMV_FEATS];
#pragma unroll
    for (int r = 0; r < PIE_GEMV_MAX_ROWS; r++)
#pragma unroll
        for (int f = 0; f < PIE_GEMV_FEATS; f++) acc[r][f] = 0.0f;

    // Unrolled so the next chunk's weight loads issue before this one's FMAs.
#pragma unroll 2
    for (int c = threadIdx.x * 8; c < k; c += PIE_GEMV_THREADS * 8) {
        float wv[PIE_GEMV_FEATS][8];
#pragma unroll
        for (int f = 0; f < PIE_GEMV_FEATS; f++) {
            if (f0 + f < n) {
                uint4 raw = __ldg((const uint4*)(w + (size_t)(f0 + f) * k + c));
                pie_unpack_bf16x8(raw, wv[f]);
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) wv[f][i] = 0.0f;
            }
        }
#pragma unroll
        for (int r = 0; r < PIE_GEMV_MAX_ROWS; r++) {
            if (r < m) {
                const float4* xr = (const float4*)(x + (size_t)r * k + c);
                float4 a = xr[0], b = xr[1];
                float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int f = 0; f < PIE_GEMV_FEATS; f++)
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[r][f] += wv[f][i] * xv[i];
            }
        }
    }

    // Warp sums, then the 4 warps' partial sums through shared memory.
    __shared__ float partial[PIE_GEMV_THREADS / 32][PIE_GEMV_MAX_ROWS][PIE_GEMV_FEATS];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < PIE_GEMV_MAX_ROWS; r++) {
        if (r >= m) break;  // uniform: rows past m hold nothing
#pragma unroll
        for (int f = 0; f < PIE_GEMV_FEATS; f++) {
            float v = acc[r][f];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) partial[warp][r][f] = v;
        }
    }
    __syncthreads();
    int t = threadIdx.x;
    if (t < PIE_GEMV_MAX_ROWS * PIE_GEMV_FEATS) {
        int r = t / PIE_GEMV_FEATS, f = t % PIE_GEMV_FEATS;
        if (r < m && f0 + f < n) {
            float v = 0.0f;
#pragma unroll
            for (int wi = 0; wi < PIE_GEMV_THREADS / 32; wi++) v += partial[wi][r][f];
            out[(size_t)r * n + f0 + f] = v;
        }
    }
}
