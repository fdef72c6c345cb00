// Paged attention of the CUDA driver (causal, or with per-row masks): keys and values live in token
// slots of fixed-size pages; each sequence's page table is flattened by the
// host into `table` (token slot of every position), `table_off[row]` saying
// where the row's sequence starts.

#define PIE_ATTN_THREADS 128
#define PIE_ATTN_MAX_DIMS_PER_THREAD 4
#define PIE_NEG_INF __int_as_float(0xff800000)

// Writes each new token's key and value rows into their token slots.
extern "C" __global__ void pie_kv_write(float* k_cache, float* v_cache, const float* k, const float* v,
                                        const int* slots, int rows, int k_width, int v_width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int width = k_width + v_width;
    if (i >= (long long)rows * width) return;
    int r = i / width, c = i % width;
    long long slot = slots[r];
    if (c < k_width) k_cache[slot * k_width + c] = k[(long long)r * k_width + c];
    else v_cache[slot * v_width + (c - k_width)] = v[(long long)r * v_width + (c - k_width)];
}

// One block of PIE_ATTN_THREADS threads (4 warps) per (query row, head),
// walking the row's visible positions in tiles with an online softmax
// (running max and sum), so any context length fits in constant shared
// memory. Scores: one warp per key, lanes splitting the head dimension
// (coalesced reads) and a shuffle reduction; values: one thread per output
// dimension, reading each value row coalesced.
// window <= 0: full causal attention; softcap <= 0: none; has_sinks: a
// learned per-head logit in the denominator (GPT-OSS).
// MASKED (the pie_attention_masked entry): a row with mask_off[row] >= 0
// attends to the keys 0 .. key_count[row] - 1 whose bit is set in its mask
// row (mask_words + mask_off[row], 32 keys a word, key j at bit j % 32 of
// word j / 32), later tokens of its chunk included; other rows stay causal.
// Hidden keys score -inf, and a tile or row with no visible key adds
// nothing. The causal entry compiles without any of it.
template <bool MASKED>
__device__ __forceinline__ void pie_attention_body(float* out, const float* q, const float* k_cache,
                                                   const float* v_cache, const int* positions, const int* table,
                                                   const int* table_off, const float* sinks, int has_sinks,
                                                   int heads, int kv_heads, int head_dim, int v_head_dim,
                                                   int v_stride, float scale, int window, float softcap,
                                                   const unsigned* mask_words, const int* mask_off,
                                                   const int* key_count) {
    __shared__ float probs[PIE_ATTN_THREADS];
    __shared__ float reduce[PIE_ATTN_THREADS];
    extern __shared__ float q_shared[];
    int row = blockIdx.x / heads, h = blockIdx.x % heads;
    int kvh = h / (heads / kv_heads);
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warps = PIE_ATTN_THREADS / 32;
    int pos = positions[row];
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    int last = pos;
    const unsigned* bits = 0;
    if (MASKED && mask_off[row] >= 0) {
        bits = mask_words + mask_off[row];
        last = key_count[row] - 1;
    }
    const int* slots = table + table_off[row];
    const float* qh = q + (long long)row * heads * head_dim + (long long)h * head_dim;
    for (int d = tid; d < head_dim; d += PIE_ATTN_THREADS) q_shared[d] = qh[d];
    __syncthreads();

    float acc[PIE_ATTN_MAX_DIMS_PER_THREAD];
    for (int a = 0; a < PIE_ATTN_MAX_DIMS_PER_THREAD; a++) acc[a] = 0.0f;
    float m = PIE_NEG_INF, l = 0.0f;
    // v_stride: floats per token slot of v_cache (kv_heads * v_head_dim, or
    // the key width when values are the keys' first dims: MLA's latent).
    int k_width = kv_heads * head_dim, v_width = v_stride;

    for (int tile = first; tile <= last; tile += PIE_ATTN_THREADS) {
        int n = min(PIE_ATTN_THREADS, last + 1 - tile);
        for (int t = warp; t < PIE_ATTN_THREADS; t += warps) {
            bool seen = t < n;
            if (MASKED && seen && bits) seen = (bits[(tile + t) >> 5] >> ((tile + t) & 31)) & 1u;
            float dot = 0.0f;
            if (seen) {
                const float* kj = k_cache + (long long)slots[tile + t] * k_width + (long long)kvh * head_dim;
                for (int d = lane; d < head_dim; d += 32) dot += q_shared[d] * kj[d];
            }
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            if (lane == 0) {
                float s = PIE_NEG_INF;
                if (seen) {
                    s = dot * scale;
                    if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
                }
                probs[t] = s;
            }
        }
        __syncthreads();
        reduce[tid] = probs[tid];
        __syncthreads();
        for (int st = PIE_ATTN_THREADS / 2; st > 0; st >>= 1) {
            if (tid < st) reduce[tid] = fmaxf(reduce[tid], reduce[tid + st]);
            __syncthreads();
        }
        float m_new = fmaxf(m, reduce[0]);
        __syncthreads();
        if (MASKED && m_new == PIE_NEG_INF) continue;  // nothing visible yet (uniform across the block)
        float p = tid < n ? expf(probs[tid] - m_new) : 0.0f;
        probs[tid] = p;
        reduce[tid] = p;
        __syncthreads();
        for (int st = PIE_ATTN_THREADS / 2; st > 0; st >>= 1) {
            if (tid < st) reduce[tid] += reduce[tid + st];
            __syncthreads();
        }
        float correction = expf(m - m_new);
        l = l * correction + reduce[0];
        for (int a = 0; a < PIE_ATTN_MAX_DIMS_PER_THREAD; a++) {
            int d = tid + a * PIE_ATTN_THREADS;
            if (d >= v_head_dim) break;
            float sum = acc[a] * correction;
            for (int t = 0; t < n; t++) {
                if (MASKED && probs[t] == 0.0f) continue;  // hidden key: skip its value row
                sum += probs[t] * v_cache[(long long)slots[tile + t] * v_width + (long long)kvh * v_head_dim + d];
            }
            acc[a] = sum;
        }
        m = m_new;
        __syncthreads();
    }
    if (has_sinks && (!MASKED || m != PIE_NEG_INF)) l += expf(sinks[h] - m);
    float* oh = out + (long long)row * heads * v_head_dim + (long long)h * v_head_dim;
    for (int a = 0; a < PIE_ATTN_MAX_DIMS_PER_THREAD; a++) {
        int d = tid + a * PIE_ATTN_THREADS;
        if (d >= v_head_dim) break;
        oh[d] = (MASKED && l == 0.0f) ? 0.0f : acc[a] / l;
    }
}

extern "C" __global__ void pie_attention(float* out, const float* q, const float* k_cache,
                                         const float* v_cache, const int* positions, const int* table,
                                         const int* table_off, const float* sinks, int has_sinks,
                                         int heads, int kv_heads, int head_dim, int v_head_dim,
                                         int v_stride, float scale, int window, float softcap) {
    pie_attention_body<false>(out, q, k_cache, v_cache, positions, table, table_off, sinks, has_sinks, heads,
                              kv_heads, head_dim, v_head_dim, v_stride, scale, window, softcap, 0, 0, 0);
}

extern "C" __global__ void pie_attention_masked(float* out, const float* q, const float* k_cache,
                                                const float* v_cache, const int* positions, const int* table,
                                                const int* table_off, const float* sinks, int has_sinks,
                                                int heads, int kv_heads, int head_dim, int v_head_dim,
                                                int v_stride, float scale, int window, float softcap,
                                                const unsigned* mask_words, const int* mask_off,
                                                const int* key_count) {
    pie_attention_body<true>(out, q, k_cache, v_cache, positions, table, table_off, sinks, has_sinks, heads,
                             kv_heads, head_dim, v_head_dim, v_stride, scale, window, softcap, mask_words,
                             mask_off, key_count);
}

// Greedy sampling with its log-probability, per requested row: the argmax
// (first index on ties) and logit[argmax] - log sum exp(logits) =
// -log sum exp(logits - max). Two launches, so a row of a large vocabulary
// is read by many blocks at once (one block per row waited on memory
// latency: ~100 us for 152k logits): pie_greedy_partial reduces slices of
// each row to (max, first argmax, sum exp(x - max)), pie_greedy_finish
// merges a row's slices. Only two numbers per row leave the device.
#define PIE_GREEDY_THREADS 256

// Merges part (m2, i2, s2) into (m, i, s): the larger max wins (the smaller
// index on ties) and the other part's sum is rescaled to the winner's max.
// Symmetric, so both lanes of a shuffle agree.
__device__ __forceinline__ void pie_greedy_merge(float& m, int& i, float& s, float m2, int i2, float s2) {
    if (m2 > m || (m2 == m && i2 < i)) {
        float tm = m, ts = s;
        int ti = i;
        m = m2, i = i2, s = s2;
        m2 = tm, i2 = ti, s2 = ts;
    }
    if (m2 != PIE_NEG_INF) s += s2 * expf(m2 - m);
}

// The block's (max, argmax, sum) after every thread merged its own.
__device__ __forceinline__ void pie_greedy_block(float& m, int& i, float& s) {
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        pie_greedy_merge(m, i, s, m2, i2, s2);
    }
    __shared__ float wm[PIE_GREEDY_THREADS / 32], ws[PIE_GREEDY_THREADS / 32];
    __shared__ int wi[PIE_GREEDY_THREADS / 32];
    int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) wm[warp] = m, wi[warp] = i, ws[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); w++) pie_greedy_merge(m, i, s, wm[w], wi[w], ws[w]);
    }
}

// Block (r, slice) of a (rows, slices) grid: part[(r * slices + slice) * 3
// + 0, 1, 2] = max, argmax (int bits), sum over its slice of row rows[r].
extern "C" __global__ void __launch_bounds__(PIE_GREEDY_THREADS)
pie_greedy_partial(float* part, const float* x, const int* rows, int width) {
    // The row indices are not a step's output: read before the logits'
    // kernel ends (pdl.cu).
    const float* r = x + (long long)rows[blockIdx.x] * width;
    pie_pdl_wait();
    int per = (width + gridDim.y - 1) / gridDim.y;
    int begin = blockIdx.y * per, end = min(width, begin + per);
    float m = PIE_NEG_INF, s = 0.0f;
    int i = 0x7fffffff;
#pragma unroll 4
    for (int j = begin + threadIdx.x; j < end; j += blockDim.x) pie_greedy_merge(m, i, s, r[j], j, 1.0f);
    pie_greedy_block(m, i, s);
    if (threadIdx.x == 0) {
        float* out = part + ((long long)blockIdx.x * gridDim.y + blockIdx.y) * 3;
        out[0] = m, out[1] = __int_as_float(i), out[2] = s;
    }
}

// One block per row: merges the row's `slices` parts.
extern "C" __global__ void __launch_bounds__(PIE_GREEDY_THREADS)
pie_greedy_finish(unsigned int* ids, float* logprobs, const float* part, int slices) {
    const float* p = part + (long long)blockIdx.x * slices * 3;
    pie_pdl_wait();
    float m = PIE_NEG_INF, s = 0.0f;
    int i = 0x7fffffff;
    for (int j = threadIdx.x; j < slices; j += blockDim.x)
        pie_greedy_merge(m, i, s, p[3 * j], __float_as_int(p[3 * j + 1]), p[3 * j + 2]);
    pie_greedy_block(m, i, s);
    if (threadIdx.x == 0) {
        ids[blockIdx.x] = i == 0x7fffffff ? 0 : i;
        logprobs[blockIdx.x] = -logf(s);
    }
}

// MLA, absorbed: per (row, head), the query in latent space
// q_lat = W_kᵀ q_nope, written next to the head's roped query part:
// out[row, h] = [q_lat (kv_lora), q_rot (rope)]. kv_b rows of head h:
// nope key rows, then v value rows, each kv_lora wide (dtype 0 f32, 1 bf16).
extern "C" __global__ void pie_mla_query(float* out, const float* q, const float* q_rot, const void* kv_b,
                                         int dtype, int heads, int nope, int rope, int v, int kv_lora) {
    int row = blockIdx.x / heads, h = blockIdx.x % heads;
    const float* qn = q + ((long long)row * heads + h) * (nope + rope);
    float* o = out + ((long long)row * heads + h) * (kv_lora + rope);
    long long w0 = (long long)h * (nope + v) * kv_lora;
    for (int c = threadIdx.x; c < kv_lora; c += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < nope; i++) {
            long long at = w0 + (long long)i * kv_lora + c;
            float w = dtype == 0 ? ((const float*)kv_b)[at] : pie_bf16_to_f32(((const pie_u16*)kv_b)[at]);
            acc += qn[i] * w;
        }
        o[c] = acc;
    }
    for (int r = threadIdx.x; r < rope; r += blockDim.x)
        o[kv_lora + r] = q_rot[((long long)row * heads + h) * rope + r];
}

// MLA, absorbed: each head's output W_v o_lat from its latent-space
// attention output (`o_lat` [rows, heads, kv_lora]).
extern "C" __global__ void pie_mla_value(float* out, const float* o_lat, const void* kv_b, int dtype, int heads,
                                         int nope, int v, int kv_lora) {
    int row = blockIdx.x / heads, h = blockIdx.x % heads;
    const float* ol = o_lat + ((long long)row * heads + h) * kv_lora;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        long long w0 = ((long long)h * (nope + v) + nope + j) * kv_lora;
        float acc = 0.0f;
        for (int c = 0; c < kv_lora; c++) {
            float w = dtype == 0 ? ((const float*)kv_b)[w0 + c] : pie_bf16_to_f32(((const pie_u16*)kv_b)[w0 + c]);
            acc += w * ol[c];
        }
        out[((long long)row * heads + h) * v + j] = acc;
    }
}

// out[r] = [a[r] (wa), b[r] (wb)].
extern "C" __global__ void pie_concat_cols(float* out, const float* a, const float* b, int rows, int wa, int wb) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int w = wa + wb;
    if (i >= rows * w) return;
    int r = i / w, c = i % w;
    out[i] = c < wa ? a[(long long)r * wa + c] : b[(long long)r * wb + (c - wa)];
}

// MLA's sparse-attention indexer (GLM-MoE-DSA): for each row r = rows[i],
// the score of every key it sees, out[i, t] = Σ_h w[r, h] · w_scale ·
// relu(q[r, h] · k[t] · scale) for t <= positions[r] and -inf for the
// other t < max_keys; k[t] is the indexer key cached at the token slot of
// the row's position t (`dim` floats a slot). One block per listed row,
// its queries and head weights in shared memory, one thread per key.
extern "C" __global__ void pie_mla_index_scores(float* out, const float* q, const float* w,
                                                const float* k_cache, const int* rows, const int* positions,
                                                const int* table, const int* table_off, int heads, int dim,
                                                float scale, float w_scale, int max_keys) {
    extern __shared__ float pie_index_q[];  // heads * dim queries, then heads weights
    int r = rows[blockIdx.x];
    const float* qr = q + (long long)r * heads * dim;
    for (int i = threadIdx.x; i < heads * dim; i += blockDim.x) pie_index_q[i] = qr[i];
    for (int h = threadIdx.x; h < heads; h += blockDim.x)
        pie_index_q[heads * dim + h] = w[(long long)r * heads + h] * w_scale;
    __syncthreads();
    int pos = positions[r];
    const int* slots = table + table_off[r];
    float* o = out + (long long)blockIdx.x * max_keys;
    for (int t = threadIdx.x; t < max_keys; t += blockDim.x) {
        if (t > pos) {
            o[t] = PIE_NEG_INF;
            continue;
        }
        const float* kt = k_cache + (long long)slots[t] * dim;
        float score = 0.0f;
        for (int h = 0; h < heads; h++) {
            const float* qh = pie_index_q + h * dim;
            float dot = 0.0f;
            for (int d = 0; d < dim; d++) dot += qh[d] * kt[d];
            score += pie_index_q[heads * dim + h] * fmaxf(dot * scale, 0.0f);
        }
        o[t] = score;
    }
}
