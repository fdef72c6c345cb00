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

// The block's share of out = x · Wᵀ: features f0 .. f0 + PIE_GEMV_FEATS
// of every row. Thread t < m · PIE_GEMV_FEATS gets the sum for row
// t / PIE_GEMV_FEATS, feature f0 + t % PIE_GEMV_FEATS; the others get 0.
// Every thread of the block must call it (it synchronizes).
__device__ __forceinline__ float pie_gemv_block(const float* __restrict__ x, const unsigned short* __restrict__ w,
                                                int m, int n, int k, int f0) {
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
    __syncthreads();  // a previous call's readers are done with `partial`
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
    float v = 0.0f;
    if (t < m * PIE_GEMV_FEATS) {
#pragma unroll
        for (int wi = 0; wi < PIE_GEMV_THREADS / 32; wi++) v += partial[wi][t / PIE_GEMV_FEATS][t % PIE_GEMV_FEATS];
    }
    return v;
}

// Writes the block's sums (from pie_gemv_block) into out [m, n].
__device__ __forceinline__ void pie_gemv_store(float* out, float v, int m, int n, int f0) {
    int t = threadIdx.x, r = t / PIE_GEMV_FEATS, f = f0 + t % PIE_GEMV_FEATS;
    if (t < m * PIE_GEMV_FEATS && f < n) out[(size_t)r * n + f] = v;
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_bf16(float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ w,
              int m, int n, int k) {
    int f0 = blockIdx.x * PIE_GEMV_FEATS;
    pie_gemv_store(out, pie_gemv_block(x, w, m, n, k, f0), m, n, f0);
}

// Up to three products of one x in one launch (q/k/v projections): the
// first ceil(n0 / FEATS) blocks compute out0, the next out1, then out2
// (n2 = 0: two products).
extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv3_bf16(float* out0, const unsigned short* __restrict__ w0, int n0,
               float* out1, const unsigned short* __restrict__ w1, int n1,
               float* out2, const unsigned short* __restrict__ w2, int n2,
               const float* __restrict__ x, int m, int k) {
    int b = blockIdx.x;
    int b0 = (n0 + PIE_GEMV_FEATS - 1) / PIE_GEMV_FEATS, b1 = (n1 + PIE_GEMV_FEATS - 1) / PIE_GEMV_FEATS;
    float* out = out0;
    const unsigned short* w = w0;
    int n = n0;
    if (b >= b0 + b1) {
        out = out2, w = w2, n = n2, b -= b0 + b1;
    } else if (b >= b0) {
        out = out1, w = w1, n = n1, b -= b0;
    }
    int f0 = b * PIE_GEMV_FEATS;
    pie_gemv_store(out, pie_gemv_block(x, w, m, n, k, f0), m, n, f0);
}

// out += x · Wᵀ: a projection added into the residual stream in place
// (each output element is read and written by one thread).
extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_add_bf16(float* out, const float* __restrict__ x, const unsigned short* __restrict__ w, int m, int n,
                  int k) {
    int f0 = blockIdx.x * PIE_GEMV_FEATS;
    float v = pie_gemv_block(x, w, m, n, k, f0);
    int t = threadIdx.x, r = t / PIE_GEMV_FEATS, f = f0 + t % PIE_GEMV_FEATS;
    if (t < m * PIE_GEMV_FEATS && f < n) out[(size_t)r * n + f] += v;
}
