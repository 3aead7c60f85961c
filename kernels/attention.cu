// Attention inside windows with positional terms: the layouts and formula of selfsup-ops'
// `attention` module (the CPU path these kernels are tested against). For window g, head h:
//   S = scale * Q K^T [+ bias[h]] [+ mask[g % n_masks]] [+ ctx_scale * Q T[:, bucket(i, j)]]
//   O = softmax_rows(S) V
// q lives in a (g, lq, sq, h, D) tensor at slot qs, k and v in a (g, lk, skv, h, D) tensor at
// slots ks and vs (the two may be one fused qkv); O is (g, lq, h, D); the positional terms and
// the row statistics are f32. Compiled once per head dim: HEAD_DIM is defined by the launcher
// (NVRTC option -DHEAD_DIM=...), and the entry points carry it in their names.
//
// Forward: one block per (window, head) holds the window's K and V in shared memory; one thread
// per query row runs an online softmax and keeps only the row's log-sum-exp. Backward (flash
// style): nothing of size lq x lk is stored; each kernel recomputes P from the saved
// log-sum-exp:
// - attn_bwd_dq: one thread per query row (K, V in shared memory); also writes
//   delta_i = dO_i . O_i for the other two;
// - attn_bwd_dkv: one thread per key row (Q, dO, lse, delta in shared memory);
// - attn_bwd_pairs (only with a bias or a contextual table): one thread per (head, i, j),
//   summing over the windows in order: d bias, and per pair the vector sum_g dS * q that
//   attn_table_reduce sums per bucket (through a bucket -> pairs list built on the host).
// Every sum runs in a fixed order: no atomics, deterministic.

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined (the launcher passes -DHEAD_DIM=<head dim>)"
#endif
#define D HEAD_DIM
#define NEG_INF (__uint_as_float(0xff800000u))
#define CAT4_(a, b, c, d) a##b##c##d
#define CAT4(a, b, c, d) CAT4_(a, b, c, d)

// One namespace per head dim: the host emulation links several head dims into one library, and
// the bodies (templates, inline helpers) must not merge across them.
namespace CAT4(attn_, d, HEAD_DIM, _impl) {

struct AttnDims {
    int g, lq, lk, h, sq, qs, skv, ks, vs;
    float scale;
    int n_masks;      // 0: no window mask
    int table_heads;  // 0: no contextual table; else 1 or h
    int n_buckets;
    float ctx_scale;
};

__device__ __forceinline__ long long q_off(const AttnDims& a, int gi, int i, int head) {
    return (((long long)gi * a.lq + i) * a.sq + a.qs) * a.h * D + (long long)head * D;
}
__device__ __forceinline__ long long kv_off(const AttnDims& a, int gi, int j, int slot, int head) {
    return (((long long)gi * a.lk + j) * a.skv + slot) * a.h * D + (long long)head * D;
}
__device__ __forceinline__ long long o_off(const AttnDims& a, int gi, int i, int head) {
    return (((long long)gi * a.lq + i) * a.h + head) * D;
}

template <typename T>
__device__ __forceinline__ void load_row(float* dst, const T* src) {
    for (int dd = 0; dd < D; ++dd) dst[dd] = to_f32(src[dd]);
}

// The logit S[i, j] of window gi, head `head`, from q_i and k_j as f32 rows.
__device__ __forceinline__ float attn_logit(const float* q, const float* k, const AttnDims& a, const float* bias,
                                            const float* mask, const float* table, const unsigned* buckets, int gi,
                                            int head, int i, int j) {
    float s = 0.f;
    for (int dd = 0; dd < D; ++dd) s += q[dd] * k[dd];
    s *= a.scale;
    if (bias) s += bias[((long long)head * a.lq + i) * a.lk + j];
    if (mask) s += mask[((long long)(gi % a.n_masks) * a.lq + i) * a.lk + j];
    if (table) {
        unsigned b = buckets[(long long)i * a.lk + j];
        const float* t = table + (a.table_heads == 1 ? 0 : (long long)head * D * a.n_buckets);
        float c = 0.f;
        for (int dd = 0; dd < D; ++dd) c += q[dd] * t[(long long)dd * a.n_buckets + b];
        s += a.ctx_scale * c;
    }
    return s;
}

// Shared memory: K then V of the block's window and head, (lk, D) each, f32.
template <typename T>
__device__ __forceinline__ void load_kv(const T* kv, float* K, float* V, const AttnDims& a, int gi, int head) {
    for (int e = threadIdx.x; e < a.lk * D; e += blockDim.x) {
        int j = e / D, dd = e % D;
        K[e] = to_f32(kv[kv_off(a, gi, j, a.ks, head) + dd]);
        V[e] = to_f32(kv[kv_off(a, gi, j, a.vs, head) + dd]);
    }
}

// Grid (g * h), block any; shared 2 * lk * D floats.
template <typename T>
__device__ void attn_fwd(const T* qsrc, const T* kvsrc, const float* bias, const float* mask, const float* table,
                         const unsigned* buckets, T* out, float* lse, AttnDims a) {
    int gi = blockIdx.x / a.h, head = blockIdx.x % a.h;
    float* K = SMEM(float);
    float* V = K + (long long)a.lk * D;
    load_kv(kvsrc, K, V, a, gi, head);
    __syncthreads();
    for (int i = threadIdx.x; i < a.lq; i += blockDim.x) {
        float q[D], acc[D];
        load_row(q, qsrc + q_off(a, gi, i, head));
        for (int dd = 0; dd < D; ++dd) acc[dd] = 0.f;
        float m = NEG_INF, l = 0.f;
        for (int j = 0; j < a.lk; ++j) {
            float s = attn_logit(q, K + (long long)j * D, a, bias, mask, table, buckets, gi, head, i, j);
            if (s == NEG_INF) continue;
            float mn = fmaxf(m, s);
            float corr = expf(m - mn);
            float p = expf(s - mn);
            l = l * corr + p;
            const float* v = V + (long long)j * D;
            for (int dd = 0; dd < D; ++dd) acc[dd] = acc[dd] * corr + p * v[dd];
            m = mn;
        }
        float inv = 1.f / l;
        T* o = out + o_off(a, gi, i, head);
        for (int dd = 0; dd < D; ++dd) o[dd] = from_f32<T>(acc[dd] * inv);
        lse[((long long)gi * a.h + head) * a.lq + i] = m + logf(l);
    }
}

// Grid (g * h); shared 2 * lk * D floats. Writes dq into its slot of `dqsrc` and delta.
template <typename T>
__device__ void attn_bwd_dq(const T* qsrc, const T* kvsrc, const float* bias, const float* mask, const float* table,
                            const unsigned* buckets, const T* out, const T* dout, const float* lse, float* delta,
                            T* dqsrc, AttnDims a) {
    int gi = blockIdx.x / a.h, head = blockIdx.x % a.h;
    float* K = SMEM(float);
    float* V = K + (long long)a.lk * D;
    load_kv(kvsrc, K, V, a, gi, head);
    __syncthreads();
    for (int i = threadIdx.x; i < a.lq; i += blockDim.x) {
        float q[D], go[D], dq[D];
        load_row(q, qsrc + q_off(a, gi, i, head));
        load_row(go, dout + o_off(a, gi, i, head));
        const T* o = out + o_off(a, gi, i, head);
        float di = 0.f;
        for (int dd = 0; dd < D; ++dd) {
            di += go[dd] * to_f32(o[dd]);
            dq[dd] = 0.f;
        }
        long long row = ((long long)gi * a.h + head) * a.lq + i;
        delta[row] = di;
        float L = lse[row];
        for (int j = 0; j < a.lk; ++j) {
            const float* k = K + (long long)j * D;
            const float* v = V + (long long)j * D;
            float p = expf(attn_logit(q, k, a, bias, mask, table, buckets, gi, head, i, j) - L);
            float dp = 0.f;
            for (int dd = 0; dd < D; ++dd) dp += go[dd] * v[dd];
            float ds = p * (dp - di);
            for (int dd = 0; dd < D; ++dd) dq[dd] += a.scale * ds * k[dd];
            if (table) {
                unsigned b = buckets[(long long)i * a.lk + j];
                const float* t = table + (a.table_heads == 1 ? 0 : (long long)head * D * a.n_buckets);
                for (int dd = 0; dd < D; ++dd) dq[dd] += a.ctx_scale * ds * t[(long long)dd * a.n_buckets + b];
            }
        }
        T* dst = dqsrc + q_off(a, gi, i, head);
        for (int dd = 0; dd < D; ++dd) dst[dd] = from_f32<T>(dq[dd]);
    }
}

// Grid (g * h); shared (2 * lq * D + 2 * lq) floats. Writes dk and dv into their slots of
// `dkvsrc` (which may be the buffer `attn_bwd_dq` wrote dq into: the slots differ).
template <typename T>
__device__ void attn_bwd_dkv(const T* qsrc, const T* kvsrc, const float* bias, const float* mask, const float* table,
                             const unsigned* buckets, const T* dout, const float* lse, const float* delta, T* dkvsrc,
                             AttnDims a) {
    int gi = blockIdx.x / a.h, head = blockIdx.x % a.h;
    float* Q = SMEM(float);
    float* G = Q + (long long)a.lq * D;
    float* L = G + (long long)a.lq * D;
    float* Dl = L + a.lq;
    for (int e = threadIdx.x; e < a.lq * D; e += blockDim.x) {
        int i = e / D, dd = e % D;
        Q[e] = to_f32(qsrc[q_off(a, gi, i, head) + dd]);
        G[e] = to_f32(dout[o_off(a, gi, i, head) + dd]);
    }
    for (int i = threadIdx.x; i < a.lq; i += blockDim.x) {
        long long row = ((long long)gi * a.h + head) * a.lq + i;
        L[i] = lse[row];
        Dl[i] = delta[row];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < a.lk; j += blockDim.x) {
        float k[D], v[D], dk[D], dv[D];
        load_row(k, kvsrc + kv_off(a, gi, j, a.ks, head));
        load_row(v, kvsrc + kv_off(a, gi, j, a.vs, head));
        for (int dd = 0; dd < D; ++dd) dk[dd] = dv[dd] = 0.f;
        for (int i = 0; i < a.lq; ++i) {
            const float* q = Q + (long long)i * D;
            const float* go = G + (long long)i * D;
            float p = expf(attn_logit(q, k, a, bias, mask, table, buckets, gi, head, i, j) - L[i]);
            float dp = 0.f;
            for (int dd = 0; dd < D; ++dd) {
                dv[dd] += p * go[dd];
                dp += go[dd] * v[dd];
            }
            float ds = p * (dp - Dl[i]);
            for (int dd = 0; dd < D; ++dd) dk[dd] += a.scale * ds * q[dd];
        }
        T* dkp = dkvsrc + kv_off(a, gi, j, a.ks, head);
        T* dvp = dkvsrc + kv_off(a, gi, j, a.vs, head);
        for (int dd = 0; dd < D; ++dd) {
            dkp[dd] = from_f32<T>(dk[dd]);
            dvp[dd] = from_f32<T>(dv[dd]);
        }
    }
}

// One thread per (head, i, j), summing over the windows in order. dbias (h, lq, lk) and
// pair_t (h, lq, lk, D) may each be null.
template <typename T>
__device__ void attn_bwd_pairs(const T* qsrc, const T* kvsrc, const float* bias, const float* mask,
                               const float* table, const unsigned* buckets, const T* dout, const float* lse,
                               const float* delta, float* dbias, float* pair_t, AttnDims a) {
    GRID_STRIDE(e, (long long)a.h * a.lq * a.lk) {
        int j = (int)(e % a.lk);
        int i = (int)((e / a.lk) % a.lq);
        int head = (int)(e / ((long long)a.lk * a.lq));
        float q[D], k[D], at[D];
        for (int dd = 0; dd < D; ++dd) at[dd] = 0.f;
        float acc = 0.f;
        for (int gi = 0; gi < a.g; ++gi) {
            load_row(q, qsrc + q_off(a, gi, i, head));
            load_row(k, kvsrc + kv_off(a, gi, j, a.ks, head));
            long long row = ((long long)gi * a.h + head) * a.lq + i;
            float p = expf(attn_logit(q, k, a, bias, mask, table, buckets, gi, head, i, j) - lse[row]);
            const T* go = dout + o_off(a, gi, i, head);
            const T* v = kvsrc + kv_off(a, gi, j, a.vs, head);
            float dp = 0.f;
            for (int dd = 0; dd < D; ++dd) dp += to_f32(go[dd]) * to_f32(v[dd]);
            float ds = p * (dp - delta[row]);
            acc += ds;
            for (int dd = 0; dd < D; ++dd) at[dd] += ds * q[dd];
        }
        if (dbias) dbias[e] = acc;
        if (pair_t)
            for (int dd = 0; dd < D; ++dd) pair_t[e * D + dd] = at[dd];
    }
}

// dtable (table_heads, D, n_buckets) = ctx_scale * the pair vectors summed per bucket:
// bucket b's pairs (i * lk + j) are pairs[start[b]..start[b + 1]], and with one table head
// the sum runs over all heads too.
__device__ void attn_table_reduce(const float* pair_t, const unsigned* start, const unsigned* pairs, float* dtable,
                                  AttnDims a) {
    GRID_STRIDE(e, (long long)a.table_heads * D * a.n_buckets) {
        int b = (int)(e % a.n_buckets);
        int dd = (int)((e / a.n_buckets) % D);
        int t = (int)(e / ((long long)a.n_buckets * D));
        int h0 = a.table_heads == 1 ? 0 : t;
        int h1 = a.table_heads == 1 ? a.h : t + 1;
        float acc = 0.f;
        for (int head = h0; head < h1; ++head)
            for (unsigned idx = start[b]; idx < start[b + 1]; ++idx)
                acc += pair_t[((long long)head * a.lq * a.lk + pairs[idx]) * D + dd];
        dtable[e] = a.ctx_scale * acc;
    }
}

}  // namespace
using namespace CAT4(attn_, d, HEAD_DIM, _impl);

#define NAME(kernel, sfx) CAT4(kernel, sfx, _d, HEAD_DIM)

#define ATTN_ENTRIES(T, sfx)                                                                                       \
    ENTRY(NAME(attn_fwd_, sfx),                                                                                    \
          (const T* qsrc, const T* kvsrc, const float* bias, const float* mask, const float* table,                \
           const unsigned* buckets, T* out, float* lse, AttnDims a),                                               \
          (qsrc, kvsrc, bias, mask, table, buckets, out, lse, a), attn_fwd<T>)                                     \
    ENTRY(NAME(attn_bwd_dq_, sfx),                                                                                 \
          (const T* qsrc, const T* kvsrc, const float* bias, const float* mask, const float* table,                \
           const unsigned* buckets, const T* out, const T* dout, const float* lse, float* delta, T* dqsrc,         \
           AttnDims a),                                                                                            \
          (qsrc, kvsrc, bias, mask, table, buckets, out, dout, lse, delta, dqsrc, a), attn_bwd_dq<T>)              \
    ENTRY(NAME(attn_bwd_dkv_, sfx),                                                                                \
          (const T* qsrc, const T* kvsrc, const float* bias, const float* mask, const float* table,                \
           const unsigned* buckets, const T* dout, const float* lse, const float* delta, T* dkvsrc, AttnDims a),   \
          (qsrc, kvsrc, bias, mask, table, buckets, dout, lse, delta, dkvsrc, a), attn_bwd_dkv<T>)                 \
    ENTRY(NAME(attn_bwd_pairs_, sfx),                                                                              \
          (const T* qsrc, const T* kvsrc, const float* bias, const float* mask, const float* table,                \
           const unsigned* buckets, const T* dout, const float* lse, const float* delta, float* dbias,             \
           float* pair_t, AttnDims a),                                                                             \
          (qsrc, kvsrc, bias, mask, table, buckets, dout, lse, delta, dbias, pair_t, a), attn_bwd_pairs<T>)

FOR_DTYPES(ATTN_ENTRIES)
ENTRY(NAME(attn_table_reduce, ), (const float* pair_t, const unsigned* start, const unsigned* pairs, float* dtable,
                                  AttnDims a),
      (pair_t, start, pairs, dtable, a), attn_table_reduce)
