// Decode-shaped products out[m, n] = x[m, k] · W[n, k]ᵀ for a few rows
// (m ≤ PIE_GEMV_MAX_ROWS): x f32, W bf16 bits, f32 accumulation.
// cuBLAS's GEMMs take 3-4x the weight-read time at this shape and need x
// cast to bf16 first; this reads W once, 16 bytes per lane per load.
//
// A block of 128 threads (4 warps) computes PIE_GEMV_FEATS consecutive
// output features for every row; its threads split k in chunks of 8
// (one 16-byte load of each feature's weights), then the block reduces.
// The next chunk's weights load while this one's are used, and the first
// chunk's load before the block waits for the kernel before it (pdl.cu).
// Requires k % 8 == 0 and 16-byte aligned rows (the driver checks).
//
// Every entry point's body is a template over K, the input width, and MR,
// the most rows: K = 0 reads k at run time (the kernels below); K > 0
// bakes it in, so the loop over k has a fixed trip count and unrolls.
// MR = 1 gives the single-row `_m1` kernels. codegen instantiates both for
// one model's widths (codegen/src/cuda_kernels.rs: `pie build --config`),
// as `<kernel>_k<K>[_m1]` entry points the driver prefers.

#define PIE_GEMV_MAX_ROWS 4
#define PIE_GEMV_FEATS 4
#define PIE_GEMV_THREADS 128
// Largest matrix whose rows a GEMV block asks L2 for before its wait
// (pdl.cu): a larger one would evict its own prefetched rows before the
// block reads them (H100 / H200: 50 MB of L2).
#define PIE_GEMV_PREFETCH_MAX_BYTES (8u << 20)
// Blocks per SM the single-row q/k/v GEMVs are bounded to (at most 64
// registers, none spilled): Qwen3-0.6B's 1,024 blocks then run in one wave
// on 132 SMs instead of two (77 registers unbounded: 6 blocks per SM).
#define PIE_GEMV3_M1_BLOCKS 8

__device__ __forceinline__ void pie_unpack_bf16x8(uint4 raw, float* out) {
    unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(words[i] << 16);
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

// A GEMV input with its RMS norm folded in (the _norm kernels): row r of
// the product's input is rms_norm(x[r] + y[r]) · (offset + g), y and g
// optional. 1 / rms is a factor of every output, so the block sums
// w · x · (offset + g) and x² in the same pass over x and scales once at
// the end: the normalized row never goes through memory. Block 0 writes
// x + y to `sum` when set (the residual stream after the add).
struct PieGemvNorm {
    const float* y;
    const float* g;
    float offset, eps;
    float* sum;
};

// The block's weight row f (of its NF): feature f0 + f % PIE_GEMV_FEATS
// of w, or of w2 from f = PIE_GEMV_FEATS on (PAIR); it exists if that
// feature is < n.
__device__ __forceinline__ const unsigned short* pie_gemv_row(const unsigned short* w, const unsigned short* w2,
                                                              int k, int f0, int f) {
    return (f < PIE_GEMV_FEATS ? w : w2) + (size_t)(f0 + f % PIE_GEMV_FEATS) * k;
}

// One chunk's weights: for each of the block's NF rows (pie_gemv_row),
// the 8 bf16 values at c .. c + 7; rows past n read nothing.
template <int NF>
__device__ __forceinline__ void pie_gemv_load(const unsigned short* __restrict__ w,
                                              const unsigned short* __restrict__ w2, int n, int k, int f0, int c,
                                              uint4 (&raw)[NF]) {
#pragma unroll
    for (int f = 0; f < NF; f++)
        raw[f] = f0 + f % PIE_GEMV_FEATS < n ? __ldg((const uint4*)(pie_gemv_row(w, w2, k, f0, f) + c))
                                             : make_uint4(0u, 0u, 0u, 0u);
}

// One chunk of 8 inputs (c .. c + 7) of every row into the block's sums:
// the chunk's weights `raw` (pie_gemv_load) times the input rows
// (normalized on the way in with NORM) and, with NORM, each row's sum of
// squares.
template <bool NORM, int NF, int MR>
__device__ __forceinline__ void pie_gemv_chunk(const uint4 (&raw)[NF], const float* __restrict__ x, int m, int k,
                                               int c, const PieGemvNorm& nm, float (&acc)[MR][NF],
                                               float (&squares)[MR]) {
    float wv[NF][8];
#pragma unroll
    for (int f = 0; f < NF; f++) pie_unpack_bf16x8(raw[f], wv[f]);
    float scale[8];
    if (NORM) {
        if (nm.g) {
            const float4* gc = (const float4*)(nm.g + c);
            float4 a = gc[0], b = gc[1];
            float gv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 8; i++) scale[i] = nm.offset + gv[i];
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) scale[i] = 1.0f;
        }
    }
#pragma unroll
    for (int r = 0; r < MR; r++) {
        if (r < m) {
            const float4* xr = (const float4*)(x + (size_t)r * k + c);
            float4 a = xr[0], b = xr[1];
            float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            if (NORM) {
                if (nm.y) {
                    const float4* yr = (const float4*)(nm.y + (size_t)r * k + c);
                    float4 ya = yr[0], yb = yr[1];
                    float yv[8] = {ya.x, ya.y, ya.z, ya.w, yb.x, yb.y, yb.z, yb.w};
#pragma unroll
                    for (int i = 0; i < 8; i++) xv[i] += yv[i];
                }
                if (nm.sum && blockIdx.x == 0) {
                    float4* sr = (float4*)(nm.sum + (size_t)r * k + c);
                    sr[0] = make_float4(xv[0], xv[1], xv[2], xv[3]);
                    sr[1] = make_float4(xv[4], xv[5], xv[6], xv[7]);
                }
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    squares[r] += xv[i] * xv[i];
                    xv[i] *= scale[i];
                }
            }
#pragma unroll
            for (int f = 0; f < NF; f++)
#pragma unroll
                for (int i = 0; i < 8; i++) acc[r][f] += wv[f][i] * xv[i];
        }
    }
}

// The block's share of out = x · Wᵀ: features f0 .. f0 + PIE_GEMV_FEATS
// of every row. Thread t < m · PIE_GEMV_FEATS gets the sum for row
// t / PIE_GEMV_FEATS, feature f0 + t % PIE_GEMV_FEATS; the others get 0.
// NORM: x is normalized on the way in (PieGemvNorm). PAIR: the same
// features of a second matrix w2 in the same pass over x (the GLU's gate
// and up), their sum into *second; one pass keeps both matrices' loads
// in flight together and reduces once. Every thread of the block must
// call it (it synchronizes).
// K > 0: k is K (baked in, see the top of this file). MR: the most rows
// it takes (m <= MR), which sizes its sums: 1 for batch-1 decode, whose
// kernels (_m1) then need a third of the registers and fit the GPU in one
// wave of blocks.
template <bool NORM, bool PAIR, int K = 0, int MR = PIE_GEMV_MAX_ROWS>
__device__ __forceinline__ float pie_gemv_block_t(const float* __restrict__ x, const unsigned short* __restrict__ w,
                                                  const unsigned short* __restrict__ w2, int m, int n, int k_arg,
                                                  int f0, PieGemvNorm nm, float* second) {
    constexpr int NF = PAIR ? 2 * PIE_GEMV_FEATS : PIE_GEMV_FEATS;
    // A baked width unrolls the chunk loops (a known trip count).
    constexpr int UNROLL = K > 0 ? (K + PIE_GEMV_THREADS * 8 - 1) / (PIE_GEMV_THREADS * 8) : 1;
    const int k = K > 0 ? K : k_arg;
    float acc[MR][NF];
    float squares[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) {
        squares[r] = 0.0f;
#pragma unroll
        for (int f = 0; f < NF; f++) acc[r][f] = 0.0f;
    }

    // The weights do not depend on the kernel before this one: the first
    // chunk's go into registers (and, for a matrix small enough to stay in
    // L2, L2 is asked for the rest of the block's rows) before pie_pdl_wait
    // (pdl.cu) lets x be read. Under a programmatic dependent launch that
    // is while that kernel still runs.
    int c0 = threadIdx.x * 8;
    uint4 cur[NF];
    pie_gemv_load<NF>(w, w2, n, k, f0, c0 < k ? c0 : 0, cur);
    int rest = k - PIE_GEMV_THREADS * 8;  // elements of each row past the first chunks
    if (rest > 0 && (size_t)n * k * 2 <= PIE_GEMV_PREFETCH_MAX_BYTES && threadIdx.x < NF &&
        f0 + threadIdx.x % PIE_GEMV_FEATS < n)
        pie_prefetch_l2(pie_gemv_row(w, w2, k, f0, threadIdx.x) + PIE_GEMV_THREADS * 8, (unsigned int)rest * 2u);
    pie_pdl_wait();

    if (PAIR) {
        // Twice the loads in flight per chunk already: one chunk at a time
        // (two would cost registers, and occupancy, for nothing).
        if (c0 < k) pie_gemv_chunk<NORM, NF, MR>(cur, x, m, k, c0, nm, acc, squares);
#pragma unroll UNROLL
        for (int c = c0 + PIE_GEMV_THREADS * 8; c < k; c += PIE_GEMV_THREADS * 8) {
            pie_gemv_load<NF>(w, w2, n, k, f0, c, cur);
            pie_gemv_chunk<NORM, NF, MR>(cur, x, m, k, c, nm, acc, squares);
        }
    } else {
        // Pipelined: the next chunk's weight loads issue before this
        // chunk's x loads and FMAs, so two chunks are always in flight.
#pragma unroll UNROLL
        for (int c = c0; c < k; c += PIE_GEMV_THREADS * 8) {
            uint4 next[NF];
            bool more = c + PIE_GEMV_THREADS * 8 < k;
            if (more) pie_gemv_load<NF>(w, w2, n, k, f0, c + PIE_GEMV_THREADS * 8, next);
            pie_gemv_chunk<NORM, NF, MR>(cur, x, m, k, c, nm, acc, squares);
            if (more) {
#pragma unroll
                for (int f = 0; f < NF; f++) cur[f] = next[f];
            }
        }
    }

    // Warp sums, then the 4 warps' partial sums through shared memory
    // (slot NF: the row's squares, NORM only).
    __shared__ float partial[PIE_GEMV_THREADS / 32][MR][NF + 1];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // a previous call's readers are done with `partial`
#pragma unroll
    for (int r = 0; r < MR; r++) {
        if (r >= m) break;  // uniform: rows past m hold nothing
#pragma unroll
        for (int f = 0; f <= NF; f++) {
            if (f == NF && !NORM) break;
            float v = f < NF ? acc[r][f] : squares[r];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) partial[warp][r][f] = v;
        }
    }
    __syncthreads();
    int t = threadIdx.x;
    float v = 0.0f, v2 = 0.0f;
    if (t < m * PIE_GEMV_FEATS) {
        int r = t / PIE_GEMV_FEATS, f = t % PIE_GEMV_FEATS;
        float sq = 0.0f;
#pragma unroll
        for (int wi = 0; wi < PIE_GEMV_THREADS / 32; wi++) {
            v += partial[wi][r][f];
            if (PAIR) v2 += partial[wi][r][PIE_GEMV_FEATS + f];
            if (NORM) sq += partial[wi][r][NF];
        }
        // The same 1 / rms as pie_rms_norm.
        if (NORM) {
            float inv = rsqrtf(sq / (float)k + nm.eps);
            v *= inv;
            v2 *= inv;
        }
    }
    if (PAIR) *second = v2;
    return v;
}

template <int K = 0, int MR = PIE_GEMV_MAX_ROWS>
__device__ __forceinline__ float pie_gemv_block(const float* __restrict__ x, const unsigned short* __restrict__ w,
                                                int m, int n, int k, int f0) {
    return pie_gemv_block_t<false, false, K, MR>(x, w, nullptr, m, n, k, f0, PieGemvNorm{}, nullptr);
}

// Writes the block's sums (from pie_gemv_block) into out [m, n].
__device__ __forceinline__ void pie_gemv_store(float* out, float v, int m, int n, int f0) {
    int t = threadIdx.x, r = t / PIE_GEMV_FEATS, f = f0 + t % PIE_GEMV_FEATS;
    if (t < m * PIE_GEMV_FEATS && f < n) out[(size_t)r * n + f] = v;
}

// out = x · Wᵀ (pie_gemv_bf16 and its _m1 and _k<K> forms).
template <int K, int MR = PIE_GEMV_MAX_ROWS>
__device__ __forceinline__ void pie_gemv_entry(float* __restrict__ out, const float* __restrict__ x,
                                               const unsigned short* __restrict__ w, int m, int n, int k) {
    int f0 = blockIdx.x * PIE_GEMV_FEATS;
    pie_gemv_store(out, pie_gemv_block<K, MR>(x, w, m, n, k, f0), m, n, f0);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_bf16(float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ w,
              int m, int n, int k) {
    pie_gemv_entry<0>(out, x, w, m, n, k);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_bf16_m1(float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ w,
                 int m, int n, int k) {
    pie_gemv_entry<0, 1>(out, x, w, m, n, k);
}

// Up to three products of one x in one launch (q/k/v projections): the
// first ceil(n0 / FEATS) blocks compute out0, the next out1, then out2
// (n2 = 0: two products).
template <bool NORM, int K = 0, int MR = PIE_GEMV_MAX_ROWS>
__device__ __forceinline__ void pie_gemv3(float* out0, const unsigned short* w0, int n0, float* out1,
                                          const unsigned short* w1, int n1, float* out2, const unsigned short* w2,
                                          int n2, const float* x, int m, int k, PieGemvNorm nm) {
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
    pie_gemv_store(out, pie_gemv_block_t<NORM, false, K, MR>(x, w, nullptr, m, n, k, f0, nm, nullptr), m, n, f0);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv3_bf16(float* out0, const unsigned short* __restrict__ w0, int n0,
               float* out1, const unsigned short* __restrict__ w1, int n1,
               float* out2, const unsigned short* __restrict__ w2, int n2,
               const float* __restrict__ x, int m, int k) {
    pie_gemv3<false>(out0, w0, n0, out1, w1, n1, out2, w2, n2, x, m, k, PieGemvNorm{});
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS, PIE_GEMV3_M1_BLOCKS)
pie_gemv3_bf16_m1(float* out0, const unsigned short* __restrict__ w0, int n0,
                  float* out1, const unsigned short* __restrict__ w1, int n1,
                  float* out2, const unsigned short* __restrict__ w2, int n2,
                  const float* __restrict__ x, int m, int k) {
    pie_gemv3<false, 0, 1>(out0, w0, n0, out1, w1, n1, out2, w2, n2, x, m, k, PieGemvNorm{});
}

// pie_gemv3_bf16 of rms_norm(x) · (offset + g) (g optional: has_g).
template <int K, int MR = PIE_GEMV_MAX_ROWS>
__device__ __forceinline__ void pie_gemv3_norm_entry(float* out0, const unsigned short* __restrict__ w0, int n0,
                                                     float* out1, const unsigned short* __restrict__ w1, int n1,
                                                     float* out2, const unsigned short* __restrict__ w2, int n2,
                                                     const float* __restrict__ x, const float* g, int has_g,
                                                     float eps, float offset, int m, int k) {
    PieGemvNorm nm = {nullptr, has_g ? g : nullptr, offset, eps, nullptr};
    pie_gemv3<true, K, MR>(out0, w0, n0, out1, w1, n1, out2, w2, n2, x, m, k, nm);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv3_norm_bf16(float* out0, const unsigned short* __restrict__ w0, int n0,
                    float* out1, const unsigned short* __restrict__ w1, int n1,
                    float* out2, const unsigned short* __restrict__ w2, int n2,
                    const float* __restrict__ x, const float* g, int has_g, float eps, float offset, int m, int k) {
    pie_gemv3_norm_entry<0>(out0, w0, n0, out1, w1, n1, out2, w2, n2, x, g, has_g, eps, offset, m, k);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS, PIE_GEMV3_M1_BLOCKS)
pie_gemv3_norm_bf16_m1(float* out0, const unsigned short* __restrict__ w0, int n0,
                       float* out1, const unsigned short* __restrict__ w1, int n1,
                       float* out2, const unsigned short* __restrict__ w2, int n2,
                       const float* __restrict__ x, const float* g, int has_g, float eps, float offset, int m,
                       int k) {
    pie_gemv3_norm_entry<0, 1>(out0, w0, n0, out1, w1, n1, out2, w2, n2, x, g, has_g, eps, offset, m, k);
}

// out += x · Wᵀ: a projection added into the residual stream in place
// (each output element is read and written by one thread).
template <int K, int MR = PIE_GEMV_MAX_ROWS>
__device__ __forceinline__ void pie_gemv_add_entry(float* out, const float* __restrict__ x,
                                                   const unsigned short* __restrict__ w, int m, int n, int k) {
    int f0 = blockIdx.x * PIE_GEMV_FEATS;
    float v = pie_gemv_block<K, MR>(x, w, m, n, k, f0);
    int t = threadIdx.x, r = t / PIE_GEMV_FEATS, f = f0 + t % PIE_GEMV_FEATS;
    if (t < m * PIE_GEMV_FEATS && f < n) out[(size_t)r * n + f] += v;
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_add_bf16(float* out, const float* __restrict__ x, const unsigned short* __restrict__ w, int m, int n,
                  int k) {
    pie_gemv_add_entry<0>(out, x, w, m, n, k);
}

extern "C" __global__ void __launch_bounds__(PIE_GEMV_THREADS)
pie_gemv_add_bf16_m1(float* out, const float* __restrict__ x, const unsigned short* __restrict__ w, int m, int n,
                     int k) {
    pie_gemv_add_entry<0, 1>(out, x, w, m, n, k);
}
