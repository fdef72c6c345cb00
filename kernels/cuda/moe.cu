// Grouped mixture-of-experts kernels for small batches (decode): every
// active expert's projections in one launch each, instead of a gather,
// two GEMMs and a scatter per expert.
//
// Assignments (token, chosen expert) are sorted by expert on the host:
// `perm[a]` is the token of assignment `a`, and expert `e` owns assignments
// `offsets[e] .. offsets[e + 1]`. Expert weights are separate buffers whose
// device addresses come in pointer tables. A warp computes one output row
// of one expert for up to 8 of its tokens at a time, so each weight row is
// read once per 8 tokens: the kernels stream the active experts' weights,
// which is what bounds decode. Rows and widths must be multiples of 8
// (vector loads of 8 values).

#define MOE_TOKENS 8

__device__ __forceinline__ void load8(const float* p, float* o) {
    float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

// bf16 bits: element 2i in the low half of word i, 2i+1 in the high half.
__device__ __forceinline__ void load8(const unsigned short* p, float* o) {
    uint4 v = *(const uint4*)p;
    unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// h[a, r] = silu(gate_e[r] . x[perm[a]]) * (up_e[r] . x[perm[a]]).
// Grid: (ceil(inter / warps per block), experts).
template <typename W>
__device__ void moe_gate_up(const float* x, const int* perm, const int* offsets,
                            const unsigned long long* gate_ptrs, const unsigned long long* up_ptrs,
                            float* h, int hidden, int inter) {
    int e = blockIdx.y, begin = offsets[e], end = offsets[e + 1];
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (begin == end || r >= inter) return;
    const W* g = (const W*)gate_ptrs[e] + (long long)r * hidden;
    const W* u = (const W*)up_ptrs[e] + (long long)r * hidden;
    for (int t0 = begin; t0 < end; t0 += MOE_TOKENS) {
        int n = min(MOE_TOKENS, end - t0);
        float ag[MOE_TOKENS], au[MOE_TOKENS];
#pragma unroll
        for (int j = 0; j < MOE_TOKENS; j++) ag[j] = au[j] = 0.f;
        for (int k = lane * 8; k < hidden; k += 256) {
            float gw[8], uw[8];
            load8(g + k, gw);
            load8(u + k, uw);
#pragma unroll
            for (int j = 0; j < MOE_TOKENS; j++) {
                if (j < n) {
                    float xv[8];
                    load8(x + (long long)perm[t0 + j] * hidden + k, xv);
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        ag[j] += gw[i] * xv[i];
                        au[j] += uw[i] * xv[i];
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < MOE_TOKENS; j++) {
            if (j < n) {
                float gs = warp_sum(ag[j]), us = warp_sum(au[j]);
                if (lane == 0) h[(long long)(t0 + j) * inter + r] = gs / (1.f + expf(-gs)) * us;
            }
        }
    }
}

// y[a, r] = down_e[r] . h[a].  Grid: (ceil(hidden / warps per block), experts).
template <typename W>
__device__ void moe_down(const float* h, const int* offsets, const unsigned long long* down_ptrs, float* y,
                         int inter, int hidden) {
    int e = blockIdx.y, begin = offsets[e], end = offsets[e + 1];
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (begin == end || r >= hidden) return;
    const W* d = (const W*)down_ptrs[e] + (long long)r * inter;
    for (int t0 = begin; t0 < end; t0 += MOE_TOKENS) {
        int n = min(MOE_TOKENS, end - t0);
        float acc[MOE_TOKENS];
#pragma unroll
        for (int j = 0; j < MOE_TOKENS; j++) acc[j] = 0.f;
        for (int k = lane * 8; k < inter; k += 256) {
            float dw[8];
            load8(d + k, dw);
#pragma unroll
            for (int j = 0; j < MOE_TOKENS; j++) {
                if (j < n) {
                    float hv[8];
                    load8(h + (long long)(t0 + j) * inter + k, hv);
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[j] += dw[i] * hv[i];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < MOE_TOKENS; j++) {
            if (j < n) {
                float s = warp_sum(acc[j]);
                if (lane == 0) y[(long long)(t0 + j) * hidden + r] = s;
            }
        }
    }
}

extern "C" __global__ void pie_moe_gate_up_f32(const float* x, const int* perm, const int* offsets,
                                               const unsigned long long* gate_ptrs,
                                               const unsigned long long* up_ptrs, float* h, int hidden,
                                               int inter) {
    moe_gate_up<float>(x, perm, offsets, gate_ptrs, up_ptrs, h, hidden, inter);
}

extern "C" __global__ void pie_moe_gate_up_bf16(const float* x, const int* perm, const int* offsets,
                                                const unsigned long long* gate_ptrs,
                                                const unsigned long long* up_ptrs, float* h, int hidden,
                                                int inter) {
    moe_gate_up<unsigned short>(x, perm, offsets, gate_ptrs, up_ptrs, h, hidden, inter);
}

extern "C" __global__ void pie_moe_down_f32(const float* h, const int* offsets,
                                            const unsigned long long* down_ptrs, float* y, int inter,
                                            int hidden) {
    moe_down<float>(h, offsets, down_ptrs, y, inter, hidden);
}

extern "C" __global__ void pie_moe_down_bf16(const float* h, const int* offsets,
                                             const unsigned long long* down_ptrs, float* y, int inter,
                                             int hidden) {
    moe_down<unsigned short>(h, offsets, down_ptrs, y, inter, hidden);
}

// out[t, c] = sum over token t's k choices of scale * y[assignment, c], in
// choice order (deterministic: no atomics).
extern "C" __global__ void pie_moe_combine(const float* y, const int* assignment, const float* scales,
                                           float* out, int tokens, int k, int hidden) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * hidden) return;
    int t = (int)(i / hidden), c = (int)(i % hidden);
    float acc = 0.f;
    for (int j = 0; j < k; j++) {
        int a = assignment[t * k + j];
        if (a >= 0) acc += scales[t * k + j] * y[(long long)a * hidden + c];
    }
    out[i] = acc;
}
