// Paged attention for query heads grouped over their key/value head (GQA),
// split over the keys so that short batches (decode) still fill the GPU.
//
// Pass 1, pie_gqa_attention_partial: one warp per (row, kv head, split).
// It reads each visible key and value row of its share once for all the
// query heads of the group (pie_attention reads them once per query head)
// and keeps an online softmax per head; splits take keys first + s,
// first + s + S, ... so any context length works with a grid fixed by the
// batch shape alone (what a recorded CUDA graph needs). Four keys per
// step are loaded before they are used, to keep loads in flight; their
// cache slots come from a per-warp preload by shuffle.
// Pass 2, pie_gqa_attention_combine: one block per (row, query head)
// merges the splits' (max, sum, weighted values). The _fold kernels run
// both in one launch: the last block of each (row, kv head) to finish
// does that pair's combine (decode grids, counters from the driver);
// they are also compiled for groups of exactly 2, 4 and 8 (_g2, _g4, _g8).
// All wait for the kernel before (pdl.cu) only after loading their slots.
//
// Limits (the driver checks): group = heads / kv_heads <= 8, head_dim and
// v_head_dim <= 128. window <= 0: full causal; softcap <= 0: none.
// The _bf16 variant reads caches of bf16 bits (pie_kv_write_bf16 wrote them).

#define PIE_GQA_MAX_GROUP 8
#define PIE_GQA_MAX_DPL 4 /* dims per lane: 128 / 32 */
#define PIE_GQA_UNROLL 4
#define PIE_GQA_WARPS 4
#define PIE_GQA_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float pie_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// f32 -> bf16 bits, rounding to nearest even (NaN stays NaN).
__device__ __forceinline__ unsigned short pie_kv_bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// pie_kv_write for a bf16 cache: each new token's key and value rows,
// rounded to bf16, into their token slots (the buffers hold bf16 bits).
extern "C" __global__ void pie_kv_write_bf16(float* k_cache, float* v_cache, const float* k, const float* v,
                                             const int* slots, int rows, int k_width, int v_width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int width = k_width + v_width;
    if (i >= (long long)rows * width) return;
    int r = i / width, c = i % width;
    long long slot = slots[r];
    unsigned short* kc = (unsigned short*)k_cache;
    unsigned short* vc = (unsigned short*)v_cache;
    if (c < k_width) kc[slot * k_width + c] = pie_kv_bf16_bits(k[(long long)r * k_width + c]);
    else vc[slot * v_width + (c - k_width)] = pie_kv_bf16_bits(v[(long long)r * v_width + (c - k_width)]);
}

// Element `i` of a KV buffer: f32, or bf16 bits.
__device__ __forceinline__ float pie_kv_load(const float* cache, long long i) { return cache[i]; }
__device__ __forceinline__ float pie_kv_load(const unsigned short* cache, long long i) {
    return __uint_as_float(((unsigned int)cache[i]) << 16);
}

// Which head dimension a lane's i-th value holds. Strided (lane + 32 i)
// works for any head dim; with CONTIG (head_dim == v_head_dim == 128) a
// lane holds 4 consecutive dims, read with one vector load per key row.
template <bool CONTIG>
__device__ __forceinline__ int pie_gqa_dim(int lane, int i) {
    return CONTIG ? lane * PIE_GQA_MAX_DPL + i : lane + 32 * i;
}

// A lane's values of one key or value row starting at `base`.
template <bool CONTIG>
__device__ __forceinline__ void pie_gqa_row(const float* cache, long long base, int lane, bool live, int dim,
                                            float* out) {
    if (CONTIG) {
        float4 v = live ? *(const float4*)(cache + base + lane * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
        return;
    }
#pragma unroll
    for (int i = 0; i < PIE_GQA_MAX_DPL; i++) {
        int d = lane + 32 * i;
        out[i] = (live && d < dim) ? cache[base + d] : 0.0f;
    }
}

template <bool CONTIG>
__device__ __forceinline__ void pie_gqa_row(const unsigned short* cache, long long base, int lane, bool live,
                                            int dim, float* out) {
    if (CONTIG) {
        uint2 raw = live ? *(const uint2*)(cache + base + lane * 4) : make_uint2(0u, 0u);
        out[0] = __uint_as_float(raw.x << 16), out[1] = __uint_as_float(raw.x & 0xffff0000u);
        out[2] = __uint_as_float(raw.y << 16), out[3] = __uint_as_float(raw.y & 0xffff0000u);
        return;
    }
#pragma unroll
    for (int i = 0; i < PIE_GQA_MAX_DPL; i++) {
        int d = lane + 32 * i;
        out[i] = (live && d < dim) ? pie_kv_load(cache, base + d) : 0.0f;
    }
}

// A cache element from an f32 value: stored as is, or rounded to bf16 bits.
__device__ __forceinline__ void pie_kv_store(float* cache, long long i, float v) { cache[i] = v; }
__device__ __forceinline__ void pie_kv_store(unsigned short* cache, long long i, float v) {
    cache[i] = pie_kv_bf16_bits(v);
}

// The row's own new key and value (kv head kvh) into its cache slot, what
// pie_kv_write(_bf16) does, by the warp whose share of keys holds the
// row's position (decode folds, k_new set). Each lane writes exactly the
// dims it later reads for that key (pie_gqa_dim), so its key loop sees
// its own stores and waits on no other thread. The driver folds the write
// only where no row reads another row's new key (one new token per
// sequence).
template <typename T, bool CONTIG>
__device__ __forceinline__ void pie_gqa_store_new(T* k_cache, T* v_cache, const float* k_new, const float* v_new,
                                                  long long slot, int row, int kvh, int lane, int k_width,
                                                  int head_dim, int v_head_dim, int v_width) {
#pragma unroll
    for (int i = 0; i < PIE_GQA_MAX_DPL; i++) {
        int d = pie_gqa_dim<CONTIG>(lane, i);
        if (d < head_dim)
            pie_kv_store(k_cache, slot * k_width + (long long)kvh * head_dim + d,
                         k_new[(long long)row * k_width + (long long)kvh * head_dim + d]);
        if (d < v_head_dim)
            pie_kv_store(v_cache, slot * v_width + (long long)kvh * v_head_dim + d,
                         v_new[(long long)row * v_width + (long long)kvh * v_head_dim + d]);
    }
}

// The q/k RMS norms and rope of a layer, applied by a decode fold to the
// raw projections it reads (the driver's norm_rope_attention: one launch
// less per layer than pie_rms_norm_rope2 before the attention). Taken for
// head_dim == rotary_dim == 128 (CONTIG: lane l holds dims 4l .. 4l + 3)
// and the half-split rotation, whose partner of dim d < 64 is d + 64: the
// same slot of lane l ^ 16. The same formulas as pie_norm_rope_head.
struct PieQkNormRope {
    const float *q_w, *k_w;  // (offset + w) scales; null: none
    float q_eps, k_eps, q_offset, k_offset;
    const int* positions;  // the rope's positions (per row)
    const int* seq_lens;
    const double *inv_short, *inv_long;
    int long_from;
    double scale;
};

// This lane's cos and sin (4 dims) of row `row`'s rotation, computed
// before pie_pdl_wait from the step's uploads only. Lanes l and l ^ 16
// rotate by the same 4 angles (dims d and d + 64): each computes two and
// takes the other two from its partner.
__device__ __forceinline__ void pie_gqa_rope_angles(const PieQkNormRope& nr, int row, int lane, float (&c)[4],
                                                    float (&s)[4]) {
    const double* freqs = pie_rope_freqs(nr.seq_lens, row, nr.inv_short, nr.inv_long, nr.long_from);
    bool low = lane < 16;
    int first = (lane * 4 + (low ? 0 : 2)) & 63;
    float mc[2], ms[2];
#pragma unroll
    for (int t = 0; t < 2; t++) pie_rope_cos_sin(nr.positions[row], freqs[first + t], nr.scale, &mc[t], &ms[t]);
#pragma unroll
    for (int t = 0; t < 2; t++) {
        float oc = __shfl_xor_sync(0xffffffffu, mc[t], 16), os = __shfl_xor_sync(0xffffffffu, ms[t], 16);
        c[t] = low ? mc[t] : oc, s[t] = low ? ms[t] : os;
        c[t + 2] = low ? oc : mc[t], s[t + 2] = low ? os : ms[t];
    }
}

// This lane's 4 scales (offset + w) of a q or k norm (1 without weights):
// the weights are constants, read before pie_pdl_wait too.
__device__ __forceinline__ void pie_gqa_norm_scales(const float* w, float offset, int lane, float (&g)[4]) {
#pragma unroll
    for (int i = 0; i < 4; i++) g[i] = w ? offset + w[lane * 4 + i] : 1.0f;
}

// rope(rms_norm(v)) of one 128-dim head held by a warp (4 dims per lane),
// in place; g: pie_gqa_norm_scales.
__device__ __forceinline__ void pie_gqa_norm_rope(float (&v)[PIE_GQA_MAX_DPL], const float (&g)[4], float eps,
                                                  const float (&c)[4], const float (&s)[4], int lane) {
    float squares = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) squares += v[i] * v[i];
    float inv = rsqrtf(pie_warp_sum(squares) / 128.0f + eps);
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = v[i] * inv * g[i];
    // x0 = dim d < 64, x1 = dim d + 64: x0' = x0 c - x1 s, x1' = x1 c + x0 s.
    float sign = lane < 16 ? -1.0f : 1.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float partner = __shfl_xor_sync(0xffffffffu, v[i], 16);
        v[i] = v[i] * c[i] + sign * partner * s[i];
    }
}

// pie_gqa_store_new with the new key normalized and rotated first (the
// CONTIG layout: 4 consecutive dims per lane, head dims of 128).
template <typename T>
__device__ __forceinline__ void pie_gqa_store_new_normed(T* k_cache, T* v_cache, const float* k_new,
                                                         const float* v_new, long long slot, int row, int kvh,
                                                         int lane, int k_width, int v_width,
                                                         const PieQkNormRope& nr, const float (&c)[4],
                                                         const float (&s)[4], const float (&g)[4]) {
    const float* kr = k_new + (long long)row * k_width + (long long)kvh * 128 + lane * 4;
    const float* vr = v_new + (long long)row * v_width + (long long)kvh * 128 + lane * 4;
    float k[PIE_GQA_MAX_DPL] = {kr[0], kr[1], kr[2], kr[3]};
    pie_gqa_norm_rope(k, g, nr.k_eps, c, s, lane);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        pie_kv_store(k_cache, slot * k_width + (long long)kvh * 128 + lane * 4 + i, k[i]);
        pie_kv_store(v_cache, slot * v_width + (long long)kvh * 128 + lane * 4 + i, vr[i]);
    }
}

// Asks L2 for one key's K and V rows of kv head kvh, before pie_pdl_wait:
// at batch 1 the key loop is a few dependent loads per warp, each an HBM
// round trip (the step's weight traffic has evicted the cache), and the
// kernel before leaves a few microseconds to fetch them. Keys older than
// this step are written by no kernel of it; the new key's row may be (a
// prefetch only moves lines into L2, the point of coherence, so a later
// read still sees the write). Rows whose address or size is not a
// multiple of 16 bytes are left to the loop.
template <typename T>
__device__ __forceinline__ void pie_gqa_prefetch_rows(const T* k_cache, const T* v_cache, long long slot, int kvh,
                                                      int k_width, int head_dim, int v_stride, int v_head_dim) {
    const T* k = k_cache + slot * k_width + (long long)kvh * head_dim;
    const T* v = v_cache + slot * v_stride + (long long)kvh * v_head_dim;
    unsigned int kb = head_dim * sizeof(T), vb = v_head_dim * sizeof(T);
    if ((((unsigned long long)k | kb) & 15) == 0) pie_prefetch_l2(k, kb);
    if ((((unsigned long long)v | vb) & 15) == 0) pie_prefetch_l2(v, vb);
}

// The partial pass over a cache of element type T (float or bf16 bits);
// one instantiation per type and dim layout so the hot loop has no tests.
// G > 0: compiled for groups of exactly G query heads (the decode folds of
// common shapes: fewer registers and instructions than the general form,
// G = 0, which takes any group up to PIE_GQA_MAX_GROUP).
template <typename T, bool CONTIG, int G = 0>
__device__ __forceinline__ void pie_gqa_partial(float* part_ml, float* part_acc, const float* q, const T* k_cache,
                                                const T* v_cache, const int* positions, const int* table,
                                                const int* table_off, int heads, int kv_heads, int head_dim,
                                                int v_head_dim, int v_stride, float scale, int window, float softcap,
                                                const float* k_new = nullptr, const float* v_new = nullptr,
                                                const int* new_slots = nullptr, const PieQkNormRope* nr = nullptr) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int rk = blockIdx.x;  // row * kv_heads + kv head
    int row = rk / kv_heads, kvh = rk % kv_heads;
    int split = blockIdx.y * PIE_GQA_WARPS + warp, splits = gridDim.y * PIE_GQA_WARPS;
    constexpr int GM = G > 0 ? G : PIE_GQA_MAX_GROUP;  // the arrays' size
    int group = G > 0 ? G : heads / kv_heads;
    int pos = positions[row];
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int* slots = table + table_off[row];
    int k_width = kv_heads * head_dim;
    // Lane j holds the cache slot of the warp's key j (of the current 32),
    // so a key's slot comes by shuffle: the loop waits on one memory round
    // trip per step (the key and value rows), not two. The tables are the
    // step's uploads: the first 32 slots load before pie_pdl_wait (pdl.cu),
    // while the kernel before (the one writing q) may still run.
    int lane_key = first + split + lane * splits;  // the warp's key `lane`
    int lane_slot = lane_key <= pos ? slots[lane_key] : 0;
    if (lane_key <= pos) pie_gqa_prefetch_rows(k_cache, v_cache, lane_slot, kvh, k_width, head_dim, v_stride, v_head_dim);
    // With nr (CONTIG only), q and the new key are normalized and rotated
    // here; their angles need only the step's uploads too.
    bool norm_rope = CONTIG && nr != nullptr;
    float rc[4], rs[4], qg[4], kg[4];
    if (norm_rope) {
        pie_gqa_rope_angles(*nr, row, lane, rc, rs);
        pie_gqa_norm_scales(nr->q_w, nr->q_offset, lane, qg);
        pie_gqa_norm_scales(nr->k_w, nr->k_offset, lane, kg);
    }
    pie_pdl_wait();

    float qr[GM][PIE_GQA_MAX_DPL];
    float acc[GM][PIE_GQA_MAX_DPL];
    float m[GM], l[GM];
    const float* qrow = q + (long long)row * heads * head_dim + (long long)kvh * group * head_dim;
#pragma unroll
    for (int g = 0; g < GM; g++) {
        m[g] = PIE_GQA_NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < PIE_GQA_MAX_DPL; i++) {
            int d = pie_gqa_dim<CONTIG>(lane, i);
            qr[g][i] = (g < group && d < head_dim) ? qrow[g * head_dim + d] : 0.0f;
            acc[g][i] = 0.0f;
        }
        if (norm_rope && g < group) pie_gqa_norm_rope(qr[g], qg, nr->q_eps, rc, rs, lane);
    }

    if (k_new && (pos - first) % splits == split) {
        if (norm_rope)
            pie_gqa_store_new_normed((T*)k_cache, (T*)v_cache, k_new, v_new, new_slots[row], row, kvh, lane,
                                     k_width, v_stride, *nr, rc, rs, kg);
        else
            pie_gqa_store_new<T, CONTIG>((T*)k_cache, (T*)v_cache, k_new, v_new, new_slots[row], row, kvh, lane,
                                         k_width, head_dim, v_head_dim, v_stride);
    }

    for (int t0 = first + split, j0 = 0; t0 <= pos; t0 += splits * PIE_GQA_UNROLL, j0 += PIE_GQA_UNROLL) {
        if (j0 > 0 && (j0 & 31) == 0) {  // the next 32 slots; uniform over the warp
            int t = t0 + lane * splits;
            lane_slot = t <= pos ? slots[t] : 0;
        }
        long long kbase[PIE_GQA_UNROLL], vbase[PIE_GQA_UNROLL];
        bool live[PIE_GQA_UNROLL];
#pragma unroll
        for (int u = 0; u < PIE_GQA_UNROLL; u++) {
            int t = t0 + u * splits;
            live[u] = t <= pos;
            long long slot = __shfl_sync(0xffffffffu, lane_slot, (j0 & 31) + u);
            kbase[u] = slot * k_width + (long long)kvh * head_dim;
            vbase[u] = slot * v_stride + (long long)kvh * v_head_dim;
        }
        float kr[PIE_GQA_UNROLL][PIE_GQA_MAX_DPL];
#pragma unroll
        for (int u = 0; u < PIE_GQA_UNROLL; u++) pie_gqa_row<CONTIG>(k_cache, kbase[u], lane, live[u], head_dim, kr[u]);
        float vr[PIE_GQA_UNROLL][PIE_GQA_MAX_DPL];
#pragma unroll
        for (int u = 0; u < PIE_GQA_UNROLL; u++)
            pie_gqa_row<CONTIG>(v_cache, vbase[u], lane, live[u], v_head_dim, vr[u]);
#pragma unroll
        for (int g = 0; g < GM; g++) {
            if (g >= group) break;
            float s[PIE_GQA_UNROLL];
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < PIE_GQA_UNROLL; u++) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < PIE_GQA_MAX_DPL; i++) dot += qr[g][i] * kr[u][i];
                dot = pie_warp_sum(dot) * scale;
                if (softcap > 0.0f) dot = tanhf(dot / softcap) * softcap;
                s[u] = live[u] ? dot : PIE_GQA_NEG_INF;
                mx = fmaxf(mx, s[u]);
            }
            // t0 <= pos, so key 0 is live and mx is finite.
            float corr = __expf(m[g] - mx);
            float sum = 0.0f;
#pragma unroll
            for (int u = 0; u < PIE_GQA_UNROLL; u++) {
                s[u] = __expf(s[u] - mx);
                sum += s[u];
            }
            l[g] = l[g] * corr + sum;
            m[g] = mx;
#pragma unroll
            for (int i = 0; i < PIE_GQA_MAX_DPL; i++) {
                float a = acc[g][i] * corr;
#pragma unroll
                for (int u = 0; u < PIE_GQA_UNROLL; u++) a += s[u] * vr[u][i];
                acc[g][i] = a;
            }
        }
    }

    long long p = (long long)rk * splits + split;  // this warp's partial
    for (int g = 0; g < group; g++) {
        if (lane == 0) {
            part_ml[(p * group + g) * 2] = m[g];
            part_ml[(p * group + g) * 2 + 1] = l[g];
        }
#pragma unroll
        for (int i = 0; i < PIE_GQA_MAX_DPL; i++) {
            int d = pie_gqa_dim<CONTIG>(lane, i);
            if (d < v_head_dim) part_acc[(p * group + g) * v_head_dim + d] = acc[g][i];
        }
    }
}

// The partial pass's entry points: f32 or bf16 cache, strided dims or (the
// _c128 ones, head_dim == v_head_dim == 128) 4 consecutive dims per lane;
// G as in pie_gqa_partial (the general form holds 8 heads' state: 194
// registers, where _g4 needs 126 and _g2 72, so more warps fit an SM).
#define PIE_GQA_PARTIAL_KERNEL(NAME, T, CONTIG, G)                                                             \
    extern "C" __global__ void __launch_bounds__(PIE_GQA_WARPS * 32)                                           \
        NAME(float* part_ml, float* part_acc, const float* q, const T* k_cache, const T* v_cache,              \
             const int* positions, const int* table, const int* table_off, int heads, int kv_heads,            \
             int head_dim, int v_head_dim, int v_stride, float scale, int window, float softcap) {             \
        pie_gqa_partial<T, CONTIG, G>(part_ml, part_acc, q, k_cache, v_cache, positions, table, table_off,     \
                                      heads, kv_heads, head_dim, v_head_dim, v_stride, scale, window, softcap); \
    }

// Most splits a combine takes (their weights are held in shared memory).
#define PIE_GQA_MAX_SPLITS 64

// One warp's part of a combine: the weights of one query head's splits
// (each split's maximum against the largest, into weight[s]) and the
// softmax denominator (plus the head's learned sink logit sinks[h] when
// has_sinks), returned to every lane. ml: (max, sum) of the head's first
// split, split s at s * group * 2 (__ldcg: other blocks wrote them).
__device__ __forceinline__ float pie_gqa_split_weights(const float* ml, int splits, int group, float* weight,
                                                       const float* sinks, int has_sinks, int h) {
    int lane = threadIdx.x & 31;
    float mx = PIE_GQA_NEG_INF;
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, __ldcg(ml + (long long)s * group * 2));
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float total = 0.0f;
    for (int s = lane; s < splits; s += 32) {
        float ms = __ldcg(ml + (long long)s * group * 2);
        float w = ms == PIE_GQA_NEG_INF ? 0.0f : __expf(ms - mx);
        weight[s] = w;
        total += __ldcg(ml + (long long)s * group * 2 + 1) * w;
    }
    return pie_warp_sum(total) + (has_sinks ? __expf(sinks[h] - mx) : 0.0f);
}

// The combine of one (row, query head) by a block of 128 threads; thread
// d owns output dimension d. The first warp turns the splits' maxima into
// weights (pie_gqa_split_weights, in shared memory), then every thread
// sums its dimension over the splits with independent loads (__ldcg:
// other blocks wrote them). Every thread of the block must call it.
__device__ __forceinline__ void pie_gqa_combine_head(float* out, unsigned short* out_bf16, const float* part_ml,
                                                     const float* part_acc, const float* sinks, int has_sinks,
                                                     int heads, int kv_heads, int v_head_dim, int splits, int row,
                                                     int h) {
    __shared__ float weight[PIE_GQA_MAX_SPLITS];
    __shared__ float denominator;
    int group = heads / kv_heads;
    int rk = row * kv_heads + h / group, g = h % group;
    const float* ml = part_ml + ((long long)rk * splits * group + g) * 2;  // split s at s * group * 2
    __syncthreads();  // a previous call's readers are done with weight[]
    if (threadIdx.x < 32) {
        float total = pie_gqa_split_weights(ml, splits, group, weight, sinks, has_sinks, h);
        if (threadIdx.x == 0) denominator = total;
    }
    __syncthreads();
    int d = threadIdx.x;
    if (d >= v_head_dim) return;
    const float* acc = part_acc + ((long long)rk * splits * group + g) * v_head_dim + d;
    long long stride = (long long)group * v_head_dim;
    float value = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; s++) value += __ldcg(acc + s * stride) * weight[s];
    long long o = ((long long)row * heads + h) * v_head_dim + d;
    out[o] = value / denominator;
    if (out_bf16) out_bf16[o] = pie_kv_bf16_bits(value / denominator);
}

// Pass 2 as its own launch: one block of 128 threads per (row, query head).
extern "C" __global__ void pie_gqa_attention_combine(float* out, unsigned short* out_bf16, const float* part_ml,
                                                     const float* part_acc, const float* sinks, int has_sinks,
                                                     int heads, int kv_heads, int v_head_dim, int splits) {
    pie_gqa_combine_head(out, out_bf16, part_ml, part_acc, sinks, has_sinks, heads, kv_heads, v_head_dim, splits,
                         blockIdx.x / heads, blockIdx.x % heads);
}

// The fold's combine: every query head of one (row, kv head) pair at once.
// Warp w turns the split maxima of heads w, w + PIE_GQA_WARPS, ... into
// weights; then thread d sums dimension d of every head over the splits.
// Those loads are all independent, so the pair costs one pass of L2 round
// trips where pie_gqa_combine_head, once per head, costs one per head.
template <int G = 0>
__device__ __forceinline__ void pie_gqa_combine_group(float* out, unsigned short* out_bf16, const float* part_ml,
                                                      const float* part_acc, const float* sinks, int has_sinks,
                                                      int heads, int kv_heads, int v_head_dim, int splits, int row,
                                                      int kvh) {
    constexpr int GM = G > 0 ? G : PIE_GQA_MAX_GROUP;  // as in pie_gqa_partial
    __shared__ float weight[GM][PIE_GQA_MAX_SPLITS];
    __shared__ float denominator[GM];
    int group = G > 0 ? G : heads / kv_heads, rk = row * kv_heads + kvh;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int g = warp; g < group; g += PIE_GQA_WARPS) {
        const float* ml = part_ml + ((long long)rk * splits * group + g) * 2;
        float total = pie_gqa_split_weights(ml, splits, group, weight[g], sinks, has_sinks, kvh * group + g);
        if (lane == 0) denominator[g] = total;
    }
    __syncthreads();
    int d = threadIdx.x;
    if (d >= v_head_dim) return;
    const float* acc = part_acc + (long long)rk * splits * group * v_head_dim + d;
    long long stride = (long long)group * v_head_dim;  // from one split to the next
    float value[GM];
#pragma unroll
    for (int g = 0; g < GM; g++) value[g] = 0.0f;
    for (int s = 0; s < splits; s++) {
#pragma unroll
        for (int g = 0; g < GM; g++)
            if (g < group) value[g] += __ldcg(acc + s * stride + g * v_head_dim) * weight[g][s];
    }
#pragma unroll
    for (int g = 0; g < GM; g++) {
        if (g >= group) break;
        long long o = ((long long)row * heads + kvh * group + g) * v_head_dim + d;
        float v = value[g] / denominator[g];
        out[o] = v;
        if (out_bf16) out_bf16[o] = pie_kv_bf16_bits(v);
    }
}

// Pass 2 folded into pass 1 (one launch): each block of a (row, kv head)
// pair counts itself done in counters[pair]; the last one combines the
// pair's query heads and resets the counter for the next launch.
template <int G = 0>
__device__ __forceinline__ void pie_gqa_fold(float* out, unsigned short* out_bf16, const float* part_ml,
                                             const float* part_acc, const float* sinks, int has_sinks, int heads,
                                             int kv_heads, int v_head_dim, unsigned int* counters) {
    __shared__ bool last;
    int rk = blockIdx.x;
    __threadfence();  // this block's partials are visible before it counts itself
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&counters[rk], 1u) == gridDim.y - 1;
        if (last) counters[rk] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    int splits = gridDim.y * PIE_GQA_WARPS;
    pie_gqa_combine_group<G>(out, out_bf16, part_ml, part_acc, sinks, has_sinks, heads, kv_heads, v_head_dim, splits,
                          rk / kv_heads, rk % kv_heads);
}

PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial, float, false, 0)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_bf16, unsigned short, false, 0)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_c128, float, true, 0)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_bf16_c128, unsigned short, true, 0)
// The same for groups of exactly 2, 4 or 8 query heads (suffix _gG).
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_g2, float, false, 2)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_bf16_g2, unsigned short, false, 2)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_c128_g2, float, true, 2)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_bf16_c128_g2, unsigned short, true, 2)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_g4, float, false, 4)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_bf16_g4, unsigned short, false, 4)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_c128_g4, float, true, 4)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_bf16_c128_g4, unsigned short, true, 4)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_g8, float, false, 8)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_bf16_g8, unsigned short, false, 8)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_c128_g8, float, true, 8)
PIE_GQA_PARTIAL_KERNEL(pie_gqa_attention_partial_bf16_c128_g8, unsigned short, true, 8)

// Both passes in one launch (decode: a grid small enough for the driver's
// counters); the _fold names of the entry points above. With k_new set
// (null: the cache holds them already), each row's new key and value are
// written to the cache by the launch itself (pie_gqa_store_new). With
// norm_rope (the _c128 kernels only), q and k are the raw projections and
// the launch applies their norms and rope itself (PieQkNormRope).
#define PIE_GQA_FOLDED_KERNEL(NAME, T, CONTIG, G)                                                              \
    extern "C" __global__ void __launch_bounds__(PIE_GQA_WARPS * 32)                                           \
        NAME(float* part_ml, float* part_acc, const float* q, const T* k_cache, const T* v_cache,              \
             const int* positions, const int* table, const int* table_off, int heads, int kv_heads,            \
             int head_dim, int v_head_dim, int v_stride, float scale, int window, float softcap, float* out,   \
             unsigned short* out_bf16, const float* sinks, int has_sinks, unsigned int* counters,              \
             const float* k_new, const float* v_new, const int* new_slots, int norm_rope, const float* q_w,    \
             const float* k_w, float q_eps, float k_eps, float q_offset, float k_offset,                       \
             const int* rope_positions, const int* seq_lens, const double* inv_short, const double* inv_long,  \
             int long_from, double rope_scale) {                                                               \
        PieQkNormRope nr = {q_w,       k_w,       q_eps,     k_eps,    q_offset,  k_offset,                    \
                            rope_positions, seq_lens, inv_short, inv_long, long_from, rope_scale};             \
        pie_gqa_partial<T, CONTIG, G>(part_ml, part_acc, q, k_cache, v_cache, positions, table, table_off,     \
                                      heads, kv_heads, head_dim, v_head_dim, v_stride, scale, window, softcap, \
                                      k_new, v_new, new_slots, norm_rope ? &nr : nullptr);                     \
        pie_gqa_fold<G>(out, out_bf16, part_ml, part_acc, sinks, has_sinks, heads, kv_heads, v_head_dim,       \
                        counters);                                                                             \
    }
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold, float, false, 0)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_bf16, unsigned short, false, 0)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_c128, float, true, 0)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_bf16_c128, unsigned short, true, 0)
// The same for groups of exactly 2, 4 or 8 query heads (suffix _gG).
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_g2, float, false, 2)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_bf16_g2, unsigned short, false, 2)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_c128_g2, float, true, 2)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_bf16_c128_g2, unsigned short, true, 2)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_g4, float, false, 4)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_bf16_g4, unsigned short, false, 4)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_c128_g4, float, true, 4)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_bf16_c128_g4, unsigned short, true, 4)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_g8, float, false, 8)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_bf16_g8, unsigned short, false, 8)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_c128_g8, float, true, 8)
PIE_GQA_FOLDED_KERNEL(pie_gqa_attention_fold_bf16_c128_g8, unsigned short, true, 8)
