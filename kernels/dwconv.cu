// Dense depthwise conv on channels-last maps, forward and backward: the layouts of
// selfsup-ops' `dwconv` module (the CPU path these kernels are tested against). Activations
// (b, h, w, c); weights PyTorch's (c * mult, 1, kh, kw); output channel o reads input channel
// o / mult; zero padding, any stride. candle's CUDA grouped conv loops over groups, hence these.
// The input gradient is a gather over the output positions that read each input (no atomics);
// the weight gradient sums fixed chunks of output rows into partials, then the partials in a
// fixed order (deterministic).

struct DwGeom {
    int b, h, w, ci, co, ho, wo, kh, kw, stride, pad, mult;
};

// One thread per output element (b, yo, xo, o).
template <typename T>
__device__ void dw_fwd(const T* x, const T* w, const T* bias, T* out, DwGeom g) {
    GRID_STRIDE(e, (long long)g.b * g.ho * g.wo * g.co) {
        int o = (int)(e % g.co);
        long long p = e / g.co;
        int xo = (int)(p % g.wo);
        int yo = (int)((p / g.wo) % g.ho);
        int b = (int)(p / ((long long)g.wo * g.ho));
        int ci = o / g.mult;
        float acc = bias ? to_f32(bias[o]) : 0.f;
        const T* wo_ = w + (long long)o * g.kh * g.kw;
        for (int ky = 0; ky < g.kh; ++ky) {
            int y = yo * g.stride + ky - g.pad;
            if (y < 0 || y >= g.h) continue;
            for (int kx = 0; kx < g.kw; ++kx) {
                int xx = xo * g.stride + kx - g.pad;
                if (xx < 0 || xx >= g.w) continue;
                acc += to_f32(wo_[ky * g.kw + kx]) * to_f32(x[(((long long)b * g.h + y) * g.w + xx) * g.ci + ci]);
            }
        }
        out[e] = from_f32<T>(acc);
    }
}

// One thread per input element (b, y, x, ci): dx = sum over its mult output channels and the
// output positions whose window covers (y, x).
template <typename T>
__device__ void dw_dx(const T* dy, const T* w, T* dx, DwGeom g) {
    GRID_STRIDE(e, (long long)g.b * g.h * g.w * g.ci) {
        int ci = (int)(e % g.ci);
        long long p = e / g.ci;
        int x = (int)(p % g.w);
        int y = (int)((p / g.w) % g.h);
        int b = (int)(p / ((long long)g.w * g.h));
        float acc = 0.f;
        for (int ky = 0; ky < g.kh; ++ky) {
            int ty = y + g.pad - ky;
            if (ty < 0 || ty % g.stride) continue;
            int yo = ty / g.stride;
            if (yo >= g.ho) continue;
            for (int kx = 0; kx < g.kw; ++kx) {
                int tx = x + g.pad - kx;
                if (tx < 0 || tx % g.stride) continue;
                int xo = tx / g.stride;
                if (xo >= g.wo) continue;
                const T* drow = dy + (((long long)b * g.ho + yo) * g.wo + xo) * g.co;
                for (int m = 0; m < g.mult; ++m) {
                    int o = ci * g.mult + m;
                    acc += to_f32(w[((long long)o * g.kh + ky) * g.kw + kx]) * to_f32(drow[o]);
                }
            }
        }
        dx[e] = from_f32<T>(acc);
    }
}

// Grid (ceil(co / blockDim.x), kh * kw (+1 for the bias), chunks). Block z sums the output rows
// (b, yo) in [z * chunk, min(b * ho, (z + 1) * chunk)) into partial[z, r, o].
template <typename T>
__device__ void dw_wgrad_partial(const T* dy, const T* x, float* partial, DwGeom g, int rows, int chunk) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    int r = blockIdx.y;
    int z = blockIdx.z;
    if (o >= g.co) return;
    int taps = g.kh * g.kw;
    int ky = r / g.kw, kx = r % g.kw;
    int ci = o / g.mult;
    long long r0 = (long long)z * chunk;
    long long r1 = min((long long)g.b * g.ho, r0 + chunk);
    float acc = 0.f;
    for (long long row = r0; row < r1; ++row) {
        int yo = (int)(row % g.ho);
        int b = (int)(row / g.ho);
        const T* drow = dy + row * g.wo * g.co;
        if (r == taps) {
            for (int xo = 0; xo < g.wo; ++xo) acc += to_f32(drow[(long long)xo * g.co + o]);
            continue;
        }
        int y = yo * g.stride + ky - g.pad;
        if (y < 0 || y >= g.h) continue;
        for (int xo = 0; xo < g.wo; ++xo) {
            int xx = xo * g.stride + kx - g.pad;
            if (xx < 0 || xx >= g.w) continue;
            acc += to_f32(drow[(long long)xo * g.co + o]) * to_f32(x[(((long long)b * g.h + y) * g.w + xx) * g.ci + ci]);
        }
    }
    partial[((long long)z * rows + r) * g.co + o] = acc;
}

// dw (co, kh * kw) and db (co) from the partial rows (chunks, rows, co).
template <typename T>
__device__ void dw_wgrad_reduce(const float* partial, T* dw, T* db, int co, int taps, int rows, int chunks) {
    GRID_STRIDE(e, (long long)rows * co) {
        int r = (int)(e / co), o = (int)(e % co);
        float v = sum_chunks(partial, e, (long long)rows * co, chunks);
        if (r == taps) {
            db[o] = from_f32<T>(v);
        } else {
            dw[(long long)o * taps + r] = from_f32<T>(v);
        }
    }
}

#define DW_ENTRIES(T, sfx)                                                                                   \
    ENTRY(dw_fwd_##sfx, (const T* x, const T* w, const T* bias, T* out, DwGeom g), (x, w, bias, out, g),     \
          dw_fwd<T>)                                                                                         \
    ENTRY(dw_dx_##sfx, (const T* dy, const T* w, T* dx, DwGeom g), (dy, w, dx, g), dw_dx<T>)                 \
    ENTRY(dw_wgrad_partial_##sfx, (const T* dy, const T* x, float* partial, DwGeom g, int rows, int chunk), \
          (dy, x, partial, g, rows, chunk), dw_wgrad_partial<T>)                                             \
    ENTRY(dw_wgrad_reduce_##sfx, (const float* partial, T* dw, T* db, int co, int taps, int rows, int chunks), \
          (partial, dw, db, co, taps, rows, chunks), dw_wgrad_reduce<T>)

FOR_DTYPES(DW_ENTRIES)
