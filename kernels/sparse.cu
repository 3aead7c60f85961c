// Submanifold sparse depthwise conv over the visible sites of a masked map (FCMAE's encoder),
// and the gathers/scatters between site matrices and dense maps. The layouts are those of
// selfsup-ops' `sparse` module, the CPU path these kernels are tested against:
// - a site matrix is (n, c), rows in raster order of (batch, y, x);
// - `nb` is `Neighbours::idx`: (n, taps) u32, taps row-major (ky, kx), SELFSUP_NONE where the
//   neighbour is masked or off the map;
// - weights keep PyTorch's (c, 1, k, k), i.e. (c, taps).
// The input gradient is the forward with the flipped kernel (the neighbour relation of a
// "same" conv is symmetric), so no kernel here needs atomics. The weight gradient sums fixed
// chunks of sites into partial rows, then sums the partials in a fixed order: deterministic.

// out[s, ch] = bias[ch] + sum_t w[ch, flip ? taps-1-t : t] * x[nb[s, t], ch]
template <typename T>
__device__ void sparse_dw_fwd(const T* x, const T* w, const T* bias, const unsigned* nb, T* out, int n, int c,
                              int taps, int flip) {
    GRID_STRIDE(e, (long long)n * c) {
        long long s = e / c;
        int ch = (int)(e % c);
        float acc = bias ? to_f32(bias[ch]) : 0.f;
        const unsigned* row = nb + s * taps;
        const T* wc = w + (long long)ch * taps;
        for (int t = 0; t < taps; ++t) {
            unsigned j = row[t];
            if (j != SELFSUP_NONE) acc += to_f32(wc[flip ? taps - 1 - t : t]) * to_f32(x[(long long)j * c + ch]);
        }
        out[e] = from_f32<T>(acc);
    }
}

// Grid (ceil(c / blockDim.x), rows, chunks); rows = taps (+1 for the bias). Block z sums sites
// [z * chunk, min(n, (z + 1) * chunk)) into partial[z, r, ch].
template <typename T>
__device__ void sparse_dw_wgrad_partial(const T* dy, const T* x, const unsigned* nb, float* partial, int n, int c,
                                        int taps, int rows, int chunk) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    int r = blockIdx.y;
    int z = blockIdx.z;
    if (ch >= c) return;
    long long s0 = (long long)z * chunk;
    long long s1 = min((long long)n, s0 + chunk);
    float acc = 0.f;
    for (long long s = s0; s < s1; ++s) {
        float g = to_f32(dy[s * c + ch]);
        if (r == taps) {
            acc += g;
        } else {
            unsigned j = nb[s * taps + r];
            if (j != SELFSUP_NONE) acc += g * to_f32(x[(long long)j * c + ch]);
        }
    }
    partial[((long long)z * rows + r) * c + ch] = acc;
}

// dw (c, taps) and db (c) from the partial rows (chunks, rows, c).
template <typename T>
__device__ void sparse_dw_wgrad_reduce(const float* partial, T* dw, T* db, int c, int taps, int rows, int chunks) {
    GRID_STRIDE(e, (long long)rows * c) {
        int r = (int)(e / c), ch = (int)(e % c);
        float v = sum_chunks(partial, e, (long long)rows * c, chunks);
        if (r == taps) {
            db[ch] = from_f32<T>(v);
        } else {
            dw[(long long)ch * taps + r] = from_f32<T>(v);
        }
    }
}

// out[s, :] = dense[sites[s], :]
template <typename T>
__device__ void gather_rows(const T* dense, const unsigned* sites, T* out, int n, int c) {
    GRID_STRIDE(e, (long long)n * c) {
        long long s = e / c;
        out[e] = dense[(long long)sites[s] * c + e % c];
    }
}

// dense[sites[s], :] = src[s, :]; the other rows of `dense` are left as they are (zeroed by
// the caller). Sites are distinct, so no two threads write one element.
template <typename T>
__device__ void scatter_rows(const T* src, const unsigned* sites, T* dense, int n, int c) {
    GRID_STRIDE(e, (long long)n * c) {
        long long s = e / c;
        dense[(long long)sites[s] * c + e % c] = src[e];
    }
}

#define SPARSE_ENTRIES(T, sfx)                                                                                  \
    ENTRY(sparse_dw_fwd_##sfx,                                                                                  \
          (const T* x, const T* w, const T* bias, const unsigned* nb, T* out, int n, int c, int taps, int flip), \
          (x, w, bias, nb, out, n, c, taps, flip), sparse_dw_fwd<T>)                                            \
    ENTRY(sparse_dw_wgrad_partial_##sfx,                                                                        \
          (const T* dy, const T* x, const unsigned* nb, float* partial, int n, int c, int taps, int rows,       \
           int chunk),                                                                                          \
          (dy, x, nb, partial, n, c, taps, rows, chunk), sparse_dw_wgrad_partial<T>)                            \
    ENTRY(sparse_dw_wgrad_reduce_##sfx, (const float* partial, T* dw, T* db, int c, int taps, int rows, int chunks), \
          (partial, dw, db, c, taps, rows, chunks), sparse_dw_wgrad_reduce<T>)                                  \
    ENTRY(gather_rows_##sfx, (const T* dense, const unsigned* sites, T* out, int n, int c),                     \
          (dense, sites, out, n, c), gather_rows<T>)                                                            \
    ENTRY(scatter_rows_##sfx, (const T* src, const unsigned* sites, T* dense, int n, int c),                    \
          (src, sites, dense, n, c), scatter_rows<T>)

FOR_DTYPES(SPARSE_ENTRIES)
