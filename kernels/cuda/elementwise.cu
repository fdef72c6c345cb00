// Elementwise and row-copy kernels of the CUDA driver. Activations are f32
// `[rows, width]`, row-major. One thread per element unless noted.
// No CUDA headers: NVRTC compiles this without an include path.

typedef unsigned short pie_u16;

__device__ __forceinline__ float pie_bf16_to_f32(pie_u16 b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ float pie_f16_to_f32(pie_u16 h) {
    unsigned int sign = (h & 0x8000u) << 16;
    unsigned int exp = (h >> 10) & 0x1fu;
    unsigned int man = h & 0x3ffu;
    if (exp == 0) {
        // zero or subnormal: man * 2^-24
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) {
        return __uint_as_float(sign | 0x7f800000u | (man << 13));
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, as torch does.
__device__ __forceinline__ pie_u16 pie_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (pie_u16)((u >> 16) | 0x40u);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (pie_u16)(u >> 16);
}

// Activation codes: 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu, 4 relu2, 5 sigmoid, 6 tanh.
__device__ __forceinline__ float pie_act(int fn, float v) {
    switch (fn) {
        case 0: return v / (1.0f + expf(-v));
        case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        case 2: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        case 3: return fmaxf(v, 0.0f);
        case 4: { float r = fmaxf(v, 0.0f); return r * r; }
        case 6: return tanhf(v);
        default: return 1.0f / (1.0f + expf(-v));
    }
}

extern "C" __global__ void pie_add(float* out, const float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] + y[i];
}

extern "C" __global__ void pie_mul(float* out, const float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] * y[i];
}

extern "C" __global__ void pie_scale(float* out, const float* x, float factor, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] * factor;
}

extern "C" __global__ void pie_softcap(float* out, const float* x, float cap, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = tanhf(x[i] / cap) * cap;
}

extern "C" __global__ void pie_activation(float* out, const float* x, int fn, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = pie_act(fn, x[i]);
}

// act(g) * u; with limit > 0, GPT-OSS's clamped SwiGLU.
__device__ __forceinline__ float pie_glu_value(int fn, float limit, float g, float u) {
    if (limit > 0.0f) {
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        return g / (1.0f + expf(-1.702f * g)) * (u + 1.0f);
    }
    return pie_act(fn, g) * u;
}

// out = pie_glu_value of each element; out_bf16 (optional) gets the result
// rounded to bf16 too.
extern "C" __global__ void pie_glu(float* out, pie_u16* out_bf16, const float* gate, const float* up, int fn,
                                   float limit, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = pie_glu_value(fn, limit, gate[i], up[i]);
    out[i] = v;
    if (out_bf16) out_bf16[i] = pie_f32_to_bf16(v);
}

extern "C" __global__ void pie_add_bias(float* x, const float* bias, int rows, int width) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * width) x[i] += bias[i % width];
}

// Part `[offset, offset + size)` of every group of `group` features.
extern "C" __global__ void pie_split_part(float* out, const float* x, int rows, int width, int group,
                                          int offset, int size) {
    int groups = width / group;
    int out_width = groups * size;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * out_width) return;
    int r = i / out_width, c = i % out_width;
    int g = c / size, j = c % size;
    out[i] = x[r * width + g * group + offset + j];
}

extern "C" __global__ void pie_gather_rows(float* out, const float* x, const int* rows, int n_rows, int width) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * width) return;
    int r = i / width, c = i % width;
    out[i] = x[rows[r] * width + c];
}

extern "C" __global__ void pie_cast_bf16(pie_u16* out, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = pie_f32_to_bf16(x[i]);
}

// dtype: 0 f32, 1 bf16, 2 f16 table rows for the batch's token ids.
extern "C" __global__ void pie_embedding(float* out, const void* table, int dtype, const unsigned int* ids,
                                         int n, int hidden) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * hidden) return;
    long long src = (long long)ids[i / hidden] * hidden + i % hidden;
    if (dtype == 0) out[i] = ((const float*)table)[src];
    else if (dtype == 1) out[i] = pie_bf16_to_f32(((const pie_u16*)table)[src]);
    else out[i] = pie_f16_to_f32(((const pie_u16*)table)[src]);
}

// Widens a 16-bit matrix to f32 (dtype 1 bf16, 2 f16).
extern "C" __global__ void pie_widen(float* out, const pie_u16* x, int dtype, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = dtype == 1 ? pie_bf16_to_f32(x[i]) : pie_f16_to_f32(x[i]);
}

// out[rows[i]] += scales[i] * y[i] for each row i of y (MoE: an expert's
// outputs weighted into their tokens; experts run one after another).
extern "C" __global__ void pie_scatter_add(float* out, const float* y, const int* rows, const float* scales,
                                           int n_rows, int width) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * width) return;
    int r = i / width, c = i % width;
    out[(long long)rows[r] * width + c] += scales[r] * y[i];
}

// out[r, offset + c] = part[r, c]: one part of a feature-wise concat.
extern "C" __global__ void pie_concat_part(float* out, const float* part, int rows, int width,
                                           int out_width, int offset) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * width) return;
    long long r = i / width;
    out[r * out_width + offset + i % width] = part[i];
}

// Output part m of each row = Σ_n (offset + coefs[r, m·streams + n]) · part
// n of x (parts of `width` features). One thread per output element.
extern "C" __global__ void pie_mix(float* out, const float* x, const float* coefs, int rows, int streams,
                                   int out_streams, int width, float offset) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long out_width = (long long)out_streams * width;
    if (i >= rows * out_width) return;
    long long r = i / out_width;
    int m = (i % out_width) / width, c = i % width;
    const float* cr = coefs + r * out_streams * streams + (long long)m * streams;
    const float* xr = x + r * streams * width + c;
    float acc = 0.0f;
    for (int n = 0; n < streams; n++) acc += (offset + cr[n]) * xr[(long long)n * width];
    out[i] = acc;
}

// out = x · factor · w[feature]: a per-feature scale.
extern "C" __global__ void pie_scale_weighted(float* out, const float* x, const float* w, float factor,
                                              int rows, int width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * width) return;
    out[i] = x[i] * factor * w[i % width];
}
