// Recurrent layers of the CUDA driver (Gated DeltaNet): the short causal
// convolution with its carried state, the delta-rule recurrence, and the
// gated RMSNorm. Sequences are described by per-sequence arrays: first
// token row, token count, state row, and whether the chunk starts the
// sequence (then the state starts at zero).

#define PIE_MAX_CONV_KERNEL 8

// One thread per (channel, sequence): walks the sequence's tokens in order.
// state: per state row, [kernel - 1][channels] inputs, oldest first, at
// `state_offset` within a row of `state_stride` floats.
extern "C" __global__ void pie_causal_conv(float* out, const float* x, float* state, const float* weight,
                                           const float* bias, int has_bias, const int* seq_start,
                                           const int* seq_len, const int* seq_row, const int* seq_fresh,
                                           int channels, int kernel, long long state_stride,
                                           long long state_offset) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (c >= channels) return;
    float* st = state + (long long)seq_row[s] * state_stride + state_offset;
    float window[PIE_MAX_CONV_KERNEL];
    for (int j = 0; j < kernel - 1; j++) window[j] = seq_fresh[s] ? 0.0f : st[(long long)j * channels + c];
    const float* w = weight + (long long)c * kernel;
    for (int t = 0; t < seq_len[s]; t++) {
        long long row = seq_start[s] + t;
        float in = x[row * channels + c];
        float acc = has_bias ? bias[c] : 0.0f;
        for (int j = 0; j < kernel - 1; j++) acc += w[j] * window[j];
        acc += w[kernel - 1] * in;
        out[row * channels + c] = acc / (1.0f + expf(-acc));
        for (int j = 0; j + 1 < kernel - 1; j++) window[j] = window[j + 1];
        if (kernel > 1) window[kernel - 2] = in;
    }
    for (int j = 0; j < kernel - 1; j++) st[(long long)j * channels + c] = window[j];
}

// One block of `dv` threads per (value head, sequence). Thread j owns
// column j of the head's state S [dk][dv] (in the state buffer), and per
// token: S *= exp(g); delta = (v - Sᵀk) * beta; S += k deltaᵀ; o = Sᵀq,
// with q, k L2-normalized per key head (q also scaled by 1/sqrt(dk)).
extern "C" __global__ void pie_gated_delta_rule(float* out, const float* qkv, const float* b, const float* a,
                                                const float* dt_bias, const float* a_log, float* state,
                                                const int* seq_start, const int* seq_len, const int* seq_row,
                                                const int* seq_fresh, int key_heads, int value_heads, int dk,
                                                int dv, long long state_stride, long long state_offset) {
    extern __shared__ float pie_qk[];  // q[dk], k[dk], then 2 scalars
    float* qs = pie_qk;
    float* ks = pie_qk + dk;
    float* scalars = pie_qk + 2 * dk;
    int h = blockIdx.x, s = blockIdx.y, j = threadIdx.x;
    int kh = h / (value_heads / key_heads);
    int key_dim = key_heads * dk, conv_dim = 2 * key_dim + value_heads * dv;
    float* S = state + (long long)seq_row[s] * state_stride + state_offset + (long long)h * dk * dv;
    if (seq_fresh[s] && j < dv)
        for (int i = 0; i < dk; i++) S[(long long)i * dv + j] = 0.0f;
    for (int t = 0; t < seq_len[s]; t++) {
        long long row = seq_start[s] + t;
        const float* r = qkv + row * conv_dim;
        for (int i = j; i < dk; i += blockDim.x) {
            qs[i] = r[kh * dk + i];
            ks[i] = r[key_dim + kh * dk + i];
        }
        __syncthreads();
        if (j == 0) {
            float nq = 0.0f, nk = 0.0f;
            for (int i = 0; i < dk; i++) { nq += qs[i] * qs[i]; nk += ks[i] * ks[i]; }
            scalars[0] = rsqrtf(nq + 1e-6f) * rsqrtf((float)dk);
            scalars[1] = rsqrtf(nk + 1e-6f);
            float beta = 1.0f / (1.0f + expf(-b[row * value_heads + h]));
            float x = a[row * value_heads + h] + dt_bias[h];
            float softplus = x > 20.0f ? x : log1pf(expf(x));
            float g = -expf(a_log[h]) * softplus;
            scalars[2] = beta;
            scalars[3] = expf(g);
        }
        __syncthreads();
        if (j < dv) {
            float qn = scalars[0], kn = scalars[1], beta = scalars[2], decay = scalars[3];
            float v = r[2 * key_dim + h * dv + j];
            float mem = 0.0f;
            for (int i = 0; i < dk; i++) {
                float sv = S[(long long)i * dv + j] * decay;
                S[(long long)i * dv + j] = sv;
                mem += sv * ks[i] * kn;
            }
            float delta = (v - mem) * beta;
            float o = 0.0f;
            for (int i = 0; i < dk; i++) {
                float sv = S[(long long)i * dv + j] + ks[i] * kn * delta;
                S[(long long)i * dv + j] = sv;
                o += sv * qs[i] * qn;
            }
            out[row * value_heads * dv + (long long)h * dv + j] = o;
        }
        __syncthreads();
    }
}

// RMSNorm of each group of `group` values (weight, no offset), then times
// silu(z). One block per group; blockDim.x a power of two.
extern "C" __global__ void pie_gated_rms_norm(float* out, const float* x, const float* z, const float* w,
                                              int group, float eps) {
    extern __shared__ float pie_sum[];
    long long base = (long long)blockIdx.x * group;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < group; i += blockDim.x) acc += x[base + i] * x[base + i];
    pie_sum[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) pie_sum[threadIdx.x] += pie_sum[threadIdx.x + s];
        __syncthreads();
    }
    float inv = rsqrtf(pie_sum[0] / (float)group + eps);
    for (int i = threadIdx.x; i < group; i += blockDim.x) {
        float g = z[base + i];
        out[base + i] = x[base + i] * inv * w[i] * (g / (1.0f + expf(-g)));
    }
}

// Mamba2 selective scan, recurrent form. One block of `head_dim` threads
// per (head, sequence); thread p owns row p of the head's state
// [head_dim][state] and, per token: dt = softplus(dt_raw + dt_bias)
// (clamped below by dt_min); s = s * exp(dt * A) + dt * x_p * B;
// y_p = s · C + D * x_p. B and C come from the head's group.
extern "C" __global__ void pie_mamba2_scan(float* out, const float* xbc, const float* dt_raw,
                                           const float* dt_bias, const float* a_log, const float* d_skip,
                                           float* state, const int* seq_start, const int* seq_len,
                                           const int* seq_row, const int* seq_fresh, int heads, int head_dim,
                                           int n_state, int groups, float dt_min, long long state_stride,
                                           long long state_offset) {
    int h = blockIdx.x, s = blockIdx.y, p = threadIdx.x;
    if (p >= head_dim) return;
    int inner = heads * head_dim;
    int conv_dim = inner + 2 * groups * n_state;
    int g = h / (heads / groups);
    float* S = state + (long long)seq_row[s] * state_stride + state_offset
             + ((long long)h * head_dim + p) * n_state;
    if (seq_fresh[s])
        for (int n = 0; n < n_state; n++) S[n] = 0.0f;
    float a = -expf(a_log[h]);
    for (int t = 0; t < seq_len[s]; t++) {
        long long row = seq_start[s] + t;
        const float* r = xbc + row * conv_dim;
        const float* B = r + inner + g * n_state;
        const float* C = r + inner + groups * n_state + g * n_state;
        float xr = dt_raw[row * heads + h] + dt_bias[h];
        float dt = xr > 20.0f ? xr : log1pf(expf(xr));
        dt = fmaxf(dt, dt_min);
        float decay = expf(dt * a);
        float x = r[h * head_dim + p];
        float y = 0.0f;
        for (int n = 0; n < n_state; n++) {
            float v = S[n] * decay + dt * B[n] * x;
            S[n] = v;
            y += v * C[n];
        }
        out[row * inner + h * head_dim + p] = y + d_skip[h] * x;
    }
}

// y * silu(gate), then RMSNorm over each group of `group` values, times w.
// One block per group; blockDim.x a power of two.
extern "C" __global__ void pie_gate_group_norm(float* out, const float* y, const float* gate, const float* w,
                                               int group, int width, float eps) {
    extern __shared__ float pie_acc[];
    long long base = (long long)blockIdx.x * group;
    int col0 = (int)(base % width);
    float acc = 0.0f;
    for (int i = threadIdx.x; i < group; i += blockDim.x) {
        float gv = gate[base + i];
        float v = y[base + i] * (gv / (1.0f + expf(-gv)));
        out[base + i] = v;
        acc += v * v;
    }
    pie_acc[threadIdx.x] = acc;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if (threadIdx.x < st) pie_acc[threadIdx.x] += pie_acc[threadIdx.x + st];
        __syncthreads();
    }
    float inv = rsqrtf(pie_acc[0] / (float)group + eps);
    for (int i = threadIdx.x; i < group; i += blockDim.x) out[base + i] = out[base + i] * inv * w[col0 + i];
}

// Qwen3-Next's fused projections, grouped per key head — qkvz rows as
// [q (dk), k (dk), v (r*dv), z (r*dv)] per key head and ba as [b (r), a (r)]
// per key head (r = value heads per key head) — regrouped as the separate
// projections: mixed = [q all heads, k all heads, v all heads], z, b, a.
extern "C" __global__ void pie_unfuse_qkvz(float* mixed, float* z, float* b, float* a, const float* qkvz,
                                           const float* ba, int rows, int key_heads, int dk, int r, int dv) {
    long long group = 2LL * dk + 2LL * r * dv;
    long long width = key_heads * group;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * width) return;
    long long row = i / width, c = i % width;
    int h = c / group, j = c % group;
    int key_dim = key_heads * dk, vdim = key_heads * r * dv, conv_dim = 2 * key_dim + vdim;
    float v = qkvz[i];
    if (j < dk) mixed[row * conv_dim + h * dk + j] = v;
    else if (j < 2 * dk) mixed[row * conv_dim + key_dim + h * dk + (j - dk)] = v;
    else if (j < 2 * dk + r * dv) mixed[row * conv_dim + 2 * key_dim + h * r * dv + (j - 2 * dk)] = v;
    else z[row * vdim + h * r * dv + (j - 2 * dk - r * dv)] = v;
    if (j < 2 * r) {
        float x = ba[row * key_heads * 2 * r + h * 2 * r + j];
        if (j < r) b[row * key_heads * r + h * r + j] = x;
        else a[row * key_heads * r + h * r + (j - r)] = x;
    }
}
